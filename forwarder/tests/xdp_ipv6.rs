//! IPv6 and translated flows through the real program (BPF_PROG_TEST_RUN):
//! forwarding in every family combination with the output built from
//! scratch by etherparse, and the IPv6 parse, malformed and spoofed input.

mod common;

use common::six::{
    BACKEND_EP4, BACKEND_EP6, CLIENT_EP4, CLIENT_EP6, DEST_OPTS, FACING4, FACING6, FRAGMENT,
    HOP_BY_HOP, PADN, ROUTING, Shape, UPSTREAM4, UPSTREAM6, frame, frame_with, with_ext,
};
use common::table::{Ingress, Maps, NO_FLOWS, Output, Table};
use common::{
    BACK_MAC, BACKEND_MAC, BACKEND6, CLIENT_MAC, FRONT_MAC, PAYLOAD, RELAY_BACK6, SESSION_PORT,
};
use etherparse::PacketBuilder;
use forwarder_common::Reason;

const fn flow(shape: Shape) -> Maps {
    Maps {
        six: Some((shape, false)),
        ..NO_FLOWS
    }
}

/// A frame whose UDP checksum field is zeroed (the rest left valid).
fn zero_checksum(mut frame: Vec<u8>, udp_at: usize) -> Vec<u8> {
    frame[udp_at + 6..udp_at + 8].fill(0);
    frame
}

#[test]
fn forwarding_in_every_family() {
    use Reason::RedirectForwarded;
    let mut table = Table::default();
    let six = flow(Shape::Six);
    let six_to_four = flow(Shape::SixToFour);
    let four_to_six = flow(Shape::FourToSix);

    table.row(
        "ipv6 client to ipv6 backend",
        frame(CLIENT_EP6, FACING6, PAYLOAD),
        six,
        RedirectForwarded,
        Output::Built(|| frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM6, BACKEND_EP6, 63, PAYLOAD)),
    );
    table.row_on(
        "ipv6 backend to ipv6 client",
        frame(BACKEND_EP6, UPSTREAM6, PAYLOAD),
        six,
        Ingress::Back,
        RedirectForwarded,
        Output::Built(|| frame_with(FRONT_MAC, CLIENT_MAC, FACING6, CLIENT_EP6, 63, PAYLOAD)),
    );
    table.row(
        "ipv6 client to ipv4 backend: translated 6 to 4",
        frame(CLIENT_EP6, FACING6, PAYLOAD),
        six_to_four,
        RedirectForwarded,
        Output::Built(|| frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM4, BACKEND_EP4, 63, PAYLOAD)),
    );
    table.row_on(
        "ipv4 backend to ipv6 client: translated 4 to 6",
        frame(BACKEND_EP4, UPSTREAM4, PAYLOAD),
        six_to_four,
        Ingress::Back,
        RedirectForwarded,
        Output::Built(|| frame_with(FRONT_MAC, CLIENT_MAC, FACING6, CLIENT_EP6, 63, PAYLOAD)),
    );
    table.row(
        "ipv4 client to ipv6 backend: translated 4 to 6",
        frame(CLIENT_EP4, FACING4, PAYLOAD),
        four_to_six,
        RedirectForwarded,
        Output::Built(|| frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM6, BACKEND_EP6, 63, PAYLOAD)),
    );
    table.row_on(
        "ipv6 backend to ipv4 client: translated 6 to 4",
        frame(BACKEND_EP6, UPSTREAM6, PAYLOAD),
        four_to_six,
        Ingress::Back,
        RedirectForwarded,
        Output::Built(|| frame_with(FRONT_MAC, CLIENT_MAC, FACING4, CLIENT_EP4, 63, PAYLOAD)),
    );
    table.row(
        "an empty datagram translates too",
        frame(CLIENT_EP6, FACING6, b""),
        six_to_four,
        RedirectForwarded,
        Output::Built(|| frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM4, BACKEND_EP4, 63, b"")),
    );
    table.row(
        "hop-by-hop options stay and the packet is forwarded",
        with_ext(&frame(CLIENT_EP6, FACING6, PAYLOAD), HOP_BY_HOP, PADN),
        six,
        RedirectForwarded,
        Output::Built(|| {
            let out = frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM6, BACKEND_EP6, 63, PAYLOAD);
            with_ext(&out, HOP_BY_HOP, PADN)
        }),
    );
    table.row(
        "a routing header with no segments left is walked over",
        with_ext(
            &frame(CLIENT_EP6, FACING6, PAYLOAD),
            ROUTING,
            [4, 0, 0, 0, 0, 0],
        ),
        six,
        RedirectForwarded,
        Output::Built(|| {
            let out = frame_with(BACK_MAC, BACKEND_MAC, UPSTREAM6, BACKEND_EP6, 63, PAYLOAD);
            with_ext(&out, ROUTING, [4, 0, 0, 0, 0, 0])
        }),
    );
    table.run();
}

