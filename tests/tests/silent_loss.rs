//! Conditions in which the kernel drops what XDP counted as forwarded, or
//! sends every packet to the slow path, without a counter of the relay's
//! saying so: the daemon detects each, logs a warning with the fix and
//! lists it under `warnings` in `stats` (text and JSON) and in the metrics.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IF, SERVER_IP};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, prereq};

const PROBE_WAIT: Duration = Duration::from_millis(300);
/// The daemon checks every 2 s; give it a few rounds.
const DETECT_WITHIN: Duration = Duration::from_secs(10);

const METRICS: &str = "127.0.0.1:9464";

fn scrape(topo: &Topology) -> String {
    topo.relay.http_get(METRICS, "/metrics").unwrap()
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn warnings(relay: &Relay) -> Vec<(String, String)> {
    relay.stats().unwrap()["warnings"]
        .as_array()
        .expect("stats --json has a warnings list")
        .iter()
        .map(|w| {
            (
                w["kind"].as_str().unwrap().to_string(),
                w["interface"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until the warning (kind, interface) is listed (`present`) or gone.
fn wait_for(relay: &Relay, kind: &str, interface: &str, present: bool, mut poke: impl FnMut()) {
    let deadline = Instant::now() + DETECT_WITHIN;
    loop {
        poke();
        let listed = warnings(relay)
            .iter()
            .any(|(k, i)| k == kind && i == interface);
        if listed == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "warning {kind} on {interface} {} within {DETECT_WITHIN:?}; stats:\n{}",
            if present { "not raised" } else { "not cleared" },
            relay.verb(&["stats"]).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_veth_peer_without_gro_or_xdp_is_named_with_the_fix() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    // veth decides at link-up whether the end takes redirected frames.
    topo.server
        .run("ethtool", &["-K", SERVER_IF, "gro", "off"])
        .unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "down"]).unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "up"]).unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &["--xdp-mode", "native"]).unwrap();
    // The check at start may already have named the peer (it looks at the
    // peer's settings, not at losses); nothing may claim a loss yet.
    assert!(
        warnings(&relay)
            .iter()
            .all(|(kind, _)| kind == "veth_peer_no_gro"),
        "warned of a loss before any packet: {:?}",
        warnings(&relay)
    );
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    wait_for(&relay, "veth_peer_no_gro", "veth-rs", true, || {});
    // Warned before the first packet; and the loss is real: after the
    // first probe (through the daemon), XDP redirects into veth-rs and the
    // kernel drops them.
    let answered = (0..6).filter(|_| pinger.ping(PROBE_WAIT).unwrap()).count();
    assert!(
        answered <= 1,
        "{answered} of 6 probes answered: the condition warned about loses nothing"
    );
    let stats = relay.stats().unwrap();
    // What the daemon cannot see by itself: XDP counted the lost packets as redirected.
    assert!(
        stats["verdicts"]["redirect"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("[veth_peer_no_gro] veth-rs:")
            && text.contains("neither GRO nor an XDP program"),
        "{text}"
    );
    let fix = format!(
        "ip netns exec {} ethtool -K veth-s gro on",
        topo.server.name()
    );
    assert!(
        text.contains(&fix) && text.contains("--xdp-mode skb"),
        "no fix named: {text}"
    );
    let log = relay.log();
    assert!(
        log.contains("WARN") && log.contains("neither GRO nor an XDP program"),
        "not logged:\n{log}"
    );

    // Fixed: GRO on the peer (and a fresh link-up) makes forwarding work again.
    topo.server
        .run("ethtool", &["-K", SERVER_IF, "gro", "on"])
        .unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "down"]).unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "up"]).unwrap();
    wait_for(&relay, "veth_peer_no_gro", "veth-rs", false, || {});
    assert!(
        pinger.ping_any(20, PROBE_WAIT).unwrap(),
        "forwarding did not recover with GRO on"
    );
    for _ in 0..5 {
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "packets still lost with GRO on the peer"
        );
    }
}

