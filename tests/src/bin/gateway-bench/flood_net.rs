//! The flood section's test bed: three network namespaces, attacker, client and gateway, joined
//! by two veth pairs (attacker ↔ gateway, client ↔ gateway), and what the section reads from the
//! host while it floods (softirq time in `/proc/stat`). Everything lives in the namespaces:
//! deleting them on drop removes the links, the addresses and any netfilter state inside.
//!
//! The attacker's frames arrive at the gateway's veth as XDP frames (see
//! [`crate::flood_traffic`]). A veth accepts such frames only when its receive side runs NAPI,
//! which it does when an XDP program is attached or when GRO is switched on; the defences without
//! an XDP program get GRO (an `ETHTOOL_SGRO` ioctl: the machine has no `ethtool`), so the frames
//! take the same path into the stack as from a NIC's driver.
use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use gateway_tests::netns::Netns;

/// Interface names (inside their namespaces) and addresses of the test bed.
pub(crate) const GATEWAY_PUBLIC_IF: &str = "flpub0";
pub(crate) const ATTACKER_IF: &str = "flatk0";
pub(crate) const GATEWAY_CLIENT_IF: &str = "flcli0";
pub(crate) const CLIENT_IF: &str = "flcli1";
pub(crate) const GATEWAY_PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub(crate) const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
pub(crate) const GATEWAY_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
pub(crate) const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
pub(crate) const GATEWAY_PUBLIC_MAC: [u8; 6] = [0x02, 0xbe, 0x4c, 0, 1, 1];
pub(crate) const ATTACKER_MAC: [u8; 6] = [0x02, 0xbe, 0x4c, 0, 1, 2];

/// The three namespaces and their links. Dropping it deletes everything it created.
pub(crate) struct TestBed {
    // Field order is drop order: links first (deleting one end removes both), then namespaces.
    _links: [Link; 2],
    pub(crate) gateway: Netns,
    pub(crate) attacker: Netns,
    pub(crate) client: Netns,
}

/// A veth pair, deleted through its end in `netns` on drop.
struct Link {
    netns: String,
    name: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "link", "del", &self.name])
            .output();
    }
}

fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

/// Runs `ip ARGS`, with its error output as the error.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    ensure!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

impl TestBed {
    pub(crate) fn new() -> Result<TestBed> {
        let pid = std::process::id();
        // `Netns::new` panics on failure; the section turns a panic into its error.
        let gateway = Netns::new(&format!("gwbench-{pid}-gw"));
        let attacker = Netns::new(&format!("gwbench-{pid}-atk"));
        let client = Netns::new(&format!("gwbench-{pid}-cl"));
        let gw = gateway.name().to_owned();
        let mut links = Vec::new();
        for (gateway_if, gateway_mac, peer, peer_if, peer_mac) in [
            (
                GATEWAY_PUBLIC_IF,
                Some(GATEWAY_PUBLIC_MAC),
                &attacker,
                ATTACKER_IF,
                Some(ATTACKER_MAC),
            ),
            (GATEWAY_CLIENT_IF, None, &client, CLIENT_IF, None),
        ] {
            let mut args = vec!["-n", &gw, "link", "add", gateway_if];
            let gateway_mac = gateway_mac.map(mac);
            if let Some(m) = &gateway_mac {
                args.extend(["address", m]);
            }
            args.extend(["type", "veth", "peer", "name", peer_if]);
            let peer_mac = peer_mac.map(mac);
            if let Some(m) = &peer_mac {
                args.extend(["address", m]);
            }
            args.extend(["netns", peer.name()]);
            ip(&args)?;
            links.push(Link {
                netns: gw.clone(),
                name: gateway_if.to_owned(),
            });
        }
        let links: [Link; 2] = links.try_into().map_err(|_| anyhow::anyhow!("two links"))?;
        let bed = TestBed {
            _links: links,
            gateway,
            attacker,
            client,
        };
        for (netns, interface, addr) in [
            (&bed.gateway, GATEWAY_PUBLIC_IF, GATEWAY_PUBLIC_V4),
            (&bed.attacker, ATTACKER_IF, ATTACKER_V4),
            (&bed.gateway, GATEWAY_CLIENT_IF, GATEWAY_CLIENT_V4),
            (&bed.client, CLIENT_IF, CLIENT_V4),
        ] {
            ip(&[
                "-n",
                netns.name(),
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                interface,
            ])?;
            ip(&["-n", netns.name(), "link", "set", interface, "up"])?;
        }
        // Replies to the flood's (spoofed) sources leave towards the attacker, as they would
        // towards the Internet: without a route the stack would give up on them early and cheaply.
        ip(&[
            "-n",
            bed.gateway.name(),
            "route",
            "add",
            "default",
            "via",
            &ATTACKER_V4.to_string(),
        ])?;
        Ok(bed)
    }

    /// Runs `program ARGS` inside `netns` (spawned from a thread that joined it), feeding `stdin`.
    pub(crate) fn command_in(
        netns: &Netns,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let output = netns.run(|| -> Result<Output> {
            let mut child = Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("running `{program}` (is it installed?)"))?;
            if let Some(text) = stdin {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .context("a piped stdin")?
                    .write_all(text.as_bytes())
                    .with_context(|| format!("writing to `{program}`"))?;
            }
            drop(child.stdin.take());
            Ok(child.wait_with_output()?)
        })?;
        if !output.status.success() {
            bail!(
                "`{program} {}` failed in `{}`: {}",
                args.join(" "),
                netns.name(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Switches GRO on or off on the gateway's public interface. On a veth this also switches
    /// NAPI on the receive side, without which frames sent to it by XDP are refused.
    pub(crate) fn set_public_gro(&self, on: bool) -> Result<()> {
        self.gateway
            .run(|| set_gro(GATEWAY_PUBLIC_IF, on))
            .with_context(|| format!("switching GRO on `{GATEWAY_PUBLIC_IF}`"))
    }
}

/// `SIOCETHTOOL` with `ETHTOOL_SGRO`, on a socket of the calling thread's namespace.
fn set_gro(interface: &str, on: bool) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let name = CString::new(interface).context("no NUL in an interface name")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: std::ptr::null_mut(),
        _pad: [0; 16],
    };
    for (slot, byte) in request.name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte;
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: u32::from(on),
    };
    request.data = std::ptr::from_mut(&mut value).cast();
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `request` is a valid `struct ifreq` whose data points at a live `ethtool_value`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &raw mut request) };
    ensure!(
        rc == 0,
        "ETHTOOL_SGRO on `{interface}`: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Softirq time so far, in seconds, from `/proc/stat`: of one CPU, or of all of them together.
pub(crate) fn softirq_seconds(cpu: Option<u32>) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let prefix = cpu.map_or("cpu ".to_owned(), |cpu| format!("cpu{cpu} "));
    let line = stat
        .lines()
        .find(|line| line.starts_with(&prefix))
        .with_context(|| format!("/proc/stat has no `{}` line", prefix.trim()))?;
    // cpu user nice system idle iowait irq softirq ...
    let softirq: u64 = line
        .split_whitespace()
        .nth(7)
        .context("a /proc/stat cpu line has no softirq field")?
        .parse()
        .context("a /proc/stat softirq field is not a number")?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks_per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(softirq as f64 / ticks_per_second as f64)
}
