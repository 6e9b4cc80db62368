//! The allowlist and blocklist as operators see them: each entry with its origin, reason and
//! expiry, kept in step with the kernel maps (the kernel holds what it needs to decide a packet;
//! this module holds why), swept when expired, and persisted by [`state`] across restarts.
pub mod state;

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    config::XdpConfig,
    xdp::{DataPlane, ListKind, XdpError, clock::ClockPair},
};

/// Who put an entry there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Listed in the config file; follows the file on restart.
    Config,
    /// Added through the CLI or admin API.
    Manual,
    /// Added by a bulk import.
    Import,
    /// Found in pinned maps without a record in the state file (a crash between a change and
    /// its persistence); kept rather than silently dropped.
    Recovered,
    /// Banned by an abuse rule.
    Auto,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Manual => "manual",
            Origin::Import => "import",
            Origin::Recovered => "recovered",
            Origin::Auto => "auto",
        }
    }

    pub fn from_name(name: &str) -> Option<Origin> {
        [
            Origin::Config,
            Origin::Manual,
            Origin::Import,
            Origin::Recovered,
        ]
        .into_iter()
        .find(|o| o.name() == name)
    }
}

/// What userspace knows about an entry beyond what the kernel needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Monotonic deadline, 0 = permanent (the kernel's convention).
    pub expires_at_ns: u64,
    pub origin: Origin,
    pub reason: Option<String>,
    pub added_unix_ms: u64,
}

/// One entry to add, as the admin API receives it (unvalidated).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntrySpec {
    pub cidr: String,
    /// Time to live in milliseconds; absent = permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One entry as listed to operators.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryView {
    pub cidr: Cidr,
    pub origin: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Wall-clock expiry in ms since the epoch; absent = permanent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    pub added_unix_ms: u64,
    /// Packets that matched this entry in the kernel.
    pub hits: u64,
}

