//! Helpers shared by the integration tests: crafted packets ([`packet`]), network namespaces
//! ([`netns`]), the `gateway` binary under test, and the privilege check that lets root-only
//! tests skip, loudly, outside CI.
pub mod netns;
pub mod packet;

/// Whether this test may run: root is required; outside CI a non-root run skips with a message,
/// in CI (where `CI` is set and we are root) a missing privilege is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root (BPF, network namespaces) and CI must run it as root"
    );
    eprintln!("SKIPPED {test}: needs root (BPF and network namespaces); CI runs it as root");
    false
}

/// The `gateway` binary under test: `GATEWAY_BIN` (as `cargo xtask test` sets it), else the
/// workspace's debug build.
pub fn gateway_bin() -> std::path::PathBuf {
    let path = std::env::var_os("GATEWAY_BIN").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/gateway"),
        std::path::PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no gateway binary at `{}`: build it with `cargo build -p gateway-userspace --bins`",
        path.display()
    );
    path
}
