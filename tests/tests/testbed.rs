//! Checks of the testbed itself, without the forwarder daemon: the relay
//! namespace forwards as a plain kernel router. If these fail, the other
//! integration tests' failures say nothing about forwarder.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::scenario::{MOSH_SERVER_PORT, roundtrip, wait_for_shell};
use forwarder_testbed::topology::{CLIENT_IP, CLIENT_ROAM_IP, SERVER_IP};
use forwarder_testbed::{MoshClient, MoshServer, Netns, Topology, UdpEcho, UdpPinger, prereq};

#[test]
fn namespaces_are_removed_on_drop() {
    prereq::require().unwrap();
    let ns = Netns::new("probe").unwrap();
    let name = ns.name().to_owned();
    assert!(ns.path().exists());
    drop(ns);
    assert!(
        !std::path::Path::new("/run/netns").join(&name).exists(),
        "{name} still exists after drop"
    );
}

#[test]
fn topology_routes_through_relay() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    topo.check_connectivity().unwrap();
}

#[test]
fn udp_echo_through_kernel_forwarding() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let server = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 7000));
    let echo = UdpEcho::start(&topo.server, server).unwrap();
    let bind = SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, 0));
    let mut pinger = UdpPinger::new(&topo.client, bind, server).unwrap();
    assert!(pinger.ping_any(5, Duration::from_secs(1)).unwrap());
    assert!(echo.echoed() >= 1);
}

#[test]
fn mosh_direct_through_kernel_forwarding_and_roaming() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let server = MoshServer::start(&topo.server, SERVER_IP, MOSH_SERVER_PORT).unwrap();
    let client = MoshClient::start(&topo.client, SERVER_IP, server.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "direct").unwrap();
    // The roaming helper must move mosh-client's source address; mosh-server follows.
    topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
}
