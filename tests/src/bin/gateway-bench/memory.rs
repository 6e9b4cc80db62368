//! Section 5: memory and scale. The daemon's resident memory idle, with a million bans loaded,
//! and with 10,000 idle keep-alive TLS connections; the kernel memory of its maps; how long a
//! million bans take to import, and to be back after a restart (with the pinned maps kept, as
//! after a daemon upgrade, and without them, as after a reboot, restored from the state file).
//!
//! Each repetition is a fresh daemon (its own instance, pins and state) attached in native
//! mode to a veth end, with a TLS listener in front of `gateway demo-upstream`; the client
//! connections come from a second namespace.
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use gateway_tests::netns::VethPair;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::{
    Ctx,
    daemon::{
        Background, Daemon, catching_panics, demo_upstream, rss_kib, run_bounded, wait_for_tcp,
        xdp_native,
    },
    http1::read_response,
    report::{Chart, Section, Table, median, thousands},
};

/// The veth pair's subnet (198.18.62.0/24); other sections use other numbers.
const SUBNET: u8 = 62;
const TLS_PORT: u16 = 8443;
/// Where `gateway demo-upstream` listens, in the gateway's namespace.
const UPSTREAM: &str = "127.0.0.1:8091";
/// Idle keep-alive connections held open at once.
const CONNECTIONS: usize = 10_000;
/// Connections being set up at the same time while opening them.
const OPENING_CONCURRENCY: usize = 64;
/// File descriptors the benchmark process (10,000 client sockets) and the daemon (10,000
/// accepted ones) each need, with room for everything else they hold open.
const NOFILE_NEEDED: u64 = CONNECTIONS as u64 + 1_000;
/// Longest a million-entry import or restore may take before the run gives up.
const BULK_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) fn bench(ctx: &Ctx) -> Result<Section> {
    catching_panics(|| measure(ctx))
}

/// One repetition's figures. Memory in KiB, times in seconds.
#[derive(Clone, Default)]
struct Figures {
    rss_idle: f64,
    rss_bans: f64,
    rss_connections: f64,
    maps_idle: f64,
    maps_bans: f64,
    /// Each map's memory in bytes with the bans loaded, largest first.
    maps_with_bans: Vec<(String, u64)>,
    import_s: f64,
    restart_pinned_s: f64,
    restart_unpinned_s: f64,
    open_connections_s: f64,
}

fn measure(ctx: &Ctx) -> Result<Section> {
    let bans: u32 = if ctx.quick { 200_000 } else { 1_000_000 };
    raise_nofile_limit()?;
    let net = VethPair::new("bench-mem", SUBNET);
    let mut upstream = Background::spawn(
        "gateway demo-upstream",
        Some(&net.gateway),
        demo_upstream(&ctx.gateway, UPSTREAM),
    )?;
    wait_for_tcp(&net.gateway, UPSTREAM.parse()?, Duration::from_secs(10))?;

    let mut runs = Vec::new();
    for repetition in 1..=ctx.repetitions {
        eprintln!("   repetition {repetition} of {}", ctx.repetitions);
        runs.push(
            one_repetition(ctx, &net, bans).with_context(|| format!("repetition {repetition}"))?,
        );
    }
    upstream.stop()?;
    Ok(report(&runs, bans, ctx.repetitions))
}

