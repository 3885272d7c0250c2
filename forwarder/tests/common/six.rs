//! IPv6 and translated flows in the shared fixture: frames built with
//! etherparse, the six-map flow halves installed as the daemon would, and
//! expected outputs built from scratch by etherparse (its own checksum
//! code), so a translation is checked against an independent model.

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use forwarder_common::config::map_names;
use forwarder_common::flow::REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
use forwarder_common::flow6::{Endpoints46, WireAddr, port_bit};
use forwarder_common::{BackendKey, BackendKey6, ClientKey, ClientKey6, Rewrite6};

use super::namespace::Topology;
use super::{
    BACKEND, BACKEND_PORT, BACKEND6, CLIENT, CLIENT_MAC, CLIENT_PORT, CLIENT6, FLOW_PORT,
    FRONT_MAC, RELAY_BACK, RELAY_BACK6, RELAY_FRONT, RELAY_FRONT6, Relay, SESSION_PORT,
};

/// An endpoint of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ep {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

impl Ep {
    fn wire(self) -> (WireAddr, [u8; 2]) {
        match self {
            Ep::V4(a, p) => (WireAddr::V4(a), p.to_be_bytes()),
            Ep::V6(a, p) => (WireAddr::V6(a), p.to_be_bytes()),
        }
    }
}

fn ends(src: Ep, dst: Ep) -> Endpoints46 {
    let (saddr, sport) = src.wire();
    let (daddr, dport) = dst.wire();
    Endpoints46 {
        saddr,
        daddr,
        sport,
        dport,
    }
}

pub const CLIENT_EP4: Ep = Ep::V4(CLIENT, CLIENT_PORT);
pub const CLIENT_EP6: Ep = Ep::V6(CLIENT6, CLIENT_PORT);
pub const FACING4: Ep = Ep::V4(RELAY_FRONT, SESSION_PORT);
pub const FACING6: Ep = Ep::V6(RELAY_FRONT6, SESSION_PORT);
pub const UPSTREAM4: Ep = Ep::V4(RELAY_BACK, FLOW_PORT);
pub const UPSTREAM6: Ep = Ep::V6(RELAY_BACK6, FLOW_PORT);
pub const BACKEND_EP4: Ep = Ep::V4(BACKEND, BACKEND_PORT);
pub const BACKEND_EP6: Ep = Ep::V6(BACKEND6, BACKEND_PORT);

/// A UDP frame (hop limit or TTL 64, valid checksum) between two endpoints
/// of one family, with `tos` as TOS or traffic class.
pub fn frame(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    frame_with(CLIENT_MAC, FRONT_MAC, src, dst, 64, payload)
}

/// [`frame`] with explicit MACs and hop limit: also the expected output.
pub fn frame_with(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ep,
    dst: Ep,
    hops: u8,
    payload: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let mut out = Vec::new();
    match (src, dst) {
        (Ep::V4(s, sp), Ep::V4(d, dp)) => eth.ipv4(s, d, hops).udp(sp, dp).write(&mut out, payload),
        (Ep::V6(s, sp), Ep::V6(d, dp)) => eth.ipv6(s, d, hops).udp(sp, dp).write(&mut out, payload),
        _ => panic!("a frame has one family"),
    }
    .unwrap();
    out
}

/// Which map a half goes to, by its input family and output family.
pub fn install_client_half(relay: &mut Relay, client: Ep, facing: Ep, upstream: Ep, backend: Ep) {
    install_client_half_flagged(relay, client, facing, upstream, backend, 0);
}

/// [`install_client_half`] with `REWRITE_*` bits ORed into the rewrite's flags.
pub fn install_client_half_flagged(
    relay: &mut Relay,
    client: Ep,
    facing: Ep,
    upstream: Ep,
    backend: Ep,
    flags: u8,
) {
    let mut rewrite = Rewrite6::new(ends(client, facing), ends(upstream, backend));
    rewrite.flags |= flags;
    match (client, facing) {
        (Ep::V6(c, cp), Ep::V6(f, fp)) => relay.insert(
            map_names::CLIENT_FLOWS6,
            ClientKey6 {
                relay_addr: f,
                client_addr: c,
                relay_port: fp.to_be_bytes(),
                client_port: cp.to_be_bytes(),
            },
            rewrite,
        ),
        (Ep::V4(c, cp), Ep::V4(f, fp)) => {
            mark_port_4to6(relay, fp);
            relay.insert(
                map_names::CLIENT_FLOWS_4TO6,
                ClientKey {
                    relay_addr: f,
                    client_addr: c,
                    relay_port: fp.to_be_bytes(),
                    client_port: cp.to_be_bytes(),
                },
                rewrite,
            )
        }
        _ => panic!("a side has one family"),
    }
}

