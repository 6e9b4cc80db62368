//! Everything the XDP program and the userspace daemon must agree on byte for byte: map names,
//! map value layouts, verdict reason codes and the runtime configuration record.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides see the same layout. Change a
//! layout and you must bump [`LAYOUT_VERSION`]: pinned maps from an older build are then refused
//! instead of being silently reinterpreted.
#![no_std]

/// Version of every map layout below. Stored in the [`maps::META`] map; the loader refuses to
/// reuse pinned maps whose version differs.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps the XDP program declares. Userspace looks them up (and pins them) by these
/// names, so they are written down only here.
pub mod maps {
    /// `Array<u32>` of one element: [`crate::LAYOUT_VERSION`] of the program that created the pins.
    pub const META: &str = "GW_META";
    /// `Array<RuntimeConfig>` of one element, read by the program on every packet.
    pub const CONFIG: &str = "GW_CONFIG";
    /// `LpmTrie<[u8; 4], ListEntry>`: allowlisted IPv4 prefixes.
    pub const ALLOW_V4: &str = "GW_ALLOW_V4";
    /// `LpmTrie<[u8; 16], ListEntry>`: allowlisted IPv6 prefixes.
    pub const ALLOW_V6: &str = "GW_ALLOW_V6";
    /// `HashMap<[u8; 4], ListEntry>`: blocked single IPv4 addresses (the large tier).
    pub const BLOCK_V4: &str = "GW_BLOCK_V4";
    /// `HashMap<[u8; 16], ListEntry>`: blocked single IPv6 addresses (the large tier).
    pub const BLOCK_V6: &str = "GW_BLOCK_V6";
    /// `LpmTrie<[u8; 4], ListEntry>`: blocked IPv4 prefixes shorter than /32 (the small tier).
    pub const BLOCK_V4_PREFIX: &str = "GW_BLOCK_V4_NET";
    /// `LpmTrie<[u8; 16], ListEntry>`: blocked IPv6 prefixes shorter than /128 (the small tier).
    pub const BLOCK_V6_PREFIX: &str = "GW_BLOCK_V6_NET";
    /// `LruHashMap<RateKey, TokenBucket>`: per-source rate-limit state.
    pub const RATE: &str = "GW_RATE";
    /// `PerCpuArray<Counter>` indexed by [`crate::Reason`].
    pub const STATS: &str = "GW_STATS";
    /// `RingBuf` of [`crate::RateLimitEvent`].
    pub const EVENTS: &str = "GW_EVENTS";

    /// Every map that is pinned (all but the event ring, whose unread events are worth nothing
    /// to a new process), in the order the loader checks them.
    pub const PINNED: [&str; 10] = [
        META,
        CONFIG,
        ALLOW_V4,
        ALLOW_V6,
        BLOCK_V4,
        BLOCK_V6,
        BLOCK_V4_PREFIX,
        BLOCK_V6_PREFIX,
        RATE,
        STATS,
    ];
}

/// Name of the XDP program inside the object file.
pub const PROGRAM_NAME: &str = "gateway_xdp";

/// Capacity of the exact-address blocklists (per family): a million single-address bans with
/// headroom. These maps are not preallocated, so kernel memory follows the entries in use.
pub const BLOCK_EXACT_CAPACITY: u32 = 1_200_000;
/// Capacity of the prefix blocklists and of the allowlists (per family).
pub const PREFIX_CAPACITY: u32 = 65_536;
/// Capacity of the rate-limit state. LRU, so spoofed-source churn evicts the coldest sources
/// instead of failing inserts.
/// LRU maps are preallocated: 512 Ki sources cost about 50 MB of kernel memory.
pub const RATE_CAPACITY: u32 = 524_288;
/// Size of the rate-limit event ring buffer in bytes (a power of two, a multiple of the page).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Why the program passed or dropped a packet. The value indexes [`maps::STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not listed anywhere and within its rate limit.
    Passed = 0,
    /// Source matched the allowlist; passed without further checks.
    Allowlisted = 1,
    /// Source matched an exact-address ban.
    BlockedAddress = 2,
    /// Source matched a prefix ban.
    BlockedPrefix = 3,
    /// Source exceeded its packet (or byte) rate.
    RateLimited = 4,
    /// A header was truncated or inconsistent.
    Malformed = 5,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed untouched.
    NonIp = 6,
    /// A non-first fragment dropped by the fragment policy.
    Fragment = 7,
}

impl Reason {
    /// Number of reasons, and so the length of the stats array.
    pub const COUNT: u32 = 8;
    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Passed,
        Reason::Allowlisted,
        Reason::BlockedAddress,
        Reason::BlockedPrefix,
        Reason::RateLimited,
        Reason::Malformed,
        Reason::NonIp,
        Reason::Fragment,
    ];

    /// Stable snake_case name used in the CLI, JSON output and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Passed => "passed",
            Reason::Allowlisted => "allowlisted",
            Reason::BlockedAddress => "blocked_address",
            Reason::BlockedPrefix => "blocked_prefix",
            Reason::RateLimited => "rate_limited",
            Reason::Malformed => "malformed",
            Reason::NonIp => "non_ip",
            Reason::Fragment => "fragment_dropped",
        }
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::BlockedAddress
                | Reason::BlockedPrefix
                | Reason::RateLimited
                | Reason::Malformed
                | Reason::Fragment
        )
    }
}

