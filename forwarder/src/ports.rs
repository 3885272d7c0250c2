//! Port pools: the client-facing session ports (P) and the backend-facing
//! per-flow ports (Q) the daemon hands out.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// An inclusive port range as written on the command line: `LO-HI`.
/// Read from the config file as its text form, "LO-HI".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde_with::DeserializeFromStr)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }

    fn iter(&self) -> RangeInclusive<u16> {
        self.lo..=self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = text.split_once('-').ok_or_else(|| {
            format!("port range {text:?} is not of the form LO-HI (e.g. 60000-60999)")
        })?;
        let parse = |part: &str| {
            part.trim().parse::<u16>().map_err(|_| {
                format!("{part:?} in port range {text:?} is not a port number (1-65535)")
            })
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo == 0 || lo > hi {
            return Err(format!(
                "port range {text:?} is empty or starts at 0: give LO-HI with 1 <= LO <= HI"
            ));
        }
        Ok(PortRange { lo, hi })
    }
}

/// Hands out ports of one range. Freed ports go to the back of the queue, so
/// a port is reused as late as possible: a server still answering an expired
/// flow then hits an unused port (dropped) rather than somebody else's flow.
#[derive(Debug)]
pub struct PortPool {
    range: PortRange,
    free: VecDeque<u16>,
    taken: BTreeSet<u16>,
}

impl PortPool {
    pub fn new(range: PortRange) -> Self {
        Self {
            range,
            free: range.iter().collect(),
            taken: BTreeSet::new(),
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The next free port, oldest-freed first, skipping ports `usable`
    /// rejects (e.g. because another program holds them); those go to the back.
    pub fn allocate(&mut self, mut usable: impl FnMut(u16) -> bool) -> Option<u16> {
        for _ in 0..self.free.len() {
            let port = self.free.pop_front()?;
            if usable(port) {
                self.taken.insert(port);
                return Some(port);
            }
            self.free.push_back(port);
        }
        None
    }

    /// Takes a specific port, if it is in range and free.
    pub fn take(&mut self, port: u16) -> Result<(), PortError> {
        if !self.range.contains(port) {
            return Err(PortError::OutOfRange(port, self.range));
        }
        if self.taken.contains(&port) {
            return Err(PortError::Taken(port));
        }
        self.free.retain(|&free| free != port);
        self.taken.insert(port);
        Ok(())
    }

    pub fn release(&mut self, port: u16) {
        if self.taken.remove(&port) {
            self.free.push_back(port);
        }
    }

    pub fn in_use(&self) -> usize {
        self.taken.len()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error(
        "port {0} is outside the relay's range {1}: pick one inside it, or restart the daemon with a wider --ports"
    )]
    OutOfRange(u16, PortRange),
    #[error("port {0} is already used by another session: pick another port or omit --port")]
    Taken(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(lo: u16, hi: u16) -> PortPool {
        PortPool::new(PortRange { lo, hi })
    }

    #[test]
    fn parses_ranges_and_rejects_nonsense() {
        assert_eq!(
            "60000-60999".parse(),
            Ok(PortRange {
                lo: 60000,
                hi: 60999
            })
        );
        assert!("60999-60000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("60000".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn allocates_every_port_once_then_reports_exhaustion() {
        let mut pool = pool(100, 102);
        let mut got: Vec<u16> = (0..3).map(|_| pool.allocate(|_| true).unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![100, 101, 102]);
        assert_eq!(pool.allocate(|_| true), None);
        assert_eq!(pool.in_use(), 3);
    }

    #[test]
    fn freed_ports_are_reused_last() {
        let mut pool = pool(100, 103);
        let first = pool.allocate(|_| true).unwrap();
        pool.release(first);
        let next: Vec<u16> = (0..4).map(|_| pool.allocate(|_| true).unwrap()).collect();
        assert_eq!(next.last(), Some(&first));
    }

    #[test]
    fn skips_unusable_ports_without_losing_them() {
        let mut pool = pool(100, 102);
        assert_eq!(pool.allocate(|port| port != 100), Some(101));
        assert_eq!(pool.allocate(|_| true), Some(102));
        assert_eq!(pool.allocate(|_| true), Some(100));
    }

    #[test]
    fn take_checks_range_and_ownership() {
        let mut pool = pool(100, 102);
        assert_eq!(pool.take(101), Ok(()));
        assert_eq!(pool.take(101), Err(PortError::Taken(101)));
        assert!(matches!(pool.take(99), Err(PortError::OutOfRange(99, _))));
        assert_ne!(pool.allocate(|_| true), Some(101));
        pool.release(101);
        assert_eq!(pool.take(101), Ok(()));
    }
}
