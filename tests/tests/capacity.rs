//! Explicit limits: full tables refuse new sessions and flows with a clear
//! error while established traffic goes on; a data plane pinned with another
//! map layout is refused; `detach` really removes the data plane.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger, forwarder_bin, prereq};

const PROBE_WAIT: Duration = Duration::from_secs(1);

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
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
        &["--max-sessions", "3", "--max-flows", "2", "--max-flows-per-session", "1"],
    )
    .unwrap();
    let echoes: Vec<UdpEcho> =
        (0..3).map(|i| UdpEcho::start(&topo.server, v4(SERVER_IP, 7000 + i)).unwrap()).collect();
    let sessions: Vec<_> = echoes.iter().map(|e| relay.add(e.addr, &[]).unwrap()).collect();
    let refused = relay.add(v4(SERVER_IP, 7100), &[]).unwrap_err().to_string();
    assert!(refused.contains("maximum of 3 sessions"), "unclear refusal: {refused}");

    let pinger = |port| UdpPinger::new(&topo.client, v4(CLIENT_IP, 0), v4(RELAY_CLIENT_IP, port)).unwrap();
    let mut first = pinger(sessions[0].port);
    let mut second = pinger(sessions[1].port);
    assert!(first.ping_any(10, PROBE_WAIT).unwrap());
    assert!(second.ping_any(10, PROBE_WAIT).unwrap());

    // The flow maps hold 2 flows: a third session's first flow is refused...
    let mut third = pinger(sessions[2].port);
    assert!(!third.ping_any(3, PROBE_WAIT).unwrap(), "a flow beyond --max-flows was forwarded");
    // ...and so is a second flow on a session allowed one.
    let mut roamer = pinger(sessions[0].port);
    assert!(!roamer.ping_any(3, PROBE_WAIT).unwrap(), "a flow beyond --max-flows-per-session was forwarded");

    for _ in 0..5 {
        assert!(first.ping_any(2, PROBE_WAIT).unwrap(), "established flow disturbed by full tables");
        assert!(second.ping_any(2, PROBE_WAIT).unwrap(), "established flow disturbed by full tables");
    }
    let stats = relay.stats().unwrap();
    assert_eq!(stats["capacity"]["max_flows"], 2, "{stats}");
    assert_eq!(stats["capacity"]["max_sessions"], 3, "{stats}");
    let client_flows = map_entries(&stats, "CLIENT_FLOWS");
    assert_eq!((client_flows["entries"].clone(), client_flows["max_entries"].clone()), (2.into(), 2.into()));
    assert!(stats["slow_path"]["refused_flow_limit"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["capacity"]["kernel_bytes_per_flow"].as_u64().unwrap() > 0, "{stats}");
    let log = relay.log();
    assert!(log.contains("the relay's flow table is full"), "no clear log line for the full flow table");
    assert!(log.contains("session has its maximum of flows"), "no clear log line for the per-session limit");
}

#[test]
fn other_layout_is_refused_and_detach_removes_the_data_plane() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(&topo.client, v4(CLIENT_IP, 0), v4(RELAY_CLIENT_IP, session.port)).unwrap();
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
        .args(["run", "--instance", relay.instance(), "--state-dir", &state_dir])
        .args(["--iface", "veth-rc", "--iface", "veth-rs"]);
    // Bounded: a daemon that wrongly starts would otherwise run forever.
    let out = forwarder_testbed::cmd::run(&mut start, Duration::from_secs(30)).unwrap();
    let stderr = &out.stderr;
    assert!(!out.success(), "a daemon started on a foreign layout");
    assert!(stderr.contains("layout-0-0000000000000000") && stderr.contains("forwarder detach"), "unclear: {stderr}");
    std::fs::remove_dir(&foreign).unwrap();
    // The refused start touched nothing: still forwarding.
    assert!(pinger.ping_any(3, PROBE_WAIT).unwrap(), "a refused start disturbed forwarding");

    // Detach refuses while the daemon runs, then removes everything.
    relay.restart().unwrap();
    let refused = relay.verb(&["detach"]).unwrap_err().to_string();
    assert!(refused.contains("stop it first"), "{refused}");
    relay.terminate().unwrap();
    assert!(pinger.ping_any(3, PROBE_WAIT).unwrap(), "SIGTERM stopped forwarding");
    relay.verb(&["detach", "--state-dir", &state_dir]).unwrap();
    assert!(!instance_dir.exists(), "pins left behind by detach");
    for i in 0..3 {
        assert!(!pinger.ping(PROBE_WAIT).unwrap(), "probe {i} echoed after detach");
    }
}
