//! Section 3: L7 throughput and latency. One upstream, one set of clients, one run: (a) the
//! clients straight to the upstream, (b) NGINX terminating TLS and proxying with keep-alive
//! upstream connections, (c) the gateway doing TLS, routing and proxying, (d) the gateway also
//! verifying a JWT (RS256 and ES256), asking Cedar and validating a 1 KB JSON body against a
//! schema. wrk drives HTTP/1.1, h2load HTTP/2; requests per second and p50/p99/p99.9 latency
//! are medians of the repetitions, which interleave the targets so drift hits them all alike.
//!
//! Everything runs on the loopback of one network namespace created here; configs, keys,
//! certificates and scripts live in a scratch folder; every process is stopped by its own pid.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use gateway_tests::netns::Netns;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::{
    Ctx,
    daemon::{
        Background, Daemon, Scratch, catching_panics, children_of, demo_upstream, rss_kib,
        wait_for_tcp,
    },
    report::{Chart, Section, Table, median},
};

/// NGINX as the tiny upstream: one worker answering `200 ok` from its config; HTTP/1.1 here,
/// prior-knowledge HTTP/2 (h2c) on the next port for h2load's direct runs.
const NGINX_UPSTREAM_H1: &str = "127.0.0.1:8081";
const NGINX_UPSTREAM_H2C: &str = "127.0.0.1:8082";
/// `gateway demo-upstream` as the other candidate (HTTP/1.1 and h2c on one port).
const DEMO_UPSTREAM: &str = "127.0.0.1:8091";
/// NGINX as the TLS-terminating reverse proxy (b).
const NGINX_PROXY: &str = "127.0.0.1:8443";
/// The gateway's TLS listener (c) and (d).
const GATEWAY_LISTENER: &str = "127.0.0.1:9443";
/// A second gateway with its verified-token cache off: (d) when every token is new.
const GATEWAY_LISTENER_UNCACHED: &str = "127.0.0.1:9444";
/// Audience and issuers of the (d) tokens.
const AUDIENCE: &str = "orders-api";
const ISSUER_RS256: &str = "https://rs256.issuer.bench/";
const ISSUER_ES256: &str = "https://es256.issuer.bench/";
/// Size of the (d) request body.
const BODY_BYTES: usize = 1024;

pub(crate) fn bench(ctx: &Ctx) -> Result<Section> {
    catching_panics(|| measure(ctx))
}

/// A load generator at a number of connections.
#[derive(Clone, Copy)]
enum Client {
    /// HTTP/1.1, one request in flight per connection.
    Wrk(usize),
    /// HTTP/2 (ALPN h2, or h2c for the direct runs), one stream in flight per connection.
    H2load(usize),
}

impl Client {
    fn label(self) -> String {
        match self {
            Client::Wrk(connections) => format!("wrk (HTTP/1.1), {connections} conns"),
            Client::H2load(connections) => format!("h2load (HTTP/2), {connections} conns"),
        }
    }

    fn short(self) -> String {
        match self {
            Client::Wrk(connections) => format!("wrk {connections}"),
            Client::H2load(connections) => format!("h2load {connections}"),
        }
    }
}

/// What a target is asked.
#[derive(Clone)]
enum Request {
    Get,
    /// The 1 KB JSON order with a bearer token.
    Post {
        token: String,
    },
}

/// What a target stands for in the comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Direct,
    NginxGet,
    GatewayGet,
    NginxPost,
    /// (d) with the default token cache: a client reuses its token, so after the first request
    /// the signature check is remembered.
    GatewayPost,
    /// (d) with `verified_token_cache = 0`: every request's signature is checked.
    GatewayPostUncached,
}

impl Role {
    /// The NGINX row this one is compared with: the same request.
    fn reference(self) -> Role {
        match self {
            Role::Direct | Role::NginxGet | Role::GatewayGet => Role::NginxGet,
            Role::NginxPost | Role::GatewayPost | Role::GatewayPostUncached => Role::NginxPost,
        }
    }
}

/// One thing being measured: where the clients send what.
struct Target {
    label: &'static str,
    role: Role,
    /// URL for wrk (HTTP/1.1) and for h2load (HTTP/2).
    h1_url: String,
    h2_url: String,
    request: Request,
}

/// One client run's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

impl Figures {
    fn median_of(runs: &[Figures]) -> Figures {
        let of = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Figures {
            rps: of(|r| r.rps),
            p50_ms: of(|r| r.p50_ms),
            p99_ms: of(|r| r.p99_ms),
            p999_ms: of(|r| r.p999_ms),
        }
    }

    fn latencies(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.p50_ms, self.p99_ms, self.p999_ms
        )
    }
}

/// The files every target shares: certificate, keys, tokens, policies, body, scripts.
struct Files {
    scratch: Scratch,
    cert: PathBuf,
    key: PathBuf,
    body: PathBuf,
    token_rs256: String,
    token_es256: String,
    /// A token whose scope does not allow the order, for the pre-flight check of (d).
    token_without_scope: String,
}

