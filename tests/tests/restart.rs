//! The daemon can die and come back without users noticing: the pinned data
//! plane forwards established flows meanwhile, and the restarted daemon
//! returns to exactly the sessions and flows it had.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, SessionInfo, Topology, UdpEcho, UdpPinger, UdpStream, prereq};

const PROBE_WAIT: Duration = Duration::from_secs(1);
const RESTARTS: usize = 10;
/// Datagrams per second of the ping-pong stream.
const STREAM_RATE: u32 = 4000;

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A session's identity and its flows' (client, upstream port).
type Shape = (String, u16, String, Vec<(String, u16)>);

/// What must be identical across restarts: sessions and their flows, not counters.
fn shape(sessions: &[SessionInfo]) -> BTreeSet<Shape> {
    sessions
        .iter()
        .map(|s| {
            let mut flows: Vec<(String, u16)> = s
                .flows
                .iter()
                .map(|f| (f.client.clone(), f.upstream_port))
                .collect();
            flows.sort();
            (s.id.clone(), s.port, s.backend.clone(), flows)
        })
        .collect()
}

/// A flow installed in the kernel, proven by echoes through the relay.
fn established(
    topo: &Topology,
    relay: &Relay,
    echo: &UdpEcho,
) -> (UdpPinger, forwarder_testbed::Session) {
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(
        pinger.ping_any(10, PROBE_WAIT).unwrap(),
        "no echo through {session:?}"
    );
    for _ in 0..3 {
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "echoes stopped through {session:?}"
        );
    }
    (pinger, session)
}

#[test]
fn udp_stream_loses_nothing_across_ten_sigkill_restarts() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let (pinger, session) = established(&topo, &relay, &echo);
    let client = pinger.local_addr().unwrap();
    drop(pinger);
    let before = relay.sessions().unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].flows.len(), 1, "{before:?}");

    // The stream reuses the established flow's client endpoint.
    let stream = UdpStream::start(
        &topo.client,
        client,
        v4(RELAY_CLIENT_IP, session.port),
        STREAM_RATE,
    )
    .unwrap();
    let mut ready = Vec::new();
    for _ in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(150));
        relay.kill9().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        ready.push(relay.restart().unwrap());
    }
    std::thread::sleep(Duration::from_millis(150));
    let report = stream.finish();
    eprintln!(
        "stream across {RESTARTS} SIGKILL restarts: {report:?}; restart-to-ready times: {ready:?}"
    );
    assert!(
        report.sent > u64::from(STREAM_RATE),
        "the stream hardly ran: {report:?}"
    );
    assert_eq!(
        report.lost, 0,
        "datagrams lost across daemon restarts: {report:?}"
    );

    let after = relay.sessions().unwrap();
    assert_eq!(
        shape(&after),
        shape(&before),
        "sessions or flows changed across restarts"
    );
    let flow = &after[0].flows[0];
    assert!(
        flow.fast_path_packets >= report.sent,
        "the stream did not stay in the kernel: {flow:?} vs {report:?}"
    );
    // Clean SIGTERM keeps forwarding too, and the next start adopts it.
    relay.terminate().unwrap();
    let mut old_flow =
        UdpPinger::new(&topo.client, client, v4(RELAY_CLIENT_IP, session.port)).unwrap();
    assert!(
        old_flow.ping(PROBE_WAIT).unwrap(),
        "the established flow stopped after SIGTERM"
    );
    relay.restart().unwrap();
    assert_eq!(shape(&relay.sessions().unwrap()), shape(&before));
    // A new client endpoint after the restart is learned as usual.
    let mut new_flow = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(
        new_flow.ping_any(10, PROBE_WAIT).unwrap(),
        "a new flow is not learned after a restart"
    );
}

#[test]
fn mosh_typing_works_while_the_daemon_is_down_and_after_restarts() {
    let mut m = MoshThroughRelay::start(&[]).unwrap();
    m.roundtrip("before").unwrap();
    let before = m.relay.sessions().unwrap();
    for round in 0..3 {
        m.relay.kill9().unwrap();
        m.roundtrip(&format!("down{round}")).unwrap();
        m.relay.restart().unwrap();
        m.roundtrip(&format!("up{round}")).unwrap();
    }
    let after = m.relay.sessions().unwrap();
    assert_eq!(
        shape(&after),
        shape(&before),
        "sessions or flows changed across restarts"
    );
}

/// Many `add`s race a SIGKILL; after the restart every session is complete
/// (listed, its port held by the daemon) or absent, every acknowledged add
/// survived, and the kernel maps hold exactly the listed flows.
#[test]
fn sigkill_during_concurrent_adds_leaves_nothing_half_made() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--ports", "60000-60063"],
    )
    .unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let (mut pinger, first) = established(&topo, &relay, &echo);

    const THREADS: u16 = 6;
    const ADDS_PER_THREAD: u16 = 8;
    let acknowledged: Vec<String> = std::thread::scope(|scope| {
        let adders: Vec<_> = (0..THREADS)
            .map(|thread| {
                let relay = &relay;
                scope.spawn(move || {
                    let mut ok = Vec::new();
                    for i in 0..ADDS_PER_THREAD {
                        let backend = v4(SERVER_IP, 8000 + thread * 100 + i);
                        if let Ok(session) = relay.add(backend, &[]) {
                            ok.push(session.id);
                        }
                    }
                    ok
                })
            })
            .collect();
        // Kill once some adds went through and others are under way.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while relay.sessions().map(|s| s.len()).unwrap_or(0) < 10
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = nix::unistd::Pid::from_raw(relay.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        adders.into_iter().flat_map(|a| a.join().unwrap()).collect()
    });
    relay.kill9().unwrap();
    let took = relay.restart().unwrap();
    eprintln!(
        "{} adds acknowledged before SIGKILL; restart-to-ready {took:?}",
        acknowledged.len()
    );

    let sessions = relay.sessions().unwrap();
    let listed: BTreeSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    for id in acknowledged.iter().chain([&first.id]) {
        assert!(
            listed.contains(id.as_str()),
            "acknowledged session {id} lost: {sessions:?}"
        );
    }
    let ports: BTreeSet<u16> = sessions.iter().map(|s| s.port).collect();
    assert_eq!(
        ports.len(),
        sessions.len(),
        "two sessions share a port: {sessions:?}"
    );
    // Complete: the daemon holds every listed port; absent: nobody holds the rest.
    for port in 60000..=60063 {
        let bindable = topo.relay.udp_bind(v4(Ipv4Addr::UNSPECIFIED, port)).is_ok();
        assert_eq!(
            bindable,
            !ports.contains(&port),
            "port {port}: listed={} but bindable={bindable}",
            ports.contains(&port)
        );
    }
    // The established flow survived and is the only thing in the maps.
    assert!(
        pinger.ping_any(3, PROBE_WAIT).unwrap(),
        "the established flow stopped"
    );
    let flows: usize = relay
        .sessions()
        .unwrap()
        .iter()
        .map(|s| s.flows.len())
        .sum();
    assert_eq!(flows, 1);
    let stats = relay.stats().unwrap();
    // Each side's IPv4 halves, in their ports' slots or the hash map.
    for side in ["CLIENT", "BACKEND"] {
        let entries: u64 = [format!("{side}_FLOWS"), format!("{side}_PORT_SLOTS")]
            .iter()
            .map(|map| {
                stats["capacity"]["maps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["name"] == *map)
                    .unwrap_or_else(|| panic!("{map} missing from stats: {stats}"))["entries"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        assert_eq!(
            entries, flows as u64,
            "the {side} halves are not exactly the listed flows: {stats}"
        );
    }
}
