//! The L7 gateway's part of the config file: listeners, routes, upstreams and the `[http]`
//! limits, with their documented defaults and the cross-reference checks between them.
//!
//! A config without `[[listeners]]` runs no L7 gateway at all (the XDP data plane and the admin
//! API still run), so configs written before the L7 gateway existed keep working.
use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::{cidr::Cidr, routing::path::normalize_path};

/// A socket the gateway accepts HTTP on, and the routes it serves there. Internal and public
/// routes are segmented by serving them on different listeners.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, shown in the access log.
    pub name: String,
    /// `IP:PORT` to bind, e.g. `0.0.0.0:443` or `[::]:443`.
    pub address: String,
    /// HTTPS when present; plain HTTP otherwise.
    pub tls: Option<TlsConfig>,
    /// On a plain listener: answer every request with a 308 redirect to the same URL over
    /// HTTPS instead of routing it. Default `false`.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// The HTTPS port redirects point to. Default 443 (then left out of the URL).
    pub redirect_port: Option<u16>,
    /// Names of the routes served here, tried in this order; the first match wins. A request
    /// that matches none is answered 404 by the gateway (deny by default).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are believed. Everyone else's are
    /// replaced with what the gateway saw. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
}

/// The certificates of an HTTPS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates chosen by SNI: exact names first, then `*.suffix` wildcards (one label).
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    /// Served when SNI is absent or matches no certificate. Without it (and without
    /// `self_signed`) such handshakes fail.
    pub default_certificate: Option<CertificateConfig>,
    /// Generate a self-signed certificate at start-up for `self_signed_names` and serve it as
    /// the default. For demos and tests: clients must skip verification (`curl -k`).
    #[serde(default)]
    pub self_signed: bool,
    /// Names (and IP addresses) the self-signed certificate is for. Default `["localhost"]`.
    #[serde(default = "default_self_signed_names")]
    pub self_signed_names: Vec<String>,
    /// How often certificate and key files are checked for changes; changed files are loaded
    /// without dropping connections, a broken new file is logged and the old one kept.
    /// Default 5 s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Client certificates (mTLS): checked against a CA bundle, `required` or `optional`.
    /// Default: none asked for.
    pub client_auth: Option<ClientAuthConfig>,
}

/// Client-certificate verification on an HTTPS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM file of the CA certificates that client certificates must chain to. Polled with the
    /// certificates (`reload_interval`) and swapped in when it changes.
    pub ca: PathBuf,
    /// Default `required`.
    #[serde(default)]
    pub mode: ClientAuthMode,
}

/// Whether a client must present a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// A handshake without a valid client certificate fails.
    #[default]
    Required,
    /// Clients without a certificate are served, without a certificate identity; one that
    /// presents a certificate the CA did not issue still fails the handshake.
    Optional,
}

fn default_self_signed_names() -> Vec<String> {
    vec!["localhost".to_owned()]
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(5)
}

/// A PEM certificate chain (leaf first), its PEM private key, and the SNI names it serves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `api.example.com` or `*.example.com`. Not needed for `default_certificate`.
    #[serde(default)]
    pub names: Vec<String>,
}

/// Which requests go to which upstream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// `api.example.com` (exact) or `*.example.com` (one label); any host when absent.
    pub host: Option<String>,
    /// Matches this path and everything below it. A prefix ending in `/` matches by string
    /// prefix; one without (`/api`) matches `/api` and `/api/...` but not `/apix`.
    pub path_prefix: Option<String>,
    /// Matches exactly this path. At most one of `path_prefix`, `path_exact` and `path_regex`;
    /// none matches any path.
    pub path_exact: Option<String>,
    /// Matches paths this regular expression matches in full (`/users/[0-9]+` does not match
    /// `/users/1/keys`), against the normalised path. Linear-time `regex` syntax: no
    /// backreferences or look-around.
    pub path_regex: Option<String>,
    /// Allowed methods (`GET`, `POST`, ...); any method when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Request headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The `[[upstreams]]` entry that serves this route.
    pub upstream: String,
    /// Time allowed from the request to the upstream's response headers; then 504.
    /// Default 30 s.
    #[serde(default = "default_route_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest request body, enforced while streaming; then 413. Default 1 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Remove `path_prefix` from the path before forwarding (`/api/users` → `/users`).
    /// Default `false`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Authorization rules (scopes, roles, claims, Cedar); none: the authorize phase is skipped.
    /// Credentials this route accepts, tried in order (`["jwt", "api_key"]`); `[]` makes it
    /// anonymous. Unset: `auth.default_route_auth`.
    #[serde(default)]
    pub auth: Option<Vec<crate::auth::Method>>,
    #[serde(default)]
    pub authz: Option<super::authz::RouteAuthzConfig>,
    /// Request validation (methods, content types, JSON Schema, OpenAPI); none: skipped.
    #[serde(default)]
    pub validate: Option<super::validate::RouteValidateConfig>,
    /// Rate limits and quotas, each counted by its own key (`[[routes.rate_limits]]`); a
    /// request over any of them gets 429. Default: none.
    #[serde(default)]
    pub rate_limits: Vec<super::ratelimit::RouteRateLimitConfig>,
    /// Cross-origin access for browsers; preflights are answered by the gateway. Default: none
    /// (browsers then refuse cross-origin calls that need CORS).
    #[serde(default)]
    pub cors: Option<super::cors::CorsConfig>,
    /// Serve GET and HEAD answers from memory while the upstream says they are fresh
    /// (`Cache-Control: max-age`/`s-maxage`); on authenticated routes each identity has its own
    /// entries. Default: off.
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
}

