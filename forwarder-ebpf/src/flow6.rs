//! Flow lookup and the anti-spoofing check for IPv6 and translated halves
//! (the IPv4 ones are in flow.rs, untouched).

use forwarder_common::flow::REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
use forwarder_common::{BackendKey, BackendKey6, ClientKey, ClientKey6, Reason, Rewrite6};

use crate::{
    flow::Side,
    forward,
    maps::{BACKEND_FLOWS_4TO6, BACKEND_FLOWS6, CLIENT_FLOWS_4TO6, CLIENT_FLOWS6, PORTS_4TO6},
    parse::Packet,
    parse6::Packet6,
};

/// The entry for an IPv6 packet, whatever family it leaves in.
#[inline(always)]
pub fn lookup6(packet: &Packet6, side: Side) -> Option<*mut Rewrite6> {
    let (ip, udp) = (packet.ip(), packet.udp());
    match side {
        Side::Client => CLIENT_FLOWS6.get_ptr_mut(ClientKey6 {
            relay_addr: ip.dst_addr,
            client_addr: ip.src_addr,
            relay_port: udp.dst,
            client_port: udp.src,
        }),
        Side::Backend => BACKEND_FLOWS6.get_ptr_mut(BackendKey6 {
            relay_addr: ip.dst_addr,
            relay_port: udp.dst,
            _pad: [0; 2],
        }),
    }
}

/// Whether some IPv4-in, IPv6-out half is keyed by this destination port
/// (host order): an array load the verifier inlines, where the lookup
/// below is a hash.
#[inline(always)]
pub fn may_translate(port: u16) -> bool {
    crate::maps::port_bit_set(&PORTS_4TO6, port)
}

/// The entry for an IPv4 packet that leaves as IPv6; asked only after the
/// IPv4 map missed, so IPv4-to-IPv4 flows never pay for it.
#[inline(always)]
pub fn lookup4to6(packet: &Packet, side: Side) -> Option<*mut Rewrite6> {
    let (ip, udp) = (packet.ip(), packet.udp());
    match side {
        Side::Client => CLIENT_FLOWS_4TO6.get_ptr_mut(ClientKey {
            relay_addr: ip.dst_addr,
            client_addr: ip.src_addr,
            relay_port: udp.dst,
            client_port: udp.src,
        }),
        Side::Backend => BACKEND_FLOWS_4TO6.get_ptr_mut(BackendKey {
            relay_addr: ip.dst_addr,
            relay_port: udp.dst,
            _pad: [0; 2],
        }),
    }
}

/// As flow::check_source: only the flow's backend, arriving where the
/// route to it points, may use a backend half. `source_is_allowed` says
/// whether the packet's source address and port are the entry's allowed
/// ones (the caller compares in its own family).
#[inline(always)]
pub fn check_source(
    side: Side,
    rewrite: &Rewrite6,
    source_is_allowed: bool,
    ingress_ifindex: u32,
) -> Result<(), Reason> {
    if let Side::Backend = side {
        if !forward::arrived_on(rewrite.allowed_iface, ingress_ifindex) {
            return Err(Reason::DropSpoofedServer);
        }
        if !source_is_allowed {
            if rewrite.flags & REWRITE_UNKNOWN_SOURCE_TO_DAEMON != 0 {
                return Err(Reason::PassNatRebindCandidate);
            }
            return Err(Reason::DropSpoofedServer);
        }
    }
    Ok(())
}

/// Whether an IPv6 packet comes from the entry's allowed source.
#[inline(always)]
pub fn from_allowed6(packet: &Packet6, rewrite: &Rewrite6) -> bool {
    packet.ip().src_addr == rewrite.allowed_saddr && packet.udp().src == rewrite.allowed_sport
}

/// Whether an IPv4 packet comes from the entry's allowed source (the first
/// four bytes of the 16-byte field).
#[inline(always)]
pub fn from_allowed4(packet: &Packet, rewrite: &Rewrite6) -> bool {
    let a = rewrite.allowed_saddr;
    packet.ip().src_addr == [a[0], a[1], a[2], a[3]] && packet.udp().src == rewrite.allowed_sport
}
