//! IPv6 and dual stack end to end, with the stock mosh at both ends: mosh
//! over IPv6 to an IPv6 server; an IPv6-only client to an IPv4-only
//! server and the other way round (the relay translates); a laptop that
//! roams from an IPv4-only network to an IPv6-only one mid-session through
//! `forwarder mosh`'s local bridge (which mosh alone cannot do); forged
//! IPv6 "server" datagrams that must never reach the client; and the
//! userspace datapath carrying IPv6.
//!
//! In XDP mode each test checks that the session's keystrokes went through
//! the XDP program (the flow's fast-path counter grows, its slow-path
//! counter does not), not through the daemon.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_testbed::cmd::SHORT;
use forwarder_testbed::hostile::{
    ATTACKER_IF, ForgerSite, client_segment_with_attacker, forge_server_datagrams_any,
};
use forwarder_testbed::raw::{Capture, udp_datagrams_any};
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::topology::{
    CLIENT_IF, CLIENT_IP6, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_CLIENT_IP6, RELAY_SERVER_IF,
    RELAY_SERVER_IP6, SERVER_IF, SERVER_IP, SERVER_IP6, Stack,
};
use forwarder_testbed::{FlowInfo, MoshClient, MoshServer, Relay, Topology, prereq};

#[path = "support/mosh_bed.rs"]
#[expect(dead_code, reason = "the roaming test uses only part of the test bed")]
mod mosh_bed;

/// mosh-server's port on the server.
const MOSH_SERVER_PORT: u16 = 60001;

/// A running mosh session through the relay. Field order is drop order.
struct Through {
    client: MoshClient,
    _server: MoshServer,
    session: String,
    relay: Relay,
    topo: Topology,
}

/// mosh-server on `server_ip`, a session to it, mosh-client to the relay's
/// `relay_ip`; returns once the shell answered a typed line.
fn mosh_through(
    client: Stack,
    server: Stack,
    server_ip: IpAddr,
    relay_ip: IpAddr,
    relay_args: &[&str],
) -> Through {
    prereq::require().unwrap();
    let topo = Topology::dual_stack(client, server).unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), relay_args).unwrap();
    let mosh_server = MoshServer::start(&topo.server, server_ip, MOSH_SERVER_PORT).unwrap();
    let session = relay
        .add(SocketAddr::new(server_ip, mosh_server.port), &[])
        .unwrap();
    assert_eq!(
        session.backend,
        SocketAddr::new(server_ip, mosh_server.port).to_string(),
        "the backend is reported as given, IPv6 in brackets"
    );
    let mosh_client =
        MoshClient::start(&topo.client, relay_ip, session.port, &mosh_server.key).unwrap();
    wait_for_shell(&mosh_client).unwrap();
    roundtrip(&mosh_client, "first").unwrap();
    Through {
        client: mosh_client,
        _server: mosh_server,
        session: session.id,
        relay,
        topo,
    }
}

/// The flow of `session` from a client endpoint that starts with
/// `client`, once the server answers it.
fn answered_flow(relay: &Relay, session: &str, client: &str) -> FlowInfo {
    relay
        .wait_until(
            &format!("a flow from {client} that the server answers"),
            SHORT,
            |sessions| {
                sessions
                    .iter()
                    .find(|s| s.id == session)?
                    .flows
                    .iter()
                    .find(|f| f.client.starts_with(client) && f.server_current && f.answered)
                    .cloned()
            },
        )
        .unwrap()
}

