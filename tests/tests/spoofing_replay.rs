//! An attacker on the client's segment attacks a live mosh session through
//! the relay: replays of the client's packets from its own address, forged
//! packets with a high clear-text sequence number, junk, packets spoofing
//! the client's address from other ports, and packets forged as the server.
//!
//! What must hold, and how it is proven:
//! - the session still works: a command typed afterwards comes back;
//! - the attacker gets nothing: neither its sockets nor a capture of its
//!   own interface see a single UDP datagram addressed to it;
//! - the client gets only what the server sent: every UDP datagram
//!   delivered to the client's address (captured on its switch port) carries
//!   a payload the server sent (captured on the server's interface; mosh
//!   datagrams carry a unique nonce, so equal payloads are the same
//!   datagram) with the server-to-client direction bit set;
//! - the server still follows the real client: the flow it answers is the
//!   client's own endpoint.

use std::collections::HashSet;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use forwarder_testbed::hostile::{
    ATTACKER_IF, ATTACKER_IP, SWITCH_CLIENT_PORT, client_segment_with_attacker,
};
use forwarder_testbed::raw::{Capture, Datagram, PacketSocket, mac_of, udp_datagrams, udp_frame};
use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{
    CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, RELAY_SERVER_IP, SERVER_IF,
    SERVER_IP,
};
use rand::Rng as _;

/// Everything the attacker's UDP sockets received.
fn drain(sockets: &[UdpSocket]) -> Vec<(SocketAddr, usize)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    for socket in sockets {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        for _ in 0..10_000 {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => got.push((from, n)),
                Err(_) => break,
            }
        }
    }
    got
}

