//! After `forwarder remove`, nothing is forwarded for that session any more,
//! neither by XDP nor by the daemon.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, prereq};

const PROBE_WAIT: Duration = Duration::from_secs(1);

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Removes one session by id and another by port; each stops answering while
/// it was answering just before.
#[test]
fn remove_stops_forwarding() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();

    for by in ["id", "port"] {
        let session = relay.add(echo.addr, &[]).unwrap();
        let mut pinger = UdpPinger::new(
            &topo.client,
            v4(CLIENT_IP, 0),
            v4(RELAY_CLIENT_IP, session.port),
        )
        .unwrap();
        assert!(
            pinger.ping_any(10, PROBE_WAIT).unwrap(),
            "no echo through session {session:?} before removing it"
        );
        // More than one round trip, so the flow is installed in the maps too.
        for _ in 0..5 {
            assert!(pinger.ping_any(3, PROBE_WAIT).unwrap());
        }

        let target = match by {
            "id" => session.id.clone(),
            _ => session.port.to_string(),
        };
        relay.remove(&target).unwrap();
        let echoed_before = echo.echoed();
        assert!(
            relay.session(&session.id).unwrap().is_none(),
            "session still listed after `forwarder remove {target}`"
        );
        for i in 0..5 {
            assert!(
                !pinger.ping(PROBE_WAIT).unwrap(),
                "probe {i} still echoed after `forwarder remove {target}` (removed by {by})"
            );
        }
        assert_eq!(
            echo.echoed(),
            echoed_before,
            "the server still received probes after `forwarder remove {target}`"
        );
    }
}
