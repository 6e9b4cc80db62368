//! Addresses and prefixes as operators write them, normalised once so every other module can
//! compare them as values.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// An IPv4 or IPv6 prefix in canonical form: no host bits set, IPv4-mapped IPv6 turned into
/// IPv4 (the data plane sees such sources as IPv4 packets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr(IpNet);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error(
        "`{0}` is not an IP address or CIDR (examples: 203.0.113.7, 203.0.113.0/24, 2001:db8::/32)"
    )]
    Syntax(String),
    #[error("`{input}` has host bits set; did you mean `{suggestion}`?")]
    HostBits { input: String, suggestion: String },
}

impl Cidr {
    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self::canonical(IpNet::from(addr))
    }

    fn canonical(net: IpNet) -> Self {
        match net {
            IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                Some(v4) if v6.prefix_len() >= 96 => Cidr(IpNet::V4(
                    Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix length is at most 32"),
                )),
                _ => Cidr(IpNet::V6(v6)),
            },
            v4 => Cidr(v4),
        }
    }

    /// The prefix that holds `addr`: `v4_len` bits of an IPv4 address (IPv4-mapped IPv6
    /// counts as IPv4), `v6_len` bits of an IPv6 one. Lengths beyond the family's are clamped.
    pub fn prefix_of(addr: IpAddr, v4_len: u8, v6_len: u8) -> Self {
        match Self::host(addr).0 {
            IpNet::V4(v4) => Cidr(IpNet::V4(
                Ipv4Net::new(v4.addr(), v4_len.min(32))
                    .expect("length clamped")
                    .trunc(),
            )),
            IpNet::V6(v6) => Cidr(IpNet::V6(
                Ipv6Net::new(v6.addr(), v6_len.min(128))
                    .expect("length clamped")
                    .trunc(),
            )),
        }
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether this is exactly one address (/32 or /128).
    pub fn is_host(&self) -> bool {
        self.0.prefix_len() == self.0.max_prefix_len()
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    /// Whether `addr` (IPv4-mapped IPv6 counts as IPv4) lies in this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&Self::host(addr).addr())
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr()) || other.contains(self.addr())
    }

    /// Builds a prefix from raw network-order bytes as the kernel maps hold them.
    pub fn from_v4_bytes(bytes: [u8; 4], prefix_len: u32) -> Option<Self> {
        let len = u8::try_from(prefix_len).ok()?;
        Ipv4Net::new(Ipv4Addr::from(bytes), len)
            .ok()
            .map(|net| Cidr(IpNet::V4(net.trunc())))
    }

    /// Builds a prefix from raw network-order bytes as the kernel maps hold them.
    pub fn from_v6_bytes(bytes: [u8; 16], prefix_len: u32) -> Option<Self> {
        let len = u8::try_from(prefix_len).ok()?;
        Ipv6Net::new(Ipv6Addr::from(bytes), len)
            .ok()
            .map(|net| Self::canonical(IpNet::V6(net.trunc())))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let net = if text.contains('/') {
            text.parse::<IpNet>()
                .map_err(|_| CidrError::Syntax(input.to_owned()))?
        } else {
            IpNet::from(
                text.parse::<IpAddr>()
                    .map_err(|_| CidrError::Syntax(input.to_owned()))?,
            )
        };
        if net.trunc() != net {
            return Err(CidrError::HostBits {
                input: text.to_owned(),
                suggestion: net.trunc().to_string(),
            });
        }
        Ok(Self::canonical(net))
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Cidr> for String {
    fn from(value: Cidr) -> Self {
        value.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_addresses_become_host_prefixes() {
        let cidr: Cidr = "203.0.113.7".parse().unwrap();
        assert!(cidr.is_host());
        assert_eq!(cidr.prefix_len(), 32);
        assert_eq!(cidr.to_string(), "203.0.113.7");
        let v6: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(v6.prefix_len(), 128);
    }

    #[test]
    fn prefixes_keep_their_length() {
        let cidr: Cidr = "203.0.113.0/24".parse().unwrap();
        assert!(!cidr.is_host());
        assert_eq!(cidr.to_string(), "203.0.113.0/24");
        assert!(cidr.contains("203.0.113.200".parse().unwrap()));
        assert!(!cidr.contains("203.0.114.1".parse().unwrap()));
    }

    #[test]
    fn host_bits_are_refused_with_a_suggestion() {
        let err = "203.0.113.7/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "`203.0.113.7/24` has host bits set; did you mean `203.0.113.0/24`?"
        );
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "203.0.113",
            "203.0.113.0/33",
            "2001:db8::/129",
            "banana",
            "1.2.3.4/",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_becomes_ipv4() {
        let cidr: Cidr = "::ffff:198.51.100.9".parse().unwrap();
        assert!(cidr.is_ipv4());
        assert_eq!(cidr.to_string(), "198.51.100.9");
        let net: Cidr = "::ffff:198.51.100.0/120".parse().unwrap();
        assert_eq!(net.to_string(), "198.51.100.0/24");
        assert!(net.contains("::ffff:198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn prefixes_of_addresses() {
        let v4 = Cidr::prefix_of("198.51.100.77".parse().unwrap(), 24, 64);
        assert_eq!(v4.to_string(), "198.51.100.0/24");
        let mapped = Cidr::prefix_of("::ffff:198.51.100.77".parse().unwrap(), 32, 64);
        assert_eq!(mapped.to_string(), "198.51.100.77");
        let v6 = Cidr::prefix_of("2001:db8:1:2:3:4:5:6".parse().unwrap(), 32, 64);
        assert_eq!(v6.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn kernel_bytes_round_trip() {
        let cidr = Cidr::from_v4_bytes([198, 51, 100, 0], 24).unwrap();
        assert_eq!(cidr.to_string(), "198.51.100.0/24");
        let v6 = Cidr::from_v6_bytes("2001:db8::".parse::<Ipv6Addr>().unwrap().octets(), 32);
        assert_eq!(v6.unwrap().to_string(), "2001:db8::/32");
        assert!(Cidr::from_v4_bytes([1, 2, 3, 4], 33).is_none());
    }
}
