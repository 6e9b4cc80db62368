//! The in-process limiter: governor's GCRA over a key store of our own whose size has a hard
//! cap, because keys come from clients and clients can make up new ones.
use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use governor::{
    InsufficientCapacity, Quota,
    clock::{Clock, MonotonicClock, Reference},
    middleware::StateInformationMiddleware,
    nanos::Nanos,
    state::{StateStore, keyed::ShrinkableKeyedStateStore},
};

use super::{Decision, LimitKey, LimiterStats, RateLimiter};

/// A GCRA limit kept in this process: `burst` requests at once, then one per `period`, per key.
pub struct LocalLimiter<C: Clock = MonotonicClock> {
    gcra: governor::RateLimiter<LimitKey, BoundedStore, C, StateInformationMiddleware>,
    /// The same store the GCRA writes to, for its size and counters.
    store: BoundedStore,
    /// Read just before governor reads its own start: arrival times in the store count from
    /// governor's start, at most a few nanoseconds later than this.
    start: C::Instant,
    period: Duration,
    burst: NonZeroU32,
}

/// Subtracted from the idle horizon to cover the gap between [`LocalLimiter::start`] and
/// governor's own start, so that the store never takes a key for idle a moment too early.
const HORIZON_MARGIN: Duration = Duration::from_millis(1);

impl LocalLimiter {
    /// A limiter on the monotonic clock.
    pub fn new(period: Duration, burst: NonZeroU32, max_keys: usize) -> Self {
        Self::with_clock(period, burst, max_keys, MonotonicClock)
    }
}

impl<C: Clock> LocalLimiter<C> {
    /// A limiter on `clock`; tests pass governor's `FakeRelativeClock` and move time by hand.
    pub fn with_clock(period: Duration, burst: NonZeroU32, max_keys: usize, clock: C) -> Self {
        // Governor spaces requests in whole nanoseconds; config validation keeps periods at
        // 1 ns or more, this keeps a zero from panicking anyway.
        let period = period.max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("a period of at least 1 ns")
            .allow_burst(burst);
        let store = BoundedStore::new(max_keys);
        let start = clock.now();
        let gcra = governor::RateLimiter::new(quota, store.clone(), clock);
        LocalLimiter {
            gcra,
            store,
            start,
            period,
            burst,
        }
    }

    /// Time for `units` requests' worth of budget to come back.
    fn periods(&self, units: u32) -> Duration {
        self.period.saturating_mul(units)
    }
}

impl<C> RateLimiter for LocalLimiter<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn check(&self, key: &LimitKey, cost: NonZeroU32) -> Decision {
        if self.store.is_full() {
            // The store makes room when a new key comes; it needs to know which keys are
            // idle by then (arrival times at or before now minus one period, as governor's
            // `retain_recent` has it).
            let elapsed: Duration = self.gcra.clock().now().duration_since(self.start).into();
            let horizon = elapsed.saturating_sub(self.period + HORIZON_MARGIN);
            self.store.set_idle_horizon(Nanos::from(horizon));
        }
        let burst = self.burst.get();
        match self.gcra.check_key_n(key, cost) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity().min(burst);
                Decision {
                    allowed: true,
                    remaining,
                    // The bucket is full again after the units it misses have come back; this
                    // rounds the current unit's part up to a whole one.
                    reset_after: self.periods(burst - remaining),
                    retry_after: None,
                }
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.gcra.clock().now());
                // After `wait`, the key has exactly `cost` units: the rest of the burst comes
                // back one period each.
                let reset_after = wait.saturating_add(self.periods(burst - cost.get()));
                let full = self.periods(burst);
                let units_back =
                    full.saturating_sub(reset_after).as_nanos() / self.period.as_nanos().max(1);
                Decision {
                    allowed: false,
                    remaining: u32::try_from(units_back).unwrap_or(burst).min(burst),
                    reset_after,
                    retry_after: Some(wait),
                }
            }
            // No wait helps, so there is no state worth reporting: the figures are those of
            // a key that has spent everything.
            Err(InsufficientCapacity(_)) => Decision {
                allowed: false,
                remaining: 0,
                reset_after: self.periods(burst),
                retry_after: None,
            },
        }
    }

    fn evict_idle(&self) {
        self.gcra.retain_recent();
        self.store.shrink_if_sparse();
    }

    fn stats(&self) -> LimiterStats {
        self.store.stats()
    }
}

