//! IPv6 and translated flows: their own maps, so the IPv4 keys and values
//! stay as small as they are. Addresses and ports are wire bytes, as in
//! [`crate::flow`].
//!
//! Which map holds a half depends on the family of the packets it matches
//! (its input) and of the packets it makes (its output):
//!
//! | input | output | map (client half / backend half) | value |
//! |---|---|---|---|
//! | v4 | v4 | `CLIENT_FLOWS` / `BACKEND_FLOWS` | [`crate::Rewrite`] |
//! | v6 | v6 or v4 | `CLIENT_FLOWS6` / `BACKEND_FLOWS6` | [`Rewrite6`] |
//! | v4 | v6 | `CLIENT_FLOWS_4TO6` / `BACKEND_FLOWS_4TO6` | [`Rewrite6`] |
//!
//! The XDP program looks in the `_4TO6` maps only after an IPv4 packet
//! missed the IPv4 map, and only when the `PORTS_4TO6` bitmap has the
//! packet's destination port (a relay port some translated half is keyed
//! by): IPv4 flows and a flood at ports without translated flows pay one
//! array load, not a hash lookup.

use bytemuck::{Pod, Zeroable};

use crate::csum;
use crate::flow::{FlowCounter, IFACE_ANY, NextHop};

/// Key of an IPv6 flow's client half: a packet from `client` to the relay's
/// client-facing endpoint `(relay_addr, relay_port)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientKey6 {
    pub relay_addr: [u8; 16],
    pub client_addr: [u8; 16],
    pub relay_port: [u8; 2],
    pub client_port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ClientKey6>() == 36);

/// Key of an IPv6 flow's backend half: a packet to the relay's
/// backend-facing endpoint, unique to one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendKey6 {
    pub relay_addr: [u8; 16],
    pub relay_port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BackendKey6>() == 20);

/// Words of the `PORTS_4TO6` bitmap: one bit per UDP port.
pub const PORTS_4TO6_WORDS: u32 = 65_536 / 32;

/// Where `port` (host order) is in the bitmap: (word index, bit mask).
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u32) {
    ((port >> 5) as u32, 1 << (port & 31))
}

/// The output is IPv4: the XDP program shrinks the IPv6 header into an IPv4
/// one; the addresses are in the first 4 bytes of `new_saddr`/`new_daddr`.
pub const REWRITE6_OUT_V4: u8 = 2;

/// What to do with a packet that matched an IPv6 or translated half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rewrite6 {
    /// As in [`crate::Rewrite`]: a stamp refreshed by the XDP program at
    /// most once a second, 0 until then.
    pub last_seen: u32,
    /// As in [`crate::Rewrite`]: written by the XDP program only.
    pub packets: u32,
    pub bytes: u64,
    /// The output addresses (IPv4 ones in the first 4 bytes, rest zero).
    pub new_saddr: [u8; 16],
    pub new_daddr: [u8; 16],
    /// Backend half only: the one source allowed (the backend), in the
    /// input's family (an IPv4 one in the first 4 bytes).
    pub allowed_saddr: [u8; 16],
    pub new_sport: [u8; 2],
    pub new_dport: [u8; 2],
    pub allowed_sport: [u8; 2],
    /// One's-complement delta (native word order) for the UDP checksum:
    /// the pseudo-header addresses and both ports. The length and protocol
    /// terms of the two pseudo-headers are equal, so a translation moves the
    /// checksum from one pseudo-header to the other with this delta alone.
    pub udp_csum_delta: u16,
    /// IPv4 output only: the one's-complement sum of the new IPv4 header's
    /// constant words (version, DF, protocol, both addresses); the program
    /// adds TOS, length and TTL.
    pub ip4_csum_base: u16,
    /// `REWRITE_*` bits of [`crate::flow`] and [`REWRITE6_OUT_V4`].
    pub flags: u8,
    /// As in [`crate::Rewrite`]: backend half only, the slot of the
    /// interface of the route to the backend.
    pub allowed_iface: u8,
    /// As in [`crate::Rewrite`]: written by the XDP program only, aged by
    /// `last_seen`.
    pub next_hop: NextHop,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<Rewrite6>() == 88);
const _: () = assert!(core::mem::offset_of!(Rewrite6, bytes) == 8);
const _: () = assert!(core::mem::offset_of!(Rewrite6, next_hop) == 76);
const _: () = assert!(core::mem::align_of::<Rewrite6>() == 8);

