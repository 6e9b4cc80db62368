//! Rate-limit trip events from the kernel's ring buffer, turned into typed values.
use aya::maps::{MapData, RingBuf};
use gateway_common::RateLimitEvent;
use tokio::io::unix::AsyncFd;

use crate::cidr::Cidr;

/// A source that tripped its XDP rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitTrip {
    /// The rate-limit key: an IPv4 address, or an IPv6 prefix of the configured length.
    pub source: Cidr,
    /// Packets dropped for this source since its previous event.
    pub dropped: u64,
    /// Monotonic time of the drop.
    pub at_ns: u64,
}

impl RateLimitTrip {
    /// Decodes one ring-buffer record; `None` for a record of the wrong size or family.
    pub fn decode(bytes: &[u8]) -> Option<RateLimitTrip> {
        if bytes.len() < size_of::<RateLimitEvent>() {
            return None;
        }
        // SAFETY: length checked; `RateLimitEvent` is plain integers, any bit pattern is valid.
        let event: RateLimitEvent =
            unsafe { bytes.as_ptr().cast::<RateLimitEvent>().read_unaligned() };
        let source = match event.family {
            4 => {
                let mut v4 = [0u8; 4];
                v4.copy_from_slice(&event.addr[12..]);
                Cidr::from_v4_bytes(v4, 32)?
            }
            6 => Cidr::from_v6_bytes(event.addr, event.prefix_len)?,
            _ => return None,
        };
        Some(RateLimitTrip {
            source,
            dropped: event.dropped,
            at_ns: event.timestamp_ns,
        })
    }
}

/// Reads the ring buffer until the task is dropped, handing each event to `sink`.
pub async fn forward(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(RateLimitTrip) + Send,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // `AsyncFd` (which owns the ring) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut ready = ring.readable_mut().await?;
        let inner = ready.get_inner_mut();
        while let Some(item) = inner.next() {
            match RateLimitTrip::decode(&item) {
                Some(trip) => sink(trip),
                None => tracing::warn!(len = item.len(), "skipping a malformed rate-limit event"),
            }
        }
        ready.clear_ready();
    }
}
