//! Route lookup and transmission. The lookup runs before the packet is
//! touched, so every pass reason hands the daemon the original packet.

use core::mem::{self, MaybeUninit};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NO_SRC_ADDR, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        BPF_FIB_LKUP_RET_UNSUPP_LWT, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use forwarder_common::{
    Reason, Rewrite,
    flow::{IFACE_ANY, NEXT_HOP_TTL_STAMPS, NextHop},
};

use crate::{
    maps::{EGRESS, EGRESS_IFACES, EGRESS_SLOTS},
    parse::Packet,
};

const AF_INET: u8 = 2;
const IPPROTO_UDP: u8 = 17;

/// What a route lookup found for the rewritten packet.
pub struct Found {
    pub egress_ifindex: u32,
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Where the rewritten packet goes: a cached route or an admitted lookup.
pub struct Route {
    pub egress_ifindex: u32,
    /// `EGRESS` slot of the egress interface; `IFACE_ANY` for an interface
    /// without one (XDP_TX out of an ingress the daemon did not number).
    pub iface: u8,
    /// A lookup that may be cached: it agreed with its slot's MAC and MTU.
    pub cacheable: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// The flow direction's cached route (in its map entry), if it is fresh and
/// the packet fits its interface's MTU. A miss costs one `bpf_fib_lookup`,
/// as without a cache. `last_seen` is the entry's stamp: the time the
/// route was cached; `now` is a stamp too.
#[inline(always)]
pub fn cached_route(hop: &NextHop, last_seen: u32, now: u32, tot_len: u16) -> Option<Route> {
    // Another CPU may be rewriting `hop`: NextHop's doc says what that means.
    if hop.iface == IFACE_ANY || now.wrapping_sub(last_seen) >= NEXT_HOP_TTL_STAMPS {
        return None;
    }
    let iface = EGRESS_IFACES.get(u32::from(hop.iface))?;
    // An emptied slot (the daemon detached the interface) has ifindex 0.
    if iface.ifindex == 0 || tot_len > iface.mtu {
        return None;
    }
    Some(Route {
        egress_ifindex: iface.ifindex,
        iface: hop.iface,
        cacheable: false,
        smac: iface.mac,
        dmac: hop.dmac,
    })
}

/// Remembers a looked-up route in the flow direction's entry (or that none
/// is cached, for one that may not be) and stamps the entry: its last-seen
/// stamp is the route's age, refreshed at most once a second for a cached
/// route, so the entry's cache line is written no more often than when the
/// two were kept apart. An uncacheable route looks up every packet but
/// writes the line only when the stamp moves (every 16.8 ms at most).
#[inline(always)]
pub fn cache_route(hop: &mut NextHop, last_seen: &mut u32, route: &Route, now: u32) {
    let iface = if route.cacheable {
        route.iface
    } else {
        IFACE_ANY
    };
    if hop.iface != iface || hop.dmac != route.dmac {
        hop.dmac = route.dmac;
        hop.iface = iface;
    }
    // An aligned u32 stored whole: the daemon's expiry reads it before or
    // after, never torn.
    if *last_seen != now {
        *last_seen = now;
    }
}

/// An all-zero `bpf_fib_lookup` on the stack (no VLAN, main table, nothing
/// uninitialised handed to the helper), zeroed with eight word stores:
/// `mem::zeroed()` or byte-array literals become calls to a memset loop.
#[inline(always)]
pub fn zeroed_params(slot: &mut FibSlot) -> &mut FibParams {
    let words = (&raw mut *slot).cast::<u64>();
    for index in 0..FIB_PARAMS_LEN / mem::size_of::<u64>() {
        // SAFETY: the slot is 64 bytes (asserted below) and 8-aligned, and
        // volatile keeps LLVM from fusing the stores back into a memset.
        unsafe { words.add(index).write_volatile(0) };
    }
    // SAFETY: every byte was just written, and all-zero is a valid value.
    unsafe { slot.0.assume_init_mut() }
}

/// Stack room for the lookup parameters, aligned for whole-word zeroing.
#[repr(C, align(8))]
pub struct FibSlot(pub MaybeUninit<FibParams>);

/// Size of `bpf_fib_lookup`, as the helper's length argument wants it.
pub const FIB_PARAMS_LEN: usize = 64;
const _: () = assert!(mem::size_of::<FibParams>() == FIB_PARAMS_LEN);
const _: () = assert!(mem::size_of::<FibSlot>() == FIB_PARAMS_LEN);

/// Looks up the route for the packet as it will be after the rewrite.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    packet: &Packet,
    rewrite: &Rewrite,
    ingress_ifindex: u32,
) -> Result<Found, Reason> {
    let ip = packet.ip();
    let mut slot = FibSlot(MaybeUninit::uninit());
    let params = zeroed_params(&mut slot);
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    // Ports and addresses are __be16/__be32: the wire bytes, unswapped.
    params.sport = u16::from_ne_bytes(rewrite.new_sport);
    params.dport = u16::from_ne_bytes(rewrite.new_dport);
    // The kernel compares tot_len with the egress MTU in host order.
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    params.__bindgen_anon_2.tos = ip.tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(rewrite.new_saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(rewrite.new_daddr);
    params.ifindex = ingress_ifindex;

    // SAFETY: `params` is a live, correctly sized bpf_fib_lookup on our stack
    // and ctx is the program's own context.
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut *params, FIB_PARAMS_LEN as i32, 0) };
    // Negative values are errors in the arguments (-EINVAL, -EAFNOSUPPORT,
    // -ENODEV for an unknown ifindex): no route we can use.
    let Ok(code) = u32::try_from(ret) else {
        return Err(Reason::PassFibFailed);
    };
    match code {
        // Route and neighbour found: params now holds egress ifindex and MACs.
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // Route found but the next hop's MAC is unknown: the daemon's socket
        // send makes the kernel resolve it, so the next packet succeeds here.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Reason::PassFibNoNeigh),
        // Blackhole route: the stack drops it and counts it as the admin asked.
        BPF_FIB_LKUP_RET_BLACKHOLE
        // Unreachable route: the stack sends the ICMP error.
        | BPF_FIB_LKUP_RET_UNREACHABLE
        // Prohibit route: likewise, with its own ICMP code.
        | BPF_FIB_LKUP_RET_PROHIBIT
        // Not a forwardable unicast route (local, broadcast, multicast, no route).
        | BPF_FIB_LKUP_RET_NOT_FWDED
        // Forwarding disabled on the ingress interface: the daemon's socket
        // still relays, since that path is a local send, not forwarding.
        | BPF_FIB_LKUP_RET_FWD_DISABLED
        // Lightweight tunnel encapsulation on the route: only the stack can build it.
        | BPF_FIB_LKUP_RET_UNSUPP_LWT
        // Larger than the egress MTU: the stack fragments it (mosh clears DF).
        | BPF_FIB_LKUP_RET_FRAG_NEEDED
        // Only with BPF_FIB_LOOKUP_SRC, which we do not set: listed for completeness.
        | BPF_FIB_LKUP_RET_NO_SRC_ADDR => return Err(Reason::PassFibFailed),
        // A code newer than this program: be conservative and let the stack decide.
        _ => return Err(Reason::PassFibFailed),
    }
    Ok(Found {
        egress_ifindex: params.ifindex,
        // On success the kernel reports the egress MTU here (same union as tot_len).
        // SAFETY: reading a plain u16 out of a union the helper just wrote.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// A redirect only works to an interface the daemon registered in EGRESS
/// (it attached XDP there or checked the driver can transmit redirects);
/// the slot it gave the interface is what a cached route names, so the
/// lookup may be cached only where the slot holds the same MAC and MTU.
#[inline(always)]
pub fn check_egress(found: Found, ingress_ifindex: u32) -> Result<Route, Reason> {
    let (iface, cacheable) = match EGRESS_SLOTS.get_ptr(found.egress_ifindex) {
        Some(slot) => {
            // SAFETY: a hash map value stays valid for this program run (RCU).
            let slot = unsafe { *slot };
            let agrees = EGRESS_IFACES.get(u32::from(slot)).is_some_and(|iface| {
                iface.ifindex == found.egress_ifindex
                    && iface.mtu == found.mtu
                    && iface.mac == found.smac
            });
            (slot, agrees)
        }
        // Back out of the ingress needs no devmap (XDP_TX), only no cache.
        None if found.egress_ifindex == ingress_ifindex => (IFACE_ANY, false),
        None => return Err(Reason::PassEgressNotAttached),
    };
    Ok(Route {
        egress_ifindex: found.egress_ifindex,
        iface,
        cacheable,
        smac: found.smac,
        dmac: found.dmac,
    })
}

/// Whether a backend packet arrived on the interface its entry allows:
/// `IFACE_ANY` accepts any; a slot, only the interface in it; an empty slot
/// (`IFACE_NONE` is never filled) none.
#[inline(always)]
pub fn arrived_on(allowed_iface: u8, ingress_ifindex: u32) -> bool {
    allowed_iface == IFACE_ANY
        || EGRESS_IFACES
            .get(u32::from(allowed_iface))
            .is_some_and(|iface| iface.ifindex == ingress_ifindex)
}

/// How a forwarded packet leaves: its reason and the XDP action to return.
pub struct Sent {
    pub reason: Reason,
    pub action: u32,
}

/// Sends the rewritten packet: back out of the ingress interface, or
/// through the devmap to another one.
#[inline(always)]
pub fn send(route: &Route, ingress_ifindex: u32) -> Sent {
    if route.egress_ifindex == ingress_ifindex {
        return Sent {
            reason: Reason::TxForwarded,
            action: XDP_TX,
        };
    }
    // check_egress saw the entry; should the daemon remove it in between,
    // the low flag bits make the helper return XDP_PASS instead of
    // XDP_ABORTED: the rewritten packet is a valid one that the stack
    // routes the same way.
    let action = match EGRESS.redirect(u32::from(route.iface), u64::from(XDP_PASS)) {
        Ok(action) | Err(action) => action,
    };
    Sent {
        reason: Reason::RedirectForwarded,
        action,
    }
}