/// Each key's theoretical arrival time (GCRA's whole state), at most `max_keys` of them.
///
/// Governor's own stores grow without bound until someone calls `retain_recent`; this one
/// never passes `max_keys`. A new key at a full store first clears out the idle keys (as good
/// as new, so forgetting them changes nothing); if that leaves less than a sixteenth of the
/// store free, the keys with the earliest arrival times go until it does: those are the
/// closest to a full budget, so forgetting them changes the least. Freeing a sixteenth at a
/// time spreads the cost of the scan over the next sixteenth of new keys.
#[derive(Clone)]
struct BoundedStore(Arc<StoreInner>);

struct StoreInner {
    map: Mutex<HashMap<LimitKey, Nanos>>,
    max_keys: usize,
    /// The map's size, readable without the lock.
    len: AtomicUsize,
    /// Keys whose arrival time is at or before this are idle; set by the limiter while the
    /// store is full (the store has no clock).
    idle_horizon: AtomicU64,
    evicted_idle: AtomicU64,
    evicted_active: AtomicU64,
}

impl BoundedStore {
    fn new(max_keys: usize) -> Self {
        BoundedStore(Arc::new(StoreInner {
            map: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
            len: AtomicUsize::new(0),
            idle_horizon: AtomicU64::new(0),
            evicted_idle: AtomicU64::new(0),
            evicted_active: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<LimitKey, Nanos>> {
        // The map is consistent after every statement that changes it; a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.0.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_full(&self) -> bool {
        self.0.len.load(Ordering::Relaxed) >= self.0.max_keys
    }

    fn stats(&self) -> LimiterStats {
        LimiterStats {
            keys: self.0.len.load(Ordering::Relaxed),
            evicted_idle: self.0.evicted_idle.load(Ordering::Relaxed),
            evicted_active: self.0.evicted_active.load(Ordering::Relaxed),
        }
    }

    /// Gives memory back after a burst of keys has gone idle.
    fn shrink_if_sparse(&self) {
        let mut map = self.lock();
        if map.capacity() > 4 * map.len() + 1024 {
            map.shrink_to_fit();
        }
    }

    fn set_idle_horizon(&self, horizon: Nanos) {
        self.0
            .idle_horizon
            .fetch_max(horizon.as_u64(), Ordering::Relaxed);
    }

    /// Frees a sixteenth of a full store: idle keys first, then the least indebted.
    fn make_room(&self, map: &mut HashMap<LimitKey, Nanos>) {
        let horizon = self.0.idle_horizon.load(Ordering::Relaxed);
        let before = map.len();
        map.retain(|_, arrival| arrival.as_u64() > horizon);
        let idle = before - map.len();
        self.0
            .evicted_idle
            .fetch_add(idle as u64, Ordering::Relaxed);

        let target = self.0.max_keys - (self.0.max_keys / 16).max(1);
        if map.len() <= target {
            return;
        }
        let excess = map.len() - target;
        let mut arrivals: Vec<Nanos> = map.values().copied().collect();
        let (_, threshold, _) = arrivals.select_nth_unstable(excess - 1);
        let threshold = *threshold;
        let before = map.len();
        map.retain(|_, arrival| *arrival > threshold);
        let active = before - map.len();
        self.0
            .evicted_active
            .fetch_add(active as u64, Ordering::Relaxed);
    }
}

impl StateStore for BoundedStore {
    type Key = LimitKey;

    fn measure_and_replace<T, F, E>(&self, key: &LimitKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.lock();
        if let Some(arrival) = map.get_mut(key) {
            let (outcome, next) = f(Some(*arrival))?;
            *arrival = next;
            return Ok(outcome);
        }
        // A refusal leaves no state behind, so only a new key that passes takes a slot.
        let (outcome, next) = f(None)?;
        if map.len() >= self.0.max_keys {
            self.make_room(&mut map);
        }
        map.insert(key.clone(), next);
        self.0.len.store(map.len(), Ordering::Relaxed);
        Ok(outcome)
    }
}

impl ShrinkableKeyedStateStore<LimitKey> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, arrival| *arrival > drop_below);
        self.0
            .evicted_idle
            .fetch_add((before - map.len()) as u64, Ordering::Relaxed);
        self.0.len.store(map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.lock().shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;
    use proptest::{collection::vec, prelude::*};

    use super::*;

    const ONE: NonZeroU32 = NonZeroU32::MIN;

    fn limiter(
        period: Duration,
        burst: u32,
    ) -> (LocalLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let burst = NonZeroU32::new(burst).expect("a burst of at least 1");
        (
            LocalLimiter::with_clock(period, burst, 1000, clock.clone()),
            clock,
        )
    }

    fn key(name: &str) -> LimitKey {
        LimitKey::ApiKey(name.into())
    }

    #[test]
    fn a_burst_then_the_rate_then_recovery() {
        // 10/s with a burst of 20.
        let (limiter, clock) = limiter(Duration::from_millis(100), 20);
        let k = key("a");
        for sent in 1..=20 {
            let decision = limiter.check(&k, ONE);
            assert!(decision.allowed, "request {sent} of the burst was refused");
            assert_eq!(decision.remaining, 20 - sent, "remaining after {sent}");
            assert_eq!(decision.retry_after, None);
        }
        let refused = limiter.check(&k, ONE);
        assert!(!refused.allowed, "the 21st request at once passed");
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Some(Duration::from_millis(100)));
        assert_eq!(refused.reset_after, Duration::from_secs(2));

        clock.advance(Duration::from_millis(99));
        assert!(!limiter.check(&k, ONE).allowed, "1 ms too early");
        clock.advance(Duration::from_millis(1));
        assert!(limiter.check(&k, ONE).allowed, "one period later");
        assert!(!limiter.check(&k, ONE).allowed, "and only one");

        assert!(
            limiter.check(&key("b"), ONE).allowed,
            "keys are independent"
        );

        clock.advance(Duration::from_secs(2));
        let recovered = limiter.check(&k, ONE);
        assert!(recovered.allowed);
        assert_eq!(recovered.remaining, 19, "the whole burst is back");
    }

    #[test]
    fn a_daily_quota_is_a_burst_refilled_over_the_day() {
        let (limiter, clock) = limiter(Duration::from_secs(86_400) / 1000, 1000);
        let k = key("a");
        for _ in 0..1000 {
            assert!(limiter.check(&k, ONE).allowed, "within the quota");
        }
        let refused = limiter.check(&k, ONE);
        assert_eq!(refused.retry_after, Some(Duration::from_millis(86_400)));
        assert_eq!(refused.reset_after, Duration::from_secs(86_400));
        clock.advance(Duration::from_secs(12 * 3600));
        let mut allowed = 0;
        while limiter.check(&k, ONE).allowed {
            allowed += 1;
        }
        assert_eq!(allowed, 500, "half a day gives back half the quota");
    }

    #[test]
    fn costs_take_several_units_and_never_more_than_the_burst() {
        let (limiter, _clock) = limiter(Duration::from_secs(1), 5);
        let k = key("a");
        let three = NonZeroU32::new(3).expect("3");
        let first = limiter.check(&k, three);
        assert!(first.allowed && first.remaining == 2, "{first:?}");
        let second = limiter.check(&k, three);
        assert!(!second.allowed, "{second:?}");
        assert_eq!(second.remaining, 2, "a refusal takes nothing");
        assert_eq!(second.retry_after, Some(Duration::from_secs(1)));
        let six = NonZeroU32::new(6).expect("6");
        let never = limiter.check(&k, six);
        assert!(!never.allowed && never.retry_after.is_none(), "{never:?}");
    }

    #[test]
    fn a_full_store_forgets_idle_keys_first_then_the_least_indebted() {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(Duration::from_secs(1), ONE, 16, clock.clone());
        for i in 0..16 {
            assert!(limiter.check(&key(&format!("idle-{i}")), ONE).allowed);
        }
        assert_eq!(limiter.stats().keys, 16);
        clock.advance(Duration::from_secs(3));
        // The store is full, but of idle keys: a new key costs no one their limit.
        assert!(limiter.check(&key("new"), ONE).allowed);
        let stats = limiter.stats();
        assert_eq!(
            (stats.keys, stats.evicted_idle, stats.evicted_active),
            (1, 16, 0)
        );

        // Now fill it with active keys, one per millisecond.
        for i in 0..100 {
            clock.advance(Duration::from_millis(1));
            assert!(limiter.check(&key(&format!("active-{i}")), ONE).allowed);
        }
        let stats = limiter.stats();
        assert!(stats.keys <= 16, "{stats:?}");
        assert!(stats.evicted_active >= 100 - 16, "{stats:?}");
        // The newest key was kept: it still owes its period.
        assert!(!limiter.check(&key("active-99"), ONE).allowed);
        // Known keys at a full store cost no eviction.
        for _ in 0..10 {
            assert!(!limiter.check(&key("active-99"), ONE).allowed);
        }
        assert_eq!(
            limiter.stats(),
            stats,
            "checks of a known key evicted something"
        );

        clock.advance(Duration::from_secs(2));
        limiter.evict_idle();
        assert_eq!(limiter.stats().keys, 0, "all idle after a period");
    }

    #[test]
    fn source_keys_aggregate_ipv6_to_the_slash_64() {
        let key = |text: &str| LimitKey::source(text.parse().expect("an address"));
        assert_eq!(key("2001:db8::1"), key("2001:db8::ffff:2"));
        assert_ne!(key("2001:db8::1"), key("2001:db8:0:1::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(
            key("192.0.2.7"),
            key("192.0.2.8"),
            "IPv4 counts per address"
        );
        assert_eq!(key("2001:db8::1").to_string(), "source:2001:db8::/64");
        assert_eq!(key("192.0.2.7").to_string(), "source:192.0.2.7");
    }

    /// Nanoseconds from a period in microseconds and a gap in hundredths of a period.
    fn gap(period: Duration, hundredths: u64) -> Duration {
        Duration::from_nanos(u64::try_from(period.as_nanos()).expect("short") * hundredths / 100)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Over any span between two allowed requests, at most `burst + span / period` pass:
        /// the limiter is never more generous than the rate it advertises.
        #[test]
        fn allowed_requests_never_exceed_burst_plus_rate_times_elapsed(
            period_us in 1u64..2_000_000,
            burst in 1u32..40,
            gaps in vec(0u64..250, 1..300),
        ) {
            let period = Duration::from_micros(period_us);
            let (limiter, clock) = limiter(period, burst);
            let mut now = Duration::ZERO;
            let mut allowed_at = Vec::new();
            for hundredths in gaps {
                let step = gap(period, hundredths);
                clock.advance(step);
                now += step;
                if limiter.check(&key("k"), ONE).allowed {
                    allowed_at.push(now);
                }
            }
            for (i, first) in allowed_at.iter().enumerate() {
                for (j, last) in allowed_at.iter().enumerate().skip(i) {
                    let passed = (j - i + 1) as u128;
                    let bound = u128::from(burst) + (*last - *first).as_nanos() / period.as_nanos();
                    prop_assert!(
                        passed <= bound,
                        "{passed} requests passed between {first:?} and {last:?} (bound {bound})"
                    );
                }
            }
        }

        /// A client that spends its burst at once and then sends no faster than the rate is
        /// never refused.
        #[test]
        fn a_client_within_the_rate_is_never_refused(
            period_us in 1u64..2_000_000,
            burst in 1u32..40,
            spent in 0u32..40,
            gaps in vec(100u64..400, 1..300),
        ) {
            let period = Duration::from_micros(period_us);
            let (limiter, clock) = limiter(period, burst);
            for sent in 0..spent.min(burst) {
                prop_assert!(limiter.check(&key("k"), ONE).allowed, "burst request {sent} refused");
            }
            for (n, hundredths) in gaps.into_iter().enumerate() {
                clock.advance(gap(period, hundredths));
                let decision = limiter.check(&key("k"), ONE);
                prop_assert!(decision.allowed, "request {n} at or below the rate refused: {decision:?}");
            }
        }

        /// What a decision says is what happens: `retry_after` is exactly when a refused
        /// request passes, `remaining` is exactly how many more pass now, and after
        /// `reset_after` the whole burst is back.
        #[test]
        fn decisions_tell_the_truth(
            period_us in 1u64..2_000_000,
            burst in 1u32..40,
            gaps in vec(0u64..150, 1..200),
        ) {
            let period = Duration::from_micros(period_us);
            let (limiter, clock) = limiter(period, burst);
            // Two keys see the same traffic, so each ending below starts from the same state.
            let (a, b) = (key("a"), key("b"));
            let both = || {
                let decision = limiter.check(&a, ONE);
                assert_eq!(decision, limiter.check(&b, ONE), "same traffic, same decision");
                decision
            };
            for hundredths in gaps {
                clock.advance(gap(period, hundredths));
                let decision = both();
                if decision.allowed {
                    continue;
                }
                let wait = decision.retry_after.expect("a refusal says when to retry");
                prop_assert!(wait > Duration::ZERO);
                clock.advance(wait - Duration::from_nanos(1));
                prop_assert!(!both().allowed, "passed 1 ns before {wait:?}");
                clock.advance(Duration::from_nanos(1));
                prop_assert!(both().allowed, "refused after {wait:?}");
            }

            let last = both();
            // `remaining` is exact, for `a`.
            if last.allowed {
                let mut more = 0;
                while limiter.check(&a, ONE).allowed {
                    more += 1;
                }
                prop_assert_eq!(more, last.remaining, "{:?}", last);
            }
            // `reset_after` of an allowed or a refused decision brings the burst back, for `b`.
            clock.advance(last.reset_after);
            let fresh = limiter.check(&b, ONE);
            prop_assert!(fresh.allowed, "refused after reset_after of {:?}", last);
            prop_assert_eq!(fresh.remaining, burst - 1, "the burst is not whole after {:?}", last);
            let drained = limiter.check(&a, ONE);
            if !drained.allowed {
                clock.advance(drained.reset_after);
                let fresh = limiter.check(&a, ONE);
                prop_assert_eq!(fresh.remaining, burst - 1, "not whole after {:?}", drained);
            }
        }
    }
}
