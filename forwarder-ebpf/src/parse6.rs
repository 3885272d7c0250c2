//! IPv6 header parsing: the fixed header, a bounded walk over the extension
//! headers a relayed datagram may carry, and the UDP header after them.

use aya_ebpf::programs::XdpContext;
use forwarder_common::Reason;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
    udp::UdpHdr,
};

use crate::parse::{UDP_LEN, ptr_at};

pub const IPV6_LEN: usize = 40;
const _: () = assert!(Ipv6Hdr::LEN == IPV6_LEN);

const IPPROTO_UDP: u8 = 17;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// Extension headers walked before giving up: RFC 8200 allows each of
/// hop-by-hop, routing and destination options once (destination options
/// twice); real mosh traffic carries none. More go to the stack.
const MAX_EXT_HEADERS: usize = 3;

/// Bounds the UDP offset for the verifier: three extension headers of at
/// most 2048 bytes each after the fixed header stay below it, so masking
/// with it never changes a real offset.
const OFFSET_MASK: usize = 0x3fff;
const _: () = assert!(IPV6_LEN + MAX_EXT_HEADERS * 2048 <= OFFSET_MASK);

/// A parsed IPv6/UDP frame: bounds-checked header pointers.
pub struct Packet6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    pub udp: *mut UdpHdr,
    /// Bytes of extension headers between the fixed header and UDP.
    pub ext_len: usize,
    /// Frame bytes from the IPv6 header to the end, Ethernet padding included.
    pub l3_room: usize,
}

impl Packet6 {
    #[inline(always)]
    pub fn ip(&self) -> &Ipv6Hdr {
        // SAFETY: parse() checked the 40-byte header lies inside the frame;
        // only the rewrite writes it, after the last read.
        unsafe { &*self.ip }
    }

    #[inline(always)]
    pub fn udp(&self) -> &UdpHdr {
        // SAFETY: as for ip(), for the 8-byte UDP header.
        unsafe { &*self.udp }
    }

    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        u16::from_be_bytes(self.ip().payload_len)
    }

    /// Traffic class: the 8 bits after the version.
    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        let vcf = self.ip().vcf;
        (vcf[0] << 4) | (vcf[1] >> 4)
    }
}

/// Parses Ethernet, IPv6, its extension headers and UDP.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet6, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncatedEth)?;
    // SAFETY: ptr_at checked that the Ethernet header is inside the frame.
    if unsafe { (*eth).ether_type } != EtherType::Ipv6 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    let ip_ptr: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassTruncatedIp)?;
    // SAFETY: ptr_at checked that the 40-byte header is inside the frame.
    let ip = unsafe { &*ip_ptr };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::PassTruncatedIp);
    }
    let mut next = ip.next_hdr;
    let mut offset = IPV6_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_UDP => break,
            // The stack reassembles; the daemon's socket gets the datagram.
            NEXTHDR_FRAGMENT => return Err(Reason::PassFragment),
            // Hop-by-hop options only ever come first (RFC 8200 4.1); the
            // stack refuses them anywhere else, and so do we.
            NEXTHDR_HOP if offset != IPV6_LEN => return Err(Reason::PassIpv6ExtHeaders),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {}
            // ICMPv6, TCP, ESP, unknown headers: not ours.
            _ => return Err(Reason::PassNotUdp),
        }
        // Next header, length in 8-byte units beyond the first 8, and for
        // a routing header its type and segments left.
        let ext: *const [u8; 4] =
            ptr_at(ctx, EthHdr::LEN + offset).ok_or(Reason::PassTruncatedIp)?;
        // SAFETY: ptr_at checked these 4 bytes are inside the frame.
        let ext = unsafe { *ext };
        // A routing header with segments left makes us a waypoint, not the
        // destination: the stack follows it.
        if next == NEXTHDR_ROUTING && ext[3] != 0 {
            return Err(Reason::PassIpv6ExtHeaders);
        }
        next = ext[0];
        offset = (offset + (usize::from(ext[1]) + 1) * 8) & OFFSET_MASK;
    }
    if next != IPPROTO_UDP {
        return Err(Reason::PassIpv6ExtHeaders);
    }
    let udp: *mut UdpHdr = ptr_at(ctx, EthHdr::LEN + offset).ok_or(Reason::PassTruncatedUdp)?;
    Ok(Packet6 {
        eth,
        ip: ip_ptr,
        udp,
        ext_len: offset - IPV6_LEN,
        l3_room: ctx.data_end().wrapping_sub(ctx.data() + EthHdr::LEN),
    })
}

/// Lengths and checksum of a datagram to a relay port: the payload length
/// fits the frame, UDP covers exactly the rest of it, and the checksum IPv6
/// makes mandatory is present.
#[inline(always)]
pub fn check(packet: &Packet6) -> Result<(), Reason> {
    let payload = usize::from(packet.payload_len());
    // Zero is a jumbogram's (hop-by-hop option), never a mosh datagram's.
    if payload < packet.ext_len + UDP_LEN || IPV6_LEN + payload > packet.l3_room {
        return Err(Reason::DropMalformed);
    }
    if usize::from(u16::from_be_bytes(packet.udp().len)) != payload - packet.ext_len {
        return Err(Reason::DropMalformed);
    }
    if packet.udp().check == [0, 0] {
        return Err(Reason::DropIpv6ZeroChecksum);
    }
    Ok(())
}
