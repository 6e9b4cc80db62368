//! The reference both XDP sections measure against: `xdp-filter` from xdp-tools, loaded from the
//! BPF object Debian ships with it (`xdpfilt_alw_ip.o`: "allow by default, drop listed IPv4 and
//! IPv6 addresses", which is what `xdp-filter load -f ipv4,ipv6` picks).
//!
//! xdp-filter's own loader goes through libxdp's dispatcher, which fails on this kernel, so this
//! module loads the object with aya and fills its maps the way `xdp-filter ip --mode src ADDR`
//! does: a per-CPU hash keyed by the address as it sits in the packet, whose value on every CPU
//! carries `MAP_FLAG_SRC` ("match as source"). The object pins its maps by name (libbpf's
//! `LIBBPF_PIN_BY_NAME`), so they are pinned in a folder of this process's own and removed on
//! drop. The maps ship with 10,000 entries; the benchmark raises them to the gateway's capacity
//! so that both hold the same blocklists.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{Xdp, xdp::XdpMode},
};

use crate::xdp_sys;

/// The program of the object, and its maps (names from xdp-filter's `common_kern_user.h`).
const PROGRAM: &str = "xdpfilt_alw_ip";
const MAP_V4: &str = "filter_ipv4";
const MAP_V6: &str = "filter_ipv6";
const MAP_STATS: &str = "xdp_stats_map";
/// Value flag "this address matches as a source".
const MAP_FLAG_SRC: u64 = 1;
const OBJECT_FILE: &str = "xdpfilt_alw_ip.o";
/// Where libxdp (and so xdp-filter) looks for its objects, in its order.
const OBJECT_DIRS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/bpf",
    "/usr/lib/bpf",
    "/usr/local/lib/bpf",
];

/// The loaded (and, once attached, running) xdp-filter program. Drop detaches it, unloads it
/// and removes its pins.
pub(crate) struct XdpFilter {
    ebpf: Option<Ebpf>,
    pin_dir: PathBuf,
}

/// Finds xdp-filter's object: `LIBXDP_OBJECT_PATH` first, as libxdp does, then the usual places.
fn object_path() -> Result<PathBuf> {
    let from_env = std::env::var_os("LIBXDP_OBJECT_PATH").map(PathBuf::from);
    from_env
        .into_iter()
        .chain(OBJECT_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(OBJECT_FILE))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "xdp-filter's BPF object `{OBJECT_FILE}` is in none of {OBJECT_DIRS:?}: install xdp-tools (`apt-get install xdp-tools`)"
            )
        })
}

impl XdpFilter {
    /// Loads xdp-filter with room for `capacity` addresses per family.
    pub(crate) fn load(capacity: u32) -> Result<XdpFilter> {
        let object = object_path()?;
        let pin_dir =
            Path::new("/sys/fs/bpf").join(format!("gateway-bench-{}", std::process::id()));
        // Left by a killed run with the same pid: its pins would be reused with their contents.
        remove_pins(&pin_dir);
        std::fs::create_dir_all(&pin_dir).with_context(|| {
            format!(
                "creating `{}` for xdp-filter's pinned maps (is bpffs mounted at /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        let mut filter = XdpFilter {
            ebpf: None,
            pin_dir,
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&filter.pin_dir)
            .map_max_entries(MAP_V4, capacity)
            .map_max_entries(MAP_V6, capacity)
            .load_file(&object)
            .with_context(|| format!("loading xdp-filter's object `{}`", object.display()))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("no program `{PROGRAM}` in `{}`", object.display()))?
            .try_into()
            .context("xdp-filter's program is not an XDP program")?;
        program
            .load()
            .context("the kernel refused xdp-filter's program")?;
        filter.ebpf = Some(ebpf);
        Ok(filter)
    }

    fn ebpf(&self) -> &Ebpf {
        self.ebpf.as_ref().expect("set by `load`")
    }

    pub(crate) fn program(&self) -> &Xdp {
        self.ebpf()
            .program(PROGRAM)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("checked in `load`")
    }

    /// Attaches in native (driver) mode to `interface`, which must exist in the calling thread's
    /// network namespace. Stays attached until drop.
    pub(crate) fn attach(&mut self, interface: &str) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .as_mut()
            .expect("set by `load`")
            .program_mut(PROGRAM)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("checked in `load`");
        program
            .attach(interface, XdpMode::Driver)
            .with_context(|| format!("attaching xdp-filter to `{interface}` in native mode"))?;
        Ok(())
    }

    fn map_data(&self, name: &str) -> Result<&MapData> {
        let map = self
            .ebpf()
            .map(name)
            .with_context(|| format!("xdp-filter's object has no map `{name}`"))?;
        match map {
            aya::maps::Map::PerCpuHashMap(data) | aya::maps::Map::PerCpuArray(data) => Ok(data),
            _ => bail!("xdp-filter's map `{name}` is not of the per-CPU type its source declares"),
        }
    }

    /// Denies these IPv4 sources (network-order octets, as in the packet).
    pub(crate) fn deny_v4(&self, addrs: &[[u8; 4]]) -> Result<()> {
        self.deny(MAP_V4, addrs.as_flattened(), 4)
    }

    /// Denies these IPv6 sources.
    pub(crate) fn deny_v6(&self, addrs: &[[u8; 16]]) -> Result<()> {
        self.deny(MAP_V6, addrs.as_flattened(), 16)
    }

    fn deny(&self, map: &str, keys: &[u8], key_size: usize) -> Result<()> {
        let cpus =
            aya::util::nr_cpus().map_err(|(file, e)| anyhow::anyhow!("reading `{file}`: {e}"))?;
        // One u64 per possible CPU: the flag, and a hit counter of 0 in the bits above it.
        let value: Vec<u8> = std::iter::repeat_n(MAP_FLAG_SRC.to_ne_bytes(), cpus)
            .flatten()
            .collect();
        let count = keys.len() / key_size;
        let values = value.repeat(count);
        xdp_sys::update_batch(
            self.map_data(map)?.fd().as_fd(),
            keys,
            key_size,
            &values,
            value.len(),
        )
        .with_context(|| format!("inserting {count} entries into xdp-filter's `{map}`"))
    }

    /// Packets xdp-filter counted under an XDP action (its `xdp_stats_map`), summed over CPUs.
    pub(crate) fn packets(&self, action: u32) -> Result<u64> {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct StatsRecord {
            packets: u64,
            bytes: u64,
        }
        // SAFETY: two u64s, no padding; every bit pattern is valid.
        unsafe impl aya::Pod for StatsRecord {}
        let map = self
            .ebpf()
            .map(MAP_STATS)
            .with_context(|| format!("xdp-filter's object has no map `{MAP_STATS}`"))?;
        let stats = PerCpuArray::<&MapData, StatsRecord>::try_from(map)
            .context("opening xdp-filter's stats map")?;
        let per_cpu = stats
            .get(&action, 0)
            .context("reading xdp-filter's stats map")?;
        Ok(per_cpu.iter().map(|record| record.packets).sum())
    }
}

fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        // Detaches and unloads (aya ties attachments to the object), then the pins go.
        drop(self.ebpf.take());
        remove_pins(&self.pin_dir);
    }
}
