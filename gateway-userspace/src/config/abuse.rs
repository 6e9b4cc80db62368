//! `[abuse]`: which outcomes count against a source, how many in what window make a ban, how
//! long bans last and how they grow for repeat offenders, and who is never banned.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::{abuse::OutcomeClass, cidr::Cidr};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Default `true` (with the rules below; no rules means nothing is ever banned).
    pub enabled: bool,
    /// Sources (or aggregates) tracked at once per rule; beyond it the least recently seen are
    /// evicted (counted), so spoofed-source churn cannot exhaust memory. Default 100,000.
    pub max_tracked_sources: u64,
    /// Never banned, whatever they do: health checkers, monitoring, partners. The allowlist,
    /// trusted proxies and upstream endpoints are protected without being listed here.
    pub never_ban: Vec<Cidr>,
    /// Each further offence multiplies the ban by this factor. Default 2.
    pub escalation_factor: u32,
    /// Escalated bans stop growing here. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub max_ban: Duration,
    /// An offender's record is forgotten after this long without a new ban. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub offence_memory: Duration,
    /// The audit log (JSON lines). Default `<state_dir>/audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// The audit log is rotated past this size. Default 10 MiB.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept. Default 5.
    pub audit_keep: u32,
    pub rules: Vec<RuleConfig>,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            enabled: true,
            max_tracked_sources: 100_000,
            never_ban: Vec::new(),
            escalation_factor: 2,
            max_ban: Duration::from_secs(7 * 24 * 3600),
            offence_memory: Duration::from_secs(30 * 24 * 3600),
            audit_log: None,
            audit_max_bytes: 10 * 1024 * 1024,
            audit_keep: 5,
            rules: Vec::new(),
        }
    }
}

/// One detection rule: `threshold` outcomes of `classes` within `window` from one source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub classes: Vec<OutcomeClass>,
    pub threshold: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The first ban's length; repeat offences escalate it.
    #[serde(with = "humantime_serde")]
    pub ban: Duration,
    /// Log and count "would ban" only.
    #[serde(default)]
    pub dry_run: bool,
    /// IPv4 sources are counted (and banned) per prefix of this length. Default 32.
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: u8,
    /// IPv6 sources are counted (and banned) per prefix of this length: one host usually owns
    /// a /64 and can rotate addresses inside it. Default 64.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

fn default_ipv4_prefix() -> u8 {
    32
}

fn default_ipv6_prefix() -> u8 {
    64
}

/// Checks the `[abuse]` table.
pub(super) fn validate(abuse: &AbuseConfig) -> Result<(), ConfigError> {
    if abuse.escalation_factor == 0 {
        return Err(invalid(
            "abuse.escalation_factor",
            "must be at least 1 (1 = no escalation)",
        ));
    }
    if abuse.max_tracked_sources == 0 {
        return Err(invalid("abuse.max_tracked_sources", "must be at least 1"));
    }
    if abuse.audit_keep == 0 || abuse.audit_max_bytes < 4096 {
        return Err(invalid(
            "abuse.audit_keep",
            "keep at least 1 rotated file, and `audit_max_bytes` at least 4096",
        ));
    }
    for (i, rule) in abuse.rules.iter().enumerate() {
        let key = |field: &str| format!("abuse.rules[{i}].{field}");
        if rule.name.is_empty() || abuse.rules[..i].iter().any(|r| r.name == rule.name) {
            return Err(invalid(
                &key("name"),
                "give every rule a unique, non-empty name",
            ));
        }
        if rule.classes.is_empty() {
            return Err(invalid(
                &key("classes"),
                "name at least one outcome class (auth_failure, forbidden, invalid_request, not_found, rate_limited, tls_failure, protocol_error, xdp_rate_limit)",
            ));
        }
        if rule.threshold == 0 {
            return Err(invalid(&key("threshold"), "must be at least 1"));
        }
        if rule.window < Duration::from_millis(100) || rule.window > Duration::from_secs(86_400) {
            return Err(invalid(&key("window"), "must be between 100ms and 24h"));
        }
        if rule.ban < Duration::from_secs(1) || rule.ban > abuse.max_ban {
            return Err(invalid(
                &key("ban"),
                "must be between 1s and `abuse.max_ban`",
            ));
        }
        if !(8..=32).contains(&rule.ipv4_prefix) {
            return Err(invalid(&key("ipv4_prefix"), "must be between 8 and 32"));
        }
        if !(16..=128).contains(&rule.ipv6_prefix) {
            return Err(invalid(&key("ipv6_prefix"), "must be between 16 and 128"));
        }
    }
    Ok(())
}
