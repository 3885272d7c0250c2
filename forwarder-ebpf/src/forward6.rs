//! Route lookup for IPv6 and translated output: `bpf_fib_lookup` in the
//! output's family (AF_INET6, or AF_INET when an IPv6 packet leaves as
//! IPv4). Like forward.rs it runs before the packet is touched.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NO_SRC_ADDR, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        BPF_FIB_LKUP_RET_UNSUPP_LWT,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use forwarder_common::{Reason, Rewrite6};

use crate::forward::{FIB_PARAMS_LEN, FibSlot, Found, zeroed_params};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_UDP: u8 = 17;

/// Looks up the route for the packet as it will leave: `out_len` is its
/// layer-3 length after the rewrite or translation (the kernel checks it
/// against the egress MTU), `tos` its TOS or traffic class.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    rewrite: &Rewrite6,
    out_len: u16,
    tos: u8,
    ingress_ifindex: u32,
) -> Result<Found, Reason> {
    let mut slot = FibSlot(MaybeUninit::uninit());
    let params = zeroed_params(&mut slot);
    params.l4_protocol = IPPROTO_UDP;
    // Ports and addresses are big-endian: the wire bytes, unswapped.
    params.sport = u16::from_ne_bytes(rewrite.new_sport);
    params.dport = u16::from_ne_bytes(rewrite.new_dport);
    // Host order, compared with the egress MTU by the kernel.
    params.__bindgen_anon_1.tot_len = out_len;
    params.ifindex = ingress_ifindex;
    if rewrite.out_v4() {
        let (s, d) = (rewrite.new_saddr, rewrite.new_daddr);
        params.family = AF_INET;
        params.__bindgen_anon_2.tos = tos;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]);
    } else {
        params.family = AF_INET6;
        // Flow label zero; the traffic class does not select IPv6 routes.
        params.__bindgen_anon_2.flowinfo = 0;
        params.__bindgen_anon_3.ipv6_src = words(&rewrite.new_saddr);
        params.__bindgen_anon_4.ipv6_dst = words(&rewrite.new_daddr);
    }

    // SAFETY: `params` is a live, correctly sized bpf_fib_lookup on our stack
    // and ctx is the program's own context.
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut *params, FIB_PARAMS_LEN as i32, 0) };
    // Negative values are errors in the arguments (-EINVAL, -EAFNOSUPPORT
    // when the kernel has no IPv6, -ENODEV for an unknown ifindex).
    let Ok(code) = u32::try_from(ret) else {
        return Err(Reason::PassFibFailed);
    };
    match code {
        // Route and neighbour found: params now holds egress ifindex and MACs.
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // No neighbour (ARP or NDP) entry for the next hop: the daemon's
        // socket send resolves it, so a later packet succeeds here.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Reason::PassFibNoNeigh),
        // Larger than the egress MTU: IPv6 routers never fragment and a
        // translated packet must not be cut here; the daemon's socket sends
        // it, and the local stack fragments what it originates.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Reason::PassTooBig),
        // Blackhole route: the stack drops it and counts it as the admin asked.
        BPF_FIB_LKUP_RET_BLACKHOLE
        // Unreachable route: the stack sends the ICMP(v6) error.
        | BPF_FIB_LKUP_RET_UNREACHABLE
        // Prohibit route: likewise, with its own code.
        | BPF_FIB_LKUP_RET_PROHIBIT
        // Not a forwardable unicast route (local, multicast, link-local
        // scope mismatch, no route).
        | BPF_FIB_LKUP_RET_NOT_FWDED
        // Forwarding disabled (net.ipv6.conf.*.forwarding=0 is the default):
        // the daemon's socket still relays, a local send, not forwarding.
        | BPF_FIB_LKUP_RET_FWD_DISABLED
        // Lightweight tunnel encapsulation on the route: only the stack builds it.
        | BPF_FIB_LKUP_RET_UNSUPP_LWT
        // Only with BPF_FIB_LOOKUP_SRC, which we do not set: listed for completeness.
        | BPF_FIB_LKUP_RET_NO_SRC_ADDR => return Err(Reason::PassFibFailed),
        // A code newer than this program: let the stack decide.
        _ => return Err(Reason::PassFibFailed),
    }
    Ok(Found {
        egress_ifindex: params.ifindex,
        // SAFETY: reading a plain u16 out of a union the helper just wrote.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// An address as the helper's four big-endian words.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
