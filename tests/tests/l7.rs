//! End-to-end tests of the L7 gateway: the real `gateway` binary with a temporary config (no XDP
//! interfaces) in front of an upstream served by the test itself, which records what reached
//! it. Clients are real: hyper over tokio-rustls with ALPN `h2` and `http/1.1`, and raw TCP
//! where a test must send what a well-behaved client would not.
//!
//! Each test runs its own daemon on free loopback ports with its own instance name, so they run
//! side by side; guards stop the daemon (by its pid) and remove its folder and pins, also when
//! a test fails (the daemon's log is printed then). `gateway run` loads the XDP program even
//! without interfaces, so these tests need root; a non-root run outside CI skips them. The
//! binary is `GATEWAY_BIN`, as `cargo xtask test` sets it, or `target/debug/gateway`.
use std::{
    fs,
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use gateway_tests::gateway_bin;
use gateway_userspace::xdp::loader::remove_pins;

/// What the gateway's route timeout is in these tests, and how long `/api/slow` takes.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(1);
const SLOW_UPSTREAM: Duration = Duration::from_secs(3);
/// `http.header_read_timeout` in these tests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// `http.idle_timeout` in these tests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// `http.max_connections_per_source` in these tests.
const PER_SOURCE: usize = 24;
const MAX_BODY: usize = 1024;

/// A loopback port nobody listens on right now.
fn free_port() -> SocketAddr {
    let socket = StdListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    socket.local_addr().expect("its address")
}

/// What one request looked like when it reached the upstream.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    version: Version,
    headers: HeaderMap,
    body_bytes: usize,
    body_complete: bool,
}

/// The upstream: echoes the request as JSON, records it, and misbehaves on demand:
/// paths with `/slow` are answered after [`SLOW_UPSTREAM`]. Responses carry headers the gateway must
/// strip (`Server`, `X-Powered-By`, hop-by-hop ones).
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        Upstream::start_with(None).await
    }

    /// The same upstream behind TLS (this acceptor's certificate, ALPN and client checks).
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen_in, hits_in) = (Arc::clone(&seen), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, hits) = (Arc::clone(&seen_in), Arc::clone(&hits_in));
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (seen, hits) = (Arc::clone(&seen), Arc::clone(&hits));
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(upstream_answer(request, &seen).await)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        // A failed handshake (a client without the certificate asked for) ends
                        // the connection, as a real TLS server does.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        Upstream {
            addr,
            seen,
            hits,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("the upstream's record").clone()
    }

    fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream received a request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_answer(
    request: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
) -> Response<Full<Bytes>> {
    let (parts, mut body) = request.into_parts();
    let mut body_bytes = 0;
    let mut body_complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, Bytes::len),
            Err(_) => {
                body_complete = false;
                break;
            }
        }
    }
    seen.lock().expect("the upstream's record").push(Seen {
        path: parts.uri.path().to_owned(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_bytes,
        body_complete,
    });
    if parts.uri.path().contains("/slow") {
        tokio::time::sleep(SLOW_UPSTREAM).await;
    }
    let answer = serde_json::json!({ "path": parts.uri.path(), "body_bytes": body_bytes });
    let cache_control = if parts.uri.path().contains("/cacheable") {
        "public, max-age=60"
    } else {
        "no-store"
    };
    Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", cache_control)
        .header("server", "secret-upstream/1.0")
        .header("x-powered-by", "PHP/5.0")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from(answer.to_string())))
        .expect("a valid response")
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("gateway-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating a test folder");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The certificates a TLS listener serves by SNI, as PEM files and DER for comparison.
struct Certificates {
    api: CertificateDer<'static>,
    wildcard: CertificateDer<'static>,
}

fn write_certificate(dir: &Path, stem: &str, name: &str) -> CertificateDer<'static> {
    let generated = rcgen::generate_simple_self_signed(vec![name.to_owned()])
        .unwrap_or_else(|e| panic!("generating a certificate for {name}: {e}"));
    fs::write(dir.join(format!("{stem}.crt")), generated.cert.pem())
        .expect("writing a certificate");
    fs::write(
        dir.join(format!("{stem}.key")),
        generated.signing_key.serialize_pem(),
    )
    .expect("writing a key");
    generated.cert.der().clone()
}

/// One daemon with three listeners: `public` (HTTPS: certificates for `api.test` and
/// `*.wild.test`, a self-signed default for `localhost`), `plain` (HTTP, no trusted proxies)
/// and `trusted` (HTTP, loopback trusted as a proxy). Routes: `/api/` to the test's upstream,
/// `/h2/` to the same upstream over h2c, `/slow/` with a long timeout, `/down/` to a port
/// nobody listens on. Drop stops it and removes its folder and pins.
struct Gateway {
    instance: String,
    process: Option<Child>,
    https: SocketAddr,
    plain: SocketAddr,
    trusted: SocketAddr,
    extra_listeners: Vec<SocketAddr>,
    certificates: Certificates,
    dir: TempDir,
}

/// What a test adds to the standard daemon: TOML appended to the config (more listeners,
/// routes, upstreams), routes also served by `public`, and the addresses of the extra
/// listeners, to wait for.
#[derive(Default)]
struct Extra {
    toml: String,
    public_routes: Vec<&'static str>,
    listeners: Vec<SocketAddr>,
}

impl Gateway {
    async fn start(tag: &str, upstream: &Upstream) -> Gateway {
        Gateway::start_with(tag, upstream, Extra::default()).await
    }

    async fn start_with(tag: &str, upstream: &Upstream, extra: Extra) -> Gateway {
        let instance = format!("l7-{tag}-{}", std::process::id());
        let path = std::env::temp_dir().join(format!("gateway-{instance}"));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating the test folder");
        let dir = TempDir(path);
        let _ = remove_pins(&Path::new("/sys/fs/bpf").join(&instance));
        let certificates = Certificates {
            api: write_certificate(&dir.0, "api", "api.test"),
            wildcard: write_certificate(&dir.0, "wild", "*.wild.test"),
        };
        let (https, plain, trusted, dead) = (free_port(), free_port(), free_port(), free_port());
        let folder = dir.0.display();
        let config = format!(
            r#"
instance = "{instance}"
state_dir = "{folder}/state"
admin_socket = "{folder}/admin.sock"
[xdp]
interfaces = []

[[listeners]]
name = "public"
address = "{https}"
routes = ["api", "down"{public_routes}]
[listeners.tls]
self_signed = true
self_signed_names = ["localhost"]
reload_interval = "1s"
certificates = [
  {{ cert = "{folder}/api.crt", key = "{folder}/api.key", names = ["api.test"] }},
  {{ cert = "{folder}/wild.crt", key = "{folder}/wild.key", names = ["*.wild.test"] }},
]

[[listeners]]
name = "plain"
address = "{plain}"
routes = ["api", "down", "h2", "slow"]

[[listeners]]
name = "trusted"
address = "{trusted}"
routes = ["api"]
trusted_proxies = ["127.0.0.0/8"]

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "app"
timeout = "{timeout}ms"
max_body_bytes = {MAX_BODY}

[[routes]]
name = "h2"
path_prefix = "/h2/"
upstream = "app-h2"

[[routes]]
name = "slow"
path_prefix = "/slow/"
upstream = "app"
timeout = "10s"

[[routes]]
name = "down"
path_prefix = "/down/"
upstream = "dead"

[[upstreams]]
name = "app"
endpoints = ["{app}"]

[[upstreams]]
name = "app-h2"
endpoints = ["{app}"]
protocol = "h2c"
balance = "least_outstanding"

[[upstreams]]
name = "dead"
endpoints = ["{dead}"]
connect_timeout = "1s"

[http]
max_header_bytes = 4096
max_headers = 30
max_uri_bytes = 1024
header_read_timeout = "{header_timeout}ms"
idle_timeout = "{idle_timeout}ms"
max_connections_per_source = {PER_SOURCE}
shutdown_grace = "10s"
{extra_toml}
"#,
            public_routes = extra
                .public_routes
                .iter()
                .map(|route| format!(", \"{route}\""))
                .collect::<String>(),
            extra_toml = extra.toml,
            app = upstream.addr,
            timeout = ROUTE_TIMEOUT.as_millis(),
            header_timeout = HEADER_TIMEOUT.as_millis(),
            idle_timeout = IDLE_TIMEOUT.as_millis(),
        );
        let config_path = dir.0.join("gateway.toml");
        fs::write(&config_path, config).expect("writing the config");
        let log = fs::File::create(dir.0.join("daemon.log")).expect("creating the log file");
        let process = Command::new(gateway_bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("sharing the log file"))
            .stderr(log)
            .spawn()
            .expect("starting the gateway");
        let mut gateway = Gateway {
            instance,
            process: Some(process),
            https,
            plain,
            trusted,
            extra_listeners: extra.listeners,
            certificates,
            dir,
        };
        gateway.wait_until_listening().await;
        gateway
    }

