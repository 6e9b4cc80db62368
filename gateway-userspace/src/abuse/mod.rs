//! The abuse verdict loop: what the L7 gateway learns about a source (401s, 403s, validation
//! failures, scans for undeclared paths, rate-limit hits, TLS and protocol errors) and what the
//! kernel reports (XDP rate-limit trips) is counted per source over sliding windows
//! ([`detector`]); a rule crossing its threshold becomes a verdict, which [`verdicts`] turns into
//! a ban in the XDP blocklist (or, behind a trusted proxy, an L7 denial), escalating for repeat
//! offenders ([`offences`]), never for protected addresses, each one written to the audit log
//! ([`audit`]).
pub mod audit;
pub mod detector;
pub mod offences;
pub mod verdicts;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Instant, SystemTime},
};

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use self::{
    audit::AuditRecord,
    detector::{Detector, Verdict},
    verdicts::{Counts, Enforcer, Executed, Executor},
};
use crate::{cidr::Cidr, config::abuse::AbuseConfig};

/// Verdicts waiting for the executor; past this, new ones are dropped (and counted) rather
/// than slowing the request path.
const VERDICT_QUEUE: usize = 4096;

/// The running loop: counting happens on the caller's thread (cheap), verdicts are executed on
/// a thread of their own (map writes, fsyncs), so no request waits for a ban.
pub struct AbuseLoop {
    detector: Detector,
    verdicts: mpsc::SyncSender<Verdict>,
    /// Sources behind a trusted proxy, denied at L7 until the instant stored.
    denied: Arc<Cache<Cidr, Instant>>,
    /// The prefix lengths the rules count at: a client is denied if any of its prefixes is.
    prefix_lengths: Vec<(u8, u8)>,
    executor: Arc<Executor>,
    dropped_verdicts: AtomicU64,
}

impl AbuseLoop {
    pub fn start(
        config: &AbuseConfig,
        executor: Executor,
        enforcer: Arc<dyn Enforcer>,
    ) -> Arc<AbuseLoop> {
        let (sender, receiver) = mpsc::sync_channel::<Verdict>(VERDICT_QUEUE);
        let denied = Arc::new(
            Cache::builder()
                .max_capacity(config.max_tracked_sources)
                .build(),
        );
        let executor = Arc::new(executor);
        // Two threads: one enforces verdicts as they come, the other writes offences and audit
        // lines (fsyncs), so a slow disk never delays the next ban.
        let (records, written) = mpsc::channel::<AuditRecord>();
        let worker_denied = Arc::clone(&denied);
        let worker_executor = Arc::clone(&executor);
        std::thread::Builder::new()
            .name("abuse-verdicts".to_owned())
            .spawn(move || {
                for verdict in receiver {
                    match worker_executor.enforce(&verdict, enforcer.as_ref(), SystemTime::now()) {
                        Ok((outcome, record)) => {
                            if let Executed::DeniedAtL7 { ttl, .. } = outcome {
                                worker_denied.insert(verdict.key, Instant::now() + ttl);
                            }
                            let _ = records.send(record);
                        }
                        Err(error) => tracing::error!(
                            error = %crate::lists::error_chain(&error),
                            "executing an abuse verdict failed"
                        ),
                    }
                }
            })
            .expect("spawning the verdict thread");
        let writer_executor = Arc::clone(&executor);
        std::thread::Builder::new()
            .name("abuse-audit".to_owned())
            .spawn(move || {
                for record in written {
                    if let Err(error) = writer_executor.record(&record) {
                        tracing::error!(
                            error = %crate::lists::error_chain(&error),
                            "recording an abuse verdict failed"
                        );
                    }
                }
            })
            .expect("spawning the audit thread");
        let mut prefix_lengths: Vec<(u8, u8)> = config
            .rules
            .iter()
            .map(|r| (r.ipv4_prefix, r.ipv6_prefix))
            .collect();
        prefix_lengths.sort_unstable();
        prefix_lengths.dedup();
        Arc::new(AbuseLoop {
            detector: Detector::new(config, Instant::now()),
            verdicts: sender,
            denied,
            prefix_lengths,
            executor,
            dropped_verdicts: AtomicU64::new(0),
        })
    }

