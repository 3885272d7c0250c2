//! A mosh server behind a NAT (masquerade with random ports, stateful
//! filtering) reached through the relay with the punch handshake and the
//! `forwarder mosh-server` wrapper: the session works, survives the NAT's
//! idle timeout thanks to keepalives, carries both directions of its
//! current client in XDP, follows a roaming client, and ignores spoofed
//! and replayed client packets (also replays of datagrams only XDP saw,
//! whose sequence numbers XDP recorded); a replayed punch request and a
//! wrong secret are refused.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::capture::Capture;
use forwarder_testbed::nat::{
    NAT_PUBLIC_IP, NAT_SERVER_IP, NatTopology, PUNCH_PORT, SERVER_IF, random_secret,
};
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::topology::{CLIENT_IF, CLIENT_IP, CLIENT_ROAM_IP, RELAY_CLIENT_IP};
use forwarder_testbed::{FlowInfo, MoshClient, MoshServer, Relay, prereq};

fn flow_from<'a>(flows: &'a [FlowInfo], ip: &str) -> Option<&'a FlowInfo> {
    flows
        .iter()
        .find(|f| f.client.starts_with(&format!("{ip}:")))
}

fn secret_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

fn slow_path(relay: &Relay, counter: &str) -> u64 {
    relay.stats().unwrap()["slow_path"][counter]
        .as_u64()
        .unwrap_or(0)
}

/// The session's one flow, which must be from `ip`.
fn current_flow(relay: &Relay, ip: &str) -> FlowInfo {
    let sessions = relay.sessions().unwrap();
    flow_from(&sessions[0].flows, ip)
        .unwrap_or_else(|| panic!("no flow from {ip}: {sessions:?}"))
        .clone()
}

/// A round trip whose client-to-server datagrams all go through the
/// current endpoint's client half in XDP: its counter grows, and the
/// daemon forwards nothing to the server meanwhile.
fn roundtrip_in_kernel(relay: &Relay, client: &MoshClient, ip: &str, text: &str) {
    let daemon_before = slow_path(relay, "forwarded_to_server");
    let before = current_flow(relay, ip);
    roundtrip(client, text).unwrap();
    let after = current_flow(relay, ip);
    assert!(
        after.packets_to_server > before.packets_to_server
            && after.fast_path_packets > before.fast_path_packets,
        "the client half forwarded nothing: {before:?} -> {after:?}"
    );
    assert_eq!(
        slow_path(relay, "forwarded_to_server"),
        daemon_before,
        "client datagrams of the current endpoint went through the daemon"
    );
}

