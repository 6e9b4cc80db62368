//! `gateway block|allow add|del|list|import|export`.
use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    Exit, Failure,
    args::{EntryArgs, ListCommand},
};
use crate::{
    admin::{
        client::AdminClient,
        protocol::{Request, Response},
    },
    cidr::Cidr,
    lists::{AddReport, EntrySpec, EntryView},
    xdp::ListKind,
};

/// Entries per admin request during an import: large enough to amortise the round trip, small
/// enough that the daemon's lock is held only for milliseconds at a time.
const IMPORT_BATCH: usize = 10_000;

/// Runs a list command. Arguments and files are checked before `connect` is called, so a typo is
/// reported as such (exit 2) even when the daemon is down.
pub(super) fn run(
    connect: impl FnOnce() -> Result<AdminClient, Failure>,
    list: ListKind,
    command: ListCommand,
) -> Result<Exit, Failure> {
    match command {
        ListCommand::Add { cidrs, entry } => add(connect, list, cidrs, &entry),
        ListCommand::Del { cidrs } => {
            let mut bad = 0;
            for cidr in &cidrs {
                if let Err(error) = cidr.parse::<Cidr>() {
                    eprintln!("error: {error}");
                    bad += 1;
                }
            }
            if bad > 0 {
                return Ok(Exit::Usage);
            }
            let Response::Removed(report) = connect()?.call(&Request::Remove { list, cidrs })?
            else {
                return Err(unexpected());
            };
            for missing in &report.missing {
                eprintln!("error: {}: {}", missing.cidr, missing.error);
            }
            println!(
                "removed {} {}list entr{}",
                report.removed,
                list.name(),
                plural(report.removed)
            );
            Ok(if report.missing.is_empty() {
                Exit::Success
            } else {
                Exit::Failure
            })
        }
        ListCommand::List(args) => {
            let entries = fetch(&mut connect()?, list)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", render_table(&entries, SystemTime::now()));
            }
            Ok(Exit::Success)
        }
        ListCommand::Import { file, entry } => import(connect, list, &file, &entry),
        ListCommand::Export { file } => {
            let entries = fetch(&mut connect()?, list)?;
            let mut out = format!(
                "# {}list exported by `gateway {} export`; read back with `gateway {} import`\n",
                list.name(),
                list.name(),
                list.name()
            );
            for entry in &entries {
                let _ = writeln!(
                    out,
                    "{}  # {}",
                    entry.cidr,
                    describe(entry, SystemTime::now())
                );
            }
            std::fs::write(&file, out).with_context(|| format!("writing `{}`", file.display()))?;
            println!(
                "exported {} entr{} to {}",
                entries.len(),
                plural(entries.len()),
                file.display()
            );
            Ok(Exit::Success)
        }
    }
}

fn unexpected() -> Failure {
    anyhow::anyhow!(
        "the daemon answered with an unexpected response; are the CLI and daemon the same version?"
    )
    .into()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "y" } else { "ies" }
}

fn fetch(client: &mut AdminClient, list: ListKind) -> Result<Vec<EntryView>, Failure> {
    match client.call(&Request::List { list })? {
        Response::Entries { entries } => Ok(entries),
        _ => Err(unexpected()),
    }
}

fn spec(cidr: String, entry: &EntryArgs) -> EntrySpec {
    EntrySpec {
        cidr,
        ttl_ms: entry
            .ttl
            .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        reason: entry.reason.clone(),
    }
}

fn add(
    connect: impl FnOnce() -> Result<AdminClient, Failure>,
    list: ListKind,
    cidrs: Vec<String>,
    entry: &EntryArgs,
) -> Result<Exit, Failure> {
    // Check everything first, so one typo does not leave half of a command applied.
    let errors: Vec<String> = cidrs
        .iter()
        .filter_map(|c| c.parse::<Cidr>().err().map(|e| e.to_string()))
        .collect();
    if !errors.is_empty() {
        for error in errors {
            eprintln!("error: {error}");
        }
        eprintln!("nothing was added");
        return Ok(Exit::Usage);
    }
    let entries = cidrs.into_iter().map(|c| spec(c, entry)).collect();
    let Response::Added(report) = connect()?.call(&Request::Add {
        list,
        entries,
        import: false,
    })?
    else {
        return Err(unexpected());
    };
    for rejected in &report.rejected {
        eprintln!("error: {}: {}", rejected.cidr, rejected.error);
    }
    println!(
        "{}list: {} added, {} updated{}",
        list.name(),
        report.added,
        report.updated,
        entry
            .ttl
            .map(|ttl| format!(", expiring in {}", humantime::format_duration(ttl)))
            .unwrap_or_default()
    );
    Ok(if report.rejected.is_empty() {
        Exit::Success
    } else {
        Exit::Failure
    })
}

/// A parsed import file: good entries with their line numbers, and bad lines.
struct ImportFile {
    entries: Vec<(usize, String)>,
    bad: Vec<(usize, String)>,
}

