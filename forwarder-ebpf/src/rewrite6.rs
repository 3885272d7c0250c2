//! The in-place rewrite of an IPv6 packet that stays IPv6, and the per-flow
//! counting of every IPv6 or translated half.

use forwarder_common::Rewrite6;
use forwarder_common::flow6::apply_udp_nonzero;

use crate::{
    forward::{self, Route},
    parse6::Packet6,
};

/// Rewrites addresses, ports, hop limit and the UDP checksum (IPv6 has no
/// header checksum), and the MACs for the next hop. Extension headers, if
/// any, stay as they are.
#[inline(always)]
pub fn rewrite(packet: &Packet6, rewrite: &Rewrite6, route: &Route) {
    // SAFETY: parse6::parse bounds-checked the Ethernet, IPv6 and UDP headers,
    // which do not overlap; no reference to them is live.
    let (eth, ip, udp) = unsafe { (&mut *packet.eth, &mut *packet.ip, &mut *packet.udp) };
    ip.hop_limit = ip.hop_limit.wrapping_sub(1);
    ip.src_addr = rewrite.new_saddr;
    ip.dst_addr = rewrite.new_daddr;
    udp.src = rewrite.new_sport;
    udp.dst = rewrite.new_dport;
    // The input checksum is never zero (parse6::check drops those).
    udp.check =
        apply_udp_nonzero(u16::from_ne_bytes(udp.check), rewrite.udp_csum_delta).to_ne_bytes();
    eth.dst_addr = route.dmac;
    eth.src_addr = route.smac;
}

/// Counts `len` bytes on the flow direction and caches a looked-up route,
/// as rewrite::account does.
#[inline(always)]
pub fn account(len: u16, entry: *mut Rewrite6, looked_up: Option<&Route>, now: u32) {
    // SAFETY: `entry` came from a hash map lookup and stays valid for this
    // run of the program (RCU), also after bpf_xdp_adjust_head, which only
    // invalidates packet pointers; no other reference to it is live.
    let entry = unsafe { &mut *entry };
    entry.packets = entry.packets.wrapping_add(1);
    entry.bytes = entry.bytes.wrapping_add(u64::from(len));
    if let Some(route) = looked_up {
        forward::cache_route(&mut entry.next_hop, &mut entry.last_seen, route, now);
    }
}
