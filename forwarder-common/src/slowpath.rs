//! Token buckets that bound how many packets the XDP program hands to the
//! daemon (misses and route-lookup failures on relay ports), so a flood at
//! one port cannot starve the daemon or the other sessions.
//!
//! A bucket is kept as GCRA (the "virtual scheduling" form of a token
//! bucket): a single timestamp, the theoretical arrival time `tat`, that
//! each admitted packet pushes `interval` further. A packet fits while `tat`
//! runs at most `burst` ahead of now. One word of state is what lets the
//! kernel side update it with a single atomic add instead of a lock.

use bytemuck::{Pod, Zeroable};

/// Slots of the per-session bucket array: one per UDP port, indexed by the
/// session's client-facing port (the shared port's slot is its own port),
/// so refusing a miss costs an array load, not a second hash lookup. An
/// all-zero slot is unlimited: a port without a session limit. Fixed, not
/// sized by `--max-sessions`: 1.5 MiB whatever the flags.
pub const SESSION_BUCKET_SLOTS: u32 = 1 << 16;

/// One rate limit. All times are CLOCK_MONOTONIC nanoseconds; the XDP
/// program reads them tick-granular (its jiffies clock, same base: clock.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SlowpathBucket {
    /// Theoretical arrival time; the XDP program updates it atomically.
    pub tat_ns: u64,
    /// Cost of one packet (10^9 / rate). Zero: unlimited.
    pub interval_ns: u64,
    /// How far `tat_ns` may run ahead of now: `burst` packets' worth.
    pub burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SlowpathBucket>() == 24);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data, no padding (size asserted above).
unsafe impl aya::Pod for SlowpathBucket {}

impl SlowpathBucket {
    /// `packets_per_sec` with bursts of one second's worth; 0 means unlimited.
    pub const fn per_second(packets_per_sec: u32) -> Self {
        if packets_per_sec == 0 {
            return Self {
                tat_ns: 0,
                interval_ns: 0,
                burst_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / packets_per_sec as u64;
        Self {
            tat_ns: 0,
            interval_ns,
            burst_ns: interval_ns * packets_per_sec as u64,
        }
    }

    /// `packets_per_sec` with bursts of `burst` packets; 0 means unlimited.
    pub const fn with_burst(packets_per_sec: u32, burst: u32) -> Self {
        let mut bucket = Self::per_second(packets_per_sec);
        bucket.burst_ns = bucket.interval_ns * burst as u64;
        bucket
    }

    /// Spends one packet's worth at `now_ns` if it fits: the same GCRA the
    /// XDP program runs (there with an atomic add, as several CPUs share a
    /// bucket), for the daemon's own limits, which one thread updates.
    pub fn take(&mut self, now_ns: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        self.tat_ns = self.tat_ns.max(now_ns);
        if !self.fits(self.tat_ns, now_ns) {
            return false;
        }
        self.tat_ns += self.interval_ns;
        true
    }

    pub const fn is_unlimited(&self) -> bool {
        self.interval_ns == 0
    }

    /// Whether one more packet fits at `now_ns`, given the current `tat_ns`
    /// (already moved up to `now_ns` if it had fallen behind).
    #[inline(always)]
    pub const fn fits(&self, tat_ns: u64, now_ns: u64) -> bool {
        tat_ns.saturating_sub(now_ns) + self.interval_ns <= self.burst_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn take(bucket: &mut SlowpathBucket, now: u64) -> bool {
        bucket.take(now)
    }

    #[test]
    fn admits_a_burst_then_the_rate() {
        let mut bucket = SlowpathBucket::per_second(100);
        let now = 5 * S;
        assert_eq!((0..1000).filter(|_| take(&mut bucket, now)).count(), 100);
        // Half a second later, half the bucket is back.
        assert_eq!(
            (0..1000).filter(|_| take(&mut bucket, now + S / 2)).count(),
            50
        );
        // Idle for long: never more than one burst.
        assert_eq!(
            (0..1000)
                .filter(|_| take(&mut bucket, now + 100 * S))
                .count(),
            100
        );
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut bucket = SlowpathBucket::per_second(0);
        assert!((0..10_000).all(|_| take(&mut bucket, 0)));
        assert_eq!(SlowpathBucket::default(), bucket);
    }
}
