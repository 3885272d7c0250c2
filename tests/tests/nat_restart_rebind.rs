//! A punched mosh session (server behind an nftables NAT, reached with the
//! punch handshake and the `forwarder mosh-server` wrapper) outlives what
//! nobody repairs by punching again, since the wrapper has exited:
//! SIGKILL restarts of the relay daemon (the session, its sealed key and
//! its pinned halves come back from the store and bpffs), and the NAT
//! giving the server a new external endpoint mid-session (conntrack flush:
//! the daemon follows the server's first verified datagram from there,
//! while forged "server" datagrams from other endpoints move nothing and
//! never reach the client).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use forwarder_testbed::capture::Capture;
use forwarder_testbed::nat::{
    NAT_OUTSIDE_IF, NAT_PUBLIC_IP, NatTopology, PUNCH_PORT, RELAY_NAT_IP, SERVER_IF, random_secret,
};
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::topology::{CLIENT_IF, CLIENT_IP, RELAY_CLIENT_IP};
use forwarder_testbed::{MoshClient, MoshServer, Relay, SessionInfo, prereq};

const RESTARTS: usize = 3;

fn secret_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), random_secret()).unwrap();
    file
}

fn slow_path(relay: &Relay, counter: &str) -> u64 {
    relay.stats().unwrap()["slow_path"][counter]
        .as_u64()
        .unwrap_or(0)
}

/// The one punched session, with what must not change across restarts.
fn identity(sessions: &[SessionInfo]) -> (String, u16, String, u16, bool, bool) {
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let s = &sessions[0];
    let nat = s
        .nat
        .as_ref()
        .unwrap_or_else(|| panic!("not a punched session: {s:?}"));
    (
        s.id.clone(),
        s.port,
        s.backend.clone(),
        nat.upstream_port,
        nat.bound,
        nat.key_received,
    )
}

/// Processes still running `forwarder mosh-server` (the wrapper): there must be none.
fn wrappers_running() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        if words.iter().any(|w| w == "mosh-server") && words.iter().any(|w| w == "--secret-file") {
            found.push(words.join(" "));
        }
    }
    found
}