    async fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.process.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the gateway exited during start-up ({status})");
            }
            let mut ready = true;
            for addr in [self.https, self.plain, self.trusted]
                .iter()
                .chain(&self.extra_listeners)
            {
                ready &= TcpStream::connect(addr).await.is_ok();
            }
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM to the daemon (our own child, by its pid) and returns at once.
    fn terminate(&self) {
        let child = self.process.as_ref().expect("the daemon runs");
        let pid = i32::try_from(child.id()).expect("a pid fits in i32");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's and has
        // not been reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }

    /// Waits up to `limit` for the daemon to exit; whether it exited successfully.
    async fn exited_within(&mut self, limit: Duration) -> Option<bool> {
        let child = self.process.as_mut().expect("the daemon runs");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status.success());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.dir.0.join("daemon.log")).unwrap_or_default()
    }

    /// The access-log line of `request_id`, once the daemon wrote it.
    async fn access_line(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self.log_text().lines().find_map(|line| {
                let json: Value = serde_json::from_str(line).ok()?;
                (json["target"] == "access" && json["request_id"] == request_id).then_some(json)
            });
            if let Some(json) = found {
                return json;
            }
            assert!(
                Instant::now() < deadline,
                "no access-log line for request `{request_id}`"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            // SIGTERM by our own child's pid: the daemon drains and detaches cleanly.
            if matches!(child.try_wait(), Ok(None)) {
                let pid = i32::try_from(child.id()).expect("a pid fits in i32");
                // SAFETY: kill has no memory-safety preconditions; the pid is our own child's
                // and has not been reaped, so it cannot name another process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("warning: daemon `{}` had to be killed", self.instance);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- log of the gateway daemon `{}` ---\n{}--- end of log ---",
                self.instance,
                self.log_text()
            );
        }
        let pins = Path::new("/sys/fs/bpf").join(&self.instance);
        if let Err(error) = remove_pins(&pins) {
            eprintln!(
                "warning: removing the pins in `{}`: {error}",
                pins.display()
            );
        }
    }
}

/// Accepts any server certificate: these tests check which certificate is served, not trust.
#[derive(Debug)]
struct AcceptAnyCertificate;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection with `sni` offering `alpn`; returns the stream and the served certificate.
async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    tls_connect_with(addr, sni, alpn, rustls::DEFAULT_VERSIONS).await
}

async fn tls_connect_with(
    addr: SocketAddr,
    sni: &str,
    alpn: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("protocol versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate))
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connecting to the gateway");
    let name = ServerName::try_from(sni.to_owned()).expect("a server name");
    let stream = connector
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with SNI {sni}: {e}"));
    let (_, session) = stream.get_ref();
    assert_eq!(
        session.alpn_protocol(),
        Some(alpn),
        "the gateway accepts ALPN {}",
        String::from_utf8_lossy(alpn)
    );
    let certificate = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a served certificate")
        .clone()
        .into_owned();
    (stream, certificate)
}

struct Answer {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn request_id(&self) -> String {
        self.headers["x-request-id"]
            .to_str()
            .expect("an ASCII request id")
            .to_owned()
    }
}

/// Sends one request over an established connection with hyper's HTTP/2 or HTTP/1.1 client.
async fn send<I>(io: I, h2: bool, request: Request<Full<Bytes>>) -> Answer
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .expect("a response from the gateway");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: body.collect().await.expect("the response body").to_bytes(),
    }
}

fn get(uri: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

/// Sends raw bytes (one request with `Connection: close`) and returns the status code and the
/// whole answer.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("sending the request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 10 s to {request:?}");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn raw_get(path: &str, extra_headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{extra_headers}Connection: close\r\n\r\n")
}

