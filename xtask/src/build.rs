//! `cargo xtask build`: the `gateway` binary. Its build script compiles the eBPF crate through
//! aya-build (nightly + bpf-linker) and embeds the object, so one cargo call builds both.

use std::path::PathBuf;

use anyhow::{Context as _, Result, ensure};

use crate::{cmd, setup};

/// Build the `gateway` binary with its embedded XDP program (runs `setup` first).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cargo xtask build            # target/debug/gateway\n  \
    cargo xtask build --release  # target/release/gateway")]
pub(crate) struct Args {
    /// Build with the release profile.
    #[arg(long)]
    pub(crate) release: bool,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    setup::run(&setup::Args::default())?;
    let bin = gateway(args.release)?;
    println!("build: {}", bin.display());
    Ok(())
}

/// Builds the gateway and returns the path of its binary.
pub(crate) fn gateway(release: bool) -> Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args(["build", "-p", "gateway-userspace", "--bins"]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build).context("building the gateway")?;
    let bin = gateway_path(release);
    ensure!(
        bin.is_file(),
        "the build succeeded but {} is missing: does gateway-userspace still have a `gateway` \
         [[bin]]?",
        bin.display()
    );
    Ok(bin)
}

/// Where cargo puts the gateway binary for a profile.
pub(crate) fn gateway_path(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    cmd::target_dir().join(profile).join("gateway")
}
