//! Upstream pools: each `[[upstreams]]` entry is a set of endpoints, a balancing policy and a
//! pooled keep-alive client speaking HTTP/1.1 or HTTP/2, in plaintext (HTTP/2 with prior
//! knowledge, h2c) or over TLS ([`super::connect`]).
//!
//! An endpoint that refused a connection is skipped for [`EJECT_FOR`]; when every endpoint of
//! a pool is skipped the request gets 503 at once instead of waiting on dead addresses. Active
//! health checks (a later slice) will mark endpoints the same way.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};

use super::{
    body::{BodyOutcome, LimitedBody, RequestBody},
    connect::UpstreamConnector,
};
use crate::{
    config::{
        Balance, Config, ConfigError, HealthCheckConfig, OutlierConfig, UpstreamConfig,
        UpstreamProtocol,
    },
    metrics::EndpointState,
    tls,
};

/// How long an endpoint that refused a connection is left out of the rotation.
pub(crate) const EJECT_FOR: Duration = Duration::from_secs(2);

pub(crate) type UpstreamClient = Client<UpstreamConnector, LimitedBody>;

pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    outstanding: AtomicUsize,
    /// Milliseconds since the pool's epoch until which the endpoint is skipped.
    ejected_until_ms: AtomicU64,
    /// Passes the active health checks (always, without them).
    healthy: AtomicBool,
    /// Health-check results in a row: passes while unhealthy, failures while healthy.
    streak: AtomicU32,
    /// Live requests that failed in a row (passive ejection).
    failures: AtomicU32,
    /// Times ejected, for the metrics.
    ejections: AtomicU64,
}

pub(crate) struct Pool {
    pub(crate) name: String,
    pub(crate) protocol: UpstreamProtocol,
    /// `https` for TLS pools, `http` otherwise.
    pub(crate) scheme: &'static str,
    pub(crate) client: UpstreamClient,
    endpoints: Vec<Arc<Endpoint>>,
    balance: Balance,
    next: AtomicUsize,
    epoch: Instant,
    health_check: Option<HealthCheckConfig>,
    /// Milliseconds since the epoch of the last health-check round.
    last_probe_ms: AtomicU64,
    pub(crate) retry_budget: RetryBudget,
    outlier: OutlierConfig,
}

/// Retries allowed to a pool: a fifth of its requests, and at least a few per second, so that a
/// failing pool is not hit by a multiple of its load.
pub(crate) struct RetryBudget {
    /// Thousandths of a retry.
    tokens: AtomicU64,
    /// Second (since the pool's epoch) of the last per-second top-up.
    topped_up: AtomicU64,
    epoch: Instant,
}

/// Each request adds a fifth of a retry.
const RETRY_PER_REQUEST: u64 = 200;
/// Every second adds three retries.
const RETRIES_PER_SECOND: u64 = 3_000;
/// The budget holds at most ten retries.
const RETRY_CAP: u64 = 10_000;

impl RetryBudget {
    fn new() -> RetryBudget {
        RetryBudget {
            tokens: AtomicU64::new(RETRIES_PER_SECOND),
            topped_up: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn add(&self, amount: u64) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + amount).min(RETRY_CAP))
            });
    }

    /// Counts a request towards the budget.
    pub(crate) fn deposit(&self) {
        let second = self.epoch.elapsed().as_secs();
        let last = self.topped_up.swap(second, Ordering::Relaxed);
        if second > last {
            self.add(RETRIES_PER_SECOND.saturating_mul(second - last));
        }
        self.add(RETRY_PER_REQUEST);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok()
    }
}