/// A route's response cache (`cache = {}` turns it on with these defaults).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCacheConfig {
    /// Answers with a larger (or unknown) `Content-Length` pass through uncached. Default 1 MiB.
    pub max_body_bytes: u64,
    /// Caps the freshness the upstream grants. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for RouteCacheConfig {
    fn default() -> Self {
        RouteCacheConfig {
            max_body_bytes: 1024 * 1024,
            max_ttl: Duration::from_secs(300),
        }
    }
}

fn default_route_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

/// How the gateway talks to an upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); needs `tls`.
    H2,
}

/// How a request picks one endpoint of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight through this gateway.
    LeastOutstanding,
}

/// A named pool of endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `IP:PORT` or `HOST:PORT` of each endpoint. A host name is resolved when the config is
    /// loaded (and again on each reload), and every address it resolves to is an endpoint; set
    /// `tls.server_name` for TLS upstreams named this way.
    pub endpoints: Vec<String>,
    /// `endpoints` as addresses, resolved once when the config is parsed.
    #[serde(skip)]
    addrs: Vec<SocketAddr>,
    /// Default `http1`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Default `round_robin`.
    #[serde(default)]
    pub balance: Balance,
    /// Time allowed to open a TCP connection to an endpoint (and, with `tls`, as long again
    /// for the handshake); then 502. Default 2 s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept for reuse. Default 90 s.
    #[serde(default = "default_upstream_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TLS to the endpoints (re-encryption). Default: plain TCP.
    pub tls: Option<UpstreamTlsConfig>,
    /// Active health checks: endpoints that fail them leave the rotation until they pass
    /// again. Unset: no probing (an endpoint that refuses a connection still sits out 2 s).
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive ejection: an endpoint whose answers fail this many times in a row (refused or
    /// broken connections, timeouts, 5xx) sits out `eject_for`.
    #[serde(default)]
    pub outlier: OutlierConfig,
}

/// Passive ejection of endpoints that keep failing live traffic.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint. Default 5.
    pub consecutive_failures: u32,
    /// How long an ejected endpoint sits out. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub eject_for: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            eject_for: Duration::from_secs(30),
        }
    }
}

/// `GET <path>` on every endpoint every `interval`; a 2xx within `timeout` is a pass.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub path: String,
    /// Default 5 s.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Default 2 s.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Passes in a row that bring an unhealthy endpoint back. Default 2.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failures in a row that take a healthy endpoint out. Default 3.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_healthy_threshold() -> u32 {
    2
}

fn default_unhealthy_threshold() -> u32 {
    3
}

/// How the gateway speaks TLS to an upstream's endpoints: whom it trusts, what it presents,
/// which name it asks for.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificates the endpoints' certificates must chain to. Default: the
    /// system bundle, [`SYSTEM_CA_BUNDLE`].
    pub ca: Option<PathBuf>,
    /// PEM certificate chain presented to endpoints that ask for one (mTLS to backends); needs
    /// `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Sent as SNI and checked against the endpoints' certificates, e.g. `api.internal`.
    /// Default: the endpoint's IP address (its certificate must then name that address).
    pub server_name: Option<String>,
}

