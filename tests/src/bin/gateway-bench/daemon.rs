//! Guards for everything a benchmark starts, so that a section that fails or panics leaves
//! nothing behind: [`Scratch`] folders, [`Background`] processes (stopped by their own pid,
//! never by name), and the gateway [`Daemon`] under test with its config, admin socket, log,
//! state and pinned maps, all named after a unique instance.
//!
//! Processes are spawned from a thread that has joined a benchmark namespace
//! ([`Netns::run`]), so they start in it, while the mount namespace stays the host's: the
//! daemon pins its maps in the host's bpffs, so a restart can reuse them as in production.
use std::{
    fs,
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use gateway_tests::netns::Netns;
use gateway_userspace::{config::BPFFS_ROOT, xdp::loader::remove_pins};
use serde_json::Value;

/// Longest the daemon may take to answer on its admin socket after `gateway run`. Restoring a
/// million bans from the state file happens before that, so this is generous.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a process gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an ordinary CLI command may take.
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `f`, turning a panic (the namespace helpers of `gateway-tests` panic on failure) into
/// an error, so one section's failure cannot take the whole run down. Guards created inside
/// `f` have already cleaned up by the time this returns.
pub(crate) fn catching_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "(no message)".to_owned());
            Err(anyhow!("panicked: {message}"))
        }
    }
}

