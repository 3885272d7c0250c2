//! The packet rewrite and the per-flow counting that follows it.

use forwarder_common::{Rewrite, csum::rewrite_ipv4_udp};

use crate::{
    forward::{self, Route},
    parse::{IPV4_LEN, Packet, UDP_LEN},
};

/// Rewrites addresses, ports, TTL and both checksums, and the MACs for the next hop.
#[inline(always)]
pub fn rewrite(packet: &Packet, rewrite: &Rewrite, route: &Route) {
    // SAFETY: parse() bounds-checked the 14-byte Ethernet, 20-byte IPv4 and
    // 8-byte UDP headers, which do not overlap; no reference to them is live.
    let (eth, ip, udp) = unsafe {
        (
            &mut *packet.eth,
            &mut *packet.ip.cast::<[u8; IPV4_LEN]>(),
            &mut *packet.udp.cast::<[u8; UDP_LEN]>(),
        )
    };
    rewrite_ipv4_udp(ip, udp, rewrite);
    eth.dst_addr = route.dmac;
    eth.src_addr = route.smac;
}

/// Counts the packet on its flow direction (plain adds: see FlowCounter's
/// doc for what two CPUs at once may lose) and, after a route lookup,
/// caches the route (`looked_up`) and stamps the entry's last-seen time.
#[inline(always)]
pub fn account(packet: &Packet, entry: *mut Rewrite, looked_up: Option<&Route>, now: u32) {
    // SAFETY: `entry` came from a hash map lookup and stays valid for this
    // run of the program (RCU); no other reference to it is live, and its
    // fields are plain integers.
    let entry = unsafe { &mut *entry };
    entry.packets = entry.packets.wrapping_add(1);
    entry.bytes = entry.bytes.wrapping_add(u64::from(packet.tot_len()));
    if let Some(route) = looked_up {
        forward::cache_route(&mut entry.next_hop, &mut entry.last_seen, route, now);
    }
}
