//! The access log: one JSON line per request, on the daemon's log output with
//! `"target":"access"` (and the same `timestamp`/`level`/`message` keys as its other lines).
//! Written when the response body has been sent or abandoned, so bytes and latency cover the
//! whole exchange.
//!
//! The line is serialised here, straight into a buffer, and handed to the daemon's log writer
//! thread ([`install`]): going through `tracing`'s JSON formatter field by field cost a quarter
//! of the proxy's throughput. `RUST_LOG` still decides: with target `access` below INFO, no line
//! is written.
//!
//! Redaction: request and response headers are never logged (so `Authorization`, `Cookie`,
//! `Set-Cookie` and API-key headers cannot leak), except `User-Agent`; the values of token-like
//! query parameters are replaced with `REDACTED`.
use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use serde::Serialize;

/// Where access lines go: the daemon's log writer, once [`install`]ed; standard error before.
static SINK: OnceLock<tracing_appender::non_blocking::NonBlocking> = OnceLock::new();

/// Sends access lines to `writer` (the daemon's log writer thread) from now on.
pub fn install(writer: tracing_appender::non_blocking::NonBlocking) {
    let _ = SINK.set(writer);
}

/// Query parameters whose values are secrets by convention.
const SECRET_PARAMS: [&str; 12] = [
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "key",
    "signature",
    "sig",
    "password",
    "secret",
    "client_secret",
];

/// Everything one access-log line says, filled in as the request goes through the phases.
#[derive(Debug)]
pub(crate) struct AccessRecord {
    pub(crate) started: Instant,
    pub(crate) request_id: String,
    pub(crate) peer: SocketAddr,
    /// The client the request acts for: the peer, or behind a trusted proxy the address it
    /// forwarded. Rate limits and abuse detection key on it.
    pub(crate) client: std::net::IpAddr,
    pub(crate) listener: Arc<str>,
    pub(crate) tls_version: Option<&'static str>,
    pub(crate) alpn: Option<&'static str>,
    /// The verified client certificate's name (mTLS listeners).
    pub(crate) client_cert: Option<String>,
    pub(crate) http_version: &'static str,
    pub(crate) method: String,
    /// Path and query as the client sent them, secrets redacted.
    pub(crate) target: String,
    pub(crate) host: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) route: Option<String>,
    pub(crate) upstream: Option<SocketAddr>,
    /// Set by the authentication phase once it knows who the client is.
    pub(crate) identity: Option<String>,
    /// `hit` or `miss` on routes with a response cache.
    pub(crate) cache: Option<&'static str>,
    pub(crate) status: u16,
    /// The problem slug when the gateway answered with an error.
    pub(crate) error: Option<&'static str>,
    /// Request body bytes read so far; shared with the body wrapper that counts them.
    pub(crate) bytes_in: Arc<AtomicU64>,
    pub(crate) bytes_out: u64,
}

/// One access-log line, in the order its keys are written.
#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    request_id: &'a str,
    source: SocketAddr,
    client: std::net::IpAddr,
    listener: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alpn: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert: Option<&'a str>,
    http_version: &'static str,
    method: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    bytes_in: u64,
    bytes_out: u64,
    latency_ms: f64,
    target: &'static str,
}

impl AccessRecord {
    pub(crate) fn emit(&self) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let line = Line {
            timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            level: "INFO",
            message: "request",
            request_id: &self.request_id,
            source: self.peer,
            client: self.client,
            listener: &self.listener,
            tls_version: self.tls_version,
            alpn: self.alpn,
            client_cert: self.client_cert.as_deref(),
            http_version: self.http_version,
            method: &self.method,
            path: &self.target,
            host: self.host.as_deref(),
            user_agent: self.user_agent.as_deref(),
            route: self.route.as_deref(),
            upstream: self.upstream,
            identity: self.identity.as_deref(),
            cache: self.cache,
            status: self.status,
            error: self.error,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            target: "access",
        };
        let mut buffer = Vec::with_capacity(512);
        // Serialising plain strings and numbers into a Vec cannot fail.
        if serde_json::to_writer(&mut buffer, &line).is_err() {
            return;
        }
        buffer.push(b'\n');
        // The writer thread blocks the caller only when its queue is full; a failed write (a
        // closed stderr) has nowhere to be reported.
        let _ = match SINK.get() {
            Some(writer) => writer.clone().write_all(&buffer),
            None => std::io::stderr().write_all(&buffer),
        };
    }
}

/// `path?query` with the values of secret-looking parameters replaced.
pub(crate) fn redact_target(path: &str, query: Option<&str>) -> String {
    let Some(query) = query else {
        return path.to_owned();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let lower = name.to_ascii_lowercase();
            let secret = SECRET_PARAMS.contains(&lower.as_str())
                || lower.contains("token")
                || lower.contains("secret")
                || lower.contains("password");
            if secret && !value.is_empty() {
                format!("{name}=REDACTED")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_like_query_parameters_are_redacted() {
        assert_eq!(redact_target("/a", None), "/a");
        assert_eq!(
            redact_target(
                "/a",
                Some("page=2&access_token=abc&API_KEY=k&sig=s&q=x&myToken=t")
            ),
            "/a?page=2&access_token=REDACTED&API_KEY=REDACTED&sig=REDACTED&q=x&myToken=REDACTED"
        );
        assert_eq!(redact_target("/a", Some("token")), "/a?token");
    }
}
