//! Loads the embedded XDP object, pins its maps per instance (reusing them on restart only after
//! checking their layout), and attaches the program to interfaces.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapInfo, RingBuf},
    programs::{Xdp, xdp::XdpMode},
};
use gateway_common::{
    BLOCK_EXACT_CAPACITY, EVENTS_BYTES, LAYOUT_VERSION, PREFIX_CAPACITY, PROGRAM_NAME,
    RATE_CAPACITY, Reason, maps,
};

use super::maps::KernelMaps;
use crate::config::{AttachMode, BPFFS_ROOT};

/// The XDP object built by `build.rs` from the `gateway-ebpf` crate.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-xdp"));

/// `statfs` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this binary holds no XDP program (it was built with AYA_BUILD_SKIP=1); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "bpffs is not mounted at {BPFFS_ROOT} and mounting it failed; run `mount -t bpf bpf {BPFFS_ROOT}` as root"
    )]
    Bpffs(#[source] std::io::Error),
    #[error(
        "pinned maps in `{dir}` have layout version {found}, this build uses {expected}; start with `--replace-stale-pins` (bans are restored from the state file) or remove that folder"
    )]
    StalePins {
        dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "pinned map `{map}` in `{dir}` does not match this build ({detail}); start with `--replace-stale-pins` (bans are restored from the state file) or remove that folder"
    )]
    IncompatiblePin {
        dir: PathBuf,
        map: &'static str,
        detail: String,
    },
    #[error("cannot prepare the pin folder `{dir}`")]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the XDP object failed (this needs root and a kernel with BPF)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused the XDP program")]
    Program(#[source] aya::programs::ProgramError),
    #[error(
        "attaching XDP to `{interface}` in {mode:?} mode failed; check that the interface exists, that no other XDP program is attached (`ip link show {interface}`), and for native mode that its driver supports XDP"
    )]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("opening the program's maps failed")]
    Maps(#[source] super::XdpError),
    #[error("map `{map}` is missing from the XDP object")]
    MissingMap { map: &'static str },
    #[error("program `{PROGRAM_NAME}` is missing from the XDP object")]
    MissingProgram,
}

/// Key size, value size and capacity each pinned map must have to be reused.
fn expected_shape(map: &str) -> (u32, u32, u32) {
    const LPM_V4_KEY: u32 = 4 + 4;
    const LPM_V6_KEY: u32 = 4 + 16;
    const ENTRY: u32 = size_of::<gateway_common::ListEntry>() as u32;
    match map {
        maps::META => (4, 4, 1),
        maps::CONFIG => (4, size_of::<gateway_common::RuntimeConfig>() as u32, 1),
        maps::ALLOW_V4 | maps::BLOCK_V4_PREFIX => (LPM_V4_KEY, ENTRY, PREFIX_CAPACITY),
        maps::ALLOW_V6 | maps::BLOCK_V6_PREFIX => (LPM_V6_KEY, ENTRY, PREFIX_CAPACITY),
        maps::BLOCK_V4 => (4, ENTRY, BLOCK_EXACT_CAPACITY),
        maps::BLOCK_V6 => (16, ENTRY, BLOCK_EXACT_CAPACITY),
        maps::RATE => (
            size_of::<gateway_common::RateKey>() as u32,
            size_of::<gateway_common::TokenBucket>() as u32,
            RATE_CAPACITY,
        ),
        maps::STATS => (
            4,
            size_of::<gateway_common::Counter>() as u32,
            Reason::COUNT,
        ),
        maps::EVENTS => (0, 0, EVENTS_BYTES),
        _ => (0, 0, 0),
    }
}

/// Where and how to pin the maps.
#[derive(Clone, Debug)]
pub struct Pinning {
    /// `/sys/fs/bpf/<instance>`.
    pub dir: PathBuf,
    /// Remove pins of another layout instead of refusing to start.
    pub replace_stale: bool,
}

/// A loaded (not yet attached) program with its maps taken out as typed handles.
pub struct LoadedProgram {
    pub program: XdpProgram,
    pub maps: KernelMaps,
    pub events: RingBuf<MapData>,
    /// Whether the maps were reused from an earlier run's pins.
    pub reused_pins: bool,
}

/// The loaded program. Attachments last until this value is dropped.
pub struct XdpProgram(Ebpf);

impl XdpProgram {
    pub fn xdp(&self) -> &Xdp {
        self.0
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("the program was found and loaded as XDP in `load`")
    }

    fn xdp_mut(&mut self) -> &mut Xdp {
        self.0
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("the program was found and loaded as XDP in `load`")
    }

    /// The kernel's id of the loaded program (as `bpftool prog` shows it).
    pub fn id(&self) -> Option<u32> {
        self.xdp().info().ok().map(|info| info.id())
    }

    /// Attaches to one interface.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), LoadError> {
        let xdp_mode = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        };
        self.xdp_mut()
            .attach(interface, xdp_mode)
            .map(drop)
            .map_err(|source| LoadError::Attach {
                interface: interface.to_owned(),
                mode,
                source,
            })
    }
}

