//! `gateway bans list|explain|lift`: the blocklist seen as bans, whoever made them.
use std::{fmt::Write as _, time::SystemTime};

use super::{
    Exit, Failure,
    args::BansCommand,
    lists::{expiry, render_table},
};
use crate::{
    admin::{
        client::AdminClient,
        protocol::{BanExplanation, Request, Response},
    },
    xdp::ListKind,
};

pub(super) fn run(
    connect: impl FnOnce() -> Result<AdminClient, Failure>,
    command: BansCommand,
) -> Result<Exit, Failure> {
    // Checked before the daemon is contacted, so a typo is a usage error even when it is down.
    let address_ok = |address: &str| address.parse::<std::net::IpAddr>().is_ok();
    match command {
        BansCommand::List(args) => {
            let Response::Entries { entries } = connect()?.call(&Request::List {
                list: ListKind::Block,
            })?
            else {
                return Err(unexpected());
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", render_table(&entries, SystemTime::now()));
            }
            Ok(Exit::Success)
        }
        BansCommand::Explain { address, json } => {
            if !address_ok(&address) {
                eprintln!("error: `{address}` is not an IP address (example: 203.0.113.7)");
                return Ok(Exit::Usage);
            }
            let Response::Explained(explanation) =
                connect()?.call(&Request::BansExplain { address })?
            else {
                return Err(unexpected());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                print!("{}", render_explanation(&explanation, SystemTime::now()));
            }
            Ok(Exit::Success)
        }
        BansCommand::Lift { address } => {
            if !address_ok(&address) {
                eprintln!("error: `{address}` is not an IP address (example: 203.0.113.7)");
                return Ok(Exit::Usage);
            }
            let Response::Lifted {
                removed,
                l7_denials,
            } = connect()?.call(&Request::BansLift {
                address: address.clone(),
            })?
            else {
                return Err(unexpected());
            };
            if removed.is_empty() && l7_denials == 0 {
                println!("{address} is not banned");
                return Ok(Exit::Failure);
            }
            for cidr in &removed {
                println!("lifted {cidr}");
            }
            if l7_denials > 0 {
                println!("lifted {l7_denials} L7 denial(s) of {address}");
            }
            Ok(Exit::Success)
        }
    }
}

fn unexpected() -> Failure {
    anyhow::anyhow!(
        "the daemon answered with an unexpected response; are the CLI and daemon the same version?"
    )
    .into()
}

fn render_explanation(explanation: &BanExplanation, now: SystemTime) -> String {
    let mut out = String::new();
    if explanation.entries.is_empty() && !explanation.denied_at_l7 {
        let _ = writeln!(out, "{} is not banned", explanation.address);
    }
    for entry in &explanation.entries {
        let _ = writeln!(
            out,
            "{} is banned by {} (origin {}, {}, {} packets dropped): {}",
            explanation.address,
            entry.cidr,
            entry.origin.name(),
            expiry(entry, now),
            entry.hits,
            entry.reason.as_deref().unwrap_or("no reason given")
        );
    }
    if explanation.denied_at_l7 {
        let _ = writeln!(
            out,
            "{} is denied at L7 (it reaches the gateway through a trusted proxy)",
            explanation.address
        );
    }
    if !explanation.verdicts.is_empty() {
        let _ = writeln!(out, "recent verdicts:");
    }
    for verdict in &explanation.verdicts {
        let evidence: Vec<String> = verdict["evidence"]
            .as_array()
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|pair| format!("{} {}", pair[1], pair[0].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} rule `{}` on {}: {} in {}s -> {} for {}s (offence {})",
            verdict["time"].as_str().unwrap_or("?"),
            verdict["rule"].as_str().unwrap_or("?"),
            verdict["source"].as_str().unwrap_or("?"),
            evidence.join(", "),
            verdict["window_secs"],
            verdict["enforcement"].as_str().unwrap_or("?"),
            verdict["ttl_secs"],
            verdict["offence"]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lists::{EntryView, Origin};

    #[test]
    fn an_explanation_names_rule_evidence_and_expiry() {
        let now = SystemTime::now();
        let unix_ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let text = render_explanation(
            &BanExplanation {
                address: "198.51.100.7".into(),
                entries: vec![EntryView {
                    cidr: "198.51.100.7".parse().unwrap(),
                    origin: Origin::Auto,
                    reason: Some("abuse rule `stuffing`: 20 auth_failure in 1m".into()),
                    expires_unix_ms: Some(unix_ms + 600_500),
                    added_unix_ms: unix_ms,
                    hits: 12,
                }],
                denied_at_l7: false,
                verdicts: vec![serde_json::json!({
                    "time": "2026-11-25T00:00:00Z", "rule": "stuffing", "source": "198.51.100.7",
                    "evidence": [["auth_failure", 20]], "window_secs": 60,
                    "enforcement": "xdp", "ttl_secs": 600, "offence": 1
                })],
            },
            now,
        );
        assert!(text.contains("origin auto, in 10m"), "{text}");
        assert!(text.contains("12 packets dropped"), "{text}");
        assert!(text.contains("rule `stuffing` on 198.51.100.7: 20 auth_failure in 60s -> xdp for 600s (offence 1)"), "{text}");
    }
}
