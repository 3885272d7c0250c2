//! Two daemons with different `--instance` names and disjoint port ranges on
//! one host: each forwards its own session and lists only its own.
//!
//! They run in two separate relay namespaces because an interface takes one XDP
//! program; what instances must keep apart is host-wide anyway (control
//! sockets under /run/forwarder, bpffs pins, state files), and the namespaces
//! share all of that, so the test still exercises every collision that matters.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, Session, Topology, UdpEcho, UdpPinger, prereq};

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

struct Side {
    // Drop order: echo, relay, then the namespaces.
    echo: UdpEcho,
    relay: Relay,
    topo: Topology,
}

fn side(ports: &str, flow_ports: &str) -> Side {
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--ports", ports, "--flow-ports", flow_ports],
    )
    .unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    Side { echo, relay, topo }
}

fn assert_forwards(side: &Side, session: &Session) {
    let mut pinger = UdpPinger::new(
        &side.topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(
        pinger.ping_any(10, Duration::from_secs(1)).unwrap(),
        "instance {} does not forward its session {session:?}",
        side.relay.instance()
    );
}

#[test]
fn two_instances_are_independent() {
    prereq::require().unwrap();
    let a = side("60000-60099", "61000-61099");
    let b = side("60100-60199", "61100-61199");
    assert_ne!(a.relay.instance(), b.relay.instance());

    let sa = a.relay.add(a.echo.addr, &[]).unwrap();
    let sb = b.relay.add(b.echo.addr, &[]).unwrap();
    assert!(
        (60000..=60099).contains(&sa.port),
        "{sa:?} outside instance a's range"
    );
    assert!(
        (60100..=60199).contains(&sb.port),
        "{sb:?} outside instance b's range"
    );

    assert_forwards(&a, &sa);
    assert_forwards(&b, &sb);

    // Ids may be per-instance counters and coincide, so compare ports too:
    // the ranges are disjoint.
    for (side, own, other) in [(&a, &sa, &sb), (&b, &sb, &sa)] {
        let listed: Vec<(String, u16)> = side
            .relay
            .sessions()
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.port))
            .collect();
        assert_eq!(
            listed,
            vec![(own.id.clone(), own.port)],
            "instance {} lists {listed:?}; expected only its own session (the other's is {other:?})",
            side.relay.instance(),
        );
    }
    let fa = a.relay.session(&sa.id).unwrap().unwrap().flows;
    let fb = b.relay.session(&sb.id).unwrap().unwrap().flows;
    assert!(
        fa.iter()
            .all(|f| (61000..=61099).contains(&f.upstream_port)),
        "{fa:?}"
    );
    assert!(
        fb.iter()
            .all(|f| (61100..=61199).contains(&f.upstream_port)),
        "{fb:?}"
    );
}

/// A second instance pointed at interfaces the first one's XDP link holds
/// says so and names the owner, instead of falling back to the userspace
/// datapath as if XDP were unavailable; it leaves nothing behind and the
/// first one untouched.
#[test]
fn a_second_instance_on_the_same_interfaces_names_the_owner() {
    prereq::require().unwrap();
    let a = side("60000-60099", "61000-61099");
    let sa = a.relay.add(a.echo.addr, &[]).unwrap();
    assert_forwards(&a, &sa);

    let bin = forwarder_testbed::forwarder_bin().unwrap();
    let state = tempfile::tempdir().unwrap();
    for mode in ["auto", "native", "skb"] {
        let instance = format!(
            "t{}-{}",
            std::process::id(),
            forwarder_testbed::netns::random_tag()
        );
        let mut run = a.topo.relay.nsenter(bin.to_str().unwrap());
        run.args(["run", "--instance", &instance, "--xdp-mode", mode])
            .args(["--iface", "veth-rc", "--iface", "veth-rs"])
            .args(["--ports", "60100-60199", "--flow-ports", "61100-61199"])
            .arg("--state-dir")
            .arg(state.path().join(&instance));
        // Bounded: a daemon that wrongly starts would otherwise run forever.
        let out = forwarder_testbed::cmd::run(&mut run, Duration::from_secs(30)).unwrap();
        assert!(
            !out.success(),
            "--xdp-mode {mode}: a second instance started on taken interfaces"
        );
        let expected = format!(
            "interface veth-rc already has an XDP program attached (by forwarder instance \"{}\"",
            a.relay.instance()
        );
        assert!(
            out.stderr.contains(&expected),
            "--xdp-mode {mode}: unclear refusal:\n{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("XDP is not available"),
            "--xdp-mode {mode} fell back:\n{}",
            out.stderr
        );
        let pins = std::path::Path::new("/sys/fs/bpf/forwarder").join(&instance);
        assert!(
            !pins.exists(),
            "--xdp-mode {mode}: the refused instance left {}",
            pins.display()
        );
        let socket = std::path::Path::new("/run/forwarder").join(format!("{instance}.sock"));
        assert!(
            !socket.exists(),
            "--xdp-mode {mode}: the refused instance left {}",
            socket.display()
        );
    }
    assert_forwards(&a, &sa);
}
