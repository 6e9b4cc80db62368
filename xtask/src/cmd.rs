//! Running subprocesses: from the workspace root, with inherited stdio, and errors that quote the
//! failing command line so it can be copied and rerun by hand.

use std::{
    env,
    ffi::OsString,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root: xtask lives one level below it.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// Where cargo puts build output. `CARGO_TARGET_DIR` is honoured because CI caches often set it;
/// the repository itself does not configure `build.target-dir`.
pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| workspace_root().join(dir))
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `$CARGO_HOME`, by default `~/.cargo`: where `cargo install` puts binaries.
pub(crate) fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set: set HOME")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// A `cargo` command running in the workspace root. Uses the cargo that started xtask (`$CARGO`)
/// so every step runs with the same toolchain.
pub(crate) fn cargo() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// Any other program, running in the workspace root.
pub(crate) fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line as a shell would show it, with the environment it adds: `A=b prog arg`.
pub(crate) fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
    });
    // `$CARGO` is a toolchain-internal path; plain `cargo` is what one would retype.
    let program = if env::var_os("CARGO").as_deref() == Some(cmd.get_program()) {
        "cargo".to_owned()
    } else {
        cmd.get_program().to_string_lossy().into_owned()
    };
    let args = cmd.get_args().map(|arg| arg.to_string_lossy().into_owned());
    envs.chain([program])
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` {}", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns how it ended, failing only if it cannot start.
pub(crate) fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| {
        format!(
            "cannot start `{}`: is it installed and on PATH?",
            display(cmd)
        )
    })
}

/// Runs `cmd` and returns its stdout when it succeeds, `None` when it exits non-zero. Stderr is
/// captured too, so quiet probes stay quiet.
pub(crate) fn probe(cmd: &mut Command) -> Result<Option<String>> {
    let output = cmd.output().with_context(|| {
        format!(
            "cannot start `{}`: is it installed and on PATH?",
            display(cmd)
        )
    })?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Like [`probe`], but a non-zero exit is an error quoting the command and its first stderr line.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let output = cmd.output().with_context(|| {
        format!(
            "cannot start `{}`: is it installed and on PATH?",
            display(cmd)
        )
    })?;
    if !output.status.success() {
        // The first line says what went wrong; the rest (help, backtraces) would break the
        // one-line error.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first_line = stderr.lines().map(str::trim).find(|line| !line.is_empty());
        bail!(
            "`{}` {}: {}",
            display(cmd),
            describe(output.status),
            first_line.unwrap_or("(no error output)")
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// "exited with status 101" or "was killed by signal 9".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// Whether an executable named `name` is on PATH; returns its path.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether xtask runs as root (effective uid 0), which apt, mount and XDP need.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