/// The backend half `backend → upstream` rewritten to `facing → client`,
/// accepted from `backend` on the interface in slot `allowed_iface` only
/// (`IFACE_ANY`: any).
pub fn backend_half(
    client: Ep,
    facing: Ep,
    upstream: Ep,
    backend: Ep,
    allowed_iface: u8,
) -> Rewrite6 {
    let mut rewrite = Rewrite6::new(ends(backend, upstream), ends(facing, client));
    let (allowed, port) = backend.wire();
    rewrite.allowed_saddr = allowed.padded();
    rewrite.allowed_sport = port;
    rewrite.allowed_iface = allowed_iface;
    rewrite
}

pub fn install_backend_half(relay: &mut Relay, upstream: Ep, rewrite: Rewrite6) {
    match upstream {
        Ep::V6(a, p) => relay.insert(
            map_names::BACKEND_FLOWS6,
            BackendKey6 {
                relay_addr: a,
                relay_port: p.to_be_bytes(),
                _pad: [0; 2],
            },
            rewrite,
        ),
        Ep::V4(a, p) => {
            mark_port_4to6(relay, p);
            relay.insert(
                map_names::BACKEND_FLOWS_4TO6,
                BackendKey {
                    relay_addr: a,
                    relay_port: p.to_be_bytes(),
                    _pad: [0; 2],
                },
                rewrite,
            )
        }
    }
}

/// Sets `port`'s bit in PORTS_4TO6, as the daemon does before it inserts
/// a half keyed by it.
pub fn mark_port_4to6(relay: &mut Relay, port: u16) {
    let (word, mask) = port_bit(port);
    relay.set_array_word(map_names::PORTS_4TO6, word, mask);
}

/// The four shapes of a flow that is not IPv4 on both sides.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// IPv6 client, IPv6 backend.
    Six,
    /// IPv6 client, IPv4 backend.
    SixToFour,
    /// IPv4 client, IPv6 backend.
    FourToSix,
}

impl Shape {
    pub fn client(self) -> (Ep, Ep) {
        match self {
            Shape::Six | Shape::SixToFour => (CLIENT_EP6, FACING6),
            Shape::FourToSix => (CLIENT_EP4, FACING4),
        }
    }

    pub fn backend(self) -> (Ep, Ep) {
        match self {
            Shape::Six | Shape::FourToSix => (UPSTREAM6, BACKEND_EP6),
            Shape::SixToFour => (UPSTREAM4, BACKEND_EP4),
        }
    }

    /// Both halves, the backend one accepted on `back` only; `nat`: its
    /// unknown sources go to the daemon.
    pub fn install(self, relay: &mut Relay, topo: Topology, nat: bool) {
        let ((client, facing), (upstream, backend)) = (self.client(), self.backend());
        install_client_half(relay, client, facing, upstream, backend);
        let mut half = backend_half(
            client,
            facing,
            upstream,
            backend,
            relay.iface_slot(topo.back),
        );
        if nat {
            half.flags |= REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
        }
        install_backend_half(relay, upstream, half);
    }
}

/// Independent check of a forwarded frame of either family: the IPv4
/// header checksum and the UDP checksum (mandatory and non-zero for IPv6)
/// recomputed by etherparse.
pub fn assert_checksums(frame: &[u8]) {
    // etherparse walks the extension headers itself.
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("etherparse parses the output");
    let Some(TransportHeader::Udp(udp)) = headers.transport else {
        panic!("forwarded a frame without UDP: {headers:?}")
    };
    let payload = &headers.payload.slice()[..usize::from(udp.length) - 8];
    match headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                udp.checksum,
                udp.calc_checksum_ipv4(&ip, payload).unwrap(),
                "UDP checksum"
            );
        }
        Some(NetHeaders::Ipv6(ip, _)) => {
            assert_ne!(udp.checksum, 0, "IPv6 UDP checksum is mandatory");
            assert_eq!(
                udp.checksum,
                udp.calc_checksum_ipv6(&ip, payload).unwrap(),
                "UDP checksum"
            );
        }
        other => panic!("forwarded a frame of another network layer: {other:?}"),
    }
}

/// Inserts an extension header of `kind` (8 bytes: next header, length 0,
/// then `body`) after a frame's fixed IPv6 header, keeping it consistent.
pub fn with_ext(frame: &[u8], kind: u8, body: [u8; 6]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    let next = out[14 + 6];
    out[14 + 6] = kind;
    let payload_len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&[next, 0]);
    out.extend_from_slice(&body);
    out.extend_from_slice(&frame[54..]);
    out
}

pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;
/// A PadN option filling an 8-byte options header.
pub const PADN: [u8; 6] = [1, 4, 0, 0, 0, 0];
