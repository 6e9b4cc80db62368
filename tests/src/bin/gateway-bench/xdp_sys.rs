//! The few `bpf(2)` commands the XDP benchmarks need that aya 0.14 does not offer: batched map
//! updates (filling a million blocklist entries one syscall at a time would measure the syscall,
//! not the map), and a two-instruction XDP program that returns a fixed action, which the flood
//! generator drives in the kernel's live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`).
//!
//! This is the only module of the benchmark that builds `bpf_attr` records by hand; each record
//! below mirrors one member of the kernel's `union bpf_attr` (include/uapi/linux/bpf.h).
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, ensure};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// "Transmit the frames the program returns XDP_TX/XDP_REDIRECT for", since Linux 5.18.
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Issues one `bpf(2)` command; `attr` is the `union bpf_attr` member that command reads.
fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `repr(C)` record laid out like the kernel's member for `command`, valid
    // for its whole size; the kernel reads and writes only within that size. Pointers inside it
    // are set by the callers to buffers that outlive this call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `union bpf_attr` for `BPF_MAP_*_BATCH`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call: large enough that the syscall cost vanishes, small
/// enough that the kernel's temporary copy of keys and values stays a few megabytes.
const BATCH_ENTRIES: usize = 65_536;

/// Inserts (or overwrites) `keys.len() / key_size` entries in one map with as few syscalls as
/// possible. `values` holds one value per key, each `value_size` bytes (for a per-CPU map, one
/// 8-byte-aligned value per possible CPU, back to back).
pub(crate) fn update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    key_size: usize,
    values: &[u8],
    value_size: usize,
) -> io::Result<()> {
    let count = keys.len() / key_size;
    assert_eq!(keys.len(), count * key_size, "whole keys only");
    assert_eq!(values.len(), count * value_size, "one value per key");
    let mut done = 0;
    while done < count {
        let chunk = (count - done).min(BATCH_ENTRIES);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: u32::try_from(chunk).expect("a chunk fits in u32"),
            map_fd: u32::try_from(map.as_raw_fd()).expect("file descriptors are positive"),
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        // The kernel writes back how many it processed; all of them on success.
        done += attr.count as usize;
    }
    Ok(())
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The kernel's `struct xdp_md`, the context a test run hands the program.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// An XDP program of two instructions, `r0 = ACTION; exit`, loaded straight from its bytecode.
/// Closed (and so unloaded) on drop.
pub(crate) struct FixedActionProgram {
    fd: OwnedFd,
}

/// XDP actions, as the kernel numbers them.
pub(crate) const XDP_DROP: u32 = 1;
pub(crate) const XDP_PASS: u32 = 2;
pub(crate) const XDP_TX: u32 = 3;

impl FixedActionProgram {
    pub(crate) fn load(action: u32, name: &str) -> Result<FixedActionProgram> {
        // struct bpf_insn: opcode, dst/src registers, offset, immediate.
        let mov_r0_imm = [0xb7_u8, 0, 0, 0]
            .into_iter()
            .chain(action.to_le_bytes())
            .collect::<Vec<u8>>();
        let exit = [0x95_u8, 0, 0, 0, 0, 0, 0, 0];
        let insns: Vec<u8> = mov_r0_imm.into_iter().chain(exit).collect();
        let license = c"GPL";
        let mut prog_name = [0_u8; 16];
        for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *slot = byte;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            ..ProgLoadAttr::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)
            .context("loading a two-instruction XDP program (BPF_PROG_LOAD) failed: this needs root and a kernel with BPF")?;
        let fd = i32::try_from(fd).context("a file descriptor fits in i32")?;
        // SAFETY: a fresh descriptor that the kernel just returned and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(FixedActionProgram { fd })
    }

    /// Runs the program `repeat` times on `frame` in live-frames mode, as if `frame` had arrived
    /// on `ingress_ifindex`: every XDP_TX transmits a copy of it out of that interface. Must be
    /// called from a thread in that interface's network namespace. Returns when all `repeat`
    /// frames were sent (or a signal interrupted the run).
    pub(crate) fn transmit_live(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
        batch_size: u32,
    ) -> io::Result<()> {
        let context = XdpMd {
            ingress_ifindex,
            data_end: u32::try_from(frame.len()).expect("a frame is small"),
            ..XdpMd::default()
        };
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_raw_fd()).expect("file descriptors are positive"),
            data_size_in: u32::try_from(frame.len()).expect("a frame is small"),
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: size_of::<XdpMd>() as u32,
            ctx_in: std::ptr::from_ref(&context) as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(())
    }

    /// Runs the program `repeat` times on `frame` (no live frames): its action and the kernel's
    /// mean nanoseconds per run.
    pub(crate) fn run(&self, frame: &[u8], repeat: u32) -> Result<(u32, u32)> {
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_raw_fd()).expect("file descriptors are positive"),
            data_size_in: u32::try_from(frame.len()).expect("a frame is small"),
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of a fixed-action program")?;
        ensure!(
            attr.retval <= XDP_TX,
            "unexpected XDP action {}",
            attr.retval
        );
        Ok((attr.retval, attr.duration))
    }
}
