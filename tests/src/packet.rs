//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: IPv4 and IPv6 with UDP or TCP, VLAN/QinQ
//! tags, IPv4 options, IPv6 extension headers and fragments. Checksums are left at zero: the XDP
//! program never reads them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88A8;

const DST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const DST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

/// An IPv6 extension header to put between the fixed header and UDP.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    DestinationOptions,
    Routing,
    /// A Fragment header with this offset (in 8-byte units).
    Fragment {
        offset: u16,
    },
}

impl Ext {
    fn protocol(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestinationOptions => 60,
        }
    }

    /// The header's bytes, eight of them (length field 0), naming `next` as the next header.
    fn bytes(self, next: u8) -> [u8; 8] {
        match self {
            Ext::Fragment { offset } => {
                let field = (offset << 3).to_be_bytes();
                [next, 0, field[0], field[1], 0, 0, 0, 1]
            }
            // Options padded with PadN; a type-0 routing header with no segments left.
            _ => [next, 0, 1, 4, 0, 0, 0, 0],
        }
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Outer first.
    tags: Vec<u16>,
    ether_type: u16,
    l3: Vec<u8>,
}

const UDP: u8 = 17;
const TCP: u8 = 6;

fn udp(payload_len: usize) -> Vec<u8> {
    let len = u16::try_from(8 + payload_len).expect("small payload");
    let mut out = vec![0x30, 0x39, 0x00, 0x35];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.resize(8 + payload_len, 0xab);
    out
}

fn tcp_syn() -> Vec<u8> {
    let mut out = vec![0x30, 0x39, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0];
    out.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    out
}

fn ipv4_header(
    src: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    fragment_offset: u16,
    l4_len: usize,
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IPv4 options come in 32-bit words");
    let header_len = 20 + options.len();
    let total = u16::try_from(header_len + l4_len).expect("small packet");
    let ihl = u8::try_from(header_len / 4).expect("at most 60 bytes");
    let mut out = vec![0x40 | ihl, 0];
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(fragment_offset & 0x1fff).to_be_bytes());
    out.extend_from_slice(&[64, protocol, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&DST_V4.octets());
    out.extend_from_slice(options);
    out
}

impl Frame {
    /// IPv4 / UDP with a small payload.
    pub fn ipv4(src: Ipv4Addr) -> Frame {
        Frame::ipv4_sized(src, 18)
    }

    /// IPv4 / UDP with `payload_len` bytes of payload.
    pub fn ipv4_sized(src: Ipv4Addr, payload_len: usize) -> Frame {
        let l4 = udp(payload_len);
        let mut l3 = ipv4_header(src, UDP, &[], 0, l4.len());
        l3.extend(l4);
        Frame::with_l3(0x0800, l3)
    }

    /// IPv4 / TCP SYN.
    pub fn ipv4_tcp_syn(src: Ipv4Addr) -> Frame {
        let l4 = tcp_syn();
        let mut l3 = ipv4_header(src, TCP, &[], 0, l4.len());
        l3.extend(l4);
        Frame::with_l3(0x0800, l3)
    }

    /// IPv4 / UDP with 8 bytes of options (NOPs and an end-of-list).
    pub fn ipv4_with_options(src: Ipv4Addr) -> Frame {
        let l4 = udp(18);
        let mut l3 = ipv4_header(src, UDP, &[1, 1, 1, 1, 1, 1, 1, 0], 0, l4.len());
        l3.extend(l4);
        Frame::with_l3(0x0800, l3)
    }

    /// An IPv4 fragment at `offset` (8-byte units): 0 is a first fragment carrying UDP.
    pub fn ipv4_fragment(src: Ipv4Addr, offset: u16) -> Frame {
        let payload = if offset == 0 { udp(18) } else { vec![0xcd; 24] };
        let mut l3 = ipv4_header(src, UDP, &[], offset, payload.len());
        l3.extend(payload);
        Frame::with_l3(0x0800, l3)
    }

    /// IPv6 / UDP.
    pub fn ipv6(src: Ipv6Addr) -> Frame {
        Frame::ipv6_with(src, &[])
    }

    /// IPv6 with these extension headers, then UDP (or raw payload after a non-first fragment).
    pub fn ipv6_with(src: Ipv6Addr, exts: &[Ext]) -> Frame {
        let non_first = exts
            .iter()
            .any(|e| matches!(e, Ext::Fragment { offset } if *offset != 0));
        let payload = if non_first { vec![0xcd; 24] } else { udp(18) };
        let mut chain = Vec::new();
        for (i, ext) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(UDP, |e| e.protocol());
            chain.extend_from_slice(&ext.bytes(next));
        }
        chain.extend(payload);
        let first = exts.first().map_or(UDP, |e| e.protocol());
        let mut l3 = vec![0x60, 0, 0, 0];
        l3.extend_from_slice(&u16::try_from(chain.len()).expect("small").to_be_bytes());
        l3.extend_from_slice(&[first, 64]);
        l3.extend_from_slice(&src.octets());
        l3.extend_from_slice(&DST_V6.octets());
        l3.extend(chain);
        Frame::with_l3(0x86DD, l3)
    }

    /// IPv4 or IPv6 / UDP from `src`.
    pub fn from(src: IpAddr) -> Frame {
        match src {
            IpAddr::V4(v4) => Frame::ipv4(v4),
            IpAddr::V6(v6) => Frame::ipv6(v6),
        }
    }

    /// An ARP request (not IP: the program passes it untouched).
    pub fn arp() -> Frame {
        let mut l3 = vec![0, 1, 8, 0, 6, 4, 0, 1];
        l3.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
        l3.extend_from_slice(&[198, 18, 0, 2]);
        l3.extend_from_slice(&[0; 6]);
        l3.extend_from_slice(&DST_V4.octets());
        Frame::with_l3(0x0806, l3)
    }

    /// A frame whose L3 bytes are given as they are (for malformed headers).
    pub fn with_l3(ether_type: u16, l3: Vec<u8>) -> Frame {
        Frame {
            tags: Vec::new(),
            ether_type,
            l3,
        }
    }

    /// Adds a VLAN tag outside the existing ones (call 802.1Q first, then 802.1ad for QinQ).
    #[must_use]
    pub fn tagged(mut self, tpid: u16, vlan_id: u16) -> Frame {
        self.tags.insert(0, tpid);
        self.tags.insert(1, vlan_id);
        self
    }

    /// Offset of the L3 header in the frame.
    pub fn l3_offset(&self) -> usize {
        14 + self.tags.len() / 2 * 4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for pair in self.tags.chunks(2) {
            out.extend_from_slice(&pair[0].to_be_bytes());
            out.extend_from_slice(&pair[1].to_be_bytes());
        }
        out.extend_from_slice(&self.ether_type.to_be_bytes());
        out.extend_from_slice(&self.l3);
        out
    }
}
