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
/// when the table outgrows the cache) instead of three. A client half's
/// whole value; a backend half's starts with one ([`BackendRewrite`]).
///
/// 40 bytes, so that with the key and the kernel's 48-byte element header
/// a client half is 104 B, and a backend half (8 B more, who may use it)
/// 104 B too: a million flows take about 248 MB. That is why the time is
/// a 32-bit stamp, the packet count 32 bits, and the route cache names its
/// interface by a one-byte slot of `EGRESS_IFACES` instead of holding its
/// ifindex, MAC and MTU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rewrite {
    /// [`stamp`] of the last forwarded packet, refreshed by the XDP program
    /// at most once a second so the cache line stays quiet. It is also the
    /// age of `next_hop`: the program refreshes the route exactly when it
    /// refreshes this (see [`NextHop`]). 0: nothing forwarded yet.
    pub last_seen: u32,
    /// Packets forwarded through this direction since the entry was
    /// written, as [`FlowCounter`] says; written by the XDP program only.
    pub packets: u32,
    /// Their bytes (IP length); written by the XDP program only.
    pub bytes: u64,
    pub new_saddr: [u8; 4],
    pub new_daddr: [u8; 4],
    pub new_sport: [u8; 2],
    pub new_dport: [u8; 2],
    /// One's-complement delta (native word order) for the IPv4 header
    /// checksum: both addresses and the TTL decrement.
    pub ip_csum_delta: u16,
    /// One's-complement delta (native word order) for the UDP checksum: the
    /// pseudo-header addresses and both ports.
    pub udp_csum_delta: u16,
    /// Written by the XDP program only; the daemon writes zeros.
    pub next_hop: NextHop,
    /// `REWRITE_*` bits. Zero in entries written by older daemons, which
    /// keeps their meaning (a source mismatch is dropped).
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Rewrite>() == 40);
const _: () = assert!(core::mem::offset_of!(Rewrite, bytes) == 8);
const _: () = assert!(core::mem::offset_of!(Rewrite, next_hop) == 32);
const _: () = assert!(core::mem::offset_of!(Rewrite, flags) == 39);
const _: () = assert!(core::mem::align_of::<Rewrite>() == 8);

/// A backend half's value: the rewrite, then the one source and interface
/// allowed to use it (the backend, where the route to it points); anything
/// else claiming to be the server is dropped. A client half needs neither,
/// which is why it is a plain [`Rewrite`], 8 bytes less per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendRewrite {
    pub rewrite: Rewrite,
    pub allowed: AllowedSource,
}
const _: () = assert!(core::mem::size_of::<BackendRewrite>() == 48);
const _: () = assert!(core::mem::offset_of!(BackendRewrite, rewrite) == 0);

/// Who may use a backend half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AllowedSource {
    pub saddr: [u8; 4],
    pub sport: [u8; 2],
    /// The `EGRESS_IFACES` slot of the interface the relay's route to the
    /// backend uses, [`IFACE_ANY`] to accept any, or [`IFACE_NONE`] when
    /// that interface is not one the program is attached to (so no backend
    /// packet it sees can be genuine). A forged server packet arriving on
    /// the client-facing side is dropped.
    pub iface: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<AllowedSource>() == 8);

/// Backend half of a punched (NAT'd) session only: a datagram from another
/// source, arriving on the allowed interface, goes to the daemon (rate
/// limited, reason `PassNatRebindCandidate`) instead of being dropped. The
/// server's NAT may have given it a new external endpoint; the daemon moves
/// the session there only if the datagram verifies with the session key.
pub const REWRITE_UNKNOWN_SOURCE_TO_DAEMON: u8 = 1;

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
            last_seen: 0,
            packets: 0,
            bytes: 0,
            new_saddr: to.saddr,
            new_daddr: to.daddr,
            new_sport: to.sport,
            new_dport: to.dport,
            ip_csum_delta,
            udp_csum_delta,
            next_hop: NextHop::default(),
            flags: 0,
        }
    }

    /// The entry as the daemon wrote it: what the XDP program keeps in it
    /// (last-seen time, route, counters) cleared.
    pub fn as_written(&self) -> Self {
        Self {
            last_seen: 0,
            packets: 0,
            bytes: 0,
            next_hop: NextHop::default(),
            ..*self
        }
    }

    /// What the XDP program counted on this direction.
    pub const fn counter(&self) -> FlowCounter {
        FlowCounter {
            packets: self.packets as u64,
            bytes: self.bytes,
        }
    }
}

impl BackendRewrite {
    /// `rewrite`, for packets from `saddr:sport` only, arriving on the
    /// interface in `EGRESS_IFACES` slot `iface` ([`IFACE_ANY`]: any).
    pub const fn new(rewrite: Rewrite, saddr: [u8; 4], sport: [u8; 2], iface: u8) -> Self {
        Self {
            rewrite,
            allowed: AllowedSource {
                saddr,
                sport,
                iface,
                _pad: 0,
            },
        }
    }

    /// [`Rewrite::as_written`], the allowed source kept.
    pub fn as_written(&self) -> Self {
        Self {
            rewrite: self.rewrite.as_written(),
            ..*self
        }
    }
}

/// One flow direction's packets and bytes since its entry was written, as
/// the daemon reports them; the entry itself holds them as `packets` and
/// `bytes` next to its 32-bit time stamp.
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
///
/// In the entry the packet count is 32 bits, to keep it at 48 bytes: it
/// wraps after 4,294,967,296 packets of one direction (a mosh session at
/// 50 packets a second takes 2.7 years; a flow at a million a second, 72
/// minutes), and a wrapped count only lowers the shared port's bound as a
/// lost one does. The bytes, which would wrap within seconds at 10 Gb/s,
/// stay 64 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCounter>() == 16);