fn assert_problem(status: u16, text: &str, expected: u16) {
    assert_eq!(status, expected, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{text}"
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("a JSON problem body ({e}): {text}"));
    assert_eq!(json["status"], expected, "{json}");
    assert!(
        json["type"].is_string() && json["title"].is_string() && json["request_id"].is_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sni_picks_the_certificate_and_alpn_the_protocol() {
    if !gateway_tests::require_root("https_sni_picks_the_certificate_and_alpn_the_protocol") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("sni", &upstream).await;

    let (stream, certificate) = tls_connect(gateway.https, "api.test", b"h2").await;
    assert_eq!(certificate, gateway.certificates.api, "exact name");
    let answer = send(stream, true, get("https://api.test/api/hello", "api.test")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, Version::HTTP_2);
    assert_eq!(answer.json()["path"], "/api/hello");

    let (stream, certificate) = tls_connect(gateway.https, "x.wild.test", b"http/1.1").await;
    assert_eq!(certificate, gateway.certificates.wildcard, "wildcard name");
    let answer = send(stream, false, get("/api/one", "x.wild.test")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, Version::HTTP_11);

    let (stream, certificate) = tls_connect(gateway.https, "localhost", b"h2").await;
    assert_ne!(
        certificate, gateway.certificates.api,
        "the default, not api.test's"
    );
    assert_ne!(certificate, gateway.certificates.wildcard);
    // `:authority` decides, and the upstream gets it as `Host`, whatever `Host` said.
    let answer = send(
        stream,
        true,
        get("https://localhost:8443/api/two", "other.test"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.hits(), 3);
    assert_eq!(upstream.last().headers["host"], "localhost:8443");
    let line = gateway.access_line(&answer.request_id()).await;
    assert_eq!(line["tls_version"], "TLSv1.3", "{line}");
    assert_eq!(line["alpn"], "h2", "{line}");

    // TLS 1.2 clients are served too.
    let (stream, _) =
        tls_connect_with(gateway.https, "api.test", b"h2", &[&rustls::version::TLS12]).await;
    let answer = send(stream, true, get("https://api.test/api/three", "api.test")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let line = gateway.access_line(&answer.request_id()).await;
    assert_eq!(line["tls_version"], "TLSv1.2", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_404_and_never_reach_the_upstream() {
    if !gateway_tests::require_root("unmatched_requests_get_404_and_never_reach_the_upstream") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("deny", &upstream).await;
    for path in ["/", "/admin", "/apix", "/API/x"] {
        let (status, text) = raw(gateway.plain, &raw_get(path, "")).await;
        assert_problem(status, &text, 404);
    }
    let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
    let answer = send(stream, true, get("https://api.test/admin", "api.test")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.headers["content-type"], "application/problem+json",
        "the HTTP/2 error is a problem too"
    );
    assert_eq!(answer.json()["request_id"], answer.request_id());
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_served_without_the_upstream_while_fresh() {
    if !gateway_tests::require_root("cached_answers_are_served_without_the_upstream_while_fresh") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start_with(
        "cache",
        &upstream,
        Extra {
            toml: "[[routes]]\nname = \"catalog\"\npath_prefix = \"/catalog/\"\nupstream = \"app\"\ncache = {}\n".to_owned(),
            public_routes: vec!["catalog"],
            ..Extra::default()
        },
    )
    .await;
    let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
    let first = send(
        stream,
        true,
        get("https://api.test/catalog/cacheable/1", "api.test"),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(upstream.hits(), 1);
    let (stream, _) = tls_connect(gateway.https, "api.test", b"http/1.1").await;
    let again = send(
        stream,
        false,
        get("https://api.test/catalog/cacheable/1", "api.test"),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(upstream.hits(), 1, "the second answer came from the cache");
    assert!(again.headers.contains_key("age"), "{:?}", again.headers);
    assert_eq!(again.json()["path"], "/catalog/cacheable/1");
    assert_ne!(
        again.request_id(),
        first.request_id(),
        "a cached answer still gets its own request id"
    );
    assert!(
        !again.headers.contains_key("server"),
        "response filters apply to cached answers too"
    );
    let line = gateway.access_line(&again.request_id()).await;
    assert_eq!(line["cache"], "hit", "{line}");
    assert!(line.get("upstream").is_none(), "{line}");

    // A client asking for a fresh answer, and an answer the upstream marks `no-store`, go to
    // the upstream every time.
    let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
    let mut fresh = get("https://api.test/catalog/cacheable/1", "api.test");
    fresh
        .headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-cache"));
    assert_eq!(send(stream, true, fresh).await.status, StatusCode::OK);
    assert_eq!(upstream.hits(), 2);
    for expected in [3, 4] {
        let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
        let answer = send(
            stream,
            true,
            get("https://api.test/catalog/live", "api.test"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(upstream.hits(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalisation_cannot_be_used_to_reach_another_route() {
    if !gateway_tests::require_root("path_normalisation_cannot_be_used_to_reach_another_route") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("normalise", &upstream).await;
    // `/admin` is routed nowhere: every spelling of it must get the gateway's 404.
    for path in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/.%2E/admin",
        "/%61dmin",
        "//admin",
        "/./admin",
        "/api/./../admin/",
    ] {
        let (status, text) = raw(gateway.plain, &raw_get(path, "")).await;
        assert_problem(status, &text, 404);
    }
    // Encoded separators and broken escapes are refused outright.
    for path in [
        "/api/..%2fadmin",
        "/api/%2F..%2Fadmin",
        "/api/%zz",
        "/api/%5c..%5cadmin",
    ] {
        let (status, text) = raw(gateway.plain, &raw_get(path, "")).await;
        assert_problem(status, &text, 400);
    }
    assert_eq!(upstream.hits(), 0, "no bypass reached the upstream");
    // Spellings that resolve into `/api/` are routed, and the upstream sees the normal form.
    for path in [
        "/%61pi/users",
        "//api//users",
        "/admin/../api/users",
        "/api/./users",
    ] {
        let (status, text) = raw(gateway.plain, &raw_get(path, "")).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert_eq!(upstream.last().path, "/api/users", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_414() {
    if !gateway_tests::require_root("oversized_heads_get_431_and_414") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("limits", &upstream).await;
    let big = format!("X-Big: {}\r\n", "a".repeat(5000));
    let (status, text) = raw(gateway.plain, &raw_get("/api/x", &big)).await;
    assert_problem(status, &text, 431);
    let many: String = (0..40).map(|i| format!("X-Many-{i}: 1\r\n")).collect();
    let (status, text) = raw(gateway.plain, &raw_get("/api/x", &many)).await;
    assert_problem(status, &text, 431);
    let long = format!("/api/{}", "a".repeat(2000));
    let (status, text) = raw(gateway.plain, &raw_get(&long, "")).await;
    assert_problem(status, &text, 414);
    // Far beyond the limits hyper refuses the head itself, still with 431 and no upstream.
    let huge = format!("X-Huge: {}\r\n", "a".repeat(100_000));
    let (status, _) = raw(gateway.plain, &raw_get("/api/x", &huge)).await;
    assert_eq!(status, 431);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_while_streaming() {
    if !gateway_tests::require_root("bodies_over_the_limit_get_413_while_streaming") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("body", &upstream).await;

    // A declared length over the limit: refused before the upstream is contacted.
    let declared = format!(
        "POST /api/upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        MAX_BODY * 4,
        "a".repeat(MAX_BODY * 4)
    );
    let (status, text) = raw(gateway.plain, &declared).await;
    assert_problem(status, &text, 413);
    assert_eq!(upstream.hits(), 0);

    // A chunked body that grows past the limit: streamed, cut off, answered 413.
    let mut stream = TcpStream::connect(gateway.plain).await.expect("connecting");
    stream
        .write_all(b"POST /api/upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .expect("sending the head");
    let chunk = format!("200\r\n{}\r\n", "b".repeat(0x200));
    for _ in 0..64 {
        // The gateway may close the connection once it answered: stop sending then.
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert_problem(status, &text, 413);
    for seen in upstream.seen() {
        assert!(
            !seen.body_complete || seen.body_bytes <= MAX_BODY,
            "the upstream received a whole oversized body: {seen:?}"
        );
    }

    // Under the limit, a body goes through.
    let small = "POST /api/upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let (status, text) = raw(gateway.plain, small).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.last().body_bytes, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_become_502_503_and_504_without_detail() {
    if !gateway_tests::require_root("upstream_failures_become_502_503_and_504_without_detail") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("upstream", &upstream).await;
    let (status, text) = raw(gateway.plain, &raw_get("/down/x", "")).await;
    assert_problem(status, &text, 502);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        !body.contains("refused") && !body.contains("127.0.0.1") && !body.contains("connect"),
        "internal detail in {body}"
    );
    // The refusing endpoint is now left out for a while: the pool has nothing to offer.
    let (status, text) = raw(gateway.plain, &raw_get("/down/x", "")).await;
    assert_problem(status, &text, 503);

    let started = Instant::now();
    let (status, text) = raw(gateway.plain, &raw_get("/api/slow", "")).await;
    let waited = started.elapsed();
    assert_problem(status, &text, 504);
    assert!(
        waited >= ROUTE_TIMEOUT && waited < SLOW_UPSTREAM,
        "504 after {waited:?}, the route timeout is {ROUTE_TIMEOUT:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stalls_is_cut_off_after_the_route_timeout() {
    if !gateway_tests::require_root(
        "a_response_body_that_stalls_is_cut_off_after_the_route_timeout",
    ) {
        return;
    }
    // An upstream that sends its head and 10 of the 100 bytes it announced, then nothing.
    let stalling = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the stalling upstream");
    let stalling_addr = stalling.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = stalling.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).await.is_ok() {
                    head.push(byte[0]);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                tokio::time::sleep(SLOW_UPSTREAM * 2).await;
            });
        }
    });
    let listener = free_port();
    let upstream = Upstream::start().await;
    let gateway = Gateway::start_with(
        "stall",
        &upstream,
        Extra {
            toml: format!(
                "[[listeners]]\nname = \"stall\"\naddress = \"{listener}\"\nroutes = [\"stall\"]\n\
                 [[routes]]\nname = \"stall\"\npath_prefix = \"/\"\nupstream = \"stalling\"\ntimeout = \"{}ms\"\n\
                 [[upstreams]]\nname = \"stalling\"\nendpoints = [\"{stalling_addr}\"]\n",
                ROUTE_TIMEOUT.as_millis()
            ),
            listeners: vec![listener],
            ..Extra::default()
        },
    )
    .await;
    let started = Instant::now();
    let (status, text) = raw(listener, &raw_get("/x", "")).await;
    let waited = started.elapsed();
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("0123456789"),
        "the client got what the upstream sent, and no more: {text}"
    );
    assert!(
        waited >= ROUTE_TIMEOUT && waited < SLOW_UPSTREAM * 2,
        "the connection was cut {waited:?} after the request; the route timeout is {ROUTE_TIMEOUT:?}"
    );
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_from_what_the_gateway_saw() {
    if !gateway_tests::require_root("headers_are_rewritten_from_what_the_gateway_saw") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("headers", &upstream).await;
    let spoofing = "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\n\
                    Keep-Alive: timeout=99\r\nX-Hop: secret\r\nTE: trailers\r\nX-Request-Id: given-id-42\r\n";
    let request = format!(
        "GET /api/h HTTP/1.1\r\nHost: app.test\r\n{spoofing}Connection: close, x-hop\r\n\r\n"
    );

    // Untrusted peer: the client's forwarding headers are replaced.
    let (status, text) = raw(gateway.plain, &request).await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.test");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"app.test\""
    );
    assert_eq!(
        seen["x-request-id"], "given-id-42",
        "a client's id is propagated"
    );
    for hop in ["x-hop", "keep-alive", "te"] {
        assert!(!seen.contains_key(hop), "`{hop}` was forwarded: {seen:?}");
    }
    let lower = text.to_ascii_lowercase();
    for stripped in ["server:", "x-powered-by:", "x-upstream-hop:", "keep-alive:"] {
        assert!(
            !lower.contains(stripped),
            "`{stripped}` reached the client: {text}"
        );
    }
    assert!(lower.contains("x-request-id: given-id-42"), "{text}");

    // Trusted proxy: its chain is kept and extended.
    let (status, text) = raw(gateway.trusted, &request).await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(
        seen["forwarded"],
        "for=6.6.6.6, for=127.0.0.1;proto=http;host=\"app.test\""
    );

    // A generated id when the client sent none.
    let (_, text) = raw(gateway.plain, &raw_get("/api/h", "")).await;
    let id = upstream.last().headers["x-request-id"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert!(text.contains(&id), "the client gets the same id: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_and_keep_secrets_out() {
    if !gateway_tests::require_root("access_log_lines_are_json_and_keep_secrets_out") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("access", &upstream).await;
    let (stream, _) = tls_connect(gateway.https, "api.test", b"http/1.1").await;
    let request = Request::post("/api/log?page=2&access_token=tok-789")
        .header("host", "api.test")
        .header("authorization", "Bearer sekrit-123")
        .header("cookie", "session=cookie-456")
        .header("x-api-key", "key-000")
        .body(Full::new(Bytes::from_static(b"twelve bytes")))
        .expect("a valid request");
    let answer = send(stream, false, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let line = gateway.access_line(&answer.request_id()).await;
    for field in ["timestamp", "source", "latency_ms"] {
        assert!(line.get(field).is_some(), "`{field}` missing: {line}");
    }
    assert_eq!(line["listener"], "public", "{line}");
    assert_eq!(line["route"], "api", "{line}");
    assert_eq!(line["upstream"], upstream.addr.to_string(), "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(
        line["path"], "/api/log?page=2&access_token=REDACTED",
        "{line}"
    );
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes_in"], 12, "{line}");
    assert_eq!(line["bytes_out"], answer.body.len(), "{line}");
    assert_eq!(line["tls_version"], "TLSv1.3", "{line}");
    assert_eq!(line["alpn"], "http/1.1", "{line}");
    let log = gateway.log_text();
    for secret in ["sekrit-123", "cookie-456", "tok-789", "key-000"] {
        assert!(!log.contains(secret), "`{secret}` is in the log:\n{log}");
    }
    assert!(
        log.contains("L7 gateway serving; try `curl"),
        "the start-up log says what to try:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_after_the_header_timeout() {
    if !gateway_tests::require_root("slowloris_clients_are_cut_off_after_the_header_timeout") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("slowloris", &upstream).await;
    let mut stream = TcpStream::connect(gateway.plain).await.expect("connecting");
    let started = Instant::now();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
        .await
        .expect("sending the start of the head");
    // One header byte every 250 ms, never finishing, until the gateway hangs up (bounded).
    let cut_off = loop {
        assert!(
            started.elapsed() < HEADER_TIMEOUT * 5,
            "still connected after {:?}",
            started.elapsed()
        );
        if stream.write_all(b"a").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 256];
        // Bytes read (hyper may answer 408 before closing) or none yet: the close follows.
        let read = tokio::time::timeout(Duration::from_millis(250), stream.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break started.elapsed();
        }
    };
    assert!(
        cut_off >= HEADER_TIMEOUT - Duration::from_millis(100)
            && cut_off < HEADER_TIMEOUT + Duration::from_secs(2),
        "cut off after {cut_off:?}; the header read timeout is {HEADER_TIMEOUT:?}"
    );
    eprintln!("slowloris client cut off after {cut_off:?}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstreams_are_spoken_to_in_http2() {
    if !gateway_tests::require_root("h2c_upstreams_are_spoken_to_in_http2") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("h2c", &upstream).await;
    for _ in 0..3 {
        let (status, text) = raw(gateway.plain, &raw_get("/h2/x", "")).await;
        assert_eq!(status, 200, "{text}");
        let seen = upstream.last();
        assert_eq!(seen.version, Version::HTTP_2, "{seen:?}");
        assert_eq!(seen.headers["host"], "app.test", "{seen:?}");
    }
    let (status, _) = raw(gateway.plain, &raw_get("/api/x", "")).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.last().version, Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    if !gateway_tests::require_root("idle_keep_alive_connections_are_closed") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("idle", &upstream).await;
    let mut stream = TcpStream::connect(gateway.plain).await.expect("connecting");
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("sending a keep-alive request");
    let sent = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(IDLE_TIMEOUT * 3, stream.read_to_end(&mut answer)).await;
    let closed = sent.elapsed();
    assert!(
        read.is_ok(),
        "the idle connection was still open after {closed:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed >= IDLE_TIMEOUT - Duration::from_millis(100)
            && closed < IDLE_TIMEOUT + Duration::from_secs(2),
        "closed after {closed:?}; the idle timeout is {IDLE_TIMEOUT:?}"
    );
    eprintln!("idle keep-alive connection closed after {closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_source_limit_are_refused() {
    if !gateway_tests::require_root("connections_over_the_per_source_limit_are_refused") {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("connlimit", &upstream).await;
    // Held connections send nothing, so the header timeout closes them after 2 s: the check
    // only means something if all of them are still open. On a machine so loaded that opening
    // them took half of that, start over (bounded).
    let mut held = Vec::new();
    for attempt in 1..=3 {
        held.clear();
        let started = std::time::Instant::now();
        for _ in 0..PER_SOURCE {
            held.push(TcpStream::connect(gateway.plain).await.expect("connecting"));
        }
        if started.elapsed() < HEADER_TIMEOUT / 2 {
            break;
        }
        assert!(
            attempt < 3,
            "opening {PER_SOURCE} connections took over a second, 3 times"
        );
        drop(std::mem::take(&mut held));
        tokio::time::sleep(HEADER_TIMEOUT).await;
    }
    // The kernel completes the handshake; the gateway closes the socket at accept.
    let mut extra = TcpStream::connect(gateway.plain).await.expect("connecting");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "connection {} was not closed: {read:?}",
        PER_SOURCE + 1
    );
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = raw(gateway.plain, &raw_get("/api/x", "")).await;
    assert_eq!(status, 200, "a freed place is usable again: {text}");
    assert!(
        gateway.log_text().contains("connection refused"),
        "the refusal is logged"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    if !gateway_tests::require_root("shutdown_drains_in_flight_requests") {
        return;
    }
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start("drain", &upstream).await;
    let plain = gateway.plain;
    let in_flight = tokio::spawn(async move { raw(plain, &raw_get("/slow/x", "")).await });
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(plain).await.is_err(),
        "the listener still accepts after SIGTERM"
    );
    let (status, text) = in_flight.await.expect("the in-flight request task");
    assert_eq!(status, 200, "the in-flight request finished: {text}");
    assert_eq!(
        gateway.exited_within(Duration::from_secs(10)).await,
        Some(true),
        "the daemon exits cleanly after draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificates_are_served_without_dropping_connections() {
    if !gateway_tests::require_root("changed_certificates_are_served_without_dropping_connections")
    {
        return;
    }
    let upstream = Upstream::start().await;
    let gateway = Gateway::start("reload", &upstream).await;
    let (stream, before) = tls_connect(gateway.https, "api.test", b"h2").await;
    assert_eq!(before, gateway.certificates.api);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(get("https://api.test/api/before", "api.test"))
        .await
        .expect("a response before the reload");
    assert_eq!(response.status(), StatusCode::OK);

    // A broken file is ignored: the old certificate stays. The old connection is kept busy
    // meanwhile, so the idle timeout (3 s here) cannot be what closes it.
    fs::write(gateway.dir.0.join("api.key"), "not a key").expect("breaking the key");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let response = sender
            .send_request(get("https://api.test/api/during", "api.test"))
            .await
            .expect("a response on the old connection while the key is broken");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let (_, served) = tls_connect(gateway.https, "api.test", b"h2").await;
    assert_eq!(
        served, gateway.certificates.api,
        "the broken key was not loaded"
    );
    assert!(
        gateway.log_text().contains("cannot be used"),
        "the broken file is reported"
    );

    let renewed = write_certificate(&gateway.dir.0, "api", "api.test");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, served) = tls_connect(gateway.https, "api.test", b"h2").await;
        if served == renewed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let response = sender
            .send_request(get("https://api.test/api/waiting", "api.test"))
            .await
            .expect("a response on the old connection while the reload is pending");
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The connection opened before the reload still works.
    let response = sender
        .send_request(get("https://api.test/api/after", "api.test"))
        .await
        .expect("a response on the old connection after the reload");
    assert_eq!(response.status(), StatusCode::OK);
}

/// A certificate authority for the tests: its certificate as PEM, and the leaf certificates
/// (server or client) it issues.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate issued by a [`TestCa`], with its key.
struct Leaf {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("a CA key");
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    fn write(&self, path: &Path) {
        fs::write(path, self.issuer.pem()).expect("writing a CA certificate");
    }

    /// A leaf for `common_name` and `sans`, good for a TLS server (`server`) or client.
    fn issue(&self, common_name: &str, sans: Vec<rcgen::SanType>, server: bool) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a leaf certificate");
        Leaf {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Leaf {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        fs::write(&cert, &self.cert_pem).expect("writing a certificate");
        fs::write(&key, &self.key_pem).expect("writing a key");
        (cert, key)
    }

    fn key(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        use rustls_pki_types::pem::PemObject as _;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .expect("a PEM private key")
    }
}

fn dns(name: &str) -> rcgen::SanType {
    rcgen::SanType::DnsName(name.try_into().expect("an IA5 string"))
}

/// A TLS client config offering `alpn`, trusting any server certificate (these tests check
/// client certificates), presenting `client` when given.
fn client_config(alpn: &[u8], client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate));
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert.clone()], leaf.key())
            .expect("a usable client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// One HTTP/1.1 GET over TLS presenting `client` (or no certificate): the whole answer, or why
/// there was none (the handshake or the connection ended first). With TLS 1.3 a client sees
/// its certificate refused only after its handshake finished, at the first read.
async fn tls_get(addr: SocketAddr, client: Option<&Leaf>, path: &str) -> Result<String, String> {
    tls_get_with(addr, client, path, "").await
}

/// [`tls_get`] with `extra_headers` (`Name: value\r\n` lines) in the request.
async fn tls_get_with(
    addr: SocketAddr,
    client: Option<&Leaf>,
    path: &str,
    extra_headers: &str,
) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(client_config(b"http/1.1", client));
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let name = ServerName::try_from("api.test").expect("a server name");
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n{extra_headers}\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(|e| format!("writing: {e}"))?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    match read {
        Ok(_) if text.starts_with("HTTP/1.1 ") => Ok(text),
        Ok(_) => Err(format!("closed without an answer: {text:?}")),
        Err(e) => Err(format!("reading: {e}")),
    }
}

/// The `X-Request-Id` of a raw HTTP/1.1 answer.
fn raw_request_id(text: &str) -> String {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no x-request-id in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_listeners_require_or_accept_client_certificates() {
    if !gateway_tests::require_root("mtls_listeners_require_or_accept_client_certificates") {
        return;
    }
    let files = TempDir::new("mtls");
    let ca = TestCa::new("Gateway Test Client CA");
    ca.write(&files.0.join("clients-ca.crt"));
    let client = ca.issue(
        "billing-service",
        vec![rcgen::SanType::URI(
            "spiffe://acme.test/billing"
                .try_into()
                .expect("an IA5 string"),
        )],
        false,
    );
    // Issued by a CA the gateway does not trust.
    let rogue = TestCa::new("Rogue CA").issue("billing-service", Vec::new(), false);
    let (required, optional) = (free_port(), free_port());
    let toml = format!(
        r#"
[[listeners]]
name = "mtls-required"
address = "{required}"
routes = ["api"]
[listeners.tls]
self_signed = true
client_auth = {{ ca = "{ca}" }}

[[listeners]]
name = "mtls-optional"
address = "{optional}"
routes = ["api", "whoami"]
[listeners.tls]
self_signed = true
client_auth = {{ ca = "{ca}", mode = "optional" }}

# The certificate is the credential: its CN becomes the principal.
[[routes]]
name = "whoami"
path_prefix = "/whoami"
upstream = "app"
auth = ["mtls"]
"#,
        ca = files.0.join("clients-ca.crt").display(),
    );
    let upstream = Upstream::start().await;
    let gateway = Gateway::start_with(
        "mtls",
        &upstream,
        Extra {
            toml,
            listeners: vec![required, optional],
            ..Extra::default()
        },
    )
    .await;

    // Required: a certificate from the CA is served, and names the client in the access log.
    let text = tls_get(required, Some(&client), "/api/mtls")
        .await
        .unwrap_or_else(|e| panic!("a trusted client certificate was refused: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let line = gateway.access_line(&raw_request_id(&text)).await;
    assert_eq!(line["client_cert"], "billing-service", "{line}");
    assert_eq!(line["listener"], "mtls-required", "{line}");
    let hits = upstream.hits();
    for (who, leaf) in [
        ("no certificate", None),
        ("a rogue certificate", Some(&rogue)),
    ] {
        let refused = tls_get(required, leaf, "/api/mtls").await;
        assert!(refused.is_err(), "{who} was served: {refused:?}");
    }
    assert_eq!(
        upstream.hits(),
        hits,
        "refused clients never reach the upstream"
    );

    // Optional: no certificate is fine (no identity), a trusted one names the client, a rogue
    // one still fails the handshake.
    let text = tls_get(optional, None, "/api/mtls")
        .await
        .unwrap_or_else(|e| panic!("a client without a certificate was refused: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let line = gateway.access_line(&raw_request_id(&text)).await;
    assert!(line.get("client_cert").is_none(), "{line}");
    let text = tls_get(optional, Some(&client), "/api/mtls")
        .await
        .unwrap_or_else(|e| panic!("a trusted client certificate was refused: {e}"));
    let line = gateway.access_line(&raw_request_id(&text)).await;
    assert_eq!(line["client_cert"], "billing-service", "{line}");
    let refused = tls_get(optional, Some(&rogue), "/api/mtls").await;
    assert!(
        refused.is_err(),
        "a rogue certificate was served: {refused:?}"
    );

    // A route that authenticates by certificate: its name is the identity; none → 401.
    let text = tls_get(optional, Some(&client), "/whoami/x")
        .await
        .unwrap_or_else(|e| panic!("a trusted client certificate was refused: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let line = gateway.access_line(&raw_request_id(&text)).await;
    assert_eq!(line["identity"], "billing-service", "{line}");
    let text = tls_get(optional, None, "/whoami/x")
        .await
        .unwrap_or_else(|e| panic!("the optional listener refused a client: {e}"));
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");

    // The plain TLS listener asks for no certificate at all.
    let text = tls_get(gateway.https, None, "/api/mtls")
        .await
        .unwrap_or_else(|e| panic!("the public listener refused a client: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn basic_auth_checks_argon2_hashes_on_tls_listeners() {
    if !gateway_tests::require_root("basic_auth_checks_argon2_hashes_on_tls_listeners") {
        return;
    }
    use std::io::Write as _;
    let files = TempDir::new("basic");
    let users = files.0.join("basic-users");
    // The users file line comes from the CLI, as an operator would make it.
    let mut hashing = std::process::Command::new(gateway_bin())
        .args(["hash-password", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running `gateway hash-password`");
    hashing
        .stdin
        .take()
        .expect("its stdin")
        .write_all(b"correct horse\n")
        .expect("writing the password");
    let output = hashing.wait_with_output().expect("its output");
    assert!(output.status.success(), "hash-password failed");
    let line = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(line.starts_with("alice:$argon2id$"), "{line}");
    fs::write(&users, line.trim_end().to_owned() + ":orders:read\n").expect("users file");

    let legacy = free_port();
    let toml = format!(
        r#"
[[listeners]]
name = "legacy"
address = "{legacy}"
routes = ["legacy"]
[listeners.tls]
self_signed = true

[[routes]]
name = "legacy"
path_prefix = "/legacy/"
upstream = "app"
auth = ["basic"]

[auth.basic]
users_file = "{users}"
realm = "orders"
"#,
        users = users.display(),
    );
    let upstream = Upstream::start().await;
    let _gateway = Gateway::start_with(
        "basic",
        &upstream,
        Extra {
            toml,
            listeners: vec![legacy],
            ..Extra::default()
        },
    )
    .await;
    let basic = |user_password: &str| {
        use base64::Engine as _;
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    };

    let text = tls_get_with(
        legacy,
        None,
        "/legacy/orders",
        &basic("alice:correct horse"),
    )
    .await
    .unwrap_or_else(|e| panic!("the right password was refused: {e}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = upstream.last();
    assert_eq!(seen.headers["x-authenticated-principal"], "alice");
    assert_eq!(seen.headers["x-authenticated-method"], "basic");
    assert_eq!(seen.headers["x-authenticated-scopes"], "orders:read");
    assert!(
        seen.headers.get("authorization").is_none(),
        "the password stops at the gateway"
    );

    let hits = upstream.hits();
    for (who, headers) in [
        ("a wrong password", basic("alice:wrong")),
        ("an unknown user", basic("mallory:correct horse")),
        ("no credentials", String::new()),
    ] {
        let text = tls_get_with(legacy, None, "/legacy/orders", &headers)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert!(text.starts_with("HTTP/1.1 401"), "{who}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"orders\", charset=\"utf-8\""),
            "{who}: a 401 names the scheme and realm: {text}"
        );
    }
    assert_eq!(
        upstream.hits(),
        hits,
        "refused requests never reach the upstream"
    );
}

/// A TLS acceptor for a test upstream serving `leaf`, offering `h2` and `http/1.1`, and
/// requiring a client certificate from `clients` when given.
fn upstream_acceptor(leaf: &Leaf, clients: Option<&TestCa>) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(ca.issuer.der().clone())
                .expect("a CA certificate");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(vec![leaf.cert.clone()], leaf.key())
        .expect("a server certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_are_verified_and_can_require_a_client_certificate() {
    if !gateway_tests::require_root(
        "tls_upstreams_are_verified_and_can_require_a_client_certificate",
    ) {
        return;
    }
    let files = TempDir::new("upstream-tls");
    let ca = TestCa::new("Gateway Test Upstream CA");
    ca.write(&files.0.join("upstream-ca.crt"));
    TestCa::new("Some Other CA").write(&files.0.join("other-ca.crt"));
    let server = ca.issue(
        "upstream.test",
        vec![
            dns("upstream.test"),
            rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ],
        true,
    );
    let (client_cert, client_key) = ca.issue("gateway", Vec::new(), false).write(&files.0, "gw");
    let open = Upstream::start_with(Some(upstream_acceptor(&server, None))).await;
    let mutual = Upstream::start_with(Some(upstream_acceptor(&server, Some(&ca)))).await;
    let upstream = Upstream::start().await;

    let ca_file = files.0.join("upstream-ca.crt");
    let pool = |name: &str, addr: SocketAddr, protocol: &str, tls: String| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nendpoints = [\"{addr}\"]\nprotocol = \"{protocol}\"\ntls = {{ {tls} }}\n\
             [[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\nupstream = \"{name}\"\n"
        )
    };
    let trusted = format!(
        "ca = \"{}\", server_name = \"upstream.test\"",
        ca_file.display()
    );
    let with_cert = format!(
        "{trusted}, client_cert = \"{}\", client_key = \"{}\"",
        client_cert.display(),
        client_key.display()
    );
    let toml = [
        pool("tls-h1", open.addr, "http1", trusted.clone()),
        pool("tls-h2", open.addr, "h2", trusted.clone()),
        // No `server_name`: the endpoint's IP is asked for, and the certificate names it.
        pool(
            "by-ip",
            open.addr,
            "http1",
            format!("ca = \"{}\"", ca_file.display()),
        ),
        pool("mutual", mutual.addr, "http1", with_cert),
        pool("mutual-no-cert", mutual.addr, "h2", trusted.clone()),
        pool(
            "wrong-name",
            open.addr,
            "http1",
            format!(
                "ca = \"{}\", server_name = \"other.test\"",
                ca_file.display()
            ),
        ),
        pool(
            "untrusted",
            open.addr,
            "http1",
            format!(
                "ca = \"{}\", server_name = \"upstream.test\"",
                files.0.join("other-ca.crt").display()
            ),
        ),
    ]
    .concat();
    let gateway = Gateway::start_with(
        "upstream-tls",
        &upstream,
        Extra {
            toml,
            public_routes: vec![
                "tls-h1",
                "tls-h2",
                "by-ip",
                "mutual",
                "mutual-no-cert",
                "wrong-name",
                "untrusted",
            ],
            ..Extra::default()
        },
    )
    .await;

    for (path, version) in [
        ("/tls-h1/x", Version::HTTP_11),
        ("/tls-h2/x", Version::HTTP_2),
        ("/by-ip/x", Version::HTTP_11),
    ] {
        let text = tls_get(gateway.https, None, path)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        let seen = open.last();
        assert_eq!(seen.path, path);
        assert_eq!(seen.version, version, "{path}");
    }
    let text = tls_get(gateway.https, None, "/mutual/x")
        .await
        .unwrap_or_else(|e| panic!("/mutual/x: {e}"));
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the gateway's client certificate is accepted: {text}"
    );
    assert_eq!(mutual.last().path, "/mutual/x");

    // Without the client certificate, with a name the certificate lacks, or trusting another
    // CA: the upstream is never reached, and the client gets a bare 502.
    let (open_hits, mutual_hits) = (open.hits(), mutual.hits());
    for path in ["/mutual-no-cert/x", "/wrong-name/x", "/untrusted/x"] {
        let text = tls_get(gateway.https, None, path)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_problem(
            text.split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            &text,
            502,
        );
    }
    assert_eq!((open.hits(), mutual.hits()), (open_hits, mutual_hits));
}

/// A WebSocket server that answers each text message with `echo: <text>` and each binary
/// message with itself, and records the path and headers of each handshake.
async fn websocket_upstream() -> (SocketAddr, Arc<Mutex<Vec<(String, HeaderMap)>>>) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{Message, handshake::server};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the WebSocket upstream");
    let addr = listener.local_addr().expect("its address");
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                #[expect(
                    clippy::result_large_err,
                    reason = "tungstenite's handshake callback type, not ours to shape"
                )]
                let callback = |request: &server::Request, response: server::Response| {
                    record
                        .lock()
                        .expect("the handshake record")
                        .push((request.uri().path().to_owned(), request.headers().clone()));
                    Ok(response)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let answer = match message {
                        Message::Text(text) => Message::text(format!("echo: {text}")),
                        Message::Binary(data) => Message::Binary(data),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if socket.send(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled_to_the_upstream() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;

    if !gateway_tests::require_root("websocket_upgrades_are_tunnelled_to_the_upstream") {
        return;
    }
    let (ws_addr, handshakes) = websocket_upstream().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "[[upstreams]]\nname = \"ws\"\nendpoints = [\"{ws_addr}\"]\n\
         [[routes]]\nname = \"ws\"\npath_prefix = \"/ws/\"\nupstream = \"ws\"\n"
    );
    let gateway = Gateway::start_with(
        "websocket",
        &upstream,
        Extra {
            toml,
            public_routes: vec!["ws"],
            ..Extra::default()
        },
    )
    .await;

    let (stream, _) = tls_connect(gateway.https, "api.test", b"http/1.1").await;
    let (mut socket, response) = tokio_tungstenite::client_async("wss://api.test/ws/chat", stream)
        .await
        .unwrap_or_else(|e| panic!("the WebSocket handshake through the gateway failed: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("an ASCII request id")
        .to_owned();
    let started = Instant::now();
    for i in 0..3 {
        socket
            .send(Message::text(format!("hello {i}")))
            .await
            .expect("sending a text message");
        let answer = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("an echo within 5 s")
            .expect("the socket is open")
            .expect("a valid message");
        assert_eq!(answer, Message::text(format!("echo: hello {i}")));
    }
    // Large enough to span many TLS records and TCP segments on the way.
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    socket
        .send(Message::binary(big.clone()))
        .await
        .expect("sending a binary message");
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an echo within 5 s")
        .expect("the socket is open")
        .expect("a valid message");
    assert_eq!(answer.into_data().as_ref(), big.as_slice());
    eprintln!(
        "WebSocket: 4 echoes through the gateway in {:?}",
        started.elapsed()
    );
    socket.close(None).await.expect("closing the WebSocket");

    // A tunnel nobody uses is closed after the idle timeout, like any idle connection.
    let (stream, _) = tls_connect(gateway.https, "api.test", b"http/1.1").await;
    let (mut idle, _) = tokio_tungstenite::client_async("wss://api.test/ws/idle", stream)
        .await
        .unwrap_or_else(|e| panic!("the second WebSocket handshake failed: {e}"));
    let opened = Instant::now();
    let ended = tokio::time::timeout(IDLE_TIMEOUT * 3, idle.next()).await;
    let closed = opened.elapsed();
    assert!(
        matches!(ended, Ok(None | Some(Err(_)))),
        "the idle tunnel was still open after {closed:?}: {ended:?}"
    );
    assert!(
        closed >= IDLE_TIMEOUT - Duration::from_millis(100)
            && closed < IDLE_TIMEOUT + Duration::from_secs(2),
        "closed after {closed:?}; the idle timeout is {IDLE_TIMEOUT:?}"
    );

    let handshakes = handshakes.lock().expect("the handshake record").clone();
    let paths: Vec<_> = handshakes.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(paths, ["/ws/chat", "/ws/idle"], "what the upstream saw");
    let headers = &handshakes[0].1;
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers:?}");
    assert_eq!(headers["x-request-id"], request_id.as_str());
    let line = gateway.access_line(&request_id).await;
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["route"], "ws", "{line}");

    // Any other upgrade, notably h2c (request smuggling past the proxy), is not forwarded.
    let (status, text) = raw(
        gateway.plain,
        "GET /api/x HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last().headers;
    for header in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen.contains_key(header),
            "`{header}` was forwarded: {seen:?}"
        );
    }
}

/// A gRPC-style h2c upstream: answers at once with `application/grpc` headers, echoes each
/// request DATA frame as it arrives (so a client sees its first message answered before it
/// sends the second), then ends with trailers: `grpc-status: 0`, the request's `x-client-note`
/// trailer as `x-echo-note`, and whether it was asked with `te: trailers`.
async fn grpc_upstream() -> SocketAddr {
    use http_body_util::channel::Channel;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the gRPC upstream");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let (parts, mut body) = request.into_parts();
                    let (mut sender, answer) = Channel::<Bytes>::new(4);
                    tokio::spawn(async move {
                        let mut note = None;
                        while let Some(Ok(frame)) = body.frame().await {
                            match frame.into_data() {
                                Ok(data) => {
                                    if sender.send_data(data).await.is_err() {
                                        return;
                                    }
                                }
                                Err(frame) => {
                                    if let Ok(trailers) = frame.into_trailers() {
                                        note = trailers.get("x-client-note").cloned();
                                    }
                                }
                            }
                        }
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        if let Some(note) = note {
                            trailers.insert("x-echo-note", note);
                        }
                        let te = parts
                            .headers
                            .get("te")
                            .cloned()
                            .unwrap_or(http::HeaderValue::from_static("none"));
                        trailers.insert("x-saw-te", te);
                        let _ = sender.send_trailers(trailers).await;
                    });
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(answer)
                            .expect("a valid response"),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_both_ways_with_trailers_over_h2() {
    use http_body_util::channel::Channel;

    if !gateway_tests::require_root("grpc_streams_both_ways_with_trailers_over_h2") {
        return;
    }
    let grpc = grpc_upstream().await;
    let upstream = Upstream::start().await;
    let toml = format!(
        "[[upstreams]]\nname = \"grpc\"\nendpoints = [\"{grpc}\"]\nprotocol = \"h2c\"\n\
         [[routes]]\nname = \"grpc\"\npath_prefix = \"/echo.Echo/\"\nupstream = \"grpc\"\n"
    );
    let gateway = Gateway::start_with(
        "grpc",
        &upstream,
        Extra {
            toml,
            public_routes: vec!["grpc"],
            ..Extra::default()
        },
    )
    .await;

    let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
    let (mut client, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let (mut sender, body) = Channel::<Bytes>::new(1);
    let request = Request::post("https://api.test/echo.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("a valid request");
    let started = Instant::now();
    let sending = tokio::spawn(async move { client.send_request(request).await });
    sender
        .send_data(Bytes::from_static(b"message 0"))
        .await
        .expect("sending the first message");
    let response = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("response headers within 5 s, before the request body ended")
        .expect("the request task")
        .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut answer = response.into_body();
    let mut next_frame = async || {
        tokio::time::timeout(Duration::from_secs(5), answer.frame())
            .await
            .expect("a frame within 5 s")
            .expect("the response continues")
            .expect("a valid frame")
    };
    // Each message is echoed before the next is sent: nothing waits for the whole body.
    for i in 0..4 {
        if i > 0 {
            sender
                .send_data(Bytes::from(format!("message {i}")))
                .await
                .expect("sending a message");
        }
        let frame = next_frame().await;
        let data = frame
            .into_data()
            .expect("a DATA frame, not yet the trailers");
        assert_eq!(data, format!("message {i}"), "message {i} echoed");
    }
    let mut client_trailers = HeaderMap::new();
    client_trailers.insert("x-client-note", http::HeaderValue::from_static("bye"));
    sender
        .send_trailers(client_trailers)
        .await
        .expect("sending the request trailers");
    drop(sender);
    let trailers = next_frame()
        .await
        .into_trailers()
        .unwrap_or_else(|frame| panic!("trailers expected, got {frame:?}"));
    eprintln!(
        "gRPC-style stream: 4 echoes and trailers in {:?}",
        started.elapsed()
    );
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-echo-note"], "bye",
        "the request trailers reached the upstream"
    );
    assert_eq!(
        trailers["x-saw-te"], "trailers",
        "`te: trailers` is forwarded"
    );
    assert!(
        answer.frame().await.is_none(),
        "the trailers end the response"
    );
}

/// HTTP/2 frame types and flags the rapid-reset test writes and reads by hand: the point is
/// to send what no well-behaved client library would.
mod h2_frames {
    pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const RST_STREAM: u8 = 0x3;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const GOAWAY: u8 = 0x7;
    pub(super) const WINDOW_UPDATE: u8 = 0x8;
    pub(super) const END_HEADERS: u8 = 0x4;
    pub(super) const END_STREAM_AND_HEADERS: u8 = 0x1 | END_HEADERS;
    pub(super) const CANCEL: u32 = 0x8;
    pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("a small payload");
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    /// `GET https://api.test/api/x` in HPACK: static-table entries and literals without
    /// indexing, so every stream's block is the same bytes.
    pub(super) fn get_headers() -> Vec<u8> {
        let mut block = vec![0x82, 0x87];
        block.extend([0x04, 6]);
        block.extend(b"/api/x");
        block.extend([0x01, 8]);
        block.extend(b"api.test");
        block
    }
}

/// Floods one HTTP/2 connection to the gateway with `pair(stream_id)` for up to `burst`
/// streams, in batches, until the gateway closes it. Returns how many streams went out and the
/// GOAWAY's error code, if one came.
async fn h2_flood(
    addr: SocketAddr,
    burst: u32,
    pair: impl Fn(u32) -> Vec<u8>,
) -> (u32, Option<u32>) {
    use h2_frames::*;

    const BATCH: u32 = 50;
    let (stream, _) = tls_connect(addr, "api.test", b"h2").await;
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Reads frames until the gateway closes the connection; reports the GOAWAY error code.
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed_seen = Arc::clone(&closed);
    let watcher = tokio::spawn(async move {
        let mut goaway = None;
        let mut head = [0u8; 9];
        loop {
            if reader.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                break;
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                closed_seen.store(true, Ordering::SeqCst);
            }
        }
        closed_seen.store(true, Ordering::SeqCst);
        goaway
    });
    let mut opening = PREFACE.to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    writer
        .write_all(&opening)
        .await
        .expect("sending the preface");
    let mut sent = 0;
    while sent < burst && !closed.load(Ordering::SeqCst) {
        let batch: Vec<u8> = (sent..sent + BATCH).flat_map(|i| pair(2 * i + 1)).collect();
        if writer.write_all(&batch).await.is_err() {
            break;
        }
        sent += BATCH;
        // Gives the gateway's answer a chance to arrive between batches, as it would between
        // an attacker's packets.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let goaway = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the gateway closed the abusive connection within 10 s")
        .expect("the frame reader");
    (sent, goaway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_reset_floods_lose_their_connection_not_the_daemon() {
    use h2_frames::*;

    if !gateway_tests::require_root("http2_reset_floods_lose_their_connection_not_the_daemon") {
        return;
    }
    /// Streams opened and cancelled at most, per flood.
    const BURST: u32 = 10_000;
    let upstream = Upstream::start().await;
    // Protocol violations are handed to the abuse detector (the loopback client is a trusted
    // proxy here, so the verdict is logged as protected rather than enforced).
    let mut gateway = Gateway::start_with(
        "rapid-reset",
        &upstream,
        Extra {
            toml: "[[abuse.rules]]\nname = \"h2-abuse\"\nclasses = [\"protocol_error\"]\n\
                   threshold = 1\nwindow = \"1m\"\nban = \"1m\"\n"
                .to_owned(),
            ..Extra::default()
        },
    )
    .await;
    let headers = get_headers();

    // Rapid Reset (CVE-2023-44487): the client opens a stream and cancels it at once.
    let started = Instant::now();
    let (sent, goaway) = h2_flood(gateway.https, BURST, |stream| {
        let mut pair = frame(HEADERS, END_STREAM_AND_HEADERS, stream, &headers);
        pair.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        pair
    })
    .await;
    eprintln!(
        "rapid reset: {sent} of {BURST} streams sent before the gateway closed the connection \
         ({goaway:?}) after {:?}",
        started.elapsed()
    );
    assert!(
        sent < BURST,
        "the whole burst of {BURST} cancelled streams went through on one connection"
    );
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY with ENHANCE_YOUR_CALM, then the close"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.log_text().contains("rule=h2-abuse") {
        assert!(
            Instant::now() < deadline,
            "the reset flood did not reach the abuse detector:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // MadeYouReset (CVE-2025-8671): the client makes the server reset each stream, here with
    // a flow-control update that overflows the stream's window, a stream error. The streams
    // go to an unrouted path, so the flood costs the upstream nothing.
    let started = Instant::now();
    let mut unrouted = vec![0x83, 0x87, 0x04, 9];
    unrouted.extend(b"/nowhere/");
    unrouted.extend([0x01, 8]);
    unrouted.extend(b"api.test");
    let (sent, goaway) = h2_flood(gateway.https, BURST, |stream| {
        let mut pair = frame(HEADERS, END_HEADERS, stream, &unrouted);
        pair.extend(frame(
            WINDOW_UPDATE,
            0,
            stream,
            &0x7fff_ffffu32.to_be_bytes(),
        ));
        pair
    })
    .await;
    eprintln!(
        "made-you-reset: {sent} of {BURST} streams sent before the gateway closed the \
         connection ({goaway:?}) after {:?}",
        started.elapsed()
    );
    assert!(
        sent < BURST,
        "the whole burst of {BURST} server-reset streams went through on one connection"
    );
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "GOAWAY with ENHANCE_YOUR_CALM, then the close"
    );

    // The daemon is unharmed: it still runs and serves a new HTTP/2 connection.
    let child = gateway.process.as_mut().expect("the daemon");
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "the daemon exited after the floods"
    );
    let (stream, _) = tls_connect(gateway.https, "api.test", b"h2").await;
    let answer = send(stream, true, get("https://api.test/api/after", "api.test")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// The rapid-reset protection above lives in the `h2` crate: keep it at a version with both
/// mitigations, CVE-2023-44487 ("Rapid Reset", 0.3.22/0.4.0 on) and CVE-2025-8671
/// ("MadeYouReset", 0.4.11 on), whatever a future `cargo update` resolves.
#[test]
fn the_h2_crate_carries_the_reset_flood_fixes() {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let text =
        fs::read_to_string(&lock).unwrap_or_else(|e| panic!("reading `{}`: {e}", lock.display()));
    let versions: Vec<(u64, u64, u64)> = text
        .split("[[package]]")
        .filter(|package| package.contains("\nname = \"h2\"\n"))
        .filter_map(|package| {
            let version = package.split("\nversion = \"").nth(1)?.split('"').next()?;
            let mut parts = version.split('.').map(|part| part.parse::<u64>().ok());
            Some((parts.next()??, parts.next()??, parts.next()??))
        })
        .collect();
    assert!(!versions.is_empty(), "no `h2` package in Cargo.lock");
    for version in versions {
        assert!(
            version >= (0, 4, 11),
            "h2 {version:?} lacks the MadeYouReset fix (CVE-2025-8671); update it to 0.4.11 or later"
        );
    }
}