/// Keystrokes on the flow from `client` go through XDP, in both
/// directions, and none through the daemon.
fn keystrokes_take_xdp(relay: &Relay, session: &str, client: &str, mosh: &MoshClient) {
    let before = answered_flow(relay, session, client);
    roundtrip(mosh, "fast-a").unwrap();
    roundtrip(mosh, "fast-b").unwrap();
    let after = relay
        .wait_until("the keystrokes counted on the flow", SHORT, |sessions| {
            sessions
                .iter()
                .find(|s| s.id == session)?
                .flows
                .iter()
                .find(|f| {
                    f.client == before.client
                        && f.packets_to_server > before.packets_to_server
                        && f.packets_to_client > before.packets_to_client
                })
                .cloned()
        })
        .unwrap();
    assert!(
        after.fast_path_packets > before.fast_path_packets,
        "the keystrokes did not go through XDP: before {before:?}, after {after:?}"
    );
    assert_eq!(
        after.slow_path_packets, before.slow_path_packets,
        "the daemon carried keystrokes of an established flow: before {before:?}, after {after:?}"
    );
    assert_eq!(
        after.fast_path_packets - before.fast_path_packets,
        (after.packets_to_server - before.packets_to_server)
            + (after.packets_to_client - before.packets_to_client),
        "every keystroke packet, both ways, through XDP: before {before:?}, after {after:?}"
    );
}

/// `[ip]:` as a flow's client endpoint starts.
fn v6_prefix(ip: std::net::Ipv6Addr) -> String {
    format!("[{ip}]:")
}

#[test]
fn stock_mosh_over_ipv6_to_an_ipv6_server_through_xdp() {
    let m = mosh_through(
        Stack::V6Only,
        Stack::V6Only,
        SERVER_IP6.into(),
        RELAY_CLIENT_IP6.into(),
        &[],
    );
    let flow = answered_flow(&m.relay, &m.session, &v6_prefix(CLIENT_IP6));
    assert_eq!(
        flow.relay_addr,
        RELAY_CLIENT_IP6.to_string(),
        "the client sent to the relay's IPv6 address: {flow:?}"
    );
    keystrokes_take_xdp(&m.relay, &m.session, &v6_prefix(CLIENT_IP6), &m.client);
    // What an operator reads: IPv6 endpoints in brackets beside their port.
    let listed = m.relay.verb(&["list"]).unwrap();
    assert!(
        listed.contains(&format!("backend [{SERVER_IP6}]:{MOSH_SERVER_PORT}"))
            && listed.contains(&format!("-> [{RELAY_CLIENT_IP6}]:")),
        "{listed}"
    );
}

#[test]
fn an_ipv6_only_client_reaches_an_ipv4_only_server_translated_in_xdp() {
    let m = mosh_through(
        Stack::V6Only,
        Stack::V4Only,
        SERVER_IP.into(),
        RELAY_CLIENT_IP6.into(),
        &[],
    );
    assert!(
        m.topo.client.ping(&SERVER_IP.to_string()).is_err(),
        "the client has no IPv4 at all"
    );
    keystrokes_take_xdp(&m.relay, &m.session, &v6_prefix(CLIENT_IP6), &m.client);
}

#[test]
fn an_ipv4_only_client_reaches_an_ipv6_only_server_translated_in_xdp() {
    let m = mosh_through(
        Stack::V4Only,
        Stack::V6Only,
        SERVER_IP6.into(),
        RELAY_CLIENT_IP.into(),
        &[],
    );
    keystrokes_take_xdp(
        &m.relay,
        &m.session,
        &format!("{}:", forwarder_testbed::topology::CLIENT_IP),
        &m.client,
    );
}

#[test]
fn the_userspace_datapath_carries_ipv6_and_translates() {
    let m = mosh_through(
        Stack::V6Only,
        Stack::V4Only,
        SERVER_IP.into(),
        RELAY_CLIENT_IP6.into(),
        &["--datapath", "userspace"],
    );
    assert_eq!(m.relay.stats().unwrap()["datapath"], "userspace");
    roundtrip(&m.client, "user6").unwrap();
    let flow = answered_flow(&m.relay, &m.session, &v6_prefix(CLIENT_IP6));
    assert_eq!(flow.fast_path_packets, 0, "no XDP program: {flow:?}");
    assert_eq!(
        flow.slow_path_packets,
        flow.packets_to_server + flow.packets_to_client,
        "every packet went through the daemon: {flow:?}"
    );
    assert!(
        flow.packets_to_client > 0 && flow.packets_to_server > 1,
        "{flow:?}"
    );
}

