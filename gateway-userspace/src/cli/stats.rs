//! `gateway stats`: kernel counters per verdict reason, and rates with `--watch`.
use std::fmt::Write as _;

use super::{Exit, Failure, args::StatsArgs};
use crate::admin::{
    client::AdminClient,
    protocol::{Request, Response, StatsView},
};

pub(super) fn run(client: &mut AdminClient, args: &StatsArgs) -> Result<Exit, Failure> {
    let mut previous: Option<StatsView> = None;
    loop {
        let Response::Stats(stats) = client.call(&Request::Stats)? else {
            return Err(anyhow::anyhow!("the daemon answered with an unexpected response").into());
        };
        if args.json {
            println!("{}", serde_json::to_string(&stats)?);
        } else {
            print!("{}", render(&stats, previous.as_ref()));
        }
        let Some(interval) = args.watch else {
            return Ok(Exit::Success);
        };
        previous = Some(stats);
        std::thread::sleep(interval);
        if !args.json {
            println!();
        }
    }
}

/// A table of counters; with an earlier reading, also packets per second.
fn render(stats: &StatsView, previous: Option<&StatsView>) -> String {
    let seconds = previous
        .map(|p| stats.monotonic_ns.saturating_sub(p.monotonic_ns) as f64 / 1e9)
        .filter(|s| *s > 0.0);
    let mut out = format!(
        "{:<18} {:>7} {:>16} {:>18} {:>14}\n",
        "REASON", "ACTION", "PACKETS", "BYTES", "PACKETS/S"
    );
    for (index, reason) in stats.reasons.iter().enumerate() {
        let rate = match (seconds, previous.and_then(|p| p.reasons.get(index))) {
            (Some(seconds), Some(before)) => {
                format!(
                    "{:.1}",
                    reason.packets.saturating_sub(before.packets) as f64 / seconds
                )
            }
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<18} {:>7} {:>16} {:>18} {:>14}",
            reason.reason,
            if reason.dropped { "drop" } else { "pass" },
            reason.packets,
            reason.bytes,
            rate
        );
    }
    let _ = writeln!(
        out,
        "rate-limit events received: {}",
        stats.rate_limit_events
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::ReasonCount;

    fn reading(ns: u64, packets: u64) -> StatsView {
        StatsView {
            monotonic_ns: ns,
            reasons: vec![ReasonCount {
                reason: "blocked_address".into(),
                dropped: true,
                packets,
                bytes: packets * 60,
            }],
            rate_limit_events: 0,
        }
    }

    #[test]
    fn rates_come_from_two_readings() {
        let first = reading(1_000_000_000, 100);
        let second = reading(3_000_000_000, 700);
        let table = render(&second, Some(&first));
        assert!(table.contains("300.0"), "{table}");
        assert!(render(&first, None).contains(" -\n"));
    }
}
