//! Flow halves kept in arrays indexed by their relay port: the flow table
//! the one-flow packet path reads before the hash maps.
//!
//! A session port carries one client at a time and a backend-facing port
//! one flow, so nearly every IPv4 flow half is alone on its port. An array
//! slot found by the port costs a load and a key compare where the hash
//! map costs a jhash and a bucket walk (21-31 ns a packet here,
//! docs/BENCHMARKS.md step 10). Halves that share a port (a roam while the
//! other slot is fresh, a backend-facing port reused) stay in the hash
//! maps, which the program asks after both slots missed.
//!
//! Each port has [`SLOTS_PER_PORT`] slots, so a half is replaced by writing
//! the slot nobody reads and then retiring the old one, never by rewriting
//! a slot in place (an array update is a plain copy, which a packet could
//! read half done). A slot is live while its key's relay port is nonzero:
//! no packet to a port that has slots carries port 0, and the daemon's two
//! writes that publish a slot differ only in those two bytes, so a packet
//! that sees them half written still reads a whole entry.

use bytemuck::{Pod, Zeroable};

use crate::config::RelayConfig;
use crate::flow::{BackendKey, BackendRewrite, ClientKey, Rewrite};

/// Slots per port: the live one and the one a replacement is written to.
pub const SLOTS_PER_PORT: u32 = 2;

/// A client half in `CLIENT_PORT_SLOTS`, at the slots of its session port.
/// 64 bytes, so that a slot is one cache line of the array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClientSlot {
    /// The [`ClientKey`]'s bytes as words: the program compares three
    /// aligned loads instead of twelve byte loads.
    pub key: [u32; 3],
    pub _pad: u32,
    pub rewrite: Rewrite,
    pub _tail: u64,
}
const _: () = assert!(core::mem::size_of::<ClientSlot>() == 64);
const _: () = assert!(core::mem::offset_of!(ClientSlot, rewrite) == 16);

/// A backend half in `BACKEND_PORT_SLOTS`, at the slots of its
/// backend-facing port. 64 bytes, one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendSlot {
    /// The [`BackendKey`]'s bytes as words.
    pub key: [u32; 2],
    pub value: BackendRewrite,
    pub _tail: u64,
}
const _: () = assert!(core::mem::size_of::<BackendSlot>() == 64);
const _: () = assert!(core::mem::offset_of!(BackendSlot, value) == 8);

/// What the daemon's side of the slots needs of either kind.
pub trait PortSlot: Pod {
    type Key: Pod + PartialEq;
    type Value: Pod;
    fn new(key: Self::Key, value: Self::Value) -> Self;
    fn key(&self) -> Self::Key;
    fn value(&self) -> Self::Value;
    /// The key's relay port (wire order), which says whether it is live.
    fn relay_port(key: &Self::Key) -> [u8; 2];
    /// This slot with its relay port zeroed: dead, everything else kept.
    fn retired(&self) -> Self;
    fn is_live(&self) -> bool {
        Self::relay_port(&self.key()) != [0, 0]
    }
}

impl ClientSlot {
    /// The words a packet's key is compared with.
    #[inline(always)]
    pub fn key_words(key: ClientKey) -> [u32; 3] {
        bytemuck::cast(key)
    }
}

impl BackendSlot {
    /// The words a packet's key is compared with.
    #[inline(always)]
    pub fn key_words(key: BackendKey) -> [u32; 2] {
        bytemuck::cast(key)
    }
}

impl PortSlot for ClientSlot {
    type Key = ClientKey;
    type Value = Rewrite;

    fn new(key: ClientKey, rewrite: Rewrite) -> Self {
        Self {
            key: Self::key_words(key),
            _pad: 0,
            rewrite,
            _tail: 0,
        }
    }

    fn key(&self) -> ClientKey {
        bytemuck::cast(self.key)
    }

    fn value(&self) -> Rewrite {
        self.rewrite
    }

    fn relay_port(key: &ClientKey) -> [u8; 2] {
        key.relay_port
    }

    fn retired(&self) -> Self {
        let key = ClientKey {
            relay_port: [0, 0],
            ..self.key()
        };
        Self {
            key: Self::key_words(key),
            ..*self
        }
    }
}

impl PortSlot for BackendSlot {
    type Key = BackendKey;
    type Value = BackendRewrite;

    fn new(key: BackendKey, value: BackendRewrite) -> Self {
        Self {
            key: Self::key_words(key),
            value,
            _tail: 0,
        }
    }

    fn key(&self) -> BackendKey {
        bytemuck::cast(self.key)
    }

    fn value(&self) -> BackendRewrite {
        self.value
    }

    fn relay_port(key: &BackendKey) -> [u8; 2] {
        key.relay_port
    }

