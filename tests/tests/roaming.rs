//! mosh roaming through the forwarder: the client's address changes, the relay
//! opens a new flow for it, and mosh-server moves its replies to that flow.

use std::time::Duration;

use forwarder_testbed::FlowInfo;
use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{CLIENT_IP, CLIENT_ROAM_IP};

fn flow_from<'a>(flows: &'a [FlowInfo], ip: &str) -> Option<&'a FlowInfo> {
    flows
        .iter()
        .find(|f| f.client.starts_with(&format!("{ip}:")))
}

#[test]
fn mosh_roams_to_a_new_client_address() {
    let m = MoshThroughRelay::start(&[]).unwrap();
    m.roundtrip("before").unwrap();
    let old = m
        .relay
        .wait_until(
            "the first flow to get replies",
            Duration::from_secs(20),
            |s| {
                let s = s.iter().find(|s| s.id == m.session.id)?;
                flow_from(&s.flows, &CLIENT_IP.to_string())
                    .filter(|f| f.packets_to_client > 0)
                    .cloned()
            },
        )
        .unwrap();

    m.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    m.roundtrip("roamed").unwrap();

    let roam_ip = CLIENT_ROAM_IP.to_string();
    let new = m
        .relay
        .wait_until(
            "a flow from the new address that gets server traffic",
            Duration::from_secs(20),
            |s| {
                let s = s.iter().find(|s| s.id == m.session.id)?;
                flow_from(&s.flows, &roam_ip)
                    .filter(|f| f.packets_to_client > 0)
                    .cloned()
            },
        )
        .unwrap();
    assert_ne!(
        new.upstream_port, old.upstream_port,
        "each flow must have its own backend-facing port"
    );

    // Replies keep going to the new flow, and the daemon knows it is the one
    // the server follows.
    m.roundtrip("again").unwrap();
    m.relay
        .wait_until(
            "the new flow's packets_to_client to grow and it to be server_current",
            Duration::from_secs(20),
            |s| {
                let s = s.iter().find(|s| s.id == m.session.id)?;
                flow_from(&s.flows, &roam_ip)
                    .filter(|f| f.packets_to_client > new.packets_to_client && f.server_current)
                    .cloned()
            },
        )
        .unwrap();
}