#[test]
fn traffic_class_and_tos_carry_over() {
    let mut table = Table::default();
    // DSCP EF with ECT(0): 0xba, both ways.
    let mut input = frame(CLIENT_EP6, FACING6, PAYLOAD);
    input[14] = 0x60 | 0x0b;
    input[15] = 0xa0;
    table.row(
        "traffic class becomes TOS",
        input,
        flow(Shape::SixToFour),
        Reason::RedirectForwarded,
        Output::Built(|| {
            let mut out = Vec::new();
            let common::six::Ep::V4(s, sp) = UPSTREAM4 else {
                unreachable!()
            };
            let common::six::Ep::V4(d, dp) = BACKEND_EP4 else {
                unreachable!()
            };
            let mut ip =
                etherparse::Ipv4Header::new(0, 63, etherparse::IpNumber::UDP, s, d).unwrap();
            ip.dscp = etherparse::Ipv4Dscp::try_new(0xba >> 2).unwrap();
            ip.ecn = etherparse::Ipv4Ecn::try_new(0xba & 3).unwrap();
            PacketBuilder::ethernet2(BACK_MAC, BACKEND_MAC)
                .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
                .udp(sp, dp)
                .write(&mut out, PAYLOAD)
                .unwrap();
            out
        }),
    );
    let mut input = frame(BACKEND_EP4, UPSTREAM4, PAYLOAD);
    common::edit_ip(&mut input, |ip| {
        ip.dscp = etherparse::Ipv4Dscp::try_new(0xba >> 2).unwrap();
        ip.ecn = etherparse::Ipv4Ecn::try_new(0xba & 3).unwrap();
    });
    table.row_on(
        "TOS becomes traffic class",
        input,
        flow(Shape::SixToFour),
        Ingress::Back,
        Reason::RedirectForwarded,
        Output::Built(|| {
            let mut out = frame_with(FRONT_MAC, CLIENT_MAC, FACING6, CLIENT_EP6, 63, PAYLOAD);
            out[14] = 0x60 | 0x0b;
            out[15] = 0xa0;
            out
        }),
    );
    table.run();
}

