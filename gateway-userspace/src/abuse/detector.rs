//! Counting: one sliding-window counter per (rule, source prefix), in a bounded cache so that a
//! flood of spoofed sources evicts the coldest counters (and counts the evictions) instead of
//! growing without limit. Time is passed in, so tests drive it.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::{notification::RemovalCause, sync::Cache};

use super::{Outcome, OutcomeClass};
use crate::{cidr::Cidr, config::abuse::AbuseConfig};

/// A rule, ready to count against.
#[derive(Clone, Debug)]
struct Rule {
    name: Arc<str>,
    classes: Vec<OutcomeClass>,
    threshold: u32,
    window_ms: u64,
    ban: Duration,
    dry_run: bool,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

/// A rule crossed its threshold for a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub rule: Arc<str>,
    /// What to ban: the source's prefix at the rule's granularity.
    pub key: Cidr,
    /// The first-offence ban; escalation is applied when the verdict is executed.
    pub ban: Duration,
    pub dry_run: bool,
    pub behind_proxy: bool,
    pub window: Duration,
    /// Events per class that made up the count (classes with none left out).
    pub evidence: Vec<(OutcomeClass, u32)>,
}

/// Two fixed windows blended into a sliding one: the estimate weighs the previous window by
/// how much of it still overlaps the sliding window. O(1) memory per key.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    start_ms: u64,
    current: u32,
    previous: u32,
    evidence: [u32; OutcomeClass::ALL.len()],
}

impl Window {
    fn advance(&mut self, now_ms: u64, window_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed < window_ms {
            return;
        }
        if elapsed < 2 * window_ms {
            self.previous = self.current;
            self.start_ms += window_ms;
        } else {
            self.previous = 0;
            self.start_ms = now_ms;
            self.evidence = [0; OutcomeClass::ALL.len()];
        }
        self.current = 0;
    }

    fn estimate(&self, now_ms: u64, window_ms: u64) -> u64 {
        let into_current = now_ms.saturating_sub(self.start_ms).min(window_ms);
        let previous_share = u64::from(self.previous) * (window_ms - into_current) / window_ms;
        previous_share + u64::from(self.current)
    }
}

pub struct Detector {
    rules: Vec<Rule>,
    windows: Cache<(usize, Cidr), Window>,
    evicted: Arc<AtomicU64>,
    epoch: Instant,
}

impl Detector {
    pub fn new(config: &AbuseConfig, epoch: Instant) -> Detector {
        let evicted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&evicted);
        let longest = config
            .rules
            .iter()
            .map(|r| r.window)
            .max()
            .unwrap_or(Duration::from_secs(60));
        let rules: Vec<Rule> = config
            .rules
            .iter()
            .filter(|_| config.enabled)
            .map(|r| Rule {
                name: Arc::from(r.name.as_str()),
                classes: r.classes.clone(),
                threshold: r.threshold,
                window_ms: u64::try_from(r.window.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                ban: r.ban,
                dry_run: r.dry_run,
                ipv4_prefix: r.ipv4_prefix,
                ipv6_prefix: r.ipv6_prefix,
            })
            .collect();
        let windows = Cache::builder()
            .max_capacity(
                config
                    .max_tracked_sources
                    .saturating_mul(rules.len().max(1) as u64),
            )
            // A counter idle for two windows has decayed to zero anyway.
            .time_to_idle(longest * 2)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Detector {
            rules,
            windows,
            evicted,
            epoch,
        }
    }

