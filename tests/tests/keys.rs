//! End-to-end test of API key management: the real daemon (no XDP interfaces) with a temporary
//! state folder and admin socket, driven by the real CLI. `create` prints the key once, `list`
//! never shows a secret, `revoke` sticks, and all of it survives a daemon restart.
//!
//! `gateway run` loads the XDP program even without interfaces, so this needs root; a non-root
//! run outside CI skips. The binary is `GATEWAY_BIN`, as `cargo xtask test` sets it, or
//! `target/debug/gateway`. A guard stops the daemon by its pid and removes its folder and pins,
//! also when the test fails (the daemon's log is printed then).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use gateway_tests::{gateway_bin, require_root};
use gateway_userspace::{config::BPFFS_ROOT, xdp::loader::remove_pins};
use serde_json::Value;

/// Longest the daemon may take to answer on its admin socket after `gateway run`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one CLI command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// What a CLI command printed, and its exit code.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Waits up to `timeout` for `child`; kills it if it does not exit. `false` if it was killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// A daemon with its own instance, folder and pins; dropping it stops the daemon and removes
/// them.
struct Daemon {
    instance: String,
    dir: PathBuf,
    process: Option<Child>,
}

impl Daemon {
    fn new() -> Daemon {
        let instance = format!("keys-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("gateway-{instance}"));
        // Left over by a killed run with the same pid: start clean.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating `{}`: {e}", dir.display()));
        let daemon = Daemon {
            instance,
            dir,
            process: None,
        };
        let _ = remove_pins(&daemon.pin_dir());
        let config = format!(
            "instance = \"{}\"\nstate_dir = \"{}/state\"\nadmin_socket = \"{}\"\n[xdp]\ninterfaces = []\n",
            daemon.instance,
            daemon.dir.display(),
            daemon.socket().display()
        );
        fs::write(daemon.dir.join("gateway.toml"), config).expect("writing the config");
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.instance)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn start(&mut self) {
        assert!(self.process.is_none(), "the daemon is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("opening the daemon log");
        let stderr = log.try_clone().expect("duplicating the log handle");
        let child = Command::new(gateway_bin())
            .arg("run")
            .arg("--config")
            .arg(self.dir.join("gateway.toml"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the gateway daemon: {e}"));
        self.process = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.process.as_mut().map(Child::try_wait) {
                self.process = None;
                panic!(
                    "the daemon exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            if self.cli(&["status"]).code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within {START_TIMEOUT:?}; its log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]. `false` if it had to be killed.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.process.take() else {
            return true;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: no memory is involved, and `pid` is our own child that was not reaped
            // yet, so the id cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        wait_or_kill(&mut child, STOP_TIMEOUT)
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut child = Command::new(gateway_bin())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run the gateway binary: {e}"));
        assert!(
            wait_or_kill(&mut child, CLI_TIMEOUT),
            "`gateway {}` did not finish within {CLI_TIMEOUT:?}",
            args.join(" ")
        );
        let output = child
            .wait_with_output()
            .expect("collecting the CLI's output");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn cli_ok(&self, args: &[&str]) -> Output {
        let output = self.cli(args);
        assert_eq!(
            output.code,
            0,
            "`gateway {}` failed: {}\ndaemon log:\n{}",
            args.join(" "),
            output.stderr,
            self.log_text()
        );
        output
    }

    fn keys(&self) -> Vec<Value> {
        let stdout = self.cli_ok(&["keys", "list", "--json"]).stdout;
        let value: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("`keys list --json` printed invalid JSON ({e}): {stdout}"));
        value
            .as_array()
            .unwrap_or_else(|| panic!("`keys list --json` is not an array: {stdout}"))
            .clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stop() {
            eprintln!("the daemon ignored SIGTERM and was killed");
        }
        if thread::panicking() {
            eprintln!("daemon log:\n{}", self.log_text());
        }
        if let Err(error) = remove_pins(&self.pin_dir()) {
            eprintln!(
                "warning: removing the pins in `{}`: {error}",
                self.pin_dir().display()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn keys_are_created_once_listed_without_secrets_revoked_and_persisted() {
    if !require_root("keys_are_created_once_listed_without_secrets_revoked_and_persisted") {
        return;
    }
    let mut daemon = Daemon::new();
    daemon.start();

    let created = daemon.cli_ok(&[
        "keys",
        "create",
        "--owner",
        "svc-billing",
        "--scopes",
        "orders:read,orders:write",
        "--ttl",
        "30d",
    ]);
    let key = created.stdout.trim();
    assert_eq!(
        created.stdout.lines().count(),
        1,
        "stdout is the key alone: {}",
        created.stdout
    );
    assert!(key.starts_with("gw_"), "{key}");
    assert!(
        created.stderr.contains("only time"),
        "create warns that the key is shown once: {}",
        created.stderr
    );
    // `gw_<id>_<secret>`: the base64url secret may itself contain `_`.
    let secret = key.splitn(3, '_').nth(2).unwrap_or_default();
    assert!(secret.len() > 20, "{key}");

    let keys = daemon.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key_id = keys[0]["key_id"].as_str().expect("a key id").to_owned();
    assert!(
        key.contains(&key_id),
        "the key names its id: {key} / {key_id}"
    );
    assert_eq!(keys[0]["owner"], "svc-billing");
    assert_eq!(keys[0]["status"], "active");
    assert_eq!(
        keys[0]["scopes"],
        serde_json::json!(["orders:read", "orders:write"])
    );
    let table = daemon.cli_ok(&["keys", "list"]).stdout;
    assert!(
        table.contains(&key_id) && table.contains("active"),
        "{table}"
    );
    let json = daemon.cli_ok(&["keys", "list", "--json"]).stdout;
    for shown in [&table, &json] {
        assert!(
            !shown.contains(secret),
            "a listing shows the secret: {shown}"
        );
    }
    let file = fs::read_to_string(daemon.dir.join("state/api-keys.json"))
        .expect("the key file is in the state folder");
    assert!(
        !file.contains(secret),
        "the key file holds the secret: {file}"
    );

    // Arguments are checked before connecting (exit 2); a daemon-side refusal is exit 1.
    assert_eq!(daemon.cli(&["keys", "revoke", "not-a-key-id"]).code, 2);
    assert_eq!(
        daemon
            .cli(&["keys", "create", "--owner", "svc", "--scopes", "has space"])
            .code,
        2
    );
    let missing = daemon.cli(&["keys", "revoke", "0000000000000000"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(missing.stderr.contains("no API key"), "{}", missing.stderr);

    let revoked = daemon.cli_ok(&["keys", "revoke", &key_id]);
    assert!(revoked.stdout.contains(&key_id), "{}", revoked.stdout);
    assert_eq!(daemon.keys()[0]["status"], "revoked");

    // A restart reads the key file back: the revocation stands.
    assert!(daemon.stop(), "the daemon exits on SIGTERM");
    daemon.start();
    let keys = daemon.keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["key_id"], key_id.as_str());
    assert_eq!(keys[0]["status"], "revoked");
}
