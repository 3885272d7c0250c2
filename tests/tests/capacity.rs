//! Explicit limits: full tables refuse new sessions and flows with a clear
//! error while established traffic goes on; a data plane pinned with another
//! map layout is refused; `detach` really removes the data plane.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use forwarder_testbed::raw::{PacketSocket, mac_of, udp_frame};
use forwarder_testbed::topology::{
    CLIENT_IF, CLIENT_IP, CLIENT_IP6, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_CLIENT_IP6,
    SERVER_IP, SERVER_IP6, Stack,
};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, forwarder_bin, prereq};

const PROBE_WAIT: Duration = Duration::from_secs(1);

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Installed halves of one side (`CLIENT` or `BACKEND`): the IPv4 ones in
/// their ports' slots and in the hash map.
fn ipv4_halves(stats: &serde_json::Value, side: &str) -> u64 {
    [format!("{side}_FLOWS"), format!("{side}_PORT_SLOTS")]
        .iter()
        .map(|name| map_entries(stats, name)["entries"].as_u64().unwrap())
        .sum()
}

fn map_entries(stats: &serde_json::Value, name: &str) -> serde_json::Value {
    stats["capacity"]["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("{name} missing from stats: {stats}"))
        .clone()
}

#[test]
fn full_tables_refuse_cleanly_and_established_traffic_goes_on() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--max-sessions",
            "3",
            "--max-flows",
            "2",
            "--max-flows-per-session",
            "1",
        ],
    )
    .unwrap();
    let echoes: Vec<UdpEcho> = (0..3)
        .map(|i| UdpEcho::start(&topo.server, v4(SERVER_IP, 7000 + i)).unwrap())
        .collect();
    let sessions: Vec<_> = echoes
        .iter()
        .map(|e| relay.add(e.addr, &[]).unwrap())
        .collect();
    let refused = relay.add(v4(SERVER_IP, 7100), &[]).unwrap_err().to_string();
    assert!(
        refused.contains("maximum of 3 sessions"),
        "unclear refusal: {refused}"
    );

    let pinger =
        |port| UdpPinger::new(&topo.client, v4(CLIENT_IP, 0), v4(RELAY_CLIENT_IP, port)).unwrap();
    let mut first = pinger(sessions[0].port);
    let mut second = pinger(sessions[1].port);
    assert!(first.ping_any(10, PROBE_WAIT).unwrap());
    assert!(second.ping_any(10, PROBE_WAIT).unwrap());

    // The flow maps hold 2 flows: a third session's first flow is refused...
    let mut third = pinger(sessions[2].port);
    assert!(
        !third.ping_any(3, PROBE_WAIT).unwrap(),
        "a flow beyond --max-flows was forwarded"
    );
    // ...and so is a second flow on a session allowed one.
    let mut roamer = pinger(sessions[0].port);
    assert!(
        !roamer.ping_any(3, PROBE_WAIT).unwrap(),
        "a flow beyond --max-flows-per-session was forwarded"
    );

    for _ in 0..5 {
        assert!(
            first.ping_any(2, PROBE_WAIT).unwrap(),
            "established flow disturbed by full tables"
        );
        assert!(
            second.ping_any(2, PROBE_WAIT).unwrap(),
            "established flow disturbed by full tables"
        );
    }
    let stats = relay.stats().unwrap();
    assert_eq!(stats["capacity"]["max_flows"], 2, "{stats}");
    // Not given: --max-flows6 follows --max-flows (below its cap).
    assert_eq!(stats["capacity"]["max_flows6"], 2, "{stats}");
    assert_eq!(stats["capacity"]["max_sessions"], 3, "{stats}");
    let client_flows = map_entries(&stats, "CLIENT_FLOWS");
    assert_eq!(
        (
            serde_json::Value::from(ipv4_halves(&stats, "CLIENT")),
            client_flows["max_entries"].clone()
        ),
        (2.into(), 2.into())
    );
    assert!(
        stats["slow_path"]["refused_flow_limit"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(
        stats["capacity"]["kernel_bytes_per_flow"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let log = relay.log();
    assert!(
        log.contains("the relay's flow table is full"),
        "no clear log line for the full flow table"
    );
    assert!(
        log.contains("session has its maximum of flows"),
        "no clear log line for the per-session limit"
    );
}

#[test]
fn ipv6_and_translated_flows_are_refused_at_max_flows6_while_ipv4_flows_fit() {
    prereq::require().unwrap();
    let topo = Topology::dual_stack(Stack::Dual, Stack::Dual).unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--max-flows", "3", "--max-flows6", "1"],
    )
    .unwrap();
    let echo4 = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let echo6 = UdpEcho::start(&topo.server, (SERVER_IP6, 7001).into()).unwrap();
    let to4 = relay.add(echo4.addr, &[]).unwrap();
    let to6 = relay.add(echo6.addr, &[]).unwrap();
    let v6_client = SocketAddr::from((CLIENT_IP6, 0));
    let v4_client = v4(CLIENT_IP, 0);
    let relay6 = |port| SocketAddr::from((RELAY_CLIENT_IP6, port));
    let relay4 = |port| v4(RELAY_CLIENT_IP, port);
    let pinger = |client, to| UdpPinger::new(&topo.client, client, to).unwrap();

    // One IPv6 flow fills --max-flows6 1...
    let mut six = pinger(v6_client, relay6(to6.port));
    assert!(six.ping_any(10, PROBE_WAIT).unwrap());
    // ...so a second IPv6 flow is refused, and so are translated ones
    // (their halves are in the same maps), either way round.
    for (client, to, what) in [
        (v6_client, relay6(to6.port), "a second IPv6 flow"),
        (
            v4_client,
            relay4(to6.port),
            "an IPv4 client of the IPv6 server",
        ),
        (
            v6_client,
            relay6(to4.port),
            "an IPv6 client of the IPv4 server",
        ),
    ] {
        assert!(
            !pinger(client, to).ping_any(3, PROBE_WAIT).unwrap(),
            "{what} was forwarded beyond --max-flows6"
        );
    }
    // IPv4 flows have their own room: all three of --max-flows fit.
    let mut fours: Vec<UdpPinger> = (0..3)
        .map(|_| pinger(v4_client, relay4(to4.port)))
        .collect();
    for four in &mut fours {
        assert!(
            four.ping_any(10, PROBE_WAIT).unwrap(),
            "an IPv4 flow was refused while the IPv4 room was free"
        );
    }
    assert!(
        !pinger(v4_client, relay4(to4.port))
            .ping_any(3, PROBE_WAIT)
            .unwrap(),
        "a flow beyond --max-flows was forwarded"
    );
    assert!(
        six.ping_any(3, PROBE_WAIT).unwrap(),
        "the established IPv6 flow was disturbed by the full tables"
    );

    let stats = relay.stats().unwrap();
    assert_eq!(stats["capacity"]["max_flows"], 3, "{stats}");
    assert_eq!(stats["capacity"]["max_flows6"], 1, "{stats}");
    for (map, size) in [
        ("CLIENT_FLOWS", 3),
        ("BACKEND_FLOWS", 3),
        ("CLIENT_FLOWS6", 1),
        ("BACKEND_FLOWS6", 1),
        ("CLIENT_FLOWS_4TO6", 1),
        ("BACKEND_FLOWS_4TO6", 1),
    ] {
        assert_eq!(
            map_entries(&stats, map)["max_entries"],
            size,
            "{map}: {stats}"
        );
    }
    assert_eq!(ipv4_halves(&stats, "CLIENT"), 3, "{stats}");
    assert_eq!(
        map_entries(&stats, "CLIENT_FLOWS6")["entries"],
        1,
        "{stats}"
    );
    assert!(
        stats["slow_path"]["refused_flow_limit"].as_u64().unwrap() >= 4,
        "{stats}"
    );
    let log = relay.log();
    assert!(
        log.contains(
            "the relay's IPv6 flow table is full (1 IPv6 and translated flows: raise --max-flows6"
        ),
        "no clear log line for the full IPv6 flow table"
    );
    assert!(
        log.contains("the relay's flow table is full (3 IPv4 flows: raise --max-flows "),
        "no clear log line for the full IPv4 flow table"
    );
}

#[test]
fn other_layout_is_refused_and_detach_removes_the_data_plane() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, PROBE_WAIT).unwrap());

    // A pin folder from a forwarder with another map layout.
    relay.kill9().unwrap();
    let instance_dir = std::path::Path::new("/sys/fs/bpf/forwarder").join(relay.instance());
    let foreign = instance_dir.join("layout-0-0000000000000000");
    std::fs::create_dir(&foreign).unwrap();
    let bin = forwarder_bin().unwrap();
    let state_dir = relay.state_dir().to_string_lossy().into_owned();
    let mut start = topo.relay.nsenter(bin.to_str().unwrap());
    start
        .args([
            "run",
            "--instance",
            relay.instance(),
            "--state-dir",
            &state_dir,
        ])
        .args(["--iface", "veth-rc", "--iface", "veth-rs"]);
    // Bounded: a daemon that wrongly starts would otherwise run forever.
    let out = forwarder_testbed::cmd::run(&mut start, Duration::from_secs(30)).unwrap();
    let stderr = &out.stderr;
    assert!(!out.success(), "a daemon started on a foreign layout");
    assert!(
        stderr.contains("layout-0-0000000000000000") && stderr.contains("forwarder detach"),
        "unclear: {stderr}"
    );
    std::fs::remove_dir(&foreign).unwrap();
    // The refused start touched nothing: still forwarding.
    assert!(
        pinger.ping_any(3, PROBE_WAIT).unwrap(),
        "a refused start disturbed forwarding"
    );

    // Detach refuses while the daemon runs, then removes everything.
    relay.restart().unwrap();
    let refused = relay.verb(&["detach"]).unwrap_err().to_string();
    assert!(refused.contains("stop it first"), "{refused}");
    relay.terminate().unwrap();
    assert!(
        pinger.ping_any(3, PROBE_WAIT).unwrap(),
        "SIGTERM stopped forwarding"
    );
    relay.verb(&["detach", "--state-dir", &state_dir]).unwrap();
    assert!(!instance_dir.exists(), "pins left behind by detach");
    for i in 0..3 {
        assert!(
            !pinger.ping(PROBE_WAIT).unwrap(),
            "probe {i} echoed after detach"
        );
    }
}

