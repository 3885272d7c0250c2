//! Parsing: frames that are not ours, headers the fast path leaves to the
//! stack, inconsistent lengths, and relay ports without a matching flow.
//! The shared fixture is in `common/`.
//!
//! Not covered: `truncated_eth`, because the kernel refuses test runs with
//! fewer than 14 bytes of data (EINVAL) before the program ever runs.

mod common;

use common::table::{BACKEND_FLOW, Ingress, NEAR_FLOW, NO_FLOWS, Output, TO_NEAR_BACKEND, Table};
use common::{
    BACKEND, BACKEND_PORT, CLIENT, CLIENT_MAC, CLIENT_PORT, FLOW_PORT, FRONT_MAC, IP, PAYLOAD,
    RELAY_BACK, RELAY_FRONT, Relay, SESSION_PORT, SHARED_PORT, UDP, backend_packet, client_packet,
    client_with, edit_ip, poke, udp_frame,
};
use etherparse::PacketBuilder;
use forwarder_common::Reason;

#[test]
fn fixture_table() {
    let mut table = Table::default();
    not_ours(&mut table);
    left_to_the_stack(&mut table);
    inconsistent_lengths(&mut table);
    no_matching_flow(&mut table);
    table.run();
}

fn not_ours(table: &mut Table) {
    use Output::Untouched;
    use Reason::*;

    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&CLIENT_MAC);
    // Request: Ethernet/IPv4, who has 10.0.1.1 tell 10.0.1.2.
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&RELAY_FRONT);
    table.row("arp", arp, NEAR_FLOW, PassNotIpv4, Untouched);
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(CLIENT_PORT, SESSION_PORT)
        .write(&mut ipv6, PAYLOAD)
        .unwrap();
    // IPv6 is parsed now; with no IPv6 flow it is the daemon's.
    table.row(
        "ipv6 udp to a session port without an ipv6 flow",
        ipv6,
        NEAR_FLOW,
        PassNoFlow,
        Untouched,
    );
    for (tpid, name) in [(0x8100u16, "802.1Q"), (0x88a8, "802.1ad")] {
        let plain = client_packet();
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&tpid.to_be_bytes());
        tagged.extend_from_slice(&[0x00, 0x64]);
        tagged.extend_from_slice(&plain[12..]);
        table.row(
            &format!("{name} tagged flow packet"),
            tagged,
            NEAR_FLOW,
            PassNotIpv4,
            Untouched,
        );
    }
    let mut tcp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, RELAY_FRONT, 64)
        .tcp(CLIENT_PORT, SESSION_PORT, 1, 1024)
        .write(&mut tcp, PAYLOAD)
        .unwrap();
    table.row(
        "tcp to a session port",
        tcp,
        NEAR_FLOW,
        PassNotUdp,
        Untouched,
    );
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, RELAY_FRONT, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, PAYLOAD)
        .unwrap();
    table.row("icmp echo", icmp, NEAR_FLOW, PassNotUdp, Untouched);
    for port in [53, 59_999, 60_100, 60_999, 62_000] {
        let frame = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, port), PAYLOAD);
        table.row(
            &format!("udp to non-relay port {port}"),
            frame,
            NEAR_FLOW,
            PassNotRelayPort,
            Untouched,
        );
    }
}

