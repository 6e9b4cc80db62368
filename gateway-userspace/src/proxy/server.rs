//! The client side: accepting under the connection limits, TLS handshakes, serving HTTP/1.1
//! and HTTP/2 through hyper with the protective limits, closing idle connections, and draining
//! on shutdown.
use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use arc_swap::ArcSwap;

use super::{
    pipeline::{ConnInfo, Pipeline},
    tunnel::TunnelSlot,
};
use prometheus_client::metrics::gauge::Gauge;

use super::Services;
use crate::{
    abuse::{Outcome, OutcomeClass},
    metrics::{ListenerLabels, RefusedLabels},
};
use crate::{
    config::HttpConfig,
    tls::{ALPN_H2, ClientCertIdentity},
};

/// HTTP/2 streams a client may open and cancel before the server has taken them up. Past
/// this the connection gets GOAWAY (`ENHANCE_YOUR_CALM`) and is closed: the "Rapid Reset"
/// flood (CVE-2023-44487) costs the attacker a connection per few dozen streams. h2's
/// default, spelled out so that a dependency update cannot loosen it unnoticed.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset because the client broke the protocol on them before the
/// connection is closed: the "MadeYouReset" variant (CVE-2025-8671, fixed in h2 0.4.11),
/// where the client makes the server do the resetting.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What a connection is doing, as far as its timeouts care: when it last moved bytes, how many
/// of its requests are being answered, and since when it has been receiving a request head.
///
/// The header timeout is enforced here rather than by hyper, whose timer also runs while a
/// keep-alive connection waits for its next request: that would cut idle connections at the
/// header timeout instead of the idle timeout. Here a head's clock starts at accept (a new
/// connection must send its first request in time) and, later, at the first byte after a
/// response, as slowloris protection wants.
pub(crate) struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
    /// One more than the millisecond the current head started arriving; 0 when none is.
    head_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(1),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn wrote(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn read(&self) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.busy.load(Ordering::Relaxed) == 0 {
            // Bytes between requests begin the next head. Keeps an earlier start, if any.
            let _ = self.head_since_ms.compare_exchange(
                0,
                now.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// How long a request head has been arriving without being complete.
    fn head_pending_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.head_since_ms.load(Ordering::Relaxed).checked_sub(1)?;
        Some(Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Marks a request in progress (its head is complete) until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(0, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }
}

/// A request in progress on a connection.
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.wrote();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records when it last moved bytes.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.activity.wrote();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Open connections, in total and per source address, over all listeners.
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<OpenConnections>,
    refused: AtomicU64,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub(crate) struct ConnPermit {
    limits: Arc<ConnLimits>,
    source: IpAddr,
}

impl ConnLimits {
    pub(crate) fn new(http: &HttpConfig) -> ConnLimits {
        ConnLimits {
            max_total: http.max_connections,
            max_per_source: http.max_connections_per_source,
            open: Mutex::new(OpenConnections::default()),
            refused: AtomicU64::new(0),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // The counts stay consistent under a panic elsewhere: every change is one statement.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a connection from `source`, or counts it as refused and names the limit hit.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnPermit, &'static str> {
        let mut open = self.open();
        let from_source = open.per_source.get(&source).copied().unwrap_or(0);
        let limit = if open.total >= self.max_total {
            Some("total_limit")
        } else if from_source >= self.max_per_source {
            Some("per_source_limit")
        } else {
            None
        };
        if let Some(limit) = limit {
            drop(open);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at powers of two: visible during a flood without a line per connection.
            if refused.is_power_of_two() {
                tracing::warn!(
                    %source,
                    refused_total = refused,
                    "connection refused: `http.max_connections` or `http.max_connections_per_source` reached"
                );
            }
            return Err(limit);
        }
        open.total += 1;
        *open.per_source.entry(source).or_insert(0) += 1;
        Ok(ConnPermit {
            limits: Arc::clone(self),
            source,
        })
    }

    /// Connections refused since start.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total -= 1;
        if let Some(count) = open.per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.per_source.remove(&self.source);
            }
        }
    }
}

/// What every connection of every listener shares.
pub(crate) struct Shared {
    /// Swapped whole on a config reload; each request runs on the pipeline it started with.
    pub(crate) pipeline: ArcSwap<Pipeline>,
    pub(crate) limits: Arc<ConnLimits>,
    /// Connection-level settings: fixed for the life of the listeners.
    pub(crate) http: HttpConfig,
    /// Metrics, the abuse loop (told about failed TLS handshakes), the authenticator.
    pub(crate) services: Services,
    /// Listener names by index, for metric labels.
    pub(crate) listener_names: Vec<String>,
    builder: auto::Builder<TokioExecutor>,
}

impl Shared {
    pub(crate) fn new(
        pipeline: Pipeline,
        http: &HttpConfig,
        services: Services,
        listener_names: Vec<String>,
    ) -> Shared {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own limits sit above ours, so a request just over a limit reaches the
        // pipeline and gets its problem body; hyper answers bare 431s only far beyond them.
        // The header timeout is ours (see `Activity`), not hyper's.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_headers(http.max_headers * 2)
            .max_buf_size((http.max_header_bytes + http.max_uri_bytes) * 2 + 8192);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(http.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(http.max_header_bytes * 2).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
        Shared {
            pipeline: ArcSwap::from_pointee(pipeline),
            limits: Arc::new(ConnLimits::new(http)),
            http: http.clone(),
            services,
            listener_names,
            builder,
        }
    }

    /// Counts a connection the client broke the protocol on against the peer.
    fn protocol_violation(&self, peer: SocketAddr) {
        if let Some(abuse) = &self.services.abuse {
            abuse.observe(&Outcome {
                source: peer.ip(),
                behind_proxy: false,
                class: OutcomeClass::ProtocolError,
                count: 1,
            });
        }
    }

    /// Counts a failed TLS handshake, in the metrics and against the peer.
    fn tls_failed(&self, index: usize, peer: SocketAddr) {
        self.services
            .metrics
            .tls_handshake_failures
            .get_or_create(&self.listener_labels(index))
            .inc();
        if let Some(abuse) = &self.services.abuse {
            abuse.observe(&Outcome {
                source: peer.ip(),
                behind_proxy: false,
                class: OutcomeClass::TlsFailure,
                count: 1,
            });
        }
    }

    fn listener_labels(&self, index: usize) -> ListenerLabels {
        ListenerLabels {
            listener: self.listener_names.get(index).cloned().unwrap_or_default(),
        }
    }
}

/// Accepts on one listener until shutdown, then waits for its connections to drain (the caller
/// bounds that wait).
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
                    _ = shutdown.changed() => break,
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            // Refused before any byte is read or any TLS work is done.
                            let permit = match shared.limits.admit(peer.ip()) {
                                Ok(permit) => permit,
                                Err(limit) => {
                                    shared
                                        .services
        .metrics
                                        .refused_connections
                                        .get_or_create(&RefusedLabels {
                                            listener: shared.listener_labels(index).listener,
                                            limit,
                                        })
                                        .inc();
                                    continue;
                                }
                            };
                            connections.spawn(serve(
                                Arc::clone(&shared),
                                index,
                                stream,
                                peer,
                                tls.clone(),
                                permit,
                                shutdown.clone(),
                            ));
                        }
                        Err(error) => {
                            // Out of file descriptors, usually: back off instead of spinning.
                            tracing::warn!(%error, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve(
    shared: Arc<Shared>,
    index: usize,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    _permit: ConnPermit,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let _active = ActiveConnection::new(
        shared
            .services
            .metrics
            .active_connections
            .get_or_create_owned(&shared.listener_labels(index)),
    );
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    };
    let mut info = ConnInfo {
        listener: index,
        peer,
        tls_version: None,
        alpn: None,
        client_cert: None,
        activity,
        tunnel: TunnelSlot::default(),
    };
    let Some(acceptor) = tls else {
        // Plain listeners speak HTTP/1.1 only: they serve redirects and internal routes, and
        // without ALPN a client has no way to ask for HTTP/2 but prior knowledge.
        let builder = shared.builder.clone().http1_only();
        return drive(builder, true, shared, io, info, shutdown).await;
    };
    // The handshake is part of what a slow client must finish within the header timeout.
    let handshake =
        tokio::time::timeout(shared.http.header_read_timeout, acceptor.accept(io)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            shared.tls_failed(index, peer);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            shared.tls_failed(index, peer);
            return;
        }
    };
    let session = stream.get_ref().1;
    info.tls_version = session.protocol_version().map(|version| match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "other",
    });
    // rustls verified the chain during the handshake (an mTLS listener's failures end up in
    // the handshake-failure path above); the leaf names the client.
    info.client_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| ClientCertIdentity::from_der(leaf));
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    info.alpn = session
        .alpn_protocol()
        .map(|alpn| if alpn == ALPN_H2 { "h2" } else { "http/1.1" });
    // ALPN decided the protocol; a client that negotiated one does not get to speak the other.
    let builder = if h2 {
        shared.builder.clone().http2_only()
    } else {
        shared.builder.clone().http1_only()
    };
    drive(builder, !h2, shared, stream, info, shutdown).await;
}

