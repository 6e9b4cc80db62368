//! `cargo xtask bench`: regenerates `docs/BENCHMARKS.md` and its charts in one command. The
//! measuring is `gateway-bench`'s (tests/src/bin/gateway-bench); this only prepares the
//! machine, builds both binaries in release mode and runs it against the release gateway.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::{build, cmd, setup};

/// Benchmark the gateway against what it replaces and write docs/BENCHMARKS.md (as root).
///
/// Runs `setup --bench` (the Debian packages the benchmarks use: NGINX, wrk, h2load,
/// xdp-tools, trafgen, nftables, ipset, perf, matplotlib), builds the release gateway and
/// `gateway-bench`, then runs every section inside network namespaces it creates and removes:
/// XDP cost per packet, flood absorption, L7 throughput and latency against NGINX, ban reaction
/// time, memory and scale. Figures are medians of 3 repetitions; the report records the
/// machine, kernel and commit. Root is needed for XDP and namespaces. A section that fails is
/// reported as failed in the document and makes the command exit non-zero.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    sudo cargo xtask bench                   # everything, about 15 to 25 minutes\n  \
    sudo cargo xtask bench --quick           # shorter runs and smaller sizes, about 3 minutes\n  \
    sudo cargo xtask bench --only l7,memory  # some sections (the report then has only those)\n  \
    sudo cargo xtask bench --quick --out /tmp/bench  # try it without touching docs/")]
pub(crate) struct Args {
    /// Shorter runs and smaller sizes (still 3 repetitions of everything).
    #[arg(long)]
    quick: bool,

    /// Run only these sections: xdp, flood, l7, reaction, memory (comma-separated).
    #[arg(long, value_name = "SECTIONS")]
    only: Option<String>,

    /// Where BENCHMARKS.md and its charts (bench/*.png) go, relative to the workspace root.
    #[arg(long, value_name = "DIR", default_value = "docs")]
    out: PathBuf,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    // Checked before setup and the builds, so a non-root user learns it in a second.
    if !cmd::is_root() {
        bail!(
            "the benchmarks attach XDP programs and create network namespaces: run \
             `sudo cargo xtask bench` (or as root)"
        );
    }
    setup::run(&setup::Args { bench: true })?;
    let gateway = build::gateway(true)?;
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "gateway-tests",
        "--bin",
        "gateway-bench",
    ]))
    .context("building gateway-bench")?;
    let bench = cmd::target_dir().join("release").join("gateway-bench");
    let out = cmd::workspace_root().join(&args.out);
    let mut command = cmd::command(&bench);
    command
        .arg("--gateway")
        .arg(&gateway)
        .arg("--out")
        .arg(&out);
    if args.quick {
        command.arg("--quick");
    }
    if let Some(only) = &args.only {
        command.args(["--only", only]);
    }
    let report = out.join("BENCHMARKS.md");
    cmd::run(&mut command).with_context(|| {
        format!(
            "the benchmarks did not all succeed; the failed sections and their errors are in {}",
            report.display()
        )
    })?;
    println!("bench: wrote {}", report.display());
    Ok(())
}
