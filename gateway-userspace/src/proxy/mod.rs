//! The L7 gateway: listeners, the request pipeline, upstream pools, and the one place where
//! errors become responses. It runs inside `gateway run`, next to the XDP data plane, from the
//! same config file.
//!
//! Every request goes through these phases, in this order; a phase either passes the request
//! on or ends it with a [`ProxyError`], which [`error::error_response`] alone turns into a
//! response:
//!
//! ```text
//!  1 accept ─ connection limits (total, per source): over them the socket is closed at once
//!  2 TLS ──── rustls handshake within `header_read_timeout`; SNI picks the certificate,
//!             ALPN picks HTTP/2 or HTTP/1.1                                (server.rs, tls/)
//!  3 parse/limits ─ hyper reads the head, which must be complete within
//!             `header_read_timeout` (slowloris; server.rs); URI length → 414, header count
//!             and bytes → 431                                          (pipeline.rs)
//!  4 route ── plain listener redirecting? → 308. Path normalised (bad → 400), then the
//!             listener's routes by host, path, method, headers; none → 404    (routing/)
//!             A client denied for abuse behind a trusted proxy → 403 first  (abuse/)
//!             CORS preflights are answered here (204, or 403)                (cors/)
//!  5 authenticate ─ the route's credentials (JWT, API key) → `Identity`, or 401; identity
//!             headers set for the upstream, client copies and credentials removed (auth/)
//!  6 authorize ─ scopes, roles, claims, Cedar policies → 403            (authz/)
//!  7 validate ─ methods (405), content type (415), query, OpenAPI operation (404),
//!             body buffered under a cap (413): JSON depth (400), JSON Schema (422) (validate/)
//!  8 rate-limit ─ GCRA per identity, API key, source or route → 429 with `Retry-After`
//!             and `RateLimit*` headers                                      (ratelimit/)
//!  9 upstream  pick an endpoint (none → 503), rewrite headers (hop-by-hop out, forwarding
//!             in, request id), stream the body under `max_body_bytes` (→ 413), wait up to
//!             the route's `timeout` (→ 504); connect failure → 502           (upstream.rs)
//! 10 response filters ─ hop-by-hop and configured headers stripped, request id added,
//!             CORS headers, rate-limit headers
//! 11 log ──── metrics and the abuse detector count the status when the head is ready; one
//!             JSON access-log line when the response body is done    (access_log.rs)
//!             │
//!   any ProxyError ──► error_response: problem+json {type, title, status, request_id}
//!             (+ detail and pointer for validation failures)
//! ```
pub mod access_log;
mod body;
mod cache;
mod connect;
pub mod error;
pub mod headers;
mod pipeline;
mod server;
mod tunnel;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::{sync::watch, task::JoinSet};

pub use self::error::{ErrorSource, ProxyError};
use self::{pipeline::Pipeline, server::Shared};
use crate::{
    abuse::AbuseLoop,
    auth::Authenticator,
    config::{Config, ConfigError},
    metrics::Metrics,
    tls::{self, TlsError},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Any response body the pipeline produces: the upstream's, streamed, or the gateway's own.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on `{address}` for listener `{listener}`; is another process using it?")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS for listener `{listener}` failed")]
    Tls {
        listener: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What the pipeline works with besides its config; kept across reloads.
#[derive(Clone)]
pub struct Services {
    pub metrics: Metrics,
    /// Told every outcome that counts against a client; denies clients behind trusted proxies.
    pub abuse: Option<Arc<AbuseLoop>>,
    /// Verifies credentials for routes that require them.
    pub auth: Option<Arc<Authenticator>>,
}

/// The running L7 gateway.
pub struct L7 {
    /// Reloads the config of these listeners.
    pub reloader: Reloader,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<()>,
    background: JoinSet<()>,
    /// Each listener's name and bound address (useful when binding port 0).
    pub addresses: Vec<(String, SocketAddr)>,
}

/// Binds every listener of a validated config and starts serving. Returns `None` when the
/// config has no listeners. Must run inside the tokio runtime.
pub fn start(config: &Config, services: Services) -> Result<Option<L7>, StartError> {
    if config.listeners.is_empty() {
        return Ok(None);
    }
    let shared = Arc::new(Shared::new(
        Pipeline::new(config, services.clone(), None)?,
        &config.http,
        services,
        config.listeners.iter().map(|l| l.name.clone()).collect(),
    ));
    let (shutdown, watcher) = watch::channel(false);
    let mut listeners = JoinSet::new();
    let mut background = JoinSet::new();
    // Active health checks: each pool probes its endpoints when its interval is due. The pools
    // are the running pipeline's, so a reload brings its own.
    let probing = Arc::clone(&shared);
    background.spawn(async move {
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            ticker.tick().await;
            let pipeline = probing.pipeline.load_full();
            for pool in pipeline.upstreams().pools() {
                let pool = Arc::clone(pool);
                tokio::spawn(async move { pool.probe_if_due().await });
            }
        }
    });
    // Idle rate-limit keys are evicted now and then, so their memory stays bounded.
    let evicting = Arc::clone(&shared);
    background.spawn(async move {
        let mut ticker = tokio::time::interval(crate::ratelimit::EVICT_INTERVAL);
        loop {
            ticker.tick().await;
            let pipeline = evicting.pipeline.load_full();
            if !pipeline.rate_limits().is_empty() {
                let _ =
                    tokio::task::spawn_blocking(move || pipeline.rate_limits().evict_idle()).await;
            }
        }
    });
    let mut addresses = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        let address = listener.socket_addr(&format!("listeners[{index}]"))?;
        let bind_error = |source| StartError::Bind {
            listener: listener.name.clone(),
            address,
            source,
        };
        // std's bind sets SO_REUSEADDR, so a restart does not wait for TIME_WAIT sockets.
        let socket = std::net::TcpListener::bind(address).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        let bound = socket.local_addr().map_err(bind_error)?;
        let socket = tokio::net::TcpListener::from_std(socket).map_err(bind_error)?;
        let acceptor = match &listener.tls {
            Some(tls_config) => {
                let setup = tls::listener_tls(tls_config).map_err(|source| StartError::Tls {
                    listener: listener.name.clone(),
                    source: Box::new(source),
                })?;
                background.spawn(setup.reloader.run());
                Some(tokio_rustls::TlsAcceptor::from(setup.server_config))
            }
            None => None,
        };
        tracing::info!(
            listener = %listener.name,
            address = %bound,
            tls = acceptor.is_some(),
            routes = listener.routes.len(),
            "L7 listener ready"
        );
        listeners.spawn(server::accept_loop(
            Arc::clone(&shared),
            index,
            socket,
            acceptor,
            watcher.clone(),
        ));
        addresses.push((listener.name.clone(), bound));
    }
    if let Some(hint) = curl_hint(config, &addresses) {
        tracing::info!("L7 gateway serving; try `{hint}`");
    }
    Ok(Some(L7 {
        reloader: Reloader {
            shared: Arc::clone(&shared),
            fixed: FixedSettings::of(config),
        },
        shared,
        shutdown,
        listeners,
        background,
        addresses,
    }))
}

