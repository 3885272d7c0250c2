//! Gateway mode: LAN hosts ask the router for mappings with the real
//! clients (Debian's natpmpc and miniupnpc) and with a PCP request built
//! here; stock mosh from the WAN host reaches the LAN server through each
//! mapping, a second LAN host reaches it through the WAN address (hairpin),
//! and the gateway never answers on the WAN side.

use std::time::Duration;

use forwarder_testbed::gateway::*;
use forwarder_testbed::prereq;
use forwarder_testbed::relay::Relay;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::{MoshClient, MoshServer};

fn start() -> (GatewayTopology, Relay) {
    prereq::require().unwrap();
    let topo = GatewayTopology::new().unwrap();
    let relay = Relay::start(&topo.router, &topo.ifaces(), &topo.relay_args(&[])).unwrap();
    (topo, relay)
}

/// natpmpc maps the LAN server's mosh port; stock mosh from the WAN host
/// works through it, forwarded by XDP.
#[test]
fn natpmpc_mapping_carries_mosh() {
    let (topo, relay) = start();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60001).unwrap();
    let mapping = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60001, server.port, 3600).unwrap();
    assert_eq!(mapping.public_ip, Some(ROUTER_WAN_IP), "{mapping:?}");
    assert_eq!(
        mapping.public_port, 60001,
        "the suggested port was free: {mapping:?}"
    );
    assert_eq!(mapping.lifetime, 3600);
    let sessions = relay.sessions().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s.port == mapping.public_port
                && s.backend == format!("{LAN1_IP}:{}", server.port)),
        "no session for the mapping: {sessions:?}"
    );
    let client =
        MoshClient::start(&topo.wan, ROUTER_WAN_IP, mapping.public_port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "natpmp").unwrap();
    relay
        .wait_until(
            "fast-path packets on the mapping",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.port == mapping.public_port)?;
                s.flows
                    .iter()
                    .find(|f| f.fast_path_packets > 0 && f.packets_to_client > 0)
                    .cloned()
            },
        )
        .unwrap();
}
