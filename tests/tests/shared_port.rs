//! One UDP port for every keyed session (`forwarder run --shared-port`):
//! two real mosh-servers, their sessions added with the keys their `MOSH
//! CONNECT` lines printed (one from a file, one on standard input), two real
//! mosh-clients talking to the one shared port.
//!
//! What must hold, and how it is proven:
//! - both sessions work through the shared port, and their flows there run
//!   in XDP (fast-path counters grow) like any flow;
//! - both roam: the client's address changes, each client's new endpoint is
//!   matched to its own session by key, and typing shows output again;
//! - datagrams captured from a real session and replayed from a new
//!   endpoint, random bytes, and a valid-looking header with a wrong tag
//!   create no flow (`show --json`) and are counted (`stats --json`);
//! - a session without a key is not reachable through the shared port: a
//!   real mosh-client with its key gets no flow there;
//! - the keys appear in no output and no log.

use std::io::Write as _;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use forwarder_testbed::cmd::SHORT;
use forwarder_testbed::raw::{Capture, udp_datagrams};
use forwarder_testbed::relay::unwrap_document;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::topology::{
    CLIENT_IF, CLIENT_IP, CLIENT_ROAM_IP, RELAY_CLIENT_IP, SERVER_IP, Topology,
};
use forwarder_testbed::{FlowInfo, MoshClient, MoshServer, Relay, SessionInfo, prereq};
use serde_json::Value;
use wait_timeout::ChildExt as _;

/// Outside --ports and --flow-ports, as 443 would be in a real deployment.
const SHARED_PORT: u16 = 443;

