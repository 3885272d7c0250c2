//! Forwarding: the router-like rewrite and its checksums, XDP_TX when the
//! route leaves by the ingress interface and a redirect otherwise, route
//! lookup failures handed to the stack, and the route cache in the flow's
//! entry. Every case runs inside the namespace of `common/namespace.rs`.

mod common;

use aya::programs::XdpMode;
use common::namespace::Namespace;
use common::table::{
    FAR_FLOW, Maps, NEAR_FLOW, NO_FLOWS, Output, TO_BACKEND, TO_NEAR_BACKEND, Table,
    assert_checksums_valid, expected_output,
};
use common::{
    BACKEND, BACKEND_PORT, CLIENT, CLIENT_PORT, IP, NEAR_BACKEND, PAYLOAD, RELAY_FRONT, Relay,
    SESSION_PORT, UDP, UNRESOLVED_BACKEND, UNROUTABLE_BACKEND, XDP_PASS, XDP_REDIRECT, XDP_TX,
    client_packet, client_with, edit_ip, install_client_flow, poke, udp_frame,
};
use forwarder_common::Reason;

#[test]
fn fixture_table() {
    let mut table = Table::default();
    rewrites(&mut table);
    route_lookup_failures(&mut table);
    table.run();
}

/// Payload sizes and checksum corner cases.
fn rewrites(table: &mut Table) {
    use Reason::*;

    for len in [0usize, 1, 23, 24, 1252, 1472] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 131 + 7) as u8).collect();
        table.row(
            &format!("payload {len} bytes, same interface"),
            client_with(&payload),
            NEAR_FLOW,
            TxForwarded,
            TO_NEAR_BACKEND,
        );
        table.row(
            &format!("payload {len} bytes, other interface"),
            client_with(&payload),
            FAR_FLOW,
            RedirectForwarded,
            TO_BACKEND,
        );
    }
    table.row(
        "flow packet, other interface",
        client_packet(),
        FAR_FLOW,
        RedirectForwarded,
        TO_BACKEND,
    );
    let mut ect = client_packet();
    poke(&mut ect, IP + 1, &[0x02]);
    table.row("ECT(0) kept", ect, NEAR_FLOW, TxForwarded, TO_NEAR_BACKEND);
    let mut no_csum = client_packet();
    no_csum[UDP + 6..UDP + 8].fill(0);
    table.row(
        "zero udp checksum stays zero",
        no_csum,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    // RFC 768 sends a sum of zero as 0xffff, since zero means "no checksum".
    table.row(
        "udp checksum folding to zero is sent as 0xffff",
        client_packet_rewritten_to(UDP + 6, [0xff, 0xff]),
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    // An input that already carries 0xffff (its sum folded to zero).
    let all_ones_in = (0..=u16::MAX)
        .map(|word| client_with(&[PAYLOAD, &word.to_be_bytes()].concat()))
        .find(|frame| frame[UDP + 6..UDP + 8] == [0xff, 0xff])
        .expect("some payload word gives an input udp checksum of 0xffff");
    table.row(
        "input udp checksum 0xffff",
        all_ones_in,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    table.row(
        "ipv4 header checksum folding to 0x0000",
        client_packet_rewritten_to(IP + 10, [0, 0]),
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    // A full computation never yields 0xffff for a header checksum (that
    // needs an all-zero header); an incremental update done by RFC 1141
    // instead of RFC 1624 would produce it where 0x0000 is right, which
    // the row above catches. An input carrying 0x0000 is the other side.
    let zero_ip_csum_in = (0..=u16::MAX)
        .map(|id| {
            let mut frame = client_packet();
            edit_ip(&mut frame, |header| header.identification = id);
            frame
        })
        .find(|frame| frame[IP + 10..IP + 12] == [0, 0])
        .expect("some IPv4 id gives a header checksum of 0x0000");
    table.row(
        "input ipv4 header checksum 0x0000",
        zero_ip_csum_in,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
}

/// Route lookup failures go to the daemon, untouched.
fn route_lookup_failures(table: &mut Table) {
    use Output::Untouched;
    use Reason::*;

    let unresolved = Maps {
        client_flow_to: Some(UNRESOLVED_BACKEND),
        ..NO_FLOWS
    };
    table.row(
        "backend without a neighbour entry",
        client_packet(),
        unresolved,
        PassFibNoNeigh,
        Untouched,
    );
    let unroutable = Maps {
        client_flow_to: Some(UNROUTABLE_BACKEND),
        ..NO_FLOWS
    };
    table.row(
        "backend without a route",
        client_packet(),
        unroutable,
        PassFibFailed,
        Untouched,
    );
}

/// Searches a client packet whose header checksum or UDP checksum, once
/// the near-backend rewrite is applied, comes out as `want` at `offset`.
fn client_packet_rewritten_to(offset: usize, want: [u8; 2]) -> Vec<u8> {
    (0..=u16::MAX)
        .find_map(|word| {
            let mut input = client_with(&[PAYLOAD, &word.to_be_bytes()].concat());
            // Vary the IPv4 id as well, so the header checksum moves too.
            edit_ip(&mut input, |header| header.identification = word);
            let out = expected_output(&input, TO_NEAR_BACKEND);
            (out[offset..offset + 2] == want).then_some(input)
        })
        .unwrap_or_else(|| panic!("no 16-bit word makes offset {offset} come out as {want:?}"))
}

/// Beyond a row: the flow's counters and its last-seen stamp.
#[test]
fn same_interface_is_forwarded_with_xdp_tx() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        // The daemon numbers every interface it attaches to, the ingress too.
        let front = relay.add_egress(topo.front);
        let key = install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT));
        let mut input = client_packet();
        // mosh's ECT(0) must survive the relay.
        poke(&mut input, IP + 1, &[0x02]);
        let run = relay.expect(&input, Some(topo.front), Reason::TxForwarded, XDP_TX);
        assert_eq!(run.out, expected_output(&input, TO_NEAR_BACKEND));
        assert_eq!(run.out[IP + 1], 0x02, "TOS/ECN kept");
        assert_eq!(run.out[IP + 8], 63, "TTL decremented");
        assert_checksums_valid(&run.out);

        let tot_len = u64::from(u16::from_be_bytes([input[IP + 2], input[IP + 3]]));
        assert_eq!(relay.flow_count(&key), (1, tot_len));
        // The route the lookup found is cached in the entry itself.
        assert_eq!(relay.client_flow(&key).next_hop.iface, front);
        assert!(relay.client_flow(&key).last_seen > 0, "last_seen refreshed");
        // A second packet within a second leaves last_seen alone.
        let seen = relay.client_flow(&key).last_seen;
        relay.run(&input, Some(topo.front));
        assert_eq!(relay.client_flow(&key).last_seen, seen);
        assert_eq!(relay.flow_count(&key), (2, 2 * tot_len));
    });
}

