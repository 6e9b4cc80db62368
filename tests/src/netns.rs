//! Network namespaces joined by a veth pair for the end-to-end tests: created with `ip`, removed
//! on drop (so also when a test panics), and a way to run code or send raw frames inside one.
//!
//! A network namespace belongs to a thread, not to a process. [`Netns::run`] runs a closure on a
//! fresh thread that first joins the namespace with `setns`; sockets created there stay in that
//! namespace wherever they are used later, and processes spawned there start in it. Unlike
//! `ip netns exec`, this leaves the mount namespace alone, so a daemon started this way pins its
//! maps in the host's `/sys/fs/bpf` (`ip netns exec` remounts `/sys`, and pins made under it
//! vanish with the process). `setns`, `if_nametoindex` and the raw `AF_PACKET` socket are the
//! reasons this module needs `unsafe`.
use std::{
    ffi::CString,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
};

/// Runs `ip ARGS`, panicking with its error output if it fails; returns its standard output.
pub fn ip(args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that has joined this namespace, and returns its result (a panic in
    /// `f` is passed on with its own message).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening `{path}`: {e}"));
                // SAFETY: a valid namespace fd; this changes only the calling thread, which
                // exists for nothing but `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into `{path}`: {}",
                    std::io::Error::last_os_error()
                );
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes `frame` (a whole Ethernet frame, crafted by the caller: VLAN tags and all) `count`
    /// times onto `interface`, past the IP stack, through a raw `AF_PACKET` socket.
    pub fn send_frames(&self, interface: &str, frame: &[u8], count: usize) {
        assert!(frame.len() >= 14, "an Ethernet frame has at least 14 bytes");
        self.run(|| {
            let name = CString::new(interface).expect("no NUL in an interface name");
            // SAFETY: a valid C string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no interface `{interface}` in `{}`", self.name);
            // Protocol 0: this socket only sends, it receives nothing.
            // SAFETY: plain syscall; the result is checked before use.
            let raw =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor that nothing else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `sockaddr_ll` is plain data; all zeroes is a valid value.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            // Network byte order, as the frame carries it.
            address.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
            address.sll_ifindex = i32::try_from(index).expect("interface indexes fit in i32");
            address.sll_halen = 6;
            address.sll_addr[..6].copy_from_slice(&frame[..6]);
            for sent in 0..count {
                // SAFETY: buffer and address are valid for the lengths passed.
                let written = unsafe {
                    libc::sendto(
                        socket.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const address).cast(),
                        size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                assert_eq!(
                    usize::try_from(written).ok(),
                    Some(frame.len()),
                    "frame {sent} of {count} on `{interface}`: {}",
                    std::io::Error::last_os_error()
                );
            }
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Not `ip()`: a panic while already unwinding would abort the whole test binary.
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(deleted, Ok(status) if status.success()) {
            eprintln!(
                "warning: could not delete network namespace `{}`",
                self.name
            );
        }
    }
}

/// How an XDP program is attached to an interface, as `ip -j link` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachment {
    /// In the driver (`xdp` / `xdpdrv` in `ip link`).
    Native,
    /// After the socket buffer is built (`xdpgeneric`).
    Generic,
    /// On the NIC, or several programs at once.
    Other,
}

/// Two namespaces, a gateway side and a client side, joined by a veth pair with an IPv4 /24
/// (198.18.N.0, RFC 2544 benchmarking space) and an IPv6 /64 (fd00:e2e:N::, ULA) on it.
pub struct VethPair {
    pub gateway: Netns,
    pub client: Netns,
    /// The gateway's end of the pair, in `gateway`.
    pub gateway_if: String,
    /// The client's end of the pair, in `client`.
    pub client_if: String,
    pub gateway_mac: [u8; 6],
    pub gateway_v4: Ipv4Addr,
    pub client_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
    pub client_v6: Ipv6Addr,
}

impl VethPair {
    /// Builds the topology. `tag` names the namespaces (with this process id, so concurrent runs
    /// do not collide); `subnet` picks the addresses, the interface names and the MAC addresses,
    /// so tests running side by side each use their own.
    pub fn new(tag: &str, subnet: u8) -> VethPair {
        let pid = std::process::id();
        let gateway = Netns::new(&format!("e2e-{tag}-{pid}-gw"));
        let client = Netns::new(&format!("e2e-{tag}-{pid}-cl"));
        let gateway_if = format!("e2e{subnet}gw");
        let client_if = format!("e2e{subnet}cl");
        let gateway_mac = [0x02, 0xe2, 0xe2, 0, subnet, 1];
        let client_mac = [0x02, 0xe2, 0xe2, 0, subnet, 2];
        let v4 = |host| Ipv4Addr::new(198, 18, subnet, host);
        let v6 = |host| Ipv6Addr::new(0xfd00, 0x0e2e, u16::from(subnet), 0, 0, 0, 0, host);
        let pair = VethPair {
            gateway,
            client,
            gateway_if,
            client_if,
            gateway_mac,
            gateway_v4: v4(1),
            client_v4: v4(2),
            gateway_v6: v6(1),
            client_v6: v6(2),
        };
        // Created inside the namespaces, never in the host's, so names cannot clash there.
        pair.gateway.ip(&[
            "link",
            "add",
            &pair.gateway_if,
            "address",
            &mac(&gateway_mac),
            "type",
            "veth",
            "peer",
            "name",
            &pair.client_if,
            "address",
            &mac(&client_mac),
            "netns",
            pair.client.name(),
        ]);
        for (netns, interface, v4, v6) in [
            (
                &pair.gateway,
                &pair.gateway_if,
                pair.gateway_v4,
                pair.gateway_v6,
            ),
            (
                &pair.client,
                &pair.client_if,
                pair.client_v4,
                pair.client_v6,
            ),
        ] {
            netns.ip(&["addr", "add", &format!("{v4}/24"), "dev", interface]);
            // `nodad`: usable at once instead of after a second of duplicate detection.
            netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                interface,
                "nodad",
            ]);
            netns.ip(&["link", "set", interface, "up"]);
        }
        pair
    }

    /// The client's IPv4 network, `198.18.N.0/24`.
    pub fn v4_subnet(&self) -> String {
        let [a, b, c, _] = self.client_v4.octets();
        format!("{a}.{b}.{c}.0/24")
    }

    /// The client's IPv6 network, `fd00:e2e:N::/64`.
    pub fn v6_subnet(&self) -> String {
        let [a, b, c, d, ..] = self.client_v6.segments();
        format!("{}/64", Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
    }

    /// The XDP program attached to the gateway's end, if any.
    pub fn gateway_xdp(&self) -> Option<XdpAttachment> {
        let json = self
            .gateway
            .ip(&["-j", "link", "show", "dev", &self.gateway_if]);
        let links: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| {
            panic!("`ip -j link` printed something else than JSON ({e}): {json}")
        });
        // XDP_ATTACHED_* from <linux/if_link.h>: 1 driver, 2 generic (skb), 3 hardware, 4 multi.
        match links[0]["xdp"]["mode"].as_u64() {
            None | Some(0) => None,
            Some(1) => Some(XdpAttachment::Native),
            Some(2) => Some(XdpAttachment::Generic),
            Some(_) => Some(XdpAttachment::Other),
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end removes both. Done before the namespaces go, so that a socket still
        // holding a namespace alive cannot keep the link around either.
        let _ = Command::new("ip")
            .args(["-n", self.gateway.name(), "link", "del", &self.gateway_if])
            .output();
    }
}

fn mac(bytes: &[u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
