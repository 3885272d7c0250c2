//! A real mosh session through the forwarder: the shell answers, and once the
//! flow is set up its packets are forwarded by XDP, not by the daemon.

use std::time::Duration;

use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{CLIENT_IP, SERVER_IP};

#[test]
fn mosh_session_runs_on_the_fast_path() {
    let m = MoshThroughRelay::start(&[]).unwrap();
    m.roundtrip("fwd").unwrap();

    let session = m
        .relay
        .session(&m.session.id)
        .unwrap()
        .unwrap_or_else(|| panic!("session {} missing from `forwarder list`", m.session.id));
    assert_eq!(session.port, m.session.port);
    assert_eq!(session.backend, format!("{SERVER_IP}:{}", m.server.port));

    // mosh keeps sending (keystroke acks, then heartbeats every 3 s), so this
    // only waits for the counters to reflect what already happened.
    let flow = m
        .relay
        .wait_until(
            "a flow with fast-path packets and packets to the client",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.id == m.session.id)?;
                s.flows
                    .iter()
                    .find(|f| f.fast_path_packets > 0 && f.packets_to_client > 0)
                    .cloned()
            },
        )
        .unwrap();
    assert!(
        flow.client.starts_with(&format!("{CLIENT_IP}:")),
        "flow client {} is not the mosh-client's address",
        flow.client
    );
    assert!(flow.packets_to_server > 0, "{flow:?}");

    // Counted by XDP is not delivered: type again now that the flow is in the
    // maps, so this round trip can only succeed through the fast path.
    m.roundtrip("fast").unwrap();
    let after = m
        .relay
        .wait_until(
            "more fast-path packets after the second command",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.id == m.session.id)?;
                s.flows
                    .iter()
                    .find(|f| {
                        f.client == flow.client && f.fast_path_packets > flow.fast_path_packets
                    })
                    .map(|_| s.flows.clone())
            },
        )
        .unwrap();
    // mosh-client only moves to a new source port when replies stop coming.
    assert_eq!(
        after.len(),
        1,
        "the client hopped ports, so replies were lost: {after:?}"
    );
}
