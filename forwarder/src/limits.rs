//! Rate limits the daemon applies itself: how fast a session's flows become
//! established, how often one source may send punch requests.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

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

/// A bounded memory of recent keys, each with the time it was added:
/// oldest forgotten first once `capacity` is reached, or by age. Bounded so
/// that nobody can make the daemon remember without limit (punch nonces,
/// endpoints evicted from probation).
#[derive(Debug)]
pub struct RecentSet<K> {
    capacity: usize,
    order: VecDeque<(u64, K)>,
    members: HashSet<K>,
}

impl<K: Copy + Eq + Hash> RecentSet<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            members: HashSet::new(),
        }
    }

    /// Remembers `key` (added at `at`); false if it was already remembered.
    pub fn insert(&mut self, key: K, at: u64) -> bool {
        if !self.members.insert(key) {
            return false;
        }
        self.order.push_back((at, key));
        while self.order.len() > self.capacity {
            self.forget_oldest();
        }
        true
    }

    pub fn contains(&self, key: &K) -> bool {
        self.members.contains(key)
    }

    /// Forgets every key added before `at`.
    pub fn forget_before(&mut self, at: u64) {
        while self.order.front().is_some_and(|(added, _)| *added < at) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.members.remove(&key);
        }
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
    fn recent_set_forgets_the_oldest_and_by_age() {
        let mut set = RecentSet::new(2);
        assert!(set.insert(1, 10) && set.insert(2, 20));
        assert!(!set.insert(1, 30), "already remembered");
        assert!(set.insert(3, 30));
        assert!(!set.contains(&1) && set.contains(&2) && set.contains(&3));
        set.forget_before(25);
        assert!(!set.contains(&2) && set.contains(&3));
    }

    #[test]
    fn zero_is_unlimited_as_in_the_kernel() {
        let mut bucket = TokenBucket::new(0, 0);
        assert!((0..1000).all(|_| bucket.try_take(0)));
    }
}