#[test]
fn attacker_on_the_client_segment_cannot_hijack_or_inject() {
    let (topo, segment) = client_segment_with_attacker().unwrap();
    let m = MoshThroughRelay::start_on(topo, &[RELAY_CLIENT_IF, RELAY_SERVER_IF], &[]).unwrap();
    let relay_port = SocketAddrV4::new(RELAY_CLIENT_IP, m.session.port);
    let server_endpoint = SocketAddrV4::new(SERVER_IP, m.server.port);
    m.roundtrip("before").unwrap();

    // The attacker records the client's traffic (a mirror of its switch port).
    let recording = Capture::start(&segment.switch, SWITCH_CLIENT_PORT).unwrap();
    for round in 0..5 {
        m.roundtrip(&format!("recorded{round}")).unwrap();
    }
    let recorded: Vec<Datagram> = udp_datagrams(&recording.finish())
        .into_iter()
        .filter(|d| *d.src.ip() == CLIENT_IP && d.dst == relay_port)
        .collect();
    assert!(
        !recorded.is_empty(),
        "the recording holds no client datagrams"
    );
    let client_endpoint = recorded[0].src;

    // From here on, every datagram near the client, the server and the attacker is kept.
    let at_client = Capture::start(&segment.switch, SWITCH_CLIENT_PORT).unwrap();
    let at_server = Capture::start(&m.topo.server, SERVER_IF).unwrap();
    let at_attacker = Capture::start(&segment.attacker, ATTACKER_IF).unwrap();

    let sockets: Vec<UdpSocket> = [40_000u16, 40_001]
        .iter()
        .map(|&port| {
            segment
                .attacker
                .udp_bind(SocketAddr::from((ATTACKER_IP, port)))
                .unwrap()
        })
        .collect();
    let raw = PacketSocket::open(&segment.attacker, ATTACKER_IF).unwrap();
    let macs = (
        mac_of(&segment.attacker, ATTACKER_IF).unwrap(),
        mac_of(&m.topo.relay, RELAY_CLIENT_IF).unwrap(),
    );
    let upstream_port = m
        .relay
        .session(&m.session.id)
        .unwrap()
        .unwrap()
        .flows
        .iter()
        .find(|f| f.client == client_endpoint.to_string())
        .map(|f| f.upstream_port)
        .expect("the client's flow is listed");
    let mut rng = rand::rng();
    let mut sent = [0u32; 6];

    // 1. Replays from the attacker's own address.
    for datagram in &recorded {
        for socket in &sockets {
            socket.send_to(&datagram.payload, relay_port).unwrap();
            sent[0] += 1;
        }
    }
    // 2. A high clear-text sequence number (client direction) on random "ciphertext".
    for seq in 0..50u64 {
        let mut forged = (0x7fff_ffff_ffff_ff00u64 + seq).to_be_bytes().to_vec();
        forged.extend((0..rng.random_range(16..200)).map(|_| rng.random::<u8>()));
        sockets[0].send_to(&forged, relay_port).unwrap();
        sent[1] += 1;
    }
    // 3. Junk of every size, including empty datagrams.
    for len in (0..1400).step_by(7) {
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        sockets[1].send_to(&junk, relay_port).unwrap();
        sent[2] += 1;
    }
    // 4. The client's address from other ports: replays and junk.
    for offset in 1..=5u16 {
        let spoofed = SocketAddrV4::new(CLIENT_IP, client_endpoint.port().wrapping_add(offset));
        for datagram in recorded.iter().take(20) {
            raw.send(&udp_frame(macs, spoofed, relay_port, &datagram.payload))
                .unwrap();
            sent[3] += 1;
        }
        raw.send(&udp_frame(macs, spoofed, relay_port, b"junk"))
            .unwrap();
        sent[3] += 1;
    }
    // 5. The client's exact endpoint, replayed: the fast path carries it,
    //    the server must ignore it as old.
    for datagram in recorded.iter().take(50) {
        raw.send(&udp_frame(
            macs,
            client_endpoint,
            relay_port,
            &datagram.payload,
        ))
        .unwrap();
        sent[4] += 1;
    }
    // 6. Forged as the server, into the flow's upstream port from the client side.
    let upstream = SocketAddrV4::new(RELAY_SERVER_IP, upstream_port);
    for _ in 0..50 {
        let junk: Vec<u8> = (0..64).map(|_| rng.random()).collect();
        raw.send(&udp_frame(macs, server_endpoint, upstream, &junk))
            .unwrap();
        raw.send(&udp_frame(
            macs,
            SocketAddrV4::new(ATTACKER_IP, 40_002),
            upstream,
            &junk,
        ))
        .unwrap();
        sent[5] += 2;
    }
    println!(
        "attack sent: {} replays, {} high-sequence forgeries, {} junk, {} spoofed client ports, \
         {} exact-endpoint replays, {} forged server packets",
        sent[0], sent[1], sent[2], sent[3], sent[4], sent[5]
    );

    // The session survives, and the stragglers of the attack have landed.
    for round in 0..3 {
        m.roundtrip(&format!("after{round}")).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let attacker_received = drain(&sockets);
    let at_client = udp_datagrams(&at_client.finish());
    let at_server = udp_datagrams(&at_server.finish());
    let at_attacker = udp_datagrams(&at_attacker.finish());
    println!("captures closed in {:?}", started.elapsed());

    assert!(
        attacker_received.is_empty(),
        "the attacker's sockets received {attacker_received:?}"
    );
    let to_attacker: Vec<&Datagram> = at_attacker
        .iter()
        .filter(|d| *d.dst.ip() == ATTACKER_IP)
        .collect();
    assert!(
        to_attacker.is_empty(),
        "datagrams reached the attacker: {to_attacker:?}"
    );

    let from_server: HashSet<&[u8]> = at_server
        .iter()
        .filter(|d| d.src == server_endpoint)
        .map(|d| d.payload.as_slice())
        .collect();
    let to_client: Vec<&Datagram> = at_client
        .iter()
        .filter(|d| *d.dst.ip() == CLIENT_IP)
        .collect();
    assert!(
        !to_client.is_empty(),
        "the client got nothing after the attack"
    );
    for datagram in &to_client {
        assert_eq!(
            datagram.src, relay_port,
            "the client got a datagram not from its relay port: {datagram:?}"
        );
        assert_eq!(
            datagram.dst, client_endpoint,
            "a datagram went to another client port: {datagram:?}"
        );
        assert!(
            from_server.contains(datagram.payload.as_slice()),
            "the client got a payload the server never sent: {datagram:?}"
        );
        assert!(
            datagram.payload.len() >= 24 && datagram.payload[0] & 0x80 != 0,
            "{datagram:?}"
        );
    }
    println!(
        "client received {} datagrams, all sent by the server ({} server datagrams captured)",
        to_client.len(),
        from_server.len()
    );

    // The server still answers the client's own endpoint.
    let session = m.relay.session(&m.session.id).unwrap().unwrap();
    let current: Vec<&str> = session
        .flows
        .iter()
        .filter(|f| f.server_current)
        .map(|f| f.client.as_str())
        .collect();
    assert_eq!(
        current,
        [client_endpoint.to_string()],
        "flows: {:?}",
        session.flows
    );
    let stats = m.relay.stats().unwrap();
    let spoofed = stats["reasons"]["spoofed_server"]["packets"]
        .as_u64()
        .unwrap();
    assert!(
        spoofed >= u64::from(sent[5]),
        "forged server packets dropped in XDP: {spoofed} < {}",
        sent[5]
    );
}