/// Serves HTTP on an established connection until it ends, is idle too long, takes too long
/// to send an HTTP/1 request head, or shutdown drains it (in-flight requests finish; HTTP/2
/// clients get GOAWAY).
async fn drive<I>(
    builder: auto::Builder<TokioExecutor>,
    http1: bool,
    shared: Arc<Shared>,
    io: I,
    info: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::clone(&info.activity);
    let peer = info.peer;
    let info = Arc::new(info);
    let conn = Arc::clone(&info);
    let for_service = Arc::clone(&shared);
    let service = service_fn(move |request| {
        // Loaded per request: after a reload, new requests use the new config while requests
        // in flight finish on the one they started with.
        let pipeline = for_service.pipeline.load_full();
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(pipeline.handle(&info, request).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let idle_timeout = shared.http.idle_timeout;
    let header_timeout = shared.http.header_read_timeout;
    let mut ticker = tokio::time::interval(
        (idle_timeout.min(header_timeout) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    let mut draining = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    if is_protocol_violation(error.as_ref()) {
                        tracing::info!(%peer, %error, "connection closed for a protocol violation");
                        shared.protocol_violation(peer);
                    } else {
                        tracing::debug!(%peer, ?error, "connection ended with an error");
                    }
                }
                break;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = ticker.tick() => {
                // HTTP/2 frames between requests (settings, pings) are not a request head.
                if http1 && activity.head_pending_for().is_some_and(|t| t >= header_timeout) {
                    tracing::debug!(%peer, "closing: request head not complete within `http.header_read_timeout`");
                    break;
                }
                if !draining && activity.idle_for() >= idle_timeout {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
    // After a WebSocket upgrade hyper has handed the connection over: the tunnel runs here,
    // on the connection's task and under its permit, until a side closes or it idles out.
    // On shutdown it gets the grace like any request in flight.
    let Some(mut tunnel) = conn.tunnel.take() else {
        return;
    };
    loop {
        tokio::select! {
            () = &mut tunnel => break,
            _ = ticker.tick() => {
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(%peer, "closing: WebSocket tunnel idle for `http.idle_timeout`");
                    break;
                }
            }
        }
    }
}

/// Keeps a listener's active-connection gauge up for as long as the connection lives, however
/// it ends.
struct ActiveConnection(Gauge);

impl ActiveConnection {
    fn new(gauge: Gauge) -> ActiveConnection {
        gauge.inc();
        ActiveConnection(gauge)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether a connection ended because the client broke the protocol (an HTTP/1 head that does
/// not parse, an HTTP/2 connection error such as a reset flood answered with GOAWAY) rather
/// than by going away. h2's errors are matched by their reason names: hyper does not expose
/// them as types.
fn is_protocol_violation(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_parse() || e.is_parse_too_large())
        {
            return true;
        }
        // `Debug`, because h2's `Display` gives a description, not the reason's name.
        let text = format!("{current:?}");
        if [
            "ENHANCE_YOUR_CALM",
            "PROTOCOL_ERROR",
            "FLOW_CONTROL_ERROR",
            "FRAME_SIZE_ERROR",
            "COMPRESSION_ERROR",
        ]
        .iter()
        .any(|reason| text.contains(reason))
        {
            return true;
        }
        cause = current.source();
    }
    false
}