fn one_repetition(ctx: &Ctx, net: &VethPair, bans: u32) -> Result<Figures> {
    let mut figures = Figures::default();
    let mut daemon = Daemon::new(&ctx.gateway, "mem")?;
    let certificate = rcgen::generate_simple_self_signed(vec![net.gateway_v4.to_string()])
        .context("generating the listener's certificate")?;
    let dir = daemon.dir().to_owned();
    fs::write(dir.join("tls.crt"), certificate.cert.pem())?;
    fs::write(dir.join("tls.key"), certificate.signing_key.serialize_pem())?;
    daemon.write_config(&format!(
        r#"{xdp}
[[listeners]]
name = "edge"
address = "{gateway}:{TLS_PORT}"
routes = ["all"]
[listeners.tls]
default_certificate = {{ cert = "{dir}/tls.crt", key = "{dir}/tls.key" }}

[[routes]]
name = "all"
path_prefix = "/"
upstream = "app"

[[upstreams]]
name = "app"
endpoints = ["{UPSTREAM}"]

# Raised from the defaults (10,000 in total, 256 per source) so that 10,000 connections from
# one client address are allowed, and kept open while memory is read.
[http]
max_connections = 20000
max_connections_per_source = 20000
idle_timeout = "10m"
shutdown_grace = "1s"
"#,
        xdp = xdp_native(&net.gateway_if),
        gateway = net.gateway_v4,
        dir = dir.display(),
    ))?;
    daemon.start(&net.gateway)?;
    thread::sleep(Duration::from_secs(1));
    figures.rss_idle = rss_kib(daemon.pid()?)?.0 as f64;
    figures.maps_idle = total_kib(&map_memory(&daemon.pin_dir())?);

    // A million distinct addresses of 10.0.0.0/8 (no namespace here uses that network).
    let file = dir.join("bans.txt");
    write_ban_file(&file, bans)?;
    let file_arg = file.to_str().context("a UTF-8 scratch path")?;
    let started = Instant::now();
    daemon.cli_bounded(
        &["block", "import", file_arg, "--reason", "bench"],
        BULK_TIMEOUT,
    )?;
    figures.import_s = started.elapsed().as_secs_f64();
    let status = daemon.json(&["status", "--json"])?;
    ensure!(
        bans_loaded(&status, bans),
        "after the import the daemon does not hold {bans} bans: {status}"
    );
    thread::sleep(Duration::from_secs(1));
    figures.rss_bans = rss_kib(daemon.pid()?)?.0 as f64;
    figures.maps_with_bans = map_memory(&daemon.pin_dir())?;
    figures.maps_bans = total_kib(&figures.maps_with_bans);

    let listener = SocketAddr::from((net.gateway_v4, TLS_PORT));
    let pid = daemon.pid()?;
    let (open_s, rss_connections) = net.client.run(|| {
        hold_connections(
            listener,
            net.gateway_v4,
            certificate.cert.der().clone(),
            pid,
        )
    })?;
    figures.open_connections_s = open_s;
    figures.rss_connections = rss_connections as f64;

    // A restart that finds its pins: the kernel never lost the bans.
    daemon.stop()?;
    figures.restart_pinned_s = restart_until_restored(&mut daemon, net, bans)?;
    // A restart without pins, as after a reboot: every ban comes back from the state file.
    daemon.stop()?;
    daemon.remove_pins()?;
    figures.restart_unpinned_s = restart_until_restored(&mut daemon, net, bans)?;
    Ok(figures)
}

/// Raises the soft RLIMIT_NOFILE to the hard one for this process and what it spawns from
/// now on: the soft default (often 1,024) is below 10,000 connections on each side. Raising
/// the hard limit itself needs CAP_SYS_RESOURCE, which containers often lack, so that must
/// already be high enough.
fn raise_nofile_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    ensure!(
        rc == 0,
        "reading the open-file limit: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        limit.rlim_max >= NOFILE_NEEDED,
        "the open-file hard limit is {}, below the {NOFILE_NEEDED} that {CONNECTIONS} \
         connections need: raise it (`ulimit -Hn {NOFILE_NEEDED}` as root, or the container's \
         nofile limit)",
        limit.rlim_max
    );
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    ensure!(
        rc == 0,
        "raising the open-file limit to {}: {}",
        limit.rlim_max,
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn write_ban_file(path: &Path, bans: u32) -> Result<()> {
    let first = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let mut file = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("creating `{}`", path.display()))?,
    );
    writeln!(file, "# gateway-bench: {bans} single addresses")?;
    for offset in 0..bans {
        writeln!(file, "{}", Ipv4Addr::from(first + offset))?;
    }
    file.flush()?;
    Ok(())
}

/// Whether `gateway status --json` shows `bans` block entries, in the daemon's lists and in
/// the kernel's IPv4 address map.
fn bans_loaded(status: &Value, bans: u32) -> bool {
    let kernel = status["maps"].as_array().and_then(|maps| {
        maps.iter()
            .find(|map| map["name"] == "GW_BLOCK_V4")
            .and_then(|map| map["entries"].as_u64())
    });
    status["block_entries"].as_u64() == Some(u64::from(bans)) && kernel == Some(u64::from(bans))
}

