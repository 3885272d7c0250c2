//! The benchmark's ceiling: for UDP to one port, apply one precomputed
//! rewrite, set fixed MACs and redirect to a fixed interface. No flow
//! lookup, no route lookup, no counters beyond one: what a relay on this path
//! costs at the very least; its twin ends with XDP_TX instead. Never loaded by the daemon. Beside it (drop.rs)
//! the floor for refusing a flood: a bare XDP_DROP.
#![no_std]
#![no_main]

mod drop;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};
use forwarder_bench_common::CeilingConfig;
use forwarder_common::csum::rewrite_ipv4_udp;

/// The one rewrite and its next hop, written by `forwarder-bench ceiling`.
#[map]
static CEILING: Array<CeilingConfig> = Array::with_max_entries(1, 0);

/// The egress interface in slot 0; `bpf_redirect_map` needs a devmap. An
/// array one, as the forwarder's `EGRESS` is: the same redirect cost.
#[map]
static CEILING_EGRESS: DevMap = DevMap::with_max_entries(4, 0);

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const UDP_LEN: usize = 8;

#[xdp]
pub fn forwarder_ceiling(ctx: XdpContext) -> u32 {
    match rewrite(&ctx) {
        Some(_) => match CEILING_EGRESS.redirect(0, u64::from(XDP_DROP)) {
            Ok(action) | Err(action) => action,
        },
        None => XDP_PASS,
    }
}

/// The ceiling's twin for packets that leave by the interface they came
/// in on: the same work, then XDP_TX instead of the devmap redirect, so the
/// forwarder's XDP_TX case has a like-for-like ceiling.
#[xdp]
pub fn forwarder_ceiling_tx(ctx: XdpContext) -> u32 {
    match rewrite(&ctx) {
        Some(_) => XDP_TX,
        None => XDP_PASS,
    }
}

/// Checks the frame is UDP to the configured port and applies the rewrite
/// and MACs; `None` leaves the frame alone.
#[inline(always)]
fn rewrite(ctx: &XdpContext) -> Option<&'static CeilingConfig> {
    let data = ctx.data();
    if data + ETH_LEN + IPV4_LEN + UDP_LEN > ctx.data_end() {
        return None;
    }
    let config = CEILING.get(0)?;
    // SAFETY: the bounds check above covers Ethernet, a 20-byte IPv4 header
    // and the UDP header, which do not overlap.
    let (eth, ip, udp) = unsafe {
        (
            &mut *(data as *mut [u8; ETH_LEN]),
            &mut *((data + ETH_LEN) as *mut [u8; IPV4_LEN]),
            &mut *((data + ETH_LEN + IPV4_LEN) as *mut [u8; UDP_LEN]),
        )
    };
    if eth[12] != 0x08 || eth[13] != 0x00 || ip[0] != 0x45 || ip[9] != 17 {
        return None;
    }
    if udp[2] != config.port[0] || udp[3] != config.port[1] {
        return None;
    }
    // Many load flows share this one rewrite: keep each packet's source port
    // (the precomputed checksum delta leaves it out).
    let sport = [udp[0], udp[1]];
    rewrite_ipv4_udp(ip, udp, &config.rewrite);
    udp[0] = sport[0];
    udp[1] = sport[1];
    eth[..6].copy_from_slice(&config.dmac);
    eth[6..12].copy_from_slice(&config.smac);
    Some(config)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: no reachable panic: the verifier would reject the call.
    unsafe { core::hint::unreachable_unchecked() }
}
