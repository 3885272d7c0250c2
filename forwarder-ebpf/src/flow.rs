//! Flow lookup and the anti-spoofing check: which rewrite, if any, applies.

use aya_ebpf::maps::Array;
use forwarder_common::flow::REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
use forwarder_common::portslot::{BackendSlot, ClientSlot, backend_slot_pair, client_slot_pair};
use forwarder_common::{AllowedSource, BackendKey, BackendRewrite, ClientKey, Reason, Rewrite};

use crate::{
    config, forward,
    maps::{
        BACKEND_FLOWS, BACKEND_PORT_SLOTS, BACKEND_PORTS_HASHED, CLIENT_FLOWS, CLIENT_PORT_SLOTS,
        CLIENT_PORTS_HASHED, port_bit_set,
    },
    parse::Packet,
};

/// Which half of a flow a relay port belongs to.
#[derive(Clone, Copy)]
pub enum Side {
    /// Client-facing session port P, or the shared port.
    Client,
    /// Backend-facing per-flow port Q.
    Backend,
}

/// Classifies the destination port against the relay's port ranges.
#[inline(always)]
pub fn relay_side(packet: &Packet) -> Result<Side, Reason> {
    side_of(u16::from_be_bytes(packet.udp().dst))
}

/// Classifies a destination port (host order), whatever the family.
#[inline(always)]
pub fn side_of(port: u16) -> Result<Side, Reason> {
    let config = config::relay();
    if config.is_client_port(port) {
        Ok(Side::Client)
    } else if config.is_flow_port(port) {
        Ok(Side::Backend)
    } else {
        Err(Reason::PassNotRelayPort)
    }
}

/// A flow half that matched a packet: the rewrite, and for a backend half
/// who may use it (a client half's value is the rewrite alone).
pub struct Matched {
    pub entry: *mut Rewrite,
    pub allowed: Option<*const AllowedSource>,
}

/// Finds the flow entry for the packet: its port's slots first, then the
/// hash map where the port's halves may be (a port without slots, or one
/// with halves beyond its slots); a miss goes to the daemon's socket,
/// which decides whether this is a new flow.
#[inline(always)]
pub fn lookup(packet: &Packet, side: Side) -> Result<Matched, Reason> {
    let (ip, udp) = (packet.ip(), packet.udp());
    let port = u16::from_be_bytes(udp.dst);
    match side {
        Side::Client => {
            let key = ClientKey {
                relay_addr: ip.dst_addr,
                client_addr: ip.src_addr,
                relay_port: udp.dst,
                client_port: udp.src,
            };
            match client_slot(key, port) {
                InSlots::Found(entry) => Some(entry),
                InSlots::NotHashed => None,
                InSlots::AskHash => CLIENT_FLOWS.get_ptr_mut(key),
            }
            .map(|entry| Matched {
                entry,
                allowed: None,
            })
        }
        Side::Backend => {
            let key = BackendKey {
                relay_addr: ip.dst_addr,
                relay_port: udp.dst,
                _pad: [0; 2],
            };
            match backend_slot(key, port) {
                InSlots::Found(value) => Some(value),
                InSlots::NotHashed => None,
                InSlots::AskHash => BACKEND_FLOWS.get_ptr_mut(key),
            }
            // SAFETY: a map value pointer, valid for this program run
            // (an array's always, a hash map's under RCU); only field
            // addresses are taken, nothing is read.
            .map(|value| unsafe {
                Matched {
                    entry: &raw mut (*value).rewrite,
                    allowed: Some(&raw const (*value).allowed),
                }
            })
        }
    }
    .ok_or(Reason::PassNoFlow)
}

/// What a port's slots say about a packet's key.
enum InSlots<T> {
    Found(*mut T),
    /// Not in the slots, and the hash map holds no half of this port.
    NotHashed,
    /// The hash map may hold it: a port without slots, or with halves there.
    AskHash,
}

