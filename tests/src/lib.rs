//! Helpers shared by the integration tests: crafted packets ([`packet`]) and the privilege
//! check that lets root-only tests skip, loudly, outside CI.
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
