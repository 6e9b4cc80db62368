//! A route's limits checked together, and the response headers of the IETF draft
//! (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy` lists each limit as a quota `q`
//! over a window of `w` seconds, `RateLimit` says what is left (`r`) and when the whole quota is
//! back (`t`, seconds), and a 429 adds `Retry-After`. For a GCRA limit the quota is the burst
//! and the window the time a spent burst takes to refill, so `q/w` is the sustained rate:
//! `10/s` with a burst of 20 reads `q=20;w=2`, and `1000/day` reads `q=1000;w=86400`.
use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    net::IpAddr,
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use governor::clock::{Clock, MonotonicClock};
use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::{Decision, LimitKey, LimiterStats, LocalLimiter, RateLimiter};
use crate::{
    auth::{AuthMethod, Identity},
    config::{
        ConfigError, RouteConfig,
        ratelimit::{LimitKeyKind, Rate},
    },
};

/// How often [`RateLimits::evict_idle`] should run. Idle keys cost memory, not accuracy, and a
/// full limiter evicts them on its own; this keeps the maps small between those moments.
pub const EVICT_INTERVAL: Duration = Duration::from_secs(10);

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What a request can be counted by. Pass only verified values: a principal from a verified
/// token, the id of an API key that matched the store; [`KeyMaterial::new`] takes them from
/// an [`Identity`].
#[derive(Clone, Copy, Debug)]
pub struct KeyMaterial<'a> {
    /// The client address as the gateway believes it (the peer, or what a trusted proxy said).
    pub source: IpAddr,
    /// The authenticated principal, if any.
    pub principal: Option<&'a str>,
    /// The id of the API key the request authenticated with, if any.
    pub api_key_id: Option<&'a str>,
}

impl<'a> KeyMaterial<'a> {
    /// The key material of a request from `source`, authenticated as `identity` if at all.
    pub fn new(source: IpAddr, identity: Option<&'a Identity>) -> Self {
        KeyMaterial {
            source,
            principal: identity.map(|identity| identity.principal.as_str()),
            api_key_id: identity.and_then(|identity| match &identity.method {
                AuthMethod::ApiKey { key_id } => Some(key_id.as_str()),
                _ => None,
            }),
        }
    }
}

/// What makes two limits the same across a reload: the same budgets may then carry over.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Spec {
    name: String,
    kind: LimitKeyKind,
    rate: Rate,
    burst: u32,
    max_keys: usize,
}

struct Limit {
    spec: Spec,
    /// The full burst comes back in this long: the sort key of the check order.
    refill: Duration,
    limiter: Arc<dyn RateLimiter>,
}

impl Limit {
    fn key(&self, request: &KeyMaterial<'_>) -> LimitKey {
        // A limit by identity or API key still counts requests that have none, by source:
        // otherwise leaving the credential out would be the way around the limit.
        match (self.spec.kind, request.principal, request.api_key_id) {
            (LimitKeyKind::Identity, Some(principal), _) => LimitKey::Identity(principal.into()),
            (LimitKeyKind::ApiKey, _, Some(id)) => LimitKey::ApiKey(id.into()),
            (LimitKeyKind::Route, ..) => LimitKey::Route,
            _ => LimitKey::source(request.source),
        }
    }
}

/// The limits of one route.
pub struct RouteLimits {
    /// In check order: shortest refill first (see [`RouteLimits::check`]).
    limits: Vec<Limit>,
    /// `RateLimit-Policy` never changes for a route: rendered once.
    policy: HeaderValue,
}

/// The verdict on one request: the most restrictive of its route's decisions, and the headers
/// that say so.
#[derive(Clone, Debug)]
pub struct RateLimitOutcome {
    decision: Decision,
    policy: String,
    headers: HeaderMap,
}

impl RateLimitOutcome {
    pub fn allowed(&self) -> bool {
        self.decision.allowed
    }

