//! Section 4: ban reaction time. A client namespace sends requests that the gateway answers
//! 401 (no API key); the response that crosses the abuse rule's threshold starts the clock,
//! and UDP probes from the same source every ~100 µs find the first packet XDP drops. One
//! source address per ban, so every ban is a first offence with the same rule.
//!
//! Log-polling tools are not run here: their documented polling intervals are quoted beside the
//! measurement for context, and marked as such.
use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use gateway_tests::netns::VethPair;
use tokio::io::AsyncWriteExt as _;

use crate::{
    Ctx,
    daemon::{Daemon, catching_panics, xdp_native},
    http1::read_response,
    report::{Chart, Section, Table, median},
};

/// The veth pair's subnet (198.18.61.0/24); other sections use other numbers.
const SUBNET: u8 = 61;
/// The gateway's plain-HTTP listener port.
const HTTP_PORT: u16 = 8080;
/// The UDP echo server the probes go to, beside the daemon.
const ECHO_PORT: u16 = 7007;
/// Failures (401) within the window that ban a source; the threshold-crossing one is the last.
const THRESHOLD: usize = 3;
/// Bans per repetition, each from its own source address. Each takes a few milliseconds, so
/// the quick run measures as many.
const BANS: u8 = 100;
/// Where the sources' addresses come from.
const SOURCE_NETWORK: &str = "10.61.0.0/16";
/// Longest a ban may take before the source counts as never dropped.
const PROBE_LIMIT: Duration = Duration::from_secs(1);
/// Pause between probes.
const PROBE_INTERVAL: Duration = Duration::from_micros(100);

pub(crate) fn bench(ctx: &Ctx) -> Result<Section> {
    catching_panics(|| measure(ctx))
}

fn measure(ctx: &Ctx) -> Result<Section> {
    let net = VethPair::new("bench-react", SUBNET);
    let echo = Echo::start(&net)?;
    let mut daemon = Daemon::new(&ctx.gateway, "react")?;
    daemon.write_config(&format!(
        r#"{xdp}
[[listeners]]
name = "edge"
address = "{gateway}:{HTTP_PORT}"
routes = ["login"]

# Every request lacks the API key: the gateway itself answers 401 (`auth_failure`), so the
# upstream is never contacted.
[[routes]]
name = "login"
path_prefix = "/login"
upstream = "app"
auth = ["api_key"]

[[upstreams]]
name = "app"
endpoints = ["127.0.0.1:9"]

[http]
shutdown_grace = "1s"

[[abuse.rules]]
name = "credential-stuffing"
classes = ["auth_failure"]
threshold = {THRESHOLD}
window = "1m"
ban = "10m"
"#,
        xdp = xdp_native(&net.gateway_if),
        gateway = net.gateway_v4,
    ))?;
    daemon.start(&net.gateway)?;

    // The sources live in 10.61.0.0/16, routed to the client's veth end, so that every
    // repetition has fresh addresses: a first offence each, with no counter left over.
    net.gateway
        .ip(&["route", "add", SOURCE_NETWORK, "dev", &net.gateway_if]);
    let listener = SocketAddr::from((net.gateway_v4, HTTP_PORT));
    let echo_addr = SocketAddr::from((net.gateway_v4, ECHO_PORT));
    let mut repetitions = Vec::new();
    for repetition in 1..=ctx.repetitions {
        eprintln!("   repetition {repetition} of {}", ctx.repetitions);
        let block = u8::try_from(repetition).context("at most 255 repetitions")?;
        let sources: Vec<Ipv4Addr> = (0..BANS)
            .map(|i| Ipv4Addr::new(10, 61, block, 10 + i))
            .collect();
        for source in &sources {
            net.client.ip(&[
                "addr",
                "add",
                &format!("{source}/16"),
                "dev",
                &net.client_if,
            ]);
        }
        let mut times = Vec::new();
        let mut missed = 0;
        for source in &sources {
            let t0 = cross_threshold(&net, *source, listener)
                .with_context(|| format!("sending the failing requests from {source}"))?;
            match first_dropped_probe(&net, *source, echo_addr, t0) {
                Some(took) => times.push(took.as_secs_f64() * 1000.0),
                None => missed += 1,
            }
        }
        ensure!(
            !times.is_empty(),
            "no ban was seen within {PROBE_LIMIT:?}: is the abuse loop working? The end of the \
             daemon log:\n{}",
            daemon.log_tail()
        );
        times.sort_by(f64::total_cmp);
        repetitions.push(Repetition { times, missed });
    }
    drop(echo);
    Ok(report(&repetitions))
}