/// An address of either family as wire bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireAddr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl WireAddr {
    pub const fn is_v4(&self) -> bool {
        matches!(self, WireAddr::V4(_))
    }

    /// The 16-byte map form: IPv4 in the first 4 bytes.
    pub fn padded(&self) -> [u8; 16] {
        let mut out = [0; 16];
        match self {
            WireAddr::V4(a) => out[..4].copy_from_slice(a),
            WireAddr::V6(a) => out = *a,
        }
        out
    }

    fn bytes(&self) -> &[u8] {
        match self {
            WireAddr::V4(a) => a,
            WireAddr::V6(a) => a,
        }
    }
}

/// One side of a rewrite in either family; `saddr` and `daddr` share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints46 {
    pub saddr: WireAddr,
    pub daddr: WireAddr,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Endpoints46 {
    /// The pseudo-header address and port words' one's-complement sum.
    fn sum(&self) -> u16 {
        let s = csum::sum(0, self.saddr.bytes());
        let s = csum::sum(s, self.daddr.bytes());
        let s = csum::sum(s, &self.sport);
        csum::sum(s, &self.dport)
    }
}

/// The delta that moves a UDP checksum from `from`'s pseudo-header and
/// ports to `to`'s, whatever their families (RFC 1624 over unequal word
/// lists: `~sum(old) + sum(new)`).
pub fn udp_delta(from: &Endpoints46, to: &Endpoints46) -> u16 {
    csum::add(!from.sum(), to.sum())
}

/// The constant part of a translated IPv4 header: version/IHL, DF, protocol
/// UDP and both addresses, with TOS, length, TTL and checksum zero.
pub fn ip4_header_base(saddr: [u8; 4], daddr: [u8; 4]) -> u16 {
    csum::sum(0, &ip4_header(0, 0, 0, saddr, daddr))
}

/// The IPv4 header a translation writes (checksum zero): DF set, ID zero
/// (RFC 6864 allows it for atomic datagrams), no options.
pub fn ip4_header(tos: u8, total_len: u16, ttl: u8, saddr: [u8; 4], daddr: [u8; 4]) -> [u8; 20] {
    let len = total_len.to_be_bytes();
    [
        0x45, tos, len[0], len[1], 0, 0, 0x40, 0, ttl, 17, 0, 0, saddr[0], saddr[1], saddr[2],
        saddr[3], daddr[0], daddr[1], daddr[2], daddr[3],
    ]
}

/// The checksum of a translated IPv4 header from its entry's base and the
/// three per-packet fields: what the XDP program computes.
#[inline(always)]
pub const fn ip4_header_checksum(base: u16, tos: u8, total_len: u16, ttl: u8) -> u16 {
    let len = total_len.to_be_bytes();
    let s = csum::add(base, u16::from_ne_bytes([0, tos]));
    let s = csum::add(s, u16::from_ne_bytes(len));
    !csum::add(s, u16::from_ne_bytes([ttl, 0]))
}

/// The IPv6 header a translation writes: traffic class from the IPv4 TOS,
/// flow label zero, next header UDP.
pub fn ip6_header(
    traffic_class: u8,
    payload_len: u16,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60 | (traffic_class >> 4);
    h[1] = traffic_class << 4;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = 17;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&saddr);
    h[24..40].copy_from_slice(&daddr);
    h
}

/// A UDP checksum after an incremental update where zero is not allowed on
/// the output (IPv6, and a computed zero over IPv4): sent as 0xFFFF.
#[inline(always)]
pub const fn apply_udp_nonzero(checksum: u16, delta: u16) -> u16 {
    match csum::apply(checksum, delta) {
        0 => 0xffff,
        updated => updated,
    }
}

impl Rewrite6 {
    /// The entry that turns packets addressed like `from` into packets
    /// addressed like `to` (either may be either family).
    pub fn new(from: Endpoints46, to: Endpoints46) -> Self {
        let (ip4_csum_base, flags) = match (to.saddr, to.daddr) {
            (WireAddr::V4(s), WireAddr::V4(d)) => (ip4_header_base(s, d), REWRITE6_OUT_V4),
            _ => (0, 0),
        };
        Self {
            last_seen: 0,
            packets: 0,
            bytes: 0,
            new_saddr: to.saddr.padded(),
            new_daddr: to.daddr.padded(),
            allowed_saddr: [0; 16],
            new_sport: to.sport,
            new_dport: to.dport,
            allowed_sport: [0; 2],
            udp_csum_delta: udp_delta(&from, &to),
            ip4_csum_base,
            flags,
            allowed_iface: IFACE_ANY,
            next_hop: NextHop::default(),
            _pad: [0; 5],
        }
    }

