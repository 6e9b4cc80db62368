//! Header rewriting on the way through: hop-by-hop headers removed both ways, the forwarding
//! headers (`X-Forwarded-For/-Proto/-Host`, `Forwarded`) set from the real peer, the request
//! id generated or propagated, configured response headers stripped.
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Meaningful for one connection only (RFC 9110 §7.6.1), so never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes the hop-by-hop headers, and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    // `Upgrade` is hop-by-hop too; the pipeline puts it back for WebSocket tunnels only.
    headers.remove(header::UPGRADE);
}

/// What the gateway saw of the client connection.
pub struct Forwarding<'a> {
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy whose forwarding headers are believed.
    pub trusted: bool,
    /// `https` or `http`.
    pub proto: &'static str,
    /// The host the client asked for, if any.
    pub host: Option<&'a str>,
}

/// Sets the forwarding headers. From an untrusted peer every client-supplied forwarding header
/// is dropped first, so a client cannot claim another address; a trusted proxy's chain is kept
/// and the peer appended, as each proxy in a chain does.
pub fn set_forwarding(headers: &mut HeaderMap, forwarding: &Forwarding<'_>) {
    if !forwarding.trusted {
        for name in [
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &X_REAL_IP,
            &header::FORWARDED,
        ] {
            headers.remove(name);
        }
    }
    let peer = forwarding.peer.to_string();
    let joined = |existing: Option<&HeaderValue>, next: &str| match existing
        .and_then(|value| value.to_str().ok())
    {
        Some(chain) if !chain.trim().is_empty() => format!("{chain}, {next}"),
        _ => next.to_owned(),
    };
    let xff = joined(headers.get(&X_FORWARDED_FOR), &peer);
    let for_node = match forwarding.peer {
        IpAddr::V4(_) => peer.clone(),
        IpAddr::V6(_) => format!("\"[{peer}]\""),
    };
    let mut element = format!("for={for_node};proto={}", forwarding.proto);
    if let Some(host) = forwarding.host {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let forwarded = joined(headers.get(header::FORWARDED), &element);
    let keep_proto = headers.contains_key(&X_FORWARDED_PROTO);
    let keep_host = headers.contains_key(&X_FORWARDED_HOST);
    let mut set = |name: HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set(X_FORWARDED_FOR, &xff);
    set(header::FORWARDED, &forwarded);
    if !keep_proto {
        set(X_FORWARDED_PROTO, forwarding.proto);
    }
    if let (false, Some(host)) = (keep_host, forwarding.host) {
        set(X_FORWARDED_HOST, host);
    }
}

/// The client behind the peer: when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` address that is not itself a trusted proxy (each proxy appends the address
/// it saw, so anything left of the first untrusted one could be forged). Returns the address and
/// whether it came from the header.
pub fn forwarded_client(
    peer: std::net::IpAddr,
    trusted_proxies: &[crate::cidr::Cidr],
    headers: &HeaderMap,
) -> (std::net::IpAddr, bool) {
    let trusted = |ip: std::net::IpAddr| trusted_proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return (peer, false);
    }
    let chain: Vec<std::net::IpAddr> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse().ok())
        .collect();
    match chain.iter().rev().find(|ip| !trusted(**ip)) {
        Some(client) => (*client, true),
        None => (peer, false),
    }
}

/// The next output of this thread's SplitMix64 generator, seeded from the OS on first use
/// (from the clock and thread if the OS has no entropy: ids must still differ, and a missing
/// entropy source must not fail requests).
fn next_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            if getrandom::fill(&mut seed).is_err() {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let thread = std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    std::thread::current().id(),
                );
                seed = ((nanos as u64) ^ thread).to_le_bytes();
            }
            u64::from_le_bytes(seed)
        });
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Identifies a request in the access log, upstream and the client's error bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// A random UUID (version 4). The bits come from a per-thread generator seeded once from
    /// the OS: a request id must be unique, not secret, and a `getrandom` call per request is
    /// a system call on the hot path.
    pub fn generate() -> RequestId {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&next_random().to_le_bytes());
        bytes[8..].copy_from_slice(&next_random().to_le_bytes());
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(36);
        for (i, byte) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                text.push('-');
            }
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        RequestId(text)
    }

    /// The client's `X-Request-Id` when it looks like an id (so it cannot forge log lines),
    /// otherwise a new one.
    pub fn from_headers(headers: &HeaderMap) -> RequestId {
        headers
            .get(&X_REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|id| {
                (1..=128).contains(&id.len())
                    && id.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                    })
            })
            .map_or_else(RequestId::generate, |id| RequestId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn header_value(&self) -> HeaderValue {
        // Generated ids are hex and dashes; propagated ones were checked in `from_headers`.
        HeaderValue::from_str(&self.0).unwrap_or(HeaderValue::from_static("invalid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::headers;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_go() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut map);
        let left: Vec<_> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn untrusted_peers_cannot_spoof_forwarding_headers() {
        let mut map = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        let seen = Forwarding {
            peer: "198.51.100.7".parse().expect("ip"),
            trusted: false,
            proto: "https",
            host: Some("api.example.com"),
        };
        set_forwarding(&mut map, &seen);
        assert_eq!(map["x-forwarded-for"], "198.51.100.7");
        assert_eq!(map["x-forwarded-proto"], "https");
        assert_eq!(map["x-forwarded-host"], "api.example.com");
        assert_eq!(
            map["forwarded"],
            "for=198.51.100.7;proto=https;host=\"api.example.com\""
        );
        assert!(!map.contains_key("x-real-ip"));
    }

    #[test]
    fn the_forwarded_client_is_the_last_untrusted_hop() {
        let trusted: Vec<crate::cidr::Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 198.51.100.7, 10.0.0.9"),
        );
        let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            forwarded_client(proxy, &trusted, &headers),
            ("198.51.100.7".parse().unwrap(), true),
            "the forged left-most hop is ignored"
        );
        let stranger: std::net::IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(
            forwarded_client(stranger, &trusted, &headers),
            (stranger, false)
        );
        assert_eq!(
            forwarded_client(proxy, &trusted, &HeaderMap::new()),
            (proxy, false)
        );
    }

    #[test]
    fn trusted_proxies_chains_are_extended() {
        let mut map = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        let seen = Forwarding {
            peer: "2001:db8::1".parse().expect("ip"),
            trusted: true,
            proto: "https",
            host: None,
        };
        set_forwarding(&mut map, &seen);
        assert_eq!(map["x-forwarded-for"], "203.0.113.9, 2001:db8::1");
        assert_eq!(
            map["x-forwarded-proto"], "http",
            "a trusted proxy's value is kept"
        );
        assert_eq!(
            map["forwarded"],
            "for=203.0.113.9, for=\"[2001:db8::1]\";proto=https"
        );
    }

    #[test]
    fn request_ids_are_uuids_or_safe_propagated_values() {
        let id = RequestId::generate();
        assert_eq!(id.as_str().len(), 36, "{id:?}");
        assert_eq!(&id.as_str()[14..15], "4", "version 4: {id:?}");
        assert_ne!(id, RequestId::generate());
        let given = RequestId::from_headers(&headers(&[("x-request-id", "abc-123")]));
        assert_eq!(given.as_str(), "abc-123");
        let forged = RequestId::from_headers(&headers(&[("x-request-id", "a\" b")]));
        assert_eq!(forged.as_str().len(), 36, "an unsafe id is replaced");
    }
}