fn start_punched(topo: &NatTopology, secret: &tempfile::NamedTempFile) -> (MoshServer, MoshClient) {
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
    eprintln!("wrapper said: {}", wrapped.stderr.trim());
    let client = MoshClient::start(&topo.client, wrapped.ip, server.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    (server, client)
}

#[test]
fn punched_mosh_session_survives_sigkill_restarts_without_punching_again() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let secret = secret_file();
    let mut relay = topo
        .start_relay(secret.path(), &["--xdp-mode", "native"])
        .unwrap();
    assert_eq!(relay.stats().unwrap()["datapath"], "native");
    let punches =
        Capture::start(&topo.server, SERVER_IF, &format!("udp port {PUNCH_PORT}")).unwrap();
    let (server, client) = start_punched(&topo, &secret);
    roundtrip(&client, "before").unwrap();
    let handshake = punches.udp().unwrap().len();
    assert!(
        handshake >= 4,
        "the wrapper's Allocate, Key and their answers: {handshake}"
    );
    assert_eq!(
        wrappers_running(),
        Vec::<String>::new(),
        "the wrapper must have exited"
    );
    let before = identity(&relay.sessions().unwrap());
    let stored = std::fs::read(relay.state_dir().join("sessions.redb")).unwrap();
    let key = server.key.as_bytes();
    assert!(
        !stored.windows(key.len()).any(|w| w == key),
        "the mosh key is in the session store in clear"
    );

    let mut ready = Vec::new();
    for round in 0..RESTARTS {
        // What the client sends while no daemon runs goes through the
        // pinned client half; XDP's record of it outlives the daemon.
        let while_down = Capture::start(
            &topo.client,
            CLIENT_IF,
            &format!("udp dst port {}", before.1),
        )
        .unwrap();
        relay.kill9().unwrap();
        roundtrip(&client, &format!("down{round}")).unwrap();
        ready.push(relay.restart().unwrap());
        roundtrip(&client, &format!("up{round}")).unwrap();
        let sessions = relay.sessions().unwrap();
        assert_eq!(
            identity(&sessions),
            before,
            "the punched session changed across restart {round}"
        );
        assert_eq!(
            slow_path(&relay, "forwarded_to_server"),
            0,
            "the restarted daemon forwarded client datagrams: the client half was not adopted"
        );
        // Replayed from another endpoint, none of them moves the session:
        // the restored follower starts from what XDP recorded, newer than
        // the store's (written at most every few seconds).
        let replays = while_down.udp().unwrap();
        assert!(
            !replays.is_empty(),
            "the client sent nothing while the daemon was down"
        );
        let attacker = topo
            .client
            .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
            .unwrap();
        for packet in &replays {
            attacker
                .send_to(
                    &packet.payload,
                    SocketAddr::from((RELAY_CLIENT_IP, before.1)),
                )
                .unwrap();
        }
        relay
            .wait_until(
                "the restarted daemon to refuse every replay",
                Duration::from_secs(10),
                |_| {
                    (slow_path(&relay, "dropped_unverified_client") >= replays.len() as u64)
                        .then_some(())
                },
            )
            .unwrap();
        roundtrip(&client, &format!("unmoved{round}")).unwrap();
        let sessions = relay.sessions().unwrap();
        let flow = &sessions[0].flows[0];
        assert!(
            flow.client.starts_with(&format!("{CLIENT_IP}:")),
            "{flow:?}"
        );
        assert!(
            flow.fast_path_packets > 0 && flow.server_current,
            "the server's packets left the fast path after restart {round}: {flow:?}"
        );
    }
    let log = relay.log();
    assert_eq!(
        log.matches("pinned halves adopted").count(),
        RESTARTS,
        "every restart adopts the pinned halves (both directions):\n{log}"
    );
    assert!(
        !log.contains(&server.key),
        "the mosh key is in the daemon's log"
    );
    assert_eq!(
        punches.udp().unwrap().len(),
        handshake,
        "something punched again after the restarts"
    );
    eprintln!("punched session across {RESTARTS} SIGKILL restarts; restart-to-ready: {ready:?}");

    // Without the punch secret the sealed key cannot be opened: dropped, with the fix.
    relay.kill9().unwrap();
    let mut bare = Relay::start_command(
        strip_punch_args(&relay),
        relay.instance(),
        Some(relay.state_dir().to_path_buf()),
    )
    .unwrap();
    assert!(
        bare.sessions().unwrap().is_empty(),
        "a punched session came back without the secret"
    );
    let log = bare.log();
    assert!(
        log.contains("stored session dropped") && log.contains("--punch-secret-file"),
        "{log}"
    );
    bare.kill9().unwrap();
}