/// `forwarder add --backend BACKEND --key-file - --json` with `key` on
/// standard input, as `forwarder mosh` runs it over ssh.
fn add_with_key_on_stdin(relay: &Relay, backend: SocketAddrV4, key: &str) -> SessionInfo {
    let mut child = relay
        .cli()
        .args(["add", "--instance", relay.instance(), "--backend"])
        .arg(backend.to_string())
        .args(["--key-file", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{key}").unwrap();
    drop(stdin);
    let status = child
        .wait_timeout(SHORT)
        .unwrap()
        .expect("`forwarder add --key-file -` did not finish");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "add --key-file - failed: {stdout}");
    assert!(!stdout.contains(key), "the key is printed: {stdout}");
    let document: Value = serde_json::from_str(&stdout).unwrap();
    serde_json::from_value(unwrap_document(document).unwrap()).unwrap()
}

fn shared_flows(session: &SessionInfo) -> Vec<&FlowInfo> {
    session
        .flows
        .iter()
        .filter(|f| f.relay_port == Some(SHARED_PORT))
        .collect()
}

fn show(relay: &Relay, id: &str) -> SessionInfo {
    let out = relay.verb(&["show", id, "--json"]).unwrap();
    serde_json::from_value(unwrap_document(serde_json::from_str(&out).unwrap()).unwrap()).unwrap()
}

fn shared_stat(relay: &Relay, name: &str) -> u64 {
    relay.stats().unwrap()["slow_path"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no slow_path.{name}"))
}

/// Waits until `check` holds for the stats (bounded), or fails naming `what`.
fn wait_for_stats(relay: &Relay, what: &str, mut check: impl FnMut(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = relay.stats().unwrap();
        if check(&stats["slow_path"]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; slow path: {}",
            stats["slow_path"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the session has a flow on the shared port from `ip` that
/// the server answers through XDP.
fn wait_for_shared_flow(relay: &Relay, id: &str, ip: std::net::Ipv4Addr) -> FlowInfo {
    relay
        .wait_until(
            "a flow on the shared port with fast-path packets to the client",
            Duration::from_secs(20),
            |sessions| {
                let session = sessions.iter().find(|s| s.id == id)?;
                shared_flows(session)
                    .into_iter()
                    .find(|f| {
                        f.client.starts_with(&format!("{ip}:"))
                            && f.fast_path_packets > 0
                            && f.packets_to_client > 0
                    })
                    .cloned()
            },
        )
        .unwrap()
}

/// What `client` (whose flow's endpoint is `endpoint`) sends to the shared
/// port during `rounds` round trips, as a capture on its interface sees it.
fn record_client(
    topo: &Topology,
    client: &MoshClient,
    endpoint: &str,
    rounds: usize,
) -> Vec<Vec<u8>> {
    let recording = Capture::start(&topo.client, CLIENT_IF).unwrap();
    for round in 0..rounds {
        roundtrip(client, &format!("recorded{round}")).unwrap();
    }
    let shared = SocketAddrV4::new(RELAY_CLIENT_IP, SHARED_PORT);
    udp_datagrams(&recording.finish())
        .into_iter()
        .filter(|d| d.dst == shared && d.src.to_string() == endpoint)
        .map(|d| d.payload)
        .collect()
}

#[test]
fn keyed_sessions_share_one_port_roam_and_refuse_replays_forgeries_and_keyless_clients() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--shared-port", &SHARED_PORT.to_string()],
    )
    .unwrap();
    let server_a = MoshServer::start(&topo.server, SERVER_IP, 60101).unwrap();
    let server_b = MoshServer::start(&topo.server, SERVER_IP, 60102).unwrap();
    let keyless_server = MoshServer::start(&topo.server, SERVER_IP, 60103).unwrap();

    // Keys as MOSH CONNECT printed them: one from a file, one on stdin.
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("a.key");
    std::fs::write(&key_file, format!("{}\n", server_a.key)).unwrap();
    let backend = |port: u16| SocketAddrV4::new(SERVER_IP, port);
    let a = relay
        .add(
            SocketAddr::V4(backend(server_a.port)),
            &["--key-file", key_file.to_str().unwrap()],
        )
        .unwrap();
    let b = add_with_key_on_stdin(&relay, backend(server_b.port), &server_b.key);
    let keyless = relay
        .add(SocketAddr::V4(backend(keyless_server.port)), &[])
        .unwrap();
    let a = show(&relay, &a.id);
    for keyed in [&a, &b] {
        assert!(keyed.has_key, "{keyed:?}");
        assert_eq!(keyed.shared_port, Some(SHARED_PORT), "{keyed:?}");
    }
    let keyless = show(&relay, &keyless.id);
    assert!(!keyless.has_key);
    assert_eq!(
        keyless.shared_port, None,
        "a keyless session has no shared port"
    );

    // Both clients on the one shared port.
    let client_a =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP, SHARED_PORT, &server_a.key).unwrap();
    let client_b =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP, SHARED_PORT, &server_b.key).unwrap();
    wait_for_shell(&client_a)
        .expect("mosh through the shared port (session a) never showed the shell");
    wait_for_shell(&client_b)
        .expect("mosh through the shared port (session b) never showed the shell");
    roundtrip(&client_a, "a-before").unwrap();
    roundtrip(&client_b, "b-before").unwrap();
    let flow_a = wait_for_shared_flow(&relay, &a.id, CLIENT_IP);
    let flow_b = wait_for_shared_flow(&relay, &b.id, CLIENT_IP);
    assert_ne!(flow_a.client, flow_b.client);
    // Typed again now that the flows are in the maps: XDP carries them.
    roundtrip(&client_a, "a-fast").unwrap();
    relay
        .wait_until(
            "session a's shared flow to grow in XDP",
            Duration::from_secs(20),
            |sessions| {
                let session = sessions.iter().find(|s| s.id == a.id)?;
                shared_flows(session)
                    .into_iter()
                    .find(|f| {
                        f.client == flow_a.client && f.fast_path_packets > flow_a.fast_path_packets
                    })
                    .cloned()
            },
        )
        .unwrap();
    assert_eq!(shared_stat(&relay, "shared_admitted"), 2);

    // Record session a's client, then replay it from a new endpoint.
    let shared = SocketAddrV4::new(RELAY_CLIENT_IP, SHARED_PORT);
    let recorded = record_client(&topo, &client_a, &flow_a.client, 3);
    assert!(
        recorded.len() >= 3,
        "the recording holds {} of the client's datagrams",
        recorded.len()
    );
    let replayed_before = shared_stat(&relay, "shared_replayed");
    let unverified_before = shared_stat(&relay, "shared_unverified");
    let attacker: UdpSocket = topo
        .client
        .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
        .unwrap();
    let attacker_endpoint = attacker.local_addr().unwrap().to_string();
    for datagram in &recorded {
        attacker.send_to(datagram, shared).unwrap();
    }
    // Forged: random bytes, and a valid-looking header with a wrong tag.
    let mut forged: Vec<Vec<u8>> = (0..5)
        .map(|i| (0..40 + i * 30).map(|_| rand::random::<u8>()).collect())
        .collect();
    for datagram in recorded.iter().take(3) {
        let mut wrong_tag = datagram.clone();
        wrong_tag[0..8].copy_from_slice(&0x0000_0000_7fff_0000u64.to_be_bytes());
        let last = wrong_tag.len() - 1;
        wrong_tag[last] ^= 0x5a;
        forged.push(wrong_tag);
    }
    let forger: UdpSocket = topo
        .client
        .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
        .unwrap();
    let forger_endpoint = forger.local_addr().unwrap().to_string();
    for datagram in &forged {
        forger.send_to(datagram, shared).unwrap();
    }
    let (replays, forgeries) = (recorded.len() as u64, forged.len() as u64);
    wait_for_stats(&relay, "the replays and forgeries to be counted", |s| {
        s["shared_replayed"].as_u64() >= Some(replayed_before + replays)
            && s["shared_unverified"].as_u64() >= Some(unverified_before + forgeries)
    });
    for id in [&a.id, &b.id, &keyless.id] {
        let session = show(&relay, id);
        assert!(
            !session
                .flows
                .iter()
                .any(|f| f.client == attacker_endpoint || f.client == forger_endpoint),
            "a replayed or forged datagram created a flow: {session:?}"
        );
    }
    assert_eq!(
        shared_stat(&relay, "shared_admitted"),
        2,
        "nothing new was admitted"
    );
    roundtrip(&client_a, "a-after-replay").unwrap();

    // A keyless session's client on the shared port: nothing to match it with.
    let unverified_before = shared_stat(&relay, "shared_unverified");
    let keyless_client = MoshClient::start(
        &topo.client,
        RELAY_CLIENT_IP,
        SHARED_PORT,
        &keyless_server.key,
    )
    .unwrap();
    wait_for_stats(
        &relay,
        "the keyless session's client's datagrams refused",
        |s| s["shared_unverified"].as_u64() >= Some(unverified_before + 2),
    );
    drop(keyless_client);
    assert!(
        show(&relay, &keyless.id).flows.is_empty(),
        "the keyless session got a flow"
    );
    for id in [&a.id, &b.id] {
        assert_eq!(
            shared_flows(&show(&relay, id)).len(),
            1,
            "only the real clients' flows"
        );
    }

    // Both roam: new endpoints, each matched to its own session by key.
    topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client_a, "a-roamed").unwrap();
    roundtrip(&client_b, "b-roamed").unwrap();
    let roamed_a = wait_for_shared_flow(&relay, &a.id, CLIENT_ROAM_IP);
    let roamed_b = wait_for_shared_flow(&relay, &b.id, CLIENT_ROAM_IP);
    assert_ne!(roamed_a.upstream_port, flow_a.upstream_port);
    assert_ne!(roamed_b.upstream_port, flow_b.upstream_port);
    roundtrip(&client_a, "a-again").unwrap();
    roundtrip(&client_b, "b-again").unwrap();
    assert!(shared_stat(&relay, "shared_admitted") >= 4);

    // The keys were never shown: not in any output, not in the log.
    let outputs = [
        relay.verb(&["list"]).unwrap(),
        relay.verb(&["list", "--json"]).unwrap(),
        relay.verb(&["show", &a.id]).unwrap(),
        relay.verb(&["show", &b.id, "--json"]).unwrap(),
        relay.log(),
    ];
    for key in [&server_a.key, &server_b.key] {
        for output in &outputs {
            assert!(
                !output.contains(key.as_str()),
                "a session key is shown: {output}"
            );
        }
    }
    assert!(
        relay
            .verb(&["show", &a.id])
            .unwrap()
            .contains("shared port 443")
    );
}

#[test]
fn a_keyed_session_keeps_its_key_and_shared_flow_across_a_restart() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--shared-port", &SHARED_PORT.to_string()],
    )
    .unwrap();
    let server = MoshServer::start(&topo.server, SERVER_IP, 60101).unwrap();
    let session = add_with_key_on_stdin(
        &relay,
        SocketAddrV4::new(SERVER_IP, server.port),
        &server.key,
    );
    let client =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP, SHARED_PORT, &server.key).unwrap();
    wait_for_shell(&client).expect("mosh through the shared port never showed the shell");
    roundtrip(&client, "before").unwrap();
    let flow = wait_for_shared_flow(&relay, &session.id, CLIENT_IP);
    let shared = SocketAddrV4::new(RELAY_CLIENT_IP, SHARED_PORT);
    let recorded = record_client(&topo, &client, &flow.client, 1);
    assert!(
        !recorded.is_empty(),
        "the recording holds none of the client's datagrams"
    );

    relay.terminate().unwrap();
    // The store holds the key sealed: not its text, beside a root-only secret.
    let store = std::fs::read(relay.state_dir().join("sessions.redb")).unwrap();
    assert!(
        !store
            .windows(server.key.len())
            .any(|w| w == server.key.as_bytes())
    );
    let secret = relay.state_dir().join("keyed-sessions.secret");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    relay.restart().unwrap();

    let restored = show(&relay, &session.id);
    assert!(
        restored.has_key,
        "the key did not survive the restart: {restored:?}"
    );
    assert_eq!(restored.shared_port, Some(SHARED_PORT));
    assert!(
        shared_flows(&restored)
            .iter()
            .any(|f| f.client == flow.client),
        "the shared flow was not restored: {restored:?}"
    );
    roundtrip(&client, "restarted").unwrap();
    // What the session had seen before the restart still bounds a new
    // endpoint: the recording, replayed from elsewhere, creates nothing.
    let replayer: UdpSocket = topo
        .client
        .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
        .unwrap();
    let replayer_endpoint = replayer.local_addr().unwrap().to_string();
    for datagram in &recorded {
        replayer.send_to(datagram, shared).unwrap();
    }
    wait_for_stats(&relay, "the replays after the restart to be refused", |s| {
        s["shared_replayed"].as_u64() >= Some(recorded.len() as u64)
    });
    assert!(
        !show(&relay, &session.id)
            .flows
            .iter()
            .any(|f| f.client == replayer_endpoint),
        "a replay after the restart created a flow"
    );
    // A new endpoint after the restart is matched by the unsealed key.
    topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    wait_for_shared_flow(&relay, &session.id, CLIENT_ROAM_IP);
}

