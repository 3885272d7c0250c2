//! Flow map keys and values. Addresses and ports are kept as the bytes found
//! on the wire (network order) so the XDP program compares and copies them
//! without byte swaps.

use bytemuck::{Pod, Zeroable};

use crate::csum;

/// Key of a flow's client half: a packet from `client` to the relay's
/// client-facing endpoint `(relay_addr, relay_port)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientKey {
    pub relay_addr: [u8; 4],
    pub client_addr: [u8; 4],
    pub relay_port: [u8; 2],
    pub client_port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ClientKey>() == 12);

/// Key of a flow's backend half: a packet to the relay's backend-facing
/// endpoint `(relay_addr, relay_port)`, which is unique to one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendKey {
    pub relay_addr: [u8; 4],
    pub relay_port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// What to do with a matching packet: the new addresses and ports, the
/// checksum deltas that move the old header to the new one, and where to count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rewrite {
    /// `bpf_ktime_get_ns()` of the last forwarded packet, refreshed by the
    /// XDP program at most once a second so the cache line stays quiet.
    pub last_seen_ns: u64,
    pub new_saddr: [u8; 4],
    pub new_daddr: [u8; 4],
    pub new_sport: [u8; 2],
    pub new_dport: [u8; 2],
    /// Backend half only: the one source allowed to use this entry (the
    /// backend). Anything else claiming to be the server is dropped.
    pub allowed_saddr: [u8; 4],
    pub allowed_sport: [u8; 2],
    /// One's-complement delta (native word order) for the IPv4 header
    /// checksum: both addresses and the TTL decrement.
    pub ip_csum_delta: u16,
    /// Backend half only: the interface the relay's route to the backend
    /// uses; 0 accepts any. A forged server packet arriving on the
    /// client-facing side is dropped.
    pub allowed_ifindex: u32,
    /// One's-complement delta (native word order) for the UDP checksum: the
    /// pseudo-header addresses and both ports.
    pub udp_csum_delta: u16,
    /// `REWRITE_*` bits. Zero in entries written by older daemons, which
    /// keeps their meaning (a source mismatch is dropped).
    pub flags: u8,
    pub _pad: u8,
    /// Slot in the per-CPU flow counter array for this direction.
    pub counter_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Rewrite>() == 40);
const _: () = assert!(core::mem::offset_of!(Rewrite, flags) == 34);

/// Backend half of a punched (NAT'd) session only: a datagram from another
/// source, arriving on the allowed interface, goes to the daemon (rate
/// limited, reason `PassNatRebindCandidate`) instead of being dropped. The
/// server's NAT may have given it a new external endpoint; the daemon moves
/// the session there only if the datagram verifies with the session key.
pub const REWRITE_UNKNOWN_SOURCE_TO_DAEMON: u8 = 1;
const _: () = assert!(core::mem::align_of::<Rewrite>() == 8);

/// Client half of a punched session only: the program records the nonce of
/// each client-to-server datagram it forwards in `CLIENT_SEQS` (see
/// [`crate::clientseq`]), so the daemon, which no longer sees them, still
/// refuses a move that does not bring a newer one.
pub const REWRITE_RECORD_CLIENT_SEQ: u8 = 4;
// `Rewrite6` shares these bits with its own `REWRITE6_OUT_V4`.
const _: () = assert!(
    REWRITE_RECORD_CLIENT_SEQ & (REWRITE_UNKNOWN_SOURCE_TO_DAEMON | crate::flow6::REWRITE6_OUT_V4)
        == 0
);

/// One side of a rewrite: the addresses and ports of a packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Endpoints {
    fn ip_words(&self) -> [[u8; 2]; 4] {
        [
            [self.saddr[0], self.saddr[1]],
            [self.saddr[2], self.saddr[3]],
            [self.daddr[0], self.daddr[1]],
            [self.daddr[2], self.daddr[3]],
        ]
    }
}

impl Rewrite {
    /// Builds the entry that turns packets addressed like `from` into packets
    /// addressed like `to`, with both checksum deltas precomputed so the XDP
    /// program only adds two words.
    pub fn new(from: Endpoints, to: Endpoints, counter_slot: u32) -> Self {
        let old_ip = from.ip_words();
        let new_ip = to.ip_words();
        // The TTL shares a word with the protocol; decrementing it by one is
        // the same one's-complement delta whatever the TTL and protocol are.
        let ttl_delta = csum::delta(&[[2, 0]], &[[1, 0]]);
        let ip_csum_delta = csum::add(csum::delta(&old_ip, &new_ip), ttl_delta);
        let udp_csum_delta = csum::add(
            csum::delta(&old_ip, &new_ip),
            csum::delta(&[from.sport, from.dport], &[to.sport, to.dport]),
        );
        Self {
            last_seen_ns: 0,
            new_saddr: to.saddr,
            new_daddr: to.daddr,
            new_sport: to.sport,
            new_dport: to.dport,
            allowed_saddr: [0; 4],
            allowed_sport: [0; 2],
            ip_csum_delta,
            allowed_ifindex: 0,
            udp_csum_delta,
            flags: 0,
            _pad: 0,
            counter_slot,
        }
    }
}

/// One flow direction's per-CPU state: its counters, and this CPU's cached
/// route for it. The cache spares the XDP program a `bpf_fib_lookup` per
/// packet; it is refreshed at most [`NEXT_HOP_TTL_NS`] after it was filled,
/// so route and neighbour changes take effect within that time. Per CPU, so
/// no CPU ever reads another's half-written MACs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowCounter {
    pub packets: u64,
    pub bytes: u64,
    /// When `bpf_fib_lookup` last filled the cache; 0 = empty.
    pub next_hop_checked_ns: u64,
    pub next_hop_ifindex: u32,
    /// MTU of the egress route: larger packets take the full lookup (and pass).
    pub next_hop_mtu: u16,
    pub next_hop_smac: [u8; 6],
    pub next_hop_dmac: [u8; 6],
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<FlowCounter>() == 48);

/// How long a cached route may be used before it is looked up again.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)] plain-old-data without implicit padding
    // (explicit `_pad` fields; sizes asserted above).
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Rewrite {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCounter {}
}