/// A request in flight to one endpoint; dropping it ends the count.
pub(crate) struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl InFlight {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn new(
        config: &UpstreamConfig,
        endpoints: Vec<SocketAddr>,
        tls: Option<tls::UpstreamTls>,
    ) -> Pool {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let connector = UpstreamConnector::new(config.connect_timeout, tls);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .http2_only(config.protocol != UpstreamProtocol::Http1);
        Pool {
            name: config.name.clone(),
            protocol: config.protocol,
            scheme,
            client: builder.build(connector),
            endpoints: endpoints
                .into_iter()
                .map(|addr| {
                    Arc::new(Endpoint {
                        addr,
                        outstanding: AtomicUsize::new(0),
                        ejected_until_ms: AtomicU64::new(0),
                        healthy: AtomicBool::new(true),
                        ejections: AtomicU64::new(0),
                        streak: AtomicU32::new(0),
                        failures: AtomicU32::new(0),
                    })
                })
                .collect(),
            balance: config.balance,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            health_check: config.health_check.clone(),
            last_probe_ms: AtomicU64::new(0),
            retry_budget: RetryBudget::new(),
            outlier: config.outlier.clone(),
        }
    }

    /// Whether any endpoint passes its health checks (readiness).
    pub(crate) fn has_healthy_endpoint(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.healthy.load(Ordering::Relaxed))
    }

    /// Runs a round of health checks if one is due; returns at once otherwise.
    pub(crate) async fn probe_if_due(&self) {
        let Some(check) = &self.health_check else {
            return;
        };
        let now = self.now_ms();
        let interval = u64::try_from(check.interval.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_probe_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < interval {
            return;
        }
        self.last_probe_ms.store(now.max(1), Ordering::Relaxed);
        for endpoint in &self.endpoints {
            let passed = self.probe(endpoint, check).await;
            endpoint.record_probe(passed, check, &self.name);
        }
    }

    async fn probe(&self, endpoint: &Endpoint, check: &HealthCheckConfig) -> bool {
        let uri = format!("{}://{}{}", self.scheme, endpoint.addr, check.path);
        let body = LimitedBody::new(
            RequestBody::Buffered(None),
            0,
            Arc::new(BodyOutcome::default()),
            Arc::new(AtomicU64::new(0)),
        );
        let Ok(request) = http::Request::get(uri)
            .header(http::header::USER_AGENT, "gateway-health-check")
            .body(body)
        else {
            return false;
        };
        match tokio::time::timeout(check.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response.status().is_success(),
            _ => false,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Picks an endpoint by the pool's policy among those not ejected; `None` when all are.
    pub(crate) fn pick(&self) -> Option<InFlight> {
        let now = self.now_ms();
        let available = |e: &&Arc<Endpoint>| {
            e.ejected_until_ms.load(Ordering::Relaxed) <= now && e.healthy.load(Ordering::Relaxed)
        };
        let endpoint = match self.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..self.endpoints.len())
                    .map(|i| &self.endpoints[(start + i) % self.endpoints.len()])
                    .find(|e| available(e))?
            }
            Balance::LeastOutstanding => {
                // Ties go round-robin, so equal endpoints share the load when idle.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..self.endpoints.len())
                    .map(|i| &self.endpoints[(start + i) % self.endpoints.len()])
                    .filter(available)
                    .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))?
            }
        };
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint: Arc::clone(endpoint),
        })
    }

    /// Counts how a live request to an endpoint went: `outlier.consecutive_failures` failures
    /// in a row eject it for `outlier.eject_for`; a success resets the count.
    pub(crate) fn record_outcome(&self, in_flight: &InFlight, failed: bool) {
        let endpoint = &in_flight.endpoint;
        if !failed {
            endpoint.failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.outlier.consecutive_failures {
            endpoint.failures.store(0, Ordering::Relaxed);
            let until = self.now_ms()
                + u64::try_from(self.outlier.eject_for.as_millis()).unwrap_or(u64::MAX);
            endpoint.ejected_until_ms.store(until, Ordering::Relaxed);
            endpoint.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                upstream = %self.name,
                endpoint = %endpoint.addr,
                failures,
                eject_for = %humantime::format_duration(self.outlier.eject_for),
                "endpoint ejected after failing requests in a row"
            );
        }
    }

    /// Leaves an endpoint out of the rotation for [`EJECT_FOR`] after it refused a connection.
    pub(crate) fn eject(&self, in_flight: &InFlight) {
        let until = self.now_ms() + u64::try_from(EJECT_FOR.as_millis()).unwrap_or(u64::MAX);
        let endpoint = &in_flight.endpoint;
        endpoint.ejected_until_ms.store(until, Ordering::Relaxed);
        endpoint.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Every endpoint's state, for the metrics.
    pub(crate) fn endpoint_states(&self) -> impl Iterator<Item = EndpointState> + '_ {
        let now = self.now_ms();
        self.endpoints.iter().map(move |e| EndpointState {
            upstream: self.name.clone(),
            endpoint: e.addr.to_string(),
            healthy: e.healthy.load(Ordering::Relaxed),
            ejected: e.ejected_until_ms.load(Ordering::Relaxed) > now,
            ejections: e.ejections.load(Ordering::Relaxed),
            in_flight: e.outstanding.load(Ordering::Relaxed) as u64,
        })
    }
}

