//! The packet rewrite and the per-flow bookkeeping that follows it.

use forwarder_common::{FlowCounter, Rewrite, csum::rewrite_ipv4_udp};

use crate::{
    forward::Route,
    parse::{IPV4_LEN, Packet, UDP_LEN},
};

/// How stale `last_seen_ns` may get: the daemon expires flows after tens of
/// seconds, and writing at most once a second keeps the entry's cache line
/// from bouncing between CPUs.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

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

/// Counts the packet on its flow and refreshes the flow's last-seen time.
#[inline(always)]
pub fn account(packet: &Packet, entry: *mut Rewrite, state: Option<*mut FlowCounter>, now: u64) {
    if let Some(state) = state {
        // SAFETY: a per-CPU array slot belongs to this CPU alone while we run.
        let state = unsafe { &mut *state };
        state.packets = state.packets.wrapping_add(1);
        state.bytes = state.bytes.wrapping_add(u64::from(packet.tot_len()));
    }
    // SAFETY: `entry` came from a hash map lookup and stays valid for this
    // run of the program (RCU); fields are plain integers.
    let last_seen = unsafe { (*entry).last_seen_ns };
    if now.wrapping_sub(last_seen) >= LAST_SEEN_GRANULARITY_NS {
        // SAFETY: as above; an aligned u64 store, which a concurrent reader
        // (the daemon's expiry) sees either before or after, never torn.
        unsafe { (*entry).last_seen_ns = now };
    }
}
