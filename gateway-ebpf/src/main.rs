//! The XDP data plane. Per packet, in this order:
//!
//! 1. parse Ethernet (up to two VLAN tags) and the fixed IPv4/IPv6 header;
//! 2. allowlist (LPM) → pass at once;
//! 3. blocklist, exact addresses (hash) then prefixes (LPM) → drop;
//! 4. IPv6 extension-header walk, only to find fragments (never L4);
//! 5. per-source token bucket → drop when empty, with a sampled event to userspace;
//! 6. fragment policy for non-first fragments.
//!
//! The source check (2, 3) happens before anything beyond the fixed IP header is read, so VLAN
//! tags, extension headers or the L4 protocol cannot carry a banned source past it.
#![no_std]
#![no_main]

use core::mem;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use gateway_common::{
    BLOCK_EXACT_CAPACITY, Counter, EVENTS_BYTES, ListEntry, PREFIX_CAPACITY, RATE_CAPACITY,
    RateKey, RateLimitEvent, Reason, RuntimeConfig, TokenBucket, features, fragment_policy,
    presence,
};

// The static names are the map names userspace looks up (`gateway_common::maps`).
#[map]
static GW_META: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static GW_CONFIG: Array<RuntimeConfig> = Array::with_max_entries(1, 0);
#[map]
static GW_ALLOW_V4: LpmTrie<[u8; 4], ListEntry> = LpmTrie::with_max_entries(PREFIX_CAPACITY, 0);
#[map]
static GW_ALLOW_V6: LpmTrie<[u8; 16], ListEntry> = LpmTrie::with_max_entries(PREFIX_CAPACITY, 0);
// Not preallocated: kernel memory follows the number of bans, not the capacity.
#[map]
static GW_BLOCK_V4: HashMap<[u8; 4], ListEntry> =
    HashMap::with_max_entries(BLOCK_EXACT_CAPACITY, BPF_F_NO_PREALLOC);
#[map]
static GW_BLOCK_V6: HashMap<[u8; 16], ListEntry> =
    HashMap::with_max_entries(BLOCK_EXACT_CAPACITY, BPF_F_NO_PREALLOC);
#[map]
static GW_BLOCK_V4_NET: LpmTrie<[u8; 4], ListEntry> = LpmTrie::with_max_entries(PREFIX_CAPACITY, 0);
#[map]
static GW_BLOCK_V6_NET: LpmTrie<[u8; 16], ListEntry> =
    LpmTrie::with_max_entries(PREFIX_CAPACITY, 0);
#[map]
static GW_RATE: LruHashMap<RateKey, TokenBucket> = LruHashMap::with_max_entries(RATE_CAPACITY, 0);
#[map]
static GW_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
static GW_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// Pre-standard QinQ outer tag, still emitted by some switches.
const ETH_P_QINQ_LEGACY: u16 = 0x9100;
const VLAN_TAG_LEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers walked before giving up on a chain (counted as malformed).
const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_MOBILITY: u8 = 135;
const IPPROTO_HIP: u8 = 139;
const IPPROTO_SHIM6: u8 = 140;

/// Milli-tokens per packet (token buckets count in thousandths).
const TOKEN_SCALE: u64 = 1000;
/// An idle gap this long refills any bucket completely; capping it keeps the refill product
/// within 64 bits for every configurable rate.
const MAX_REFILL_GAP_NS: u64 = 10_000_000_000;

/// A packet the program could not make sense of.
struct Malformed;

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let packet_len = (ctx.data_end() - ctx.data()) as u64;
    let reason = classify(&ctx, packet_len).unwrap_or(Reason::Malformed);
    count(reason, packet_len);
    if reason.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Malformed> {
    // SAFETY: `ptr_at` checked that the `T` lies inside the packet; packet data has no alignment
    // guarantee, hence the unaligned read.
    Ok(unsafe { ptr_at::<T>(ctx, offset)?.read_unaligned() })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(read::<[u8; 2]>(ctx, offset)?))
}

/// Lazily read monotonic clock: most packets never need it.
struct Clock(u64);