fn measure(ctx: &Ctx) -> Result<Section> {
    let seconds = if ctx.quick { 1 } else { 6 };
    let clients: Vec<Client> = if ctx.quick {
        vec![Client::Wrk(64), Client::Wrk(256), Client::H2load(64)]
    } else {
        vec![
            Client::Wrk(64),
            Client::Wrk(256),
            Client::H2load(64),
            Client::H2load(256),
        ]
    };
    let netns = Netns::new(&format!("bench-l7-{}", std::process::id()));
    let files = write_files()?;

    // The upstream: whichever tiny server answers faster, so it limits nobody.
    let nginx_upstream = start_nginx(
        &netns,
        &files.scratch,
        "nginx-upstream",
        &nginx_upstream_config(files.scratch.path()),
    )?;
    let mut demo_upstream = Background::spawn(
        "gateway demo-upstream",
        Some(&netns),
        demo_upstream(&ctx.gateway, DEMO_UPSTREAM),
    )?;
    for addr in [NGINX_UPSTREAM_H1, NGINX_UPSTREAM_H2C, DEMO_UPSTREAM] {
        wait_for_tcp(&netns, addr.parse()?, Duration::from_secs(10))?;
    }
    let get = |addr: &str| Target {
        label: "",
        role: Role::Direct,
        h1_url: format!("http://{addr}/hello"),
        h2_url: format!("http://{addr}/hello"),
        request: Request::Get,
    };
    eprintln!("   choosing the upstream");
    let upstream_rps = |addr| -> Result<f64> {
        Ok(load(&netns, &files, Client::Wrk(64), &get(addr), seconds)?.rps)
    };
    let nginx_upstream_rps = upstream_rps(NGINX_UPSTREAM_H1)?;
    let demo_upstream_rps = upstream_rps(DEMO_UPSTREAM)?;
    let nginx_is_faster = nginx_upstream_rps >= demo_upstream_rps;
    let (upstream_h1, upstream_h2c, upstream_name, _upstream_guard) = if nginx_is_faster {
        demo_upstream.stop()?;
        (
            NGINX_UPSTREAM_H1,
            NGINX_UPSTREAM_H2C,
            "NGINX (1 worker, `return 200`)",
            Some(nginx_upstream),
        )
    } else {
        drop(nginx_upstream);
        (
            DEMO_UPSTREAM,
            DEMO_UPSTREAM,
            "`gateway demo-upstream`",
            None,
        )
    };

    let nginx_proxy = start_nginx(
        &netns,
        &files.scratch,
        "nginx-proxy",
        &nginx_proxy_config(&files, upstream_h1),
    )?;
    let mut gateway = Daemon::new(&ctx.gateway, "l7")?;
    gateway.write_config(&gateway_config(&files, upstream_h1, GATEWAY_LISTENER, None))?;
    gateway.start(&netns)?;
    // The worst case of (d), every signature checked, costs a second daemon and more runs:
    // the full run only.
    let uncached = if ctx.quick {
        None
    } else {
        let mut daemon = Daemon::new(&ctx.gateway, "l7-nocache")?;
        daemon.write_config(&gateway_config(
            &files,
            upstream_h1,
            GATEWAY_LISTENER_UNCACHED,
            Some(0),
        ))?;
        daemon.start(&netns)?;
        wait_for_tcp(
            &netns,
            GATEWAY_LISTENER_UNCACHED.parse()?,
            Duration::from_secs(10),
        )?;
        Some(daemon)
    };
    for addr in [NGINX_PROXY, GATEWAY_LISTENER] {
        wait_for_tcp(&netns, addr.parse()?, Duration::from_secs(10))?;
    }
    let idle_rss = [nginx_rss(nginx_proxy.pid())?, rss_kib(gateway.pid()?)?];

    let target = |label, role, base: &str, path: &str, request: Request| Target {
        label,
        role,
        h1_url: format!("{base}{path}"),
        h2_url: format!("{base}{path}"),
        request,
    };
    let post = |token: &str| Request::Post {
        token: token.to_owned(),
    };
    let nginx = format!("https://{NGINX_PROXY}");
    let ours = format!("https://{GATEWAY_LISTENER}");
    let mut targets = vec![
        Target {
            label: "(a) direct to the upstream, GET",
            role: Role::Direct,
            h1_url: format!("http://{upstream_h1}/hello"),
            h2_url: format!("http://{upstream_h2c}/hello"),
            request: Request::Get,
        },
        target(
            "(b) NGINX, GET",
            Role::NginxGet,
            &nginx,
            "/hello",
            Request::Get,
        ),
        target(
            "(c) gateway, GET",
            Role::GatewayGet,
            &ours,
            "/hello",
            Request::Get,
        ),
        target(
            "(b) NGINX, POST 1 KB",
            Role::NginxPost,
            &nginx,
            "/orders",
            post(&files.token_rs256),
        ),
        target(
            "(d) gateway, POST 1 KB, JWT RS256",
            Role::GatewayPost,
            &ours,
            "/orders",
            post(&files.token_rs256),
        ),
        target(
            "(d) gateway, POST 1 KB, JWT ES256",
            Role::GatewayPost,
            &ours,
            "/orders",
            post(&files.token_es256),
        ),
    ];
    if uncached.is_some() {
        let base = format!("https://{GATEWAY_LISTENER_UNCACHED}");
        targets.push(target(
            "(d) RS256, no token cache",
            Role::GatewayPostUncached,
            &base,
            "/orders",
            post(&files.token_rs256),
        ));
        targets.push(target(
            "(d) ES256, no token cache",
            Role::GatewayPostUncached,
            &base,
            "/orders",
            post(&files.token_es256),
        ));
    }
    preflight(&netns, &files, &targets)?;

    // runs[target][client] = one Figures per repetition.
    let mut runs = vec![vec![Vec::new(); clients.len()]; targets.len()];
    for repetition in 1..=ctx.repetitions {
        eprintln!("   repetition {repetition} of {}", ctx.repetitions);
        for (c, client) in clients.iter().enumerate() {
            for (t, target) in targets.iter().enumerate() {
                let figures = load(&netns, &files, *client, target, seconds)
                    .with_context(|| format!("{} with {}", target.label, client.label()))?;
                runs[t][c].push(figures);
            }
        }
    }
    let loaded_rss = [nginx_rss(nginx_proxy.pid())?, rss_kib(gateway.pid()?)?];
    let results: Vec<Vec<Figures>> = runs
        .iter()
        .map(|per_client| per_client.iter().map(|r| Figures::median_of(r)).collect())
        .collect();

    drop(uncached);
    Ok(report(
        ctx,
        &Outcome {
            clients: &clients,
            targets: &targets,
            results: &results,
            seconds,
            upstream_name,
            candidates_rps: (nginx_upstream_rps, demo_upstream_rps),
            idle_rss,
            loaded_rss,
        },
    ))
}

