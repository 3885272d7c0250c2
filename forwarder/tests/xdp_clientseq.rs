//! Punched sessions' client sequence numbers: a client half flagged
//! `REWRITE_RECORD_CLIENT_SEQ` raises its session's `CLIENT_SEQS` slot to
//! the nonce (the first 8 payload bytes, big endian) of every
//! client-to-server datagram it forwards, in every family; older nonces,
//! server-direction nonces, short payloads and unflagged halves leave it
//! as it is. The shared fixture is in `common/`.

mod common;

use common::namespace::{Namespace, Topology};
use common::six::{self, Shape};
use common::{
    BACKEND, BACKEND_PORT, CLIENT, CLIENT_PORT, RELAY_BACK, RELAY_FRONT, Relay, SESSION_PORT,
    XDP_REDIRECT, client_key, client_with, endpoints, install_client_flow, udp_frame,
};
use forwarder_common::clientseq::DIRECTION_BIT;
use forwarder_common::config::map_names;
use forwarder_common::flow::REWRITE_RECORD_CLIENT_SEQ;
use forwarder_common::{Reason, Rewrite};

/// A mosh-like datagram: the nonce, then 32 bytes standing for ciphertext and tag.
fn datagram(nonce: u64) -> Vec<u8> {
    let mut payload = nonce.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0x5a; 32]);
    payload
}

fn recorded(relay: &Relay, port: u16) -> u64 {
    relay.array_u64(map_names::CLIENT_SEQS, u32::from(port))
}

/// Forwards `payload` through the client half and returns the record after.
fn forward(relay: &Relay, topo: Topology, frame: &[u8]) -> u64 {
    relay.expect(
        frame,
        Some(topo.front),
        Reason::RedirectForwarded,
        XDP_REDIRECT,
    );
    recorded(relay, SESSION_PORT)
}

#[test]
fn ipv4_client_half_records_the_newest_client_nonce() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        let key = install_client_flow(&mut relay, (BACKEND, BACKEND_PORT));
        let mut flagged = relay.client_flow(&key);
        flagged.flags |= REWRITE_RECORD_CLIENT_SEQ;
        relay.add_client_flow(key, flagged);
        relay.add_egress(topo.back);
        assert_eq!(recorded(&relay, SESSION_PORT), 0, "nothing recorded yet");

        let send = |payload: &[u8]| forward(&relay, topo, &client_with(payload));
        assert_eq!(send(&datagram(5)), 5, "a first nonce is recorded");
        assert_eq!(send(&datagram(9)), 9, "a newer one raises it");
        assert_eq!(
            send(&datagram(7)),
            9,
            "an older one is forwarded, not recorded"
        );
        assert_eq!(send(&datagram(9)), 9, "the same again changes nothing");
        assert_eq!(
            send(&datagram(DIRECTION_BIT | 1_000)),
            9,
            "a server-to-client nonce is no client's"
        );
        assert_eq!(
            send(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            9,
            "seven payload bytes hold no nonce"
        );
        // Ethernet padding behind an empty datagram is no nonce either.
        let mut padded = client_with(&[]);
        padded.extend_from_slice(&[0x7f; 18]);
        assert_eq!(forward(&relay, topo, &padded), 9, "padding is not payload");
        assert_eq!(send(&datagram(DIRECTION_BIT - 1)), DIRECTION_BIT - 1);

        // An ordinary flow's client half (no flag) records nothing.
        let other_port = SESSION_PORT + 1;
        let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, other_port));
        let to = endpoints((RELAY_BACK, 61_002), (BACKEND, BACKEND_PORT));
        relay.add_client_flow(
            client_key((CLIENT, CLIENT_PORT), (RELAY_FRONT, other_port)),
            Rewrite::new(from, to),
        );
        relay.expect(
            &udp_frame(
                (CLIENT, CLIENT_PORT),
                (RELAY_FRONT, other_port),
                &datagram(77),
            ),
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        assert_eq!(
            recorded(&relay, other_port),
            0,
            "unflagged halves record nothing"
        );
        assert_eq!(recorded(&relay, SESSION_PORT), DIRECTION_BIT - 1);
    });
}

#[test]
fn ipv6_and_translated_client_halves_record_too() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        for shape in [Shape::Six, Shape::SixToFour, Shape::FourToSix] {
            let mut relay = Relay::load();
            let ((client, facing), (upstream, backend)) = (shape.client(), shape.backend());
            six::install_client_half_flagged(
                &mut relay,
                client,
                facing,
                upstream,
                backend,
                REWRITE_RECORD_CLIENT_SEQ,
            );
            relay.add_egress(topo.back);
            let send =
                |nonce: u64| forward(&relay, topo, &six::frame(client, facing, &datagram(nonce)));
            assert_eq!(send(3), 3, "{shape:?}: recorded");
            assert_eq!(send(2), 3, "{shape:?}: older forwarded, not recorded");
            assert_eq!(send(DIRECTION_BIT | 8), 3, "{shape:?}: server direction");
            assert_eq!(send(4), 4, "{shape:?}: raised");
            assert_eq!(
                forward(&relay, topo, &six::frame(client, facing, &[0x11; 4])),
                4,
                "{shape:?}: short payload"
            );
        }
    });
}
