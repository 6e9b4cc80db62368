//! `cargo xtask`: the project's automation, so a fresh clone needs one command per task.
//!
//! Every subcommand runs `setup` first, which is idempotent and takes well under a second once
//! the machine is prepared, so nobody has to remember which prerequisite a task needs.

mod bench;
mod build;
mod cmd;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

/// Project automation for the eBPF/XDP edge gateway.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    after_help = "Examples:\n  \
        cargo xtask setup            # install toolchain parts, Debian packages, mount bpffs\n  \
        cargo xtask build --release  # build the `gateway` binary with its XDP program\n  \
        sudo cargo xtask run         # run the gateway with examples/gateway.toml\n  \
        cargo xtask test             # fmt, clippy, build, then the whole test suite\n  \
        sudo cargo xtask bench       # benchmarks: regenerate docs/BENCHMARKS.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Setup(setup::Args),
    Build(build::Args),
    Run(run::Args),
    Test(test::Args),
    Bench(bench::Args),
}

fn main() {
    if let Err(err) = run() {
        // `{:#}` keeps the whole context chain on one line: "what failed: why".
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(args) => setup::run(&args),
        Command::Build(args) => build::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Bench(args) => bench::run(&args),
    }
}