/// The resident memory of NGINX: its master and its workers, summed (`(VmRSS, VmHWM)` KiB).
fn nginx_rss(master: u32) -> Result<(u64, u64)> {
    let mut total = rss_kib(master)?;
    for worker in children_of(master) {
        let (rss, peak) = rss_kib(worker)?;
        total.0 += rss;
        total.1 += peak;
    }
    Ok(total)
}

/// Certificate, JWT keys and tokens, Cedar schema and policies, JSON schema and body.
fn write_files() -> Result<Files> {
    let scratch = Scratch::new("l7")?;
    // One certificate (ECDSA P-256, rcgen's default) for NGINX and the gateway alike.
    let certificate =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .context("generating the benchmark's TLS certificate")?;
    let cert = scratch.write("tls.crt", certificate.cert.pem())?;
    let key = scratch.write("tls.key", certificate.signing_key.serialize_pem())?;

    let rs256 = signing_key(
        &scratch,
        "rs256",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )?;
    let es256 = signing_key(
        &scratch,
        "es256",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    )?;
    let token =
        |issuer: &str, algorithm: Algorithm, key_pem: &[u8], scope: &str| -> Result<String> {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let claims = json!({
                "iss": issuer,
                "aud": AUDIENCE,
                "sub": "bench-client",
                "scope": scope,
                "tenant": "acme",
                "iat": now,
                // The full run takes well under an hour.
                "exp": now + 3600,
            });
            let key = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(key_pem),
                _ => EncodingKey::from_ec_pem(key_pem),
            }
            .context("reading a freshly generated signing key")?;
            jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).context("signing a JWT")
        };
    let token_rs256 = token(
        ISSUER_RS256,
        Algorithm::RS256,
        &rs256,
        "orders:read orders:write",
    )?;
    let token_es256 = token(
        ISSUER_ES256,
        Algorithm::ES256,
        &es256,
        "orders:read orders:write",
    )?;
    let token_without_scope = token(ISSUER_ES256, Algorithm::ES256, &es256, "orders:read")?;

    scratch.write("gateway.cedarschema", CEDAR_SCHEMA)?;
    scratch.write("orders.cedar", CEDAR_POLICIES)?;
    scratch.write("order.schema.json", ORDER_SCHEMA)?;
    let body = scratch.write("order.json", order_body(BODY_BYTES))?;
    Ok(Files {
        scratch,
        cert,
        key,
        body,
        token_rs256,
        token_es256,
        token_without_scope,
    })
}