    /// As [`crate::Rewrite::as_written`]: the XDP program's fields cleared.
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

    pub const fn out_v4(&self) -> bool {
        self.flags & REWRITE6_OUT_V4 != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)] plain-old-data without implicit padding
    // (explicit `_pad` fields; sizes asserted above).
    unsafe impl aya::Pod for super::ClientKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Rewrite6 {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    /// The UDP checksum computed from scratch over either pseudo-header.
    fn full_udp(ends: &Endpoints46, udp: &[u8]) -> u16 {
        let len = (udp.len() as u16).to_be_bytes();
        let pseudo = csum::sum(csum::sum(0, ends.saddr.bytes()), ends.daddr.bytes());
        let pseudo = if ends.saddr.is_v4() {
            csum::sum(pseudo, &[0, 17, len[0], len[1]])
        } else {
            csum::sum(pseudo, &[0, 0, len[0], len[1], 0, 0, 0, 17])
        };
        match !csum::sum(pseudo, udp) {
            0 => 0xffff,
            c => c,
        }
    }

    fn udp(ends: &Endpoints46, payload: &[u8]) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&ends.sport);
        udp.extend_from_slice(&ends.dport);
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let c = full_udp(ends, &udp).to_ne_bytes();
        udp[6..8].copy_from_slice(&c);
        udp
    }

    fn addr() -> impl Strategy<Value = WireAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(WireAddr::V4),
            any::<[u8; 16]>().prop_map(WireAddr::V6),
        ]
    }

    fn ends() -> impl Strategy<Value = Endpoints46> {
        (
            addr(),
            any::<[u8; 16]>(),
            any::<[u8; 2]>(),
            any::<[u8; 2]>(),
        )
            .prop_map(|(saddr, other, sport, dport)| {
                // Both addresses of one side share its family.
                let daddr = match saddr {
                    WireAddr::V4(_) => WireAddr::V4([other[0], other[1], other[2], other[3]]),
                    WireAddr::V6(_) => WireAddr::V6(other),
                };
                Endpoints46 {
                    saddr,
                    daddr,
                    sport,
                    dport,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Moving a checksum with the entry's delta gives what a full
        /// recomputation over the new pseudo-header gives, in all four
        /// family combinations, for any payload.
        #[test]
        fn translated_checksum_equals_full_recomputation(
            from in ends(),
            to in ends(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let input = udp(&from, &payload);
            let want = udp(&to, &payload);
            let rewrite = Rewrite6::new(from, to);
            let old = u16::from_ne_bytes([input[6], input[7]]);
            let got = apply_udp_nonzero(old, rewrite.udp_csum_delta);
            prop_assert_eq!(got.to_ne_bytes(), [want[6], want[7]]);
            prop_assert_eq!(rewrite.out_v4(), to.saddr.is_v4());
        }

        /// The IPv4 header a translation writes verifies, for any TOS,
        /// length, TTL and addresses.
        #[test]
        fn translated_ipv4_header_checksum_verifies(
            tos in any::<u8>(),
            len in any::<u16>(),
            ttl in any::<u8>(),
            saddr in any::<[u8; 4]>(),
            daddr in any::<[u8; 4]>(),
        ) {
            let mut header = ip4_header(tos, len, ttl, saddr, daddr);
            let check = ip4_header_checksum(ip4_header_base(saddr, daddr), tos, len, ttl).to_ne_bytes();
            header[10] = check[0];
            header[11] = check[1];
            prop_assert_eq!(csum::sum(0, &header), 0xffff);
            prop_assert_eq!(check, csum::ipv4_header(&ip4_header(tos, len, ttl, saddr, daddr)).to_ne_bytes());
        }
    }

    #[test]
    fn ipv6_header_carries_traffic_class() {
        let h = ip6_header(0xba, 20, 63, [1; 16], [2; 16]);
        assert_eq!(h[0..2], [0x6b, 0xa0]);
        assert_eq!(h[4..8], [0, 20, 17, 63]);
    }
}