#[test]
fn mosh_behind_nat_roams_and_refuses_spoofs_and_replays() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    // mosh-server sends nothing until a client comes: only the relay's
    // keepalives can hold the mapping open past this.
    topo.set_udp_mapping_timeout(3).unwrap();
    let secret = secret_file(&random_secret());
    let secret_path = secret.path().to_str().unwrap();
    let relay = topo
        .start_relay(secret.path(), &["--punch-keepalive", "1s"])
        .unwrap();
    let relay_punch = topo.punch_endpoint();
    let punches = Capture::start(
        &topo.server,
        SERVER_IF,
        &format!("udp dst port {PUNCH_PORT}"),
    )
    .unwrap();
    let (server, wrapped) = MoshServer::start_wrapped(
        &topo.server,
        &["--relay", &relay_punch, "--secret-file", secret_path],
    )
    .unwrap();
    assert_eq!(wrapped.ip, RELAY_CLIENT_IP, "MOSH IP must be --public-addr");
    eprintln!("wrapper said: {}", wrapped.stderr.trim());

    let sessions = relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = sessions[0].clone();
    assert_eq!(
        session.port, server.port,
        "MOSH CONNECT names the relay's client-facing port"
    );
    let backend: SocketAddrV4 = session.backend.parse().unwrap();
    assert_eq!(
        *backend.ip(),
        NAT_PUBLIC_IP,
        "the relay sees the server as the NAT"
    );
    let nat = session.nat.clone().expect("a punched session says so");
    assert!(nat.bound && nat.key_received, "{nat:?}");
    let requests = punches.udp().unwrap();
    let local_port = requests
        .first()
        .expect("the wrapper's punch request was captured")
        .from
        .port();
    assert_eq!(*requests[0].from.ip(), NAT_SERVER_IP);
    assert_ne!(
        backend.port(),
        local_port,
        "the NAT rewrote the server's port"
    );

    std::thread::sleep(Duration::from_secs(7));

    let client_packets = Capture::start(
        &topo.client,
        CLIENT_IF,
        &format!("udp dst port {}", server.port),
    )
    .unwrap();
    let client = MoshClient::start(&topo.client, wrapped.ip, server.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "nat").unwrap();
    let first = relay
        .wait_until(
            "the client's flow to carry server packets on the fast path",
            Duration::from_secs(20),
            |s| {
                flow_from(&s.first()?.flows, &CLIENT_IP.to_string())
                    .filter(|f| f.fast_path_packets > 0 && f.server_current)
                    .cloned()
            },
        )
        .unwrap();

    // From here on the client's datagrams reach the server through XDP
    // alone: the daemon never sees them.
    let kernel_only = Capture::start(
        &topo.client,
        CLIENT_IF,
        &format!("udp dst port {}", server.port),
    )
    .unwrap();
    roundtrip_in_kernel(&relay, &client, &CLIENT_IP.to_string(), "kernel");

    // Spoofs from another endpoint: first replays of what only XDP
    // forwarded (refused by the sequence numbers XDP recorded), then junk,
    // and every real client packet so far, replayed.
    let attacker = topo
        .client
        .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
        .unwrap();
    let relay_port = SocketAddr::from((RELAY_CLIENT_IP, server.port));
    let unseen = kernel_only.udp().unwrap();
    assert!(
        !unseen.is_empty(),
        "the client's datagrams forwarded in XDP were captured"
    );
    let refused_before = slow_path(&relay, "dropped_unverified_client");
    for packet in &unseen {
        attacker.send_to(&packet.payload, relay_port).unwrap();
    }
    relay
        .wait_until(
            "the daemon to refuse every replay of a datagram only XDP forwarded",
            Duration::from_secs(10),
            |_| {
                (slow_path(&relay, "dropped_unverified_client")
                    >= refused_before + unseen.len() as u64)
                    .then_some(())
            },
        )
        .unwrap();
    assert_eq!(
        current_flow(&relay, &CLIENT_IP.to_string()).client,
        first.client,
        "a replay of a datagram XDP forwarded moved the session"
    );
    let captured = client_packets.udp().unwrap();
    assert!(
        captured.len() >= 3,
        "mosh-client's packets were captured: {captured:?}"
    );
    for junk in [vec![0u8; 60], vec![0xa5; 200]] {
        attacker.send_to(&junk, relay_port).unwrap();
    }
    for packet in &captured {
        attacker.send_to(&packet.payload, relay_port).unwrap();
    }
    roundtrip(&client, "unmoved").unwrap();
    let sessions = relay.sessions().unwrap();
    assert_eq!(sessions[0].flows.len(), 1, "{sessions:?}");
    assert_eq!(
        sessions[0].flows[0].client, first.client,
        "a spoof moved the session"
    );
    assert!(
        slow_path(&relay, "dropped_unverified_client")
            >= refused_before + unseen.len() as u64 + captured.len() as u64 + 2
    );
    let rejected = sessions[0].nat.as_ref().unwrap().rejected_packets;
    assert!(
        rejected >= unseen.len() as u64 + captured.len() as u64 + 2,
        "{rejected} rejected"
    );
    attacker
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "the spoofer received something from the relay"
    );

    // A real roam: the client's address changes, the verified packets move the session.
    topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    relay
        .wait_until(
            "the session to follow the client's new address",
            Duration::from_secs(20),
            |s| {
                flow_from(&s.first()?.flows, &CLIENT_ROAM_IP.to_string())
                    .filter(|f| f.server_current)
                    .cloned()
            },
        )
        .unwrap();
    assert!(slow_path(&relay, "nat_client_moves") >= 1);
    roundtrip(&client, "again").unwrap();
    // The old endpoint's client half went with the move, the new one's
    // carries the client's datagrams.
    roundtrip_in_kernel(
        &relay,
        &client,
        &CLIENT_ROAM_IP.to_string(),
        "kernel-roamed",
    );
    let flows = relay.sessions().unwrap()[0].flows.clone();
    assert_eq!(flows.len(), 1, "{flows:?}");

    // The wrapper's Allocate, replayed from the server: refused, nothing changes.
    let replayer = topo
        .server
        .udp_bind(SocketAddr::from((NAT_SERVER_IP, 0)))
        .unwrap();
    replayer
        .send_to(&requests[0].payload, relay_punch.as_str())
        .unwrap();
    // A wrong secret: the wrapper says so.
    let wrong = secret_file("not-the-relay-secret-at-all-0000");
    let error = MoshServer::start_wrapped(
        &topo.server,
        &[
            "--relay",
            &relay_punch,
            "--secret-file",
            wrong.path().to_str().unwrap(),
        ],
    )
    .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("refused") && message.contains("secret"),
        "{message}"
    );
    let log = relay.log();
    assert!(
        log.contains("punch request refused") && log.contains("a replay of a request already seen"),
        "{log}"
    );
    assert!(log.contains("the HMAC does not verify"), "{log}");
    assert_eq!(
        relay.sessions().unwrap().len(),
        1,
        "a refused request created a session"
    );
}

