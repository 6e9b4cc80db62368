//! Prometheus metrics: one registry for the daemon, the L7 families the proxy records into, and
//! the kernel's per-reason counters, attach modes and map fill levels, read at scrape time.
//! Label values are bounded: listener and route names from the config, status classes, verdict
//! reasons, never raw paths or addresses. [`http`] serves them with `/healthz` and `/readyz`.
pub mod http;

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

use gateway_common::Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{config::AttachMode, xdp::MapFill};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    /// The route name, or `none` for requests that matched no route.
    pub route: String,
    /// `2xx`, `4xx` ...
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    /// `total_limit` or `per_source_limit`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub route: String,
    /// The phase that refused: `authenticate`, `authorize`, `validate`, `rate_limit`, ...
    pub phase: &'static str,
    /// Its stable reason slug, e.g. `token_expired`, `missing_scope`, `schema`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: String,
    /// `hit` or `miss`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `rejected`.
    pub result: &'static str,
}

/// The status class label of an HTTP status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// What the kernel side looks like at one instant, for the scrape.
#[derive(Clone, Debug, Default)]
pub struct XdpSnapshot {
    /// Packets and bytes per reason, in [`Reason::ALL`] order.
    pub counters: Vec<(Reason, u64, u64)>,
    pub interfaces: Vec<(String, AttachMode)>,
    pub maps: Vec<MapFill>,
    /// What the abuse verdict loop did, which feeds the kernel's blocklist.
    pub abuse: AbuseCounts,
}

/// Abuse verdicts by what became of them, and what the loop lost under load.
#[derive(Clone, Copy, Debug, Default)]
pub struct AbuseCounts {
    pub banned: u64,
    pub denied_at_l7: u64,
    pub would_ban: u64,
    pub protected: u64,
    /// Sources counted right now.
    pub tracked: u64,
    /// Counters evicted under source churn.
    pub evicted: u64,
    /// Verdicts dropped because the queue was full.
    pub dropped_verdicts: u64,
}

/// Reads the kernel side at scrape time; `None` when it cannot be read (logged by the reader).
pub type XdpReader = Arc<dyn Fn() -> Option<XdpSnapshot> + Send + Sync>;

/// One upstream endpoint as the proxy sees it at scrape time.
#[derive(Clone, Debug)]
pub struct EndpointState {
    pub upstream: String,
    /// `IP:PORT` from the config.
    pub endpoint: String,
    /// Passing its active health checks (always true without them).
    pub healthy: bool,
    /// Left out of the rotation for now after failures.
    pub ejected: bool,
    /// Times it was ejected since the running config was loaded.
    pub ejections: u64,
    pub in_flight: u64,
}

/// Reads the running proxy's upstream endpoints at scrape time.
pub type UpstreamReader = Arc<dyn Fn() -> Vec<EndpointState> + Send + Sync>;