/// A folder under the system temp dir, removed with everything in it on drop.
pub(crate) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// `gateway-bench-<tag>-<pid>`: a rerun after a crash (same pid) starts clean.
    pub(crate) fn new(tag: &str) -> Result<Scratch> {
        let path = std::env::temp_dir().join(format!("gateway-bench-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .with_context(|| format!("creating the scratch folder `{}`", path.display()))?;
        Ok(Scratch { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `name` in this folder and returns its path.
    pub(crate) fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        let path = self.join(name);
        fs::write(&path, contents).with_context(|| format!("writing `{}`", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Runs on the thread that spawns a process, just before it does; see [`Background::spawn_in`].
pub(crate) type BeforeSpawn = fn() -> Result<()>;

/// A process the benchmark started: SIGTERM (then SIGKILL) by its own pid on drop.
pub(crate) struct Background {
    name: String,
    child: Option<Child>,
}

impl Background {
    /// Spawns `command` inside `netns`, or in the benchmark's own namespace when `None`.
    /// Standard input is closed; the caller decides where output goes.
    pub(crate) fn spawn(name: &str, netns: Option<&Netns>, mut command: Command) -> Result<Self> {
        match netns {
            Some(netns) => Background::spawn_in(name, netns, command, || Ok(())),
            None => {
                command.stdin(Stdio::null());
                let child = command
                    .spawn()
                    .with_context(|| format!("cannot start {name}: is it installed?"))?;
                Ok(Background::new(name, child))
            }
        }
    }

    /// [`Background::spawn`] inside `netns`, running `before` first on the spawning thread, so
    /// the process inherits what it sets (such as the CPUs it may run on).
    pub(crate) fn spawn_in(
        name: &str,
        netns: &Netns,
        mut command: Command,
        before: BeforeSpawn,
    ) -> Result<Self> {
        command.stdin(Stdio::null());
        let child = netns.run(move || -> Result<Child> {
            before().with_context(|| format!("preparing to start {name}"))?;
            command
                .spawn()
                .with_context(|| format!("cannot start {name}: is it installed?"))
        })?;
        Ok(Background::new(name, child))
    }

    fn new(name: &str, child: Child) -> Self {
        Background {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// How the process ended, if it did.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; returns how it ended.
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already stopped", self.name))?;
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: no memory is involved; `pid` is our own child, not reaped yet, so it
            // cannot name another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match wait_or_kill(&mut child, STOP_TIMEOUT) {
            Some(status) => Ok(status),
            None => bail!(
                "{} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed",
                self.name
            ),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(error) = self.stop()
        {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Waits up to `timeout` for `child`; kills it if it is still running. `None` if killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Runs `command` to completion within `timeout`, capturing its output; fails with its first
/// error line unless it exits 0.
pub(crate) fn run_bounded(mut command: Command, timeout: Duration) -> Result<String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}: is it installed?"))?;
    // Drained on threads, so a chatty command cannot block on a full pipe while we wait.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_or_kill(&mut child, timeout)
        .with_context(|| format!("{shown} did not finish within {timeout:?} and was killed"))?;
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let first = stderr.lines().map(str::trim).find(|l| !l.is_empty());
        bail!(
            "{shown} failed ({status}): {}",
            first.unwrap_or("(no error output)")
        );
    }
    Ok(stdout)
}

/// `gateway demo-upstream` listening on `listen`, quiet, its output discarded: the upstream
/// the sections proxy to.
pub(crate) fn demo_upstream(gateway: &Path, listen: &str) -> Command {
    let mut command = Command::new(gateway);
    command
        .args(["demo-upstream", "--listen", listen])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Connects to `addr` from inside `netns` until it accepts, within `timeout`.
pub(crate) fn wait_for_tcp(netns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let connected = netns.run(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if connected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted connections on {addr} within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`: `(VmRSS, VmHWM)` in KiB, the
/// current value and its peak.
pub(crate) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status: did the process exit?"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .with_context(|| format!("/proc/{pid}/status has no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The pids whose parent is `pid` (e.g. NGINX's workers), from `/proc/*/stat`.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // Fields after the command name, which is in parentheses and may contain spaces:
            // state, then the parent pid.
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The `[xdp]` table of a daemon attached natively to `interface`, its per-source rate limit
/// far above what a benchmark sends.
pub(crate) fn xdp_native(interface: &str) -> String {
    format!(
        "[xdp]\n\
         interfaces = [\"{interface}\"]\n\
         mode = \"native\"\n\
         [xdp.rate_limit]\n\
         packets_per_second = 1000000\n\
         burst = 1000000\n"
    )
}

/// One gateway daemon under test, instance `bench-<tag>-<pid>`: its config, state, admin
/// socket and log live in a scratch folder, its maps under `/sys/fs/bpf/<instance>`. Drop stops
/// the process and removes all of that.
pub(crate) struct Daemon {
    gateway: PathBuf,
    instance: String,
    process: Option<Background>,
    // Declared last: dropped after the process that writes into it.
    scratch: Scratch,
}

impl Daemon {
    /// Prepares the folder (and removes pins a killed earlier run with the same pid left);
    /// [`Daemon::write_config`] and [`Daemon::start`] come next.
    pub(crate) fn new(gateway: &Path, tag: &str) -> Result<Daemon> {
        let instance = format!("bench-{tag}-{}", std::process::id());
        let daemon = Daemon {
            gateway: gateway.to_owned(),
            scratch: Scratch::new(&instance)?,
            instance,
            process: None,
        };
        daemon.remove_pins()?;
        Ok(daemon)
    }

    /// The scratch folder, for files the config refers to.
    pub(crate) fn dir(&self) -> &Path {
        self.scratch.path()
    }

    pub(crate) fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.instance)
    }

    pub(crate) fn remove_pins(&self) -> Result<()> {
        remove_pins(&self.pin_dir())
            .with_context(|| format!("removing the pins in `{}`", self.pin_dir().display()))
    }

    fn config_path(&self) -> PathBuf {
        self.scratch.join("gateway.toml")
    }

    fn socket(&self) -> PathBuf {
        self.scratch.join("admin.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.scratch.join("daemon.log")
    }

    /// Writes the config: `instance`, `state_dir` and `admin_socket` pointing into the scratch
    /// folder, then `body` (tables such as `[xdp]` and `[[listeners]]`).
    pub(crate) fn write_config(&self, body: &str) -> Result<()> {
        let dir = self.dir().display();
        let config = format!(
            "instance = \"{instance}\"\nstate_dir = \"{dir}/state\"\n\
             admin_socket = \"{dir}/admin.sock\"\n{body}\n",
            instance = self.instance,
        );
        self.scratch.write("gateway.toml", config).map(drop)
    }

    /// Starts `gateway run` inside `netns` and waits until its admin socket answers (the
    /// daemon opens it after attaching XDP, restoring bans and binding listeners). Returns how
    /// long that took from the spawn.
    pub(crate) fn start(&mut self, netns: &Netns) -> Result<Duration> {
        self.start_with(netns, &[], || Ok(()))
    }

    /// [`Daemon::start`] with extra environment variables, and `before` run on the spawning
    /// thread first (see [`Background::spawn_in`]).
    pub(crate) fn start_with(
        &mut self,
        netns: &Netns,
        env: &[(&str, &str)],
        before: BeforeSpawn,
    ) -> Result<Duration> {
        if self.process.is_some() {
            bail!("daemon `{}` is already running", self.instance);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the daemon log")?;
        let mut command = Command::new(&self.gateway);
        command
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(log.try_clone().context("sharing the daemon log")?)
            .stderr(log);
        let started = Instant::now();
        self.process = Some(Background::spawn_in(
            &format!("gateway daemon `{}`", self.instance),
            netns,
            command,
            before,
        )?);
        loop {
            if let Some(status) = self.process.as_mut().and_then(Background::exited) {
                self.process = None;
                bail!(
                    "the gateway daemon exited ({status}) before it was ready; the end of its \
                     log:\n{}",
                    self.log_tail()
                );
            }
            if self
                .cli_bounded(&["status"], Duration::from_secs(5))
                .is_ok()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "the gateway daemon did not answer on `{}` within {START_TIMEOUT:?}; the \
                     end of its log:\n{}",
                    self.socket().display(),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon with SIGTERM (it persists its state and detaches XDP).
    pub(crate) fn stop(&mut self) -> Result<()> {
        let mut process = self
            .process
            .take()
            .context("the gateway daemon is not running")?;
        let status = process.stop()?;
        if !status.success() {
            bail!(
                "the gateway daemon exited with {status} on SIGTERM; the end of its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    pub(crate) fn pid(&self) -> Result<u32> {
        self.process
            .as_ref()
            .map(Background::pid)
            .context("the gateway daemon is not running")
    }

    /// Runs `gateway --socket <its socket> ARGS`; returns standard output.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        self.cli_bounded(args, CLI_TIMEOUT)
    }

    /// [`Daemon::cli`] with a time limit of its own, for bulk imports.
    pub(crate) fn cli_bounded(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut command = Command::new(&self.gateway);
        command.arg("--socket").arg(self.socket()).args(args);
        run_bounded(command, timeout)
    }

    /// A CLI command's `--json` output, parsed.
    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        let stdout = self.cli(args)?;
        serde_json::from_str(&stdout)
            .with_context(|| format!("`gateway {}` printed invalid JSON", args.join(" ")))
    }

    /// The last lines of the daemon's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take()
            && let Err(error) = process.stop()
        {
            eprintln!("warning: {error:#}");
        }
        if let Err(error) = self.remove_pins() {
            eprintln!("warning: {error:#}");
        }
    }
}
