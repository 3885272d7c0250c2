//! A daemon killed with SIGKILL comes back to its IPv6 and translated flows
//! as it does to IPv4 ones: the pinned data plane forwards them while it is
//! down, and the restarted daemon adopts every half of every family (IPv6,
//! IPv6 to IPv4, IPv4 to IPv6) with the same ports Q, none re-learned.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use forwarder_testbed::topology::{
    CLIENT_IP, CLIENT_IP6, RELAY_CLIENT_IP, RELAY_CLIENT_IP6, SERVER_IP, SERVER_IP6, Stack,
};
use forwarder_testbed::{Relay, SessionInfo, Topology, UdpEcho, UdpPinger, prereq};

const PROBE_WAIT: Duration = Duration::from_secs(1);

/// A session's id and backend, and its flows' (client, upstream port).
type Shape = (String, String, Vec<(String, u16)>);

/// What a restart keeps: sessions and their flows, not counters.
fn shape(sessions: &[SessionInfo]) -> BTreeSet<Shape> {
    sessions
        .iter()
        .map(|s| {
            let mut flows: Vec<(String, u16)> = s
                .flows
                .iter()
                .map(|f| (f.client.clone(), f.upstream_port))
                .collect();
            flows.sort();
            (s.id.clone(), s.backend.clone(), flows)
        })
        .collect()
}

/// Packets of every flow the daemon carried itself.
fn slow_path_packets(sessions: &[SessionInfo]) -> Vec<(String, u64)> {
    let mut slow: Vec<(String, u64)> = sessions
        .iter()
        .flat_map(|s| s.flows.iter())
        .map(|f| (f.client.clone(), f.slow_path_packets))
        .collect();
    slow.sort();
    slow
}

#[test]
fn ipv6_and_translated_flows_survive_a_sigkill_restart_in_xdp() {
    prereq::require().unwrap();
    let topo = Topology::dual_stack(Stack::Dual, Stack::Dual).unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    // (client's address, the relay address it sends to, the server's echo).
    let kinds: [(SocketAddr, SocketAddr, SocketAddr); 3] = [
        // IPv6 to IPv6.
        (
            (CLIENT_IP6, 0).into(),
            (RELAY_CLIENT_IP6, 0).into(),
            (SERVER_IP6, 7001).into(),
        ),
        // An IPv6 client to an IPv4 server, translated.
        (
            (CLIENT_IP6, 0).into(),
            (RELAY_CLIENT_IP6, 0).into(),
            (SERVER_IP, 7002).into(),
        ),
        // An IPv4 client to an IPv6 server, translated.
        (
            (CLIENT_IP, 0).into(),
            (RELAY_CLIENT_IP, 0).into(),
            (SERVER_IP6, 7003).into(),
        ),
    ];
    let mut echoes = Vec::new();
    let mut pingers = Vec::new();
    for (client, relay_addr, server) in kinds {
        let echo = UdpEcho::start(&topo.server, server).unwrap();
        let session = relay.add(echo.addr, &[]).unwrap();
        let to = SocketAddr::new(relay_addr.ip(), session.port);
        let mut pinger = UdpPinger::new(&topo.client, client, to).unwrap();
        assert!(
            pinger.ping_any(10, PROBE_WAIT).unwrap(),
            "no echo from {server} through {to}"
        );
        echoes.push(echo);
        pingers.push(pinger);
    }
    // Established: the next echoes are the kernel's alone.
    let before = relay.sessions().unwrap();
    assert_eq!(before.len(), 3);
    assert!(before.iter().all(|s| s.flows.len() == 1), "{before:?}");
    for pinger in &mut pingers {
        assert!(pinger.ping_any(3, PROBE_WAIT).unwrap());
    }

    relay.kill9().unwrap();
    for (pinger, (_, _, server)) in pingers.iter_mut().zip(kinds) {
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "the pinned data plane stopped forwarding to {server} while the daemon was down"
        );
    }
    relay.restart().unwrap();
    let log = relay.log();
    assert!(
        !log.contains("pinned flow removed")
            && !log.contains("pinned backend half without its flow"),
        "not every half was adopted; the daemon's log:\n{log}"
    );
    let after = relay.sessions().unwrap();
    assert_eq!(
        shape(&after),
        shape(&before),
        "sessions or flows changed across the restart"
    );
    for pinger in &mut pingers {
        assert!(pinger.ping_any(3, PROBE_WAIT).unwrap());
    }
    let after = relay.sessions().unwrap();
    // The daemon's own counters start again at a restart: anything on
    // them now it carried since, which an adopted flow never needs.
    assert!(
        slow_path_packets(&after).iter().all(|(_, slow)| *slow == 0),
        "the daemon carried datagrams of adopted flows: {after:?}"
    );
    assert!(
        after
            .iter()
            .flat_map(|s| s.flows.iter())
            .all(|f| f.answered && f.fast_path_packets >= 6),
        "adopted flows are established and in XDP: {after:?}"
    );
}