/// The client half in one of the session port's two slots whose key is the
/// packet's.
#[inline(always)]
fn client_slot(key: ClientKey, port: u16) -> InSlots<Rewrite> {
    let pair = client_slot_pair(&config::relay(), port);
    let words = ClientSlot::key_words(key);
    // SAFETY: `slot` is an array value pointer (see `in_slots`); only
    // addresses are taken and the key copied.
    in_slots(
        &CLIENT_PORT_SLOTS,
        &CLIENT_PORTS_HASHED,
        pair,
        port,
        words,
        |slot| unsafe { ((*slot).key, &raw mut (*slot).rewrite) },
    )
}

/// The backend half in one of the backend-facing port's two slots whose
/// key is the packet's.
#[inline(always)]
fn backend_slot(key: BackendKey, port: u16) -> InSlots<BackendRewrite> {
    let pair = backend_slot_pair(&config::relay(), port);
    let words = BackendSlot::key_words(key);
    // SAFETY: as in `client_slot`.
    in_slots(
        &BACKEND_PORT_SLOTS,
        &BACKEND_PORTS_HASHED,
        pair,
        port,
        words,
        |slot| unsafe { ((*slot).key, &raw mut (*slot).value) },
    )
}

/// Compares `words` with the key of each of the port's two slots (`pair`,
/// None: the port has none) and says where the half is. A dead slot's relay port
/// is 0, which no packet here has. `open` reads a slot's key words and
/// takes its value's address.
#[inline(always)]
fn in_slots<S, T, const N: usize>(
    slots: &Array<S>,
    hashed: &Array<u32>,
    pair: Option<[u32; 2]>,
    port: u16,
    words: [u32; N],
    open: impl Fn(*mut S) -> ([u32; N], *mut T),
) -> InSlots<T> {
    let Some(pair) = pair else {
        return InSlots::AskHash;
    };
    for index in pair {
        // An index past the array's end (an array pinned for a narrower
        // range) finds nothing, and the hash map answers. The pointer is
        // valid for the program's run; the daemon writes a slot only while
        // it is dead (portslot.rs).
        let Some(slot) = slots.get_ptr_mut(index) else {
            return InSlots::AskHash;
        };
        let (held, value) = open(slot);
        let differ = (0..N).fold(0, |differ, word| differ | (held[word] ^ words[word]));
        if differ == 0 {
            return InSlots::Found(value);
        }
    }
    if port_bit_set(hashed, port) {
        InSlots::AskHash
    } else {
        InSlots::NotHashed
    }
}

/// Only the flow's backend, arriving where the route to it points, may use a
/// backend entry: anything else would let a forger write to the client.
///
/// One exception, for punched (NAT'd) sessions only: their server's NAT may
/// hand it a new external endpoint mid-session (reboot, conntrack flush), so
/// a datagram from another source that arrives on the right interface goes
/// to the daemon, which holds the session key and moves the session only for
/// a datagram that verifies. The interface check still comes first: nothing
/// arriving on the client-facing side ever gets this far.
#[inline(always)]
pub fn check_source(
    packet: &Packet,
    matched: &Matched,
    rewrite: &Rewrite,
    ingress_ifindex: u32,
) -> Result<(), Reason> {
    let Some(allowed) = matched.allowed else {
        return Ok(());
    };
    // SAFETY: it points into the same map value as `matched.entry`, valid for
    // this program run; the daemon only ever replaces whole entries.
    let allowed = unsafe { &*allowed };
    if !forward::arrived_on(allowed.iface, ingress_ifindex) {
        return Err(Reason::DropSpoofedServer);
    }
    if packet.ip().src_addr != allowed.saddr || packet.udp().src != allowed.sport {
        if rewrite.flags & REWRITE_UNKNOWN_SOURCE_TO_DAEMON != 0 {
            return Err(Reason::PassNatRebindCandidate);
        }
        return Err(Reason::DropSpoofedServer);
    }
    Ok(())
}
