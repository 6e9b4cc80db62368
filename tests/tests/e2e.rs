//! End-to-end tests of the XDP data plane with real traffic: the real `gateway` binary runs in a
//! network namespace, attached in native mode to one end of a veth pair; a client in a second
//! namespace talks TCP and UDP over IPv4 and IPv6 to echo servers beside the daemon, and the CLI
//! blocks and unblocks it over the admin socket.
//!
//! Each test has its own namespaces, subnet, instance name and temporary folder, so they run side
//! by side. Guards stop the daemon and remove namespaces, pins and files, also when a test fails
//! (the daemon's log is printed then). Needs root and a built binary: `GATEWAY_BIN`, as
//! `cargo xtask test` sets it, or `target/debug/gateway`.
use std::{
    fs,
    io::{ErrorKind, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gateway_tests::{
    gateway_bin,
    netns::{Netns, VethPair, XdpAttachment},
    packet::{Frame, TPID_8021AD, TPID_8021Q},
    require_root,
};
use gateway_userspace::{config::BPFFS_ROOT, xdp::loader::remove_pins};
use serde_json::Value;

/// Port of the echo servers on the gateway side.
const PORT: u16 = 7007;
/// A connect that takes longer is blocked. The first SYN retransmission comes after 1 s, so one
/// attempt sends exactly one SYN.
const TCP_TIMEOUT: Duration = Duration::from_millis(500);
/// How long to wait for a UDP echo.
const UDP_TIMEOUT: Duration = Duration::from_millis(300);
/// Tries before traffic that should pass is declared blocked: right after an unblock, neighbour
/// discovery may need a moment to recover from the replies it lost.
const PASS_ATTEMPTS: u32 = 10;
/// Longest a client command may take, a 100,000-entry import included.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the daemon may take to answer on its admin socket after `gateway run`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client command printed, and its exit code.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `gateway --socket SOCKET ARGS`. A command that hangs fails the test instead of hanging it.
fn gateway(socket: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(gateway_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the gateway binary: {e}"));
    // Drained on threads, so a chatty command cannot block on a full pipe while we wait.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_or_kill(&mut child, CLI_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "`gateway {}` did not finish within {CLI_TIMEOUT:?}",
            args.join(" ")
        )
    });
    Output {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Waits up to `timeout` for `child` to exit; kills it if it does not. `None` if it was killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// SIGTERM (the daemon's clean shutdown), then SIGKILL after [`STOP_TIMEOUT`]. Never panics: it
/// also runs in `Drop`. `None` if the process had to be killed.
fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: no memory is involved, and `pid` is our own child that was not reaped yet, so
        // the id cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    wait_or_kill(child, STOP_TIMEOUT)
}

fn unix_ms_now() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since_epoch.as_millis()).expect("milliseconds fit in u64")
}

/// Kernel counters per verdict reason, from `gateway stats --json`.
struct Stats(Value);

impl Stats {
    fn get(&self, reason: &str, field: &str) -> u64 {
        self.0["reasons"]
            .as_array()
            .and_then(|reasons| reasons.iter().find(|r| r["reason"] == reason))
            .and_then(|r| r[field].as_u64())
            .unwrap_or_else(|| panic!("`stats --json` has no `{field}` for `{reason}`: {}", self.0))
    }

    fn packets(&self, reason: &str) -> u64 {
        self.get(reason, "packets")
    }

    fn bytes(&self, reason: &str) -> u64 {
        self.get(reason, "bytes")
    }

    /// Packets counted under `reason` since the `before` reading.
    fn rise(&self, before: &Stats, reason: &str) -> u64 {
        self.packets(reason).saturating_sub(before.packets(reason))
    }
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(name);
        // Left over by a run that was killed (same name, so same pid): start clean.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating `{}`: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One gateway instance: its config, state, admin socket and log in a temporary folder, its
/// pinned maps, and (while it runs) its process. Drop stops it and removes all of that.
struct Gateway {
    instance: String,
    process: Option<Child>,
    dir: TempDir,
}

impl Gateway {
    /// Writes a config for `interface` (native mode, a rate limit far above anything the tests
    /// send, so that only the lists decide). Does not start the daemon.
    fn new(tag: &str, interface: &str) -> Gateway {
        Gateway::with_config(
            tag,
            interface,
            "packets_per_second = 1000000\nburst = 1000000\n",
            "",
        )
    }

    /// Like [`Gateway::new`], with `rate_limit` as the body of `[xdp.rate_limit]` and `extra`
    /// (whole tables) appended.
    fn with_config(tag: &str, interface: &str, rate_limit: &str, extra: &str) -> Gateway {
        let instance = format!("e2e-{tag}-{}", std::process::id());
        let gateway = Gateway {
            dir: TempDir::new(&format!("gateway-{instance}")),
            instance,
            process: None,
        };
        // Pins of a killed run with the same pid would otherwise be reused.
        let _ = remove_pins(&gateway.pin_dir());
        let dir = gateway.dir.0.display();
        let config = format!(
            "instance = \"{instance}\"\n\
             state_dir = \"{dir}/state\"\n\
             admin_socket = \"{dir}/admin.sock\"\n\
             [xdp]\n\
             interfaces = [\"{interface}\"]\n\
             mode = \"native\"\n\
             sweep_interval = \"200ms\"\n\
             [xdp.rate_limit]\n\
             {rate_limit}\n\
             {extra}\n",
            instance = gateway.instance,
        );
        fs::write(gateway.config(), config).expect("writing the config");
        gateway
    }