/// What a reload cannot change while the listeners run: their sockets, TLS setup and the
/// connection-level `[http]` settings baked into every connection.
#[derive(Clone, Debug, PartialEq)]
struct FixedSettings(String);

impl FixedSettings {
    fn of(config: &Config) -> FixedSettings {
        // The config types carry no `PartialEq`; their `Debug` form covers every field.
        let listeners: Vec<String> = config
            .listeners
            .iter()
            .map(|l| format!("{} {} {:?}", l.name, l.address, l.tls))
            .collect();
        FixedSettings(format!("{listeners:?} {:?}", config.http))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "listener addresses, TLS settings or the `[http]` table changed: those apply only at start, so restart the daemon (the running config keeps serving)"
    )]
    NeedsRestart,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Swaps the request pipeline of a running L7 gateway.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    fixed: FixedSettings,
}

impl Reloader {
    /// Builds the pipeline of a validated `config` completely, without touching the running
    /// one; [`Prepared::swap`] then puts it in service.
    pub fn prepare(&self, config: &Config) -> Result<Prepared, ReloadError> {
        if FixedSettings::of(config) != self.fixed {
            return Err(ReloadError::NeedsRestart);
        }
        Ok(Prepared {
            shared: Arc::clone(&self.shared),
            pipeline: Pipeline::new(
                config,
                self.shared.services.clone(),
                Some(&self.shared.pipeline.load()),
            )?,
        })
    }
}

impl Reloader {
    /// Upstreams without a single endpoint that passes its health checks, for `/readyz`.
    pub fn unhealthy_upstreams(&self) -> Vec<String> {
        let pipeline = self.shared.pipeline.load();
        let mut names: Vec<String> = pipeline
            .upstreams()
            .pools()
            .filter(|pool| !pool.has_healthy_endpoint())
            .map(|pool| pool.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Every upstream endpoint of the running config, for the metrics.
    pub fn endpoint_states(&self) -> Vec<crate::metrics::EndpointState> {
        let pipeline = self.shared.pipeline.load();
        pipeline
            .upstreams()
            .pools()
            .flat_map(|pool| pool.endpoint_states())
            .collect()
    }
}

/// A pipeline built from a new config, ready to replace the running one.
pub struct Prepared {
    shared: Arc<Shared>,
    pipeline: Pipeline,
}

impl Prepared {
    /// Swaps the new pipeline in atomically: routes, upstreams and trusted proxies change for
    /// new requests at once, while requests in flight finish on the pipeline they started with.
    pub fn swap(self) {
        self.shared.pipeline.store(Arc::new(self.pipeline));
    }
}

impl L7 {
    /// Stops accepting, lets in-flight requests finish for up to `grace`, then closes what is
    /// left.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(grace, async {
            while self.listeners.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "in-flight requests did not finish in time; closing their connections"
            );
        }
        self.listeners.shutdown().await;
        self.background.shutdown().await;
        tracing::info!(
            refused_connections = self.shared.limits.refused(),
            "L7 gateway stopped"
        );
    }
}

/// A curl command that reaches the first route of the first listener, for the start-up log.
fn curl_hint(config: &Config, addresses: &[(String, SocketAddr)]) -> Option<String> {
    let listener = config.listeners.first()?;
    let (_, address) = addresses.first()?;
    let route = config
        .routes
        .iter()
        .find(|route| listener.routes.first() == Some(&route.name))?;
    let path = match (&route.path_exact, &route.path_prefix) {
        (Some(exact), _) => exact.clone(),
        (None, Some(prefix)) if prefix.ends_with('/') => format!("{prefix}hello"),
        (None, Some(prefix)) => format!("{prefix}/hello"),
        (None, None) => "/".to_owned(),
    };
    let self_signed = listener.tls.as_ref().filter(|tls| tls.self_signed);
    let host = match (&route.host, self_signed) {
        (Some(host), _) if !host.starts_with('*') => host.clone(),
        (_, Some(tls)) => tls.self_signed_names.first()?.clone(),
        _ => address.ip().to_string(),
    };
    let (scheme, insecure) = match (&listener.tls, self_signed) {
        (Some(_), Some(_)) => ("https", "-k "),
        (Some(_), None) => ("https", ""),
        (None, _) => ("http", ""),
    };
    Some(format!(
        "curl {insecure}{scheme}://{host}:{}{path}",
        address.port()
    ))
}
