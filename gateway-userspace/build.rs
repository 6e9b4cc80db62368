//! Builds the XDP program (`gateway-ebpf`) with the nightly toolchain and bpf-linker, so the
//! daemon can embed the object. With `AYA_BUILD_SKIP=1` (for `cargo check`/`clippy` on machines
//! without that toolchain) an empty stub object is written instead; such a binary refuses to
//! load it at run time.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        fs::write(out_dir.join("gateway-xdp"), b"").context("writing the stub eBPF object")?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("running `cargo metadata` to find the eBPF crate")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("the `gateway-ebpf` package is missing from the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("the eBPF manifest has no parent directory")?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