/// Where Debian and its derivatives keep the system's trusted CA certificates.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl UpstreamTlsConfig {
    /// The CA bundle in force: the configured one or the system's.
    pub fn ca_path(&self) -> &std::path::Path {
        self.ca
            .as_deref()
            .unwrap_or(std::path::Path::new(SYSTEM_CA_BUNDLE))
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_upstream_idle() -> Duration {
    Duration::from_secs(90)
}

/// Protective limits of every listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Total bytes of request header names and values; then 431. Default 64 KiB. HTTP/2
    /// clients are told twice this as their header list limit, past which hyper refuses the
    /// stream before the pipeline sees it.
    pub max_header_bytes: usize,
    /// Number of request headers; then 431. Default 100.
    pub max_headers: usize,
    /// Length of the request target (path and query); then 414. Default 8 KiB.
    pub max_uri_bytes: usize,
    /// Time a client has to send a complete request head (slowloris), counted from accept and
    /// then from the first byte after each response; then the connection is closed. Also bounds
    /// the TLS handshake. Waiting between requests is `idle_timeout`'s business. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this long. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open client connections over all listeners; more are closed at accept. Default 10,000.
    pub max_connections: usize,
    /// Open client connections per source address; more are closed at accept. Default 256.
    pub max_connections_per_source: usize,
    /// HTTP/2 streams a client may have open at once. Default 100. (Reset floods are refused
    /// whatever this is: see `proxy::server`.)
    pub h2_max_concurrent_streams: u32,
    /// Response headers removed before answering. Default `Server`, `X-Powered-By`.
    pub strip_response_headers: Vec<String>,
    /// On shutdown, in-flight requests get this long to finish. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Memory for the response caches of all routes (bodies and headers); the least recently
    /// used answers make room. Default 64 MiB.
    pub cache_capacity_bytes: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_source: 256,
            h2_max_concurrent_streams: 100,
            strip_response_headers: vec!["server".to_owned(), "x-powered-by".to_owned()],
            shutdown_grace: Duration::from_secs(30),
            cache_capacity_bytes: 64 * 1024 * 1024,
        }
    }
}

impl ListenerConfig {
    /// The bind address; validation has checked that it parses.
    pub fn socket_addr(&self, key: &str) -> Result<SocketAddr, ConfigError> {
        self.address.parse().map_err(|_| {
            invalid(
                &format!("{key}.address"),
                format!(
                    "`{}` is not an `IP:PORT` address (e.g. `0.0.0.0:443` or `[::]:443`)",
                    self.address
                ),
            )
        })
    }
}

impl UpstreamConfig {
    /// The endpoint addresses, as [`UpstreamConfig::resolve`] found them when the config was
    /// parsed.
    pub fn endpoint_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Resolves `endpoints` (`key` names the upstream in errors) and keeps the addresses:
    /// `IP:PORT` as written, host names resolved now (all of their addresses, in the resolver's
    /// order); an address named twice is one endpoint.
    pub(super) fn resolve(&mut self, key: &str) -> Result<(), ConfigError> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let key = format!("{key}.endpoints[{i}]");
            if let Ok(addr) = endpoint.parse() {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
                continue;
            }
            let has_port = endpoint
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !has_port {
                return Err(invalid(
                    &key,
                    format!(
                        "`{endpoint}` is not `IP:PORT` or `HOST:PORT` (e.g. `10.0.0.5:8080` or `app.internal:8080`)"
                    ),
                ));
            }
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(endpoint.as_str())
                .map_err(|e| invalid(&key, format!("cannot resolve `{endpoint}`: {e}")))?;
            let before = addrs.len();
            for addr in resolved {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.len() == before {
                return Err(invalid(
                    &key,
                    format!("`{endpoint}` resolves to no address"),
                ));
            }
        }
        self.addrs = addrs;
        Ok(())
    }
}

/// A name for a listener, route or upstream: what the access log and references use.
fn check_name(key: &str, name: &str, seen: &mut HashSet<String>) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(
            &format!("{key}.name"),
            "use 1 to 64 letters, digits, `-`, `_` or `.`",
        ));
    }
    if !seen.insert(name.to_owned()) {
        return Err(invalid(
            &format!("{key}.name"),
            format!("`{name}` is used twice; names must be unique"),
        ));
    }
    Ok(())
}

/// `api.example.com` or `*.example.com`: lowercase DNS labels, a wildcard only as a whole first
/// label.
pub(crate) fn check_host_pattern(key: &str, host: &str) -> Result<(), ConfigError> {
    let rest = host.strip_prefix("*.").unwrap_or(host);
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !ok {
        return Err(invalid(
            key,
            format!(
                "`{host}` is not a host name: use lowercase names like `api.example.com`, or `*.example.com` for one label of any value"
            ),
        ));
    }
    Ok(())
}

