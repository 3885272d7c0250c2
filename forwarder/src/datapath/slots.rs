//! The daemon's side of the port slots (forwarder-common's `portslot`): an
//! IPv4 flow half goes to a slot of its relay port when one is free and to
//! the hash map otherwise, and is found, replaced and removed wherever it is.
//!
//! The program asks a port's two slots, in index order, before the hash map,
//! so every change keeps a half readable whole at every instant: a new half
//! is written into a dead slot and published by a second write that gives
//! it its port; a replaced one is written to the other slot (or the hash
//! map) before the old slot is retired; a dead slot is written again only
//! [`GRACE`] after it died, when no program run that found it live is still
//! reading it. Like the hash map's own element reuse, that last rule is
//! about timing, not a lock: an XDP run lasts microseconds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, MapError};
use forwarder_common::RelayConfig;
use forwarder_common::portslot::PortSlot;

use super::portbits::PortBits;

/// How long a dead slot stays unwritten.
pub const GRACE: Duration = Duration::from_millis(100);

/// One kind of flow half (client or backend): its slots and its hash map.
pub struct SlotTable<S>
where
    S: PortSlot + aya::Pod,
    S::Key: aya::Pod,
    S::Value: aya::Pod,
{
    slots: Array<MapData, S>,
    hash: HashMap<MapData, S::Key, S::Value>,
    /// One bit per port with slots whose halves are in the hash map too
    /// (`*_PORTS_HASHED`): the program asks the hash map after a slot miss
    /// only there. Its counts also tell the daemon which ports' halves
    /// may be in the hash map, which spares a syscall per install.
    hashed: PortBits,
    /// The port's two slots, from the relay's port ranges.
    pair_of: fn(&RelayConfig, u16) -> Option<[u32; 2]>,
    config: RelayConfig,
    /// Slots the array has (pinned by an earlier run, it may be sized for
    /// other ranges: ports past its end have none).
    len: u32,
    /// Live slots and their keys; the program never changes either, so
    /// finding a half (or that a port's slots hold others) needs no syscall.
    live: BTreeMap<u32, S::Key>,
    /// When each slot written since this daemon started (or found dead in
    /// an adopted array) last died.
    died: std::collections::HashMap<u32, Instant>,
}