/// The flow direction's cached route, which spares the XDP program a
/// `bpf_fib_lookup` per packet. Filled after a successful lookup and used
/// while the entry's `last_seen` is under [`NEXT_HOP_TTL_STAMPS`] old, so
/// route and neighbour changes take effect within about a second. The
/// program writes both together after a lookup, so `last_seen` moves
/// exactly as it did when it had its own once-a-second refresh.
///
/// The egress interface, its MAC and MTU are the same for every flow that
/// leaves through it, so they live once in `EGRESS_IFACES` (written by the
/// daemon) and the entry names them by slot; only the next hop's MAC is the
/// flow's own. The program caches a route only when the lookup agreed with
/// the slot's MAC and MTU, so a slot the daemon has not refreshed yet after
/// an MTU or MAC change costs the lookup again, never a wrong frame.
///
/// Shared by every CPU that forwards the direction. A CPU may read it while
/// another rewrites it: the bytes written are, except when the route just
/// changed, the ones already there, so a torn read returns the same route.
/// When it did change, one packet racing the refresh may leave with parts
/// of the old and the new next hop, which the old or new link drops like
/// any misaddressed frame; it is one datagram of a protocol (mosh) that
/// resends, and the same one-CPU-per-direction steering as for
/// [`FlowCounter`] makes the race itself rare.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    pub dmac: [u8; 6],
    /// `EGRESS_IFACES` slot of the egress interface; [`IFACE_ANY`] (no
    /// interface has it) means no route cached.
    pub iface: u8,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 7);

/// The time stamp the XDP program keeps per entry: CLOCK_MONOTONIC
/// nanoseconds shifted right by [`STAMP_SHIFT`] (16.8 ms units), cut to
/// 32 bits. It wraps every 2.28 years; ages are taken modulo that, which
/// is exact for any age under half of it.
pub const STAMP_SHIFT: u32 = 24;

/// The stamp of `ns` (CLOCK_MONOTONIC nanoseconds).
#[inline(always)]
pub const fn stamp(ns: u64) -> u32 {
    (ns >> STAMP_SHIFT) as u32
}

/// The CLOCK_MONOTONIC nanoseconds a `last_seen` stamp stands for, read at
/// `now_ns`, to 16.8 ms (the start of its unit); 0 stays 0 (never). A stamp from after `now_ns`
/// (the program stamped it after the reader took its time) reads as
/// `now_ns`.
pub const fn stamp_ns(stamp_value: u32, now_ns: u64) -> u64 {
    if stamp_value == 0 {
        return 0;
    }
    let age = stamp(now_ns).wrapping_sub(stamp_value);
    if age > u32::MAX / 2 {
        return now_ns;
    }
    // The start of the stamp's unit: never after the time it stands for.
    ((now_ns >> STAMP_SHIFT).saturating_sub(age as u64)) << STAMP_SHIFT
}

/// How long a cached route may be used before it is looked up again, in
/// stamp units: 60 is 1.007 s, the same second as the last-seen
/// granularity, which lets one stamp serve both.
pub const NEXT_HOP_TTL_STAMPS: u32 = 60;

/// `allowed_iface` that accepts a backend packet on any interface, and the
/// `NextHop::iface` of no cached route: slot 0 is never an interface's.
pub const IFACE_ANY: u8 = 0;

/// `allowed_iface` of a backend whose route leaves through an interface the
/// program is not attached to: slot 255 is never an interface's either, so
/// no packet the program sees matches it.
pub const IFACE_NONE: u8 = 255;

/// Slots of `EGRESS_IFACES` (and of the `EGRESS` devmap, indexed alike):
/// every `u8`, so a slot read from an entry needs no bounds check. Slots 1
/// to 254 hold interfaces; twice [`crate::config::MAX_INTERFACES`] and more,
/// so a restart can give a new interface a slot nobody's cached route
/// still names (see the daemon's slot assignment).
pub const IFACE_SLOTS: u32 = 256;

/// One interface the program is attached to, as every route through it
/// needs it: its ifindex, MAC and MTU. Written by the daemon; an all-zero
/// slot is empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EgressIface {
    pub ifindex: u32,
    pub mtu: u16,
    pub mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<EgressIface>() == 12);

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
    unsafe impl aya::Pod for super::BackendRewrite {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCounter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressIface {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_stamp_reads_back_to_within_its_unit_and_never_ahead() {
        let unit = 1 << STAMP_SHIFT;
        for seen in [unit, 5 * S, 3_600 * S, 40 * 86_400 * S] {
            let now = seen + 90 * S;
            let back = stamp_ns(stamp(seen), now);
            assert!(back <= seen && seen - back < unit, "{seen}: {back}");
        }
        assert_eq!(stamp_ns(0, 7 * S), 0, "never forwarded");
        // Stamped after the reader took its time: now, not 2.28 years ago.
        assert_eq!(stamp_ns(stamp(10 * S), 9 * S), 9 * S);
    }

    #[test]
    fn ages_survive_the_stamp_wrapping() {
        let wrap = (u32::MAX as u64 + 1) << STAMP_SHIFT;
        let seen = wrap - 30 * S;
        let now = wrap + 30 * S;
        let back = stamp_ns(stamp(seen), now);
        assert!(now - back >= 60 * S && now - back < 60 * S + (1 << STAMP_SHIFT));
        // The route cache's age, as the program takes it.
        assert!(stamp(now).wrapping_sub(stamp(seen)) >= NEXT_HOP_TTL_STAMPS);
        assert!(stamp(seen + S / 2).wrapping_sub(stamp(seen)) < NEXT_HOP_TTL_STAMPS);
    }
}