    fn config(&self) -> PathBuf {
        self.dir.0.join("gateway.toml")
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("admin.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.0.join("daemon.log")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.0.join("state/lists.tsv")
    }

    fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.instance)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Starts `gateway run` inside `netns` and waits until its admin socket answers, which the
    /// daemon opens only after attaching XDP.
    fn start(&mut self, netns: &Netns) {
        assert!(self.process.is_none(), "the daemon is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("opening the daemon log");
        let stderr = log.try_clone().expect("duplicating the log handle");
        let (bin, config) = (gateway_bin(), self.config());
        // Spawned from a thread inside the namespace, so the daemon starts in it.
        let child = netns.run(move || {
            Command::new(bin)
                .arg("run")
                .arg("--config")
                .arg(config)
                // Plain text: the log is a file, printed when a test fails.
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start the gateway daemon: {e}"))
        });
        self.process = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.process.as_mut().map(Child::try_wait) {
                self.process = None;
                panic!(
                    "the daemon exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            if self.cli(&["status"]).code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer on `{}` within {START_TIMEOUT:?}",
                self.socket().display()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon with SIGTERM and returns how it exited.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.process.take().expect("the daemon is running");
        terminate(&mut child).unwrap_or_else(|| {
            panic!(
                "the daemon ignored SIGTERM for {STOP_TIMEOUT:?} and was killed; its log:\n{}",
                self.log_text()
            )
        })
    }

    fn cli(&self, args: &[&str]) -> Output {
        gateway(&self.socket(), args)
    }

    /// Runs a client command that must succeed; returns its standard output.
    fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert_eq!(
            output.code,
            0,
            "`gateway {}` failed: {}",
            args.join(" "),
            output.stderr
        );
        output.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let stdout = self.cli_ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "`gateway {}` printed invalid JSON ({e}): {stdout}",
                args.join(" ")
            )
        })
    }

    fn stats(&self) -> Stats {
        Stats(self.json(&["stats", "--json"]))
    }

    fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    /// The entry for `cidr` in `gateway LIST list --json`.
    fn entry(&self, list: &str, cidr: &str) -> Value {
        let entries = self.json(&[list, "list", "--json"]);
        entries
            .as_array()
            .and_then(|entries| entries.iter().find(|e| e["cidr"] == cidr))
            .cloned()
            .unwrap_or_else(|| panic!("`{list} list` has no `{cidr}`: {entries}"))
    }

    /// Reads the counters until `reason` rose by at least `at_least` packets since `before`
    /// (the veth hands frames to XDP asynchronously), or 5 s passed. The caller checks them.
    fn stats_after(&self, before: &Stats, reason: &str, at_least: u64) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.stats();
            if now.rise(before, reason) >= at_least || Instant::now() >= deadline {
                return now;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take()
            && terminate(&mut child).is_none()
        {
            eprintln!("warning: daemon `{}` had to be killed", self.instance);
        }
        if thread::panicking() {
            eprintln!(
                "--- log of the gateway daemon `{}` ---\n{}--- end of log ---",
                self.instance,
                self.log_text()
            );
        }
        if let Err(error) = remove_pins(&self.pin_dir()) {
            eprintln!(
                "warning: removing the pins in `{}`: {error}",
                self.pin_dir().display()
            );
        }
    }
}