/// Generates a private key with `openssl genpkey ARGS` (PKCS#8 PEM) and its public key
/// (`<stem>.pub.pem`, what the gateway trusts); returns the private key.
fn signing_key(scratch: &Scratch, stem: &str, args: &[&str]) -> Result<Vec<u8>> {
    let private = scratch.join(&format!("{stem}.key.pem"));
    let public = scratch.join(&format!("{stem}.pub.pem"));
    let run = |command: &mut Command| -> Result<()> {
        let output = command
            .output()
            .context("running openssl to generate JWT keys: install the `openssl` package")?;
        ensure!(
            output.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    };
    run(Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&private))?;
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public))?;
    fs::read(&private).with_context(|| format!("reading `{}`", private.display()))
}

/// The gateway's entity model (see `gateway-userspace/src/authz/cedar.rs`), with the two
/// methods the benchmark uses.
const CEDAR_SCHEMA: &str = r#"namespace Gateway {
  entity Principal = {
    authenticated: Bool,
    auth_method: String,
    scopes: Set<String>,
    roles: Set<String>,
  } tags String;
  entity Route = {
    path: String,
    operation?: String,
  } tags String;
  type RequestContext = {
    source_ip: ipaddr,
    time: Long,
    tls: Bool,
    client_certificate: Bool,
    tls_version?: String,
    sni?: String,
  };
  action "GET", "POST" appliesTo {
    principal: Principal,
    resource: Route,
    context: RequestContext,
  };
}
"#;

/// A realistic small policy set: one permit and three forbids, all evaluated per request.
const CEDAR_POLICIES: &str = r#"@id("orders-write")
permit (principal, action == Gateway::Action::"POST", resource == Gateway::Route::"orders")
when { principal.authenticated && principal.scopes.contains("orders:write") && context.tls };

@id("tenant-acme-only")
forbid (principal, action, resource == Gateway::Route::"orders")
unless { principal.hasTag("tenant") && principal.getTag("tenant") == "acme" };

@id("no-documentation-networks")
forbid (principal, action, resource)
when { context.source_ip.isInRange(ip("192.0.2.0/24")) };

@id("tls-1.2-or-later")
forbid (principal, action, resource)
when { context has tls_version && context.tls_version == "TLSv1.0" };
"#;

/// What limits (c) and (d), from `perf` profiles of the gateway under this load; restated with
/// every run because the figures above are read against it.
const LIMITS: &str = "What limits the gateway here, from `perf record` of the daemon under wrk: \
per request it spends about twice NGINX's CPU (about 45 µs against 22 µs for a proxied GET on \
this machine, both including the kernel's loopback TCP work, which is half of the gateway's). \
The rest is hyper's HTTP/1 and HTTP/2 machinery on both sides, the hand-off between the \
connection task and the upstream connection task of hyper-util's pooled client (two tasks on a \
work-stealing scheduler, often on different cores, against NGINX's one event loop per worker), \
rustls record encryption, and allocation (malloc and copies are about 15%). (d) adds the \
policy work on the same cores: per request about 20 µs of Cedar (building the principal, route \
and context entities and checking them against the schema, then 4 policies), 18 µs of JSON \
parsing and Schema validation of the 1 KB body, and, only without the token cache, 250 µs \
(RS256) or 340 µs (ES256) of signature checking in jsonwebtoken's pure-Rust backend (the \
`aws_lc_rs` backend is faster but brings a C and CMake toolchain into the build; the \
verified-token cache makes this a once-per-token cost). `cargo bench -p gateway-userspace \
--bench phases` measures each phase on its own.\n";

/// The order the (d) route accepts (JSON Schema 2020-12).
const ORDER_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["customer", "lines"],
  "additionalProperties": false,
  "properties": {
    "customer": {
      "type": "object",
      "required": ["id", "email"],
      "additionalProperties": false,
      "properties": {
        "id": { "type": "integer", "minimum": 1 },
        "email": { "type": "string", "format": "email" }
      }
    },
    "lines": {
      "type": "array",
      "minItems": 1,
      "maxItems": 50,
      "items": {
        "type": "object",
        "required": ["sku", "quantity"],
        "additionalProperties": false,
        "properties": {
          "sku": { "type": "string", "pattern": "^[A-Z0-9-]{3,24}$" },
          "quantity": { "type": "integer", "minimum": 1, "maximum": 999 },
          "unit_price": { "type": "number", "exclusiveMinimum": 0 }
        }
      }
    },
    "comment": { "type": "string", "maxLength": 1000 }
  }
}
"#;

/// A valid order of exactly `size` bytes: order lines until close, then a padded comment.
fn order_body(size: usize) -> String {
    let mut lines = Vec::new();
    let render = |lines: &Vec<serde_json::Value>, comment: &str| {
        json!({
            "customer": { "id": 4711, "email": "buyer@example.com" },
            "lines": lines,
            "comment": comment,
        })
        .to_string()
    };
    for n in 0.. {
        let line =
            json!({ "sku": format!("SKU-{n:05}"), "quantity": n % 7 + 1, "unit_price": 9.5 });
        lines.push(line);
        if render(&lines, "").len() > size - 80 {
            break;
        }
    }
    let padding = size.saturating_sub(render(&lines, "").len());
    render(&lines, &"x".repeat(padding))
}

