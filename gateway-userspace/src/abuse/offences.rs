//! Repeat offenders: how often each prefix was banned and when last, so the next ban grows
//! (first ban × factor per earlier offence, up to a maximum). Kept in a small TSV file beside
//! the lists and rewritten atomically on every ban, so escalation survives restarts.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cidr::Cidr,
    lists::state::{StateError, write_atomic},
};

const HEADER: &str = "# gateway offences v1: cidr, bans so far, last ban (unix ms)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    count: u32,
    last_unix_ms: u64,
}

/// How bans escalate.
#[derive(Clone, Copy, Debug)]
pub struct Escalation {
    pub factor: u32,
    pub max_ban: Duration,
    /// A record older than this is forgotten: the next ban is a first offence again.
    pub memory: Duration,
}

pub struct Offences {
    path: PathBuf,
    escalation: Escalation,
    records: HashMap<Cidr, Record>,
}

/// The ban a new offence earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sentence {
    pub ban: Duration,
    /// 1 for a first offence.
    pub offence: u32,
}

impl Offences {
    /// Loads the file (a missing file is a clean record; damaged lines are skipped and logged).
    pub fn open(path: &Path, escalation: Escalation) -> Result<Offences, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut records = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Some((cidr, record)) => {
                    records.insert(cidr, record);
                }
                None => tracing::warn!(
                    file = %path.display(),
                    line = index + 1,
                    "skipped a damaged offence record"
                ),
            }
        }
        Ok(Offences {
            path: path.to_owned(),
            escalation,
            records,
        })
    }

    /// Records a new offence of `key` at `now_unix_ms` (in memory: call [`Offences::persist`]
    /// once the ban is in place, so the disk write does not delay it) and returns its ban:
    /// `first_ban` × factor^(earlier offences still remembered), capped at the maximum.
    pub fn sentence(&mut self, key: Cidr, first_ban: Duration, now_unix_ms: u64) -> Sentence {
        let memory_ms = u64::try_from(self.escalation.memory.as_millis()).unwrap_or(u64::MAX);
        let earlier = self
            .records
            .get(&key)
            .filter(|r| now_unix_ms.saturating_sub(r.last_unix_ms) < memory_ms)
            .map_or(0, |r| r.count);
        let multiplier = self.escalation.factor.saturating_pow(earlier);
        let ban = first_ban
            .saturating_mul(multiplier)
            .min(self.escalation.max_ban);
        self.records.insert(
            key,
            Record {
                count: earlier + 1,
                last_unix_ms: now_unix_ms,
            },
        );
        self.forget_older_than(now_unix_ms.saturating_sub(memory_ms));
        Sentence {
            ban,
            offence: earlier + 1,
        }
    }

    /// Earlier bans of `key` still remembered.
    pub fn count(&self, key: &Cidr) -> u32 {
        self.records.get(key).map_or(0, |r| r.count)
    }

    fn forget_older_than(&mut self, cutoff_unix_ms: u64) {
        self.records.retain(|_, r| r.last_unix_ms >= cutoff_unix_ms);
    }

    /// Writes the records to disk (atomically).
    pub fn persist(&self) -> Result<(), StateError> {
        let mut out = String::from(HEADER);
        out.push('\n');
        for (cidr, record) in &self.records {
            let _ = writeln!(out, "{cidr}\t{}\t{}", record.count, record.last_unix_ms);
        }
        write_atomic(&self.path, out.as_bytes())
    }
}

fn parse_line(line: &str) -> Option<(Cidr, Record)> {
    let mut fields = line.split('\t');
    let cidr = fields.next()?.parse().ok()?;
    let count = fields.next()?.parse().ok()?;
    let last_unix_ms = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((
        cidr,
        Record {
            count,
            last_unix_ms,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    fn escalation() -> Escalation {
        Escalation {
            factor: 2,
            max_ban: Duration::from_secs(3600),
            memory: Duration::from_secs(7 * 86_400),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-offences-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("offences.tsv")
    }

    #[test]
    fn repeat_offences_double_up_to_the_maximum_and_survive_a_restart() {
        let path = scratch("escalate");
        let key: Cidr = "198.51.100.7".parse().unwrap();
        let first = Duration::from_secs(600);
        let mut offences = Offences::open(&path, escalation()).unwrap();
        let t = 1_700_000_000_000;
        assert_eq!(
            offences.sentence(key, first, t),
            Sentence {
                ban: first,
                offence: 1
            }
        );
        assert_eq!(offences.sentence(key, first, t + 1).ban, first * 2);

        offences.persist().unwrap();
        let mut reopened = Offences::open(&path, escalation()).unwrap();
        assert_eq!(reopened.count(&key), 2, "the record survives a restart");
        let third = reopened.sentence(key, first, t + 2);
        assert_eq!(
            third,
            Sentence {
                ban: Duration::from_secs(2400),
                offence: 3
            }
        );
        assert_eq!(
            reopened.sentence(key, first, t + 3).ban,
            Duration::from_secs(3600),
            "capped at the maximum"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn old_offences_are_forgotten() {
        let path = scratch("forget");
        let key: Cidr = "2001:db8::/64".parse().unwrap();
        let first = Duration::from_secs(60);
        let mut offences = Offences::open(&path, escalation()).unwrap();
        let t = 1_700_000_000_000;
        offences.sentence(key, first, t);
        let later = offences.sentence(key, first, t + 8 * DAY_MS);
        assert_eq!(
            later,
            Sentence {
                ban: first,
                offence: 1
            },
            "a week later it starts over"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn damaged_lines_are_skipped() {
        let path = scratch("damaged");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            format!("{HEADER}\n198.51.100.1\t3\t1700000000000\ngarbage\n"),
        )
        .unwrap();
        let offences = Offences::open(&path, escalation()).unwrap();
        assert_eq!(offences.count(&"198.51.100.1".parse().unwrap()), 3);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
