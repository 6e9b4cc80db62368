//! The access log: one structured line per request, through `tracing` with target `access`
//! (the daemon's logger writes these as JSON). Written when the response body has been sent or
//! abandoned, so bytes and latency cover the whole exchange.
//!
//! Redaction: request and response headers are never logged (so `Authorization`, `Cookie`,
//! `Set-Cookie` and API-key headers cannot leak), except `User-Agent`; the values of token-like
//! query parameters are replaced with `REDACTED`.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

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

impl AccessRecord {
    pub(crate) fn emit(&self) {
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            source = %self.peer,
            client = %self.client,
            listener = %self.listener,
            tls_version = self.tls_version,
            alpn = self.alpn,
            client_cert = self.client_cert.as_deref(),
            http_version = self.http_version,
            method = %self.method,
            path = %self.target,
            host = self.host.as_deref(),
            user_agent = self.user_agent.as_deref(),
            route = self.route.as_deref(),
            upstream = self.upstream.map(tracing::field::display),
            identity = self.identity.as_deref(),
            cache = self.cache,
            status = self.status,
            error = self.error,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
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
