//! The forwarder XDP program: relays mosh UDP between clients and backends
//! for flows the daemon installed, and hands everything else to the stack.
//!
//! Pipeline: parse → look up → check → route → rewrite → forward. Each step
//! either moves on or ends the packet with a `Reason`; the entry point
//! counts that reason once and turns it into the XDP action.
#![no_std]
#![no_main]
// The atomic add of the slow-path buckets: core exposes no atomic
// read-modify-write for the BPF target otherwise.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics is the only way to an atomic add on bpfel"
)]

mod clock;
mod config;
mod flow;
mod flow6;
mod forward;
mod forward6;
mod maps;
mod parse;
mod parse6;
mod relay6;
mod rewrite;
mod rewrite6;
mod seq;
mod slowpath;
mod translate;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use forwarder_common::{Reason, Verdict, flow::stamp};

use crate::{forward::Sent, maps::REASON_COUNTERS};

#[xdp]
pub fn forwarder(ctx: XdpContext) -> u32 {
    let sent = match relay(&ctx) {
        Ok(sent) => sent,
        Err(reason) => Sent {
            reason,
            action: XDP_PASS,
        },
    };
    count_reason(&ctx, sent.reason);
    match sent.reason.verdict() {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
        Verdict::Tx => XDP_TX,
        Verdict::Redirect => sent.action,
    }
}

/// The whole pipeline; `Err` carries the reason a packet stops early.
#[inline(always)]
fn relay(ctx: &XdpContext) -> Result<Sent, Reason> {
    let packet = match parse::parse(ctx) {
        Ok(packet) => packet,
        // Not IPv4: IPv6 takes its own pipeline (relay6.rs).
        Err(Reason::PassNotIpv4) => return relay6::relay6(ctx),
        Err(reason) => return Err(reason),
    };
    let side = flow::relay_side(&packet)?;
    parse::check_lengths(&packet)?;
    let dst_port = u16::from_be_bytes(packet.udp().dst);
    // A miss on a session port belongs to that session; on a flow port it
    // belongs to no session the program can name.
    let miss_session = match side {
        flow::Side::Client => Some(dst_port),
        flow::Side::Backend => None,
    };
    // A miss may be a translated half (IPv4 in, IPv6 out), which only a
    // port in the PORTS_4TO6 bitmap can have: IPv4 flows never ask, and a
    // miss elsewhere pays one array load.
    let matched = match flow::lookup(&packet, side) {
        Ok(matched) => matched,
        Err(_) if flow6::may_translate(dst_port) => {
            return relay6::relay4to6(ctx, &packet, side, miss_session);
        }
        Err(reason) => return Err(slowpath::gate(reason, miss_session)),
    };
    let entry = matched.entry;
    // SAFETY: a map value (an array slot; a hash map's under RCU) stays
    // valid for the rest of this program run; the daemon only ever
    // replaces whole entries (a slot by another slot, portslot.rs).
    let rewrite = unsafe { &*entry };
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
    // A rebind candidate spends the session's slow-path tokens like a miss:
    // a flood of them at Q cannot starve the daemon or other sessions. The
    // backend half rewrites its source to the session port.
    flow::check_source(&packet, &matched, rewrite, ingress_ifindex)
        .map_err(|reason| slowpath::gate(reason, Some(u16::from_be_bytes(rewrite.new_sport))))?;
    // The stack decrements and sends Time Exceeded, like any router.
    if packet.ip().ttl <= 1 {
        return Err(Reason::PassTtlExpiring);
    }
    // Timestamps only need second granularity (last-seen, route cache age):
    // a tick-granular clock with CLOCK_MONOTONIC's base, which the daemon
    // compares against.
    let now = stamp(clock::now_ns());
    let (route, looked_up) =
        match forward::cached_route(&rewrite.next_hop, rewrite.last_seen, now, packet.tot_len()) {
            Some(route) => (route, false),
            None => {
                let route = forward::route(ctx, &packet, rewrite, ingress_ifindex)
                    .and_then(|found| forward::check_egress(found, ingress_ifindex))
                    .map_err(|reason| {
                        // Both halves of a flow are the session's: a backend half
                        // rewrites its source to the session port.
                        let session_port = match side {
                            flow::Side::Client => dst_port,
                            flow::Side::Backend => u16::from_be_bytes(rewrite.new_sport),
                        };
                        slowpath::gate(reason, Some(session_port))
                    })?;
                (route, true)
            }
        };
    // Punched sessions' client halves only: the daemon still judges moves.
    if let flow::Side::Client = side {
        seq::record(ctx, rewrite.flags, packet.udp, dst_port);
    }
    rewrite::rewrite(&packet, rewrite, &route);
    // `rewrite` is not used past here: the entry is written through `entry`.
    rewrite::account(&packet, entry, looked_up.then_some(&route), now);
    Ok(forward::send(&route, ingress_ifindex))
}

/// Counts every packet once, under the reason it ended with.
#[inline(always)]
fn count_reason(ctx: &XdpContext, reason: Reason) {
    if let Some(counter) = REASON_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot belongs to this CPU alone while we run.
        let counter = unsafe { &mut *counter };
        counter.packets = counter.packets.wrapping_add(1);
        counter.bytes = counter.bytes.wrapping_add(frame_len(ctx));
    }
}

/// Length of the frame. The verifier only accepts `data_end - data` as a
/// subtraction of the two packet pointers; left alone, LLVM reassociates
/// `bytes + (data_end - data)` into `(bytes + data_end) - data`, arithmetic
/// on pkt_end that the verifier rejects. A volatile round trip through the
/// stack pins the subtraction.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    let mut len = ctx.data_end().wrapping_sub(ctx.data()) as u64;
    // SAFETY: `len` is a live local; volatile only forbids folding the access.
    unsafe {
        core::ptr::write_volatile(&raw mut len, len);
        core::ptr::read_volatile(&raw const len)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the program contains no reachable panic: the verifier would
    // reject a call into this handler, so it is never linked into a path.
    unsafe { core::hint::unreachable_unchecked() }
}