#[test]
fn an_interface_down_and_forwarding_off_are_named_and_cleared() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    topo.relay.ip(&["link", "set", "lo", "up"]).unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--xdp-mode", "native", "--metrics", METRICS],
    )
    .unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, PROBE_WAIT).unwrap());
    assert!(warnings(&relay).is_empty(), "{:?}", warnings(&relay));

    // The server's end goes down: the relay's veth-rs loses its carrier.
    topo.server.ip(&["link", "set", SERVER_IF, "down"]).unwrap();
    wait_for(&relay, "interface_down", "veth-rs", true, || {});
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("[interface_down] veth-rs:") && text.contains("ip link set veth-rs up"),
        "{text}"
    );
    let metrics = scrape(&topo);
    let series = format!(
        "forwarder_warning{{relay=\"{}\",kind=\"interface_down\",interface=\"veth-rs\"}} 1",
        relay.instance()
    );
    assert!(
        metrics.contains(&series),
        "no {series} in the metrics:\n{metrics}"
    );
    topo.server.ip(&["link", "set", SERVER_IF, "up"]).unwrap();
    wait_for(&relay, "interface_down", "veth-rs", false, || {});

    // Forwarding off: every packet goes to the slow path (fib_failed).
    topo.relay.sysctl("net.ipv4.ip_forward", "0").unwrap();
    wait_for(&relay, "forwarding_disabled", "veth-rc", true, || {});
    let before = relay.stats().unwrap()["reasons"]["fib_failed"]["packets"]
        .as_u64()
        .unwrap_or(0);
    for _ in 0..5 {
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "the slow path should still carry the flow"
        );
    }
    let stats = relay.stats().unwrap();
    let after = stats["reasons"]["fib_failed"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after > before,
        "forwarding off did not show as fib_failed: {stats}"
    );
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("[forwarding_disabled] veth-rc:")
            && text.contains("sysctl -w net.ipv4.ip_forward=1"),
        "{text}"
    );
    assert!(
        relay.log().contains("IPv4 forwarding is off on veth-rc"),
        "not logged"
    );
    topo.relay.sysctl("net.ipv4.ip_forward", "1").unwrap();
    wait_for(&relay, "forwarding_disabled", "veth-rc", false, || {});
    wait_for(&relay, "forwarding_disabled", "veth-rs", false, || {});
}

/// A peer in a namespace the daemon cannot name (a container's, say) cannot
/// be inspected; the loss is then found in the veths' own counters: what
/// one veth redirected never shows up as transmitted by the other.
#[test]
fn a_veth_peer_that_cannot_be_inspected_is_named_by_its_losses() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    topo.server
        .run("ethtool", &["-K", SERVER_IF, "gro", "off"])
        .unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "down"]).unwrap();
    topo.server.ip(&["link", "set", SERVER_IF, "up"]).unwrap();
    // The daemon gets a mount namespace with an empty /run/netns: it sees
    // no named namespaces, as with a peer in an anonymous one.
    let bin = forwarder_testbed::forwarder_bin()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let instance = format!(
        "t{}-{}",
        std::process::id(),
        forwarder_testbed::netns::random_tag()
    );
    let state = tempfile::tempdir().unwrap();
    let command: Vec<String> = [
        "nsenter".to_string(),
        format!("--net={}", topo.relay.path().display()),
        "--".into(),
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        "mount -t tmpfs tmpfs /run/netns && exec \"$0\" \"$@\"".into(),
        bin,
        "run".into(),
        "--instance".into(),
        instance.clone(),
        "--state-dir".into(),
        state.path().join("state").to_string_lossy().into_owned(),
        "--iface".into(),
        "veth-rc".into(),
        "--iface".into(),
        "veth-rs".into(),
        "--xdp-mode".into(),
        "native".into(),
    ]
    .into();
    let relay = Relay::start_command(command, &instance, Some(state.path().join("state"))).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    wait_for(&relay, "veth_peer_drops", "veth-rs", true, || {
        for _ in 0..10 {
            let _ = pinger.ping(Duration::from_millis(20));
        }
    });
    let kinds = warnings(&relay);
    assert!(
        !kinds.iter().any(|(k, _)| k == "veth_peer_no_gro"),
        "the peer was inspected after all: {kinds:?}"
    );
    assert!(
        !kinds.iter().any(|(_, i)| i == "veth-rc"),
        "veth-rc forwards fine but was blamed: {kinds:?}"
    );
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("[veth_peer_drops] veth-rs: about") && text.contains("--xdp-mode skb"),
        "{text}"
    );
}

/// An interface deleted and re-created while the daemon runs has no XDP
/// program: the daemon says so, and that a restart attaches again.
#[test]
fn a_recreated_interface_without_xdp_is_named() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &["--xdp-mode", "native"]).unwrap();
    topo.relay.ip(&["link", "del", "veth-rs"]).unwrap();
    wait_for(&relay, "interface_missing", "veth-rs", true, || {});
    forwarder_testbed::veth_pair(&topo.relay, "veth-rs", &topo.server, SERVER_IF).unwrap();
    topo.relay
        .add_addr(forwarder_testbed::topology::RELAY_SERVER_IP, "veth-rs")
        .unwrap();
    topo.server.add_addr(SERVER_IP, SERVER_IF).unwrap();
    topo.server
        .default_via(forwarder_testbed::topology::RELAY_SERVER_IP)
        .unwrap();
    wait_for(&relay, "xdp_detached", "veth-rs", true, || {});
    wait_for(&relay, "interface_missing", "veth-rs", false, || {});
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("[xdp_detached] veth-rs:") && text.contains("restart the daemon"),
        "{text}"
    );
    assert!(
        !warnings(&relay).iter().any(|(_, i)| i == "veth-rc"),
        "{:?}",
        warnings(&relay)
    );
}
