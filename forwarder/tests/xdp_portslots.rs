//! The port slots (forwarder-common's `portslot`): where the daemon's own
//! placement code puts IPv4 flow halves, and that the program forwards each
//! from wherever it is, old halves stop and new ones start at once, and a
//! half replaced faster than a slot may be rewritten stays forwardable.

mod common;

use common::namespace::Namespace;
use common::{
    BACKEND, BACKEND_PORT, CLIENT, CLIENT_PORT, FLOW_PORT, NEAR_BACKEND, RELAY_BACK, RELAY_FRONT,
    Relay, SESSION_PORT, SHARED_PORT, UDP, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, client_key,
    endpoints, udp_frame,
};
use forwarder::datapath::slots::GRACE;
use forwarder_common::portslot::{ClientSlot, PortSlot as _};
use forwarder_common::{ClientKey, Reason, Rewrite};

const PAYLOAD: &[u8] = b"\x80\x00\x00\x00\x00\x00\x00\x07slot";

/// Client `CLIENT:client_port` at relay port `port`, rewritten towards the
/// near backend's `backend_port`; the frame it sends.
fn client_half(relay: &mut Relay, client_port: u16, port: u16, backend_port: u16) -> ClientKey {
    let from = endpoints((CLIENT, client_port), (RELAY_FRONT, port));
    let to = endpoints((RELAY_FRONT, FLOW_PORT), (NEAR_BACKEND, backend_port));
    let key = client_key((CLIENT, client_port), (RELAY_FRONT, port));
    relay.add_client_flow(key, Rewrite::new(from, to));
    key
}

fn frame(client_port: u16, port: u16) -> Vec<u8> {
    udp_frame((CLIENT, client_port), (RELAY_FRONT, port), PAYLOAD)
}

/// Forwards one frame back out of `front` and returns its new UDP
/// destination port.
fn forwarded_to(relay: &Relay, frame: &[u8], front: u32) -> u16 {
    let run = relay.expect(frame, Some(front), Reason::TxForwarded, XDP_TX);
    u16::from_be_bytes([run.out[UDP + 2], run.out[UDP + 3]])
}

#[test]
fn a_half_alone_on_its_port_is_forwarded_from_a_slot() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let key = client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_001);
        assert_eq!(relay.flow_placement().0, (1, 0), "in its port's slot");
        let input = frame(CLIENT_PORT, SESSION_PORT);
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_001);
        assert_eq!(relay.flow_count(&key).0, 1, "counted in the slot");
        // Another client at the port has no half: the daemon decides.
        relay.expect(
            &frame(CLIENT_PORT + 9, SESSION_PORT),
            Some(topo.front),
            Reason::PassNoFlow,
            XDP_PASS,
        );
    });
}

#[test]
fn halves_that_share_a_port_beyond_its_slots_are_forwarded_from_the_hash_map() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let keys: Vec<ClientKey> = (0..3)
            .map(|n| client_half(&mut relay, CLIENT_PORT + n, SESSION_PORT, 7_000 + n))
            .collect();
        assert_eq!(relay.flow_placement().0, (2, 1), "two slots, then the hash");
        assert!(relay.client_port_hashed(SESSION_PORT));
        assert!(!relay.client_port_hashed(SESSION_PORT + 1));
        for (n, key) in (0..3).zip(&keys) {
            let input = frame(CLIENT_PORT + n, SESSION_PORT);
            assert_eq!(forwarded_to(&relay, &input, topo.front), 7_000 + n);
            assert_eq!(relay.flow_count(key).0, 1);
        }
        // A fourth half joins the third in the hash map, and the third is
        // replaced there: the port counts two hash-map halves, not three.
        let fourth = client_half(&mut relay, CLIENT_PORT + 3, SESSION_PORT, 7_003);
        client_half(&mut relay, CLIENT_PORT + 2, SESSION_PORT, 7_202);
        assert_eq!(relay.flow_placement().0, (2, 2));
        let input = frame(CLIENT_PORT + 2, SESSION_PORT);
        assert_eq!(
            forwarded_to(&relay, &input, topo.front),
            7_202,
            "the replacement"
        );
        relay.remove_client_flow(&fourth);
        assert!(
            relay.client_port_hashed(SESSION_PORT),
            "the third is still hashed"
        );
        // The last hash-map half of the port gone, a slot miss there no
        // longer asks the hash map, and the slots' halves go on.
        relay.remove_client_flow(&keys[2]);
        assert!(!relay.client_port_hashed(SESSION_PORT));
        relay.expect(
            &frame(CLIENT_PORT + 2, SESSION_PORT),
            Some(topo.front),
            Reason::PassNoFlow,
            XDP_PASS,
        );
        let input = frame(CLIENT_PORT + 1, SESSION_PORT);
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_001);
        // The shared port has no slots: every half there is in the hash.
        client_half(&mut relay, CLIENT_PORT, SHARED_PORT, 7_100);
        assert_eq!(relay.flow_placement().0, (2, 1));
        let input = frame(CLIENT_PORT, SHARED_PORT);
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_100);
    });
}

