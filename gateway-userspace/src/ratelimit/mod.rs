//! The rate-limit phase: per-route limits and quotas counted by identity, API key, source
//! address or route, and the headers that tell clients where they stand (`RateLimit-Policy`,
//! `RateLimit`, and `Retry-After` on 429).
//!
//! - [`RateLimiter`]: one limit's budgets, one per key, behind a trait so that a fleet-wide
//!   backend can later stand where [`LocalLimiter`] (governor's GCRA, in this process) stands.
//! - [`RouteLimits`]: a route's limits; one call checks a request against all of them and
//!   returns the most restrictive [`Decision`] with the headers to send.
//! - [`RateLimits`]: every route's limits, built from the config; a reload keeps the budgets of
//!   limits it did not change.
//!
//! Each limit is a GCRA (a token bucket without a timer): a key may send `burst` requests at
//! once and then one per `period` (`window / N` for a rate of `N/window`). Over any span of
//! time `T` a key gets at most `burst + T / period` requests, so `1000/day` with the default
//! burst is a daily quota that refills continuously rather than at midnight.
//!
//! # How the pipeline calls it
//!
//! Phase 8, after authenticate (an identity or API key may be the key) and before upstream:
//!
//! ```text
//! if let Some(limits) = rate_limits.route(&route.name) {
//!     let outcome = limits.check(&KeyMaterial::new(client_ip, identity.as_ref()));
//!     if !outcome.allowed() {
//!         return Err(ProxyError::RateLimited(outcome.into_headers()));  // 429 + headers
//!     }
//!     // after the upstream answered: outcome.apply_headers(response.headers_mut())
//! }
//! ```
//!
//! `source` is the client address the pipeline believes (the peer, or `X-Forwarded-For` from a
//! trusted proxy). `principal` and `api_key_id` must come from a verified credential, never
//! from raw request headers: a client that could name its own key would get a fresh budget per
//! request. A background task calls [`RateLimits::evict_idle`] every [`EVICT_INTERVAL`].
mod local;
mod route;

use std::{fmt, net::IpAddr, num::NonZeroU32, time::Duration};

pub use self::{
    local::LocalLimiter,
    route::{EVICT_INTERVAL, KeyMaterial, LimitStats, RateLimitOutcome, RateLimits, RouteLimits},
};
use crate::cidr::Cidr;

/// IPv6 sources are counted by this prefix: one host usually owns a whole /64, and could
/// otherwise take a fresh budget with every address in it.
pub const SOURCE_IPV6_PREFIX: u8 = 64;

/// Whom a budget belongs to, within one limit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// A client address: an IPv4 address (IPv4-mapped IPv6 included) or an IPv6 /64.
    Source(Cidr),
    /// An authenticated principal.
    Identity(Box<str>),
    /// The id of an authenticated API key.
    ApiKey(Box<str>),
    /// The route as a whole.
    Route,
}

impl LimitKey {
    /// The key of a client address, normalised (see [`SOURCE_IPV6_PREFIX`]).
    pub fn source(addr: IpAddr) -> LimitKey {
        LimitKey::Source(Cidr::prefix_of(addr, 32, SOURCE_IPV6_PREFIX))
    }
}

/// A stable text form, e.g. `source:2001:db8::/64` or `api_key:0123456789abcdef`: what a shared backend
/// would store under, and what a log may show.
impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::Source(cidr) => write!(f, "source:{cidr}"),
            LimitKey::Identity(principal) => write!(f, "identity:{principal}"),
            LimitKey::ApiKey(id) => write!(f, "api_key:{id}"),
            LimitKey::Route => f.write_str("route"),
        }
    }
}

/// What one limit says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests the key may still send right now (after this one, if it was allowed).
    pub remaining: u32,
    /// Time until the key's whole burst is back.
    pub reset_after: Duration,
    /// For a refused request: the time after which the same request would be allowed. `None`
    /// when allowed, and when no wait would help (a cost above the burst).
    pub retry_after: Option<Duration>,
}

/// How full a limiter is and how often it had to forget keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Keys tracked now.
    pub keys: usize,
    /// Keys forgotten because they had their whole burst back (no effect on anyone's limit).
    pub evicted_idle: u64,
    /// Keys forgotten while still owing time because the limiter was full of active keys
    /// (`max_keys`): each got a fresh budget early. Non-zero means `max_keys` is too small
    /// for the traffic, or someone is spraying keys.
    pub evicted_active: u64,
}

/// One limit's budgets, one per key.
///
/// `check` is synchronous on purpose: no request should wait on the network for its limit.
/// A fleet-wide backend is expected to decide locally and reconcile with its peers in the
/// background, so it fits the same signature.
pub trait RateLimiter: Send + Sync {
    /// Takes `cost` units from `key`'s budget if all of them are there now; otherwise takes
    /// nothing and says when they will be. A cost above the burst can never pass: it is refused
    /// with no `retry_after`.
    fn check(&self, key: &LimitKey, cost: NonZeroU32) -> Decision;

    /// Forgets keys whose budget is full again: they behave exactly like keys never seen.
    fn evict_idle(&self);

    fn stats(&self) -> LimiterStats;
}