/// Loads the program. With `pinning`, maps are pinned in (or reused from) its folder.
pub fn load(pinning: Option<&Pinning>) -> Result<LoadedProgram, LoadError> {
    if PROGRAM_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut loader = EbpfLoader::new();
    let mut reused_pins = false;
    if let Some(pinning) = pinning {
        ensure_bpffs()?;
        reused_pins = check_pins(&pinning.dir, pinning.replace_stale)?;
        fs::create_dir_all(&pinning.dir).map_err(|source| LoadError::PinDir {
            dir: pinning.dir.clone(),
            source,
        })?;
        for name in maps::PINNED {
            loader.map_pin_path(name, pinning.dir.join(name));
        }
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(LoadError::Load)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(LoadError::MissingProgram)?
        .try_into()
        .map_err(LoadError::Program)?;
    program.load().map_err(LoadError::Program)?;

    let mut meta: Array<MapData, u32> = take(&mut ebpf, maps::META)?;
    meta.set(0, LAYOUT_VERSION, 0).map_err(|source| {
        LoadError::Maps(super::XdpError::Map {
            map: maps::META,
            operation: "writing the layout version",
            source,
        })
    })?;
    let events = take(&mut ebpf, maps::EVENTS)?;
    let maps = KernelMaps::take(&mut ebpf).map_err(LoadError::Maps)?;
    Ok(LoadedProgram {
        program: XdpProgram(ebpf),
        maps,
        events,
        reused_pins,
    })
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoadError> {
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::MissingMap { map: name })?;
    T::try_from(map).map_err(|source| {
        LoadError::Maps(super::XdpError::Map {
            map: name,
            operation: "opening",
            source,
        })
    })
}

/// Mounts bpffs at its usual place if nothing is mounted there yet.
fn ensure_bpffs() -> Result<(), LoadError> {
    let root = std::ffi::CString::new(BPFFS_ROOT).expect("no NUL in a constant");
    // SAFETY: `statfs` is plain data; zeroed is a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(root.as_ptr(), &mut stat) } == 0 && stat.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL in a constant");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            root.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Bpffs(std::io::Error::last_os_error()));
    }
    tracing::warn!(
        "mounted bpffs at {BPFFS_ROOT}: if this process runs in a mount namespace of its own (as under `ip netns exec`), that mount and the pins in it vanish when the daemon exits; mount bpffs on the host, or enter only the network namespace (`nsenter --net=/run/netns/NAME`)"
    );
    Ok(())
}

/// Checks that pins in `dir`, if any, were made by a build with this layout. Returns whether
/// pins exist (and will be reused). With `replace_stale`, stale pins are removed instead.
fn check_pins(dir: &Path, replace_stale: bool) -> Result<bool, LoadError> {
    let present: Vec<&'static str> = maps::PINNED
        .into_iter()
        .filter(|name| dir.join(name).exists())
        .collect();
    if present.is_empty() {
        return Ok(false);
    }
    match verify_pins(dir, &present) {
        Ok(()) => Ok(true),
        Err(error) if replace_stale => {
            tracing::warn!(dir = %dir.display(), %error, "removing stale pinned maps (--replace-stale-pins)");
            for name in present {
                fs::remove_file(dir.join(name)).map_err(|source| LoadError::PinDir {
                    dir: dir.to_owned(),
                    source,
                })?;
            }
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

fn verify_pins(dir: &Path, present: &[&'static str]) -> Result<(), LoadError> {
    let incompatible = |map: &'static str, detail: String| LoadError::IncompatiblePin {
        dir: dir.to_owned(),
        map,
        detail,
    };
    if !present.contains(&maps::META) {
        return Err(LoadError::StalePins {
            dir: dir.to_owned(),
            found: 0,
            expected: LAYOUT_VERSION,
        });
    }
    for &name in present {
        let info = MapInfo::from_pin(dir.join(name))
            .map_err(|e| incompatible(name, format!("cannot open the pin: {e}")))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let expected = expected_shape(name);
        if found != expected {
            return Err(incompatible(
                name,
                format!(
                    "key/value size and capacity are {found:?}, this build expects {expected:?}"
                ),
            ));
        }
    }
    let meta = MapData::from_pin(dir.join(maps::META))
        .map_err(|e| incompatible(maps::META, format!("cannot open the pin: {e}")))?;
    let meta: Array<MapData, u32> =
        Array::try_from(Map::Array(meta)).map_err(|e| incompatible(maps::META, e.to_string()))?;
    let found = meta
        .get(&0, 0)
        .map_err(|e| incompatible(maps::META, e.to_string()))?;
    if found != LAYOUT_VERSION {
        return Err(LoadError::StalePins {
            dir: dir.to_owned(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    Ok(())
}

/// Removes an instance's pins (for `--unpin` and test cleanup).
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    for name in maps::PINNED {
        match fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