/// Value of every allowlist and blocklist entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// `CLOCK_MONOTONIC` nanoseconds (the clock of `bpf_ktime_get_ns`) after which the entry is
    /// treated as absent; 0 means it never expires.
    pub expires_at_ns: u64,
    /// Packets that matched this entry. Incremented atomically by the program.
    pub hits: u64,
}

impl ListEntry {
    /// Whether the entry still applies at `now_ns` (monotonic).
    #[inline(always)]
    pub const fn is_live(&self, now_ns: u64) -> bool {
        self.expires_at_ns == 0 || now_ns < self.expires_at_ns
    }
}

/// Key of the rate-limit map: the source address (IPv4 as `::ffff:a.b.c.d`, IPv6 masked to the
/// configured prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub addr: [u8; 16],
}

/// Token-bucket state of one source. Tokens are kept in milli-units so that low rates still
/// refill smoothly with integer arithmetic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Packet tokens, in thousandths of a packet.
    pub packet_tokens: u64,
    /// Byte tokens, in thousandths of a byte (unused when byte limiting is off).
    pub byte_tokens: u64,
    /// Monotonic time of the last refill.
    pub last_refill_ns: u64,
    /// Monotonic time of the last event sent for this source (for sampling).
    pub last_event_ns: u64,
    /// Packets dropped since the last event was sent.
    pub dropped_since_event: u64,
}

/// What the program tells userspace when a source trips its rate limit (sampled: at most one per
/// source per [`RuntimeConfig::event_interval_ns`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitEvent {
    /// The rate-limit key (see [`RateKey`]).
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u32,
    /// Prefix length of `addr` within its family (32 for IPv4, the configured length for IPv6).
    pub prefix_len: u32,
    /// Monotonic time of the drop that produced the event.
    pub timestamp_ns: u64,
    /// Packets dropped for this source since its previous event, this one included.
    pub dropped: u64,
}

/// Per-CPU packet and byte counters of one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Feature switches in [`RuntimeConfig::features`].
pub mod features {
    /// Consult the allowlist.
    pub const ALLOWLIST: u32 = 1 << 0;
    /// Consult the blocklists.
    pub const BLOCKLIST: u32 = 1 << 1;
    /// Enforce the per-source packet rate.
    pub const RATE_LIMIT: u32 = 1 << 2;
    /// Also enforce the per-source byte rate (needs `RATE_LIMIT`).
    pub const BYTE_RATE_LIMIT: u32 = 1 << 3;
    /// Emit rate-limit events on the ring buffer.
    pub const EVENTS: u32 = 1 << 4;
}

/// Bits of [`RuntimeConfig::presence`]. Userspace sets a bit before it inserts the first entry
/// into that trie and clears it after it removed the last one, so the program never skips an entry.
pub mod presence {
    pub const ALLOW_V4: u32 = 1 << 0;
    pub const ALLOW_V6: u32 = 1 << 1;
    pub const BLOCK_V4_PREFIX: u32 = 1 << 2;
    pub const BLOCK_V6_PREFIX: u32 = 1 << 3;
}

/// What to do with a non-first IP fragment once its source has passed the allow/block/rate checks.
/// Such fragments carry no L4 header, so nothing after the source check can inspect them.
pub mod fragment_policy {
    /// Pass them (the default: reassembly in the stack still applies its own limits).
    pub const PASS: u32 = 0;
    /// Drop them (counted as [`crate::Reason::Fragment`]).
    pub const DROP: u32 = 1;
}

/// Settings the program reads from [`maps::CONFIG`] on every packet; userspace rewrites them at
/// run time without reloading the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Bit set of [`features`].
    pub features: u32,
    /// One of [`fragment_policy`].
    pub fragment_policy: u32,
    /// Prefix length that IPv6 sources are aggregated to for rate limiting (1..=128).
    pub ipv6_prefix_len: u32,
    /// Bit set of [`presence`]: which of the LPM tries hold entries. Lets the program skip
    /// lookups in empty tries, which are the costliest part of the pass path.
    pub presence: u32,
    /// Sustained packets per second per source.
    pub packets_per_second: u64,
    /// Bucket size in packets.
    pub burst_packets: u64,
    /// Sustained bytes per second per source (with `BYTE_RATE_LIMIT`).
    pub bytes_per_second: u64,
    /// Bucket size in bytes.
    pub burst_bytes: u64,
    /// Minimum gap between two rate-limit events for one source.
    pub event_interval_ns: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            features: features::ALLOWLIST | features::BLOCKLIST | features::EVENTS,
            fragment_policy: fragment_policy::PASS,
            ipv6_prefix_len: 64,
            presence: 0,
            packets_per_second: 0,
            burst_packets: 0,
            bytes_per_second: 0,
            burst_bytes: 0,
            event_interval_ns: 1_000_000_000,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, made only of integers and byte arrays, and
    // have no implicit padding (checked by the size assertions below), so every bit pattern is
    // a valid value.
    unsafe impl aya::Pod for super::ListEntry {}
    unsafe impl aya::Pod for super::RateKey {}
    unsafe impl aya::Pod for super::TokenBucket {}
    unsafe impl aya::Pod for super::RateLimitEvent {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::RuntimeConfig {}
}

// No implicit padding anywhere: the sizes are the sums of the fields.
const _: () = assert!(core::mem::size_of::<ListEntry>() == 16);
const _: () = assert!(core::mem::size_of::<RateKey>() == 16);
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 40);
const _: () = assert!(core::mem::size_of::<RateLimitEvent>() == 40);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<RuntimeConfig>() == 56);