fn check_path(key: &str, path: &str) -> Result<(), ConfigError> {
    match normalize_path(path) {
        Ok(normal) if normal == path => Ok(()),
        Ok(normal) => Err(invalid(
            key,
            format!(
                "`{path}` is not in normal form; requests are matched after normalisation, so write `{normal}`"
            ),
        )),
        Err(error) => Err(invalid(
            key,
            format!("`{path}` is not a valid path ({error}); paths start with `/`"),
        )),
    }
}

fn check_certificate(key: &str, certificate: &CertificateConfig) -> Result<(), ConfigError> {
    for (field, path) in [("cert", &certificate.cert), ("key", &certificate.key)] {
        if !path.is_file() {
            return Err(invalid(
                &format!("{key}.{field}"),
                format!(
                    "`{}` does not exist or is not a file; give the path of a PEM file",
                    path.display()
                ),
            ));
        }
    }
    crate::tls::load_certified_key(&certificate.cert, &certificate.key).map_err(|error| {
        invalid(
            key,
            format!(
                "{}; check that `cert` and `key` belong together",
                crate::lists::error_chain(&error)
            ),
        )
    })?;
    for (i, name) in certificate.names.iter().enumerate() {
        check_host_pattern(&format!("{key}.names[{i}]"), name)?;
    }
    Ok(())
}

/// A PEM CA bundle that gives at least one trust anchor.
fn check_ca(key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    crate::tls::load_ca_roots(path).map(drop).map_err(|error| {
        invalid(
            key,
            format!(
                "{}; give a PEM file of CA certificates",
                crate::lists::error_chain(&error)
            ),
        )
    })
}

fn check_upstream_tls(key: &str, upstream: &UpstreamConfig) -> Result<(), ConfigError> {
    let Some(tls) = &upstream.tls else {
        if upstream.protocol == UpstreamProtocol::H2 {
            return Err(invalid(
                &format!("{key}.protocol"),
                "`h2` is HTTP/2 over TLS: add a `tls` table, or use `h2c` for plaintext HTTP/2",
            ));
        }
        return Ok(());
    };
    let key = format!("{key}.tls");
    if upstream.protocol == UpstreamProtocol::H2c {
        return Err(invalid(
            &key,
            "`h2c` is plaintext HTTP/2: set `protocol = \"h2\"` for HTTP/2 over TLS",
        ));
    }
    if tls.ca.is_none() && !std::path::Path::new(SYSTEM_CA_BUNDLE).is_file() {
        return Err(invalid(
            &format!("{key}.ca"),
            format!("there is no system CA bundle at `{SYSTEM_CA_BUNDLE}`; give `ca`"),
        ));
    }
    check_ca(&format!("{key}.ca"), tls.ca_path())?;
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key_file)) => {
            crate::tls::load_certified_key(cert, key_file).map_err(|error| {
                invalid(
                    &format!("{key}.client_cert"),
                    format!(
                        "{}; give PEM files of a certificate and its key",
                        crate::lists::error_chain(&error)
                    ),
                )
            })?;
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                &format!("{key}.client_cert"),
                "give both `client_cert` and `client_key`, or neither",
            ));
        }
    }
    if let Some(name) = &tls.server_name
        && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err(invalid(
            &format!("{key}.server_name"),
            format!("`{name}` is not a DNS name or IP address"),
        ));
    }
    Ok(())
}

