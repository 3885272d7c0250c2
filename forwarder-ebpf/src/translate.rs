//! IPv6 to IPv4 and back (RFC 7915's header mapping, for UDP only): the
//! head of the packet moves by the 20 bytes the two fixed headers differ
//! in, the IP header is written anew, and the UDP checksum moves from one
//! pseudo-header to the other with the entry's precomputed delta.
//!
//! `bpf_xdp_adjust_head` invalidates every packet pointer, so everything
//! read from the old headers is passed in by value, and the new headers are
//! found and bounds-checked again from the new start of the frame.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use forwarder_common::Reason;
use forwarder_common::Rewrite6;
use forwarder_common::flow6::{apply_udp_nonzero, ip4_header, ip4_header_checksum, ip6_header};

use crate::{forward::Route, parse::ptr_at};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
/// What the fixed IPv6 header is longer than the option-free IPv4 one.
const GROWTH: i32 = (IPV6_LEN - IPV4_LEN) as i32;

/// What the translation keeps of the old headers, read before the head moves.
pub struct Carried {
    /// TOS or traffic class (DSCP and ECN map one to one).
    pub tos: u8,
    /// TTL or hop limit of the arriving packet (above one: checked).
    pub hops: u8,
    /// UDP length: the IPv6 payload length, or the IPv4 total length minus 20.
    pub udp_len: u16,
    /// The arriving UDP checksum (never zero: checked by the caller).
    pub udp_check: [u8; 2],
}

/// An IPv6 packet without extension headers leaves as IPv4.
#[inline(always)]
pub fn to_v4(
    ctx: &XdpContext,
    rewrite: &Rewrite6,
    route: &Route,
    old: &Carried,
) -> Result<(), Reason> {
    // SAFETY: ctx is the program's own context; shrinking the head by 20
    // bytes of a frame that holds a 40-byte IPv6 header cannot underflow.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, GROWTH) } != 0 {
        return Err(Reason::PassNoHeadroom);
    }
    let frame: *mut [u8; ETH_LEN + IPV4_LEN + UDP_LEN] =
        // The frame was 20 bytes longer than this before the move; a failure
        // here would be a kernel bug, and the packet is already changed.
        ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
    // SAFETY: ptr_at checked the 42 bytes lie inside the (moved) frame.
    let frame = unsafe { &mut *frame };
    let (s, d) = (rewrite.new_saddr, rewrite.new_daddr);
    let (saddr, daddr) = ([s[0], s[1], s[2], s[3]], [d[0], d[1], d[2], d[3]]);
    let total_len = old.udp_len.wrapping_add(IPV4_LEN as u16);
    let ttl = old.hops.wrapping_sub(1);
    let mut ip = ip4_header(old.tos, total_len, ttl, saddr, daddr);
    let check = ip4_header_checksum(rewrite.ip4_csum_base, old.tos, total_len, ttl).to_ne_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    write_eth(frame, route, [0x08, 0x00]);
    frame[ETH_LEN..ETH_LEN + IPV4_LEN].copy_from_slice(&ip);
    write_udp(&mut frame[ETH_LEN + IPV4_LEN..], rewrite, old.udp_check);
    Ok(())
}

/// An IPv4 packet leaves as IPv6.
#[inline(always)]
pub fn to_v6(
    ctx: &XdpContext,
    rewrite: &Rewrite6,
    route: &Route,
    old: &Carried,
) -> Result<(), Reason> {
    // SAFETY: ctx is the program's own context; the kernel refuses (non-zero)
    // when the headroom is too small, and then nothing moved.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -GROWTH) } != 0 {
        return Err(Reason::PassNoHeadroom);
    }
    let frame: *mut [u8; ETH_LEN + IPV6_LEN + UDP_LEN] =
        // 20 bytes more than the 42 the IPv4 frame had at least: a kernel bug
        // otherwise, and the packet is already changed.
        ptr_at(ctx, 0).ok_or(Reason::DropMalformed)?;
    // SAFETY: ptr_at checked the 62 bytes lie inside the (moved) frame.
    let frame = unsafe { &mut *frame };
    let ip = ip6_header(
        old.tos,
        old.udp_len,
        old.hops.wrapping_sub(1),
        rewrite.new_saddr,
        rewrite.new_daddr,
    );
    write_eth(frame, route, [0x86, 0xdd]);
    frame[ETH_LEN..ETH_LEN + IPV6_LEN].copy_from_slice(&ip);
    write_udp(&mut frame[ETH_LEN + IPV6_LEN..], rewrite, old.udp_check);
    Ok(())
}

#[inline(always)]
fn write_eth(frame: &mut [u8], route: &Route, ether_type: [u8; 2]) {
    frame[0..6].copy_from_slice(&route.dmac);
    frame[6..12].copy_from_slice(&route.smac);
    frame[12..14].copy_from_slice(&ether_type);
}

/// Ports and checksum; the length stays (UDP's length is the same in both).
#[inline(always)]
fn write_udp(udp: &mut [u8], rewrite: &Rewrite6, old_check: [u8; 2]) {
    udp[0..2].copy_from_slice(&rewrite.new_sport);
    udp[2..4].copy_from_slice(&rewrite.new_dport);
    // Zero is "no checksum" in IPv4 and invalid in IPv6: a computed zero
    // goes out as 0xFFFF in both.
    let check =
        apply_udp_nonzero(u16::from_ne_bytes(old_check), rewrite.udp_csum_delta).to_ne_bytes();
    udp[6..8].copy_from_slice(&check);
}