    /// The most restrictive decision: the refusal if there was one, else the limit with the
    /// fewest requests left.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The name of the limit that decided, for the access log and metrics.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// `RateLimit-Policy` and `RateLimit`, plus `Retry-After` when refused.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn into_headers(self) -> HeaderMap {
        self.headers
    }

    /// Adds the headers to a response (the upstream's, or the 429), replacing any of the same
    /// names an upstream sent: the gateway's limits are the ones this client hit.
    pub fn apply_headers(&self, response: &mut HeaderMap) {
        for (name, value) in &self.headers {
            response.insert(name, value.clone());
        }
    }
}

impl RouteLimits {
    fn new(mut limits: Vec<Limit>) -> Self {
        // A request refused by one limit still spent what the limits before it took: checking
        // the fastest-refilling ones first means a burst is refused by its per-second limit
        // before it eats into a daily quota or a route-wide budget.
        limits.sort_by_key(|limit| limit.refill);
        let mut policy = String::new();
        for limit in &limits {
            let separator = if policy.is_empty() { "" } else { ", " };
            let _ = write!(
                policy,
                "{separator}\"{}\";q={};w={}",
                limit.spec.name,
                limit.spec.burst,
                whole_seconds(limit.refill)
            );
        }
        RouteLimits {
            limits,
            policy: header_value(policy),
        }
    }

    /// Checks a request against every limit of the route, in order, stopping at the first
    /// refusal (the limits after it are not charged for a request that will not be served).
    pub fn check(&self, request: &KeyMaterial<'_>) -> RateLimitOutcome {
        let mut checked: Vec<(&Limit, Decision)> = Vec::with_capacity(self.limits.len());
        for limit in &self.limits {
            let decision = limit.limiter.check(&limit.key(request), NonZeroU32::MIN);
            checked.push((limit, decision));
            if !decision.allowed {
                break;
            }
        }
        let (decider, decision) = checked
            .iter()
            .copied()
            .min_by(|(_, a), (_, b)| {
                // Refused first, then fewest left, then longest until reset.
                a.allowed
                    .cmp(&b.allowed)
                    .then(a.remaining.cmp(&b.remaining))
                    .then(b.reset_after.cmp(&a.reset_after))
            })
            .expect("a route's limits are never empty");

        let mut state = String::new();
        for (limit, decision) in &checked {
            let separator = if state.is_empty() { "" } else { ", " };
            let _ = write!(
                state,
                "{separator}\"{}\";r={};t={}",
                limit.spec.name,
                decision.remaining,
                whole_seconds(decision.reset_after)
            );
        }
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        headers.insert(RATELIMIT.clone(), header_value(state));
        if let Some(wait) = decision.retry_after {
            // Whole seconds, rounded up so a client that waits exactly this long passes; at
            // least 1, since 0 invites an immediate retry.
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(whole_seconds(wait).max(1)),
            );
        }
        RateLimitOutcome {
            decision,
            policy: decider.spec.name.clone(),
            headers,
        }
    }

    /// The names of the limits, in check order.
    pub fn policies(&self) -> impl Iterator<Item = &str> {
        self.limits.iter().map(|limit| limit.spec.name.as_str())
    }
}

/// A limiter's stats with the route and limit they belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStats {
    pub route: String,
    pub policy: String,
    pub stats: LimiterStats,
}

/// Every route's limits. Routes without `rate_limits` have no entry.
#[derive(Default)]
pub struct RateLimits {
    routes: HashMap<String, RouteLimits>,
}

/// The routes and their policy names; budgets are state, not configuration.
impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (route, limits) in &self.routes {
            map.entry(route, &limits.policies().collect::<Vec<_>>());
        }
        map.finish()
    }
}

impl RateLimits {
    /// Builds the limits of validated `routes` on the monotonic clock. A limit that is the same
    /// in `previous` (the running config's) keeps its budgets, so a reload that only touches
    /// other settings does not hand every client a fresh burst.
    pub fn new(routes: &[RouteConfig], previous: Option<&RateLimits>) -> Result<Self, ConfigError> {
        Self::with_clock(routes, previous, &MonotonicClock)
    }