/// The daemon's command line without the punch handshake's options.
fn strip_punch_args(relay: &Relay) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = relay.command().iter();
    while let Some(arg) = args.next() {
        if ["--punch-port", "--punch-secret-file", "--public-addr"].contains(&arg.as_str()) {
            args.next();
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// Where the daemon serves Prometheus metrics, inside the relay namespace.
const METRICS: &str = "127.0.0.1:9464";

/// The value of the metric line that starts with `name` and has `label`.
fn metric(topo: &NatTopology, name: &str, label: &str) -> u64 {
    let response = topo.relay.http_get(METRICS, "/metrics").unwrap();
    response
        .lines()
        .find(|line| line.starts_with(name) && line.contains(label))
        .and_then(|line| line.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} with {label} in the metrics:\n{response}"))
}

/// A datagram that claims to be mosh-server's (direction bit set, a huge
/// sequence number) but carries no valid tag.
fn forged_server_datagram(index: u8) -> Vec<u8> {
    let mut datagram = (0x8000_0000_7fff_0000u64 + u64::from(index))
        .to_be_bytes()
        .to_vec();
    datagram.extend((0..80).map(|i: u8| i.wrapping_mul(31).wrapping_add(index)));
    datagram
}

#[test]
fn punched_session_follows_its_server_across_a_nat_rebind_and_ignores_forgers() {
    follows_server_across_nat_rebind(&["--xdp-mode", "native"]);
}

/// The same on the userspace datapath, where the daemon sees every datagram.
#[test]
fn punched_session_follows_its_server_across_a_nat_rebind_on_the_userspace_datapath() {
    follows_server_across_nat_rebind(&["--datapath", "userspace"]);
}

fn follows_server_across_nat_rebind(datapath: &[&str]) {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let secret = secret_file();
    let userspace = datapath.contains(&"userspace");
    let mut args = datapath.to_vec();
    args.extend(["--punch-keepalive", "1s", "--metrics", METRICS]);
    let mut relay = topo.start_relay(secret.path(), &args).unwrap();
    let (_server, client) = start_punched(&topo, &secret);
    roundtrip(&client, "before").unwrap();
    let sessions = relay.sessions().unwrap();
    let (_, port, backend, upstream_port, _, _) = identity(&sessions);
    let old_backend: SocketAddrV4 = backend.parse().unwrap();
    let relay_q = SocketAddr::from((RELAY_NAT_IP, upstream_port));

    // What the client receives, and the server's real datagrams on the NAT's outside.
    let at_client =
        Capture::start(&topo.client, CLIENT_IF, &format!("udp src port {port}")).unwrap();
    let from_server = Capture::start(
        &topo.nat,
        NAT_OUTSIDE_IF,
        &format!("src host {NAT_PUBLIC_IP} and udp dst port {upstream_port}"),
    )
    .unwrap();
    roundtrip(&client, "captured").unwrap();

    // Forgers on the server's side (the NAT's own address, another port)
    // and on the client's side, at every relay address of Q.
    let nat_forger = topo
        .nat
        .udp_bind(SocketAddr::from((NAT_PUBLIC_IP, 0)))
        .unwrap();
    let client_forger = topo
        .client
        .udp_bind(SocketAddr::from((CLIENT_IP, 0)))
        .unwrap();
    let targets = [relay_q, SocketAddr::from((RELAY_CLIENT_IP, upstream_port))];
    let mut forged = Vec::new();
    let send_forged = |forged: &mut Vec<Vec<u8>>, from: &UdpSocket, base: u8| {
        for index in 0..10 {
            let datagram = forged_server_datagram(base + index);
            for target in targets {
                from.send_to(&datagram, target).unwrap();
            }
            forged.push(datagram);
        }
    };
    send_forged(&mut forged, &nat_forger, 0);
    send_forged(&mut forged, &client_forger, 10);
    roundtrip(&client, "unmoved").unwrap();
    assert_eq!(
        relay.sessions().unwrap()[0].backend,
        backend,
        "a forged datagram moved the server"
    );
    let refused_before = slow_path(&relay, "dropped_unverified_server");
    assert!(
        refused_before >= 10,
        "the forged datagrams at Q were refused: {refused_before}"
    );

    // The NAT forgets every mapping: the server's next datagrams leave from a new port.
    topo.nat.run("conntrack", &["-F"]).unwrap();
    let started = Instant::now();
    roundtrip(&client, "rebound").unwrap();
    let moved = relay
        .wait_until(
            "the session to follow the server's new endpoint",
            Duration::from_secs(20),
            |s| {
                let backend: SocketAddrV4 = s.first()?.backend.parse().ok()?;
                (backend != old_backend).then_some(backend)
            },
        )
        .unwrap();
    eprintln!(
        "server moved {old_backend} -> {moved}; typed output back after {:?}",
        started.elapsed()
    );
    assert_eq!(*moved.ip(), NAT_PUBLIC_IP);
    assert_ne!(
        moved.port(),
        old_backend.port(),
        "the NAT gave the server a new port"
    );
    assert!(slow_path(&relay, "nat_server_moves") >= 1);
    roundtrip(&client, "after").unwrap();
    if !userspace {
        relay
            .wait_until(
                "the server's packets to take the fast path again",
                Duration::from_secs(20),
                |s| {
                    s.first()?
                        .flows
                        .first()
                        .filter(|f| f.fast_path_packets > 0 && f.server_current)
                        .cloned()
                },
            )
            .unwrap();
    }

    // After the move: more forgeries, and replays of the server's own
    // datagrams from before the flush (authentic, but older), from elsewhere.
    let replays: Vec<Vec<u8>> = from_server
        .udp()
        .unwrap()
        .into_iter()
        .filter(|d| d.from == old_backend && d.payload.len() > 24)
        .map(|d| d.payload)
        .collect();
    assert!(
        !replays.is_empty(),
        "the server's datagrams were captured before the flush"
    );
    send_forged(&mut forged, &nat_forger, 20);
    // Also from the server's old endpoint, which the NAT no longer maps.
    let old_endpoint = topo.nat.udp_bind(SocketAddr::V4(old_backend)).unwrap();
    for replay in &replays {
        nat_forger.send_to(replay, relay_q).unwrap();
        old_endpoint.send_to(replay, relay_q).unwrap();
    }
    roundtrip(&client, "still").unwrap();
    let sessions = relay.sessions().unwrap();
    assert_eq!(
        sessions[0].backend,
        moved.to_string(),
        "a forged or replayed datagram moved the server"
    );
    let refused = slow_path(&relay, "dropped_unverified_server");
    assert!(
        refused >= refused_before + 10 + 2 * replays.len() as u64,
        "forged and replayed datagrams refused: {refused} (before the flush {refused_before})"
    );
    assert!(sessions[0].nat.as_ref().unwrap().rejected_server_packets >= refused - refused_before);
    if !userspace {
        assert!(
            relay.stats().unwrap()["reasons"]["nat_rebind_candidate"]["packets"]
                .as_u64()
                .unwrap_or(0)
                >= 1,
            "the new endpoint's datagrams reached the daemon as rebind candidates"
        );
    }

    // Keepalives follow the server to its new endpoint.
    let keepalives = Capture::start(
        &topo.nat,
        NAT_OUTSIDE_IF,
        &format!(
            "src host {RELAY_NAT_IP} and udp src port {upstream_port} and udp dst port {}",
            moved.port()
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !keepalives
        .udp()
        .unwrap()
        .iter()
        .any(|d| d.payload.len() == 1)
    {
        assert!(
            Instant::now() < deadline,
            "no keepalive reached the server's new endpoint"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    assert!(
        metric(
            &topo,
            "forwarder_slow_path_dropped",
            "reason=\"unverified_server\""
        ) >= refused
    );
    assert!(metric(&topo, "forwarder_nat_moves", "side=\"server\"") >= 1);

    let received = at_client.udp().unwrap();
    assert!(
        !received.is_empty(),
        "the client's capture saw the server's datagrams"
    );
    let forged_at_client = received
        .iter()
        .filter(|d| forged.contains(&d.payload))
        .count();
    assert_eq!(forged_at_client, 0, "forged datagrams reached the client");
    // Each replayed datagram reached the client once: when the server sent it.
    for replay in &replays {
        let delivered = received.iter().filter(|d| d.payload == *replay).count();
        assert!(
            delivered <= 1,
            "a replayed server datagram reached the client {delivered} times"
        );
    }
    eprintln!(
        "forged at the client: 0 of {} forged and {} replayed; refused by the daemon: {refused}",
        forged.len(),
        replays.len()
    );

    // The move was stored: a restarted daemon talks to the new endpoint.
    relay.kill9().unwrap();
    relay.restart().unwrap();
    roundtrip(&client, "restarted").unwrap();
    assert_eq!(relay.sessions().unwrap()[0].backend, moved.to_string());
}