#[test]
fn a_roamed_client_is_forwarded_at_once_and_its_old_endpoint_no_more() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let old = client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_001);
        let old_frame = frame(CLIENT_PORT, SESSION_PORT);
        forwarded_to(&relay, &old_frame, topo.front);
        // As the daemon moves a session: the old half out, the new one in.
        relay.remove_client_flow(&old);
        relay.expect(&old_frame, Some(topo.front), Reason::PassNoFlow, XDP_PASS);
        client_half(&mut relay, CLIENT_PORT + 1, SESSION_PORT, 7_001);
        // The old slot is not rewritten this soon: the other one is used.
        assert_eq!(relay.flow_placement().0, (1, 0));
        forwarded_to(&relay, &frame(CLIENT_PORT + 1, SESSION_PORT), topo.front);
        relay.expect(&old_frame, Some(topo.front), Reason::PassNoFlow, XDP_PASS);
    });
}

#[test]
fn a_half_replaced_within_the_grace_period_is_forwarded_from_the_hash_map_then_a_slot() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let input = frame(CLIENT_PORT, SESSION_PORT);
        client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_001);
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_001);
        // Replaced: written to the other slot, the first retired.
        client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_002);
        assert_eq!(relay.flow_placement().0, (1, 0));
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_002);
        // Again at once: the retired slot is still in its grace period, so
        // the half goes to the hash map and its slot is retired.
        client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_003);
        assert_eq!(relay.flow_placement().0, (0, 1));
        assert!(relay.client_port_hashed(SESSION_PORT));
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_003);
        // Later, a replacement moves it back into a slot.
        std::thread::sleep(GRACE + std::time::Duration::from_millis(20));
        client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_004);
        assert_eq!(relay.flow_placement().0, (1, 0));
        assert!(!relay.client_port_hashed(SESSION_PORT));
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_004);
    });
}

#[test]
fn a_backend_half_in_a_slot_is_forwarded_and_checks_its_source() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        relay.add_egress(topo.back);
        common::install_backend_flow(&mut relay, topo.back);
        assert_eq!(relay.flow_placement().1, (1, 0), "in its port's slot");
        relay.expect(
            &common::backend_packet(),
            Some(topo.back),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        // Who may use the half is read from the slot too.
        let forged = udp_frame(
            (BACKEND, BACKEND_PORT + 1),
            (RELAY_BACK, FLOW_PORT),
            PAYLOAD,
        );
        relay.expect(
            &forged,
            Some(topo.back),
            Reason::DropSpoofedServer,
            XDP_DROP,
        );
        relay.expect(
            &common::backend_packet(),
            Some(topo.front),
            Reason::DropSpoofedServer,
            XDP_DROP,
        );
    });
}

#[test]
fn a_restarted_daemon_adopts_the_slots_and_drops_a_half_finished_replacement() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let input = frame(CLIENT_PORT, SESSION_PORT);
        let key = client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_001);
        // A replacement the earlier daemon published in the second slot
        // but never retired the first of, then a restart.
        let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
        let to = endpoints((RELAY_FRONT, FLOW_PORT), (NEAR_BACKEND, 7_002));
        let pair = forwarder_common::portslot::client_slot_pair(&common::CONFIG, SESSION_PORT);
        relay.write_client_slot(
            pair.unwrap()[1],
            ClientSlot::new(key, Rewrite::new(from, to)),
        );
        // A half in the hash map at another port, which keeps its bit.
        let other = SESSION_PORT + 1;
        client_half(&mut relay, CLIENT_PORT, other, 7_010);
        client_half(&mut relay, CLIENT_PORT + 1, other, 7_011);
        client_half(&mut relay, CLIENT_PORT + 2, other, 7_012);
        relay.readopt();
        assert_eq!(relay.flow_placement().0, (3, 1));
        assert!(relay.client_port_hashed(other));
        // The program read the first slot all along, and still does.
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_001);
        assert_eq!(
            forwarded_to(&relay, &frame(CLIENT_PORT + 2, other), topo.front),
            7_012
        );
        // Removed, the half is gone from both slots.
        relay.remove_client_flow(&key);
        relay.expect(&input, Some(topo.front), Reason::PassNoFlow, XDP_PASS);
        // The adopted dead slots are not rewritten at once: a new half
        // there goes to the hash map.
        client_half(&mut relay, CLIENT_PORT + 5, SESSION_PORT, 7_020);
        assert_eq!(relay.flow_placement().0, (2, 2));
        assert_eq!(
            forwarded_to(&relay, &frame(CLIENT_PORT + 5, SESSION_PORT), topo.front),
            7_020
        );
    });
}