    /// [`RateLimits::new`] on another clock, for tests.
    pub fn with_clock<C>(
        routes: &[RouteConfig],
        previous: Option<&RateLimits>,
        clock: &C,
    ) -> Result<Self, ConfigError>
    where
        C: Clock + Clone + Send + Sync + 'static,
        C::Instant: Send + Sync,
    {
        let mut built = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            if route.rate_limits.is_empty() {
                continue;
            }
            let mut limits = Vec::with_capacity(route.rate_limits.len());
            for (j, config) in route.rate_limits.iter().enumerate() {
                let rate = config.parsed_rate(&format!("routes[{i}].rate_limits[{j}]"))?;
                let burst = config.effective_burst(rate);
                let spec = Spec {
                    name: config.policy_name(rate),
                    kind: config.key,
                    rate,
                    burst,
                    max_keys: config.max_keys,
                };
                let reused = previous
                    .and_then(|previous| previous.routes.get(&route.name))
                    .and_then(|old| old.limits.iter().find(|old| old.spec == spec))
                    .map(|old| Arc::clone(&old.limiter));
                let limiter = reused.unwrap_or_else(|| {
                    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
                    Arc::new(LocalLimiter::with_clock(
                        rate.period(),
                        burst,
                        config.max_keys,
                        clock.clone(),
                    ))
                });
                limits.push(Limit {
                    refill: rate.period().saturating_mul(burst),
                    spec,
                    limiter,
                });
            }
            built.insert(route.name.clone(), RouteLimits::new(limits));
        }
        Ok(RateLimits { routes: built })
    }

    /// The limits of the route named `route`, or `None` when it has none.
    pub fn route(&self, route: &str) -> Option<&RouteLimits> {
        self.routes.get(route)
    }

    /// Whether no route has limits: then no eviction task is needed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Forgets every key whose budget is full again; see [`EVICT_INTERVAL`].
    pub fn evict_idle(&self) {
        for limits in self.routes.values() {
            for limit in &limits.limits {
                limit.limiter.evict_idle();
            }
        }
    }

    /// Each limit's size and eviction counters, for metrics.
    pub fn stats(&self) -> Vec<LimitStats> {
        let mut stats: Vec<LimitStats> = self
            .routes
            .iter()
            .flat_map(|(route, limits)| {
                limits.limits.iter().map(|limit| LimitStats {
                    route: route.clone(),
                    policy: limit.spec.name.clone(),
                    stats: limit.limiter.stats(),
                })
            })
            .collect();
        stats.sort_by(|a, b| (&a.route, &a.policy).cmp(&(&b.route, &b.policy)));
        stats
    }
}

