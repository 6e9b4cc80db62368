//! `gateway-bench`: the benchmarks behind `cargo xtask bench`. Each section measures this
//! gateway and the reference it replaces in the same run, inside network namespaces it creates,
//! and the whole run is written to `docs/BENCHMARKS.md` with one PNG chart per section.
//!
//! Sections are independent: one that fails is reported as failed in the document (and makes
//! the run exit non-zero) without hiding the others' figures.
mod daemon;
mod flood;
mod flood_net;
mod flood_traffic;
mod http1;
mod l7;
mod memory;
mod reaction;
mod report;
mod xdp;
mod xdp_filter;
mod xdp_sys;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use clap::Parser;

use report::{Report, Section};

/// Benchmarks of the gateway against the tools it replaces, in one run.
#[derive(Parser)]
#[command(after_help = "Examples:\n  \
    gateway-bench --gateway target/release/gateway            # everything, docs/BENCHMARKS.md\n  \
    gateway-bench --gateway target/release/gateway --quick    # about 3 minutes\n  \
    gateway-bench --gateway target/release/gateway --only xdp # one section")]
pub(crate) struct Args {
    /// The `gateway` binary to measure (a release build).
    #[arg(long, value_name = "PATH")]
    gateway: PathBuf,

    /// Shorter runs and smaller sizes; still 3 repetitions of everything.
    #[arg(long)]
    quick: bool,

    /// Run only these sections.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<SectionId>,

    /// Directory the report (BENCHMARKS.md) and its charts (bench/*.png) go to.
    #[arg(long, value_name = "DIR", default_value = "docs")]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SectionId {
    Xdp,
    Flood,
    L7,
    Reaction,
    Memory,
}

/// A section's benchmark: its figures, or why it could not be measured.
type Bench = fn(&Ctx) -> Result<Section>;

/// What every section gets: the binary under test, how long to measure, where charts go.
pub(crate) struct Ctx {
    pub(crate) gateway: PathBuf,
    pub(crate) quick: bool,
    /// Repetitions per measurement; figures are the median of them.
    pub(crate) repetitions: usize,
    pub(crate) out: PathBuf,
}

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmarks load XDP programs and create network namespaces: run them as root"
    );
    let gateway = args
        .gateway
        .canonicalize()
        .with_context(|| format!("no gateway binary at `{}`", args.gateway.display()))?;
    let ctx = Ctx {
        gateway,
        quick: args.quick,
        repetitions: 3,
        out: args.out.clone(),
    };
    std::fs::create_dir_all(ctx.out.join("bench"))
        .with_context(|| format!("creating `{}`", ctx.out.join("bench").display()))?;

    // (section, title, bench), in the report's order. Sections register themselves here.
    let sections: [(SectionId, &str, Bench); 5] = [
        (SectionId::Xdp, "1. XDP cost per packet", xdp::bench),
        (SectionId::Flood, "2. Flood absorption", flood::bench),
        (SectionId::L7, "3. L7 throughput and latency", l7::bench),
        (SectionId::Reaction, "4. Ban reaction time", reaction::bench),
        (SectionId::Memory, "5. Memory and scale", memory::bench),
    ];
    let mut report = Report::new(&ctx)?;
    for (id, title, bench) in sections {
        if !args.only.is_empty() && !args.only.contains(&id) {
            continue;
        }
        eprintln!("== {title}");
        let started = Instant::now();
        let outcome = bench(&ctx);
        eprintln!("== {title}: {:.0?}", started.elapsed());
        report.push(title, outcome);
    }
    let path = report.write(&ctx.out)?;
    eprintln!("wrote {}", path.display());
    anyhow::ensure!(
        report.failures() == 0,
        "{} section(s) failed; their errors are in {}",
        report.failures(),
        path.display()
    );
    Ok(())
}
