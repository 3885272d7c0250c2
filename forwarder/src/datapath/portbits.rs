//! A bit per UDP port in a kernel array (forwarder-common's `port_bit`
//! layout), set while the daemon has at least one entry of some kind on
//! that port: `PORTS_4TO6` (translated halves) and `*_PORTS_HASHED` (hash
//! map halves of ports with slots). The XDP program reads a bit before it
//! pays for a lookup, so a bit is set before the port's first entry is
//! written and cleared after its last one is gone.

use aya::Pod;
use aya::maps::{Array, HashMap, MapData, MapError};
use forwarder_common::flow6::{PORTS_4TO6_WORDS, port_bit};

/// One bitmap and how many entries hold each of its bits.
pub struct PortBits {
    bits: Array<MapData, u32>,
    users: std::collections::HashMap<u16, u32>,
}

impl PortBits {
    /// Takes the bitmap and rewrites all of it from `ports`, one item per
    /// entry already in place (adopted pinned maps included).
    pub fn rebuild(
        bits: Array<MapData, u32>,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<Self, MapError> {
        let mut users = std::collections::HashMap::<u16, u32>::new();
        for port in ports {
            *users.entry(port).or_default() += 1;
        }
        let mut words = vec![0u32; PORTS_4TO6_WORDS as usize];
        for port in users.keys() {
            let (word, mask) = port_bit(*port);
            words[word as usize] |= mask;
        }
        let mut this = Self { bits, users };
        for (index, word) in words.into_iter().enumerate() {
            this.bits.set(index as u32, word, 0)?;
        }
        Ok(this)
    }

    /// Counts one more entry on `port`, setting its bit first.
    pub fn add(&mut self, port: u16) -> Result<(), MapError> {
        let users = self.users.entry(port).or_default();
        if *users == 0 {
            let (word, mask) = port_bit(port);
            let bits = self.bits.get(&word, 0)?;
            self.bits.set(word, bits | mask, 0)?;
        }
        *users += 1;
        Ok(())
    }

    /// Counts one entry fewer on `port`, clearing its bit with the last.
    pub fn release(&mut self, port: u16) -> Result<(), MapError> {
        let Some(users) = self.users.get_mut(&port) else {
            return Ok(());
        };
        *users -= 1;
        if *users == 0 {
            self.users.remove(&port);
            let (word, mask) = port_bit(port);
            let bits = self.bits.get(&word, 0)?;
            self.bits.set(word, bits & !mask, 0)?;
        }
        Ok(())
    }

    /// Inserts `key` into `map` as an entry on `port`, or replaces it
    /// there: a new entry is counted (its port's bit set first), a
    /// replaced one is not. At a port already counted one `BPF_NOEXIST`
    /// insert says which it is, so neither asks the map beforehand.
    pub fn put<K: Pod, V: Pod>(
        &mut self,
        map: &mut HashMap<MapData, K, V>,
        port: u16,
        key: K,
        value: V,
    ) -> Result<(), MapError> {
        if self.counts(port) {
            return match map.insert(key, value, BPF_NOEXIST) {
                // No syscall: the bit is set.
                Ok(()) => self.add(port),
                Err(error) if already_exists(&error) => map.insert(key, value, 0),
                Err(error) => Err(error),
            };
        }
        self.add(port)?;
        map.insert(key, value, 0).inspect_err(|_| {
            let _ = self.release(port);
        })
    }

    /// Whether some entry holds `port` (as counted here, without asking the kernel).
    pub fn counts(&self, port: u16) -> bool {
        self.users.contains_key(&port)
    }

    /// Whether the kernel's bitmap has `port`'s bit set.
    pub fn is_set(&self, port: u16) -> Result<bool, MapError> {
        let (word, mask) = port_bit(port);
        Ok(self.bits.get(&word, 0)? & mask != 0)
    }

    /// The array, for readers that open it by descriptor or id.
    pub fn map(&self) -> &Array<MapData, u32> {
        &self.bits
    }
}

/// `BPF_NOEXIST` (uapi bpf.h): an update that fails with EEXIST rather
/// than replace an element.
const BPF_NOEXIST: u64 = 1;

/// The hash map's answer to a `BPF_NOEXIST` insert of a key it holds.
fn already_exists(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(error)
        if error.io_error.kind() == std::io::ErrorKind::AlreadyExists)
}
