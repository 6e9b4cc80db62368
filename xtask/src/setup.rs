//! `cargo xtask setup`: installs what a fresh Debian 12 machine (root, rustup with a stable
//! default and a `nightly` toolchain) lacks to build and test the gateway. Every step checks
//! first and only then installs, so a second run takes well under a second.

use std::{collections::HashSet, fs, io, os::unix::fs::symlink, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Install what build, run and test need (idempotent; fast when nothing is missing).
///
/// Checks, and installs only if missing: rust-src for the nightly toolchain, bpf-linker built
/// against the nightly's LLVM, the Debian packages the tests use (as root), and bpffs mounted at
/// /sys/fs/bpf (as root).
#[derive(clap::Args, Default)]
#[command(after_help = "Examples:\n  \
    cargo xtask setup          # what build, run and test need\n  \
    cargo xtask setup --bench  # also the packages the benchmarks use")]
pub(crate) struct Args {
    /// Also install the Debian packages the benchmarks use (`BENCH_PACKAGES`).
    #[arg(long)]
    pub(crate) bench: bool,
}

/// Debian packages the tests use, one per entry: `ip` for namespaces and veths, `bpftool` to
/// inspect maps and programs, `ping`, `curl` and `python3` for traffic. Add to this list rather
/// than installing by hand, so a fresh machine gets it too.
pub(crate) const PACKAGES: &[&str] = &["iproute2", "bpftool", "iputils-ping", "curl", "python3"];

/// Debian packages only the benchmarks use: the references they compare against (xdp-filter,
/// iptables, ipset, nftables, NGINX), load generators (trafgen, wrk, h2load), `perf` for
/// profiles, and matplotlib for the charts. Kept apart so `cargo xtask test` does not pull
/// servers onto every CI machine.
pub(crate) const BENCH_PACKAGES: &[&str] = &[
    "xdp-tools",
    "netsniff-ng",
    "nftables",
    "iptables",
    "ipset",
    "nginx",
    "wrk",
    "nghttp2-client",
    "linux-perf",
    "python3-matplotlib",
];

/// The toolchain that builds the eBPF crate (`-Z build-std=core`); aya-build runs
/// `rustup run nightly cargo build`, so it must be called exactly this.
const NIGHTLY: &str = "nightly";

/// Newer bpf-linker releases want a newer rustc than this project's pinned stable.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The LLVM major versions bpf-linker 0.13.0 has an `llvm-N` feature for.
const BPF_LINKER_LLVM_MAJORS: std::ops::RangeInclusive<u32> = 21..=23;

/// The bpf filesystem mount point, where pinned maps and programs live.
const BPFFS: &str = "/sys/fs/bpf";

pub(crate) fn run(args: &Args) -> Result<()> {
    step("rust-src for nightly", rust_src)?;
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"), bpf_linker)?;
    step("Debian packages", |name| packages(name, PACKAGES))?;
    if args.bench {
        step("Debian packages for benches", |name| {
            packages(name, BENCH_PACKAGES)
        })?;
    }
    step(&format!("bpffs at {BPFFS}"), bpffs)
}

/// Runs one step and prints its one-line outcome; `f` gets the step's name to announce slow work.
fn step(name: &str, f: impl FnOnce(&str) -> Result<String>) -> Result<()> {
    let outcome = f(name).with_context(|| format!("setup: {name}"))?;
    println!("setup: {name} ... ok ({outcome})");
    Ok(())
}

/// Says a slow install starts, so the output of the tool doing it has a heading.
fn announce(name: &str, what: &str) {
    println!("setup: {name} ... {what}");
}

fn require(program: &str, what_to_do: &str) -> Result<()> {
    if cmd::find_on_path(program).is_none() {
        bail!("`{program}` is not on PATH: {what_to_do}");
    }
    Ok(())
}

/// `rust-src` lets the nightly build `core` for `bpfel-unknown-none` (`-Z build-std=core`).
fn rust_src(name: &str) -> Result<String> {
    require(
        "rustup",
        "install rustup from https://rustup.rs, then `rustup toolchain install nightly`",
    )?;
    let installed = cmd::output(cmd::command("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .context(
        "is the nightly toolchain installed? If not, run `rustup toolchain install nightly`",
    )?;
    if installed
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"))
    {
        return Ok("already installed".into());
    }
    announce(name, "installing");
    cmd::run(cmd::command("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))?;
    Ok("installed".into())
}

/// bpf-linker links the eBPF object. Its default build wants a system LLVM 23, which Debian 12
/// lacks, so it is built against the nightly toolchain's own `libLLVM` instead: the same LLVM
/// that emits the bitcode it links.
fn bpf_linker(name: &str) -> Result<String> {
    let cargo_home = cmd::cargo_home()?;
    let installed = cmd::find_on_path("bpf-linker").or_else(|| {
        Some(cargo_home.join("bin").join("bpf-linker")).filter(|path| cmd::is_executable(path))
    });
    let reinstall = match installed {
        Some(path) => {
            // The binary only finds the nightly's libLLVM (its versioned soname is not in the
            // rpath folder) when rustup puts the toolchain's lib dir on LD_LIBRARY_PATH, which is
            // how rustc runs it during the eBPF build; so check it that way too.
            let mut check = cmd::command("rustup");
            check.args(["run", NIGHTLY]).arg(&path).arg("--version");
            if let Some(version) = cmd::probe(&mut check)? {
                return Ok(format!("already installed: {}", version.trim()));
            }
            announce(
                name,
                &format!(
                    "reinstalling: {} does not start with the nightly's LLVM (was nightly updated?)",
                    path.display()
                ),
            );
            true
        }
        None => {
            announce(name, "installing (builds from source, a minute or two)");
            false
        }
    };

    let sysroot =
        cmd::output(cmd::command("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let libllvm = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let major = nightly_llvm_major()?;

    // bpf-linker's build script links `$LLVM_PREFIX/lib/libLLVM.so` and records that folder as
    // the binary's rpath, so the folder must outlive the install: keep it in CARGO_HOME.
    let prefix = cargo_home.join("bpf-linker-llvm");
    let link = prefix.join("lib").join("libLLVM.so");
    replace_symlink(&libllvm, &link)?;

    let mut install = cmd::cargo();
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        // The published lockfile resolves to crates that build with our stable rustc.
        .arg("--locked")
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix);
    if reinstall {
        install.arg("--force");
    }
    cmd::run(&mut install)?;
    Ok(format!("installed against {}", libllvm.display()))
}

/// The nightly's LLVM library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn find_libllvm(lib_dir: &Path) -> Result<std::path::PathBuf> {
    let mut candidates = fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .collect::<Vec<_>>();
    // Prefer the toolchain's own build over anything else that might sit there.
    candidates.sort_by_key(|path| !path.to_string_lossy().ends_with("-nightly"));
    candidates.into_iter().next().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain looks incomplete, reinstall it with \
             `rustup toolchain uninstall nightly && rustup toolchain install nightly`",
            lib_dir.display()
        )
    })
}

/// The major version of the nightly's LLVM, which picks bpf-linker's `llvm-N` feature.
fn nightly_llvm_major() -> Result<u32> {
    let version = cmd::output(cmd::command("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .context("`rustc +nightly -vV` prints no `LLVM version: N.x`")?;
    if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
        bail!(
            "the nightly toolchain uses LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} supports \
             LLVM {} to {}: install a nightly with one of those as `nightly`",
            BPF_LINKER_LLVM_MAJORS.start(),
            BPF_LINKER_LLVM_MAJORS.end()
        );
    }
    Ok(major)
}

/// Makes `link` a symlink to `target`, replacing whatever was there (a nightly update renames
/// the library, leaving the old link dangling).
fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    let parent = link.parent().context("symlink path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", link.display())),
    }
    symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

