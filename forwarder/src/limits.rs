//! Per-session admission of new flows: a cap on live flows and a token
//! bucket on how fast new ones may appear.

/// Refills `rate_per_sec` tokens a second up to `burst`.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    rate_per_sec: u32,
    burst: u32,
    tokens_milli: u64,
    last_refill_ns: u64,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32, now_ns: u64) -> Self {
        Self {
            rate_per_sec,
            burst,
            tokens_milli: u64::from(burst) * 1000,
            last_refill_ns: now_ns,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now_ns: u64) -> bool {
        let elapsed_ns = now_ns.saturating_sub(self.last_refill_ns);
        let refill = elapsed_ns.saturating_mul(u64::from(self.rate_per_sec)) / 1_000_000;
        self.tokens_milli = (self.tokens_milli + refill).min(u64::from(self.burst) * 1000);
        self.last_refill_ns = now_ns;
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2, 4, 0);
        assert_eq!((0..10).filter(|_| bucket.try_take(0)).count(), 4);
        assert!(!bucket.try_take(S / 4));
        assert!(bucket.try_take(S / 2));
        assert_eq!((0..10).filter(|_| bucket.try_take(10 * S)).count(), 4);
    }
}