/// A laptop on an IPv4-only network runs `forwarder mosh` to a dual-stack
/// bastion, then moves to an IPv6-only network: mosh-client (whose socket
/// is IPv4 for life) keeps talking to the local bridge, which moves to the
/// bastion's IPv6 address; the bastion makes a new flow from the laptop's
/// IPv6 address and sends it to the IPv4-only server as before.
#[test]
fn forwarder_mosh_keeps_the_session_when_the_laptop_roams_from_ipv4_to_ipv6() {
    let topo = Topology::dual_stack(Stack::V4Only, Stack::V4Only).unwrap();
    let bed = mosh_bed::Bed::build_on(topo, &format!("{SERVER_IP}/32"), &[]).unwrap();
    let client = bed
        .start_mosh(
            &bed.user,
            &format!(
                "--relay-addr {RELAY_CLIENT_IP} --relay-addr {RELAY_CLIENT_IP6} --via {RELAY_CLIENT_IP} {SERVER_IP}"
            ),
        )
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "on-v4").unwrap();
    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = sessions[0].id.clone();
    answered_flow(
        &bed.relay,
        &session,
        &format!("{}:", forwarder_testbed::topology::CLIENT_IP),
    );

    bed.topo.client_roam_to_v6_only(CLIENT_IP6).unwrap();
    assert!(
        bed.topo.client.ping(&RELAY_CLIENT_IP.to_string()).is_err(),
        "the laptop still has IPv4"
    );
    roundtrip(&client, "on-v6").unwrap();
    let flow = answered_flow(&bed.relay, &session, &v6_prefix(CLIENT_IP6));
    assert_eq!(flow.relay_addr, RELAY_CLIENT_IP6.to_string(), "{flow:?}");
    keystrokes_take_xdp(&bed.relay, &session, &v6_prefix(CLIENT_IP6), &client);
}

/// Forgers on the client's segment and on the server's link send IPv6
/// datagrams whose source is the server's endpoint, to the relay's IPv6
/// addresses at the session's port P and its flow port Q, while a real
/// mosh session runs over IPv6: none reaches the client, and the session
/// keeps working. Left out, as for IPv4 (tests/forged_server.rs): the
/// server's own path, where a forger is the server for any router.
#[test]
fn forged_ipv6_server_datagrams_never_reach_the_client() {
    forged_ipv6_server_datagrams(&[]);
}

/// The same on the userspace datapath, where the daemon's sockets judge
/// every datagram from IPV6_PKTINFO instead of XDP.
#[test]
fn forged_ipv6_server_datagrams_never_reach_the_client_userspace() {
    forged_ipv6_server_datagrams(&["--datapath", "userspace"]);
}

