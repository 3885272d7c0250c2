//! Header parsing: decides whether a frame is an option-free, unfragmented
//! IPv4/UDP packet, and copies out the fields the rest of the pipeline needs.

use core::mem;

use aya_ebpf::programs::XdpContext;
use forwarder_common::Reason;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    udp::UdpHdr,
};

/// IPv4 header length without options: anything longer passes to the stack,
/// so the UDP header always sits at a fixed offset (cheap for the verifier).
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// MF flag and fragment offset; DF (0x4000) is irrelevant here.
const FRAGMENT_MASK: u16 = 0x3fff;

const _: () = assert!(Ipv4Hdr::LEN == IPV4_LEN);
const _: () = assert!(UdpHdr::LEN == UDP_LEN);

/// A parsed IPv4/UDP frame: bounds-checked header pointers. Fields are read
/// where they are used rather than copied up front, so nothing has to be
/// spilled across the map lookups in between.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub udp: *mut UdpHdr,
    /// Frame bytes from the IPv4 header to the end, Ethernet padding included.
    pub l3_room: usize,
}

impl Packet {
    #[inline(always)]
    pub fn ip(&self) -> &Ipv4Hdr {
        // SAFETY: parse() checked the 20-byte header lies inside the frame,
        // which outlives this program run; only rewrite() writes it, through
        // its own pointer, after the last read.
        unsafe { &*self.ip }
    }

    #[inline(always)]
    pub fn udp(&self) -> &UdpHdr {
        // SAFETY: as for ip(), for the 8-byte UDP header.
        unsafe { &*self.udp }
    }

    #[inline(always)]
    pub fn tot_len(&self) -> u16 {
        u16::from_be_bytes(self.ip().tot_len)
    }
}

/// Returns a pointer to a `T` at `offset` if the whole `T` lies inside the
/// frame; the comparison against `data_end` is what the verifier needs.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Parses Ethernet, IPv4 and UDP, classifying every frame it does not want.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncatedEth)?;
    // SAFETY: ptr_at checked that the Ethernet header is inside the frame.
    let ether_type = unsafe { (*eth).ether_type };
    // VLAN tags land here too: tagged traffic is left to the stack.
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Reason::PassNotIpv4);
    }

    let ip_ptr: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassTruncatedIp)?;
    // SAFETY: ptr_at checked that 20 bytes of IPv4 header are inside the frame.
    let ip = unsafe { &*ip_ptr };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(Reason::PassTruncatedIp);
    }
    if ip.proto != IPPROTO_UDP {
        return Err(Reason::PassNotUdp);
    }
    if ip.vihl & 0x0f != 5 {
        return Err(Reason::PassIpOptions);
    }
    if u16::from_be_bytes(ip.frags) & FRAGMENT_MASK != 0 {
        return Err(Reason::PassFragment);
    }

    let udp: *mut UdpHdr = ptr_at(ctx, EthHdr::LEN + IPV4_LEN).ok_or(Reason::PassTruncatedUdp)?;

    Ok(Packet {
        eth,
        ip: ip_ptr,
        udp,
        l3_room: ctx.data_end().wrapping_sub(ctx.data() + EthHdr::LEN),
    })
}

/// Lengths of a packet addressed to a relay port: the IPv4 total length must
/// fit the frame (Ethernet padding after it is fine) and the UDP length must
/// cover exactly the rest of the IPv4 payload.
#[inline(always)]
pub fn check_lengths(packet: &Packet) -> Result<(), Reason> {
    let tot_len = usize::from(packet.tot_len());
    if tot_len < IPV4_LEN + UDP_LEN || tot_len > packet.l3_room {
        return Err(Reason::DropMalformed);
    }
    if usize::from(u16::from_be_bytes(packet.udp().len)) != tot_len - IPV4_LEN {
        return Err(Reason::DropMalformed);
    }
    Ok(())
}
