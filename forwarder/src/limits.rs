//! Rate limits the daemon applies itself: how fast a session's flows become
//! established, how often one source may send punch requests.

use forwarder_common::SlowpathBucket;

/// `rate_per_sec` with bursts of `burst`, 0: unlimited. The daemon's limits
/// (new flows per session, punch requests per source) use the same GCRA
/// bucket as the XDP program's slow-path limits: one algorithm, one test.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket(SlowpathBucket);

impl TokenBucket {
    pub const fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self(SlowpathBucket::with_burst(rate_per_sec, burst))
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ns: u64) -> bool {
        self.0.take(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2, 4);
        assert_eq!((0..10).filter(|_| bucket.try_take(0)).count(), 4);
        assert!(!bucket.try_take(S / 4));
        assert!(bucket.try_take(S / 2));
        assert_eq!((0..10).filter(|_| bucket.try_take(10 * S)).count(), 4);
    }

    #[test]
    fn zero_is_unlimited_as_in_the_kernel() {
        let mut bucket = TokenBucket::new(0, 0);
        assert!((0..1000).all(|_| bucket.try_take(0)));
    }
}