#[test]
fn malformed_and_unwalked_ipv6() {
    use Output::Untouched;
    use Reason::*;
    let mut table = Table::default();
    let six = flow(Shape::Six);
    let good = || frame(CLIENT_EP6, FACING6, PAYLOAD);
    table.row(
        "zero udp checksum",
        zero_checksum(good(), 54),
        six,
        DropIpv6ZeroChecksum,
        Untouched,
    );
    let mut hop1 = good();
    hop1[14 + 7] = 1;
    table.row("hop limit 1", hop1, six, PassTtlExpiring, Untouched);
    table.row(
        "fragment header",
        with_ext(&good(), FRAGMENT, [0, 0, 0, 0, 0, 1]),
        six,
        PassFragment,
        Untouched,
    );
    table.row(
        "routing header with segments left",
        with_ext(&good(), ROUTING, [4, 1, 0, 0, 0, 0]),
        six,
        PassIpv6ExtHeaders,
        Untouched,
    );
    let mut four = good();
    for _ in 0..4 {
        four = with_ext(&four, DEST_OPTS, PADN);
    }
    table.row(
        "more extension headers than walked",
        four,
        six,
        PassIpv6ExtHeaders,
        Untouched,
    );
    table.row(
        "an extension header in a packet to translate",
        with_ext(&good(), HOP_BY_HOP, PADN),
        flow(Shape::SixToFour),
        PassIpv6ExtHeaders,
        Untouched,
    );
    table.row(
        "hop-by-hop options after another extension header",
        with_ext(&with_ext(&good(), HOP_BY_HOP, PADN), DEST_OPTS, PADN),
        six,
        PassIpv6ExtHeaders,
        Untouched,
    );
    let mut long_udp = good();
    long_udp[54 + 5] += 1;
    table.row(
        "udp length beyond the payload",
        long_udp,
        six,
        DropMalformed,
        Untouched,
    );
    let mut long_ip = good();
    long_ip[19] += 1;
    table.row(
        "payload length beyond the frame",
        long_ip,
        six,
        DropMalformed,
        Untouched,
    );
    table.row(
        "fixed header cut short",
        good()[..14 + 39].to_vec(),
        six,
        PassTruncatedIp,
        Untouched,
    );
    table.row(
        "udp header cut short",
        good()[..54 + 7].to_vec(),
        six,
        PassTruncatedUdp,
        Untouched,
    );
    let mut tcp = Vec::new();
    let common::six::Ep::V6(c, _) = CLIENT_EP6 else {
        unreachable!()
    };
    let common::six::Ep::V6(f, _) = FACING6 else {
        unreachable!()
    };
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv6(c, f, 64)
        .tcp(40_000, SESSION_PORT, 1, 1024)
        .write(&mut tcp, PAYLOAD)
        .unwrap();
    table.row("tcp over ipv6", tcp, six, PassNotUdp, Untouched);
    table.row("no ipv6 flow", good(), NO_FLOWS, PassNoFlow, Untouched);
    table.row(
        "an ipv4 datagram without checksum cannot become ipv6",
        zero_checksum(frame(CLIENT_EP4, FACING4, PAYLOAD), 34),
        flow(Shape::FourToSix),
        PassTranslateNoChecksum,
        Untouched,
    );
    // 1500-byte MTU on the veths: 40 + 8 + 1453 is one byte over.
    table.row(
        "ipv6 larger than the egress mtu",
        frame(CLIENT_EP6, FACING6, &[0x5a; 1453]),
        six,
        PassTooBig,
        Untouched,
    );
    // 20 + 8 + 1460 fits IPv4; 40 + 8 + 1460 is over once it is IPv6.
    table.row(
        "ipv4 that grows past the mtu when translated",
        frame(CLIENT_EP4, FACING4, &[0x5a; 1460]),
        flow(Shape::FourToSix),
        PassTooBig,
        Untouched,
    );
    table.run();
}

#[test]
fn spoofed_ipv6_and_translated_servers() {
    use Output::Untouched;
    use Reason::*;
    let mut table = Table::default();
    let forged6 = common::six::Ep::V6([0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9], 60_002);
    table.row_on(
        "ipv6 server packet from another source",
        frame(forged6, UPSTREAM6, PAYLOAD),
        flow(Shape::Six),
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    table.row(
        "ipv6 server packet arriving on the client side",
        frame(BACKEND_EP6, UPSTREAM6, PAYLOAD),
        flow(Shape::Six),
        DropSpoofedServer,
        Untouched,
    );
    let wrong_port = common::six::Ep::V6(BACKEND6, 60_003);
    table.row_on(
        "ipv6 server packet from another port",
        frame(wrong_port, UPSTREAM6, PAYLOAD),
        flow(Shape::Six),
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    let forged4 = common::six::Ep::V4([10, 0, 2, 9], 60_002);
    table.row_on(
        "ipv4 server packet of a translated flow from another source",
        frame(forged4, UPSTREAM4, PAYLOAD),
        flow(Shape::SixToFour),
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    table.row_on(
        "a punched ipv6 session hands another source to the daemon",
        frame(forged6, UPSTREAM6, PAYLOAD),
        Maps {
            six: Some((Shape::Six, true)),
            ..NO_FLOWS
        },
        Ingress::Back,
        PassNatRebindCandidate,
        Untouched,
    );
    // The relay's own IPv6 address as the client: still only a lookup miss.
    let relay_as_client = common::six::Ep::V6(RELAY_BACK6, 40_000);
    table.row(
        "unknown ipv6 client",
        frame(relay_as_client, FACING6, PAYLOAD),
        flow(Shape::Six),
        PassNoFlow,
        Untouched,
    );
    table.run();
}