fn read_import(text: &str) -> ImportFile {
    let mut file = ImportFile {
        entries: Vec::new(),
        bad: Vec::new(),
    };
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        match content.parse::<Cidr>() {
            Ok(_) => file.entries.push((index + 1, content.to_owned())),
            Err(error) => file.bad.push((index + 1, error.to_string())),
        }
    }
    file
}

fn import(
    connect: impl FnOnce() -> Result<AdminClient, Failure>,
    list: ListKind,
    path: &Path,
    entry: &EntryArgs,
) -> Result<Exit, Failure> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading `{}`", path.display()))?;
    let mut file = read_import(&text);
    let mut client = connect()?;
    let progress = ProgressBar::new(file.entries.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} entries ({per_sec}, eta {eta})")
            .expect("the template is valid"),
    );
    let mut total = AddReport::default();
    for batch in file.entries.chunks(IMPORT_BATCH) {
        let specs = batch.iter().map(|(_, c)| spec(c.clone(), entry)).collect();
        let Response::Added(report) = client.call(&Request::Add {
            list,
            entries: specs,
            import: true,
        })?
        else {
            return Err(unexpected());
        };
        for rejected in report.rejected {
            let line = batch
                .iter()
                .find(|(_, c)| *c == rejected.cidr)
                .map_or(0, |(line, _)| *line);
            file.bad.push((line, rejected.error));
        }
        total.added += report.added;
        total.updated += report.updated;
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    file.bad.sort();
    for (line, error) in &file.bad {
        eprintln!("{}:{line}: skipped: {error}", path.display());
    }
    println!(
        "imported {} entr{} into the {}list ({} new, {} updated); {} line(s) skipped",
        total.added + total.updated,
        plural(total.added + total.updated),
        list.name(),
        total.added,
        total.updated,
        file.bad.len()
    );
    Ok(if file.bad.is_empty() {
        Exit::Success
    } else {
        Exit::Failure
    })
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// "expires in 59m 12s" or "permanent".
pub(super) fn expiry(entry: &EntryView, now: SystemTime) -> String {
    match entry.expires_unix_ms {
        None => "permanent".to_owned(),
        Some(at) => {
            let left = Duration::from_secs(at.saturating_sub(unix_ms(now)) / 1000);
            format!("in {}", humantime::format_duration(left))
        }
    }
}

fn describe(entry: &EntryView, now: SystemTime) -> String {
    let mut text = format!(
        "origin={} expires={}",
        entry.origin.name(),
        expiry(entry, now)
    );
    if let Some(reason) = &entry.reason {
        let _ = write!(text, " reason={reason}");
    }
    text
}

pub(super) fn render_table(entries: &[EntryView], now: SystemTime) -> String {
    let mut out = format!(
        "{:<43} {:<9} {:<22} {:>12}  REASON\n",
        "CIDR", "ORIGIN", "EXPIRES", "HITS"
    );
    for entry in entries {
        let _ = writeln!(
            out,
            "{:<43} {:<9} {:<22} {:>12}  {}",
            entry.cidr.to_string(),
            entry.origin.name(),
            expiry(entry, now),
            entry.hits,
            entry.reason.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out, "{} entr{}", entries.len(), plural(entries.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lists::Origin;

    #[test]
    fn import_files_keep_good_lines_and_number_bad_ones() {
        let file = read_import(
            "# drop list\n203.0.113.0/24\n\n198.51.100.7 # noisy\nnot-an-ip\n2001:db8::/32\n10.0.0.1/8\n",
        );
        assert_eq!(
            file.entries,
            [
                (2, "203.0.113.0/24".to_owned()),
                (4, "198.51.100.7".to_owned()),
                (6, "2001:db8::/32".to_owned())
            ]
        );
        assert_eq!(
            file.bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
            [5, 7]
        );
    }

    #[test]
    fn exported_lines_import_back() {
        let now = SystemTime::now();
        let entry = EntryView {
            cidr: "203.0.113.0/24".parse().unwrap(),
            origin: Origin::Manual,
            reason: Some("scanner # with a hash".to_owned()),
            expires_unix_ms: Some(unix_ms(now) + 3_600_000),
            added_unix_ms: 0,
            hits: 3,
        };
        let line = format!("{}  # {}\n", entry.cidr, describe(&entry, now));
        let file = read_import(&line);
        assert_eq!(file.entries, [(1, "203.0.113.0/24".to_owned())]);
        assert!(file.bad.is_empty());
    }

    #[test]
    fn table_shows_expiry_and_hits() {
        let now = SystemTime::now();
        let table = render_table(
            &[EntryView {
                cidr: "198.51.100.7".parse().unwrap(),
                origin: Origin::Manual,
                reason: None,
                expires_unix_ms: Some(unix_ms(now) + 90_500),
                added_unix_ms: 0,
                hits: 42,
            }],
            now,
        );
        assert!(table.contains("198.51.100.7"), "{table}");
        assert!(table.contains("in 1m 30s"), "{table}");
        assert!(table.contains("42"), "{table}");
        assert!(table.ends_with("1 entry\n"), "{table}");
    }
}