    /// Counts one outcome against every rule that watches its class; returns the verdicts of
    /// the rules it pushed over their threshold (their counters then start again from zero).
    pub fn observe(&self, outcome: &Outcome, now: Instant) -> Vec<Verdict> {
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        let class_index = OutcomeClass::ALL
            .iter()
            .position(|c| *c == outcome.class)
            .expect("every class is listed");
        let mut verdicts = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.classes.contains(&outcome.class) {
                continue;
            }
            let key = Cidr::prefix_of(outcome.source, rule.ipv4_prefix, rule.ipv6_prefix);
            let mut fired = None;
            self.windows
                .entry((index, key))
                .and_upsert_with(|existing| {
                    let mut window = existing.map_or(
                        Window {
                            start_ms: now_ms,
                            ..Window::default()
                        },
                        |e| e.into_value(),
                    );
                    window.advance(now_ms, rule.window_ms);
                    window.current = window.current.saturating_add(outcome.count);
                    window.evidence[class_index] =
                        window.evidence[class_index].saturating_add(outcome.count);
                    if window.estimate(now_ms, rule.window_ms) >= u64::from(rule.threshold) {
                        fired = Some(window.evidence);
                        // Start over: the verdict is out, and the source is about to be dropped.
                        window = Window {
                            start_ms: now_ms,
                            ..Window::default()
                        };
                    }
                    window
                });
            if let Some(evidence) = fired {
                verdicts.push(Verdict {
                    rule: Arc::clone(&rule.name),
                    key,
                    ban: rule.ban,
                    dry_run: rule.dry_run,
                    behind_proxy: outcome.behind_proxy,
                    window: Duration::from_millis(rule.window_ms),
                    evidence: OutcomeClass::ALL
                        .iter()
                        .zip(evidence)
                        .filter(|(_, n)| *n > 0)
                        .map(|(c, n)| (*c, n))
                        .collect(),
                });
            }
        }
        verdicts
    }

    /// Counters dropped because the cache was full (spoofed-source churn, usually).
    pub fn evicted(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.evicted.load(Ordering::Relaxed)
    }

    /// Counters held now.
    pub fn tracked(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }

    /// Whether any rule counts this class (lets callers skip work for classes nobody watches).
    pub fn watches(&self, class: OutcomeClass) -> bool {
        self.rules.iter().any(|r| r.classes.contains(&class))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::config::abuse::RuleConfig;

    fn rule(name: &str, classes: &[OutcomeClass], threshold: u32, window_secs: u64) -> RuleConfig {
        RuleConfig {
            name: name.to_owned(),
            classes: classes.to_vec(),
            threshold,
            window: Duration::from_secs(window_secs),
            ban: Duration::from_secs(600),
            dry_run: false,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }

    fn outcome(source: &str, class: OutcomeClass) -> Outcome {
        Outcome {
            source: source.parse::<IpAddr>().unwrap(),
            behind_proxy: false,
            class,
            count: 1,
        }
    }

    fn detector(rules: Vec<RuleConfig>) -> (Detector, Instant) {
        let epoch = Instant::now();
        let config = AbuseConfig {
            rules,
            ..AbuseConfig::default()
        };
        (Detector::new(&config, epoch), epoch)
    }

    #[test]
    fn a_burst_of_failures_crosses_the_threshold_once() {
        let (detector, t0) = detector(vec![rule("stuffing", &[OutcomeClass::AuthFailure], 5, 60)]);
        for i in 0..4 {
            let verdicts = detector.observe(
                &outcome("198.51.100.7", OutcomeClass::AuthFailure),
                t0 + Duration::from_secs(i),
            );
            assert!(verdicts.is_empty(), "below the threshold at event {i}");
        }
        let verdicts = detector.observe(
            &outcome("198.51.100.7", OutcomeClass::AuthFailure),
            t0 + Duration::from_secs(4),
        );
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].key.to_string(), "198.51.100.7");
        assert_eq!(verdicts[0].evidence, [(OutcomeClass::AuthFailure, 5)]);
        let again = detector.observe(
            &outcome("198.51.100.7", OutcomeClass::AuthFailure),
            t0 + Duration::from_secs(5),
        );
        assert!(again.is_empty(), "the counter starts over after a verdict");
    }

    #[test]
    fn an_occasional_failure_never_adds_up() {
        let (detector, t0) = detector(vec![rule("stuffing", &[OutcomeClass::AuthFailure], 5, 60)]);
        // One 401 every 20 s: at most 3-4 in any minute, for an hour.
        for i in 0..180 {
            let verdicts = detector.observe(
                &outcome("198.51.100.8", OutcomeClass::AuthFailure),
                t0 + Duration::from_secs(20 * i),
            );
            assert!(
                verdicts.is_empty(),
                "a legitimate client was flagged at event {i}"
            );
        }
    }

    #[test]
    fn sources_and_classes_are_counted_apart() {
        let (detector, t0) = detector(vec![rule("scanner", &[OutcomeClass::NotFound], 3, 10)]);
        for i in 0..2 {
            let at = t0 + Duration::from_millis(i);
            assert!(
                detector
                    .observe(&outcome("198.51.100.1", OutcomeClass::NotFound), at)
                    .is_empty()
            );
            assert!(
                detector
                    .observe(&outcome("198.51.100.2", OutcomeClass::NotFound), at)
                    .is_empty()
            );
            assert!(
                detector
                    .observe(&outcome("198.51.100.1", OutcomeClass::AuthFailure), at)
                    .is_empty(),
                "a class the rule does not watch"
            );
        }
        let verdicts = detector.observe(&outcome("198.51.100.2", OutcomeClass::NotFound), t0);
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].key.to_string(), "198.51.100.2");
    }

    #[test]
    fn ipv6_sources_are_counted_per_prefix() {
        let (detector, t0) = detector(vec![rule("scanner", &[OutcomeClass::NotFound], 3, 10)]);
        // Three addresses of one /64: one host rotating its interface identifier.
        for (i, source) in ["2001:db8:1:2::1", "2001:db8:1:2::2"].iter().enumerate() {
            assert!(
                detector
                    .observe(
                        &outcome(source, OutcomeClass::NotFound),
                        t0 + Duration::from_millis(i as u64)
                    )
                    .is_empty()
            );
        }
        let verdicts = detector.observe(&outcome("2001:db8:1:2::3", OutcomeClass::NotFound), t0);
        assert_eq!(verdicts[0].key.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn old_events_slide_out_of_the_window() {
        let (detector, t0) = detector(vec![rule("stuffing", &[OutcomeClass::AuthFailure], 4, 10)]);
        for i in 0..3 {
            detector.observe(
                &outcome("198.51.100.9", OutcomeClass::AuthFailure),
                t0 + Duration::from_millis(i),
            );
        }
        // 25 s later the three have decayed completely: one more is not a fourth.
        let verdicts = detector.observe(
            &outcome("198.51.100.9", OutcomeClass::AuthFailure),
            t0 + Duration::from_secs(25),
        );
        assert!(verdicts.is_empty());
    }

    #[test]
    fn several_classes_add_up_in_one_rule_with_evidence_per_class() {
        let (detector, t0) = detector(vec![rule(
            "probing",
            &[
                OutcomeClass::AuthFailure,
                OutcomeClass::Forbidden,
                OutcomeClass::NotFound,
            ],
            4,
            60,
        )]);
        let source = "198.51.100.10";
        detector.observe(&outcome(source, OutcomeClass::AuthFailure), t0);
        detector.observe(&outcome(source, OutcomeClass::Forbidden), t0);
        detector.observe(&outcome(source, OutcomeClass::NotFound), t0);
        let verdicts = detector.observe(&outcome(source, OutcomeClass::NotFound), t0);
        assert_eq!(
            verdicts[0].evidence,
            [
                (OutcomeClass::AuthFailure, 1),
                (OutcomeClass::Forbidden, 1),
                (OutcomeClass::NotFound, 2)
            ]
        );
    }

    #[test]
    fn xdp_trip_events_carry_their_weight() {
        let (detector, t0) = detector(vec![rule("flood", &[OutcomeClass::XdpRateLimit], 3, 60)]);
        let mut trip = outcome("198.51.100.11", OutcomeClass::XdpRateLimit);
        trip.count = 1;
        assert!(detector.observe(&trip, t0).is_empty());
        assert!(
            detector
                .observe(&trip, t0 + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(
            detector.observe(&trip, t0 + Duration::from_secs(2)).len(),
            1
        );
    }

    #[test]
    fn memory_is_bounded_under_spoofed_churn() {
        let config = AbuseConfig {
            max_tracked_sources: 1000,
            rules: vec![rule("flood", &[OutcomeClass::NotFound], 1000, 60)],
            ..AbuseConfig::default()
        };
        let t0 = Instant::now();
        let detector = Detector::new(&config, t0);
        for i in 0..20_000u32 {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0xc633_0000 + i));
            detector.observe(
                &Outcome {
                    source,
                    behind_proxy: false,
                    class: OutcomeClass::NotFound,
                    count: 1,
                },
                t0,
            );
        }
        assert!(detector.tracked() <= 1000, "tracked {}", detector.tracked());
        assert!(detector.evicted() > 0, "evictions are counted");
    }

    #[test]
    fn a_disabled_config_never_fires() {
        let config = AbuseConfig {
            enabled: false,
            rules: vec![rule("stuffing", &[OutcomeClass::AuthFailure], 1, 60)],
            ..AbuseConfig::default()
        };
        let t0 = Instant::now();
        let detector = Detector::new(&config, t0);
        assert!(
            detector
                .observe(&outcome("198.51.100.12", OutcomeClass::AuthFailure), t0)
                .is_empty()
        );
        assert!(!detector.watches(OutcomeClass::AuthFailure));
    }
}