/// The daemon replaces a half (slot to slot, slot to hash map and back, at
/// every pace around the grace period) while another CPU forwards its
/// packets: every packet comes out whole, rewritten by the old half or the
/// new one, never by a mix of them, and none finds no half.
#[test]
fn a_half_left_where_its_port_has_no_slot_moves_to_the_hash_map_when_adopted() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        // Where the side-by-side layout (before the slots were striped)
        // kept this port's second slot: no slot of the port now.
        let offset = u32::from(SESSION_PORT + 3 - common::CONFIG.session_port_lo);
        let old_index = 2 * offset + 1;
        let pair = forwarder_common::portslot::client_slot_pair(&common::CONFIG, SESSION_PORT + 3);
        assert!(!pair.unwrap().contains(&old_index));
        let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT + 3));
        let to = endpoints((RELAY_FRONT, FLOW_PORT), (NEAR_BACKEND, 7_030));
        let key = client_key((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT + 3));
        relay.write_client_slot(old_index, ClientSlot::new(key, Rewrite::new(from, to)));
        relay.readopt();
        assert_eq!(relay.flow_placement().0, (0, 1), "in the hash map");
        assert!(relay.client_port_hashed(SESSION_PORT + 3));
        let input = frame(CLIENT_PORT, SESSION_PORT + 3);
        assert_eq!(forwarded_to(&relay, &input, topo.front), 7_030);
        // The old slot is dead: removed, the half is gone.
        relay.remove_client_flow(&key);
        relay.expect(&input, Some(topo.front), Reason::PassNoFlow, XDP_PASS);
        assert!(!relay.client_port_hashed(SESSION_PORT + 3));
    });
}

#[test]
fn halves_replaced_while_packets_flow_are_never_read_half_written() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.add_egress(topo.front);
        let key = client_half(&mut relay, CLIENT_PORT, SESSION_PORT, 7_000);
        let input = frame(CLIENT_PORT, SESSION_PORT);
        let mut writer_table = relay.client_table();
        let done = std::sync::atomic::AtomicBool::new(false);
        let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
        let rewrites: Vec<Rewrite> = (0..4)
            .map(|n| {
                // Other addresses too, so a mix of two would show in the
                // checksums as well as the ports.
                let to = endpoints((RELAY_FRONT, FLOW_PORT + n), (NEAR_BACKEND, 7_000 + n));
                Rewrite::new(from, to)
            })
            .collect();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Paces below, at and above the grace period, a bounded number.
                for round in 0..40u64 {
                    let rewrite = rewrites[(round % 4) as usize];
                    writer_table.insert(key, rewrite).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(round % 5 * 40));
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            let mut runs = 0u32;
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Acquire) && runs < 2_000_000 {
                let run = relay.run(&input, Some(topo.front));
                assert_eq!(run.retval, XDP_TX, "run {runs}: no half found");
                let sport = u16::from_be_bytes([run.out[UDP], run.out[UDP + 1]]);
                let dport = u16::from_be_bytes([run.out[UDP + 2], run.out[UDP + 3]]);
                assert!(
                    (7_000..7_004).contains(&dport) && sport - FLOW_PORT == dport - 7_000,
                    "run {runs}: ports {sport} -> {dport} mix two halves"
                );
                common::table::assert_checksums_valid(&run.out);
                seen.insert(dport);
                runs += 1;
            }
            assert!(seen.len() >= 2, "the packets saw one half only: {seen:?}");
        });
    });
}