/// One repetition's reaction times in ms (sorted), and the bans not seen in time.
struct Repetition {
    times: Vec<f64>,
    missed: usize,
}

/// Sends [`THRESHOLD`] requests from `source` on one keep-alive connection and returns when
/// the last 401 was read in full: the moment the client learned it crossed the threshold.
fn cross_threshold(net: &VethPair, source: Ipv4Addr, listener: SocketAddr) -> Result<Instant> {
    net.client.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            let mut stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(listener))
                .await
                .context("connecting timed out")??;
            let request = format!(
                "GET /login HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
                listener.ip()
            );
            let mut buffer = vec![0u8; 4096];
            for attempt in 1..=THRESHOLD {
                stream.write_all(request.as_bytes()).await?;
                let head = tokio::time::timeout(
                    Duration::from_secs(2),
                    read_response(&mut stream, &mut buffer),
                )
                .await
                .context("no response within 2 s")??;
                if !head.starts_with("HTTP/1.1 401") {
                    bail!(
                        "attempt {attempt} was answered `{}`, not 401",
                        head.lines().next().unwrap_or_default()
                    );
                }
            }
            Ok(Instant::now())
        })
    })
}

/// Probes the echo server from `source` every [`PROBE_INTERVAL`] after `t0` and returns when
/// the first probe of a silent run was sent: ten probes in a row without an echo, the first of
/// them over a millisecond old (an echo over a veth takes far less). `None` if that did not
/// happen within [`PROBE_LIMIT`].
fn first_dropped_probe(
    net: &VethPair,
    source: Ipv4Addr,
    echo: SocketAddr,
    t0: Instant,
) -> Option<Duration> {
    net.client.run(move || {
        let socket = UdpSocket::bind((source, 0)).ok()?;
        socket.connect(echo).ok()?;
        socket.set_nonblocking(true).ok()?;
        let mut sent: Vec<Duration> = Vec::new();
        let mut echoed = HashSet::new();
        let mut buffer = [0u8; 8];
        // Bounded in time and in count.
        while sent.len() < 20_000 && t0.elapsed() < PROBE_LIMIT {
            let sequence = sent.len() as u64;
            let _ = socket.send(&sequence.to_be_bytes());
            sent.push(t0.elapsed());
            thread::sleep(PROBE_INTERVAL);
            while let Ok(8) = socket.recv(&mut buffer) {
                echoed.insert(u64::from_be_bytes(buffer));
            }
            let silent = (0..sent.len() as u64)
                .rev()
                .take_while(|seq| !echoed.contains(seq))
                .count();
            if silent >= 10 && sent[sent.len() - silent] + Duration::from_millis(1) < t0.elapsed() {
                return Some(sent[sent.len() - silent]);
            }
        }
        None
    })
}