#[test]
fn wrapper_says_which_step_got_no_answer() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let secret = secret_file(&random_secret());
    let wrapper_args = [
        "--relay",
        &topo.punch_endpoint(),
        "--secret-file",
        secret.path().to_str().unwrap(),
        "--timeout",
        "2s",
    ];

    // No relay is running: nothing answers on the punch port.
    let error = format!(
        "{:#}",
        MoshServer::start_wrapped(&topo.server, &wrapper_args).unwrap_err()
    );
    assert!(error.contains("is it running with --punch-port"), "{error}");

    // The relay answers, but a firewall drops everything coming from its flow ports.
    let relay = topo.start_relay(secret.path(), &[]).unwrap();
    topo.nat
        .run(
            "nft",
            &[
                "insert",
                "rule",
                "ip",
                "fwdnat",
                "forward",
                "udp",
                "sport",
                "61000-61999",
                "drop",
            ],
        )
        .unwrap();
    let error = format!(
        "{:#}",
        MoshServer::start_wrapped(&topo.server, &wrapper_args).unwrap_err()
    );
    assert!(error.contains("nothing came back from"), "{error}");
    let sessions = relay.sessions().unwrap();
    let nat = sessions[0].nat.clone().unwrap();
    assert!(
        !nat.key_received,
        "mosh-server must not start without a working path: {nat:?}"
    );
}

#[test]
fn punched_session_works_on_the_userspace_datapath() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let secret = secret_file(&random_secret());
    let relay = topo
        .start_relay(secret.path(), &["--datapath", "userspace"])
        .unwrap();
    let (server, wrapped) = MoshServer::start_wrapped(
        &topo.server,
        &[
            "--relay",
            &topo.punch_endpoint(),
            "--secret-file",
            secret.path().to_str().unwrap(),
        ],
    )
    .unwrap();
    let client = MoshClient::start(&topo.client, wrapped.ip, server.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "userspace").unwrap();
    let sessions = relay.sessions().unwrap();
    let flow = &sessions[0].flows[0];
    assert!(
        flow.slow_path_packets > 0 && flow.fast_path_packets == 0,
        "{flow:?}"
    );
}