impl Clock {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: a helper without arguments or side effects.
            self.0 = unsafe { bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// The source address and where the rest of the L3 header chain starts.
enum Source {
    V4 {
        addr: [u8; 4],
        non_first_fragment: bool,
    },
    V6 {
        addr: [u8; 16],
        /// Offset of the first extension header (or the L4 header).
        next_offset: usize,
        next_header: u8,
    },
}

#[inline(always)]
fn classify(ctx: &XdpContext, packet_len: u64) -> Result<Reason, Malformed> {
    let Some(source) = parse_l2_l3(ctx)? else {
        return Ok(Reason::NonIp);
    };
    let Some(config) = GW_CONFIG.get(0) else {
        // The config map is an array: element 0 always exists. Fail open, counted, if not.
        return Ok(Reason::Passed);
    };
    let mut clock = Clock(0);

    if let Some(reason) = check_lists(&source, config, &mut clock) {
        return Ok(reason);
    }

    let non_first_fragment = match source {
        Source::V4 {
            non_first_fragment, ..
        } => non_first_fragment,
        Source::V6 {
            next_offset,
            next_header,
            ..
        } => ipv6_non_first_fragment(ctx, next_offset, next_header)?,
    };

    if config.features & features::RATE_LIMIT != 0
        && !within_rate(&source, config, packet_len, &mut clock)
    {
        return Ok(Reason::RateLimited);
    }

    if non_first_fragment && config.fragment_policy == fragment_policy::DROP {
        return Ok(Reason::Fragment);
    }
    Ok(Reason::Passed)
}

/// Ethernet, VLAN tags and the fixed IP header. `None` for non-IP frames.
#[inline(always)]
fn parse_l2_l3(ctx: &XdpContext) -> Result<Option<Source>, Malformed> {
    let mut offset = ETH_HEADER_LEN;
    let mut ether_type = read_be16(ctx, 12)?;
    for _ in 0..MAX_VLAN_TAGS {
        if !matches!(ether_type, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_LEGACY) {
            break;
        }
        // The inner EtherType is the last two bytes of the tag.
        ether_type = read_be16(ctx, offset + 2)?;
        offset += VLAN_TAG_LEN;
    }

    match ether_type {
        ETH_P_IPV4 => {
            let header: [u8; IPV4_MIN_HEADER_LEN] = read(ctx, offset)?;
            let version = header[0] >> 4;
            let header_len = usize::from(header[0] & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
            if version != 4 || header_len < IPV4_MIN_HEADER_LEN || total_len < header_len {
                return Err(Malformed);
            }
            // Options must be present in full.
            if ctx.data() + offset + header_len > ctx.data_end() {
                return Err(Malformed);
            }
            let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
            Ok(Some(Source::V4 {
                addr: [header[12], header[13], header[14], header[15]],
                non_first_fragment: fragment_offset != 0,
            }))
        }
        ETH_P_IPV6 => {
            let header: [u8; IPV6_HEADER_LEN] = read(ctx, offset)?;
            if header[0] >> 4 != 6 {
                return Err(Malformed);
            }
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&header[8..24]);
            Ok(Some(Source::V6 {
                addr,
                next_offset: offset + IPV6_HEADER_LEN,
                next_header: header[6],
            }))
        }
        // More VLAN tags than we walk: we cannot see the source, so we cannot prove it is not
        // banned. Such frames are not valid on an edge link anyway.
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_LEGACY => Err(Malformed),
        _ => Ok(None),
    }
}

/// Allowlist, then the two blocklist tiers. `None` when the source is in no list.
#[inline(always)]
fn check_lists(source: &Source, config: &RuntimeConfig, clock: &mut Clock) -> Option<Reason> {
    let use_allow = config.features & features::ALLOWLIST != 0;
    let use_block = config.features & features::BLOCKLIST != 0;
    match source {
        Source::V4 { addr, .. } => {
            let key = Key::new(32, *addr);
            if use_allow
                && config.presence & presence::ALLOW_V4 != 0
                && live_hit(
                    GW_ALLOW_V4.get(&key).map(|entry| entry as *const ListEntry),
                    clock,
                )
            {
                return Some(Reason::Allowlisted);
            }
            if use_block {
                if live_hit(GW_BLOCK_V4.get_ptr(addr), clock) {
                    return Some(Reason::BlockedAddress);
                }
                if config.presence & presence::BLOCK_V4_PREFIX != 0
                    && live_hit(
                        GW_BLOCK_V4_NET
                            .get(&key)
                            .map(|entry| entry as *const ListEntry),
                        clock,
                    )
                {
                    return Some(Reason::BlockedPrefix);
                }
            }
        }
        Source::V6 { addr, .. } => {
            let key = Key::new(128, *addr);
            if use_allow
                && config.presence & presence::ALLOW_V6 != 0
                && live_hit(
                    GW_ALLOW_V6.get(&key).map(|entry| entry as *const ListEntry),
                    clock,
                )
            {
                return Some(Reason::Allowlisted);
            }
            if use_block {
                if live_hit(GW_BLOCK_V6.get_ptr(addr), clock) {
                    return Some(Reason::BlockedAddress);
                }
                if config.presence & presence::BLOCK_V6_PREFIX != 0
                    && live_hit(
                        GW_BLOCK_V6_NET
                            .get(&key)
                            .map(|entry| entry as *const ListEntry),
                        clock,
                    )
                {
                    return Some(Reason::BlockedPrefix);
                }
            }
        }
    }
    None
}

/// Whether a looked-up list entry exists and has not expired; counts the hit if so.
#[inline(always)]
fn live_hit(entry: Option<*const ListEntry>, clock: &mut Clock) -> bool {
    let Some(entry) = entry else {
        return false;
    };
    // SAFETY: map values returned by a lookup stay valid for the rest of the program run.
    let expires_at_ns = unsafe { (*entry).expires_at_ns };
    if expires_at_ns != 0 && clock.now() >= expires_at_ns {
        return false;
    }
    // SAFETY: as above. Plain increment: the BPF target has no atomic read-modify-write in
    // stable Rust, and a hit counter may undercount when two CPUs race on one entry.
    unsafe { (*entry.cast_mut()).hits += 1 };
    true
}

/// Walks the IPv6 extension headers to find a Fragment header with a non-zero offset.
#[inline(always)]
fn ipv6_non_first_fragment(
    ctx: &XdpContext,
    mut offset: usize,
    mut next_header: u8,
) -> Result<bool, Malformed> {
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next_header {
            IPPROTO_FRAGMENT => {
                // Next header, reserved, offset (13 bits) + flags, identification.
                let fragment: [u8; 8] = read(ctx, offset)?;
                return Ok(u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0);
            }
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MOBILITY
            | IPPROTO_HIP | IPPROTO_SHIM6 => {
                let header: [u8; 2] = read(ctx, offset)?;
                next_header = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let header: [u8; 2] = read(ctx, offset)?;
                next_header = header[0];
                offset += (usize::from(header[1]) + 2) * 4;
            }
            // Anything else ends the chain: L4, ESP, or "no next header".
            _ => return Ok(false),
        }
        // The header just skipped must be present in full.
        if ctx.data() + offset > ctx.data_end() {
            return Err(Malformed);
        }
    }
    Err(Malformed)
}

/// Charges the packet to its source's token bucket. `false` when the bucket is empty.
#[inline(always)]
fn within_rate(
    source: &Source,
    config: &RuntimeConfig,
    packet_len: u64,
    clock: &mut Clock,
) -> bool {
    let (key, family, prefix_len) = rate_key(source, config.ipv6_prefix_len);
    let now = clock.now();
    let packet_cost = TOKEN_SCALE;
    let byte_limit = config.features & features::BYTE_RATE_LIMIT != 0;
    let byte_cost = packet_len * TOKEN_SCALE;

    let Some(bucket) = GW_RATE.get_ptr_mut(&key) else {
        // First packet of this source: a full bucket minus this packet.
        let fresh = TokenBucket {
            packet_tokens: (config.burst_packets * TOKEN_SCALE).saturating_sub(packet_cost),
            byte_tokens: (config.burst_bytes * TOKEN_SCALE).saturating_sub(byte_cost),
            last_refill_ns: now,
            last_event_ns: 0,
            dropped_since_event: 0,
        };
        // Best effort: if the insert fails the packet still passes (fail open, like a cache miss).
        let _ = GW_RATE.insert(&key, &fresh, 0);
        return config.burst_packets > 0 && (!byte_limit || config.burst_bytes >= packet_len);
    };
    // SAFETY: the pointer came from a lookup and stays valid for this run. Two CPUs may update
    // the same bucket at once; a lost update only makes the limit slightly loose.
    let bucket = unsafe { &mut *bucket };

    let gap = now.saturating_sub(bucket.last_refill_ns);
    let packet_refill = refill(gap, config.packets_per_second);
    if packet_refill > 0 || gap >= MAX_REFILL_GAP_NS {
        // Only move the refill mark when tokens were added, so that frequent packets at a low
        // rate still accumulate their fractional tokens.
        bucket.last_refill_ns = now;
        bucket.packet_tokens =
            (bucket.packet_tokens + packet_refill).min(config.burst_packets * TOKEN_SCALE);
        bucket.byte_tokens = (bucket.byte_tokens + refill(gap, config.bytes_per_second))
            .min(config.burst_bytes * TOKEN_SCALE);
    }

    let allowed =
        bucket.packet_tokens >= packet_cost && (!byte_limit || bucket.byte_tokens >= byte_cost);
    if allowed {
        bucket.packet_tokens -= packet_cost;
        if byte_limit {
            bucket.byte_tokens -= byte_cost;
        }
        return true;
    }

    bucket.dropped_since_event += 1;
    if config.features & features::EVENTS != 0
        && (bucket.last_event_ns == 0
            || now.saturating_sub(bucket.last_event_ns) >= config.event_interval_ns)
        && let Some(mut event) = GW_EVENTS.reserve::<RateLimitEvent>(0)
    {
        event.write(RateLimitEvent {
            addr: key.addr,
            family,
            prefix_len,
            timestamp_ns: now,
            dropped: bucket.dropped_since_event,
        });
        event.submit(0);
        bucket.last_event_ns = now;
        bucket.dropped_since_event = 0;
    }
    false
}

/// Milli-tokens earned over `gap_ns` at `per_second`.
#[inline(always)]
fn refill(gap_ns: u64, per_second: u64) -> u64 {
    // Capped so the product stays in 64 bits (rates are validated to at most 10^9/s);
    // a gap that long refills any sane bucket completely.
    let gap_ns = if gap_ns > MAX_REFILL_GAP_NS {
        MAX_REFILL_GAP_NS
    } else {
        gap_ns
    };
    gap_ns * per_second / (1_000_000_000 / TOKEN_SCALE)
}

/// The rate-limit key: IPv4 as `::ffff:a.b.c.d`, IPv6 masked to the configured prefix.
#[inline(always)]
fn rate_key(source: &Source, ipv6_prefix_len: u32) -> (RateKey, u32, u32) {
    match source {
        Source::V4 { addr, .. } => {
            let mut key = RateKey::default();
            key.addr[10] = 0xff;
            key.addr[11] = 0xff;
            key.addr[12..].copy_from_slice(addr);
            (key, 4, 32)
        }
        Source::V6 { addr, .. } => {
            let prefix_len = if ipv6_prefix_len == 0 || ipv6_prefix_len > 128 {
                128
            } else {
                ipv6_prefix_len
            };
            let mut key = RateKey { addr: *addr };
            for (i, byte) in key.addr.iter_mut().enumerate() {
                let bits_before = (i as u32) * 8;
                if bits_before >= prefix_len {
                    *byte = 0;
                } else if prefix_len - bits_before < 8 {
                    *byte &= 0xffu8 << (8 - (prefix_len - bits_before));
                }
            }
            (key, 6, prefix_len)
        }
    }
}

#[inline(always)]
fn count(reason: Reason, packet_len: u64) {
    if let Some(counter) = GW_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it; valid for this run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += packet_len;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