/// A UDP echo server in the gateway's namespace, stopped on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start(net: &VethPair) -> Result<Echo> {
        let at = SocketAddr::from((net.gateway_v4, ECHO_PORT));
        let socket = net
            .gateway
            .run(|| UdpSocket::bind(at))
            .with_context(|| format!("binding the echo server on {at}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            while !running.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(&buffer[..len], from);
                }
            }
        });
        Ok(Echo {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The `q`-th percentile of `sorted` by the nearest-rank method.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(repetitions: &[Repetition]) -> Section {
    let medians: Vec<f64> = repetitions.iter().map(|r| median(&r.times)).collect();
    let p99s: Vec<f64> = repetitions
        .iter()
        .map(|r| percentile(&r.times, 99.0))
        .collect();
    let median_ms = median(&medians);
    let p99_ms = median(&p99s);
    let missed: usize = repetitions.iter().map(|r| r.missed).sum();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "The daemon runs in one namespace with XDP attached in native mode to its veth end and \
         a plain-HTTP listener whose route wants an API key; a rule bans a source after \
         {THRESHOLD} `auth_failure`s within a minute. From a second namespace, each of {BANS} \
         source addresses per repetition sends {THRESHOLD} requests on one keep-alive \
         connection; the clock starts when the client has read the last of those 401s in full \
         and stops at the send time of the first UDP probe (one every ~100 µs, from the same \
         address, to an echo server beside the daemon) that the kernel dropped. This is end to \
         end: outcome counting, the verdict thread, the map update and the probes' own \
         scheduling are all in it. {} repetitions of {BANS} bans, each from fresh addresses; \
         the headline figures are the medians of the repetitions' medians and p99s (with \
         {BANS} samples, p99 by nearest rank is the second-slowest). {}\n",
        repetitions.len(),
        if missed == 0 {
            format!("Every ban was seen within {PROBE_LIMIT:?}.")
        } else {
            format!(
                "{missed} ban(s) were not seen within {PROBE_LIMIT:?} and are left out of the \
                 figures."
            )
        },
    );
    let _ = writeln!(
        summary,
        "**Median {median_ms:.2} ms, p99 {p99_ms:.2} ms.** Beside it, the documented intervals \
         of log-based banning tools, **quoted, not measured here**: they poll, so a ban waits \
         for the next poll on top of log writing, parsing and the firewall command."
    );
    let mut runs = Table::new(
        "Each repetition (ms):",
        &["repetition", "bans seen", "median", "p99", "max"],
    );
    for (i, repetition) in repetitions.iter().enumerate() {
        runs.row(vec![
            (i + 1).to_string(),
            format!("{} of {BANS}", repetition.times.len()),
            format!("{:.2}", medians[i]),
            format!("{:.2}", p99s[i]),
            format!(
                "{:.2}",
                repetition.times.last().copied().unwrap_or(f64::NAN)
            ),
        ]);
    }
    let mut table = Table::new("For context:", &["what", "reaction", "source"]);
    table.row(vec![
        "this gateway: 401 → first packet dropped by XDP".to_owned(),
        format!("median {median_ms:.2} ms, p99 {p99_ms:.2} ms"),
        "measured in this run".to_owned(),
    ]);
    table.row(vec![
        "fail2ban, `backend = polling`".to_owned(),
        "log files polled about once a second (1 s sleep between polls), then the ban action \
         runs"
            .to_owned(),
        "quoted: fail2ban `jail.conf` (`backend`) and its polling filter's 1 s sleep time"
            .to_owned(),
    ]);
    table.row(vec![
        "fail2ban, `backend = pyinotify` / `systemd`".to_owned(),
        "woken by new log lines (no poll interval); then regex matching and the ban action \
         (an `iptables`/`nft` command)"
            .to_owned(),
        "quoted: fail2ban `jail.conf` (`backend`)".to_owned(),
    ]);
    table.row(vec![
        "CrowdSec firewall bouncer".to_owned(),
        "pulls new decisions from the local API every `update_frequency`: 10 s by default"
            .to_owned(),
        "quoted: `crowdsec-firewall-bouncer.yaml` default, docs.crowdsec.net (firewall \
         bouncer)"
            .to_owned(),
    ]);
    let chart = Chart {
        file: "ban-reaction.png".to_owned(),
        title: "Ban reaction time, log scale (doc. = documented, not measured)".to_owned(),
        y_label: "ms".to_owned(),
        labels: vec![
            "gateway median (measured)".to_owned(),
            "gateway p99 (measured)".to_owned(),
            "fail2ban polling interval (doc.)".to_owned(),
            "CrowdSec bouncer update_frequency (doc.)".to_owned(),
        ],
        series: vec![(
            "milliseconds".to_owned(),
            vec![median_ms, p99_ms, 1000.0, 10_000.0],
        )],
        log_scale: true,
    };
    Section {
        summary,
        tables: vec![runs, table],
        charts: vec![chart],
    }
}