/// Beyond a row: the table always fills the devmap with both interfaces.
#[test]
fn egress_not_in_devmap_passes_untouched() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (BACKEND, BACKEND_PORT));
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassEgressNotAttached,
            XDP_PASS,
        );
    });
}

/// Beyond a row: the namespace's forwarding switch turned off.
#[test]
fn forwarding_disabled_passes_untouched() {
    let ns = Namespace::create();
    ns.netns()
        .sysctl("net.ipv4.conf.front.forwarding", "0")
        .unwrap();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT));
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassFibFailed,
            XDP_PASS,
        );
    });
}

#[test]
fn attaches_in_native_and_skb_mode() {
    let ns = Namespace::create();
    ns.enter(|_| {
        for mode in [XdpMode::Driver, XdpMode::Skb] {
            let mut relay = Relay::load();
            let program = relay.program_mut();
            let link = program
                .attach("front", mode)
                .unwrap_or_else(|e| panic!("attaching in {mode:?} mode: {e:#?}"));
            program.detach(link).unwrap();
        }
    });
}

// ---------------------------------------------------------------------------
// The route cache in the flow's entry: one `bpf_fib_lookup` per flow
// direction and second, whichever CPU runs it, and never for a packet
// larger than the cached route's MTU.

#[test]
fn route_cache_forwards_without_a_lookup_for_a_second() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (BACKEND, BACKEND_PORT));
        relay.add_egress(topo.back);
        let input = client_packet();
        let first = relay.expect(
            &input,
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );

        // Without its neighbour a lookup would now say NO_NEIGH: the cached
        // route still forwards, to the same MACs.
        forget_backend_neighbour(&ns);
        let cached = relay.expect(
            &input,
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        assert_eq!(cached.out, first.out);

        // Larger than the egress MTU (1500): never from the cache; the lookup
        // hands it to the stack, which fragments (mosh clears DF).
        let jumbo = udp_frame(
            (CLIENT, CLIENT_PORT),
            (RELAY_FRONT, SESSION_PORT),
            &[0x5a; 1600],
        );
        let run = relay.run(&jumbo, Some(topo.front));
        assert_eq!(
            run.retval, XDP_PASS,
            "an oversized packet was forwarded from the cache"
        );

        // A second later the cache has aged out and the lookup runs again.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        relay.expect(&input, Some(topo.front), Reason::PassFibNoNeigh, XDP_PASS);
    });
}

/// The program caches a route only when the lookup agrees with the MAC and
/// MTU in the egress interface's slot: until the daemon's refresh catches
/// up with an interface change, each packet takes the lookup (here: MTU).
#[test]
fn a_route_that_disagrees_with_its_slot_is_looked_up_every_packet() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        let key = install_client_flow(&mut relay, (BACKEND, BACKEND_PORT));
        let back = relay.add_egress(topo.back);
        let stale = forwarder_common::flow::EgressIface {
            ifindex: topo.back,
            mtu: 1400,
            mac: [0; 6],
        };
        relay.set_iface(back, stale);
        let input = client_packet();
        relay.expect(
            &input,
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        assert_eq!(
            relay.client_flow(&key).next_hop.iface,
            forwarder_common::flow::IFACE_ANY,
            "a route cached against a stale slot"
        );
        assert!(
            relay.client_flow(&key).last_seen > 0,
            "the flow is still seen"
        );
        // No cache: without the neighbour the next packet's lookup fails.
        forget_backend_neighbour(&ns);
        relay.expect(&input, Some(topo.front), Reason::PassFibNoNeigh, XDP_PASS);
    });
}

/// A slot the daemon empties (its interface detached) ends every route
/// cached through it at once, not a second later.
#[test]
fn an_emptied_slot_ends_the_routes_cached_through_it() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        let key = install_client_flow(&mut relay, (BACKEND, BACKEND_PORT));
        let back = relay.add_egress(topo.back);
        let input = client_packet();
        relay.expect(
            &input,
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        assert_eq!(relay.client_flow(&key).next_hop.iface, back, "route cached");
        relay.set_iface(back, forwarder_common::flow::EgressIface::default());
        forget_backend_neighbour(&ns);
        relay.expect(&input, Some(topo.front), Reason::PassFibNoNeigh, XDP_PASS);
    });
}

/// Deletes the backend's neighbour entry: from then on a route lookup says
/// NO_NEIGH, so a forwarded packet proves it came from the cache.
fn forget_backend_neighbour(ns: &Namespace) {
    let backend = std::net::Ipv4Addr::from(BACKEND).to_string();
    ns.netns()
        .ip(&["neigh", "del", &backend, "dev", "back"])
        .unwrap();
}