/// Installs whichever of `list` is missing, with one apt run.
fn packages(name: &str, list: &[&str]) -> Result<String> {
    require(
        "dpkg-query",
        &format!(
            "this setup supports Debian; install {} by hand",
            list.join(" ")
        ),
    )?;
    // dpkg-query exits 1 when a package is unknown to dpkg yet still prints the others, so read
    // its output whatever the status.
    let mut query = cmd::command("dpkg-query");
    query.args(["-W", "-f=${Package} ${Status}\n"]).args(list);
    let output = query
        .output()
        .with_context(|| format!("cannot start `{}`", cmd::display(&query)))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed = installed_packages(&stdout);
    let missing = list
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect::<Vec<_>>();
    if missing.is_empty() {
        return Ok(format!("already installed: {}", list.join(" ")));
    }
    let missing = missing.join(" ");
    if !cmd::is_root() {
        bail!(
            "{missing} missing and apt needs root: run as root, or `sudo apt-get install -y {missing}`"
        );
    }
    announce(name, &format!("installing {missing}"));
    cmd::run(
        cmd::command("apt-get")
            .args(["-qq", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        cmd::command("apt-get")
            .args(["install", "-q", "-y", "--no-install-recommends"])
            .args(missing.split(' '))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(format!("installed {missing}"))
}

/// The packages `dpkg-query -W -f='${Package} ${Status}\n'` reports as installed. `${Status}`
/// is "want error state", e.g. "install ok installed", "hold ok installed" or, for a removed
/// package whose config files remain, "deinstall ok config-files".
fn installed_packages(dpkg_query: &str) -> HashSet<&str> {
    dpkg_query
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.split_whitespace().nth(2) == Some("installed"))
        .map(|(package, _)| package)
        .collect()
}

/// The gateway pins maps under bpffs; it may not be mounted at boot.
fn bpffs(_name: &str) -> Result<String> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok("already mounted".into());
    }
    if !cmd::is_root() {
        bail!(
            "not mounted and mounting needs root: run as root, or `sudo mount -t bpf bpf {BPFFS}`"
        );
    }
    cmd::run(cmd::command("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    Ok("mounted".into())
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::*;

    /// A fresh directory under the system temp dir, removed by the caller.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_fully_installed_packages_count() {
        let output = "curl install ok installed\n\
                      bpftool deinstall ok config-files\n\
                      python3 hold ok installed\n\
                      iputils-ping install ok not-installed\n";
        let installed = installed_packages(output);
        assert_eq!(installed, HashSet::from(["curl", "python3"]));
    }

    #[test]
    fn libllvm_prefers_the_nightly_build() {
        let dir = scratch_dir("libllvm");
        for name in [
            "libLLVM.so.22.1",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver.so",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        let found = find_libllvm(&dir).unwrap();
        assert_eq!(found, dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn libllvm_missing_is_an_error() {
        let dir = scratch_dir("no-libllvm");
        assert!(find_libllvm(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symlink_is_created_then_retargeted() {
        let dir = scratch_dir("symlink");
        let link = dir.join("prefix").join("lib").join("libLLVM.so");
        replace_symlink(&dir.join("old"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), dir.join("old"));
        // Dangling, as after a nightly update renamed the library.
        replace_symlink(&dir.join("new"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), dir.join("new"));
        replace_symlink(&dir.join("new"), &link).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