/// Starts the daemon again and returns the seconds from the spawn until it answers with every
/// ban in its lists and in the kernel.
fn restart_until_restored(daemon: &mut Daemon, net: &VethPair, bans: u32) -> Result<f64> {
    let started = Instant::now();
    daemon.start(&net.gateway)?;
    loop {
        let status = daemon.json(&["status", "--json"])?;
        if bans_loaded(&status, bans) {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > BULK_TIMEOUT {
            bail!("{bans} bans were not back within {BULK_TIMEOUT:?} of a restart: {status}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kernel memory of each map pinned under `pin_dir` (`bytes_memlock` from bpftool, which on
/// this kernel is what a map uses, not what it could grow to), in bytes, by pin name.
fn map_memory(pin_dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut maps = Vec::new();
    let entries = fs::read_dir(pin_dir)
        .with_context(|| format!("listing the pinned maps in `{}`", pin_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let mut command = Command::new("bpftool");
        command.args(["-j", "map", "show", "pinned"]).arg(&path);
        // Pins of programs or links, if any, are not maps: skipped.
        let Ok(output) = run_bounded(command, Duration::from_secs(10)) else {
            continue;
        };
        let map: Value = serde_json::from_str(&output)
            .with_context(|| format!("bpftool printed invalid JSON for `{}`", path.display()))?;
        let name = path
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
        maps.push((name, map["bytes_memlock"].as_u64().unwrap_or(0)));
    }
    ensure!(
        !maps.is_empty(),
        "bpftool showed no map pinned under `{}`: is bpftool installed?",
        pin_dir.display()
    );
    maps.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(maps)
}

fn total_kib(maps: &[(String, u64)]) -> f64 {
    maps.iter().map(|(_, bytes)| *bytes as f64 / 1024.0).sum()
}

/// Opens [`CONNECTIONS`] TLS connections to `listener`, each serving one request and then idle
/// on keep-alive; reads the daemon's (`pid`) resident memory while they are all open. Returns
/// the seconds opening took and that RSS in KiB. Runs on a thread inside the client namespace.
fn hold_connections(
    listener: SocketAddr,
    server: Ipv4Addr,
    certificate: CertificateDer<'static>,
    pid: u32,
) -> Result<(f64, u64)> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certificate)
        .context("trusting the listener's certificate")?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("a TLS client configuration")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(std::net::IpAddr::V4(server).into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(OPENING_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let permit = Arc::clone(&semaphore).acquire_owned().await?;
            let (connector, name) = (connector.clone(), name.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let tcp = tokio::net::TcpStream::connect(listener).await?;
                let mut tls = connector.connect(name, tcp).await?;
                tls.write_all(b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .await?;
                let mut buffer = vec![0u8; 16 * 1024];
                let head = read_response(&mut tls, &mut buffer).await?;
                ensure!(
                    head.starts_with("HTTP/1.1 200"),
                    "answered `{}`",
                    head.lines().next().unwrap_or_default()
                );
                anyhow::Ok(tls)
            });
        }
        let mut open = Vec::with_capacity(CONNECTIONS);
        let deadline = Duration::from_secs(120);
        while let Some(joined) = tokio::time::timeout(deadline, tasks.join_next())
            .await
            .context("opening 10,000 connections took over 2 minutes")?
        {
            open.push(joined?.context("opening a keep-alive connection")?);
        }
        let open_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(pid)?.0;
        drop(open);
        Ok((open_s, rss))
    })
}

fn report(runs: &[Figures], bans: u32, repetitions: usize) -> Section {
    let of = |pick: fn(&Figures) -> f64| median(&runs.iter().map(pick).collect::<Vec<_>>());
    let mib = |kib: f64| format!("{:.1} MiB", kib / 1024.0);
    let bans_text = if bans == 1_000_000 {
        "1,000,000".to_owned()
    } else {
        format!(
            "{} (quick run; the full run uses 1,000,000)",
            thousands(bans)
        )
    };
    let connections = thousands(CONNECTIONS);
    let bans = thousands(bans);
    let rss_idle = of(|f| f.rss_idle);
    let rss_bans = of(|f| f.rss_bans);
    let rss_connections = of(|f| f.rss_connections);
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "A fresh daemon per repetition ({repetitions}; figures are medians), attached in native \
         mode to a veth end, with one TLS listener in front of `gateway demo-upstream`. Bans: \
         {bans_text} distinct IPv4 addresses imported with `gateway block import`. \
         Connections: {connections} TLS connections from a second namespace, each served one \
         request and left idle on keep-alive, all open while the daemon's RSS is read. For that \
         test the config raises `http.max_connections` (default 10,000) and \
         `http.max_connections_per_source` (default 256) to 20,000, and the benchmark raises \
         its open-file soft limit to the hard one (at least {nofile}). Restart times run from \
         spawning `gateway run` until `gateway status` shows every ban in the daemon's lists \
         and in the kernel map. For scale: the L7 section reports NGINX (master + 2 workers) \
         RSS in the same run.\n",
        nofile = thousands(NOFILE_NEEDED),
    );
    let _ = writeln!(
        summary,
        "Per idle keep-alive TLS connection the daemon holds about {:.1} KiB.",
        (rss_connections - rss_bans) / CONNECTIONS as f64
    );
    let mut memory = Table::new("Memory:", &["what", "median"]);
    memory.row(vec!["daemon RSS, idle".to_owned(), mib(rss_idle)]);
    memory.row(vec![
        format!("daemon RSS, {bans} bans loaded"),
        mib(rss_bans),
    ]);
    memory.row(vec![
        format!("daemon RSS, {bans} bans and {connections} idle keep-alive TLS connections"),
        mib(rss_connections),
    ]);
    memory.row(vec![
        "kernel map memory (all pinned maps, `bytes_memlock`), idle".to_owned(),
        mib(of(|f| f.maps_idle)),
    ]);
    memory.row(vec![
        format!("kernel map memory, {bans} bans"),
        mib(of(|f| f.maps_bans)),
    ]);
    // The breakdown of the last repetition: map sizes do not vary between runs.
    let mut maps = Table::new(
        &format!("Kernel memory per map with {bans} bans (`bytes_memlock`):"),
        &["map", "memory"],
    );
    for (name, bytes) in runs
        .last()
        .map(|f| f.maps_with_bans.as_slice())
        .unwrap_or_default()
    {
        let size = if *bytes < 1024 * 1024 {
            format!("{:.1} KiB", *bytes as f64 / 1024.0)
        } else {
            mib(*bytes as f64 / 1024.0)
        };
        maps.row(vec![format!("`{name}`"), size]);
    }
    let mut times = Table::new("Times:", &["what", "median", "all runs"]);
    let all = |pick: fn(&Figures) -> f64| {
        runs.iter()
            .map(|f| format!("{:.2} s", pick(f)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (what, pick) in [
        (
            format!("import {bans} bans (`gateway block import`)"),
            (|f: &Figures| f.import_s) as fn(&Figures) -> f64,
        ),
        (
            format!("restart with pinned maps kept, until all {bans} are back"),
            |f: &Figures| f.restart_pinned_s,
        ),
        (
            format!(
                "restart without pins (as after a reboot), {bans} restored from the state file"
            ),
            |f: &Figures| f.restart_unpinned_s,
        ),
        (
            format!(
                "open {connections} TLS keep-alive connections ({OPENING_CONCURRENCY} at a time)"
            ),
            |f: &Figures| f.open_connections_s,
        ),
    ] {
        times.row(vec![what, format!("{:.2} s", of(pick)), all(pick)]);
    }
    let chart = Chart {
        file: "memory.png".to_owned(),
        title: "Gateway memory (median)".to_owned(),
        y_label: "MiB".to_owned(),
        labels: vec![
            "RSS idle".to_owned(),
            format!("RSS, {bans} bans"),
            format!("RSS, + {connections} conns"),
            format!("kernel maps, {bans} bans"),
        ],
        series: vec![(
            "MiB".to_owned(),
            vec![
                rss_idle / 1024.0,
                rss_bans / 1024.0,
                rss_connections / 1024.0,
                of(|f| f.maps_bans) / 1024.0,
            ],
        )],
        log_scale: false,
    };
    Section {
        summary,
        tables: vec![memory, maps, times],
        charts: vec![chart],
    }
}
