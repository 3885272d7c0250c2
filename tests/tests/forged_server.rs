//! Forged "server" datagrams never reach a client, on any path: attackers on
//! the client's segment and on the server's segment send datagrams whose
//! source is the server's endpoint to every relay address, at every session
//! port P and flow port Q in use, through both of the relay's interfaces,
//! while a real mosh session runs. In every datapath (XDP native, XDP skb,
//! userspace) and for ordinary and punched sessions, none of their payloads
//! is delivered to the client (captured on the client's interface and
//! compared byte for byte), every datagram the client gets is one the
//! server sent, and the session keeps working.
//!
//! The one combination left out is the server's own path (its endpoint, to
//! the relay's backend-side address at Q, arriving on the server's
//! interface): there a forger is indistinguishable from the server without
//! the session key, for the relay as for any router.

use std::collections::HashSet;
use std::net::SocketAddrV4;
use std::time::Duration;

use forwarder_testbed::hostile::{ForgerSite, forge_server_datagrams};
use forwarder_testbed::nat::{NAT_OUTSIDE_IF, NatTopology, PUNCH_PORT, RELAY_NAT_IF, RELAY_NAT_IP};
use forwarder_testbed::raw::{Capture, udp_datagrams};
use forwarder_testbed::scenario::{MoshThroughRelay, roundtrip, wait_for_shell};
use forwarder_testbed::topology::{
    CLIENT_IF, CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, RELAY_SERVER_IP,
    SERVER_IF,
};
use forwarder_testbed::{MoshClient, MoshServer, Relay, prereq};

/// Forged datagrams per site, target and burst.
const ROUNDS: usize = 5;
/// Bursts, each followed by a keystroke round trip, so forgeries land while
/// mosh is busy.
const BURSTS: usize = 3;

/// Checks what the client received against what the server and the forgers
/// sent, and prints the figure for the record.
fn assert_client_got_only_the_server(
    what: &str,
    at_client: Capture,
    at_server: Capture,
    server_ip: std::net::Ipv4Addr,
    forged: &HashSet<Vec<u8>>,
) {
    let to_client: Vec<_> = udp_datagrams(&at_client.finish())
        .into_iter()
        .filter(|d| *d.dst.ip() == CLIENT_IP)
        .collect();
    // The server-side forgers send from the server's own interface in the
    // ordinary topology: their payloads are not the server's.
    let from_server: HashSet<Vec<u8>> = udp_datagrams(&at_server.finish())
        .into_iter()
        .filter(|d| *d.src.ip() == server_ip && !forged.contains(&d.payload))
        .map(|d| d.payload)
        .collect();
    assert!(!to_client.is_empty(), "{what}: the client got nothing");
    let delivered: Vec<_> = to_client
        .iter()
        .filter(|d| forged.contains(&d.payload))
        .collect();
    println!(
        "{what}: forged datagrams delivered to the client: {} of {}; the client got {} datagrams, \
         {} server datagrams captured",
        delivered.len(),
        forged.len(),
        to_client.len(),
        from_server.len()
    );
    assert!(
        delivered.is_empty(),
        "{what}: forged payloads reached the client: {delivered:?}"
    );
    for datagram in &to_client {
        assert!(
            from_server.contains(&datagram.payload),
            "{what}: the client got a payload the server never sent: {datagram:?}"
        );
    }
}