fn forged_ipv6_server_datagrams(relay_args: &[&str]) {
    prereq::require().unwrap();
    let (topo, segment) = client_segment_with_attacker().unwrap();
    topo.add_v6(Stack::V6Only, Stack::V6Only).unwrap();
    let attacker_ip6 = std::net::Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 0x66);
    segment
        .attacker
        .add_addr6(attacker_ip6, ATTACKER_IF)
        .unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), relay_args).unwrap();
    let server = MoshServer::start(&topo.server, SERVER_IP6, MOSH_SERVER_PORT).unwrap();
    let server_endpoint = SocketAddr::new(SERVER_IP6.into(), server.port);
    let session = relay.add(server_endpoint, &[]).unwrap();
    let capture = Capture::start(&topo.client, CLIENT_IF).unwrap();
    let client =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP6, session.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "before").unwrap();
    let flow = answered_flow(&relay, &session.id, &v6_prefix(CLIENT_IP6));

    let sites = [
        ForgerSite {
            ns: &segment.attacker,
            ifname: ATTACKER_IF,
            relay_if: RELAY_CLIENT_IF,
        },
        ForgerSite {
            ns: &topo.server,
            ifname: SERVER_IF,
            relay_if: RELAY_SERVER_IF,
        },
    ];
    let targets: Vec<SocketAddr> = [RELAY_CLIENT_IP6, RELAY_SERVER_IP6]
        .into_iter()
        .flat_map(|ip| {
            [session.port, flow.upstream_port].map(|port| SocketAddr::new(ip.into(), port))
        })
        .collect();
    let server_path = SocketAddr::new(RELAY_SERVER_IP6.into(), flow.upstream_port);
    let mut forged = std::collections::HashSet::new();
    for burst in 0..3 {
        forged.extend(
            forge_server_datagrams_any(
                &topo.relay,
                &sites,
                server_endpoint,
                &targets,
                5,
                |site, to| site == 1 && to == server_path,
            )
            .unwrap(),
        );
        roundtrip(&client, &format!("burst{burst}")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let frames = capture.finish();
    let at_client: Vec<_> = udp_datagrams_any(&frames)
        .into_iter()
        .filter(|d| d.dst.ip() == IpAddr::from(CLIENT_IP6))
        .collect();
    assert!(
        !at_client.is_empty(),
        "the capture saw none of the server's datagrams: is it on the right interface?"
    );
    let delivered: Vec<_> = at_client
        .iter()
        .filter(|d| forged.contains(&d.payload))
        .collect();
    assert!(
        delivered.is_empty(),
        "{} of {} forged IPv6 datagrams reached the client: {delivered:?}",
        delivered.len(),
        forged.len()
    );
    assert!(
        at_client
            .iter()
            .all(|d| d.src == SocketAddr::new(RELAY_CLIENT_IP6.into(), session.port)),
        "the client got datagrams from elsewhere than the session's port"
    );
    eprintln!(
        "{} forged IPv6 datagrams sent, 0 delivered; the client got {} datagrams, all the server's",
        forged.len(),
        at_client.len()
    );
    roundtrip(&client, "after").unwrap();
}

/// A server with IPv6 only punches to the relay over IPv6 (`forwarder
/// mosh-server --relay [v6]:port`: the IPv6 kinds of the handshake, and
/// mosh-server bound dual-stack), and an IPv4-only client reaches it
/// through the punched session at the relay's `--public-addr`, both
/// directions in XDP.
#[test]
fn a_server_punches_over_ipv6_and_an_ipv4_client_reaches_it() {
    prereq::require().unwrap();
    let topo = Topology::dual_stack(Stack::V4Only, Stack::V6Only).unwrap();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), forwarder_testbed::nat::random_secret()).unwrap();
    let secret_path = secret.path().to_str().unwrap();
    let public = RELAY_CLIENT_IP.to_string();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--punch-port",
            "7000",
            "--punch-secret-file",
            secret_path,
            "--public-addr",
            &public,
        ],
    )
    .unwrap();
    let punch = SocketAddr::new(RELAY_SERVER_IP6.into(), 7000).to_string();
    let (server, wrapped) = MoshServer::start_wrapped(
        &topo.server,
        &["--relay", &punch, "--secret-file", secret_path],
    )
    .unwrap();
    assert_eq!(wrapped.ip, RELAY_CLIENT_IP, "MOSH IP is --public-addr");
    assert!(
        wrapped
            .stderr
            .contains(&format!("sees this host as [{SERVER_IP6}]:")),
        "the relay saw the server over IPv6: {}",
        wrapped.stderr
    );
    let sessions = relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = sessions[0].clone();
    assert!(
        session.backend.starts_with(&format!("[{SERVER_IP6}]:")),
        "{session:?}"
    );
    let nat = session.nat.clone().expect("a punched session says so");
    assert!(nat.bound && nat.key_received, "{nat:?}");
    let client = MoshClient::start(&topo.client, wrapped.ip, server.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "punched6").unwrap();
    let client_ip = format!("{}:", forwarder_testbed::topology::CLIENT_IP);
    answered_flow(&relay, &session.id, &client_ip);
    // The punched session's client half is a translated (IPv4 in, IPv6
    // out) one: the client's keystrokes stay in XDP too.
    keystrokes_take_xdp(&relay, &session.id, &client_ip, &client);
}