/// The top of an NGINX config: in the foreground (so the guard owns the master), with its pid
/// file, logs and temporary folders in the scratch folder, touching nothing of the system's.
fn nginx_preamble(dir: &Path, name: &str, workers: u32) -> String {
    let dir = dir.display();
    let mut temp_paths = String::new();
    for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(temp_paths, "  {kind}_temp_path {dir}/{name}-{kind};");
    }
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
{temp_paths}"#
    )
}

/// The tiny upstream: one worker, `200 ok` from the config, no log.
fn nginx_upstream_config(dir: &Path) -> String {
    let preamble = nginx_preamble(dir, "nginx-upstream", 1);
    format!(
        r#"{preamble}  access_log off;
  keepalive_requests 1000000;
  server {{
    listen {NGINX_UPSTREAM_H1};
    listen {NGINX_UPSTREAM_H2C} http2;
    location / {{ return 200 "ok\n"; }}
  }}
}}
"#
    )
}

/// (b): 2 workers, TLS 1.2/1.3 with the shared certificate, HTTP/2, keep-alive upstream
/// connections, an access log like the gateway's. `keepalive_requests` is raised because its
/// default (1,000) would make NGINX close client connections, and so pay TLS handshakes, that
/// the gateway keeps open.
fn nginx_proxy_config(files: &Files, upstream: &str) -> String {
    let dir = files.scratch.path();
    let preamble = nginx_preamble(dir, "nginx-proxy", 2);
    format!(
        r#"{preamble}  access_log {log};
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  upstream app {{
    server {upstream};
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen {NGINX_PROXY} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#,
        log = dir.join("nginx-proxy.access.log").display(),
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

/// Starts NGINX with `config` inside `netns`; the guard stops its master (which stops the
/// workers) by pid.
fn start_nginx(netns: &Netns, scratch: &Scratch, name: &str, config: &str) -> Result<Background> {
    let path = scratch.write(&format!("{name}.conf"), config)?;
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(scratch.path())
        .arg("-e")
        .arg(scratch.join(&format!("{name}.error.log")))
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut nginx = Background::spawn(&format!("NGINX ({name})"), Some(netns), command)?;
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = nginx.exited() {
        let log =
            fs::read_to_string(scratch.join(&format!("{name}.error.log"))).unwrap_or_default();
        bail!("NGINX ({name}) exited at start ({status}): {}", log.trim());
    }
    Ok(nginx)
}

/// (c) and (d) in one daemon: `/hello` only routes and proxies; `/orders` also authenticates
/// a JWT from one of two issuers, authorizes by scope and Cedar, and validates the body. The
/// connection limits are raised so that 256 connections from one address are allowed.
/// `verified_token_cache` overrides the default size of the verified-token cache.
fn gateway_config(
    files: &Files,
    upstream: &str,
    listener: &str,
    verified_token_cache: Option<u32>,
) -> String {
    let dir = files.scratch.path().display();
    let auth = verified_token_cache
        .map(|size| format!("[auth]\nverified_token_cache = {size}\n"))
        .unwrap_or_default();
    format!(
        r#"[xdp]
interfaces = []

[[listeners]]
name = "bench"
address = "{listener}"
routes = ["hello", "orders"]
[listeners.tls]
default_certificate = {{ cert = "{cert}", key = "{key}" }}

[[routes]]
name = "hello"
path_exact = "/hello"
methods = ["GET"]
upstream = "app"

[[routes]]
name = "orders"
path_exact = "/orders"
methods = ["POST"]
upstream = "app"
auth = ["jwt"]
authz = {{ scopes = {{ all_of = ["orders:write"] }}, cedar = true }}
[routes.validate]
methods = ["POST"]
content_types = ["application/json"]
json_schema = "{dir}/order.schema.json"
json_max_depth = 16

[[upstreams]]
name = "app"
endpoints = ["{upstream}"]
protocol = "http1"

[http]
max_connections = 20000
max_connections_per_source = 20000
shutdown_grace = "1s"

{auth}
[[auth.jwt]]
issuer = "{ISSUER_RS256}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256"]
pem_file = "{dir}/rs256.pub.pem"
required_claims = ["tenant"]

[[auth.jwt]]
issuer = "{ISSUER_ES256}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
pem_file = "{dir}/es256.pub.pem"
required_claims = ["tenant"]

[authz]
cedar_schema = "{dir}/gateway.cedarschema"
cedar_policies = ["{dir}/orders.cedar"]
"#,
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

/// Checks that every target answers 200, and that (d)'s checks are really on: no token is
/// 401, a token without the scope 403, a body the schema refuses 422. Otherwise the figures
/// would measure cheap refusals.
fn preflight(netns: &Netns, files: &Files, targets: &[Target]) -> Result<()> {
    for target in targets {
        for (url, http2) in [(&target.h1_url, false), (&target.h2_url, true)] {
            let code = curl(netns, files, url, http2, &target.request, None)?;
            ensure!(
                code == 200,
                "{} answered {code} to a {} request at {url}, not 200",
                target.label,
                if http2 { "HTTP/2" } else { "HTTP/1.1" }
            );
        }
    }
    let orders = format!("https://{GATEWAY_LISTENER}/orders");
    let checks = [
        (
            Request::Post {
                token: String::new(),
            },
            None,
            401,
            "without a token",
        ),
        (
            Request::Post {
                token: files.token_without_scope.clone(),
            },
            None,
            403,
            "with a token lacking `orders:write`",
        ),
        (
            Request::Post {
                token: files.token_es256.clone(),
            },
            Some(r#"{"customer":{"id":0,"email":"x"},"lines":[]}"#),
            422,
            "with a body the schema refuses",
        ),
    ];
    for (request, body, expected, what) in checks {
        let code = curl(netns, files, &orders, false, &request, body)?;
        ensure!(
            code == expected,
            "the gateway answered {code} to a POST {what}, not {expected}: is the (d) route \
             configured as intended?"
        );
    }
    Ok(())
}

/// One request with curl from inside `netns`; its status code. A POST sends `body`, or the
/// 1 KB order when `None`.
fn curl(
    netns: &Netns,
    files: &Files,
    url: &str,
    http2: bool,
    request: &Request,
    body: Option<&str>,
) -> Result<u16> {
    let mut command = Command::new("curl");
    command.args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ]);
    command.arg(if http2 {
        if url.starts_with("https") {
            "--http2"
        } else {
            "--http2-prior-knowledge"
        }
    } else {
        "--http1.1"
    });
    if let Request::Post { token } = request {
        command.args(["-X", "POST", "-H", "content-type: application/json"]);
        if !token.is_empty() {
            command.args(["-H", &format!("authorization: Bearer {token}")]);
        }
        match body {
            Some(body) => command.args(["--data-binary", body]),
            None => command
                .arg("--data-binary")
                .arg(format!("@{}", files.body.display())),
        };
    }
    command.arg(url);
    let output = output_in(netns, command, "curl")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("curl printed no status for {url}: {text}"))
}

/// Runs `command` to completion inside `netns` and returns its output, whatever its exit status:
/// the callers judge by what it printed. `package` is what provides the program.
fn output_in(netns: &Netns, mut command: Command, package: &str) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    netns
        .run(move || command.output())
        .with_context(|| format!("running {program} (install {package})"))
}

/// One client run against `target` for `seconds`.
fn load(
    netns: &Netns,
    files: &Files,
    client: Client,
    target: &Target,
    seconds: u64,
) -> Result<Figures> {
    match client {
        Client::Wrk(connections) => wrk(netns, files, connections, target, seconds),
        Client::H2load(connections) => h2load(netns, files, connections, target, seconds),
    }
}

/// The Lua script wrk runs: the request, and a `done` hook that prints one line of figures
/// (wrk itself prints no p99.9).
fn wrk_script(files: &Files, request: &Request) -> Result<String> {
    let mut script = String::new();
    if let Request::Post { token } = request {
        let body = fs::read_to_string(&files.body).context("reading the request body")?;
        let _ = write!(
            script,
            "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        );
    }
    script.push_str(
        "done = function(summary, latency, requests)\n  local e = summary.errors\n  \
         io.write(string.format(\"BENCH %d %d %d %d %.1f %.1f %.1f\\n\", summary.requests, \
         summary.duration, e.status, e.connect + e.read + e.write + e.timeout, \
         latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))\nend\n",
    );
    Ok(script)
}

fn wrk(
    netns: &Netns,
    files: &Files,
    connections: usize,
    target: &Target,
    seconds: u64,
) -> Result<Figures> {
    let script = files
        .scratch
        .write("wrk.lua", wrk_script(files, &target.request)?)?;
    let mut command = Command::new("wrk");
    command
        .args(["-t", "2", "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(&target.h1_url);
    let output = output_in(netns, command, "wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("BENCH "))
        .with_context(|| {
            format!(
                "wrk printed no figures: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected wrk figures `{line}`"))?;
    let [
        requests,
        duration_us,
        status_errors,
        _socket_errors,
        p50,
        p99,
        p999,
    ] = fields[..]
    else {
        bail!("unexpected wrk figures `{line}`");
    };
    ensure!(
        status_errors == 0.0,
        "{status_errors} of {requests} answers were not 2xx/3xx"
    );
    ensure!(requests > 0.0, "no request completed");
    Ok(Figures {
        rps: requests / (duration_us / 1e6),
        p50_ms: p50 / 1000.0,
        p99_ms: p99 / 1000.0,
        p999_ms: p999 / 1000.0,
    })
}

fn h2load(
    netns: &Netns,
    files: &Files,
    connections: usize,
    target: &Target,
    seconds: u64,
) -> Result<Figures> {
    let log = files.scratch.join("h2load.log");
    let _ = fs::remove_file(&log);
    let mut command = Command::new("h2load");
    command
        .args(["-t", "2", "-m", "1", "-c", &connections.to_string()])
        .args(["-D", &seconds.to_string(), "--warm-up-time", "0"])
        .arg(format!("--log-file={}", log.display()));
    if let Request::Post { token } = &target.request {
        command
            .arg("-d")
            .arg(&files.body)
            .args(["-H", "content-type: application/json"])
            .args(["-H", &format!("authorization: Bearer {token}")]);
    }
    command.arg(&target.h2_url);
    let output = output_in(netns, command, "nghttp2-client")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rps = stdout
        .lines()
        .find_map(|line| line.strip_prefix("finished in "))
        .and_then(|rest| rest.split(", ").nth(1))
        .and_then(|rate| rate.strip_suffix(" req/s"))
        .and_then(|rate| rate.parse::<f64>().ok())
        .with_context(|| format!("h2load printed no rate: {}", stdout.trim()))?;
    let status_line = stdout
        .lines()
        .find(|line| line.starts_with("status codes:"))
        .unwrap_or_default();
    let refused: u64 = status_line
        .split(',')
        .filter(|part| part.contains("4xx") || part.contains("5xx"))
        .filter_map(|part| part.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
        .sum();
    ensure!(refused == 0, "h2load got error answers: {status_line}");
    let mut latencies_us: Vec<f64> = fs::read_to_string(&log)
        .with_context(|| format!("reading h2load's request log `{}`", log.display()))?
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    ensure!(!latencies_us.is_empty(), "h2load logged no request");
    latencies_us.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        let rank = ((q / 100.0) * latencies_us.len() as f64).ceil() as usize;
        latencies_us[rank.clamp(1, latencies_us.len()) - 1] / 1000.0
    };
    Ok(Figures {
        rps,
        p50_ms: percentile(50.0),
        p99_ms: percentile(99.0),
        p999_ms: percentile(99.9),
    })
}

/// What the measured run saw, for the report.
struct Outcome<'a> {
    clients: &'a [Client],
    targets: &'a [Target],
    /// Median figures, `[target][client]`.
    results: &'a [Vec<Figures>],
    seconds: u64,
    upstream_name: &'a str,
    /// Direct requests/s of the two upstream candidates: NGINX, `gateway demo-upstream`.
    candidates_rps: (f64, f64),
    /// `(VmRSS, VmHWM)` KiB of NGINX and the gateway, idle and after the runs.
    idle_rss: [(u64, u64); 2],
    loaded_rss: [(u64, u64); 2],
}

impl Outcome<'_> {
    /// The figures of every target with `role`, for client `c`.
    fn of(&self, role: Role, c: usize) -> impl Iterator<Item = (&Target, Figures)> {
        self.targets
            .iter()
            .zip(self.results)
            .filter(move |(target, _)| target.role == role)
            .map(move |(target, figures)| (target, figures[c]))
    }

    /// The figures of the NGINX row with `role`, for client `c`.
    fn nginx(&self, role: Role, c: usize) -> Figures {
        self.of(role, c).next().map(|(_, f)| f).unwrap_or_default()
    }
}

fn report(ctx: &Ctx, outcome: &Outcome<'_>) -> Section {
    let Outcome {
        clients,
        targets,
        results,
        seconds,
        upstream_name,
        candidates_rps: (nginx_upstream_rps, demo_upstream_rps),
        idle_rss,
        loaded_rss,
    } = outcome;
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "One network namespace, everything on its loopback; clients, proxies and upstream share \
         this machine's cores. Upstream for every row: {upstream_name}, chosen in this run as \
         the faster tiny server (wrk, 64 connections, direct: NGINX `return 200` \
         {nginx_upstream_rps:.0} req/s, `gateway demo-upstream` {demo_upstream_rps:.0} req/s). \
         (a) is plain HTTP (h2c for h2load), the ceiling; (b) NGINX with 2 workers, TLS 1.2/1.3 \
         with the same ECDSA P-256 certificate as the gateway, HTTP/2, upstream keep-alive, \
         access log to a file, `keepalive_requests` raised so it keeps client connections open \
         as the gateway does; (c) the gateway (release build, access log to a file) routing and \
         proxying over HTTP/1.1 keep-alive; (d) the gateway verifying a JWT (RS256 or ES256 \
         issuer), requiring a scope, deciding with 4 Cedar policies and validating the 1 KB \
         JSON body against a JSON Schema. Each client reuses one token, as real clients do \
         until it expires, so with the default `verified_token_cache` only the first request \
         per token pays the signature check{}. NGINX's POST row proxies the same 1 KB request \
         without checking it: (d)'s ratio is to NGINX doing that request's transport work. \
         Before the runs every target answered 200, and the gateway answered 401 without a \
         token, 403 without the scope and 422 to an invalid body. Each figure is the median of \
         {} runs of {seconds} s; the runs interleave the targets. wrk and h2load use 2 threads \
         and one request in flight per connection.\n",
        if targets.iter().any(|t| t.role == Role::GatewayPostUncached) {
            "; the \"no token cache\" rows come from a second daemon with \
             `verified_token_cache = 0`, where every request does"
        } else {
            " (the full run adds rows with the cache off)"
        },
        ctx.repetitions
    );

    // Goals, per client and connection count.
    let mut goal_c = Vec::new();
    let mut goal_d = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let nginx = outcome.nginx(Role::NginxGet, c);
        for (_, gateway) in outcome.of(Role::GatewayGet, c) {
            let ratio = gateway.rps / nginx.rps;
            let met = ratio >= 1.0 && gateway.p99_ms <= nginx.p99_ms;
            goal_c.push(format!(
                "{}: {ratio:.2}x, p99 {:.2} vs {:.2} ms → **{}**",
                client.short(),
                gateway.p99_ms,
                nginx.p99_ms,
                if met { "met" } else { "missed" }
            ));
        }
        let nginx_post = outcome.nginx(Role::NginxPost, c).rps;
        let ratios: Vec<f64> = outcome
            .of(Role::GatewayPost, c)
            .map(|(_, f)| f.rps / nginx_post)
            .collect();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        goal_d.push(format!(
            "{}: {} (RS256 / ES256) → **{}**",
            client.short(),
            shown.join(" / "),
            if ratios.iter().all(|r| *r >= 0.8) {
                "met"
            } else {
                "missed"
            }
        ));
    }
    let _ = writeln!(
        summary,
        "Goal (c), ≥ 1.0x NGINX requests/s with p99 no worse: {}.\n",
        goal_c.join("; ")
    );
    let _ = writeln!(
        summary,
        "Goal (d), ≥ 0.8x NGINX requests/s on the same request (default token cache): {}.\n",
        goal_d.join("; ")
    );
    summary.push_str(LIMITS);
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let _ = writeln!(
        summary,
        "Memory: NGINX (master + 2 workers) {} idle, {} after the runs (peak {}); the gateway \
         {} idle, {} after the runs (peak {}).",
        mib(idle_rss[0].0),
        mib(loaded_rss[0].0),
        mib(loaded_rss[0].1),
        mib(idle_rss[1].0),
        mib(loaded_rss[1].0),
        mib(loaded_rss[1].1),
    );

    let client_labels: Vec<String> = clients.iter().map(|c| c.short()).collect();
    let mut header = vec!["target"];
    header.extend(client_labels.iter().map(String::as_str));
    let mut throughput = Table::new(
        "Requests per second (median), and in brackets the ratio to NGINX on the same request \
         (GET or the 1 KB POST):",
        &header,
    );
    let mut latency = Table::new(
        "Latency p50 / p99 / p99.9 in ms (medians of the runs):",
        &header,
    );
    for (t, target) in targets.iter().enumerate() {
        let mut rps_row = vec![target.label.to_owned()];
        let mut latency_row = vec![target.label.to_owned()];
        for (c, figures) in results[t].iter().enumerate() {
            let reference = outcome.nginx(target.role.reference(), c).rps;
            rps_row.push(if target.role == target.role.reference() {
                format!("{:.0}", figures.rps)
            } else {
                format!("{:.0} ({:.2}x)", figures.rps, figures.rps / reference)
            });
            latency_row.push(figures.latencies());
        }
        throughput.row(rps_row);
        latency.row(latency_row);
    }
    let mut memory = Table::new(
        "Resident memory (VmRSS; NGINX is master + workers):",
        &["process", "idle", "after the runs", "peak (VmHWM)"],
    );
    for (i, name) in ["NGINX (b)", "gateway (c) + (d)"].iter().enumerate() {
        memory.row(vec![
            (*name).to_owned(),
            mib(idle_rss[i].0),
            mib(loaded_rss[i].0),
            mib(loaded_rss[i].1),
        ]);
    }

    let series = |pick: fn(&Figures) -> f64| {
        targets
            .iter()
            .enumerate()
            .map(|(t, target)| {
                (
                    target.label.to_owned(),
                    results[t].iter().map(pick).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    let charts = vec![
        Chart {
            file: "l7-throughput.png".to_owned(),
            title: "L7 requests per second (median)".to_owned(),
            y_label: "requests/s".to_owned(),
            labels: client_labels.clone(),
            series: series(|f| f.rps),
            log_scale: false,
        },
        Chart {
            file: "l7-p99.png".to_owned(),
            title: "L7 p99 latency (median of runs)".to_owned(),
            y_label: "ms".to_owned(),
            labels: client_labels,
            series: series(|f| f.p99_ms),
            log_scale: false,
        },
    ];
    Section {
        summary,
        tables: vec![throughput, latency, memory],
        charts,
    }
}