/// A TCP server that accepts and a UDP server that echoes, on each given address of a
/// namespace, until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(netns: &Netns, addrs: &[IpAddr]) -> Servers {
        // Bound inside the namespace; served from ordinary threads (a socket keeps its namespace).
        let sockets = netns.run(|| {
            addrs
                .iter()
                .map(|addr| {
                    let at = SocketAddr::new(*addr, PORT);
                    let tcp =
                        TcpListener::bind(at).unwrap_or_else(|e| panic!("TCP server on {at}: {e}"));
                    let udp =
                        UdpSocket::bind(at).unwrap_or_else(|e| panic!("UDP server on {at}: {e}"));
                    (tcp, udp)
                })
                .collect::<Vec<_>>()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (tcp, udp) in sockets {
            let running = Arc::clone(&stop);
            threads.push(thread::spawn(move || accept_until(&tcp, &running)));
            let running = Arc::clone(&stop);
            threads.push(thread::spawn(move || echo_until(&udp, &running)));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Accepts and closes connections (the client only checks the handshake) until `stop`.
fn accept_until(listener: &TcpListener, stop: &AtomicBool) {
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    while !stop.load(Ordering::Relaxed) {
        if listener.accept().is_err() {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sends every datagram back to its sender until `stop`.
fn echo_until(socket: &UdpSocket, stop: &AtomicBool) {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("a read timeout");
    let mut buffer = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((len, from)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..len], from);
        }
    }
}

/// One TCP connect from `netns`: `Ok` once the handshake completed.
fn tcp_connect(netns: &Netns, to: SocketAddr) -> std::io::Result<()> {
    netns.run(|| TcpStream::connect_timeout(&to, TCP_TIMEOUT).map(drop))
}

/// One UDP datagram from `netns`: whether its echo came back in time.
fn udp_echo(netns: &Netns, to: SocketAddr) -> bool {
    netns.run(|| {
        let any = match to {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        // A fresh socket (and port) per probe: a late echo of an earlier probe cannot count.
        let socket = UdpSocket::bind(any).expect("a client UDP socket");
        socket
            .set_read_timeout(Some(UDP_TIMEOUT))
            .expect("a read timeout");
        let probe = b"e2e probe";
        socket.send_to(probe, to).expect("sending a datagram");
        let mut buffer = [0u8; 64];
        match socket.recv_from(&mut buffer) {
            Ok((len, from)) => from == to && buffer[..len] == probe[..],
            Err(_) => false,
        }
    })
}

/// The gateway-side servers the client talks to: IPv4, then IPv6.
fn servers(net: &VethPair) -> [SocketAddr; 2] {
    [
        SocketAddr::new(net.gateway_v4.into(), PORT),
        SocketAddr::new(net.gateway_v6.into(), PORT),
    ]
}

/// Asserts that TCP and UDP from the client reach `server`.
fn assert_passes(net: &VethPair, server: SocketAddr, when: &str) {
    for attempt in 1..=PASS_ATTEMPTS {
        let tcp = tcp_connect(&net.client, server);
        let udp = udp_echo(&net.client, server);
        if tcp.is_ok() && udp {
            return;
        }
        assert!(
            attempt < PASS_ATTEMPTS,
            "{when}: traffic to {server} should pass, but after {PASS_ATTEMPTS} tries the TCP \
             connect gave {tcp:?} and the UDP echo came back: {udp}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that TCP and UDP from the client to `server` are dropped. Returns how many packets
/// that sent: one SYN per connect attempt (at least) and one datagram.
fn assert_blocked(net: &VethPair, server: SocketAddr, when: &str) -> u64 {
    match tcp_connect(&net.client, server) {
        Err(error) if error.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "{when}: a TCP connect to {server} should time out (its SYN dropped), but gave {other:?}"
        ),
    }
    assert!(
        !udp_echo(&net.client, server),
        "{when}: a UDP datagram to {server} should be dropped, but its echo came back"
    );
    2
}

/// One test's world: the topology, echo servers in the gateway namespace, and a running gateway
/// attached to the gateway's veth end. Fields drop in order: the daemon stops first, then the
/// servers, then the namespaces go.
struct Setup {
    gateway: Gateway,
    _servers: Servers,
    net: VethPair,
}

impl Setup {
    /// `None` (the test skips) when not root outside CI.
    fn new(test: &str, tag: &str, subnet: u8) -> Option<Setup> {
        Setup::with_config(test, tag, subnet, |net| Gateway::new(tag, &net.gateway_if))
    }

    /// Like [`Setup::new`], with the daemon's config made by `gateway` for the pair.
    fn with_config(
        test: &str,
        tag: &str,
        subnet: u8,
        gateway: impl FnOnce(&VethPair) -> Gateway,
    ) -> Option<Setup> {
        if !require_root(test) {
            return None;
        }
        gateway_bin(); // fails early, before any namespace exists
        let net = VethPair::new(tag, subnet);
        let servers = Servers::start(
            &net.gateway,
            &[net.gateway_v4.into(), net.gateway_v6.into()],
        );
        let mut gateway = gateway(&net);
        gateway.start(&net.gateway);
        assert_eq!(
            net.gateway_xdp(),
            Some(XdpAttachment::Native),
            "the daemon attaches XDP in native mode to `{}`",
            net.gateway_if
        );
        Some(Setup {
            gateway,
            _servers: servers,
            net,
        })
    }
}

#[test]
fn block_and_unblock_tcp_udp_v4_v6() {
    let Some(setup) = Setup::new("block_and_unblock_tcp_udp_v4_v6", "block", 1) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let clients = [net.client_v4.to_string(), net.client_v6.to_string()];
    // A typo in a list of CIDRs applies none of them.
    let output = gateway.cli(&["block", "add", &clients[0], "not-an-ip"]);
    assert_eq!(output.code, 2, "a bad CIDR is a usage error: {output:?}");
    assert!(
        output.stderr.contains("`not-an-ip`") && output.stderr.contains("nothing was added"),
        "{output:?}"
    );
    for server in servers(net) {
        assert_passes(net, server, "before any ban");
    }

    let before = gateway.stats();
    gateway.cli_ok(&["block", "add", &clients[0], &clients[1]]);
    let sent: u64 = servers(net)
        .into_iter()
        .map(|server| assert_blocked(net, server, "with the client's addresses banned"))
        .sum();
    let after = gateway.stats_after(&before, "blocked_address", sent);
    let dropped = after.rise(&before, "blocked_address");
    assert!(
        dropped >= sent,
        "`blocked_address` rose by {dropped}, but the client sent {sent} packets while banned"
    );
    for client in &clients {
        let entry = gateway.entry("block", client);
        assert!(
            entry["hits"].as_u64() > Some(0),
            "the ban on {client} shows no hits: {entry}"
        );
    }

    gateway.cli_ok(&["block", "del", &clients[0], &clients[1]]);
    for server in servers(net) {
        assert_passes(net, server, "after `block del`");
    }

    // The prefix tier: the client's whole /24 and /64.
    let (v4_net, v6_net) = (net.v4_subnet(), net.v6_subnet());
    let before = gateway.stats();
    gateway.cli_ok(&["block", "add", &v4_net, &v6_net]);
    let sent: u64 = servers(net)
        .into_iter()
        .map(|server| assert_blocked(net, server, "with the client's networks banned"))
        .sum();
    let after = gateway.stats_after(&before, "blocked_prefix", sent);
    let dropped = after.rise(&before, "blocked_prefix");
    assert!(
        dropped >= sent,
        "`blocked_prefix` rose by {dropped}, but the client sent {sent} packets while banned"
    );
    assert_eq!(
        after.packets("blocked_address"),
        before.packets("blocked_address"),
        "no exact-address ban is left, so nothing may count as `blocked_address`"
    );
    gateway.cli_ok(&["block", "del", &v4_net, &v6_net]);
    for server in servers(net) {
        assert_passes(net, server, "after the prefix bans are deleted");
    }
}

#[test]
fn ban_survives_daemon_restart() {
    let Some(mut setup) = Setup::new("ban_survives_daemon_restart", "restart", 2) else {
        return;
    };
    let clients = [
        setup.net.client_v4.to_string(),
        setup.net.client_v6.to_string(),
    ];
    setup.gateway.cli_ok(&[
        "block",
        "add",
        &clients[0],
        &clients[1],
        "--ttl",
        "1h",
        "--reason",
        "e2e restart",
    ]);
    for server in servers(&setup.net) {
        assert_blocked(&setup.net, server, "banned for an hour");
    }
    let expiry = |gateway: &Gateway, client: &str| {
        let entry = gateway.entry("block", client);
        assert_eq!(entry["reason"], "e2e restart", "{entry}");
        entry["expires_unix_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("a ban with a TTL lists its expiry: {entry}"))
    };
    let expires: Vec<u64> = clients.iter().map(|c| expiry(&setup.gateway, c)).collect();
    let now = unix_ms_now();
    for at in &expires {
        assert!(
            (now + 3_590_000..=now + 3_600_000).contains(at),
            "`--ttl 1h` expires in {} ms",
            at.saturating_sub(now)
        );
    }

    // A stop detaches XDP, keeps the pins and writes the state file.
    let status = setup.gateway.stop();
    assert!(
        status.success(),
        "after SIGTERM the daemon exits 0, not {status}"
    );
    assert_eq!(
        setup.net.gateway_xdp(),
        None,
        "a stopped daemon detaches XDP"
    );
    for server in servers(&setup.net) {
        assert_passes(&setup.net, server, "while no daemon runs");
    }
    assert!(
        setup.gateway.pin_dir().join("GW_BLOCK_V4").exists(),
        "the maps stay pinned in `{}`",
        setup.gateway.pin_dir().display()
    );

    // Restart on the pins.
    setup.gateway.start(&setup.net.gateway);
    for server in servers(&setup.net) {
        assert_blocked(&setup.net, server, "right after a restart on the pins");
    }
    let status = setup.gateway.status();
    assert_eq!(status["reused_pins"], true, "{status}");
    for (client, at) in clients.iter().zip(&expires) {
        let restored = expiry(&setup.gateway, client);
        assert!(
            restored.abs_diff(*at) <= 1000,
            "{client}: expiry moved from {at} to {restored} across the restart"
        );
    }

    // A reboot: the pins are gone, the state file is all that is left.
    assert!(setup.gateway.stop().success(), "the daemon exits 0");
    remove_pins(&setup.gateway.pin_dir()).expect("removing the pins");
    assert!(
        setup.gateway.state_file().is_file(),
        "the daemon wrote `{}`",
        setup.gateway.state_file().display()
    );
    setup.gateway.start(&setup.net.gateway);
    for server in servers(&setup.net) {
        assert_blocked(
            &setup.net,
            server,
            "after a restart from the state file alone",
        );
    }
    let status = setup.gateway.status();
    assert_eq!(status["reused_pins"], false, "{status}");
    assert_eq!(status["block_entries"], 2, "{status}");
    for (client, at) in clients.iter().zip(&expires) {
        let restored = expiry(&setup.gateway, client);
        assert!(
            restored.abs_diff(*at) <= 1000,
            "{client}: expiry moved from {at} to {restored} through the state file"
        );
    }
}

#[test]
fn bulk_import_of_100k_entries() {
    const ENTRIES: usize = 100_000;
    let Some(setup) = Setup::new("bulk_import_of_100k_entries", "bulk", 3) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;

    // Distinct addresses of 198.18.0.0/15, the client's among them, with comments and three bad
    // lines spread through the file.
    let first = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let mut addresses: Vec<Ipv4Addr> = (first..first + (1 << 17))
        .map(Ipv4Addr::from)
        .filter(|a| *a != net.client_v4)
        .take(ENTRIES - 1)
        .collect();
    addresses.insert(ENTRIES / 2, net.client_v4);
    let mut lines = vec!["# e2e bulk import: 100,000 single addresses".to_owned()];
    let mut bad_lines = Vec::new();
    for (index, address) in addresses.iter().enumerate() {
        if index == 10 {
            lines.push("   # a comment between entries".to_owned());
        }
        let bad = match index {
            30_000 => Some("not-an-ip"),
            60_000 => Some("198.18.0.1/33"),
            90_000 => Some("198.19.0.1/16  # host bits set"),
            _ => None,
        };
        if let Some(bad) = bad {
            lines.push(bad.to_owned());
            bad_lines.push(lines.len()); // line numbers count from 1
        }
        if *address == net.client_v4 {
            lines.push(format!("{address}  # the e2e client"));
        } else {
            lines.push(address.to_string());
        }
    }
    let file = gateway.dir.0.join("bulk.txt");
    fs::write(&file, lines.join("\n") + "\n").expect("writing the import file");
    let file_name = file.to_str().expect("a UTF-8 temp path");

    let started = Instant::now();
    let output = gateway.cli(&["block", "import", file_name]);
    let took = started.elapsed();
    eprintln!(
        "bulk_import_of_100k_entries: `gateway block import` of {ENTRIES} entries took {took:.2?}"
    );

    assert_eq!(
        output.code, 1,
        "an import with bad lines exits 1: {output:?}"
    );
    for line in &bad_lines {
        assert!(
            output
                .stderr
                .contains(&format!("{file_name}:{line}: skipped")),
            "the errors name line {line}: {}",
            output.stderr
        );
    }
    assert_eq!(
        output.stderr.matches(": skipped").count(),
        3,
        "exactly the three bad lines are reported: {}",
        output.stderr
    );
    assert!(
        output.stdout.contains("imported 100000 entries"),
        "{}",
        output.stdout
    );
    let status = gateway.status();
    assert_eq!(status["block_entries"], ENTRIES, "{status}");
    let kernel = status["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == "GW_BLOCK_V4"))
        .unwrap_or_else(|| panic!("`status` shows the GW_BLOCK_V4 map: {status}"));
    assert_eq!(kernel["entries"], ENTRIES, "{kernel}");

    let [v4, v6] = servers(net);
    assert_blocked(net, v4, "with the client among 100,000 imported bans");
    assert_passes(net, v6, "with only the client's IPv4 address banned");
}

#[test]
fn cli_errors_are_clear() {
    if !require_root("cli_errors_are_clear") {
        return;
    }
    let dir = TempDir::new(&format!("gateway-e2e-cli-{}", std::process::id()));
    let socket = dir.0.join("admin.sock");

    let output = gateway(&socket, &["block", "add", "not-an-ip"]);
    assert_eq!(output.code, 2, "a bad CIDR is a usage error: {output:?}");
    assert!(output.stderr.contains("`not-an-ip`"), "{output:?}");

    let output = gateway(&socket, &["block", "add", "1.2.3.4", "--ttl", "soon"]);
    assert_eq!(output.code, 2, "a bad TTL is a usage error: {output:?}");
    assert!(output.stderr.contains("soon"), "{output:?}");

    // No socket at all, then the socket file of a daemon that died without removing it.
    let output = gateway(&socket, &["status"]);
    assert_eq!(output.code, 3, "no daemon means exit 3: {output:?}");
    assert!(output.stderr.contains("not running"), "{output:?}");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("binding a socket"));
    assert!(socket.exists(), "a closed listener leaves its socket file");
    let output = gateway(&socket, &["status"]);
    assert_eq!(output.code, 3, "a stale socket means exit 3: {output:?}");
    assert!(output.stderr.contains("not running"), "{output:?}");
}

#[test]
fn bans_expire_then_are_swept() {
    let Some(setup) = Setup::new("bans_expire_then_are_swept", "expire", 7) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let [server_v4, _] = servers(net);
    let client = net.client_v4.to_string();
    let added = Instant::now();
    gateway.cli_ok(&["block", "add", &client, "--ttl", "2s"]);
    assert_blocked(net, server_v4, "banned for 2 s");

    // The kernel ignores the entry from its expiry on, before any sweep.
    thread::sleep(Duration::from_millis(2200).saturating_sub(added.elapsed()));
    assert_passes(net, server_v4, "after the ban's TTL");

    // The sweeper (every 200 ms here) then removes it from the map itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = gateway.status();
        let entries = status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == "GW_BLOCK_V4"))
            .and_then(|m| m["entries"].as_u64());
        if entries == Some(0) && status["block_entries"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired ban was not swept from the map: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let listed = gateway.json(&["block", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn allowlist_wins_over_blocklist() {
    let Some(setup) = Setup::new("allowlist_wins_over_blocklist", "allow", 5) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let clients = [net.client_v4.to_string(), net.client_v6.to_string()];

    let before = gateway.stats();
    gateway.cli_ok(&["allow", "add", &clients[0], &clients[1]]);
    gateway.cli_ok(&["block", "add", &clients[0], &clients[1]]);
    for server in servers(net) {
        assert_passes(net, server, "allowlisted and blocklisted");
    }
    // At least a SYN, the handshake's ACK and a datagram per family.
    let after = gateway.stats_after(&before, "allowlisted", 6);
    let allowed = after.rise(&before, "allowlisted");
    assert!(allowed >= 6, "`allowlisted` rose by only {allowed}");
    assert_eq!(
        after.packets("blocked_address"),
        before.packets("blocked_address"),
        "the allowlist is checked before the blocklist"
    );

    gateway.cli_ok(&["allow", "del", &clients[0], &clients[1]]);
    for server in servers(net) {
        assert_blocked(net, server, "blocklisted, no longer allowlisted");
    }
}

#[test]
fn vlan_tagged_frames_from_a_banned_source_are_dropped() {
    // This kernel may lack 802.1Q interfaces (CONFIG_VLAN_8021Q), so the tagged frames are
    // crafted and written with a raw socket onto the client's veth end: the gateway's end sees
    // exactly these bytes, as it would from a trunk port.
    const FRAMES: u64 = 20;
    let Some(setup) = Setup::new(
        "vlan_tagged_frames_from_a_banned_source_are_dropped",
        "vlan",
        6,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    // Unused addresses of the client's networks: only the crafted frames carry them.
    let [a, b, c, _] = net.client_v4.octets();
    let [s0, s1, s2, s3, ..] = net.client_v6.segments();
    let banned_v4 = Ipv4Addr::new(a, b, c, 77);
    let banned_v6 = Ipv6Addr::new(s0, s1, s2, s3, 0, 0, 0, 0x77);
    let not_banned_v4 = Ipv4Addr::new(a, b, c, 78);
    gateway.cli_ok(&[
        "block",
        "add",
        &banned_v4.to_string(),
        &banned_v6.to_string(),
    ]);

    // Innermost tag first, as `Frame::tagged` adds each outside the previous ones. 0x9100 is the
    // pre-standard QinQ outer tag that some switches still send.
    let stacks: [(&str, &[(u16, u16)]); 3] = [
        ("802.1Q", &[(TPID_8021Q, 100)]),
        ("QinQ", &[(TPID_8021Q, 100), (TPID_8021AD, 200)]),
        ("legacy QinQ", &[(TPID_8021Q, 100), (0x9100, 300)]),
    ];
    let tag = |frame: Frame, stack: &[(u16, u16)]| {
        let mut bytes = stack
            .iter()
            .fold(frame, |frame, (tpid, id)| frame.tagged(*tpid, *id))
            .bytes();
        bytes[..6].copy_from_slice(&net.gateway_mac);
        bytes
    };

    let count = usize::try_from(FRAMES).expect("a small count");
    for (name, stack) in stacks {
        let before = gateway.stats();
        let mut banned_bytes = 0;
        for frame in [Frame::ipv4(banned_v4), Frame::ipv6(banned_v6)] {
            let bytes = tag(frame, stack);
            net.client.send_frames(&net.client_if, &bytes, count);
            banned_bytes += FRAMES * bytes.len() as u64;
        }
        // The same tags around a source that is not banned: these must pass.
        let bytes = tag(Frame::ipv4(not_banned_v4), stack);
        net.client.send_frames(&net.client_if, &bytes, count);

        gateway.stats_after(&before, "blocked_address", 2 * FRAMES);
        let after = gateway.stats_after(&before, "passed", FRAMES);
        assert_eq!(
            after.rise(&before, "blocked_address"),
            2 * FRAMES,
            "{name}: every frame from a banned source is dropped as `blocked_address`"
        );
        assert_eq!(
            after
                .bytes("blocked_address")
                .saturating_sub(before.bytes("blocked_address")),
            banned_bytes,
            "{name}: the program saw the frames with their tags"
        );
        let passed = after.rise(&before, "passed");
        assert!(
            passed >= FRAMES,
            "{name}: frames from a source that is not banned pass, but `passed` rose by {passed} \
             for {FRAMES} frames"
        );
        assert_eq!(
            after.packets("malformed"),
            before.packets("malformed"),
            "{name}: up to two tags parse"
        );
    }
}

// --- The abuse verdict loop -------------------------------------------------------------------

/// The rate limit of the abuse tests: far above anything they send, unless a test floods.
const NO_RATE_LIMIT: &str = "packets_per_second = 1000000\nburst = 1000000";

/// An upstream in the gateway's namespace: paths under `/login` answer 401 (a login that
/// refuses every password), anything else 200.
struct LoginUpstream {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LoginUpstream {
    fn start(netns: &Netns) -> LoginUpstream {
        let listener =
            netns.run(|| TcpListener::bind("127.0.0.1:0").expect("binding the upstream"));
        let port = listener.local_addr().expect("its address").port();
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !running.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let status = if path.starts_with("/login") {
                    "401 Unauthorized"
                } else {
                    "200 OK"
                };
                let _ = std::io::Write::write_all(
                    &mut stream,
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                    .as_bytes(),
                );
            }
        });
        LoginUpstream {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoginUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listener, routes and upstream for the abuse tests, plus `rules` (whole TOML tables) and
/// `listener_extra` (keys of the listener table).
fn abuse_config(net: &VethPair, upstream_port: u16, listener_extra: &str, rules: &str) -> String {
    format!(
        "[[listeners]]\n\
         name = \"edge\"\n\
         address = \"{gateway}:8080\"\n\
         routes = [\"login\", \"api\"]\n\
         {listener_extra}\n\
         [[routes]]\n\
         name = \"login\"\n\
         path_prefix = \"/login\"\n\
         upstream = \"app\"\n\
         [[routes]]\n\
         name = \"api\"\n\
         path_prefix = \"/api\"\n\
         upstream = \"app\"\n\
         [[upstreams]]\n\
         name = \"app\"\n\
         endpoints = [\"127.0.0.1:{upstream_port}\"]\n\
         {rules}\n",
        gateway = net.gateway_v4,
    )
}

/// An abuse setup: the daemon with an L7 listener on port 8080 and the upstream above.
fn abuse_setup(
    test: &str,
    tag: &str,
    subnet: u8,
    rate_limit: &str,
    listener_extra: &str,
    rules: &str,
) -> Option<(Setup, LoginUpstream)> {
    let mut upstream = None;
    let setup = Setup::with_config(test, tag, subnet, |net| {
        let login = LoginUpstream::start(&net.gateway);
        let extra = abuse_config(net, login.port, listener_extra, rules);
        upstream = Some(login);
        Gateway::with_config(tag, &net.gateway_if, rate_limit, &extra)
    })?;
    Some((setup, upstream.expect("started with the setup")))
}

/// `GET path` with curl from the client namespace (from `from` when given, with an
/// `X-Forwarded-For` when given); `None` when no response came within a second.
fn http(
    net: &VethPair,
    from: Option<IpAddr>,
    path: &str,
    forwarded_for: Option<&str>,
) -> Option<u16> {
    let url = format!("http://{}:8080{path}", net.gateway_v4);
    let output = net.client.run(|| {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
        ]);
        if let Some(from) = from {
            curl.args(["--interface", &from.to_string()]);
        }
        if let Some(client) = forwarded_for {
            curl.args(["-H", &format!("X-Forwarded-For: {client}")]);
        }
        curl.arg(&url).output().expect("running curl")
    });
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|code| *code != 0)
}

/// Waits (bounded) until the client's traffic to `server` is dropped: a verdict is executed
/// off the request path, so the ban lands a moment after the response that triggered it.
fn wait_until_blocked(net: &VethPair, server: SocketAddr, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while udp_echo(&net.client, server) {
        assert!(
            Instant::now() < deadline,
            "{when}: still not blocked after 3 s"
        );
    }
    assert_blocked(net, server, when);
}

/// The audit log's records, one per verdict.
fn audit_records(gateway: &Gateway) -> Vec<Value> {
    fs::read_to_string(gateway.dir.0.join("state/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every audit line is JSON"))
        .collect()
}

#[test]
fn credential_stuffing_is_banned_in_the_kernel() {
    let rules = "[[abuse.rules]]\nname = \"stuffing\"\nclasses = [\"auth_failure\"]\n\
                 threshold = 10\nwindow = \"30s\"\nban = \"60s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "credential_stuffing_is_banned_in_the_kernel",
        "stuff",
        10,
        NO_RATE_LIMIT,
        "",
        rules,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    // A legitimate client on another address of the same network, with an occasional typo.
    let [a, b, c, _] = net.client_v4.octets();
    let legit = Ipv4Addr::new(a, b, c, 3);
    net.client
        .ip(&["addr", "add", &format!("{legit}/24"), "dev", &net.client_if]);
    assert_eq!(http(net, Some(legit.into()), "/login", None), Some(401));
    assert_eq!(
        http(net, Some(legit.into()), "/api/orders", None),
        Some(200)
    );

    let attacker = Some(IpAddr::from(net.client_v4));
    for attempt in 1..10 {
        assert_eq!(
            http(net, attacker, "/login", None),
            Some(401),
            "attempt {attempt}"
        );
    }
    let before = gateway.stats();
    assert_eq!(
        http(net, attacker, "/login", None),
        Some(401),
        "the tenth attempt"
    );
    let t0 = Instant::now();
    match reaction_time_from(net, net.client_v4, t0) {
        Some(took) => {
            eprintln!("ban reaction time (10th 401 received -> first dropped probe): {took:?}")
        }
        None => panic!(
            "no probe was dropped within 300 ms of the tenth 401:\n{}",
            gateway.log_text()
        ),
    }
    let [server_v4, _] = servers(net);
    wait_until_blocked(net, server_v4, "after credential stuffing");
    assert_eq!(
        http(net, attacker, "/api/orders", None),
        None,
        "L7 is out of reach too"
    );
    assert!(gateway.stats().rise(&before, "blocked_address") > 0);

    // The legitimate neighbour is untouched.
    assert_eq!(
        http(net, Some(legit.into()), "/api/orders", None),
        Some(200)
    );
    assert_eq!(http(net, Some(legit.into()), "/login", None), Some(401));

    let client = net.client_v4.to_string();
    let explained = gateway.cli_ok(&["bans", "explain", &client]);
    assert!(explained.contains("origin auto"), "{explained}");
    assert!(explained.contains("rule `stuffing`"), "{explained}");
    let audit = audit_records(gateway);
    assert_eq!(audit.len(), 1, "one audit line per verdict: {audit:?}");
    assert_eq!(audit[0]["source"], client.as_str());
    assert_eq!(audit[0]["enforcement"], "xdp");
    assert_eq!(audit[0]["evidence"][0][1], 10);

    let lifted = gateway.cli_ok(&["bans", "lift", &client]);
    assert!(lifted.contains(&client), "{lifted}");
    assert_passes(net, server_v4, "after `bans lift`");
}

/// Sends UDP probes from `source` (an address of the client namespace) to the echo server right
/// after `t0`, and returns when the first probe was sent of a run of ten that went unanswered:
/// the end-to-end ban reaction time.
fn reaction_time_from(net: &VethPair, source: Ipv4Addr, t0: Instant) -> Option<Duration> {
    let to = SocketAddr::new(net.gateway_v4.into(), PORT);
    net.client.run(move || {
        let socket = UdpSocket::bind((source, 0)).expect("a probe socket");
        socket.connect(to).expect("connecting the probe socket");
        socket.set_nonblocking(true).expect("non-blocking");
        let mut sent = Vec::new();
        let mut echoed = std::collections::HashSet::new();
        let mut buffer = [0u8; 8];
        // Bounded: at most 3,000 probes over at most 300 ms.
        while sent.len() < 3000 && t0.elapsed() < Duration::from_millis(300) {
            let seq = sent.len() as u64;
            let _ = socket.send(&seq.to_be_bytes());
            sent.push(t0.elapsed());
            thread::sleep(Duration::from_micros(100));
            while let Ok(8) = socket.recv(&mut buffer) {
                echoed.insert(u64::from_be_bytes(buffer));
            }
            // An echo takes far less than a millisecond on a veth: ten silent probes in a row
            // after a millisecond mean the source is dropped.
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

/// Not a pass/fail on speed (these machines are shared): measures the end-to-end reaction time
/// of many bans and prints median and p99 for the record; fails only if a ban never lands.
#[test]
fn ban_reaction_time_over_many_sources() {
    const SOURCES: u8 = 50;
    let rules = "[[abuse.rules]]\nname = \"stuffing\"\nclasses = [\"auth_failure\"]\n\
                 threshold = 3\nwindow = \"30s\"\nban = \"60s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "ban_reaction_time_over_many_sources",
        "react",
        15,
        NO_RATE_LIMIT,
        "",
        rules,
    ) else {
        return;
    };
    let Setup { net, gateway, .. } = &setup;
    let [a, b, c, _] = net.client_v4.octets();
    let sources: Vec<Ipv4Addr> = (0..SOURCES)
        .map(|i| Ipv4Addr::new(a, b, c, 100 + i))
        .collect();
    for source in &sources {
        net.client.ip(&[
            "addr",
            "add",
            &format!("{source}/24"),
            "dev",
            &net.client_if,
        ]);
    }
    let mut times = Vec::new();
    for source in &sources {
        for _ in 0..2 {
            assert_eq!(http(net, Some((*source).into()), "/login", None), Some(401));
        }
        assert_eq!(http(net, Some((*source).into()), "/login", None), Some(401));
        let t0 = Instant::now();
        let took = reaction_time_from(net, *source, t0).unwrap_or_else(|| {
            panic!(
                "{source} was not dropped within 300 ms:\n{}",
                gateway.log_text()
            )
        });
        times.push(took);
    }
    times.sort();
    let median = times[times.len() / 2];
    let p99 = times[(times.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "ban reaction time over {} bans (3rd 401 received -> first dropped probe, probes every 100 µs): median {median:?}, p99 {p99:?}, max {:?}",
        times.len(),
        times[times.len() - 1]
    );
}

#[test]
fn a_second_offence_is_banned_longer() {
    let rules = "[[abuse.rules]]\nname = \"scanner\"\nclasses = [\"not_found\"]\n\
                 threshold = 5\nwindow = \"30s\"\nban = \"2s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "a_second_offence_is_banned_longer",
        "scan",
        11,
        NO_RATE_LIMIT,
        "",
        rules,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let [server_v4, _] = servers(net);
    let scan = |round: u32| {
        for probe in 0..5 {
            let path = format!("/.git/config-{round}-{probe}");
            assert_eq!(
                http(net, None, &path, None),
                Some(404),
                "probe {probe} of round {round}"
            );
        }
    };
    scan(1);
    wait_until_blocked(net, server_v4, "after the first scan");
    // The first ban lasts 2 s; then the scanner gets through again.
    let deadline = Instant::now() + Duration::from_secs(6);
    while tcp_connect(&net.client, server_v4).is_err() {
        assert!(Instant::now() < deadline, "the first ban did not expire");
        thread::sleep(Duration::from_millis(200));
    }
    scan(2);
    wait_until_blocked(net, server_v4, "after the second scan");
    let entry = gateway.entry("block", &net.client_v4.to_string());
    let left_ms = entry["expires_unix_ms"]
        .as_u64()
        .expect("the ban expires")
        .saturating_sub(unix_ms_now());
    assert!(
        (2_500..=4_500).contains(&left_ms),
        "the second ban lasts twice the first (4 s), {left_ms} ms left"
    );
    let audit = audit_records(gateway);
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(
        (audit[0]["offence"].as_u64(), audit[1]["offence"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(audit[1]["ttl_secs"], 4);
}

#[test]
fn dry_runs_and_allowlisted_sources_are_never_banned() {
    let rules = "[[abuse.rules]]\nname = \"stuffing\"\nclasses = [\"auth_failure\"]\n\
                 threshold = 3\nwindow = \"30s\"\nban = \"60s\"\ndry_run = true\n\
                 [[abuse.rules]]\nname = \"scanner\"\nclasses = [\"not_found\"]\n\
                 threshold = 3\nwindow = \"30s\"\nban = \"60s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "dry_runs_and_allowlisted_sources_are_never_banned",
        "dry",
        12,
        NO_RATE_LIMIT,
        "",
        rules,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let [server_v4, _] = servers(net);
    for _ in 0..6 {
        assert_eq!(http(net, None, "/login", None), Some(401));
    }
    assert_passes(net, server_v4, "a dry-run rule bans nobody");

    let client = net.client_v4.to_string();
    gateway.cli_ok(&["allow", "add", &client]);
    for probe in 0..6 {
        assert_eq!(http(net, None, &format!("/admin{probe}"), None), Some(404));
    }
    assert_passes(net, server_v4, "an allowlisted source is never banned");
    let enforcement: Vec<String> = audit_records(gateway)
        .iter()
        .map(|r| r["enforcement"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        enforcement,
        ["dry_run", "dry_run", "protected", "protected"]
    );
    assert_eq!(
        gateway
            .json(&["bans", "list", "--json"])
            .as_array()
            .map(Vec::len),
        Some(0)
    );
}

#[test]
fn behind_a_trusted_proxy_the_client_is_denied_at_l7() {
    let rules = "[[abuse.rules]]\nname = \"stuffing\"\nclasses = [\"auth_failure\"]\n\
                 threshold = 3\nwindow = \"30s\"\nban = \"60s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "behind_a_trusted_proxy_the_client_is_denied_at_l7",
        "proxy",
        13,
        NO_RATE_LIMIT,
        // The client namespace plays a reverse proxy in front of the gateway.
        "trusted_proxies = [\"198.18.13.0/24\"]",
        rules,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    assert_eq!(
        net.v4_subnet(),
        "198.18.13.0/24",
        "the trusted network is the client's"
    );
    let offender = "203.0.113.77";
    for _ in 0..3 {
        assert_eq!(http(net, None, "/login", Some(offender)), Some(401));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(net, None, "/api/orders", Some(offender)) != Some(403) {
        assert!(
            Instant::now() < deadline,
            "the offender is not denied at L7"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(net, None, "/api/orders", Some("203.0.113.78")),
        Some(200),
        "others pass"
    );
    let [server_v4, _] = servers(net);
    assert_passes(net, server_v4, "the proxy itself is never banned at L3");
    let explained = gateway.json(&["bans", "explain", offender, "--json"]);
    assert_eq!(explained["denied_at_l7"], true, "{explained}");
    assert_eq!(audit_records(gateway)[0]["enforcement"], "l7");
}

#[test]
fn an_xdp_rate_limit_flood_becomes_a_ban() {
    let rules = "[[abuse.rules]]\nname = \"flood\"\nclasses = [\"xdp_rate_limit\"]\n\
                 threshold = 3\nwindow = \"10s\"\nban = \"60s\"\n";
    let Some((setup, _upstream)) = abuse_setup(
        "an_xdp_rate_limit_flood_becomes_a_ban",
        "flood",
        14,
        "packets_per_second = 100\nburst = 100\nevent_interval = \"100ms\"",
        "",
        rules,
    ) else {
        return;
    };
    let Setup { gateway, net, .. } = &setup;
    let to = SocketAddr::new(net.gateway_v4.into(), PORT);
    let before = gateway.stats();
    // Flood until the kernel drops the source as banned (bounded in count and time).
    net.client.run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("a flood socket");
        let started = Instant::now();
        for sent in 0..200_000u32 {
            let _ = socket.send_to(b"flood", to);
            if sent % 1000 == 999 {
                thread::sleep(Duration::from_millis(10));
                if started.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
        }
    });
    let after = gateway.stats_after(&before, "blocked_address", 1);
    assert!(
        after.rise(&before, "rate_limited") > 0,
        "the rate limit tripped first"
    );
    let entry = gateway.entry("block", &net.client_v4.to_string());
    assert_eq!(entry["origin"], "auto", "{entry}");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("xdp_rate_limit")),
        "{entry}"
    );
}
