//! Pinned maps: reused across loads only when their layout matches, never silently.
use std::path::PathBuf;

use aya::maps::{Array, Map, MapData};
use gateway_common::{LAYOUT_VERSION, maps};
use gateway_tests::require_root;
use gateway_userspace::{
    cidr::Cidr,
    xdp::{
        DataPlane as _, ListKind,
        loader::{self, LoadError, Pinning, remove_pins},
    },
};

/// A pin folder of its own, removed when the test ends (also on panic).
struct PinDir(PathBuf);

impl PinDir {
    fn new(test: &str) -> PinDir {
        let dir = PathBuf::from(format!("/sys/fs/bpf/gw-test-{test}-{}", std::process::id()));
        let _ = remove_pins(&dir);
        PinDir(dir)
    }

    fn pinning(&self, replace_stale: bool) -> Pinning {
        Pinning {
            dir: self.0.clone(),
            replace_stale,
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(error) = remove_pins(&self.0) {
            eprintln!("cleanup of {}: {error}", self.0.display());
        }
    }
}

#[test]
fn pinned_maps_keep_entries_across_loads() {
    if !require_root("pinned_maps_keep_entries_across_loads") {
        return;
    }
    let pins = PinDir::new("reuse");
    let cidr: Cidr = "198.18.7.7".parse().unwrap();
    {
        let mut first = loader::load(Some(&pins.pinning(false))).expect("first load");
        assert!(!first.reused_pins);
        first.maps.upsert(ListKind::Block, cidr, 0).unwrap();
    }
    let second = loader::load(Some(&pins.pinning(false))).expect("second load");
    assert!(second.reused_pins, "the pins of the first load are reused");
    let entries = second.maps.entries(ListKind::Block).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, cidr);
}

#[test]
fn a_stale_layout_is_refused_then_replaced_on_request() {
    if !require_root("a_stale_layout_is_refused_then_replaced_on_request") {
        return;
    }
    let pins = PinDir::new("stale");
    drop(loader::load(Some(&pins.pinning(false))).expect("first load"));

    // Pretend an older build made these pins.
    let meta = MapData::from_pin(pins.0.join(maps::META)).unwrap();
    let mut meta: Array<MapData, u32> = Array::try_from(Map::Array(meta)).unwrap();
    meta.set(0, LAYOUT_VERSION + 1, 0).unwrap();
    drop(meta);

    let Err(error) = loader::load(Some(&pins.pinning(false))) else {
        panic!("stale pins must not be reused");
    };
    assert!(
        matches!(error, LoadError::StalePins { found, .. } if found == LAYOUT_VERSION + 1),
        "{error}"
    );
    assert!(
        error.to_string().contains("--replace-stale-pins"),
        "{error}"
    );

    let replaced = loader::load(Some(&pins.pinning(true))).expect("replacing stale pins");
    assert!(!replaced.reused_pins);
}

#[test]
fn pins_without_a_layout_version_are_refused() {
    if !require_root("pins_without_a_layout_version_are_refused") {
        return;
    }
    let pins = PinDir::new("nometa");
    drop(loader::load(Some(&pins.pinning(false))).expect("first load"));
    std::fs::remove_file(pins.0.join(maps::META)).unwrap();
    let Err(error) = loader::load(Some(&pins.pinning(false))) else {
        panic!("pins of unknown layout must not be reused");
    };
    assert!(
        matches!(error, LoadError::StalePins { found: 0, .. }),
        "{error}"
    );
}