    fn retired(&self) -> Self {
        let key = BackendKey {
            relay_port: [0, 0],
            ..self.key()
        };
        Self {
            key: Self::key_words(key),
            ..*self
        }
    }
}

/// Indexes of a session port's two client slots (host order), in the
/// order the program asks them; None for a port without slots (the
/// shared port, port 0).
#[inline(always)]
pub fn client_slot_pair(config: &RelayConfig, port: u16) -> Option<[u32; 2]> {
    slot_pair(config.session_port_lo, config.session_port_hi, port)
}

/// Indexes of a backend-facing port's two slots (host order).
#[inline(always)]
pub fn backend_slot_pair(config: &RelayConfig, port: u16) -> Option<[u32; 2]> {
    slot_pair(config.flow_port_lo, config.flow_port_hi, port)
}

/// The array holds every port's first slot, then every port's second: the
/// halves in first slots (nearly all of them) sit in adjacent lines, one
/// line each. Side by side (a port's two slots in one 128-byte pair), each
/// live half dragged its port's dead second slot into the cache with it
/// and a ring of flows outgrew the L2 at half as many (docs/BENCHMARKS.md,
/// step 12).
#[inline(always)]
fn slot_pair(lo: u16, hi: u16, port: u16) -> Option<[u32; 2]> {
    if port == 0 || port < lo || port > hi {
        return None;
    }
    let ports = u32::from(hi - lo) + 1;
    let first = u32::from(port - lo);
    Some([first, first + ports])
}

/// `max_entries` of `CLIENT_PORT_SLOTS` for this configuration.
pub const fn client_slot_entries(config: &RelayConfig) -> u32 {
    slot_entries(config.session_port_lo, config.session_port_hi)
}

/// `max_entries` of `BACKEND_PORT_SLOTS` for this configuration.
pub const fn backend_slot_entries(config: &RelayConfig) -> u32 {
    slot_entries(config.flow_port_lo, config.flow_port_hi)
}

const fn slot_entries(lo: u16, hi: u16) -> u32 {
    if hi < lo {
        // An array needs one entry; a range without ports indexes none.
        return 1;
    }
    (hi as u32 - lo as u32 + 1) * SLOTS_PER_PORT
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (size asserted above).
unsafe impl aya::Pod for ClientSlot {}
#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (size asserted above).
unsafe impl aya::Pod for BackendSlot {}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RelayConfig {
        RelayConfig {
            session_port_lo: 60_000,
            session_port_hi: 60_009,
            flow_port_lo: 61_000,
            flow_port_hi: 61_999,
            shared_port: 60_999,
            _pad: 0,
        }
    }

    #[test]
    fn ports_index_their_own_slots_and_others_none() {
        let config = config();
        assert_eq!(client_slot_pair(&config, 60_000), Some([0, 10]));
        assert_eq!(client_slot_pair(&config, 60_009), Some([9, 19]));
        assert_eq!(client_slot_entries(&config), 20);
        // The shared port's many flows live in the hash map.
        assert_eq!(client_slot_pair(&config, 60_999), None);
        assert_eq!(client_slot_pair(&config, 61_000), None);
        assert_eq!(backend_slot_pair(&config, 61_999), Some([999, 1_999]));
        assert_eq!(backend_slot_entries(&config), 2_000);
        let zero = RelayConfig::default();
        assert_eq!(client_slot_pair(&zero, 0), None);
        assert_eq!(client_slot_entries(&zero), SLOTS_PER_PORT);
    }

    #[test]
    fn a_retired_slot_is_dead_and_keeps_everything_but_its_port() {
        let key = ClientKey {
            relay_addr: [10, 0, 0, 1],
            client_addr: [10, 0, 0, 2],
            relay_port: 60_001u16.to_be_bytes(),
            client_port: 5_000u16.to_be_bytes(),
        };
        let rewrite = Rewrite {
            packets: 7,
            ..Rewrite::default()
        };
        let slot = ClientSlot::new(key, rewrite);
        assert!(slot.is_live());
        assert_eq!(slot.key(), key);
        let retired = slot.retired();
        assert!(!retired.is_live());
        assert_eq!(retired.rewrite, slot.rewrite);
        assert_eq!(retired.key().client_addr, key.client_addr);
        let backend = BackendKey {
            relay_addr: [10, 0, 0, 1],
            relay_port: 61_001u16.to_be_bytes(),
            _pad: [0; 2],
        };
        let slot = BackendSlot::new(backend, BackendRewrite::default());
        assert!(slot.is_live());
        assert!(!slot.retired().is_live());
        assert_eq!(BackendSlot::key_words(backend), slot.key);
    }
}