fn left_to_the_stack(table: &mut Table) {
    use Output::Untouched;
    use Reason::*;

    let flow = client_packet();
    table.row(
        "ipv4 header cut at 19 bytes",
        flow[..IP + 19].to_vec(),
        NEAR_FLOW,
        PassTruncatedIp,
        Untouched,
    );
    let mut ihl4 = client_packet();
    poke(&mut ihl4, IP, &[0x44]);
    table.row("ipv4 ihl 4", ihl4, NEAR_FLOW, PassTruncatedIp, Untouched);
    let mut version6 = client_packet();
    poke(&mut version6, IP, &[0x65]);
    table.row(
        "ipv4 header with version 6",
        version6,
        NEAR_FLOW,
        PassTruncatedIp,
        Untouched,
    );
    table.row(
        "udp header cut at 7 bytes",
        flow[..UDP + 7].to_vec(),
        NEAR_FLOW,
        PassTruncatedUdp,
        Untouched,
    );
    table.row(
        "udp header only, no ipv4 payload room",
        flow[..UDP].to_vec(),
        NEAR_FLOW,
        PassTruncatedUdp,
        Untouched,
    );
    let mut options = client_packet();
    edit_ip(&mut options, |header| {
        // Four NOPs: one option word.
        header.options = [1u8, 1, 1, 1][..].try_into().unwrap();
        header.total_len += 4;
    });
    options.splice(UDP..UDP, [1, 1, 1, 1]);
    edit_ip(&mut options, |_| {});
    table.row(
        "ipv4 options (4 NOPs)",
        options,
        NEAR_FLOW,
        PassIpOptions,
        Untouched,
    );
    let mut first = client_packet();
    edit_ip(&mut first, |header| {
        header.dont_fragment = false;
        header.more_fragments = true;
    });
    table.row("first fragment", first, NEAR_FLOW, PassFragment, Untouched);
    let mut later = client_packet();
    edit_ip(&mut later, |header| {
        header.dont_fragment = false;
        header.fragment_offset = 185.try_into().unwrap();
    });
    table.row("later fragment", later, NEAR_FLOW, PassFragment, Untouched);
    let mut last = client_packet();
    edit_ip(&mut last, |header| {
        header.dont_fragment = false;
        header.more_fragments = false;
        header.fragment_offset = 1.try_into().unwrap();
    });
    table.row("last fragment", last, NEAR_FLOW, PassFragment, Untouched);
    for ttl in [0, 1] {
        let mut frame = client_packet();
        edit_ip(&mut frame, |header| header.time_to_live = ttl);
        table.row(
            &format!("ttl {ttl}"),
            frame,
            NEAR_FLOW,
            PassTtlExpiring,
            Untouched,
        );
    }
    let mut ttl2 = client_packet();
    edit_ip(&mut ttl2, |header| header.time_to_live = 2);
    table.row(
        "ttl 2 is forwarded with ttl 1",
        ttl2,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
}

/// Lengths addressed to a relay port. A malformed one is dropped whether
/// or not a flow matches: the lengths are checked before the lookup.
fn inconsistent_lengths(table: &mut Table) {
    use Output::Untouched;
    use Reason::*;

    let flow_states = [(NEAR_FLOW, ""), (NO_FLOWS, ", no flow")];
    let frame_ip_len = client_packet().len() - IP;
    for (name, tot_len) in [
        ("ipv4 total length one beyond the frame", frame_ip_len + 1),
        ("ipv4 total length 65535", 65_535),
        ("ipv4 total length one short of the frame", frame_ip_len - 1),
        ("ipv4 total length 27 (no room for udp)", 27),
        ("ipv4 total length 0", 0),
    ] {
        for (maps, flow) in flow_states {
            let mut frame = client_packet();
            poke(&mut frame, IP + 2, &(tot_len as u16).to_be_bytes());
            table.row(
                &format!("{name}{flow}"),
                frame,
                maps,
                DropMalformed,
                Untouched,
            );
        }
    }
    let udp_len = (8 + PAYLOAD.len()) as u16;
    for wrong in [udp_len - 1, udp_len + 1, 8, 7, 0, u16::MAX] {
        for (maps, flow) in flow_states {
            let mut frame = client_packet();
            frame[UDP + 4..UDP + 6].copy_from_slice(&wrong.to_be_bytes());
            table.row(
                &format!("udp length {wrong} instead of {udp_len}{flow}"),
                frame,
                maps,
                DropMalformed,
                Untouched,
            );
        }
    }
    let mut padded = client_with(b"x");
    padded.resize(60, 0);
    table.row(
        "minimum frame with ethernet padding",
        padded.clone(),
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    table.row(
        "minimum frame with ethernet padding, no flow",
        padded,
        NO_FLOWS,
        PassNoFlow,
        Untouched,
    );
    let mut trailer = client_packet();
    trailer.extend_from_slice(&[0xee; 9]);
    table.row(
        "ipv4 total length shorter than the frame (trailer kept)",
        trailer,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
}

/// Relay ports without a matching flow: the daemon decides.
fn no_matching_flow(table: &mut Table) {
    use Output::Untouched;
    use Reason::*;

    table.row(
        "unknown client on a session port",
        client_packet(),
        NO_FLOWS,
        PassNoFlow,
        Untouched,
    );
    table.row_on(
        "backend on a flow port without a flow",
        backend_packet(),
        NO_FLOWS,
        Ingress::Back,
        PassNoFlow,
        Untouched,
    );
    // The shared port lies outside both ranges and is a client port all the
    // same: a new endpoint there is the daemon's to match by key.
    table.row(
        "unknown client on the shared port",
        udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SHARED_PORT), PAYLOAD),
        NO_FLOWS,
        PassNoFlow,
        Untouched,
    );
    table.row(
        "the port next to the shared port",
        udp_frame(
            (CLIENT, CLIENT_PORT),
            (RELAY_FRONT, SHARED_PORT + 1),
            PAYLOAD,
        ),
        NO_FLOWS,
        PassNotRelayPort,
        Untouched,
    );
    let roamed = udp_frame(
        (CLIENT, CLIENT_PORT + 1),
        (RELAY_FRONT, SESSION_PORT),
        PAYLOAD,
    );
    table.row(
        "known client address from another port",
        roamed,
        NEAR_FLOW,
        PassNoFlow,
        Untouched,
    );
    let unallocated = udp_frame(
        (CLIENT, CLIENT_PORT),
        (RELAY_FRONT, SESSION_PORT + 5),
        PAYLOAD,
    );
    table.row(
        "unallocated session port",
        unallocated,
        NEAR_FLOW,
        PassNoFlow,
        Untouched,
    );
    let wrong_upstream = udp_frame(
        (BACKEND, BACKEND_PORT),
        (RELAY_BACK, FLOW_PORT + 1),
        PAYLOAD,
    );
    table.row_on(
        "backend to an unallocated upstream port",
        wrong_upstream,
        BACKEND_FLOW,
        Ingress::Back,
        PassNoFlow,
        Untouched,
    );
}

#[test]
fn counts_bytes_of_the_whole_frame() {
    let relay = Relay::load();
    let frame = client_packet();
    relay.run(&frame, None);
    relay.run(&frame, None);
    assert_eq!(
        relay.reason_count(Reason::PassNoFlow),
        (2, 2 * frame.len() as u64)
    );
}