/// A duration in whole seconds, rounded up: a client told to wait that long is not early.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text)
        .expect("policy names are validated to lowercase letters, digits, `-`, `_` and `.`")
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::config::Config;

    fn limits_of(rate_limits: &str, clock: &FakeRelativeClock) -> RateLimits {
        let text = format!(
            r#"
            [[upstreams]]
            name = "app"
            endpoints = ["127.0.0.1:8081"]
            [[routes]]
            name = "open"
            path_prefix = "/open/"
            upstream = "app"
            [[routes]]
            name = "login"
            path_exact = "/login"
            upstream = "app"
            {rate_limits}
            "#
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        RateLimits::with_clock(&config.routes, None, clock)
            .unwrap_or_else(|error| panic!("building limits: {error}"))
    }

    fn from(source: &str) -> KeyMaterial<'static> {
        KeyMaterial {
            source: source.parse().expect("an address"),
            principal: None,
            api_key_id: None,
        }
    }

    fn header<'a>(outcome: &'a RateLimitOutcome, name: &str) -> Option<&'a str> {
        outcome
            .headers()
            .get(name)
            .map(|value| value.to_str().expect("ASCII header"))
    }

    #[test]
    fn exceeded_then_recovered_with_the_draft_headers() {
        let clock = FakeRelativeClock::default();
        let limits = limits_of(
            "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nburst = 2",
            &clock,
        );
        assert!(
            limits.route("open").is_none(),
            "a route without limits has none"
        );
        assert!(!limits.is_empty());
        let login = limits.route("login").expect("limits on `login`");
        let client = from("203.0.113.7");

        let first = login.check(&client);
        assert!(first.allowed());
        assert_eq!(
            header(&first, "ratelimit-policy"),
            Some("\"source-10-s\";q=2;w=1")
        );
        assert_eq!(header(&first, "ratelimit"), Some("\"source-10-s\";r=1;t=1"));
        assert_eq!(header(&first, "retry-after"), None);
        assert!(login.check(&client).allowed());

        let refused = login.check(&client);
        assert!(!refused.allowed(), "the third request at once passed");
        assert_eq!(refused.policy(), "source-10-s");
        assert_eq!(
            refused.decision().retry_after,
            Some(Duration::from_millis(100))
        );
        assert_eq!(header(&refused, "retry-after"), Some("1"), "rounded up");
        assert_eq!(
            header(&refused, "ratelimit"),
            Some("\"source-10-s\";r=0;t=1")
        );
        assert!(
            login.check(&from("203.0.113.8")).allowed(),
            "another source has its own budget"
        );

        clock.advance(Duration::from_millis(100));
        let recovered = login.check(&client);
        assert!(recovered.allowed(), "one period later");

        let mut response = HeaderMap::new();
        response.insert("ratelimit", HeaderValue::from_static("\"upstream\";r=99"));
        recovered.apply_headers(&mut response);
        assert_eq!(
            response.get("ratelimit").map(HeaderValue::as_bytes),
            Some(&b"\"source-10-s\";r=0;t=1"[..]),
            "the gateway's header replaces an upstream's"
        );
    }

    #[test]
    fn several_limits_report_the_most_restrictive_and_spare_the_slow_ones() {
        let clock = FakeRelativeClock::default();
        // A login-like route: 2/s per source, 3/min for the route as a whole.
        let limits = limits_of(
            r#"
            [[routes.rate_limits]]
            key = "route"
            rate = "3/min"
            name = "login-global"
            [[routes.rate_limits]]
            key = "source"
            rate = "2/s"
            "#,
            &clock,
        );
        let login = limits.route("login").expect("limits on `login`");
        assert_eq!(
            login.policies().collect::<Vec<_>>(),
            ["source-2-s", "login-global"],
            "the fast-refilling limit is checked first"
        );
        let a = from("198.51.100.1");
        let first = login.check(&a);
        assert!(first.allowed());
        assert_eq!(
            first.policy(),
            "source-2-s",
            "1 left of 2 beats 2 left of 3"
        );
        assert_eq!(
            header(&first, "ratelimit-policy"),
            Some("\"source-2-s\";q=2;w=1, \"login-global\";q=3;w=60")
        );
        assert_eq!(
            header(&first, "ratelimit"),
            Some("\"source-2-s\";r=1;t=1, \"login-global\";r=2;t=20")
        );
        assert!(login.check(&a).allowed());
        // Refused per source: the route-wide budget is not charged for it.
        for _ in 0..5 {
            let refused = login.check(&a);
            assert_eq!(refused.policy(), "source-2-s");
            assert_eq!(
                header(&refused, "ratelimit"),
                Some("\"source-2-s\";r=0;t=1"),
                "limits after the refusal are not checked"
            );
        }
        let b = from("198.51.100.2");
        let last = login.check(&b);
        assert!(last.allowed(), "the third route-wide request");
        let refused = login.check(&b);
        assert!(!refused.allowed());
        assert_eq!(refused.policy(), "login-global");
        assert_eq!(
            refused.decision().retry_after,
            Some(Duration::from_secs(20))
        );
        assert_eq!(header(&refused, "retry-after"), Some("20"));

        clock.advance(Duration::from_secs(20));
        assert!(login.check(&from("198.51.100.3")).allowed(), "recovered");
    }

    #[test]
    fn identity_and_api_key_limits_fall_back_to_the_source() {
        let clock = FakeRelativeClock::default();
        let limits = limits_of(
            "[[routes.rate_limits]]\nkey = \"identity\"\nrate = \"1/min\"\n[[routes.rate_limits]]\nkey = \"api_key\"\nrate = \"5/min\"",
            &clock,
        );
        let login = limits.route("login").expect("limits on `login`");
        let alice = KeyMaterial {
            principal: Some("alice"),
            api_key_id: Some("k1"),
            ..from("192.0.2.1")
        };
        assert!(login.check(&alice).allowed());
        assert!(
            !login.check(&alice).allowed(),
            "alice's one per minute is used"
        );
        let alice_elsewhere = KeyMaterial {
            source: "192.0.2.99".parse().expect("an address"),
            ..alice
        };
        assert!(
            !login.check(&alice_elsewhere).allowed(),
            "an identity's budget follows it across addresses"
        );
        let bob = KeyMaterial {
            principal: Some("bob"),
            ..alice
        };
        assert!(login.check(&bob).allowed(), "bob has his own");
        let anonymous = from("192.0.2.1");
        assert!(
            login.check(&anonymous).allowed(),
            "no identity: counted by source"
        );
        assert!(
            !login.check(&anonymous).allowed(),
            "and limited all the same"
        );
        let same_64 = from("2001:db8:1:2::1");
        assert!(login.check(&same_64).allowed());
        assert!(
            !login.check(&from("2001:db8:1:2:ffff::7")).allowed(),
            "another address in the same /64 is the same source"
        );
    }

    #[test]
    fn key_material_comes_from_the_verified_identity() {
        let key_id = crate::auth::apikeys::KeyId::for_tests("0123456789abcdef");
        let identity = Identity {
            principal: "svc-billing".to_owned(),
            method: AuthMethod::ApiKey { key_id },
            scopes: Default::default(),
            roles: Default::default(),
            claims: Default::default(),
        };
        let source = "192.0.2.1".parse().expect("an address");
        let material = KeyMaterial::new(source, Some(&identity));
        assert_eq!(material.principal, Some("svc-billing"));
        assert_eq!(material.api_key_id, Some("0123456789abcdef"));
        let anonymous = KeyMaterial::new(source, None);
        assert_eq!((anonymous.principal, anonymous.api_key_id), (None, None));
    }

    #[test]
    fn the_limits_can_be_shared_by_every_connection() {
        fn shared<T: Send + Sync>() {}
        shared::<RateLimits>();
        shared::<crate::cors::CorsPolicies>();
    }

    #[test]
    fn a_reload_keeps_the_budgets_of_unchanged_limits() {
        let clock = FakeRelativeClock::default();
        let limit = "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"1/min\"";
        let before = limits_of(limit, &clock);
        let client = from("203.0.113.7");
        assert!(
            before
                .route("login")
                .expect("limits")
                .check(&client)
                .allowed()
        );

        let text = format!(
            "[[upstreams]]\nname = \"app\"\nendpoints = [\"127.0.0.1:8081\"]\n[[routes]]\nname = \"login\"\npath_exact = \"/login\"\nupstream = \"app\"\ntimeout = \"5s\"\n{limit}"
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}"));
        let after = RateLimits::with_clock(&config.routes, Some(&before), &clock)
            .expect("rebuilding the limits");
        assert!(
            !after
                .route("login")
                .expect("limits")
                .check(&client)
                .allowed(),
            "the used budget carried over"
        );

        let changed = Config::parse(&text.replace("1/min", "2/min"))
            .unwrap_or_else(|error| panic!("{error}"));
        let fresh = RateLimits::with_clock(&changed.routes, Some(&after), &clock)
            .expect("rebuilding the limits");
        assert!(
            fresh
                .route("login")
                .expect("limits")
                .check(&client)
                .allowed(),
            "a changed limit starts afresh"
        );
        let stats = fresh.stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            (
                stats[0].route.as_str(),
                stats[0].policy.as_str(),
                stats[0].stats.keys
            ),
            ("login", "source-2-min", 1)
        );
        clock.advance(Duration::from_secs(60));
        fresh.evict_idle();
        assert_eq!(fresh.stats()[0].stats.keys, 0);
        assert_eq!(fresh.stats()[0].stats.evicted_idle, 1);
    }
}
