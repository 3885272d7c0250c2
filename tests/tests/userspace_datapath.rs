//! `--datapath userspace`: the same sessions and flows, every packet carried
//! by the daemon's sockets (for hosts where XDP cannot be used).

use std::time::Duration;

use forwarder_testbed::scenario::MoshThroughRelay;

#[test]
fn mosh_session_runs_on_the_userspace_datapath() {
    let m = MoshThroughRelay::start(&["--datapath", "userspace"]).unwrap();
    m.roundtrip("user").unwrap();
    let stats = m.relay.stats().unwrap();
    assert_eq!(stats["datapath"], "userspace", "{stats}");

    let flow = m
        .relay
        .wait_until(
            "a flow carried both ways by the daemon",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.id == m.session.id)?;
                s.flows
                    .iter()
                    .find(|f| f.packets_to_client > 0 && f.packets_to_server > 1)
                    .cloned()
            },
        )
        .unwrap();
    assert_eq!(
        flow.fast_path_packets, 0,
        "no XDP program is loaded: {flow:?}"
    );
    assert_eq!(
        flow.slow_path_packets,
        flow.packets_to_server + flow.packets_to_client,
        "every packet went through the daemon: {flow:?}"
    );
}
