//! `cargo xtask run`: build the gateway and run it with the example config, as root, next to
//! the demo upstream that the example config's L7 route proxies to.

use std::ffi::OsString;

use anyhow::{Context as _, Result, bail, ensure};

use crate::{build, cmd, setup};

/// The config `cargo xtask run` starts the gateway with, relative to the workspace root.
const EXAMPLE_CONFIG: &str = "examples/gateway.toml";

/// Where the example config's `demo` upstream expects `gateway demo-upstream`.
const DEMO_UPSTREAM: &str = "127.0.0.1:8081";

/// Build the gateway and run it with examples/gateway.toml, as root.
///
/// Runs `setup`, builds, starts `gateway demo-upstream` on 127.0.0.1:8081, then
/// `gateway run --config examples/gateway.toml [ARGS...]`, which serves HTTPS on
/// 127.0.0.1:8443. Root is needed to attach XDP programs. Ctrl-C stops the gateway (and the
/// demo upstream); the gateway's exit status becomes xtask's.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    sudo cargo xtask run\n  \
    sudo cargo xtask run --release\n  \
    sudo cargo xtask run -- --help   # arguments after `--` go to `gateway run`")]
pub(crate) struct Args {
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,

    /// Extra arguments for `gateway run`, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    // Checked before the build so a non-root user learns it in a second, not after a build.
    if !cmd::is_root() {
        bail!("the gateway attaches XDP programs and needs root: run as root or with sudo");
    }
    let config = cmd::workspace_root().join(EXAMPLE_CONFIG);
    ensure!(
        config.is_file(),
        "{} is missing: `cargo xtask run` starts the gateway with it; restore or write it",
        config.display()
    );
    setup::run(&setup::Args::default())?;
    let bin = build::gateway(args.release)?;

    catch_sigint().context("installing a SIGINT handler")?;
    let mut upstream = cmd::command(&bin);
    upstream.args(["demo-upstream", "--listen", DEMO_UPSTREAM]);
    let mut demo = upstream
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&upstream)))?;
    let mut gateway = cmd::command(&bin);
    gateway
        .args(["run", "--config", EXAMPLE_CONFIG])
        .args(&args.args);
    let status = cmd::status(&mut gateway);
    // By its own pid: Ctrl-C usually stopped it already, and nothing else may be touched.
    let _ = demo.kill();
    let _ = demo.wait();
    let status = status?;
    if status.success() {
        return Ok(());
    }
    // Forward the gateway's status as a shell would: the code, or 128 + the signal number.
    eprintln!(
        "xtask: `{}` {}",
        cmd::display(&gateway),
        cmd::describe(status)
    );
    let code = {
        use std::os::unix::process::ExitStatusExt as _;
        status
            .code()
            .or_else(|| status.signal().map(|signal| 128 + signal))
            .unwrap_or(1)
    };
    std::process::exit(code)
}

/// Ctrl-C sends SIGINT to the whole foreground process group: the gateway (which shuts down
/// cleanly on it) and xtask. With the default action xtask would die at once, returning the
/// prompt while the gateway still detaches and losing its exit status. A handler that does
/// nothing keeps xtask waiting; unlike SIG_IGN it is not inherited across exec, so the gateway
/// still gets SIGINT's default disposition.
fn catch_sigint() -> std::io::Result<()> {
    extern "C" fn do_nothing(_signal: libc::c_int) {}
    let handler = do_nothing as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    // SAFETY: the handler is async-signal-safe (it does nothing), and no other code in xtask
    // installs signal handlers.
    if unsafe { libc::signal(libc::SIGINT, handler) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
