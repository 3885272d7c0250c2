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
/// checksum deltas that move the old header to the new one, and the flow
/// direction's counters and cached route, which the XDP program keeps here
/// so a packet costs one map lookup (one element, one cache miss at most
/// when the table outgrows the cache) instead of three.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rewrite {
    /// `bpf_ktime_get_coarse_ns()` of the last forwarded packet, refreshed
    /// by the XDP program at most once a second so the cache line stays
    /// quiet. It is also the age of `next_hop`: the program refreshes the
    /// route exactly when it refreshes this (see [`NextHop`]).
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
    /// Written by the XDP program only; the daemon writes zeros.
    pub next_hop: NextHop,
    /// Written by the XDP program only; the daemon writes zeros.
    pub counter: FlowCounter,
}
const _: () = assert!(core::mem::size_of::<Rewrite>() == 72);
const _: () = assert!(core::mem::offset_of!(Rewrite, flags) == 34);
const _: () = assert!(core::mem::offset_of!(Rewrite, next_hop) == 36);
const _: () = assert!(core::mem::offset_of!(Rewrite, counter) == 56);

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
    pub fn new(from: Endpoints, to: Endpoints) -> Self {
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
            next_hop: NextHop::default(),
            counter: FlowCounter::default(),
        }
    }

    /// The entry as the daemon wrote it: what the XDP program keeps in it
    /// (last-seen time, route, counters) cleared.
    pub fn as_written(&self) -> Self {
        Self {
            last_seen_ns: 0,
            next_hop: NextHop::default(),
            counter: FlowCounter::default(),
            ..*self
        }
    }
}

/// One flow direction's packets and bytes since its entry was written.
///
/// Plain loads and stores, not atomics (an atomic add costs 7-10 ns a
/// packet): two CPUs forwarding the same direction at the same instant
/// may each add to the same old value, and one of the two packets goes
/// uncounted. A direction is one 4-tuple, which RSS (or RPS) steers to one
/// receive queue and so one CPU, and a mosh endpoint sends from one thread;
/// two CPUs meet on one direction only while the steering moves (ethtool
/// -X, an IRQ moved) or a veth sender migrates mid-send, and then lose a
/// packet or two of a count that is for display (`list`, metrics) and for
/// one decision: the shared port's sequence bound (the first verified
/// sequence number plus the packets forwarded since), which a lost count
/// only lowers, so it refuses less, never a fresh datagram. The per-CPU
/// array this replaces could not lose any, but cost a second lookup and
/// 48 B per direction and CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCounter>() == 16);

/// The flow direction's cached route, which spares the XDP program a
/// `bpf_fib_lookup` per packet. Filled after a successful lookup and used
/// while the entry's `last_seen_ns` is under [`NEXT_HOP_TTL_NS`] old, so
/// route and neighbour changes take effect within that time. The program
/// writes both together after a lookup, so `last_seen_ns` moves exactly as
/// it did when it had its own once-a-second refresh.
///
/// Shared by every CPU that forwards the direction (it was per CPU). A CPU
/// may read it while another rewrites it: the bytes written are, except
/// when the route just changed, the ones already there, so a torn read
/// returns the same route. When it did change, one packet racing the
/// refresh may leave with parts of the old and the new next hop, which the
/// old or new link drops like any misaddressed frame; it is one datagram
/// of a protocol (mosh) that resends, and the same one-CPU-per-direction
/// steering as for [`FlowCounter`] makes the race itself rare.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Egress interface; 0 (no interface has it) means no route cached.
    pub ifindex: u32,
    /// MTU of the egress route: larger packets take the full lookup (and pass).
    pub mtu: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);

/// How long a cached route may be used before it is looked up again. The
/// same second as the last-seen granularity, which lets one timestamp serve
/// both.
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
}