impl<S> SlotTable<S>
where
    S: PortSlot + aya::Pod,
    S::Key: aya::Pod,
    S::Value: aya::Pod,
{
    /// Takes over the slots, the hash map and the port bitmap (recounted
    /// from the hash map). Slots an earlier daemon left are adopted: live
    /// ones stay where they are, unless these ranges put their port's
    /// slots elsewhere (then the half moves to the hash map), and dead
    /// ones count as having just died.
    pub fn adopt(
        slots: Array<MapData, S>,
        hash: HashMap<MapData, S::Key, S::Value>,
        bits: Array<MapData, u32>,
        pair_of: fn(&RelayConfig, u16) -> Option<[u32; 2]>,
        config: RelayConfig,
    ) -> anyhow::Result<Self> {
        let len = slots.len();
        let written = match super::bulk::nonzero_slots(&slots)? {
            Some(written) => written,
            None => (0..len)
                .filter(|index| {
                    slots
                        .get(index, 0)
                        .is_ok_and(|slot| bytemuck::bytes_of(&slot).iter().any(|b| *b != 0))
                })
                .collect(),
        };
        let in_range = |key: &S::Key| {
            pair_of(&config, Self::port(key)).is_some_and(|[_, second]| second < len)
        };
        let hashed_ports: Vec<u16> = (hash.keys().filter_map(Result::ok))
            .filter(in_range)
            .map(|key| Self::port(&key))
            .collect();
        let mut table = Self {
            slots,
            hash,
            hashed: PortBits::rebuild(bits, hashed_ports)?,
            pair_of,
            config,
            len,
            live: BTreeMap::new(),
            died: std::collections::HashMap::new(),
        };
        let now = Instant::now();
        for index in written {
            let slot = table.slots.get(&index, 0)?;
            if !slot.is_live() {
                table.died.insert(index, now);
                continue;
            }
            let key = slot.key();
            let pair = table.indices(&key).filter(|pair| pair.contains(&index));
            // Both slots of a pair live under one key: the earlier daemon
            // stopped between a replacement's publish and its retire. The
            // program reads the first; the second goes, as it would have.
            let twin = pair
                .is_some_and(|[first, _]| index != first && table.live.get(&first) == Some(&key));
            if twin {
                table.retire(index, &slot, now)?;
            } else if pair.is_some() {
                table.live.insert(index, key);
            } else {
                table.hash_put(key, slot.value())?;
                table.retire(index, &slot, now)?;
            }
        }
        Ok(table)
    }

    fn port(key: &S::Key) -> u16 {
        u16::from_be_bytes(S::relay_port(key))
    }

    /// Whether the hash map may hold `key`: always for a port without
    /// slots; for one with slots, only while its bit is counted.
    fn may_be_hashed(&self, key: &S::Key) -> bool {
        self.indices(key).is_none() || self.hashed.counts(Self::port(key))
    }

    /// Puts a half of a port with slots into the hash map (new or replaced).
    fn hash_put(&mut self, key: S::Key, value: S::Value) -> Result<(), MapError> {
        self.hashed
            .put(&mut self.hash, Self::port(&key), key, value)
    }

    /// Takes a half out of the hash map (ENOENT where it is not there).
    fn hash_take(&mut self, key: &S::Key) -> Result<(), MapError> {
        if !self.may_be_hashed(key) {
            return Err(MapError::KeyNotFound);
        }
        self.hash.remove(key)?;
        if self.indices(key).is_some() {
            self.hashed.release(Self::port(key))?;
        }
        Ok(())
    }

    /// The key's port's two slots, if it has them.
    fn indices(&self, key: &S::Key) -> Option<[u32; 2]> {
        (self.pair_of)(&self.config, Self::port(key)).filter(|[_, second]| *second < self.len)
    }

    /// The live slot holding `key`, the first one as the program finds it.
    fn find(&self, key: &S::Key) -> Option<(u32, S)> {
        let index =
            (self.indices(key)?.into_iter()).find(|index| self.live.get(index) == Some(key))?;
        let slot = self.slots.get(&index, 0).ok()?;
        Some((index, slot))
    }

    /// A dead slot of the pair that has been dead long enough to write.
    fn free(&self, pair: [u32; 2], now: Instant) -> Option<u32> {
        pair.into_iter().find(|index| {
            !self.live.contains_key(index)
                && self
                    .died
                    .get(index)
                    .is_none_or(|died| now.duration_since(*died) >= GRACE)
        })
    }

    /// Writes the half into dead slot `index`, then makes it live.
    fn publish(&mut self, index: u32, key: S::Key, value: S::Value) -> Result<(), MapError> {
        let slot = S::new(key, value);
        self.slots.set(index, slot.retired(), 0)?;
        self.slots.set(index, slot, 0)?;
        self.live.insert(index, key);
        self.died.remove(&index);
        Ok(())
    }

    /// Kills live slot `index` (holding `slot`), keeping its bytes but the
    /// port's, so a packet reading it meanwhile reads it whole.
    fn retire(&mut self, index: u32, slot: &S, now: Instant) -> Result<(), MapError> {
        self.slots.set(index, slot.retired(), 0)?;
        self.live.remove(&index);
        self.died.insert(index, now);
        Ok(())
    }

    /// Writes the half wherever it goes; a half already installed under
    /// this key is replaced.
    pub fn insert(&mut self, key: S::Key, value: S::Value) -> Result<(), MapError> {
        let Some(pair) = self.indices(&key) else {
            return self.hash.insert(key, value, 0);
        };
        let now = Instant::now();
        if let Some((index, held)) = self.find(&key) {
            // The other slot if it may be written, else the hash map: the
            // program finds the old half until it is retired.
            match self.free(pair, now) {
                Some(other) => self.publish(other, key, value)?,
                None => self.hash_put(key, value)?,
            }
            return self.retire(index, &held, now);
        }
        match self.free(pair, now) {
            Some(index) => {
                // The slot is found first, so the hash map's copy, if any,
                // is out of use once it is live.
                self.publish(index, key, value)?;
                match self.hash_take(&key) {
                    Err(error) if not_found(&error) => Ok(()),
                    other => other,
                }
            }
            None => self.hash_put(key, value),
        }
    }

    /// Removes the half from wherever it is.
    pub fn remove(&mut self, key: &S::Key) -> Result<(), MapError> {
        let in_slot = match self.find(key) {
            Some((index, held)) => {
                self.retire(index, &held, Instant::now())?;
                true
            }
            None => false,
        };
        match self.hash_take(key) {
            Err(error) if in_slot && not_found(&error) => Ok(()),
            other => other,
        }
    }

    /// The installed half, as the program last wrote it.
    pub fn get(&self, key: &S::Key) -> Result<S::Value, MapError> {
        match self.find(key) {
            Some((_, slot)) => Ok(slot.value()),
            None if self.may_be_hashed(key) => self.hash.get(key, 0),
            None => Err(MapError::KeyNotFound),
        }
    }

    /// Every installed half: the live slots, then the hash map.
    pub fn iter(&self) -> impl Iterator<Item = (S::Key, S::Value)> + '_ {
        let slots = self.live.keys().filter_map(|index| {
            let slot = self.slots.get(index, 0).ok()?;
            slot.is_live().then(|| (slot.key(), slot.value()))
        });
        slots.chain(self.hash.iter().filter_map(Result::ok))
    }

    /// Whether the kernel's bitmap sends a slot miss on `port` to the hash map.
    pub fn port_hashed(&self, port: u16) -> Result<bool, MapError> {
        self.hashed.is_set(port)
    }

    /// The live slots' indexes, ascending.
    pub fn live_slots(&self) -> Vec<u32> {
        self.live.keys().copied().collect()
    }

    /// Halves in slots and in the hash map.
    pub fn counts(&self) -> (usize, usize) {
        (self.live.len(), self.hash.keys().count())
    }

    /// The hash map, for readers that walk it by descriptor.
    pub fn hash(&self) -> &HashMap<MapData, S::Key, S::Value> {
        &self.hash
    }

    /// The port bitmap, likewise.
    pub fn bits(&self) -> &Array<MapData, u32> {
        self.hashed.map()
    }

    /// The slot array, likewise.
    pub fn slots(&self) -> &Array<MapData, S> {
        &self.slots
    }
}

/// The hash map's answer for a key it does not hold (a delete says ENOENT).
fn not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(error) => error.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}
