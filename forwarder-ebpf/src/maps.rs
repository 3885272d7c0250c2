//! The maps shared with the daemon. Their names are part of the contract:
//! the daemon finds, fills and pins them by these names, which are spelled
//! out in `forwarder_common::config::map_names` (the daemon refuses an
//! object whose names differ). The sizes below are only what the object is
//! compiled with: the daemon sets the flow and session maps' sizes from its
//! flags when it loads the program (`RuntimeSizes`).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, PerCpuArray},
};
use forwarder_common::clientseq::CLIENT_SEQ_SLOTS;
use forwarder_common::{
    BackendKey, BackendKey6, BackendRewrite, ClientKey, ClientKey6, MAX_FLOWS, REASON_COUNT,
    Rewrite, Rewrite6, SlowpathBucket,
    config::MAX_INTERFACES,
    flow::{EgressIface, IFACE_SLOTS},
    flow6::PORTS_4TO6_WORDS,
    portslot::{BackendSlot, ClientSlot, SLOTS_PER_PORT},
    reason::ReasonCounter,
    slowpath::SESSION_BUCKET_SLOTS,
};

/// `BPF_F_NO_PREALLOC` (uapi bpf.h): elements allocated on insert, memory
/// charged for what is installed rather than for `max_entries`.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Client halves of flows; a plain hash so a live session is never evicted.
/// The value also holds the direction's counters and cached route.
#[map]
pub static CLIENT_FLOWS: HashMap<ClientKey, Rewrite> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Client halves alone on their session port, two slots per port (portslot.rs); asked before `CLIENT_FLOWS`.
#[map]
pub static CLIENT_PORT_SLOTS: Array<ClientSlot> = Array::with_max_entries(SLOTS_PER_PORT, 0);

/// Backend halves alone on their backend-facing port, two slots per port; asked before `BACKEND_FLOWS`.
#[map]
pub static BACKEND_PORT_SLOTS: Array<BackendSlot> = Array::with_max_entries(SLOTS_PER_PORT, 0);

/// One bit per session port whose slots have a client half in `CLIENT_FLOWS` besides; a slot miss elsewhere skips the hash map.
#[map]
pub static CLIENT_PORTS_HASHED: Array<u32> = Array::with_max_entries(PORTS_4TO6_WORDS, 0);

/// One bit per backend-facing port whose slots have a backend half in `BACKEND_FLOWS` besides.
#[map]
pub static BACKEND_PORTS_HASHED: Array<u32> = Array::with_max_entries(PORTS_4TO6_WORDS, 0);

/// Backend halves of flows, one per backend-facing port; plain hash for the
/// same reason. The value is the rewrite and who may use it.
#[map]
pub static BACKEND_FLOWS: HashMap<BackendKey, BackendRewrite> =
    HashMap::with_max_entries(MAX_FLOWS, 0);

/// Packets and bytes per `Reason`, per CPU: every packet is counted exactly once here.
#[map]
pub static REASON_COUNTERS: PerCpuArray<ReasonCounter> =
    PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Interfaces the daemon allows redirects to, by slot (slot → ifindex); `bpf_redirect_map` needs a devmap.
#[map]
pub static EGRESS: DevMap = DevMap::with_max_entries(IFACE_SLOTS, 0);

/// The same interfaces' ifindex, MAC and MTU by slot, which cached routes name instead of holding them.
#[map]
pub static EGRESS_IFACES: Array<EgressIface> = Array::with_max_entries(IFACE_SLOTS, 0);

/// Slot of each of those interfaces by ifindex, asked only after a route lookup.
#[map]
pub static EGRESS_SLOTS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// Slow-path rate limit per session, at its client-facing port (host order); written and cleared by the daemon with the session.
#[map]
pub static SLOWPATH_SESSION_BUCKETS: Array<SlowpathBucket> =
    Array::with_max_entries(SESSION_BUCKET_SLOTS, 0);

/// Relay-wide slow-path rate limit; one slot, all zero (unlimited) until the daemon configures it.
#[map]
pub static SLOWPATH_GLOBAL_BUCKET: Array<SlowpathBucket> = Array::with_max_entries(1, 0);

/// Client halves of flows whose client speaks IPv6 (output either family); allocated per entry, so an IPv4-only relay pays nothing for it.
#[map]
pub static CLIENT_FLOWS6: HashMap<ClientKey6, Rewrite6> =
    HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Backend halves of flows whose backend speaks IPv6 (output either family); allocated per entry.
#[map]
pub static BACKEND_FLOWS6: HashMap<BackendKey6, Rewrite6> =
    HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Client halves whose input is IPv4 and output IPv6; looked up only after an IPv4 miss; allocated per entry.
#[map]
pub static CLIENT_FLOWS_4TO6: HashMap<ClientKey, Rewrite6> =
    HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Backend halves whose input is IPv4 and output IPv6; looked up only after an IPv4 miss; allocated per entry.
#[map]
pub static BACKEND_FLOWS_4TO6: HashMap<BackendKey, Rewrite6> =
    HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// One bit per UDP port: set while some `_4TO6` half is keyed by it, so an IPv4 miss elsewhere skips those maps.
#[map]
pub static PORTS_4TO6: Array<u32> = Array::with_max_entries(PORTS_4TO6_WORDS, 0);

/// Newest client-to-server nonce XDP forwarded per punched session, by client-facing port (clientseq.rs).
#[map]
pub static CLIENT_SEQS: Array<u64> = Array::with_max_entries(CLIENT_SEQ_SLOTS, 0);

/// Whether `port`'s bit (host order) is set in a port bitmap (`PORTS_4TO6`,
/// `*_PORTS_HASHED`): an array load the verifier inlines.
#[inline(always)]
pub fn port_bit_set(bits: &Array<u32>, port: u16) -> bool {
    let (word, mask) = forwarder_common::flow6::port_bit(port);
    bits.get(word).is_some_and(|bits| bits & mask != 0)
}
