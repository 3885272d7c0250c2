//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624).
//!
//! Words are read in native byte order straight from the wire bytes: the
//! one's-complement sum is byte-order independent, so deltas computed here on
//! the host and applied by the XDP program agree without any swaps.

use crate::flow::Rewrite;

/// One's-complement addition of two 16-bit words.
#[inline(always)]
pub const fn add(a: u16, b: u16) -> u16 {
    let sum = a as u32 + b as u32;
    ((sum & 0xffff) + (sum >> 16)) as u16
}

#[inline(always)]
const fn word(bytes: [u8; 2]) -> u16 {
    u16::from_ne_bytes(bytes)
}

/// The one's-complement delta that turns the words `old` into `new`
/// (the `~m + m'` of RFC 1624, summed over every changed word).
pub fn delta(old: &[[u8; 2]], new: &[[u8; 2]]) -> u16 {
    old.iter()
        .zip(new)
        .fold(0, |acc, (o, n)| add(add(acc, !word(*o)), word(*n)))
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + delta)`.
#[inline(always)]
pub const fn apply(checksum: u16, delta: u16) -> u16 {
    !add(!checksum, delta)
}

/// Like [`apply`] for a UDP checksum over IPv4: zero means "no checksum" and
/// stays zero; a computed zero is sent as 0xFFFF (RFC 768).
#[inline(always)]
pub const fn apply_udp(checksum: u16, delta: u16) -> u16 {
    if checksum == 0 {
        return 0;
    }
    match apply(checksum, delta) {
        0 => 0xffff,
        updated => updated,
    }
}

/// Rewrites a 20-byte IPv4 header and the UDP header after it as `rewrite`
/// says: both addresses, both ports, TTL minus one, both checksums updated
/// incrementally. The caller has checked that the TTL is above one.
#[inline(always)]
pub fn rewrite_ipv4_udp(ip: &mut [u8; 20], udp: &mut [u8; 8], rewrite: &Rewrite) {
    ip[8] = ip[8].wrapping_sub(1);
    let ip_csum = apply(word([ip[10], ip[11]]), rewrite.ip_csum_delta).to_ne_bytes();
    ip[10] = ip_csum[0];
    ip[11] = ip_csum[1];
    ip[12] = rewrite.new_saddr[0];
    ip[13] = rewrite.new_saddr[1];
    ip[14] = rewrite.new_saddr[2];
    ip[15] = rewrite.new_saddr[3];
    ip[16] = rewrite.new_daddr[0];
    ip[17] = rewrite.new_daddr[1];
    ip[18] = rewrite.new_daddr[2];
    ip[19] = rewrite.new_daddr[3];

    udp[0] = rewrite.new_sport[0];
    udp[1] = rewrite.new_sport[1];
    udp[2] = rewrite.new_dport[0];
    udp[3] = rewrite.new_dport[1];
    let udp_csum = apply_udp(word([udp[6], udp[7]]), rewrite.udp_csum_delta).to_ne_bytes();
    udp[6] = udp_csum[0];
    udp[7] = udp_csum[1];
}

/// Full RFC 1071 sum of `data` (an odd tail byte is padded with zero), not
/// yet complemented. Chain several parts by passing the previous sum.
pub fn sum(initial: u16, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(2);
    let mut acc = initial;
    for pair in &mut chunks {
        acc = add(acc, word([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc = add(acc, word([*last, 0]));
    }
    acc
}

/// The IPv4 header checksum of `header` computed from scratch (its checksum
/// field must be zero or is treated as data).
pub fn ipv4_header(header: &[u8]) -> u16 {
    !sum(0, header)
}

/// The UDP checksum over IPv4 computed from scratch: pseudo-header plus the
/// whole UDP datagram (its checksum field zeroed by the caller), with a
/// computed zero sent as 0xFFFF.
pub fn udp_ipv4(saddr: [u8; 4], daddr: [u8; 4], udp_datagram: &[u8]) -> u16 {
    let length = (udp_datagram.len() as u16).to_be_bytes();
    let pseudo = [
        saddr[0], saddr[1], saddr[2], saddr[3], daddr[0], daddr[1], daddr[2], daddr[3], 0, 17,
        length[0], length[1],
    ];
    match !sum(sum(0, &pseudo), udp_datagram) {
        0 => 0xffff,
        checksum => checksum,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;
    use crate::flow::Endpoints;

    /// A well-formed IPv4/UDP packet with the given fields and correct checksums.
    fn packet(ends: Endpoints, ttl: u8, payload: &[u8], zero_udp_csum: bool) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[1] = 0x02;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&[0x12, 0x34]);
        ip[8] = ttl;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&ends.saddr);
        ip[16..20].copy_from_slice(&ends.daddr);
        let ip_csum = ipv4_header(&ip).to_ne_bytes();
        ip[10..12].copy_from_slice(&ip_csum);
        let mut udp = Vec::new();
        udp.extend_from_slice(&ends.sport);
        udp.extend_from_slice(&ends.dport);
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        if !zero_udp_csum {
            let c = udp_ipv4(ends.saddr, ends.daddr, &udp).to_ne_bytes();
            udp[6..8].copy_from_slice(&c);
        }
        let mut out = ip.to_vec();
        out.extend_from_slice(&udp);
        out
    }

    fn endpoints() -> impl Strategy<Value = Endpoints> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<[u8; 2]>(),
            any::<[u8; 2]>(),
        )
            .prop_map(|(saddr, daddr, sport, dport)| Endpoints {
                saddr,
                daddr,
                sport,
                dport,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// The incremental update gives the same bytes as building the
        /// rewritten packet from scratch, for any addresses, ports, TTL and payload.
        #[test]
        fn incremental_update_equals_full_recomputation(
            from in endpoints(),
            to in endpoints(),
            ttl in 2u8..=255,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            zero_udp_csum in proptest::bool::weighted(0.1),
        ) {
            let mut got = packet(from, ttl, &payload, zero_udp_csum);
            let want = packet(to, ttl - 1, &payload, zero_udp_csum);
            let rewrite = Rewrite::new(from, to);
            let (ip, udp) = got.split_at_mut(20);
            rewrite_ipv4_udp(
                ip.try_into().unwrap(),
                (&mut udp[..8]).try_into().unwrap(),
                &rewrite,
            );
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        assert_eq!(apply_udp(0, 0x1234), 0);
    }

    #[test]
    fn computed_zero_becomes_all_ones() {
        // ~(~0x1234 + 0x1234) = ~0xffff = 0: must be sent as 0xffff.
        assert_eq!(apply_udp(0x1234, 0x1234), 0xffff);
        assert_eq!(apply(0x1234, 0x1234), 0);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example bytes sum to 0xddf2 (big-endian reading).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(u16::from_be(sum(0, &data)), 0xddf2);
    }
}