/// The daemon's metrics. Cloning is cheap; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub active_connections: Family<ListenerLabels, Gauge>,
    pub refused_connections: Family<RefusedLabels, Counter>,
    pub tls_handshake_failures: Family<ListenerLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub rejections: Family<RejectionLabels, Counter>,
    pub cache_lookups: Family<CacheLabels, Counter>,
    /// Set once the proxy runs; the L7 daemon may have none.
    upstreams: Arc<OnceLock<UpstreamReader>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every family registered and the kernel read through `xdp`.
    pub fn new(xdp: XdpReader) -> Metrics {
        let mut registry = Registry::with_prefix("gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered, by listener, route and status class",
            requests.clone(),
        );
        // 0.5 ms to ~16 s: a proxy's latencies span local cache hits to slow upstreams.
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(new_latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time from the request head to the end of the response head, by route",
            request_duration.clone(),
        );
        let active_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "active_connections",
            "Client connections open now, by listener",
            active_connections.clone(),
        );
        let refused_connections = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections refused at accept because a connection limit was reached",
            refused_connections.clone(),
        );
        let tls_handshake_failures = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by listener",
            tls_handshake_failures.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "policy_rejections",
            "Requests refused by a policy phase, by route, phase and reason",
            rejections.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Response cache lookups of the routes that cache, by result",
            cache_lookups.clone(),
        );
        registry.register_collector(Box::new(XdpCollector { read: xdp }));
        let upstreams = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(UpstreamCollector {
            read: Arc::clone(&upstreams),
        }));
        Metrics {
            registry: Arc::new(registry),
            requests,
            request_duration,
            active_connections,
            refused_connections,
            tls_handshake_failures,
            config_reloads,
            rejections,
            cache_lookups,
            upstreams,
        }
    }

    /// Exports the proxy's upstream endpoints, read through `reader` at each scrape. Only the
    /// first call counts: there is one proxy per daemon.
    pub fn read_upstreams_with(&self, reader: UpstreamReader) {
        let _ = self.upstreams.set(reader);
    }

    /// Counts a response cache lookup.
    pub fn record_cache(&self, route: &str, result: &'static str) {
        self.cache_lookups
            .get_or_create(&CacheLabels {
                route: route.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts a request a policy phase refused.
    pub fn record_rejection(&self, route: Option<&str>, phase: &'static str, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                route: route.unwrap_or("none").to_owned(),
                phase,
                reason,
            })
            .inc();
    }

    /// Records one answered request.
    pub fn record_request(&self, listener: &str, route: Option<&str>, status: u16, took: Duration) {
        let route = route.unwrap_or("none");
        self.requests
            .get_or_create(&RequestLabels {
                listener: listener.to_owned(),
                route: route.to_owned(),
                status: status_class(status),
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a collector error would be a bug in this module.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

fn new_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Emits the kernel's counters and map fill levels at scrape time.
struct XdpCollector {
    read: XdpReader,
}

impl fmt::Debug for XdpCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XdpCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    reason: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    interface: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

impl Collector for XdpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(snapshot) = (self.read)() else {
            return Ok(());
        };
        let verdict = |reason: Reason| VerdictLabels {
            reason: reason.name(),
            action: if reason.is_drop() { "drop" } else { "pass" },
        };
        let mut packets = encoder.encode_descriptor(
            "xdp_packets",
            "Packets seen by the XDP program, by verdict reason",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (reason, count, _) in &snapshot.counters {
            ConstCounter::new(*count).encode(packets.encode_family(&verdict(*reason))?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "xdp_bytes",
            "Bytes seen by the XDP program, by verdict reason",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (reason, _, count) in &snapshot.counters {
            ConstCounter::new(*count).encode(bytes.encode_family(&verdict(*reason))?)?;
        }
        let mut attached = encoder.encode_descriptor(
            "xdp_attached",
            "1 for each interface the program is attached to, labelled with the attach mode",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (interface, mode) in &snapshot.interfaces {
            let labels = AttachLabels {
                interface: interface.clone(),
                mode: match mode {
                    AttachMode::Native => "native",
                    AttachMode::Generic => "generic",
                },
            };
            ConstGauge::new(1i64).encode(attached.encode_family(&labels)?)?;
        }
        let mut entries = encoder.encode_descriptor(
            "xdp_map_entries",
            "Entries in each list map",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for map in &snapshot.maps {
            let labels = MapLabels {
                map: map.name.clone(),
            };
            let count = i64::try_from(map.entries).unwrap_or(i64::MAX);
            ConstGauge::new(count).encode(entries.encode_family(&labels)?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "xdp_map_capacity",
            "Capacity of each list map",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for map in &snapshot.maps {
            let labels = MapLabels {
                map: map.name.clone(),
            };
            ConstGauge::new(i64::from(map.capacity)).encode(capacity.encode_family(&labels)?)?;
        }
        let mut verdicts = encoder.encode_descriptor(
            "abuse_verdicts",
            "Abuse verdicts by enforcement: xdp (banned in the kernel), l7 (denied behind a trusted proxy), dry_run, protected",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        let abuse = snapshot.abuse;
        for (enforcement, count) in [
            ("xdp", abuse.banned),
            ("l7", abuse.denied_at_l7),
            ("dry_run", abuse.would_ban),
            ("protected", abuse.protected),
        ] {
            ConstCounter::new(count)
                .encode(verdicts.encode_family(&EnforcementLabels { enforcement })?)?;
        }
        let tracked = ConstGauge::new(i64::try_from(abuse.tracked).unwrap_or(i64::MAX));
        tracked.encode(encoder.encode_descriptor(
            "abuse_tracked_sources",
            "Sources the abuse detector counts right now",
            None,
            tracked.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "abuse_evicted_counters",
                "Abuse counters evicted because too many sources were tracked (spoofed-source churn)",
                abuse.evicted,
            ),
            (
                "abuse_dropped_verdicts",
                "Abuse verdicts dropped because the verdict queue was full",
                abuse.dropped_verdicts,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Emits the upstream endpoints' health, ejections and load at scrape time.
struct UpstreamCollector {
    read: Arc<OnceLock<UpstreamReader>>,
}

impl fmt::Debug for UpstreamCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(read) = self.read.get() else {
            return Ok(());
        };
        let endpoints = read();
        let labels = |e: &EndpointState| EndpointLabels {
            upstream: e.upstream.clone(),
            endpoint: e.endpoint.clone(),
        };
        for (name, help, value) in [
            (
                "upstream_endpoint_healthy",
                "1 while the endpoint passes its active health checks",
                (|e: &EndpointState| i64::from(e.healthy)) as fn(&EndpointState) -> i64,
            ),
            (
                "upstream_endpoint_ejected",
                "1 while the endpoint is ejected after failures",
                |e| i64::from(e.ejected),
            ),
            (
                "upstream_endpoint_in_flight",
                "Requests in flight to the endpoint",
                |e| i64::try_from(e.in_flight).unwrap_or(i64::MAX),
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for endpoint in &endpoints {
                ConstGauge::new(value(endpoint))
                    .encode(family.encode_family(&labels(endpoint))?)?;
            }
        }
        let mut ejections = encoder.encode_descriptor(
            "upstream_endpoint_ejections",
            "Times the endpoint was ejected (failed requests in a row, refused connections) since the running config was loaded",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for endpoint in &endpoints {
            ConstCounter::new(endpoint.ejections)
                .encode(ejections.encode_family(&labels(endpoint))?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnforcementLabels {
    enforcement: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> XdpSnapshot {
        XdpSnapshot {
            counters: Reason::ALL
                .iter()
                .map(|r| (*r, *r as u64 * 10, *r as u64 * 600))
                .collect(),
            interfaces: vec![("eth0".to_owned(), AttachMode::Native)],
            maps: vec![MapFill {
                name: "GW_BLOCK_V4".to_owned(),
                entries: 3,
                capacity: 1_200_000,
            }],
            abuse: AbuseCounts {
                banned: 4,
                evicted: 9,
                ..AbuseCounts::default()
            },
        }
    }

    #[test]
    fn kernel_counters_are_exported_per_reason() {
        let metrics = Metrics::new(Arc::new(|| Some(snapshot())));
        let text = metrics.render();
        assert!(
            text.contains(
                r#"gateway_xdp_packets_total{reason="blocked_address",action="drop"} 20"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_xdp_bytes_total{reason="rate_limited",action="drop"} 2400"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_xdp_attached{interface="eth0",mode="native"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_xdp_map_entries{map="GW_BLOCK_V4"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_xdp_map_capacity{map="GW_BLOCK_V4"} 1200000"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_abuse_verdicts_total{enforcement="xdp"} 4"#),
            "{text}"
        );
        assert!(
            text.contains("gateway_abuse_evicted_counters_total 9"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_counted_by_route_and_status_class() {
        let metrics = Metrics::new(Arc::new(|| None));
        metrics.record_request("public", Some("api"), 200, Duration::from_millis(3));
        metrics.record_request("public", Some("api"), 204, Duration::from_millis(1));
        metrics.record_request("public", None, 404, Duration::from_micros(200));
        let text = metrics.render();
        assert!(
            text.contains(
                r#"gateway_http_requests_total{listener="public",route="api",status="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gateway_http_requests_total{listener="public",route="none",status="4xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_http_request_duration_seconds_count{route="api"} 2"#),
            "{text}"
        );
        assert!(
            !text.contains("gateway_xdp_packets"),
            "no kernel snapshot, no kernel metrics"
        );
    }

    #[test]
    fn rejections_and_upstream_endpoints_are_exported() {
        let metrics = Metrics::new(Arc::new(|| None));
        assert!(
            !metrics.render().contains("upstream_endpoint"),
            "no proxy yet"
        );
        metrics.record_rejection(Some("orders"), "authenticate", "token_expired");
        metrics.record_rejection(Some("orders"), "authenticate", "token_expired");
        metrics.read_upstreams_with(Arc::new(|| {
            vec![EndpointState {
                upstream: "app".to_owned(),
                endpoint: "127.0.0.1:8081".to_owned(),
                healthy: false,
                ejected: true,
                ejections: 3,
                in_flight: 2,
            }]
        }));
        let text = metrics.render();
        for line in [
            r#"gateway_policy_rejections_total{route="orders",phase="authenticate",reason="token_expired"} 2"#,
            r#"gateway_upstream_endpoint_healthy{upstream="app",endpoint="127.0.0.1:8081"} 0"#,
            r#"gateway_upstream_endpoint_ejected{upstream="app",endpoint="127.0.0.1:8081"} 1"#,
            r#"gateway_upstream_endpoint_in_flight{upstream="app",endpoint="127.0.0.1:8081"} 2"#,
            r#"gateway_upstream_endpoint_ejections_total{upstream="app",endpoint="127.0.0.1:8081"} 3"#,
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn status_classes_cover_every_code() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(302), "3xx");
        assert_eq!(status_class(431), "4xx");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