impl Endpoint {
    /// Counts a health-check result; `threshold` results in a row flip the endpoint.
    fn record_probe(&self, passed: bool, check: &HealthCheckConfig, pool: &str) {
        let healthy = self.healthy.load(Ordering::Relaxed);
        if passed == healthy {
            self.streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if healthy {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if streak >= threshold {
            self.healthy.store(passed, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            if passed {
                tracing::info!(upstream = pool, endpoint = %self.addr, "endpoint passes its health checks again");
            } else {
                tracing::warn!(upstream = pool, endpoint = %self.addr, "endpoint failed its health checks; out of the rotation");
            }
        }
    }
}

/// Every pool by name.
pub(crate) struct Upstreams {
    pools: HashMap<String, Arc<Pool>>,
}

impl Upstreams {
    /// Builds the pools of a validated config.
    pub(crate) fn new(config: &Config) -> Result<Upstreams, ConfigError> {
        let mut pools = HashMap::new();
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            let endpoints = upstream.endpoint_addrs().to_vec();
            // Validation loaded these files already; they can only have changed since.
            let tls = upstream
                .tls
                .as_ref()
                .map(|tls| tls::upstream_tls(tls, upstream.protocol))
                .transpose()
                .map_err(|error| ConfigError::Invalid {
                    key: format!("{key}.tls"),
                    message: crate::lists::error_chain(&error),
                })?;
            pools.insert(
                upstream.name.clone(),
                Arc::new(Pool::new(upstream, endpoints, tls)),
            );
        }
        Ok(Upstreams { pools })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    pub(crate) fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: &str) -> Pool {
        let config = Config::parse(&format!(
            r#"
            [[upstreams]]
            name = "app"
            endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            balance = "{balance}"
            "#
        ))
        .unwrap_or_else(|e| panic!("test config: {e}"));
        let endpoints = config.upstreams[0].endpoint_addrs().to_vec();
        Pool::new(&config.upstreams[0], endpoints, None)
    }

    fn ports(picks: &[InFlight]) -> Vec<u16> {
        picks.iter().map(|p| p.addr().port()).collect()
    }

    #[tokio::test]
    async fn round_robin_rotates_and_skips_ejected_endpoints() {
        let pool = pool("round_robin");
        let first: Vec<_> = (0..4).map(|_| pool.pick().expect("an endpoint")).collect();
        assert_eq!(ports(&first), [1, 2, 3, 1]);
        pool.eject(&first[1]);
        let picks: Vec<_> = (0..4).map(|_| pool.pick().expect("an endpoint")).collect();
        assert!(!ports(&picks).contains(&2), "{:?}", ports(&picks));
        pool.eject(&first[0]);
        pool.eject(&first[2]);
        assert!(pool.pick().is_none(), "every endpoint ejected");
    }

    #[tokio::test]
    async fn endpoints_failing_in_a_row_are_ejected() {
        let pool = pool("round_robin");
        let first = pool.pick().expect("an endpoint");
        let bad = first.addr();
        for _ in 0..4 {
            pool.record_outcome(&first, true);
        }
        pool.record_outcome(&first, false);
        for _ in 0..4 {
            pool.record_outcome(&first, true);
        }
        let picks: Vec<_> = (0..4).filter_map(|_| pool.pick()).collect();
        assert!(
            picks.iter().any(|p| p.addr() == bad),
            "four failures after a success are not five"
        );
        drop(picks);
        pool.record_outcome(&first, true);
        let picks: Vec<_> = (0..6).filter_map(|_| pool.pick()).collect();
        assert!(
            picks.iter().all(|p| p.addr() != bad),
            "five in a row eject it"
        );
    }

    #[test]
    fn the_retry_budget_is_a_fifth_of_requests_plus_a_floor() {
        let budget = RetryBudget::new();
        // The floor: three retries before any request.
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw(), "spent");
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.withdraw(), "four requests earn 0.8 of a retry");
        budget.deposit();
        assert!(budget.withdraw(), "five earn one");
        for _ in 0..1000 {
            budget.deposit();
        }
        let mut retries = 0;
        while budget.withdraw() {
            retries += 1;
        }
        assert_eq!(retries, 10, "the budget is capped");
    }

    #[tokio::test]
    async fn health_check_streaks_flip_endpoints_at_their_thresholds() {
        let pool = pool("round_robin");
        let check = HealthCheckConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        };
        let endpoint = &pool.endpoints[0];
        endpoint.record_probe(false, &check, "app");
        endpoint.record_probe(false, &check, "app");
        assert!(
            endpoint.healthy.load(Ordering::Relaxed),
            "two failures are not three"
        );
        endpoint.record_probe(true, &check, "app");
        endpoint.record_probe(false, &check, "app");
        endpoint.record_probe(false, &check, "app");
        assert!(
            endpoint.healthy.load(Ordering::Relaxed),
            "a pass resets the streak"
        );
        endpoint.record_probe(false, &check, "app");
        assert!(
            !endpoint.healthy.load(Ordering::Relaxed),
            "three in a row take it out"
        );
        let picks: Vec<_> = (0..4).filter_map(|_| pool.pick()).collect();
        assert!(
            picks.iter().all(|p| p.addr() != endpoint.addr),
            "an unhealthy endpoint is never picked"
        );
        drop(picks);
        endpoint.record_probe(true, &check, "app");
        assert!(
            !endpoint.healthy.load(Ordering::Relaxed),
            "one pass is not two"
        );
        endpoint.record_probe(true, &check, "app");
        assert!(
            endpoint.healthy.load(Ordering::Relaxed),
            "two passes bring it back"
        );
    }

    #[tokio::test]
    async fn least_outstanding_prefers_the_idlest_endpoint() {
        let pool = pool("least_outstanding");
        let first = pool.pick().expect("an endpoint");
        let second = pool.pick().expect("an endpoint");
        let third = pool.pick().expect("an endpoint");
        assert_eq!(ports(&[first, second]).len(), 2);
        // `first` and `second` are dropped: their endpoints are idle again, `third`'s is busy.
        for _ in 0..6 {
            let pick = pool.pick().expect("an endpoint");
            assert_ne!(pick.addr(), third.addr(), "the busy endpoint is avoided");
        }
    }
}