#[test]
fn the_shared_port_works_on_the_userspace_datapath() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--shared-port",
            &SHARED_PORT.to_string(),
            "--datapath",
            "userspace",
        ],
    )
    .unwrap();
    let server = MoshServer::start(&topo.server, SERVER_IP, 60101).unwrap();
    let session = add_with_key_on_stdin(
        &relay,
        SocketAddrV4::new(SERVER_IP, server.port),
        &server.key,
    );
    let client =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP, SHARED_PORT, &server.key).unwrap();
    wait_for_shell(&client).expect("mosh through the shared port never showed the shell");
    roundtrip(&client, "userspace").unwrap();
    topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    relay
        .wait_until(
            "a flow on the shared port from the new address with packets to the client",
            Duration::from_secs(20),
            |sessions| {
                let session = sessions.iter().find(|s| s.id == session.id)?;
                shared_flows(session)
                    .into_iter()
                    .find(|f| {
                        f.client.starts_with(&format!("{CLIENT_ROAM_IP}:"))
                            && f.slow_path_packets > 0
                            && f.packets_to_client > 0
                    })
                    .cloned()
            },
        )
        .unwrap();
}

#[test]
fn a_bad_key_is_refused_before_anything_is_created() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--shared-port", &SHARED_PORT.to_string()],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not-a-mosh-key!\n").unwrap();
    let missing = dir.path().join("missing.key");
    let backend = SocketAddrV4::new(SERVER_IP, 60101).to_string();
    for (file, says) in [(&bad, "malformed mosh key"), (&missing, "missing.key")] {
        let mut cmd = relay.cli();
        cmd.args([
            "add",
            "--instance",
            relay.instance(),
            "--backend",
            &backend,
            "--key-file",
        ])
        .arg(file);
        let out = forwarder_testbed::cmd::run(&mut cmd, SHORT).unwrap();
        let stderr = out.stderr;
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(says),
            "the refusal does not say {says:?}: {stderr}"
        );
    }
    assert!(
        relay.sessions().unwrap().is_empty(),
        "a refused add created a session"
    );
}
