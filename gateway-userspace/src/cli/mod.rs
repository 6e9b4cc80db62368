//! The `gateway` command line: `run` starts the daemon; every other subcommand is a client of
//! its admin socket. `main` parses once, runs, and prints an error once, as a sentence.
mod args;
mod bans;
mod demo_upstream;
mod keys;
mod lists;
mod stats;
mod status;

use std::{path::Path, process::ExitCode};

use clap::Parser as _;

pub use self::args::Cli;
use self::args::{Command, DemoUpstreamArgs, RunArgs};
use crate::{
    admin::{
        client::{AdminClient, ClientError},
        protocol::{Request, Response},
    },
    config::{Config, default_admin_socket},
    daemon::{self, RunOptions},
    xdp::ListKind,
};

/// Exit codes, so scripts can tell a usage error from a daemon that is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Something failed (a partial import included).
    Failure = 1,
    /// Bad arguments, CIDRs or config.
    Usage = 2,
    /// The daemon is not running or not reachable.
    Unavailable = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// An error to print once, with the exit code it maps to.
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        let error = error.into();
        let exit = match error.downcast_ref::<ClientError>() {
            Some(ClientError::NotRunning { .. } | ClientError::PermissionDenied { .. }) => {
                Exit::Unavailable
            }
            _ if error.downcast_ref::<crate::config::ConfigError>().is_some() => Exit::Usage,
            _ => Exit::Failure,
        };
        Failure { exit, error }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            failure.exit.into()
        }
    }
}

fn run(cli: Cli) -> Result<Exit, Failure> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| default_admin_socket(&cli.instance));
    match cli.command {
        Command::Run(args) => run_daemon(args),
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!(
                "{}: OK (instance `{}`, {} interface(s), {} allowlist and {} blocklist entries, {} L7 listener(s), {} route(s), {} upstream(s))",
                file.display(),
                config.instance,
                config.xdp.interfaces.len(),
                config.xdp.allowlist.len(),
                config.xdp.blocklist.len(),
                config.listeners.len(),
                config.routes.len(),
                config.upstreams.len()
            );
            Ok(Exit::Success)
        }
        Command::Block(command) => lists::run(|| connect(&socket), ListKind::Block, command),
        Command::Allow(command) => lists::run(|| connect(&socket), ListKind::Allow, command),
        Command::Stats(args) => stats::run(&mut connect(&socket)?, &args),
        Command::Status(args) => status::run(&mut connect(&socket)?, args.json),
        Command::Reload => match connect(&socket)?.call(&Request::Reload)? {
            Response::Reloaded { message } => {
                println!("{message}");
                Ok(Exit::Success)
            }
            _ => Err(anyhow::anyhow!("the daemon answered with an unexpected response").into()),
        },
        Command::Keys(command) => keys::run(|| connect(&socket), command),
        Command::Bans(command) => bans::run(|| connect(&socket), command),
        Command::HashPassword { user } => {
            println!("{user}:{}", hash_password(&user)?);
            Ok(Exit::Success)
        }
        Command::DemoUpstream(args) => {
            let _log_writer = init_logging(false);
            demo_upstream::run(&args)?;
            Ok(Exit::Success)
        }
    }
}

/// Reads a password from standard input (echo off on a terminal) and hashes it.
fn hash_password(user: &str) -> Result<String, Failure> {
    use std::io::{BufRead as _, IsTerminal as _};
    if user.is_empty() || user.contains(':') {
        return Err(Failure {
            exit: Exit::Usage,
            error: anyhow::anyhow!("the user name must be non-empty and contain no `:`"),
        });
    }
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal().then(|| {
        eprint!("password for {user}: ");
        EchoOff::new()
    });
    let mut password = String::new();
    stdin.lock().read_line(&mut password)?;
    if terminal.is_some() {
        eprintln!();
    }
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(anyhow::anyhow!("no password on standard input").into());
    }
    crate::auth::basic::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}").into())
}

/// Turns terminal echo off for standard input until dropped.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: termios is plain data; tcgetattr fills it or fails, and then it is unused.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid pointer to a termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return EchoOff(None);
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
        EchoOff(Some(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `new`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

fn connect(socket: &Path) -> Result<AdminClient, Failure> {
    Ok(AdminClient::connect(socket)?)
}

fn run_daemon(args: RunArgs) -> Result<Exit, Failure> {
    let _log_writer = init_logging(args.log_json);
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()?;
    runtime.block_on(daemon::run(
        config,
        RunOptions {
            config_path: args.config.clone(),
            mode: args.xdp_mode.map(Into::into),
            replace_stale_pins: args.replace_stale_pins,
        },
    ))?;
    Ok(Exit::Success)
}

/// Daemon logs go to stderr as text (or JSON with `--log-json`); access-log lines (target
/// `access`) always go out as flat JSON objects, one per line, for log shippers.
/// Logs to standard error through a writer thread: a request's thread only queues its access
/// line (and waits if the queue is full: access lines are never dropped). Lines still queued are
/// written when the returned guard drops, so hold it until the process ends.
fn init_logging(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::{Layer as _, fmt, prelude::*};
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("gateway-log")
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Access lines are written by `proxy::access_log` itself, to the same writer; this
    // subscriber only decides (through `filter`) whether they are wanted.
    crate::proxy::access_log::install(writer.clone());
    let daemon = fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let daemon = if json {
        daemon.json().boxed()
    } else {
        daemon.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(daemon)
        .init();
    guard
}
