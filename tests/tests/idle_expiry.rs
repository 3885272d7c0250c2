//! Idle flows expire after `--flow-idle-timeout`, idle sessions after their
//! own `--idle-timeout`, in that order.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, prereq};

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

#[test]
fn idle_flows_then_idle_sessions_expire() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--flow-idle-timeout", "3s"],
    )
    .unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &["--idle-timeout", "6s"]).unwrap();

    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, Duration::from_secs(1)).unwrap());
    for _ in 0..3 {
        assert!(pinger.ping_any(3, Duration::from_secs(1)).unwrap());
    }
    let listed = relay.session(&session.id).unwrap().expect("session listed");
    assert_eq!(listed.flows.len(), 1, "{listed:?}");

    // Traffic has stopped. The flow goes first, while the session is still there.
    relay
        .wait_until(
            "the flow to expire while the session remains",
            Duration::from_secs(20),
            |s| {
                s.iter()
                    .find(|s| s.id == session.id && s.flows.is_empty())
                    .map(|_| ())
            },
        )
        .unwrap();
    relay
        .wait_until("the session to expire", Duration::from_secs(30), |s| {
            (!s.iter().any(|s| s.id == session.id)).then_some(())
        })
        .unwrap();
}
