//! The pipelines of IPv6 packets and of IPv4 packets that leave as IPv6:
//! the same steps as the IPv4 one in main.rs (parse, look up, check, route,
//! rewrite or translate, forward), each ending in a `Reason`.

use aya_ebpf::programs::XdpContext;
use forwarder_common::{Reason, flow::stamp};

use crate::{
    clock,
    flow::{self, Side},
    flow6, forward,
    forward::Sent,
    forward6,
    parse::{IPV4_LEN, Packet},
    parse6::{self, IPV6_LEN},
    rewrite6, seq, slowpath,
    translate::{self, Carried},
};

/// A frame that is not IPv4: IPv6 UDP to a relay port, or not ours.
#[inline(always)]
pub fn relay6(ctx: &XdpContext) -> Result<Sent, Reason> {
    let packet = parse6::parse(ctx)?;
    let dst_port = u16::from_be_bytes(packet.udp().dst);
    let side = flow::side_of(dst_port)?;
    parse6::check(&packet)?;
    let miss_session = match side {
        Side::Client => Some(dst_port),
        Side::Backend => None,
    };
    let entry = flow6::lookup6(&packet, side)
        .ok_or_else(|| slowpath::gate(Reason::PassNoFlow, miss_session))?;
    // SAFETY: a hash map value stays valid for the rest of this program run
    // (RCU); the daemon only ever replaces whole entries.
    let rewrite = unsafe { &*entry };
    let session_port = match side {
        Side::Client => dst_port,
        Side::Backend => u16::from_be_bytes(rewrite.new_sport),
    };
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
    let allowed = flow6::from_allowed6(&packet, rewrite);
    flow6::check_source(side, rewrite, allowed, ingress_ifindex)
        .map_err(|reason| slowpath::gate(reason, Some(session_port)))?;
    let hops = packet.ip().hop_limit;
    // The stack sends Time Exceeded, like any router.
    if hops <= 1 {
        return Err(Reason::PassTtlExpiring);
    }
    let out_v4 = rewrite.out_v4();
    // Translation drops extension headers, which RFC 7915 allows only for
    // some; none of mosh's carry any, so those few go to the daemon.
    if out_v4 && packet.ext_len != 0 {
        return Err(slowpath::gate(
            Reason::PassIpv6ExtHeaders,
            Some(session_port),
        ));
    }
    let payload_len = packet.payload_len();
    let in_len = payload_len.wrapping_add(IPV6_LEN as u16);
    let out_len = if out_v4 {
        payload_len.wrapping_add(IPV4_LEN as u16)
    } else {
        in_len
    };
    let tos = packet.traffic_class();
    let Routed {
        route,
        looked_up,
        now,
    } = routed(ctx, rewrite, out_len, tos, ingress_ifindex, session_port)?;
    // Before the rewrite or translation moves the headers.
    if let Side::Client = side {
        seq::record(ctx, rewrite.flags, packet.udp, session_port);
    }
    if out_v4 {
        let carried = Carried {
            tos,
            hops,
            udp_len: payload_len,
            udp_check: packet.udp().check,
        };
        translate::to_v4(ctx, rewrite, &route, &carried)?;
    } else {
        rewrite6::rewrite(&packet, rewrite, &route);
    }
    // `rewrite` is not used past here: the entry is written through `entry`.
    rewrite6::account(in_len, entry, looked_up.then_some(&route), now);
    Ok(forward::send(&route, ingress_ifindex))
}

/// An IPv4 packet that missed the IPv4 maps: a translated half, or the
/// daemon's (`miss_session` as for the IPv4 miss).
#[inline(always)]
pub fn relay4to6(
    ctx: &XdpContext,
    packet: &Packet,
    side: Side,
    miss_session: Option<u16>,
) -> Result<Sent, Reason> {
    let entry = flow6::lookup4to6(packet, side)
        .ok_or_else(|| slowpath::gate(Reason::PassNoFlow, miss_session))?;
    // SAFETY: as in relay6.
    let rewrite = unsafe { &*entry };
    let session_port = match side {
        Side::Client => u16::from_be_bytes(packet.udp().dst),
        Side::Backend => u16::from_be_bytes(rewrite.new_sport),
    };
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
    let allowed = flow6::from_allowed4(packet, rewrite);
    flow6::check_source(side, rewrite, allowed, ingress_ifindex)
        .map_err(|reason| slowpath::gate(reason, Some(session_port)))?;
    let ip = packet.ip();
    let hops = ip.ttl;
    if hops <= 1 {
        return Err(Reason::PassTtlExpiring);
    }
    let udp_check = packet.udp().check;
    // IPv6 has no "no checksum": the daemon relays it, its socket computes one.
    if udp_check == [0, 0] {
        return Err(slowpath::gate(
            Reason::PassTranslateNoChecksum,
            Some(session_port),
        ));
    }
    let in_len = packet.tot_len();
    // check_lengths held: the UDP length is the IPv4 payload.
    let udp_len = in_len.wrapping_sub(IPV4_LEN as u16);
    let out_len = udp_len.wrapping_add(IPV6_LEN as u16);
    let tos = ip.tos;
    let Routed {
        route,
        looked_up,
        now,
    } = routed(ctx, rewrite, out_len, tos, ingress_ifindex, session_port)?;
    // Before the translation moves the headers.
    if let Side::Client = side {
        seq::record(ctx, rewrite.flags, packet.udp, session_port);
    }
    let carried = Carried {
        tos,
        hops,
        udp_len,
        udp_check,
    };
    translate::to_v6(ctx, rewrite, &route, &carried)?;
    // `rewrite` is not used past here: the entry is written through `entry`.
    rewrite6::account(in_len, entry, looked_up.then_some(&route), now);
    Ok(forward::send(&route, ingress_ifindex))
}

/// Where a packet of either pipeline goes, whether that took a route lookup
/// (to be cached in the entry), and the time, which the accounting after
/// the rewrite needs too.
struct Routed {
    route: forward::Route,
    looked_up: bool,
    now: u32,
}

/// The flow direction's cached route, or a fresh lookup of the packet as it
/// will leave (`out_len` bytes, `tos`), cached by the accounting.
#[inline(always)]
fn routed(
    ctx: &XdpContext,
    rewrite: &forwarder_common::Rewrite6,
    out_len: u16,
    tos: u8,
    ingress_ifindex: u32,
    session_port: u16,
) -> Result<Routed, Reason> {
    let now = stamp(clock::now_ns());
    if let Some(route) = forward::cached_route(&rewrite.next_hop, rewrite.last_seen, now, out_len) {
        return Ok(Routed {
            route,
            looked_up: false,
            now,
        });
    }
    let route = forward6::route(ctx, rewrite, out_len, tos, ingress_ifindex)
        .and_then(|found| forward::check_egress(found, ingress_ifindex))
        .map_err(|reason| slowpath::gate(reason, Some(session_port)))?;
    Ok(Routed {
        route,
        looked_up: true,
        now,
    })
}