/// An entry that was not applied, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rejected {
    pub cidr: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddReport {
    pub added: usize,
    pub updated: usize,
    pub rejected: Vec<Rejected>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoveReport {
    pub removed: usize,
    /// Entries that were not listed (or not valid CIDRs).
    pub missing: Vec<Rejected>,
}

/// Longest reason text kept with an entry.
pub const MAX_REASON_LEN: usize = 256;

/// Checks a free-text reason: it is stored in a line-based state file and shown in terminals.
pub fn validate_reason(reason: &str) -> Result<(), String> {
    if reason.len() > MAX_REASON_LEN {
        return Err(format!("reason is longer than {MAX_REASON_LEN} bytes"));
    }
    if reason.chars().any(char::is_control) {
        return Err("reason contains control characters (tabs, newlines ...)".to_owned());
    }
    Ok(())
}

/// The lists, in step with a [`DataPlane`].
pub struct Lists<D> {
    plane: D,
    entries: HashMap<(ListKind, Cidr), Meta>,
    /// Changed since the state file was last written.
    dirty: bool,
}

impl<D: DataPlane> Lists<D> {
    /// Rebuilds the lists from the persisted state and whatever the (possibly pinned) kernel maps
    /// already hold, then applies the config file's static lists.
    pub fn restore(
        plane: D,
        persisted: Vec<state::Record>,
        config: &XdpConfig,
        clocks: ClockPair,
    ) -> Result<Self, XdpError> {
        let mut lists = Lists {
            plane,
            entries: HashMap::new(),
            dirty: false,
        };
        // What pinned maps already hold: on a daemon restart that is everything, and rewriting
        // a million unchanged entries would only delay the start.
        let mut in_kernel: HashMap<(ListKind, Cidr), u64> = HashMap::new();
        for list in [ListKind::Allow, ListKind::Block] {
            for (cidr, entry) in lists.plane.entries(list)? {
                in_kernel.insert((list, cidr), entry.expires_at_ns);
            }
        }
        for record in persisted {
            let key = (record.list, record.cidr);
            let expires_at_ns = match record.expires_unix_ms {
                None => 0,
                Some(unix_ms) => match clocks.to_monotonic_ns(unix_ms) {
                    Some(deadline) => deadline,
                    None => continue, // expired while we were down
                },
            };
            // The state file keeps milliseconds of wall-clock time; the kernel's deadline is the
            // exact one when the entry is still pinned.
            let expires_at_ns = match in_kernel.remove(&key) {
                Some(kernel) if kernel.abs_diff(expires_at_ns) < 1_000_000_000 => kernel,
                _ => {
                    lists
                        .plane
                        .upsert(record.list, record.cidr, expires_at_ns)?;
                    expires_at_ns
                }
            };
            lists.entries.insert(
                key,
                Meta {
                    expires_at_ns,
                    origin: record.origin,
                    reason: record.reason,
                    added_unix_ms: record.added_unix_ms,
                },
            );
        }
        let mut recovered = 0usize;
        for ((list, cidr), expires_at_ns) in in_kernel {
            if expires_at_ns != 0 && expires_at_ns <= clocks.monotonic_ns {
                lists.plane.remove(list, cidr)?;
                continue;
            }
            recovered += 1;
            lists.dirty = true;
            lists.entries.insert(
                (list, cidr),
                Meta {
                    expires_at_ns,
                    origin: Origin::Recovered,
                    reason: None,
                    added_unix_ms: clocks.unix_ms,
                },
            );
        }
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "kept entries found only in the pinned maps (the state file missed them, e.g. after a crash); they are listed with origin `recovered`"
            );
        }
        lists.apply_config(config, clocks)?;
        Ok(lists)
    }

    /// Makes the `config`-origin entries match the config file.
    pub fn apply_config(&mut self, config: &XdpConfig, clocks: ClockPair) -> Result<(), XdpError> {
        let wanted: Vec<(ListKind, Cidr)> = config
            .allowlist
            .iter()
            .map(|c| (ListKind::Allow, *c))
            .chain(config.blocklist.iter().map(|c| (ListKind::Block, *c)))
            .collect();
        let stale: Vec<(ListKind, Cidr)> = self
            .entries
            .iter()
            .filter(|(key, meta)| meta.origin == Origin::Config && !wanted.contains(key))
            .map(|(key, _)| *key)
            .collect();
        for (list, cidr) in stale {
            self.plane.remove(list, cidr)?;
            self.entries.remove(&(list, cidr));
            self.dirty = true;
        }
        for (list, cidr) in wanted {
            let current = self.entries.get(&(list, cidr));
            if current.is_some_and(|m| m.origin == Origin::Config) {
                continue;
            }
            self.plane.upsert(list, cidr, 0)?;
            self.entries.insert(
                (list, cidr),
                Meta {
                    expires_at_ns: 0,
                    origin: Origin::Config,
                    reason: Some("config file".to_owned()),
                    added_unix_ms: clocks.unix_ms,
                },
            );
            self.dirty = true;
        }
        Ok(())
    }

    /// Adds or updates entries; each bad entry is reported and skipped, the rest applied.
    pub fn add(
        &mut self,
        list: ListKind,
        specs: Vec<EntrySpec>,
        origin: Origin,
        clocks: ClockPair,
    ) -> AddReport {
        let mut report = AddReport::default();
        for spec in specs {
            match self.add_one(list, &spec, origin, clocks) {
                Ok(true) => report.added += 1,
                Ok(false) => report.updated += 1,
                Err(error) => report.rejected.push(Rejected {
                    cidr: spec.cidr,
                    error,
                }),
            }
        }
        report
    }

    fn add_one(
        &mut self,
        list: ListKind,
        spec: &EntrySpec,
        origin: Origin,
        clocks: ClockPair,
    ) -> Result<bool, String> {
        let cidr: Cidr = spec
            .cidr
            .parse()
            .map_err(|e: crate::cidr::CidrError| e.to_string())?;
        if list == ListKind::Block && cidr.prefix_len() == 0 {
            return Err("a /0 prefix would drop every packet".to_owned());
        }
        if let Some(reason) = &spec.reason {
            validate_reason(reason)?;
        }
        let expires_at_ns = match spec.ttl_ms {
            None => 0,
            Some(0) => return Err("a TTL must be longer than zero".to_owned()),
            Some(ms) => clocks.deadline_after(Duration::from_millis(ms)),
        };
        if self
            .entries
            .get(&(list, cidr))
            .is_some_and(|m| m.origin == Origin::Config)
        {
            return Err("listed in the config file; change it there".to_owned());
        }
        self.plane
            .upsert(list, cidr, expires_at_ns)
            .map_err(|e| error_chain(&e))?;
        self.dirty = true;
        let previous = self.entries.insert(
            (list, cidr),
            Meta {
                expires_at_ns,
                origin,
                reason: spec.reason.clone(),
                added_unix_ms: clocks.unix_ms,
            },
        );
        Ok(previous.is_none())
    }

    /// Removes entries; unknown ones are reported, the rest removed.
    pub fn remove(&mut self, list: ListKind, cidrs: Vec<String>) -> RemoveReport {
        let mut report = RemoveReport::default();
        for text in cidrs {
            let outcome = text
                .parse::<Cidr>()
                .map_err(|e| e.to_string())
                .and_then(|cidr| match self.entries.get(&(list, cidr)) {
                    None => Err(format!("not in the {}list", list.name())),
                    Some(meta) if meta.origin == Origin::Config => {
                        Err("listed in the config file; remove it there".to_owned())
                    }
                    Some(_) => Ok(cidr),
                })
                .and_then(|cidr| {
                    self.plane.remove(list, cidr).map_err(|e| error_chain(&e))?;
                    self.entries.remove(&(list, cidr));
                    Ok(())
                });
            match outcome {
                Ok(()) => {
                    report.removed += 1;
                    self.dirty = true;
                }
                Err(error) => report.missing.push(Rejected { cidr: text, error }),
            }
        }
        report
    }

    /// Every live entry of a list, sorted, with hit counts from the kernel.
    pub fn list(&self, list: ListKind, clocks: ClockPair) -> Result<Vec<EntryView>, XdpError> {
        let hits: HashMap<Cidr, u64> = self
            .plane
            .entries(list)?
            .into_iter()
            .map(|(cidr, entry)| (cidr, entry.hits))
            .collect();
        let mut out: Vec<EntryView> = self
            .entries
            .iter()
            .filter(|((kind, _), meta)| *kind == list && is_live(meta, clocks.monotonic_ns))
            .map(|((_, cidr), meta)| EntryView {
                cidr: *cidr,
                origin: meta.origin,
                reason: meta.reason.clone(),
                expires_unix_ms: (meta.expires_at_ns != 0)
                    .then(|| clocks.to_unix_ms(meta.expires_at_ns)),
                added_unix_ms: meta.added_unix_ms,
                hits: hits.get(cidr).copied().unwrap_or(0),
            })
            .collect();
        out.sort_by_key(|e| e.cidr);
        Ok(out)
    }

    /// The live entries of `list` that hold `addr` (an address can sit in a /32 and a /24 ban).
    pub fn containing(
        &self,
        list: ListKind,
        addr: std::net::IpAddr,
        clocks: ClockPair,
    ) -> Result<Vec<EntryView>, XdpError> {
        Ok(self
            .list(list, clocks)?
            .into_iter()
            .filter(|entry| entry.cidr.contains(addr))
            .collect())
    }

    /// Removes expired entries from the maps and from the lists. Returns how many.
    pub fn sweep(&mut self, now_ns: u64) -> Result<usize, XdpError> {
        let expired: Vec<(ListKind, Cidr)> = self
            .entries
            .iter()
            .filter(|(_, meta)| !is_live(meta, now_ns))
            .map(|(key, _)| *key)
            .collect();
        for (list, cidr) in &expired {
            self.plane.remove(*list, *cidr)?;
            self.entries.remove(&(*list, *cidr));
        }
        if !expired.is_empty() {
            self.dirty = true;
        }
        Ok(expired.len())
    }

    /// Whether a live allowlist entry shares an address with `cidr`. Asks the kernel maps,
    /// whose allow tries are small, rather than walking every entry of both lists here.
    pub fn allowlisted(&self, cidr: &Cidr, now_ns: u64) -> Result<bool, XdpError> {
        Ok(self
            .plane
            .entries(ListKind::Allow)?
            .iter()
            .any(|(entry, value)| value.is_live(now_ns) && entry.overlaps(cidr)))
    }

    /// Number of entries per list.
    pub fn len(&self, list: ListKind) -> usize {
        self.entries
            .keys()
            .filter(|(kind, _)| *kind == list)
            .count()
    }

    pub fn plane(&self) -> &D {
        &self.plane
    }

    pub fn plane_mut(&mut self) -> &mut D {
        &mut self.plane
    }

    /// The state file's contents if anything changed since the last call, and marks clean.
    pub fn take_dirty_state(&mut self, clocks: ClockPair) -> Option<Vec<u8>> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(state::render(self.entries.iter().map(
            |((list, cidr), meta)| state::Record {
                list: *list,
                cidr: *cidr,
                expires_unix_ms:
                    (meta.expires_at_ns != 0).then(|| clocks.to_unix_ms(meta.expires_at_ns)),
                origin: meta.origin,
                added_unix_ms: meta.added_unix_ms,
                reason: meta.reason.clone(),
            },
        )))
    }

    /// Marks the lists changed, e.g. after a failed write that must be retried.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }
}