/// Checks every L7 section and the references between them.
pub(super) fn validate(
    listeners: &[ListenerConfig],
    routes: &[RouteConfig],
    upstreams: &[UpstreamConfig],
    http: &HttpConfig,
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let key = format!("upstreams[{i}]");
        check_name(&key, &upstream.name, &mut names)?;
        if upstream.endpoints.is_empty() {
            return Err(invalid(
                &format!("{key}.endpoints"),
                "list at least one `IP:PORT` endpoint",
            ));
        }
        if let Some(check) = &upstream.health_check {
            let key = format!("{key}.health_check");
            if !check.path.starts_with('/') || http::Uri::try_from(check.path.as_str()).is_err() {
                return Err(invalid(
                    &format!("{key}.path"),
                    "must be a path such as `/healthz`",
                ));
            }
            if check.interval < Duration::from_millis(100) || check.timeout > check.interval {
                return Err(invalid(
                    &format!("{key}.interval"),
                    "must be at least 100ms and no shorter than `timeout`",
                ));
            }
            if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
                return Err(invalid(&key, "thresholds must be at least 1"));
            }
        }
        if upstream.outlier.consecutive_failures == 0 || upstream.outlier.eject_for.is_zero() {
            return Err(invalid(
                &format!("{key}.outlier"),
                "`consecutive_failures` and `eject_for` must be above zero",
            ));
        }
        if upstream.connect_timeout.is_zero() {
            return Err(invalid(
                &format!("{key}.connect_timeout"),
                "must be longer than zero",
            ));
        }
        check_upstream_tls(&key, upstream)?;
    }

    let mut names = HashSet::new();
    for (i, route) in routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        check_name(&key, &route.name, &mut names)?;
        if let Some(host) = &route.host {
            check_host_pattern(&format!("{key}.host"), host)?;
        }
        match (&route.path_prefix, &route.path_exact, &route.path_regex) {
            (Some(prefix), None, None) => check_path(&format!("{key}.path_prefix"), prefix)?,
            (None, Some(exact), None) => check_path(&format!("{key}.path_exact"), exact)?,
            (None, None, Some(regex)) => {
                crate::routing::compile_path_regex(regex)
                    .map_err(|e| invalid(&format!("{key}.path_regex"), e))?;
            }
            (None, None, None) => {}
            _ => {
                return Err(invalid(
                    &key,
                    "set at most one of `path_prefix`, `path_exact` and `path_regex`",
                ));
            }
        }
        if route.strip_prefix && route.path_prefix.is_none() {
            return Err(invalid(
                &format!("{key}.strip_prefix"),
                "needs a `path_prefix` to strip",
            ));
        }
        for (j, method) in route.methods.iter().enumerate() {
            let token =
                !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
            if !token {
                return Err(invalid(
                    &format!("{key}.methods[{j}]"),
                    format!("`{method}` is not a method; write it in capitals, like `GET`"),
                ));
            }
        }
        for (name, value) in &route.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(invalid(
                    &format!("{key}.headers.{name}"),
                    "not a valid header name and value",
                ));
            }
        }
        if !upstreams.iter().any(|u| u.name == route.upstream) {
            return Err(invalid(
                &format!("{key}.upstream"),
                format!(
                    "no `[[upstreams]]` entry is named `{}`; add one or fix the name",
                    route.upstream
                ),
            ));
        }
        if route.timeout.is_zero() {
            return Err(invalid(
                &format!("{key}.timeout"),
                "must be longer than zero",
            ));
        }
        if let Some(cache) = &route.cache {
            if cache.max_ttl.is_zero() {
                return Err(invalid(
                    &format!("{key}.cache.max_ttl"),
                    "must be longer than zero",
                ));
            }
            if cache.max_body_bytes == 0 || cache.max_body_bytes > http.cache_capacity_bytes {
                return Err(invalid(
                    &format!("{key}.cache.max_body_bytes"),
                    "must be above zero and at most `http.cache_capacity_bytes`",
                ));
            }
        }
        if let Some(authz) = &route.authz {
            authz.validate(&format!("{key}.authz"))?;
        }
        if let Some(validate) = &route.validate {
            validate.validate(&format!("{key}.validate"), route)?;
        }
        super::ratelimit::validate(&key, &route.rate_limits)?;
        if let Some(cors) = &route.cors {
            super::cors::validate(&format!("{key}.cors"), cors)?;
        }
    }

    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, listener) in listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        check_name(&key, &listener.name, &mut names)?;
        let address = listener.socket_addr(&key)?;
        if !addresses.insert(address) {
            return Err(invalid(
                &format!("{key}.address"),
                format!("`{address}` is already used by another listener"),
            ));
        }
        for (j, route) in listener.routes.iter().enumerate() {
            if !routes.iter().any(|r| &r.name == route) {
                return Err(invalid(
                    &format!("{key}.routes[{j}]"),
                    format!("no `[[routes]]` entry is named `{route}`; add one or fix the name"),
                ));
            }
            if listener.routes[..j].contains(route) {
                return Err(invalid(
                    &format!("{key}.routes[{j}]"),
                    format!("`{route}` is listed twice"),
                ));
            }
        }
        if listener.redirect_to_https && !listener.routes.is_empty() {
            return Err(invalid(
                &format!("{key}.routes"),
                "a listener that redirects to HTTPS serves no routes; remove `routes` or `redirect_to_https`",
            ));
        }
        if listener.redirect_port.is_some() && !listener.redirect_to_https {
            return Err(invalid(
                &format!("{key}.redirect_port"),
                "only means something with `redirect_to_https = true`",
            ));
        }
        if listener.redirect_to_https && listener.tls.is_some() {
            return Err(invalid(
                &format!("{key}.redirect_to_https"),
                "only a plain HTTP listener can redirect to HTTPS; remove it or the `tls` table",
            ));
        }
        if let Some(tls) = &listener.tls {
            let key = format!("{key}.tls");
            for (j, certificate) in tls.certificates.iter().enumerate() {
                let key = format!("{key}.certificates[{j}]");
                check_certificate(&key, certificate)?;
                if certificate.names.is_empty() {
                    return Err(invalid(
                        &format!("{key}.names"),
                        "list the SNI names this certificate serves (or make it `default_certificate`)",
                    ));
                }
            }
            if let Some(certificate) = &tls.default_certificate {
                check_certificate(&format!("{key}.default_certificate"), certificate)?;
            }
            if tls.self_signed {
                if tls.default_certificate.is_some() {
                    return Err(invalid(
                        &format!("{key}.self_signed"),
                        "the self-signed certificate is the default; remove `default_certificate` or `self_signed`",
                    ));
                }
                if tls.self_signed_names.is_empty() {
                    return Err(invalid(
                        &format!("{key}.self_signed_names"),
                        "list at least one name, e.g. `localhost`",
                    ));
                }
            } else if tls.certificates.is_empty() && tls.default_certificate.is_none() {
                return Err(invalid(
                    &key,
                    "give `certificates`, a `default_certificate`, or `self_signed = true`",
                ));
            }
            if tls.reload_interval < Duration::from_secs(1) {
                return Err(invalid(
                    &format!("{key}.reload_interval"),
                    "must be at least 1s",
                ));
            }
            if let Some(client_auth) = &tls.client_auth {
                check_ca(&format!("{key}.client_auth.ca"), &client_auth.ca)?;
            }
        }
    }

    let limits = [
        (
            "http.max_header_bytes",
            http.max_header_bytes,
            1024,
            1 << 20,
        ),
        ("http.max_headers", http.max_headers, 8, 10_000),
        ("http.max_uri_bytes", http.max_uri_bytes, 64, 64 * 1024),
        ("http.max_connections", http.max_connections, 1, 10_000_000),
        (
            "http.max_connections_per_source",
            http.max_connections_per_source,
            1,
            10_000_000,
        ),
    ];
    for (key, value, min, max) in limits {
        if !(min..=max).contains(&value) {
            return Err(invalid(key, format!("must be between {min} and {max}")));
        }
    }
    if http.h2_max_concurrent_streams == 0 {
        return Err(invalid(
            "http.h2_max_concurrent_streams",
            "must be at least 1",
        ));
    }
    if http.header_read_timeout.is_zero() || http.idle_timeout.is_zero() {
        return Err(invalid(
            "http.header_read_timeout",
            "`header_read_timeout` and `idle_timeout` must be longer than zero",
        ));
    }
    for (i, name) in http.strip_response_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(
                &format!("http.strip_response_headers[{i}]"),
                format!("`{name}` is not a header name"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const BASE: &str = r#"
        [[upstreams]]
        name = "app"
        endpoints = ["127.0.0.1:8081", "[::1]:8082"]
        [[routes]]
        name = "api"
        path_prefix = "/api/"
        upstream = "app"
        [[listeners]]
        name = "public"
        address = "127.0.0.1:8443"
        routes = ["api"]
        [listeners.tls]
        self_signed = true
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text)
    }

    #[test]
    fn no_listeners_means_no_l7_and_defaults_are_documented() {
        let config = parse("").expect("an empty config");
        assert!(config.listeners.is_empty() && config.routes.is_empty());
        let http = &config.http;
        assert_eq!(http.max_header_bytes, 64 * 1024);
        assert_eq!(http.max_headers, 100);
        assert_eq!(http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(http.idle_timeout, Duration::from_secs(60));
        assert_eq!(http.h2_max_concurrent_streams, 100);
        assert_eq!(http.strip_response_headers, ["server", "x-powered-by"]);
    }

    #[test]
    fn endpoints_may_be_host_names_resolved_at_load() {
        let config = parse(&BASE.replace(
            "\"127.0.0.1:8081\"",
            "\"localhost:8081\", \"127.0.0.1:8081\"",
        ))
        .expect("`localhost` resolves through /etc/hosts");
        let addrs = config.upstreams[0].endpoint_addrs();
        let v4 = "127.0.0.1:8081".parse::<SocketAddr>().unwrap();
        assert_eq!(
            addrs.iter().filter(|a| **a == v4).count(),
            1,
            "an address named twice is one endpoint: {addrs:?}"
        );
    }

    #[test]
    fn a_full_l7_config_parses_with_route_and_upstream_defaults() {
        let config = parse(BASE).expect("the base config");
        let route = &config.routes[0];
        assert_eq!(route.timeout, Duration::from_secs(30));
        assert_eq!(route.max_body_bytes, 1024 * 1024);
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.protocol, UpstreamProtocol::Http1);
        assert_eq!(upstream.balance, Balance::RoundRobin);
        assert_eq!(upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(upstream.endpoint_addrs().len(), 2);
        let tls = config.listeners[0].tls.as_ref().expect("a TLS listener");
        assert_eq!(tls.self_signed_names, ["localhost"]);
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            (
                BASE.replace("routes = [\"api\"]", "routes = [\"api\", \"nope\"]"),
                "listeners[0].routes[1]",
            ),
            (
                BASE.replace("routes = [\"api\"]", "routes = [\"api\", \"api\"]"),
                "listeners[0].routes[1]",
            ),
            (BASE.replace("upstream = \"app\"", "upstream = \"gone\""), "routes[0].upstream"),
            (BASE.replace("127.0.0.1:8443", "localhost:8443"), "listeners[0].address"),
            (BASE.replace("127.0.0.1:8081", "app"), "upstreams[0].endpoints[0]"),
            (
                BASE.replace("path_prefix = \"/api/\"", "path_prefix = \"/api/../x\""),
                "routes[0].path_prefix",
            ),
            (
                BASE.replace("path_prefix = \"/api/\"", "path_prefix = \"/a\"\npath_exact = \"/b\""),
                "routes[0]",
            ),
            (
                BASE.replace("path_prefix = \"/api/\"", "path_prefix = \"/a\"\nhost = \"a.*.com\""),
                "routes[0].host",
            ),
            (
                BASE.replace("path_prefix = \"/api/\"", "path_prefix = \"/a\"\nmethods = [\"get\"]"),
                "routes[0].methods[0]",
            ),
            (BASE.replace("self_signed = true", "self_signed = false"), "listeners[0].tls"),
            (
                BASE.replace(
                    "self_signed = true",
                    "certificates = [{ cert = \"/nonexistent.crt\", key = \"/nonexistent.key\", names = [\"a.test\"] }]",
                ),
                "listeners[0].tls.certificates[0].cert",
            ),
            (
                format!("{BASE}\n[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:1\""),
                "listeners[1].name",
            ),
            (
                format!("{BASE}\n[[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:8443\""),
                "listeners[1].address",
            ),
            (format!("{BASE}\n[http]\nmax_headers = 0"), "http.max_headers"),
            (
                format!("{BASE}\n[http]\nstrip_response_headers = [\"bad header\"]"),
                "http.strip_response_headers[0]",
            ),
        ];
        for (text, key) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { key: got, message }) => {
                    assert_eq!(got, key, "{message}\n{text}");
                }
                other => panic!("expected an error for `{key}`, got {other:?}\n{text}"),
            }
        }
    }

    #[test]
    fn redirecting_is_for_plain_listeners_without_routes() {
        let text = BASE.replace("routes = [\"api\"]", "redirect_to_https = true");
        let err = parse(&text).expect_err("a TLS listener cannot redirect");
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "listeners[0].redirect_to_https"),
            "{err}"
        );
        let plain = format!(
            "{BASE}\n[[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\nredirect_to_https = true\nredirect_port = 8443"
        );
        parse(&plain).expect("a plain listener redirects");
        let with_routes = plain.replace(
            "redirect_port = 8443",
            "redirect_port = 8443\nroutes = [\"api\"]",
        );
        let err = parse(&with_routes).expect_err("a redirecting listener serves no routes");
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "listeners[1].routes"),
            "{err}"
        );
        let port_only = plain.replace("redirect_to_https = true\n", "");
        let err = parse(&port_only).expect_err("a redirect port without redirecting");
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "listeners[1].redirect_port"),
            "{err}"
        );
    }

    #[test]
    fn client_auth_needs_a_usable_ca_bundle() {
        let dir = std::env::temp_dir().join(format!("gateway-config-mtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("a CA");
        std::fs::write(dir.join("ca.crt"), ca.cert.pem()).expect("writing");
        std::fs::write(dir.join("not-a-ca.txt"), "hello").expect("writing");
        let with = |client_auth: &str| {
            BASE.replace(
                "self_signed = true",
                &format!("self_signed = true\nclient_auth = {client_auth}"),
            )
        };
        let required = format!("{{ ca = \"{}/ca.crt\" }}", dir.display());
        let config = parse(&with(&required)).expect("a CA bundle");
        let tls = config.listeners[0].tls.as_ref().expect("TLS");
        let client_auth = tls.client_auth.as_ref().expect("client_auth");
        assert_eq!(client_auth.mode, ClientAuthMode::Required, "the default");
        let optional = format!(
            "{{ ca = \"{}/ca.crt\", mode = \"optional\" }}",
            dir.display()
        );
        let config = parse(&with(&optional)).expect("optional mode");
        let tls = config.listeners[0].tls.as_ref().expect("TLS");
        assert_eq!(
            tls.client_auth.as_ref().map(|c| c.mode),
            Some(ClientAuthMode::Optional)
        );
        for bad in [
            "/nonexistent/ca.crt".to_owned(),
            format!("{}/not-a-ca.txt", dir.display()),
        ] {
            match parse(&with(&format!("{{ ca = \"{bad}\" }}"))) {
                Err(ConfigError::Invalid { key, message }) => {
                    assert_eq!(key, "listeners[0].tls.client_auth.ca", "{message}");
                    assert!(message.contains("CA certificates"), "{message}");
                }
                other => panic!("`{bad}` was accepted as a CA bundle: {other:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }

    #[test]
    fn upstream_tls_is_checked_against_the_protocol_and_its_files() {
        let dir = std::env::temp_dir().join(format!("gateway-config-utls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("a CA");
        std::fs::write(dir.join("ca.crt"), ca.cert.pem()).expect("writing");
        std::fs::write(dir.join("ca.key"), ca.signing_key.serialize_pem()).expect("writing");
        let ca = format!("ca = \"{}/ca.crt\"", dir.display());
        let with = |protocol: &str, tls: Option<&str>| {
            let tls = tls.map_or(String::new(), |tls| format!("\ntls = {{ {tls} }}"));
            BASE.replace(
                "endpoints = [\"127.0.0.1:8081\", \"[::1]:8082\"]",
                &format!("endpoints = [\"127.0.0.1:8081\"]\nprotocol = \"{protocol}\"{tls}"),
            )
        };
        let full = format!(
            "{ca}, client_cert = \"{0}/ca.crt\", client_key = \"{0}/ca.key\", server_name = \"api.internal\"",
            dir.display()
        );
        let config =
            parse(&with("h2", Some(&full))).expect("h2 over TLS with a client certificate");
        let tls = config.upstreams[0].tls.as_ref().expect("tls");
        assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
        assert_eq!(config.upstreams[0].protocol, UpstreamProtocol::H2);
        parse(&with("http1", Some(&ca))).expect("HTTP/1.1 over TLS");
        let cases = [
            (with("h2", None), "upstreams[0].protocol"),
            (with("h2c", Some(&ca)), "upstreams[0].tls"),
            (
                with("http1", Some("ca = \"/nonexistent.crt\"")),
                "upstreams[0].tls.ca",
            ),
            (
                with(
                    "http1",
                    Some(&format!("{ca}, client_cert = \"{}/ca.crt\"", dir.display())),
                ),
                "upstreams[0].tls.client_cert",
            ),
            (
                with(
                    "http1",
                    Some(&format!("{ca}, server_name = \"not a name\"")),
                ),
                "upstreams[0].tls.server_name",
            ),
        ];
        for (text, key) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { key: got, message }) => {
                    assert_eq!(got, key, "{message}\n{text}");
                }
                other => panic!("expected an error for `{key}`, got {other:?}\n{text}"),
            }
        }
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }

    #[test]
    fn mismatched_certificate_and_key_are_refused() {
        let dir = std::env::temp_dir().join(format!("gateway-config-l7-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("cert a");
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_owned()]).expect("cert b");
        std::fs::write(dir.join("a.crt"), a.cert.pem()).expect("writing");
        std::fs::write(dir.join("a.key"), a.signing_key.serialize_pem()).expect("writing");
        std::fs::write(dir.join("b.key"), b.signing_key.serialize_pem()).expect("writing");
        let with_key = |key: &str| {
            BASE.replace(
                "self_signed = true",
                &format!(
                    "certificates = [{{ cert = \"{0}/a.crt\", key = \"{0}/{key}\", names = [\"a.test\", \"*.a.test\"] }}]",
                    dir.display()
                ),
            )
        };
        parse(&with_key("a.key")).expect("a matching pair");
        let err = parse(&with_key("b.key")).expect_err("a mismatched pair");
        match err {
            ConfigError::Invalid { key, message } => {
                assert_eq!(key, "listeners[0].tls.certificates[0]");
                assert!(message.contains("belong together"), "{message}");
            }
            other => panic!("unexpected error: {other}"),
        }
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }
}
