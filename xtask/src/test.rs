//! `cargo xtask test`: what CI runs (`.ci/run` execs exactly this). Steps run in order and stop at
//! the first failure; a timing table at the end keeps the suite's 45-minute budget visible.

use std::{
    ffi::OsString,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{build, cmd, setup};

/// Run what CI runs: fmt, clippy, build the gateway, then the test suite.
///
/// Steps, in order, stopping at the first failure: setup, `cargo fmt --all -- --check`,
/// `cargo clippy --all-targets -- -D warnings`, `cargo build -p gateway-userspace --bins`, and
/// `cargo test [CARGO_TEST_ARGS...]` with GATEWAY_BIN set to the built binary. Prints each step's
/// time at the end.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask test                              # everything, as CI does\n  \
    cargo xtask test --no-lint                    # skip fmt and clippy\n  \
    cargo xtask test --no-lint -- -p gateway-tests -- --nocapture")]
pub(crate) struct Args {
    /// Skip `cargo fmt --check` and `cargo clippy`, for fast local loops (CI always lints).
    #[arg(long)]
    no_lint: bool,

    /// Extra arguments for `cargo test`, after `--`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<OsString>,
}

type Step<'a> = (&'static str, Box<dyn FnOnce() -> Result<()> + 'a>);

pub(crate) fn run(args: &Args) -> Result<()> {
    // Cargo commands below run without `--workspace`: from the workspace root that means the
    // default members, which leave out the eBPF crate (it only builds for bpfel-unknown-none;
    // the gateway's build script compiles it). `--workspace` would drag it onto the host target.
    let mut steps: Vec<Step<'_>> =
        vec![("setup", Box::new(|| setup::run(&setup::Args::default())))];
    if !args.no_lint {
        steps.push((
            "fmt",
            Box::new(|| cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))),
        ));
        steps.push((
            "clippy",
            Box::new(|| {
                cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
            }),
        ));
    }
    // Debug profile: the end-to-end tests run the binary named by GATEWAY_BIN.
    steps.push(("build", Box::new(|| build::gateway(false).map(drop))));
    steps.push((
        "test",
        Box::new(|| {
            // Everything else, CI included, is inherited unchanged.
            cmd::run(
                cmd::cargo()
                    .arg("test")
                    .args(&args.cargo_test_args)
                    .env("GATEWAY_BIN", build::gateway_path(false)),
            )
        }),
    ));

    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let mut failure = None;
    for (name, step) in steps {
        println!("test: step `{name}`");
        let start = Instant::now();
        let result = step();
        timings.push((name, start.elapsed()));
        if let Err(err) = result {
            failure = Some(err.context(format!("test: step `{name}` failed")));
            break;
        }
    }

    println!("test: timings");
    for (name, elapsed) in &timings {
        println!("  {name:<8} {:>8.1} s", elapsed.as_secs_f64());
    }
    let total: Duration = timings.iter().map(|(_, elapsed)| *elapsed).sum();
    println!("  {:<8} {:>8.1} s", "total", total.as_secs_f64());
    match failure {
        Some(err) => Err(err),
        None => {
            println!("test: all steps passed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::{Cli, Command};

    #[test]
    fn everything_after_the_first_double_dash_goes_to_cargo_test() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--no-lint",
            "--",
            "-p",
            "gateway-tests",
            "--",
            "--nocapture",
        ])
        .unwrap();
        let Command::Test(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert!(args.no_lint);
        assert_eq!(
            args.cargo_test_args,
            ["-p", "gateway-tests", "--", "--nocapture"]
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
