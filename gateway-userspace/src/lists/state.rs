//! The persisted lists: one tab-separated line per entry, written atomically (temporary file,
//! fsync, rename), so a reboot or an unpinned start restores every ban. A line-based format keeps
//! a million entries small and lets a damaged line cost only itself.
//!
//! ```text
//! # gateway lists v1: list, cidr, expires (unix ms, 0 = never), origin, added (unix ms), reason
//! block<TAB>203.0.113.0/24<TAB>0<TAB>manual<TAB>1764000000000<TAB>scanner
//! ```
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use super::{Origin, validate_reason};
use crate::{cidr::Cidr, xdp::ListKind};

const HEADER: &str =
    "# gateway lists v1: list, cidr, expires (unix ms, 0 = never), origin, added (unix ms), reason";

/// One persisted entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub list: ListKind,
    pub cidr: Cidr,
    pub expires_unix_ms: Option<u64>,
    pub origin: Origin,
    pub added_unix_ms: u64,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write state file `{path}` (check the disk and the folder's permissions)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file's contents for these records.
pub fn render(records: impl Iterator<Item = Record>) -> Vec<u8> {
    let mut out = String::with_capacity(64 * 1024);
    out.push_str(HEADER);
    out.push('\n');
    for record in records {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}",
            record.list.name(),
            record.cidr,
            record.expires_unix_ms.unwrap_or(0),
            record.origin.name(),
            record.added_unix_ms,
            record.reason.as_deref().unwrap_or(""),
        );
    }
    out.into_bytes()
}

/// A state file's good records, and its bad lines as `(line number, error)`.
pub type Parsed = (Vec<Record>, Vec<(usize, String)>);

/// Parses a state file. Bad lines are returned with their numbers; the rest is kept.
pub fn parse(text: &str) -> Parsed {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(record) => records.push(record),
            Err(error) => errors.push((index + 1, error)),
        }
    }
    (records, errors)
}

fn parse_line(line: &str) -> Result<Record, String> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [list, cidr, expires, origin, added, reason] = fields[..] else {
        return Err(format!(
            "expected 6 tab-separated fields, found {}",
            fields.len()
        ));
    };
    let list = match list {
        "allow" => ListKind::Allow,
        "block" => ListKind::Block,
        other => return Err(format!("unknown list `{other}`")),
    };
    let cidr: Cidr = cidr
        .parse()
        .map_err(|e: crate::cidr::CidrError| e.to_string())?;
    let expires: u64 = expires
        .parse()
        .map_err(|_| format!("expiry `{expires}` is not a number"))?;
    let origin = Origin::from_name(origin).ok_or_else(|| format!("unknown origin `{origin}`"))?;
    let added_unix_ms = added
        .parse()
        .map_err(|_| format!("added time `{added}` is not a number"))?;
    validate_reason(reason)?;
    Ok(Record {
        list,
        cidr,
        expires_unix_ms: (expires != 0).then_some(expires),
        origin,
        added_unix_ms,
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
    })
}

/// Reads the state file; a missing file is an empty state (first start).
pub fn read(path: &Path) -> Result<Parsed, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), Vec::new())),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let error = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(error)?;
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(error)?;
    // The rename itself must reach the disk too.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse_round_trip() {
        let records = vec![
            Record {
                list: ListKind::Block,
                cidr: "203.0.113.0/24".parse().unwrap(),
                expires_unix_ms: Some(1_800_000_000_000),
                origin: Origin::Manual,
                added_unix_ms: 1_700_000_000_000,
                reason: Some("scanner".to_owned()),
            },
            Record {
                list: ListKind::Allow,
                cidr: "2001:db8::1".parse().unwrap(),
                expires_unix_ms: None,
                origin: Origin::Config,
                added_unix_ms: 1,
                reason: None,
            },
        ];
        let bytes = render(records.clone().into_iter());
        let (parsed, errors) = parse(std::str::from_utf8(&bytes).unwrap());
        assert!(errors.is_empty());
        assert_eq!(parsed, records);
    }

    #[test]
    fn damaged_lines_cost_only_themselves() {
        let text = format!(
            "{HEADER}\nblock\t198.51.100.1\t0\tmanual\t1\t\ngarbage\nblock\tnot-ip\t0\tmanual\t1\t\nallow\t10.0.0.0/8\t0\tmanual\t1\tx\n"
        );
        let (records, errors) = parse(&text);
        assert_eq!(records.len(), 2);
        assert_eq!(
            errors.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
            [3, 4]
        );
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("gateway-state-test-{}", std::process::id()));
        let path = dir.join("lists.tsv");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_empty_state() {
        let (records, errors) = read(Path::new("/nonexistent/gateway/lists.tsv")).unwrap();
        assert!(records.is_empty() && errors.is_empty());
    }
}