    /// Counts an outcome; verdicts it triggers are queued for execution.
    pub fn observe(&self, outcome: &Outcome) {
        for verdict in self.detector.observe(outcome, Instant::now()) {
            if self.verdicts.try_send(verdict).is_err() {
                let dropped = self.dropped_verdicts.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(dropped, "abuse verdict queue full; verdicts dropped");
                }
            }
        }
    }

    /// Whether a client reaching us through a trusted proxy is denied at L7 right now.
    pub fn denied_at_l7(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        self.prefix_lengths.iter().any(|(v4, v6)| {
            let key = Cidr::prefix_of(client, *v4, *v6);
            match self.denied.get(&key) {
                Some(until) if until > now => true,
                Some(_) => {
                    self.denied.invalidate(&key);
                    false
                }
                None => false,
            }
        })
    }

    /// Lifts an L7 denial of any prefix holding `addr`; returns how many were lifted.
    pub fn lift_l7(&self, addr: IpAddr) -> usize {
        let keys: Vec<Cidr> = self
            .prefix_lengths
            .iter()
            .map(|(v4, v6)| Cidr::prefix_of(addr, *v4, *v6))
            .filter(|key| self.denied.contains_key(key))
            .collect();
        for key in &keys {
            self.denied.invalidate(key);
        }
        keys.len()
    }

    /// Whether any rule counts this class.
    pub fn watches(&self, class: OutcomeClass) -> bool {
        self.detector.watches(class)
    }

    pub fn counts(&self) -> &Counts {
        &self.executor.counts
    }

    /// Sources counted right now.
    pub fn tracked(&self) -> u64 {
        self.detector.tracked()
    }

    /// Counters evicted under source churn, and verdicts dropped on a full queue.
    pub fn losses(&self) -> (u64, u64) {
        (
            self.detector.evicted(),
            self.dropped_verdicts.load(Ordering::Relaxed),
        )
    }
}

/// What happened, as far as abuse detection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeClass {
    /// 401: missing or bad credentials (credential stuffing, token guessing).
    AuthFailure,
    /// 403: authenticated or not, not allowed.
    Forbidden,
    /// 400, 413, 415, 422: requests that do not validate.
    InvalidRequest,
    /// 404 from the gateway: no such route or operation (scanning for shadow APIs).
    NotFound,
    /// 429 from the gateway's L7 limits.
    RateLimited,
    /// A TLS handshake that failed.
    TlsFailure,
    /// A protocol error, e.g. an HTTP/2 connection reset for abuse.
    ProtocolError,
    /// The XDP program dropped the source for its packet rate.
    XdpRateLimit,
}

impl OutcomeClass {
    /// Every class, for counting evidence per class.
    pub const ALL: [OutcomeClass; 8] = [
        OutcomeClass::AuthFailure,
        OutcomeClass::Forbidden,
        OutcomeClass::InvalidRequest,
        OutcomeClass::NotFound,
        OutcomeClass::RateLimited,
        OutcomeClass::TlsFailure,
        OutcomeClass::ProtocolError,
        OutcomeClass::XdpRateLimit,
    ];

    /// The class of a status code the gateway answered with, if it counts at all.
    pub fn of_status(status: u16) -> Option<OutcomeClass> {
        match status {
            401 => Some(OutcomeClass::AuthFailure),
            403 => Some(OutcomeClass::Forbidden),
            400 | 413 | 415 | 422 => Some(OutcomeClass::InvalidRequest),
            404 => Some(OutcomeClass::NotFound),
            429 => Some(OutcomeClass::RateLimited),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutcomeClass::AuthFailure => "auth_failure",
            OutcomeClass::Forbidden => "forbidden",
            OutcomeClass::InvalidRequest => "invalid_request",
            OutcomeClass::NotFound => "not_found",
            OutcomeClass::RateLimited => "rate_limited",
            OutcomeClass::TlsFailure => "tls_failure",
            OutcomeClass::ProtocolError => "protocol_error",
            OutcomeClass::XdpRateLimit => "xdp_rate_limit",
        }
    }
}

/// One observation about a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The client: the L3 peer, or the forwarded client address when the peer is a trusted
    /// proxy.
    pub source: IpAddr,
    /// Whether `source` came from a trusted proxy's forwarding header; such a source cannot be
    /// dropped in the kernel (its packets arrive from the proxy) and is denied at L7 instead.
    pub behind_proxy: bool,
    pub class: OutcomeClass,
    /// How many events this observation stands for (an XDP trip event carries its drops).
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_classes() {
        assert_eq!(
            OutcomeClass::of_status(401),
            Some(OutcomeClass::AuthFailure)
        );
        assert_eq!(
            OutcomeClass::of_status(422),
            Some(OutcomeClass::InvalidRequest)
        );
        assert_eq!(OutcomeClass::of_status(404), Some(OutcomeClass::NotFound));
        assert_eq!(OutcomeClass::of_status(200), None);
        assert_eq!(
            OutcomeClass::of_status(502),
            None,
            "upstream trouble is not the client's"
        );
    }

    #[test]
    fn class_names_match_their_config_spelling() {
        for class in OutcomeClass::ALL {
            let parsed: OutcomeClass =
                serde_json::from_value(serde_json::Value::String(class.name().to_owned())).unwrap();
            assert_eq!(parsed, class);
        }
    }
}
