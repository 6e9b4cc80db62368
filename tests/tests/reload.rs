//! Configuration reload and the admin HTTP listener, against the real daemon: routes change
//! under a steady stream of keep-alive requests without losing one, a bad config is refused
//! while the old one keeps serving, SIGHUP and file changes trigger reloads, and `/metrics`
//! shows both the L7 families and the kernel counters.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway_tests::{gateway_bin, require_root};
use gateway_userspace::{config::BPFFS_ROOT, xdp::loader::remove_pins};

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon with its folder, config, pins and demo upstream, removed on drop.
struct Daemon {
    dir: PathBuf,
    instance: String,
    listen: SocketAddr,
    metrics: SocketAddr,
    upstream: SocketAddr,
    process: Option<Process>,
    _upstream: Process,
}

impl Daemon {
    fn start(test: &str) -> Daemon {
        Daemon::start_with(test, "")
    }

    /// Starts the daemon with `extra` (whole TOML tables) in its config.
    fn start_with(test: &str, extra: &str) -> Daemon {
        Daemon::start_with_routes(test, extra, "")
    }

    /// Starts the daemon with `extra` tables and `route_extra` in every route.
    fn start_with_routes(test: &str, extra: &str, route_extra: &str) -> Daemon {
        let instance = format!("reload-{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("gateway-{instance}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test folder");
        let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let upstream_process = Process(
            Command::new(gateway_bin())
                .args(["demo-upstream", "--listen", &upstream.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting the demo upstream"),
        );
        let mut daemon = Daemon {
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            upstream,
            dir,
            instance,
            process: None,
            _upstream: upstream_process,
        };
        let _ = remove_pins(&daemon.pin_dir());
        daemon.write_config_with(&["a"], extra, route_extra);
        let log = fs::File::create(daemon.dir.join("daemon.log")).expect("creating the log");
        let child = Command::new(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(daemon.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the daemon");
        daemon.process = Some(Process(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        // The admin HTTP listener opens last: once it answers, the daemon is fully up.
        while TcpStream::connect(daemon.listen).is_err()
            || TcpStream::connect(daemon.upstream).is_err()
            || TcpStream::connect(daemon.metrics).is_err()
        {
            let process = &mut daemon.process.as_mut().expect("just started").0;
            if let Ok(Some(status)) = process.try_wait() {
                panic!("the daemon exited ({status}) at start:\n{}", daemon.log());
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 20 s:\n{}",
                daemon.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn config(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.instance)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A config routing `/<name>` for each of `routes` to the demo upstream, plus `extra` TOML.
    fn write_config(&self, routes: &[&str], extra: &str) {
        self.write_config_with(routes, extra, "");
    }

    /// Like [`Daemon::write_config`], with `route_extra` (keys and sub-tables) in every route.
    fn write_config_with(&self, routes: &[&str], extra: &str, route_extra: &str) {
        let names: Vec<String> = routes.iter().map(|r| format!("\"{r}\"")).collect();
        let mut text = format!(
            "instance = \"{instance}\"\n\
             state_dir = \"{dir}/state\"\n\
             admin_socket = \"{dir}/admin.sock\"\n\
             {extra}\n\
             [metrics]\n\
             listen = \"{metrics}\"\n\
             [[listeners]]\n\
             name = \"plain\"\n\
             address = \"{listen}\"\n\
             routes = [{names}]\n\
             [[upstreams]]\n\
             name = \"demo\"\n\
             endpoints = [\"{upstream}\"]\n",
            instance = self.instance,
            dir = self.dir.display(),
            metrics = self.metrics,
            listen = self.listen,
            upstream = self.upstream,
            names = names.join(", "),
        );
        for route in routes {
            text.push_str(&format!(
                "[[routes]]\nname = \"{route}\"\npath_prefix = \"/{route}\"\nupstream = \"demo\"\n{route_extra}\n"
            ));
        }
        // Written whole and renamed, so the file watcher never sees half a file.
        let tmp = self.dir.join("gateway.toml.tmp");
        fs::write(&tmp, text).expect("writing the config");
        fs::rename(&tmp, self.config()).expect("replacing the config");
    }

    /// `curl` against the plain listener: status and body.
    fn curl(&self, path: &str, headers: &[&str]) -> (u16, String) {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", "5", "-w", "\n%{http_code}"]);
        for header in headers {
            curl.args(["-H", header]);
        }
        let output = curl
            .arg(format!("http://{}{path}", self.listen))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Writes a config of this daemon's paths and listener serving `routes`, followed by
    /// `tables` (the upstreams and routes), for a test to apply with `gateway reload`.
    fn write_with_tables(&self, routes: &[&str], tables: &str) {
        let names: Vec<String> = routes.iter().map(|r| format!("\"{r}\"")).collect();
        let text = format!(
            "instance = \"{instance}\"\n\
             state_dir = \"{dir}/state\"\n\
             admin_socket = \"{dir}/admin.sock\"\n\
             [metrics]\n\
             listen = \"{metrics}\"\n\
             [[listeners]]\n\
             name = \"plain\"\n\
             address = \"{listen}\"\n\
             routes = [{names}]\n\
             {tables}",
            instance = self.instance,
            dir = self.dir.display(),
            metrics = self.metrics,
            listen = self.listen,
            names = names.join(", "),
        );
        fs::write(self.config(), text).expect("writing the config");
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(gateway_bin())
            .arg("--socket")
            .arg(self.dir.join("admin.sock"))
            .args(args)
            .output()
            .expect("running the CLI")
    }

    /// Status of `GET path` on a fresh connection.
    fn status_of(&self, path: &str) -> u16 {
        let mut client = KeepAlive::connect(self.listen);
        client.get(path)
    }

    /// Polls until `GET path` answers `status` (bounded).
    fn wait_for(&self, path: &str, status: u16, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.status_of(path);
            if got == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{why}: GET {path} gave {got}, wanted {status}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn http_get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        let mut client = KeepAlive::connect(addr);
        let status = client.get(path);
        (status, client.last_body.clone())
    }

    /// The access-log lines written so far.
    fn access_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|json| json["target"] == "access")
            .collect()
    }

    /// Abuse verdicts so far, whatever became of them (dry run, protected, banned).
    fn abuse_verdicts(&self) -> u64 {
        let (_, metrics) = self.http_get(self.metrics, "/metrics");
        metrics
            .lines()
            .filter(|line| line.starts_with("gateway_abuse_verdicts_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// One row of an attack table: `send` must get `expected`; the request's access line must
    /// show that no upstream saw it; and the outcome must reach the abuse detector, which (with
    /// [`EVIDENCE_RULE`] in the config) answers every refusal with one more verdict.
    fn refused(&self, row: &str, expected: u16, send: impl FnOnce() -> (u16, String)) {
        let lines_before = self.access_lines().len();
        let verdicts_before = self.abuse_verdicts();
        let (status, body) = send();
        assert_eq!(status, expected, "{row}: {body}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let line = loop {
            if let Some(line) = self.access_lines().get(lines_before) {
                break line.clone();
            }
            assert!(Instant::now() < deadline, "{row}: no access line");
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(line["status"], expected, "{row}: {line}");
        assert!(
            line.get("upstream").is_none(),
            "{row}: the upstream saw the request: {line}"
        );
        while self.abuse_verdicts() <= verdicts_before {
            assert!(
                Instant::now() < deadline,
                "{row}: the refusal never reached the abuse detector"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A dry-run abuse rule that fires on every refusal, so a test can see each one arrive.
const EVIDENCE_RULE: &str = "[abuse]\n\
    [[abuse.rules]]\n\
    name = \"evidence\"\n\
    classes = [\"auth_failure\", \"forbidden\", \"invalid_request\", \"not_found\", \"rate_limited\"]\n\
    threshold = 1\n\
    window = \"1m\"\n\
    ban = \"1m\"\n\
    dry_run = true\n";

impl Drop for Daemon {
    fn drop(&mut self) {
        let failed = thread::panicking();
        drop(self.process.take());
        if failed {
            eprintln!("daemon log:\n{}", self.log());
        }
        if let Err(error) = remove_pins(&self.pin_dir()) {
            eprintln!("removing pins: {error}");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.1 keep-alive client: one connection, sequential requests.
struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    last_body: String,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connecting");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        KeepAlive {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            last_body: String::new(),
        }
    }

    /// Sends `GET path` and reads the whole response; returns its status.
    fn get(&mut self, path: &str) -> u16 {
        write!(self.writer, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("sending");
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("reading the status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            self.reader
                .read_line(&mut header)
                .expect("reading a header");
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a content length");
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("reading the body");
        self.last_body = String::from_utf8_lossy(&body).into_owned();
        status
    }
}

#[test]
fn reload_changes_routes_without_losing_a_request() {
    if !require_root("reload_changes_routes_without_losing_a_request") {
        return;
    }
    let daemon = Daemon::start("routes");
    assert_eq!(daemon.status_of("/a/x"), 200);
    assert_eq!(daemon.status_of("/b/x"), 404);

    // A steady stream of requests on one keep-alive connection across every reload below.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, served, addr) = (Arc::clone(&stop), Arc::clone(&served), daemon.listen);
        thread::spawn(move || {
            let mut client = KeepAlive::connect(addr);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let status = client.get("/a/steady");
                assert_eq!(status, 200, "a request failed during a reload");
                served.fetch_add(1, Ordering::Relaxed);
                if served.load(Ordering::Relaxed) >= 100_000 {
                    break;
                }
            }
        })
    };

    daemon.write_config(&["a", "b"], "");
    let reloaded = daemon.cli(&["reload"]);
    assert!(
        reloaded.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(
        daemon.status_of("/b/x"),
        200,
        "the new route serves at once"
    );

    // A config that does not validate is refused; the running one keeps serving.
    fs::write(
        daemon.config(),
        "[[routes]]\nname = \"c\"\nupstream = \"missing\"\n",
    )
    .unwrap();
    let refused = daemon.cli(&["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("config"),
        "the error says what is wrong: {message}"
    );
    assert_eq!(daemon.status_of("/b/x"), 200, "the old config still serves");

    // What applies only at start is refused too, naming the key.
    daemon.write_config(&["a", "b"], "[xdp]\ninterfaces = [\"lo\"]\n");
    let refused = daemon.cli(&["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("xdp.interfaces"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // SIGHUP reloads as well.
    daemon.write_config(&["a"], "");
    let pid = daemon.process.as_ref().unwrap().0.id() as i32;
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    daemon.wait_for("/b/x", 404, "after SIGHUP with route b removed");

    // And so does a change of the file alone (the watcher polls every 2 s).
    daemon.write_config(&["a", "c"], "");
    daemon.wait_for("/c/x", 200, "after the config file changed");

    stop.store(true, Ordering::Relaxed);
    load.join().expect("no request failed during the reloads");
    assert!(served.load(Ordering::Relaxed) > 0);

    let (status, metrics) = daemon.http_get(daemon.metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"gateway_config_reloads_total{result="rejected"} "#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gateway_config_reloads_total{result="ok"} "#),
        "{metrics}"
    );
}

#[test]
fn admin_http_serves_metrics_health_and_readiness() {
    if !require_root("admin_http_serves_metrics_health_and_readiness") {
        return;
    }
    let daemon = Daemon::start("metrics");
    assert_eq!(daemon.status_of("/a/x"), 200);
    assert_eq!(daemon.status_of("/nowhere"), 404);
    assert_eq!(daemon.http_get(daemon.metrics, "/healthz").0, 200);
    assert_eq!(daemon.http_get(daemon.metrics, "/readyz").0, 200);
    let (status, metrics) = daemon.http_get(daemon.metrics, "/metrics");
    assert_eq!(status, 200);
    for expected in [
        r#"gateway_http_requests_total{listener="plain",route="a",status="2xx"} 1"#,
        r#"gateway_http_requests_total{listener="plain",route="none",status="4xx"} 1"#,
        r#"gateway_http_request_duration_seconds_count{route="a"} 1"#,
        r#"gateway_xdp_packets_total{reason="blocked_address",action="drop"} "#,
        r#"gateway_xdp_map_capacity{map="GW_BLOCK_V4"} 1200000"#,
        "gateway_active_connections",
        r#"gateway_abuse_verdicts_total{enforcement="xdp"} 0"#,
        "gateway_abuse_tracked_sources",
        "gateway_upstream_endpoint_healthy{upstream=",
        "gateway_upstream_endpoint_ejections_total{upstream=",
    ] {
        assert!(
            metrics.contains(expected),
            "missing `{expected}` in:\n{metrics}"
        );
    }
}

#[test]
fn api_keys_authenticate_and_identity_reaches_the_upstream() {
    if !require_root("api_keys_authenticate_and_identity_reaches_the_upstream") {
        return;
    }
    let daemon = Daemon::start("apikeys");
    daemon.write_config(&["a"], "[auth]\ndefault_route_auth = [\"api_key\"]\n");
    let reloaded = daemon.cli(&["reload"]);
    assert!(
        !reloaded.status.success(),
        "`auth` applies only at start, so the reload is refused"
    );
    // Restart-only settings need a new daemon: start one with authentication on.
    drop(daemon);
    let daemon = Daemon::start_with("apikeys2", "[auth]\ndefault_route_auth = [\"api_key\"]\n");

    let (status, body) = daemon.curl("/a/x", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthenticated"), "a problem body: {body}");

    let created = daemon.cli(&[
        "keys",
        "create",
        "--owner",
        "svc-billing",
        "--scopes",
        "orders:read",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(key.starts_with("gw_"), "{key}");

    let (status, body) = daemon.curl(
        "/a/x",
        &[
            &format!("X-Api-Key: {key}"),
            "X-Authenticated-Principal: admin",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).expect("the demo upstream's JSON");
    let headers = &echoed["headers"];
    assert_eq!(
        headers["x-authenticated-principal"], "svc-billing",
        "{echoed}"
    );
    assert_eq!(headers["x-authenticated-scopes"], "orders:read", "{echoed}");
    assert!(
        headers.get("x-api-key").is_none(),
        "the key stops at the gateway: {echoed}"
    );

    let (status, _) = daemon.curl("/a/x", &["X-Api-Key: gw_0000000000000000_nope"]);
    assert_eq!(status, 401);

    // Each refusal is counted with its reason.
    let (_, metrics) = daemon.http_get(daemon.metrics, "/metrics");
    for expected in [
        r#"gateway_policy_rejections_total{route="a",phase="authenticate",reason="missing_credentials"} 1"#,
        r#"gateway_policy_rejections_total{route="a",phase="authenticate",reason="malformed_credentials"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing `{expected}` in:\n{metrics}"
        );
    }
}

#[test]
fn rate_limits_then_recovery_and_cors_preflights() {
    if !require_root("rate_limits_then_recovery_and_cors_preflights") {
        return;
    }
    let daemon = Daemon::start_with_routes(
        "ratecors",
        "",
        "cors = { allow_origins = [\"https://app.example\"], allow_methods = [\"GET\"], allow_headers = [\"content-type\"], max_age = \"10m\" }\n\
         [[routes.rate_limits]]\nkey = \"source\"\nrate = \"2/s\"\nburst = 3\n",
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(daemon.curl("/a/x", &[]).0);
    }
    assert_eq!(
        &statuses[..3],
        [200, 200, 200],
        "the burst passes: {statuses:?}"
    );
    assert!(statuses[3..].contains(&429), "then 429: {statuses:?}");

    let output = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "--max-time", "5"])
        .arg(format!("http://{}/a/x", daemon.listen))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
    if head.starts_with("http/1.1 429") {
        assert!(head.contains("retry-after:"), "{head}");
        assert!(head.contains("ratelimit-policy:"), "{head}");
    }
    // 2/s refills one request every half second.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        daemon.curl("/a/x", &[]).0,
        200,
        "recovered after the refill"
    );

    // A preflight from the allowed origin is answered by the gateway, no upstream involved.
    thread::sleep(Duration::from_millis(1600));
    let preflight = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "-X",
            "OPTIONS",
        ])
        .args([
            "-H",
            "Origin: https://app.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ])
        .arg(format!("http://{}/a/x", daemon.listen))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&preflight.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    let evil = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-X",
            "OPTIONS",
        ])
        .args([
            "-H",
            "Origin: https://evil.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ])
        .arg(format!("http://{}/a/x", daemon.listen))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&evil.stdout),
        "403",
        "a foreign origin is refused"
    );
}

#[test]
fn authorization_and_validation_guard_a_route() {
    if !require_root("authorization_and_validation_guard_a_route") {
        return;
    }
    let schema_dir = std::env::temp_dir().join(format!("gateway-schema-{}", std::process::id()));
    fs::create_dir_all(&schema_dir).unwrap();
    let schema = schema_dir.join("order.schema.json");
    fs::write(
        &schema,
        r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["item", "qty"], "additionalProperties": false,
            "properties": {"item": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}"#,
    )
    .unwrap();
    let daemon = Daemon::start_with_routes(
        "authzval",
        EVIDENCE_RULE,
        &format!(
            "auth = [\"api_key\"]\n\
             authz = {{ scopes = {{ all_of = [\"orders:write\"] }} }}\n\
             validate = {{ methods = [\"POST\"], content_types = [\"application/json\"], json_schema = \"{}\" }}\n",
            schema.display()
        ),
    );
    let key = |scopes: &str| {
        let created = daemon.cli(&["keys", "create", "--owner", "svc", "--scopes", scopes]);
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        format!(
            "X-Api-Key: {}",
            String::from_utf8_lossy(&created.stdout).trim()
        )
    };
    let reader = key("orders:read");
    let writer = key("orders:write");
    let post = |headers: &[&str], body: &str| {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "--data-binary",
            body,
        ]);
        for header in headers {
            curl.args(["-H", header]);
        }
        let output = curl
            .arg(format!("http://{}/a/orders", daemon.listen))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse::<u16>().unwrap_or(0), body.to_owned())
    };
    let json = "Content-Type: application/json";
    daemon.refused("scope missing", 403, || {
        post(&[&reader, json], r#"{"item":"book","qty":1}"#)
    });
    daemon.refused("wrong type", 422, || {
        let (status, body) = post(&[&writer, json], r#"{"item":"book","qty":"many"}"#);
        assert!(body.contains("/qty"), "the problem names the field: {body}");
        assert!(!body.contains("many"), "the payload is not echoed: {body}");
        (status, body)
    });
    daemon.refused("extra field", 422, || {
        post(&[&writer, json], r#"{"item":"book","qty":1,"extra":true}"#)
    });
    daemon.refused("missing required field", 422, || {
        post(&[&writer, json], r#"{"item":"book"}"#)
    });
    daemon.refused("wrong content type", 415, || {
        post(&[&writer, "Content-Type: text/plain"], "qty=1")
    });
    daemon.refused("1,000-deep nesting, refused before parsing", 400, || {
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        post(&[&writer, json], &deep)
    });
    daemon.refused("no API key", 401, || {
        post(&[json], r#"{"item":"book","qty":1}"#)
    });
    let (status, body) = post(&[&writer, json], r#"{"item":"book","qty":2}"#);
    assert_eq!(status, 200, "a valid order passes: {body}");
    let _ = fs::remove_dir_all(&schema_dir);
}

/// A token for the test issuer: `claims` over the standard valid ones, signed by `key` with
/// `header`.
fn jwt(header: &jsonwebtoken::Header, claims: serde_json::Value, key: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let mut all = serde_json::json!({
        "iss": "https://idp.test",
        "aud": "orders",
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
    });
    for (name, value) in claims.as_object().expect("an object") {
        all[name] = value.clone();
    }
    let key = match header.alg {
        jsonwebtoken::Algorithm::HS256 => jsonwebtoken::EncodingKey::from_secret(key),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(key).expect("an RSA private key"),
    };
    jsonwebtoken::encode(header, &all, &key).expect("signed")
}

fn testdata(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway-userspace/src/auth/testdata")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn jwt_attacks_are_refused_before_the_upstream_and_reach_the_abuse_detector() {
    if !require_root("jwt_attacks_are_refused_before_the_upstream_and_reach_the_abuse_detector") {
        return;
    }
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let public_pem = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway-userspace/src/auth/testdata/rsa-a.pub.pem");
    let daemon = Daemon::start_with_routes(
        "jwtattacks",
        &format!(
            "[[auth.jwt]]\nissuer = \"https://idp.test\"\naudiences = [\"orders\"]\nalgorithms = [\"RS256\"]\npem_file = \"{}\"\n{EVIDENCE_RULE}",
            public_pem.display()
        ),
        "auth = [\"jwt\"]\n",
    );
    let (good_key, attacker_key) = (testdata("rsa-a.key.pem"), testdata("rsa-b.key.pem"));
    let rs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    let bearer =
        |token: &str| daemon.curl("/a/orders", &[&format!("Authorization: Bearer {token}")]);

    let valid = jwt(&rs256, serde_json::json!({}), &good_key);
    let (status, body) = bearer(&valid);
    assert_eq!(status, 200, "the control: a valid token passes: {body}");

    // A listener the `jku` header points at: the gateway must never connect to it.
    let jku = TcpListener::bind("127.0.0.1:0").expect("binding the jku listener");
    jku.set_nonblocking(true).expect("non-blocking");
    let mut jku_header = rs256.clone();
    jku_header.jku = Some(format!("http://{}/jwks.json", jku.local_addr().unwrap()));

    let payload = |token: &str| token.split('.').nth(1).unwrap_or_default().to_owned();
    let tampered = {
        let forged = b64(serde_json::to_string(&serde_json::json!({
            "iss": "https://idp.test", "aud": "orders", "sub": "admin", "exp": 4_000_000_000u64
        }))
        .unwrap()
        .as_bytes());
        valid.replacen(&payload(&valid), &forged, 1)
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        payload(&valid)
    );
    let rows: Vec<(&str, String)> = vec![
        ("alg none", unsigned),
        (
            "HS256 signed with the RSA public key (algorithm confusion)",
            jwt(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                serde_json::json!({}),
                &testdata("rsa-a.pub.pem"),
            ),
        ),
        ("tampered payload", tampered),
        (
            "signed by another key",
            jwt(&rs256, serde_json::json!({}), &attacker_key),
        ),
        (
            "expired",
            jwt(
                &rs256,
                serde_json::json!({"exp": 1_000_000_000u64, "iat": 999_999_000u64}),
                &good_key,
            ),
        ),
        (
            "not yet valid",
            jwt(
                &rs256,
                serde_json::json!({"nbf": 4_000_000_000u64}),
                &good_key,
            ),
        ),
        (
            "wrong issuer",
            jwt(
                &rs256,
                serde_json::json!({"iss": "https://evil.test"}),
                &good_key,
            ),
        ),
        (
            "wrong audience",
            jwt(&rs256, serde_json::json!({"aud": "billing"}), &good_key),
        ),
        (
            "jku pointing elsewhere",
            jwt(&jku_header, serde_json::json!({}), &attacker_key),
        ),
    ];
    for (row, token) in &rows {
        daemon.refused(row, 401, || bearer(token));
    }
    assert!(
        jku.accept().is_err(),
        "the gateway fetched the token's `jku`"
    );
    let (_, metrics) = daemon.http_get(daemon.metrics, "/metrics");
    for reason in [
        "algorithm_not_allowed",
        "bad_signature",
        "token_expired",
        "token_not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
    ] {
        let counted = format!(
            r#"gateway_policy_rejections_total{{route="a",phase="authenticate",reason="{reason}"}}"#
        );
        assert!(
            metrics.contains(&counted),
            "`{counted}` missing:\n{metrics}"
        );
    }
}

#[test]
fn health_checks_take_dead_endpoints_out_and_readiness_follows() {
    if !require_root("health_checks_take_dead_endpoints_out_and_readiness_follows") {
        return;
    }
    let daemon = Daemon::start("health");
    let dead = format!("127.0.0.1:{}", free_port());
    // Applied by reload: one pool with a live and a dead endpoint, and a pool of dead ones.
    let check = "health_check = { path = \"/healthz\", interval = \"200ms\", timeout = \"100ms\", unhealthy_threshold = 1 }";
    daemon.write_with_tables(
        &["a", "b"],
        &format!(
            "[[upstreams]]\nname = \"demo\"\nendpoints = [\"{upstream}\", \"{dead}\"]\n{check}\n\
             [[upstreams]]\nname = \"gone\"\nendpoints = [\"{dead}\"]\n{check}\n\
             [[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"demo\"\n\
             [[routes]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"gone\"\n",
            upstream = daemon.upstream,
        ),
    );
    let reloaded = daemon.cli(&["reload"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    // Within a few probe rounds the dead endpoint is out: every request lands on the live one
    // (without health checks, every other request would try the dead one first).
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.http_get(daemon.metrics, "/readyz").0 != 503 {
        assert!(
            Instant::now() < deadline,
            "the dead pool never made /readyz fail"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (_, readiness) = daemon.http_get(daemon.metrics, "/readyz");
    assert!(readiness.contains("gone"), "names the pool: {readiness}");
    assert!(
        !readiness.contains("demo"),
        "the mixed pool is healthy: {readiness}"
    );
    let mut client = KeepAlive::connect(daemon.listen);
    for _ in 0..20 {
        assert_eq!(
            client.get("/a/x"),
            200,
            "a request reached the dead endpoint"
        );
    }
    assert_eq!(
        daemon.status_of("/b/x"),
        503,
        "a pool with no healthy endpoint fails fast"
    );
    assert!(
        daemon.log().contains("failed its health checks"),
        "the ejection is logged"
    );
}

#[test]
fn idempotent_requests_are_retried_on_another_endpoint_and_posts_are_not() {
    if !require_root("idempotent_requests_are_retried_on_another_endpoint_and_posts_are_not") {
        return;
    }
    let daemon = Daemon::start("retry");
    let dead = format!("127.0.0.1:{}", free_port());
    // The dead endpoint first: round-robin picks it for the first request.
    daemon.write_with_tables(
        &["a"],
        &format!(
            "[[upstreams]]\nname = \"demo\"\nendpoints = [\"{dead}\", \"{upstream}\"]\n\
             [[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"demo\"\n",
            upstream = daemon.upstream,
        ),
    );
    let reloaded = daemon.cli(&["reload"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );

    // A POST is not idempotent: the first pick of the new pool is the dead endpoint, and the
    // refused connection is the client's 502, never a replay.
    let post = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-X",
            "POST",
        ])
        .args(["--data-binary", "order=1"])
        .arg(format!("http://{}/a/x", daemon.listen))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&post.stdout),
        "502",
        "a POST is never retried"
    );
    // After the ejection (2 s), GETs keep meeting the dead endpoint in turn and keep passing.
    thread::sleep(Duration::from_millis(2100));
    for _ in 0..4 {
        assert_eq!(
            daemon.curl("/a/x", &[]).0,
            200,
            "a GET failed instead of being retried"
        );
        thread::sleep(Duration::from_millis(600));
    }
    assert!(
        daemon
            .log()
            .contains("retrying the idempotent request on another"),
        "the retry is logged"
    );
}
