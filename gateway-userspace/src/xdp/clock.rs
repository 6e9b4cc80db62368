//! The kernel's clock for expiry: `bpf_ktime_get_ns` reads `CLOCK_MONOTONIC`, so userspace
//! computes deadlines on the same clock. Wall-clock time is used only at the edges (display,
//! the state file), where it survives a reboot.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds of `CLOCK_MONOTONIC` now.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Milliseconds since the Unix epoch now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A pair of readings of both clocks, to convert deadlines between them.
#[derive(Clone, Copy, Debug)]
pub struct ClockPair {
    pub monotonic_ns: u64,
    pub unix_ms: u64,
}

impl ClockPair {
    pub fn now() -> Self {
        ClockPair {
            monotonic_ns: monotonic_now_ns(),
            unix_ms: unix_now_ms(),
        }
    }

    /// The monotonic deadline `ttl` from now.
    pub fn deadline_after(&self, ttl: Duration) -> u64 {
        self.monotonic_ns
            .saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The wall-clock time of a monotonic deadline.
    pub fn to_unix_ms(&self, monotonic_ns: u64) -> u64 {
        if monotonic_ns >= self.monotonic_ns {
            self.unix_ms + (monotonic_ns - self.monotonic_ns) / 1_000_000
        } else {
            self.unix_ms
                .saturating_sub((self.monotonic_ns - monotonic_ns) / 1_000_000)
        }
    }

    /// The monotonic deadline of a wall-clock time; `None` if it has already passed.
    pub fn to_monotonic_ns(&self, unix_ms: u64) -> Option<u64> {
        (unix_ms > self.unix_ms)
            .then(|| self.monotonic_ns + (unix_ms - self.unix_ms).saturating_mul(1_000_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_convert_both_ways() {
        let clocks = ClockPair {
            monotonic_ns: 5_000_000_000,
            unix_ms: 1_700_000_000_000,
        };
        let deadline = clocks.deadline_after(Duration::from_secs(60));
        assert_eq!(deadline, 65_000_000_000);
        assert_eq!(clocks.to_unix_ms(deadline), 1_700_000_060_000);
        assert_eq!(clocks.to_monotonic_ns(1_700_000_060_000), Some(deadline));
        assert_eq!(clocks.to_monotonic_ns(1_699_999_999_000), None);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(b >= a && a > 0);
    }
}