fn is_live(meta: &Meta, now_ns: u64) -> bool {
    meta.expires_at_ns == 0 || now_ns < meta.expires_at_ns
}

/// An error with its causes, for reports that cross the admin socket.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp::fake::FakeDataPlane;

    const T0: ClockPair = ClockPair {
        monotonic_ns: 1_000_000_000_000,
        unix_ms: 1_700_000_000_000,
    };

    fn later(clocks: ClockPair, secs: u64) -> ClockPair {
        ClockPair {
            monotonic_ns: clocks.monotonic_ns + secs * 1_000_000_000,
            unix_ms: clocks.unix_ms + secs * 1000,
        }
    }

    fn spec(cidr: &str, ttl_secs: Option<u64>) -> EntrySpec {
        EntrySpec {
            cidr: cidr.to_owned(),
            ttl_ms: ttl_secs.map(|s| s * 1000),
            reason: Some("test".to_owned()),
        }
    }

    fn empty() -> Lists<FakeDataPlane> {
        Lists::restore(
            FakeDataPlane::default(),
            Vec::new(),
            &XdpConfig::default(),
            T0,
        )
        .unwrap()
    }

    #[test]
    fn bad_entries_are_reported_and_good_ones_kept() {
        let mut lists = empty();
        let report = lists.add(
            ListKind::Block,
            vec![
                spec("203.0.113.0/24", None),
                spec("not-an-ip", None),
                spec("198.51.100.7", Some(60)),
                spec("0.0.0.0/0", None),
                spec("198.51.100.8", Some(0)),
            ],
            Origin::Manual,
            T0,
        );
        assert_eq!(report.added, 2);
        assert_eq!(report.rejected.len(), 3);
        assert_eq!(report.rejected[0].cidr, "not-an-ip");
        assert_eq!(lists.plane().entries.len(), 2);
        let deadline = lists.plane().entries[&(ListKind::Block, "198.51.100.7".parse().unwrap())];
        assert_eq!(deadline.expires_at_ns, T0.monotonic_ns + 60_000_000_000);
    }

    #[test]
    fn re_adding_updates_instead_of_duplicating() {
        let mut lists = empty();
        lists.add(
            ListKind::Block,
            vec![spec("198.51.100.7", Some(60))],
            Origin::Manual,
            T0,
        );
        let report = lists.add(
            ListKind::Block,
            vec![spec("198.51.100.7", None)],
            Origin::Manual,
            T0,
        );
        assert_eq!((report.added, report.updated), (0, 1));
        let entry = lists.plane().entries[&(ListKind::Block, "198.51.100.7".parse().unwrap())];
        assert_eq!(
            entry.expires_at_ns, 0,
            "the new TTL (permanent) replaces the old"
        );
    }

    #[test]
    fn expired_entries_are_swept_from_maps_and_lists() {
        let mut lists = empty();
        lists.add(
            ListKind::Block,
            vec![spec("198.51.100.7", Some(10)), spec("198.51.100.8", None)],
            Origin::Manual,
            T0,
        );
        assert_eq!(lists.sweep(later(T0, 5).monotonic_ns).unwrap(), 0);
        assert_eq!(lists.sweep(later(T0, 10).monotonic_ns).unwrap(), 1);
        let listed = lists.list(ListKind::Block, later(T0, 11)).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].cidr.to_string(), "198.51.100.8");
        assert_eq!(lists.plane().entries.len(), 1);
    }

    #[test]
    fn removing_reports_unknown_entries() {
        let mut lists = empty();
        lists.add(
            ListKind::Allow,
            vec![spec("10.0.0.0/8", None)],
            Origin::Manual,
            T0,
        );
        let report = lists.remove(
            ListKind::Allow,
            vec!["10.0.0.0/8".into(), "10.1.0.0/16".into(), "junk".into()],
        );
        assert_eq!(report.removed, 1);
        assert_eq!(report.missing.len(), 2);
        assert!(lists.plane().entries.is_empty());
    }

    #[test]
    fn state_round_trips_through_a_restart() {
        let mut lists = empty();
        lists.add(
            ListKind::Block,
            vec![
                spec("198.51.100.7", Some(3600)),
                spec("2001:db8::/32", None),
            ],
            Origin::Manual,
            T0,
        );
        let bytes = lists.take_dirty_state(T0).expect("changes are dirty");
        assert!(lists.take_dirty_state(T0).is_none(), "clean after taking");

        // A reboot: the monotonic clock restarts, the wall clock moves on by 10 minutes.
        let after_reboot = ClockPair {
            monotonic_ns: 5_000_000_000,
            unix_ms: T0.unix_ms + 600_000,
        };
        let (records, errors) = state::parse(std::str::from_utf8(&bytes).unwrap());
        assert!(errors.is_empty(), "{errors:?}");
        let restored = Lists::restore(
            FakeDataPlane::default(),
            records,
            &XdpConfig::default(),
            after_reboot,
        )
        .unwrap();
        let listed = restored.list(ListKind::Block, after_reboot).unwrap();
        assert_eq!(listed.len(), 2);
        let v4 = listed.iter().find(|e| e.cidr.is_ipv4()).unwrap();
        assert_eq!(v4.expires_unix_ms, Some(T0.unix_ms + 3_600_000));
        let kernel = restored.plane().entries[&(ListKind::Block, v4.cidr)];
        assert_eq!(
            kernel.expires_at_ns,
            after_reboot.monotonic_ns + 3_000_000_000_000
        );
    }

    #[test]
    fn entries_only_in_pinned_maps_are_kept_as_recovered() {
        let mut plane = FakeDataPlane::default();
        plane
            .upsert(ListKind::Block, "198.51.100.9".parse().unwrap(), 0)
            .unwrap();
        plane
            .upsert(
                ListKind::Block,
                "198.51.100.10".parse().unwrap(),
                T0.monotonic_ns - 1,
            )
            .unwrap();
        let lists = Lists::restore(plane, Vec::new(), &XdpConfig::default(), T0).unwrap();
        let listed = lists.list(ListKind::Block, T0).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].origin, Origin::Recovered);
        assert_eq!(lists.plane().entries.len(), 1, "the expired one is removed");
    }

    #[test]
    fn config_entries_follow_the_file() {
        let mut config = XdpConfig {
            allowlist: vec!["127.0.0.1".parse().unwrap()],
            blocklist: vec!["192.0.2.0/24".parse().unwrap()],
            ..XdpConfig::default()
        };
        let mut lists = Lists::restore(FakeDataPlane::default(), Vec::new(), &config, T0).unwrap();
        assert_eq!(lists.plane().entries.len(), 2);
        let report = lists.remove(ListKind::Block, vec!["192.0.2.0/24".into()]);
        assert_eq!(
            report.removed, 0,
            "config entries are changed in the file only"
        );

        config.blocklist.clear();
        lists.apply_config(&config, T0).unwrap();
        assert_eq!(lists.plane().entries.len(), 1);
        assert_eq!(lists.len(ListKind::Block), 0);
    }

    #[test]
    fn a_full_map_rejects_the_rest_without_losing_the_first() {
        let plane = FakeDataPlane {
            capacity: Some(1),
            ..FakeDataPlane::default()
        };
        let mut lists = Lists::restore(plane, Vec::new(), &XdpConfig::default(), T0).unwrap();
        let report = lists.add(
            ListKind::Block,
            vec![spec("198.51.100.1", None), spec("198.51.100.2", None)],
            Origin::Import,
            T0,
        );
        assert_eq!(report.added, 1);
        assert!(
            report.rejected[0].error.contains("full"),
            "{:?}",
            report.rejected
        );
        assert_eq!(lists.len(ListKind::Block), 1);
    }

    #[test]
    fn reasons_with_control_characters_are_refused() {
        let mut lists = empty();
        let mut bad = spec("198.51.100.1", None);
        bad.reason = Some("line\nbreak".to_owned());
        let report = lists.add(ListKind::Block, vec![bad], Origin::Manual, T0);
        assert_eq!(report.rejected.len(), 1);
    }
}
