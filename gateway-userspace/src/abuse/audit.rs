//! The audit log: one JSON line per verdict (bans, L7 denials, dry-run "would ban"s and
//! verdicts refused because the source is protected), fsynced before the ban is reported done,
//! rotated by size (`audit.jsonl` → `audit.jsonl.1` → … → `audit.jsonl.<keep>`).
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

/// One verdict, as the audit log records it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    /// The banned prefix.
    pub source: String,
    pub rule: String,
    /// `xdp` (kernel blocklist), `l7` (denied at the gateway: behind a trusted proxy),
    /// `dry_run` (would have banned) or `protected` (never banned).
    pub enforcement: &'static str,
    /// Events per outcome class that crossed the threshold.
    pub evidence: Vec<(String, u32)>,
    pub window_secs: u64,
    pub ttl_secs: u64,
    /// 1 for a first offence.
    pub offence: u32,
}

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
}

impl AuditLog {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog {
            path: path.to_owned(),
            max_bytes,
            keep,
            file,
            size,
        })
    }

    /// Appends one record and syncs it to disk.
    pub fn append(&mut self, record: &AuditRecord) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let _ = fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            match fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::rename(&self.path, self.rotated(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// This host's name, for the `node` field.
pub fn node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(source: &str) -> AuditRecord {
        AuditRecord {
            time: "2026-11-25T00:00:00Z".to_owned(),
            node: "edge-1".to_owned(),
            source: source.to_owned(),
            rule: "stuffing".to_owned(),
            enforcement: "xdp",
            evidence: vec![("auth_failure".to_owned(), 20)],
            window_secs: 60,
            ttl_secs: 900,
            offence: 1,
        }
    }

    #[test]
    fn one_json_line_per_verdict_and_rotation_by_size() {
        let dir = std::env::temp_dir().join(format!("gateway-audit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&path, 4096, 2).unwrap();
        log.append(&record("198.51.100.1")).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["source"], "198.51.100.1");
        assert_eq!(line["enforcement"], "xdp");
        assert_eq!(line["evidence"][0][1], 20);

        for i in 0..200 {
            log.append(&record(&format!("198.51.100.{}", i % 250)))
                .unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 4096);
        assert!(log.rotated(1).exists() && log.rotated(2).exists());
        assert!(!log.rotated(3).exists(), "only `keep` rotated files stay");
        // Reopening appends.
        let before = fs::metadata(&path).unwrap().len();
        AuditLog::open(&path, 4096, 2)
            .unwrap()
            .append(&record("198.51.100.9"))
            .unwrap();
        assert!(fs::metadata(&path).unwrap().len() > before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_name_is_not_empty() {
        assert!(!node_name().is_empty());
    }
}
