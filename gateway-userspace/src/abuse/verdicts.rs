//! Executing verdicts, in this order: protection (never ban what must stay reachable), dry
//! run (log and count only), escalation (repeat offenders get longer bans), enforcement (the
//! XDP blocklist, or an L7 denial when the source sits behind a trusted proxy, because banning
//! the proxy would ban everyone behind it), and the audit line.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use super::{
    audit::{AuditLog, AuditRecord, node_name},
    detector::Verdict,
    offences::Offences,
};
use crate::cidr::Cidr;

/// What the daemon provides to carry verdicts out.
pub trait Enforcer: Send + Sync {
    /// Whether run-time state protects `key` (the allowlist, above all).
    fn protected(&self, key: &Cidr) -> bool;
    /// Adds `key` to the XDP blocklist for `ttl`.
    fn ban(&self, key: Cidr, ttl: Duration, reason: String) -> Result<(), String>;
}

/// What became of a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executed {
    Banned {
        ttl: Duration,
        offence: u32,
    },
    /// Behind a trusted proxy: the caller denies the source at L7 for `ttl`.
    DeniedAtL7 {
        ttl: Duration,
        offence: u32,
    },
    WouldBan {
        ttl: Duration,
    },
    Protected,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("banning `{key}` failed: {message}")]
    Ban { key: Cidr, message: String },
    #[error(
        "writing the offence records failed (the ban is in place; its escalation may not survive a restart)"
    )]
    Offences(#[source] crate::lists::state::StateError),
    #[error("writing the audit log failed (the ban itself is in place)")]
    Audit(#[source] std::io::Error),
}

/// Verdict outcomes since start, for metrics and `status`.
#[derive(Debug, Default)]
pub struct Counts {
    pub banned: AtomicU64,
    pub denied_at_l7: AtomicU64,
    pub would_ban: AtomicU64,
    pub protected: AtomicU64,
}

pub struct Executor {
    /// Configured `never_ban`, trusted proxies, upstream endpoints.
    protected: Vec<Cidr>,
    offences: Mutex<Offences>,
    audit: Mutex<AuditLog>,
    node: String,
    pub counts: Counts,
}

impl Executor {
    pub fn new(protected: Vec<Cidr>, offences: Offences, audit: AuditLog) -> Executor {
        Executor {
            protected,
            offences: Mutex::new(offences),
            audit: Mutex::new(audit),
            node: node_name(),
            counts: Counts::default(),
        }
    }

    /// Carries a verdict out and audits it, disk writes included.
    pub fn execute(
        &self,
        verdict: &Verdict,
        enforcer: &dyn Enforcer,
        now: SystemTime,
    ) -> Result<Executed, ExecuteError> {
        let (outcome, record) = self.enforce(verdict, enforcer, now)?;
        self.record(&record)?;
        Ok(outcome)
    }

    /// Carries a verdict out without touching the disk; [`Executor::record`] then writes the
    /// offence and the audit line. Split so that a slow disk never delays the next ban.
    pub fn enforce(
        &self,
        verdict: &Verdict,
        enforcer: &dyn Enforcer,
        now: SystemTime,
    ) -> Result<(Executed, AuditRecord), ExecuteError> {
        let key = verdict.key;
        let now_unix_ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut offences = self.offences.lock().unwrap_or_else(|p| p.into_inner());
        let protected = self.protected.iter().any(|p| p.overlaps(&key)) || enforcer.protected(&key);
        let (outcome, ttl, offence) = if protected {
            self.counts.protected.fetch_add(1, Ordering::Relaxed);
            (Executed::Protected, Duration::ZERO, offences.count(&key))
        } else if verdict.dry_run {
            // Not an offence: a dry run must change nothing, escalation included.
            self.counts.would_ban.fetch_add(1, Ordering::Relaxed);
            let ttl = verdict.ban;
            (Executed::WouldBan { ttl }, ttl, offences.count(&key) + 1)
        } else {
            let sentence = offences.sentence(key, verdict.ban, now_unix_ms);
            let (ttl, offence) = (sentence.ban, sentence.offence);
            let outcome = if verdict.behind_proxy {
                // The caller denies it at L7: the kernel must keep passing the proxy.
                self.counts.denied_at_l7.fetch_add(1, Ordering::Relaxed);
                Executed::DeniedAtL7 { ttl, offence }
            } else {
                let reason = format!(
                    "abuse rule `{}`: {} in {}",
                    verdict.rule,
                    evidence_text(verdict),
                    humantime::format_duration(verdict.window)
                );
                enforcer
                    .ban(key, ttl, reason)
                    .map_err(|message| ExecuteError::Ban { key, message })?;
                self.counts.banned.fetch_add(1, Ordering::Relaxed);
                Executed::Banned { ttl, offence }
            };
            (outcome, ttl, offence)
        };
        drop(offences);
        let record = AuditRecord {
            time: humantime::format_rfc3339_seconds(now).to_string(),
            node: self.node.clone(),
            source: key.to_string(),
            rule: verdict.rule.to_string(),
            enforcement: match outcome {
                Executed::Banned { .. } => "xdp",
                Executed::DeniedAtL7 { .. } => "l7",
                Executed::WouldBan { .. } => "dry_run",
                Executed::Protected => "protected",
            },
            evidence: verdict
                .evidence
                .iter()
                .map(|(class, n)| (class.name().to_owned(), *n))
                .collect(),
            window_secs: verdict.window.as_secs(),
            ttl_secs: ttl.as_secs(),
            offence,
        };
        match outcome {
            Executed::Protected => tracing::warn!(
                source = %key, rule = %verdict.rule,
                "abuse rule fired for a protected source; not banned"
            ),
            Executed::WouldBan { ttl } => tracing::info!(
                source = %key, rule = %verdict.rule, ttl = %humantime::format_duration(ttl),
                "dry run: would ban"
            ),
            Executed::Banned { ttl, offence } | Executed::DeniedAtL7 { ttl, offence } => {
                tracing::warn!(
                    source = %key, rule = %verdict.rule, offence,
                    ttl = %humantime::format_duration(ttl),
                    enforcement = record.enforcement,
                    evidence = %evidence_text(verdict),
                    "abusive source banned"
                );
            }
        }
        Ok((outcome, record))
    }

    /// Writes the offence records and the audit line of an enforced verdict.
    pub fn record(&self, record: &AuditRecord) -> Result<(), ExecuteError> {
        if matches!(record.enforcement, "xdp" | "l7") {
            let offences = self.offences.lock().unwrap_or_else(|p| p.into_inner());
            offences.persist().map_err(ExecuteError::Offences)?;
        }
        self.audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(record)
            .map_err(ExecuteError::Audit)
    }
}

fn evidence_text(verdict: &Verdict) -> String {
    verdict
        .evidence
        .iter()
        .map(|(class, n)| format!("{n} {}", class.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        sync::Arc,
    };

    use super::*;
    use crate::abuse::{OutcomeClass, offences::Escalation};

    #[derive(Default)]
    struct Recorder {
        allowlisted: Vec<Cidr>,
        bans: Mutex<Vec<(Cidr, Duration, String)>>,
    }

    impl Enforcer for Recorder {
        fn protected(&self, key: &Cidr) -> bool {
            self.allowlisted.iter().any(|a| a.overlaps(key))
        }
        fn ban(&self, key: Cidr, ttl: Duration, reason: String) -> Result<(), String> {
            self.bans.lock().unwrap().push((key, ttl, reason));
            Ok(())
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-verdicts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn executor(dir: &Path, protected: Vec<Cidr>) -> Executor {
        let escalation = Escalation {
            factor: 2,
            max_ban: Duration::from_secs(3600),
            memory: Duration::from_secs(86_400),
        };
        Executor::new(
            protected,
            Offences::open(&dir.join("offences.tsv"), escalation).unwrap(),
            AuditLog::open(&dir.join("audit.jsonl"), 1 << 20, 2).unwrap(),
        )
    }

    fn verdict(key: &str) -> Verdict {
        Verdict {
            rule: Arc::from("stuffing"),
            key: key.parse().unwrap(),
            ban: Duration::from_secs(600),
            dry_run: false,
            behind_proxy: false,
            window: Duration::from_secs(60),
            evidence: vec![(OutcomeClass::AuthFailure, 20)],
        }
    }

    fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn bans_escalate_and_are_audited() {
        let dir = dir("escalate");
        let executor = executor(&dir, vec![]);
        let enforcer = Recorder::default();
        let now = SystemTime::now();
        let first = executor
            .execute(&verdict("198.51.100.7"), &enforcer, now)
            .unwrap();
        assert_eq!(
            first,
            Executed::Banned {
                ttl: Duration::from_secs(600),
                offence: 1
            }
        );
        let second = executor
            .execute(&verdict("198.51.100.7"), &enforcer, now)
            .unwrap();
        assert_eq!(
            second,
            Executed::Banned {
                ttl: Duration::from_secs(1200),
                offence: 2
            }
        );
        let bans = enforcer.bans.lock().unwrap();
        assert_eq!(bans.len(), 2);
        assert!(bans[0].2.contains("20 auth_failure"), "{}", bans[0].2);
        let lines = audit_lines(&dir);
        assert_eq!(lines.len(), 2, "one audit line per verdict");
        assert_eq!(lines[1]["ttl_secs"], 1200);
        assert_eq!(lines[1]["offence"], 2);
        assert_eq!(lines[1]["enforcement"], "xdp");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn protected_sources_are_never_banned() {
        let dir = dir("protected");
        let executor = executor(&dir, vec!["10.1.0.0/16".parse().unwrap()]);
        let enforcer = Recorder {
            allowlisted: vec!["198.51.100.5".parse().unwrap()],
            ..Recorder::default()
        };
        let now = SystemTime::now();
        for key in ["10.1.2.3", "198.51.100.5", "198.51.100.0/24"] {
            let executed = executor.execute(&verdict(key), &enforcer, now).unwrap();
            assert_eq!(executed, Executed::Protected, "{key}");
        }
        assert!(enforcer.bans.lock().unwrap().is_empty());
        assert_eq!(executor.counts.protected.load(Ordering::Relaxed), 3);
        assert_eq!(audit_lines(&dir)[2]["enforcement"], "protected");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dry_run_changes_nothing_but_logs_and_counts() {
        let dir = dir("dry");
        let executor = executor(&dir, vec![]);
        let enforcer = Recorder::default();
        let mut dry = verdict("198.51.100.8");
        dry.dry_run = true;
        let now = SystemTime::now();
        for _ in 0..3 {
            let executed = executor.execute(&dry, &enforcer, now).unwrap();
            assert_eq!(
                executed,
                Executed::WouldBan {
                    ttl: Duration::from_secs(600)
                }
            );
        }
        assert!(enforcer.bans.lock().unwrap().is_empty());
        assert_eq!(executor.counts.would_ban.load(Ordering::Relaxed), 3);
        // Dry runs do not count as offences: a real ban afterwards is a first offence.
        let real = executor
            .execute(&verdict("198.51.100.8"), &enforcer, now)
            .unwrap();
        assert_eq!(
            real,
            Executed::Banned {
                ttl: Duration::from_secs(600),
                offence: 1
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sources_behind_a_trusted_proxy_are_denied_at_l7() {
        let dir = dir("proxy");
        let executor = executor(&dir, vec![]);
        let enforcer = Recorder::default();
        let mut behind = verdict("203.0.113.50");
        behind.behind_proxy = true;
        let executed = executor
            .execute(&behind, &enforcer, SystemTime::now())
            .unwrap();
        assert!(matches!(executed, Executed::DeniedAtL7 { .. }));
        assert!(
            enforcer.bans.lock().unwrap().is_empty(),
            "the proxy's packets must keep flowing"
        );
        assert_eq!(audit_lines(&dir)[0]["enforcement"], "l7");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
