//! The CLI as scripts use it: `show`, exit codes a script can branch on,
//! `--json` documents with a schema version (errors included), and human
//! output without "1 pkts" or "604800s".

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::cmd::Output;
use forwarder_testbed::relay::unwrap_document;
use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, prereq};

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn exit_code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// A failed `--json` verb: its error document on stdout, and its exit code.
fn json_error(out: &Output) -> serde_json::Value {
    let document: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    assert_eq!(document["schema_version"], 1, "{document}");
    document["error"].clone()
}

#[test]
fn show_exit_codes_and_json_documents() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, Duration::from_secs(1)).unwrap());

    // show, by id and by port: the session with its flow.
    for target in [session.id.clone(), session.port.to_string()] {
        let out = relay.try_verb(&["show", &target, "--json"]).unwrap();
        assert!(out.success(), "{out:?}");
        let shown: forwarder_testbed::SessionInfo = serde_json::from_value(
            unwrap_document(serde_json::from_str(&out.stdout).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (shown.id.as_str(), shown.port),
            (session.id.as_str(), session.port)
        );
        assert_eq!(shown.flows.len(), 1, "{shown:?}");
        let text = relay.verb(&["show", &target]).unwrap();
        assert!(
            text.contains(&format!("session {}", session.id)) && text.contains("flow "),
            "{text}"
        );
        assert!(
            text.contains("expires after 7days idle"),
            "the timeout is not written as a duration: {text}"
        );
        assert!(
            !text.contains(" 1 pkts") && !text.contains("604800s"),
            "{text}"
        );
    }

    // Not found: exit 3, in text and in JSON.
    let missing = relay.try_verb(&["show", "deadbeef"]).unwrap();
    assert_eq!(exit_code(&missing), Some(3), "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("no session with id or port \"deadbeef\""),
        "{missing:?}"
    );
    assert!(
        !missing.stderr.contains(": not found"),
        "the typed failure leaks into the message: {missing:?}"
    );
    let missing = relay.try_verb(&["remove", "deadbeef", "--json"]).unwrap();
    assert_eq!(exit_code(&missing), Some(3), "{missing:?}");
    let error = json_error(&missing);
    assert_eq!(
        (error["kind"].as_str(), error["exit_code"].as_u64()),
        (Some("not_found"), Some(3)),
        "{error}"
    );

    // Backends the relay would forward to itself, and what is not supported yet.
    for (backend, says) in [
        (
            format!("{RELAY_CLIENT_IP}:60001"),
            "one of this relay's own addresses",
        ),
        ("127.0.0.1:60001".to_string(), "loopback"),
        // IPv6 backends are taken; this relay has no IPv6 route to one.
        (
            "[2001:db8::1]:60001".to_string(),
            "the relay has no route to backend 2001:db8::1",
        ),
        (
            "server.example:60001".to_string(),
            "host names are not supported yet",
        ),
        ("10.77.2.2:70000".to_string(), "out of range (1-65535)"),
    ] {
        let refused = relay.try_verb(&["add", "--backend", &backend]).unwrap();
        assert_eq!(exit_code(&refused), Some(1), "{refused:?}");
        assert!(refused.stderr.contains(says), "{backend}: {refused:?}");
    }

    // Usage errors are clap's 2.
    let usage = relay.try_verb(&["show"]).unwrap();
    assert_eq!(exit_code(&usage), Some(2), "{usage:?}");

    // Permission denied: 5.
    let denied = relay.try_verb_unprivileged(&["list", "--json"]).unwrap();
    assert_eq!(exit_code(&denied), Some(5), "{denied:?}");
    assert_eq!(json_error(&denied)["kind"], "permission_denied");

    // Every read verb's document carries the schema version.
    for verb in ["list", "stats"] {
        let out = relay.try_verb(&[verb, "--json"]).unwrap();
        let document: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(document["schema_version"], 1, "{verb}: {document}");
    }
    let stats = relay.stats().unwrap();
    assert!(
        stats["datapath"].is_string() && stats.get("xdp_mode").is_none(),
        "{stats}"
    );
    let listed = relay.sessions().unwrap();
    assert!(listed[0].idle_ms < 60_000, "{listed:?}");

    // The daemon gone: 4.
    let mut relay = relay;
    relay.terminate().unwrap();
    let down = relay.try_verb(&["list", "--json"]).unwrap();
    assert_eq!(exit_code(&down), Some(4), "{down:?}");
    assert_eq!(json_error(&down)["kind"], "daemon_not_running");
    drop(echo);
}