/// Captures at the server and then at the client: a datagram the client
/// gets after its capture starts left the server after the server's capture
/// started (the pause covers one in flight through the relay).
fn captures(
    server: (&forwarder_testbed::Netns, &str),
    client: (&forwarder_testbed::Netns, &str),
) -> (Capture, Capture) {
    let at_server = Capture::start(server.0, server.1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (at_server, Capture::start(client.0, client.1).unwrap())
}

fn slow_path(relay: &Relay, counter: &str) -> u64 {
    relay.stats().unwrap()["slow_path"][counter]
        .as_u64()
        .unwrap_or(0)
}

fn reason(relay: &Relay, reason: &str) -> u64 {
    relay.stats().unwrap()["reasons"][reason]["packets"]
        .as_u64()
        .unwrap_or(0)
}

fn ordinary_session(what: &str, relay_args: &[&str]) {
    let m = MoshThroughRelay::start(relay_args).unwrap();
    m.roundtrip("before").unwrap();
    let session = m.relay.session(&m.session.id).unwrap().unwrap();
    let server: SocketAddrV4 = session.backend.parse().unwrap();
    let mut ports = vec![session.port];
    ports.extend(session.flows.iter().map(|f| f.upstream_port));
    let flow_ports: HashSet<u16> = session.flows.iter().map(|f| f.upstream_port).collect();
    let targets: Vec<SocketAddrV4> = [RELAY_CLIENT_IP, RELAY_SERVER_IP]
        .iter()
        .flat_map(|&ip| ports.iter().map(move |&port| SocketAddrV4::new(ip, port)))
        .collect();
    let sites = [
        ForgerSite {
            ns: &m.topo.client,
            ifname: CLIENT_IF,
            relay_if: RELAY_CLIENT_IF,
        },
        ForgerSite {
            ns: &m.topo.server,
            ifname: SERVER_IF,
            relay_if: RELAY_SERVER_IF,
        },
    ];
    let servers_own_path = |site: usize, t: SocketAddrV4| {
        site == 1 && *t.ip() == RELAY_SERVER_IP && flow_ports.contains(&t.port())
    };

    let (at_server, at_client) = captures((&m.topo.server, SERVER_IF), (&m.topo.client, CLIENT_IF));
    let mut forged = HashSet::new();
    for burst in 0..BURSTS {
        forged.extend(
            forge_server_datagrams(
                &m.topo.relay,
                &sites,
                server,
                &targets,
                ROUNDS,
                servers_own_path,
            )
            .unwrap(),
        );
        m.roundtrip(&format!("burst{burst}")).unwrap();
    }
    m.roundtrip("after").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_client_got_only_the_server(what, at_client, at_server, *server.ip(), &forged);

    let refused_in_daemon = slow_path(&m.relay, "dropped_server_wrong_path")
        + slow_path(&m.relay, "dropped_client_is_backend");
    let refused_in_xdp = reason(&m.relay, "spoofed_server");
    println!("{what}: refused in XDP {refused_in_xdp}, in the daemon {refused_in_daemon}");
    assert!(
        refused_in_daemon > 0,
        "{what}: the daemon counted no refusal"
    );
    if relay_args.contains(&"userspace") {
        assert!(
            slow_path(&m.relay, "dropped_server_wrong_path") > 0,
            "{what}: no wrong-path refusal counted"
        );
    } else {
        assert!(
            refused_in_xdp > 0,
            "{what}: XDP counted no spoofed_server drop"
        );
    }
}

#[test]
fn forged_server_datagrams_never_reach_the_client_xdp_native() {
    ordinary_session("XDP native", &[]);
}

#[test]
fn forged_server_datagrams_never_reach_the_client_xdp_skb() {
    ordinary_session("XDP skb", &["--xdp-mode", "skb"]);
}

#[test]
fn forged_server_datagrams_never_reach_the_client_userspace() {
    ordinary_session("userspace", &["--datapath", "userspace"]);
}

fn punched_session(what: &str, relay_args: &[&str]) {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), forwarder_testbed::nat::random_secret()).unwrap();
    let relay = topo.start_relay(secret.path(), relay_args).unwrap();
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
    roundtrip(&client, "before").unwrap();

    let session = relay.sessions().unwrap().remove(0);
    let nat = session.nat.clone().expect("a punched session");
    let backend: SocketAddrV4 = session.backend.parse().unwrap();
    let ports = [session.port, nat.upstream_port, PUNCH_PORT];
    let targets: Vec<SocketAddrV4> = [RELAY_CLIENT_IP, RELAY_NAT_IP]
        .iter()
        .flat_map(|&ip| ports.iter().map(move |&port| SocketAddrV4::new(ip, port)))
        .collect();
    // The NAT box's outside link is the server's segment as the relay sees it.
    let sites = [
        ForgerSite {
            ns: &topo.client,
            ifname: CLIENT_IF,
            relay_if: RELAY_CLIENT_IF,
        },
        ForgerSite {
            ns: &topo.nat,
            ifname: NAT_OUTSIDE_IF,
            relay_if: RELAY_NAT_IF,
        },
    ];
    let upstream = nat.upstream_port;
    let servers_own_path =
        |site: usize, t: SocketAddrV4| site == 1 && *t.ip() == RELAY_NAT_IP && t.port() == upstream;

    let (at_server, at_client) = captures(
        (&topo.server, forwarder_testbed::nat::SERVER_IF),
        (&topo.client, CLIENT_IF),
    );
    let mut forged = HashSet::new();
    for burst in 0..BURSTS {
        forged.extend(
            forge_server_datagrams(
                &topo.relay,
                &sites,
                backend,
                &targets,
                ROUNDS,
                servers_own_path,
            )
            .unwrap(),
        );
        roundtrip(&client, &format!("burst{burst}")).unwrap();
    }
    roundtrip(&client, "after").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Behind the NAT the server sends from its own address; payloads are unchanged.
    assert_client_got_only_the_server(
        what,
        at_client,
        at_server,
        forwarder_testbed::nat::NAT_SERVER_IP,
        &forged,
    );
    let session = relay.sessions().unwrap().remove(0);
    assert_eq!(
        session.backend,
        backend.to_string(),
        "{what}: forgeries moved the server's endpoint"
    );
    drop(client);
    drop(server);
}

#[test]
fn forged_server_datagrams_never_reach_the_client_punched_xdp() {
    punched_session("punched, XDP native", &[]);
}

#[test]
fn forged_server_datagrams_never_reach_the_client_punched_userspace() {
    punched_session("punched, userspace", &["--datapath", "userspace"]);
}
