//! The processes the flood section runs in the gateway's namespace: the real `gateway run`
//! daemon (the binary under test, serving HTTPS and, for its own row, attached to the public
//! interface) and `gateway demo-upstream` behind it. Each is a guard: dropping it ends the
//! process by its own pid (SIGTERM, then SIGKILL) and removes what it left (pinned maps, its
//! folder).
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use gateway_tests::netns::Netns;
use gateway_userspace::{config::BPFFS_ROOT, xdp::loader::remove_pins};

use crate::flood_traffic::{HTTPS_PORT, avoid_flood_cpu};

/// Where the demo upstream listens, inside the gateway's namespace.
const UPSTREAM: &str = "127.0.0.1:18081";
/// Longest the daemon may take to answer on its admin socket and listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a CLI command may take (a 10,000-entry import included).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process ended by pid on drop.
pub(crate) struct Process {
    child: Child,
    what: &'static str,
}

impl Process {
    /// Starts `command` from a thread inside `netns`, so the process lives in that namespace,
    /// kept off the flood's CPU.
    fn spawn(netns: &Netns, mut command: Command, what: &'static str) -> Result<Process> {
        let child = netns
            .run(move || -> Result<Child> {
                avoid_flood_cpu()?;
                Ok(command.spawn()?)
            })
            .with_context(|| format!("starting the {what}"))?;
        Ok(Process { child, what })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: no memory involved; `pid` is our own unreaped child, so it names no other
            // process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: the {} ignored SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating `{}`", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The demo upstream the gateway proxies to.
pub(crate) fn start_upstream(gateway: &Path, netns: &Netns) -> Result<Process> {
    let mut command = Command::new(gateway);
    command
        .args(["demo-upstream", "--listen", UPSTREAM])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Process::spawn(netns, command, "demo upstream")
}

/// A running `gateway run`.
pub(crate) struct Daemon {
    // Field order is drop order: the process ends before its pins and folder go.
    process: Process,
    binary: PathBuf,
    instance: String,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon in `netns` with an HTTPS listener on every address and, with
    /// `xdp_interface`, the XDP program attached natively there with its lists and rate limit on.
    /// Returns once the admin socket answers and the listener accepts.
    pub(crate) fn start(
        binary: &Path,
        netns: &Netns,
        dir: &Path,
        instance: &str,
        xdp_interface: Option<&str>,
    ) -> Result<Daemon> {
        // Pins of a killed run with the same pid would otherwise be reused.
        let _ = remove_pins(&Path::new(BPFFS_ROOT).join(instance));
        let folder = dir.display();
        let xdp = match xdp_interface {
            // The allowlist and prefix blocklist hold an entry each (documentation ranges), so
            // the program consults every tier, as in production; the rate limit is far above
            // the client's few hundred packets a second.
            Some(interface) => format!(
                "[xdp]\n\
                 interfaces = [\"{interface}\"]\n\
                 mode = \"native\"\n\
                 allowlist = [\"192.0.2.0/24\"]\n\
                 blocklist = [\"198.51.100.0/24\"]\n\
                 [xdp.rate_limit]\n\
                 enabled = true\n\
                 packets_per_second = 20000\n\
                 burst = 40000\n"
            ),
            None => "[xdp]\ninterfaces = []\n".to_owned(),
        };
        let config = format!(
            "instance = \"{instance}\"\n\
             state_dir = \"{folder}/state\"\n\
             admin_socket = \"{folder}/admin.sock\"\n\
             {xdp}\n\
             [[listeners]]\n\
             name = \"public\"\n\
             address = \"0.0.0.0:{HTTPS_PORT}\"\n\
             routes = [\"api\"]\n\
             [listeners.tls]\n\
             self_signed = true\n\
             self_signed_names = [\"localhost\"]\n\
             \n\
             [[routes]]\n\
             name = \"api\"\n\
             path_prefix = \"/api/\"\n\
             upstream = \"app\"\n\
             \n\
             [[upstreams]]\n\
             name = \"app\"\n\
             endpoints = [\"{UPSTREAM}\"]\n"
        );
        let config_path = dir.join("gateway.toml");
        fs::write(&config_path, config).context("writing the daemon's config")?;
        let log = fs::File::create(dir.join("daemon.log")).context("creating the daemon's log")?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the log handle")?)
            .stderr(log);
        let mut daemon = Daemon {
            process: Process::spawn(netns, command, "gateway daemon")?,
            binary: binary.to_owned(),
            instance: instance.to_owned(),
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let listener: SocketAddr = ([127, 0, 0, 1], HTTPS_PORT).into();
        loop {
            if let Some(status) = daemon.process.exited() {
                bail!(
                    "the gateway daemon exited ({status}) during start-up; its log:\n{}",
                    daemon.log()
                );
            }
            let ready = daemon.cli(&["status"]).is_ok()
                && netns.run(|| {
                    TcpStream::connect_timeout(&listener, Duration::from_millis(200)).is_ok()
                });
            if ready {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway daemon was not ready within {START_TIMEOUT:?}; its log:\n{}",
                    daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs `gateway --socket SOCKET ARGS`; its standard output.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let mut child = Command::new(&self.binary)
            .arg("--socket")
            .arg(self.dir.join("admin.sock"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the gateway CLI")?;
        let deadline = Instant::now() + CLI_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`gateway {}` did not finish within {CLI_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "`gateway {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Packets the XDP program counted under `reason` (`gateway stats --json`).
    pub(crate) fn packets(&self, reason: &str) -> Result<u64> {
        let text = self.cli(&["stats", "--json"])?;
        let json: serde_json::Value =
            serde_json::from_str(&text).context("`gateway stats --json` printed no JSON")?;
        json["reasons"]
            .as_array()
            .and_then(|reasons| reasons.iter().find(|r| r["reason"] == reason))
            .and_then(|r| r["packets"].as_u64())
            .with_context(|| format!("`gateway stats --json` has no packet count for `{reason}`"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The process field is dropped after this body; end it first, then remove the pins.
        if let Ok(pid) = i32::try_from(self.process.child.id())
            && self.process.exited().is_none()
        {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.process.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = remove_pins(&Path::new(BPFFS_ROOT).join(&self.instance));
    }
}