/// Sends one datagram from each of `client_ports` (raw frames from the
/// client's address, no socket per endpoint) to `relay_port`, paced so the
/// daemon's session socket does not overflow: every source port is a new
/// client endpoint, hence a new flow.
fn send_new_flows(
    topo: &Topology,
    socket: &PacketSocket,
    relay_port: u16,
    client_ports: impl Iterator<Item = u16>,
    per_ms: usize,
) {
    let macs = (
        mac_of(&topo.client, CLIENT_IF).unwrap(),
        mac_of(&topo.relay, RELAY_CLIENT_IF).unwrap(),
    );
    let to = SocketAddrV4::new(RELAY_CLIENT_IP, relay_port);
    let payload = [0x5au8; 32];
    let started = Instant::now();
    for (sent, port) in client_ports.enumerate() {
        let frame = udp_frame(macs, SocketAddrV4::new(CLIENT_IP, port), to, &payload);
        while !socket.send(&frame).unwrap() {
            std::thread::sleep(Duration::from_micros(200));
        }
        // Pace: at most `per_ms` frames a millisecond on average.
        let due = Duration::from_micros((sent as u64 + 1) * 1000 / per_ms as u64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Client ports 20000.. give every session the same set of endpoints; the
/// flows differ by the session port they are sent to.
const FIRST_CLIENT_PORT: u16 = 20_000;

#[test]
fn flows_beyond_the_compiled_default_install_and_the_last_forwards_in_xdp() {
    prereq::require().unwrap();
    const SESSIONS: u16 = 17;
    const FLOWS_PER_SESSION: u16 = 1_000;
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--xdp-mode",
            "native",
            "--max-flows",
            "65536",
            "--max-sessions",
            "64",
            "--max-flows-per-session",
            "2000",
            "--new-flows-per-sec",
            "1000000",
            // The raw-frame flows are installed faster than their echoes
            // come back: let them all wait for their answer.
            "--probation-flows-per-session",
            "2000",
            "--flow-ports",
            "10000-59999",
            "--slowpath-pps-per-session",
            "0",
            "--slowpath-pps",
            "0",
        ],
    )
    .unwrap();
    let last_echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000 + SESSIONS - 1)).unwrap();
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| relay.add(v4(SERVER_IP, 7000 + i), &[]).unwrap())
        .collect();
    let socket = PacketSocket::open(&topo.client, CLIENT_IF).unwrap();

    // Every session but the last gets all its flows; the last all but one,
    // which a real socket opens below and which must then stay in XDP.
    let wanted = usize::from(SESSIONS) * usize::from(FLOWS_PER_SESSION) - 1;
    let started = Instant::now();
    let mut installed = 0;
    for round in 0..5 {
        for (index, session) in sessions.iter().enumerate() {
            let count = if index + 1 == sessions.len() {
                FLOWS_PER_SESSION - 1
            } else {
                FLOWS_PER_SESSION
            };
            send_new_flows(
                &topo,
                &socket,
                session.port,
                FIRST_CLIENT_PORT..FIRST_CLIENT_PORT + count,
                8,
            );
        }
        // Established flows' repeats stay in XDP; only missing ones reach the daemon.
        std::thread::sleep(Duration::from_secs(1));
        installed = relay.stats().unwrap()["flows"].as_u64().unwrap() as usize;
        eprintln!(
            "round {round}: {installed} flows installed after {:?}",
            started.elapsed()
        );
        if installed >= wanted {
            break;
        }
    }
    assert_eq!(
        installed,
        wanted,
        "not every flow was installed; log:\n{}",
        tail(&relay.log())
    );

    let last = sessions.last().unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, last.port),
    )
    .unwrap();
    assert!(
        pinger.ping_any(10, PROBE_WAIT).unwrap(),
        "flow {} was not forwarded",
        wanted + 1
    );
    for _ in 0..5 {
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "flow {} stopped forwarding",
            wanted + 1
        );
    }
    let stats = relay.stats().unwrap();
    let total = wanted + 1;
    assert_eq!(
        stats["flows"].as_u64().unwrap() as usize,
        total,
        "{}",
        stats["slow_path"]
    );
    assert!(total > 16_384);
    let client_flows = map_entries(&stats, "CLIENT_FLOWS");
    assert_eq!(ipv4_halves(&stats, "CLIENT") as usize, total, "{stats}");
    assert_eq!(client_flows["max_entries"], 65_536, "{client_flows}");
    assert_eq!(
        map_entries(&stats, "BACKEND_FLOWS")["max_entries"],
        65_536,
        "{stats}"
    );
    // The flow counters live in the flow maps' values: no per-CPU array
    // grows with the cores.
    assert!(
        stats["capacity"]["maps"]
            .as_array()
            .is_some_and(|maps| maps.iter().all(|m| m["name"] != "FLOW_COUNTERS")),
        "{stats}"
    );
    // One slot per port, whatever --max-sessions says.
    assert_eq!(
        map_entries(&stats, "SLOWPATH_SESSION_BUCKETS")["max_entries"],
        65_536
    );
    let local = pinger.local_addr().unwrap().to_string();
    let flow = relay
        .session(&last.id)
        .unwrap()
        .unwrap()
        .flows
        .into_iter()
        .find(|f| f.client == local)
        .expect("the pinger's flow is listed");
    // The first probe went through the daemon; the echoes of the later ones in XDP both ways.
    assert!(
        flow.fast_path_packets >= 8,
        "the last flow is not forwarded in XDP: {flow:?}"
    );
    assert!(last_echo.echoed() >= 6);
    let log = relay.log();
    assert!(!log.contains("out of range"), "{}", tail(&log));
    eprintln!(
        "{total} flows installed over {SESSIONS} sessions in {:?}; the last: {} packets in XDP, {} through the daemon",
        started.elapsed(),
        flow.fast_path_packets,
        flow.slow_path_packets
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn at_the_open_file_limit_flows_are_refused_with_the_cause_and_control_keeps_answering() {
    prereq::require().unwrap();
    const LIMIT: u64 = 300;
    let topo = Topology::client_relay_server().unwrap();
    topo.relay.ip(&["link", "set", "lo", "up"]).unwrap();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--max-open-files",
            "300",
            "--max-flows-per-session",
            "1000",
            "--new-flows-per-sec",
            "1000000",
            "--probation-flows-per-session",
            "1000",
            "--slowpath-pps-per-session",
            "0",
            "--metrics",
            "127.0.0.1:9464",
        ],
    )
    .unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let socket = PacketSocket::open(&topo.client, CLIENT_IF).unwrap();
    // More endpoints than the daemon has descriptors.
    send_new_flows(
        &topo,
        &socket,
        session.port,
        FIRST_CLIENT_PORT..FIRST_CLIENT_PORT + 400,
        2,
    );
    std::thread::sleep(Duration::from_secs(1));

    let stats = relay.stats().unwrap();
    let d = &stats["descriptors"];
    assert_eq!(d["limit"], LIMIT, "{d}");
    let reserve = d["reserve"].as_u64().unwrap();
    assert_eq!(reserve, 64, "{d}");
    let open = d["open"].as_u64().unwrap();
    assert!(
        open <= LIMIT - reserve + 4,
        "the reserve was eaten into: {d}"
    );
    assert!(
        open >= LIMIT - reserve - 4,
        "flows stopped well before the limit: {d}"
    );
    assert!(d["refused_flows"].as_u64().unwrap() > 0, "{d}");
    let flows = stats["flows"].as_u64().unwrap();
    assert!(
        flows > 100 && flows < 300,
        "{flows} flows under a limit of {LIMIT} descriptors"
    );
    let log = relay.log();
    assert!(
        log.contains("new flow refused: the daemon has reached its open-file limit (300"),
        "no refusal naming the open-file limit:\n{}",
        tail(&log)
    );
    assert!(
        !log.contains("no free upstream port"),
        "the refusal blames the port range:\n{}",
        tail(&log)
    );
    // Every new endpoint is refused at the limit: the log gets one a second, the count is in stats.
    let logged = log
        .matches("new flow refused: the daemon has reached its open-file limit")
        .count();
    assert!(
        logged <= 5,
        "{logged} refusal lines for {} refusals: not throttled",
        d["refused_flows"]
    );

    // The reserve keeps the control socket, a new session and metrics working.
    for _ in 0..20 {
        relay.list().unwrap();
    }
    let text = relay.verb(&["stats"]).unwrap();
    assert!(
        text.contains("open files: ") && text.contains("of 300 (64 kept in reserve"),
        "{text}"
    );
    // The health check runs every 2 s.
    let deadline = Instant::now() + Duration::from_secs(6);
    while !relay
        .verb(&["stats"])
        .unwrap()
        .contains("[open_file_limit] the daemon holds")
    {
        assert!(
            Instant::now() < deadline,
            "no open_file_limit warning: {}",
            relay.verb(&["stats"]).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A new session would take a descriptor of the reserve too: refused
    // with the same cause, while the control socket keeps answering.
    let echo2 = UdpEcho::start(&topo.server, v4(SERVER_IP, 7001)).unwrap();
    let refused = relay.add(echo2.addr, &[]).unwrap_err().to_string();
    assert!(
        refused.contains("open-file limit"),
        "unclear refusal of a session at the limit: {refused}"
    );
    assert!(!relay.sessions().unwrap().is_empty());
    let metrics = topo.relay.http_get("127.0.0.1:9464", "/metrics").unwrap();
    let label = format!("relay=\"{}\"", relay.instance());
    assert!(
        metrics.contains(&format!("forwarder_open_files_limit{{{label}}} 300")),
        "{metrics}"
    );
    assert!(
        metrics.contains("forwarder_flows_refused_open_files_total"),
        "{metrics}"
    );
    // Established flows keep forwarding at the limit.
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(
        !pinger.ping_any(2, PROBE_WAIT).unwrap(),
        "a new flow was admitted past the limit"
    );
    eprintln!(
        "limit {LIMIT}: {flows} flows, {open} descriptors open, refused {}",
        d["refused_flows"]
    );
}

#[test]
fn pinned_maps_of_another_size_are_refused_with_the_way_on() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--max-flows", "1000", "--max-sessions", "50"],
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
    relay.kill9().unwrap();

    let bin = forwarder_bin().unwrap();
    let state_dir = relay.state_dir().to_string_lossy().into_owned();
    // --max-sessions sizes no map any more (the session buckets have a
    // slot per port): only --max-flows and --max-flows6 (which followed
    // --max-flows to 1000) must match the pins.
    for sizes in [
        ["--max-flows", "2000", "--max-sessions", "50"],
        ["--max-flows", "500", "--max-sessions", "60"],
        ["--max-flows", "1000", "--max-flows6", "500"],
    ] {
        let mut start = topo.relay.nsenter(bin.to_str().unwrap());
        start
            .args([
                "run",
                "--instance",
                relay.instance(),
                "--state-dir",
                &state_dir,
            ])
            .args(["--iface", "veth-rc", "--iface", "veth-rs"])
            .args(sizes);
        let out = forwarder_testbed::cmd::run(&mut start, Duration::from_secs(30)).unwrap();
        assert!(
            !out.success(),
            "a daemon adopted pinned maps of another size ({sizes:?})"
        );
        let stderr = &out.stderr;
        assert!(
            stderr.contains("was created with --max-flows 1000, --max-flows6 1000,")
                && stderr.contains("start with --max-flows 1000 --max-flows6 1000")
                && stderr.contains(&format!("forwarder detach --instance {}", relay.instance())),
            "unclear: {stderr}"
        );
        // The refused start touched nothing: the pinned data plane still forwards.
        assert!(
            pinger.ping_any(3, PROBE_WAIT).unwrap(),
            "a refused start disturbed forwarding"
        );
    }
    // The sizes it was created with are adopted.
    relay.restart().unwrap();
    assert!(pinger.ping_any(3, PROBE_WAIT).unwrap());
    let stats = relay.stats().unwrap();
    assert_eq!(stats["capacity"]["max_flows"], 1000, "{stats}");
    assert_eq!(stats["capacity"]["max_flows6"], 1000, "{stats}");
    assert_eq!(stats["capacity"]["max_sessions"], 50, "{stats}");
}
