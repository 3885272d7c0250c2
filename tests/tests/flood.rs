//! A new-flow flood from thousands of spoofed sources at one session's port,
//! at the highest rate one sender thread makes, while a second session
//! carries a UDP ping-pong and a third a real mosh session: the ping-pong
//! keeps at least 99% delivery, mosh answers, and the daemon answers `list`.
//! The XDP program's slow-path bucket is what keeps the flood away from the
//! daemon; the rates reached are printed for the record.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use forwarder_testbed::flood::{FLOOD_SOURCES, Flood};
use forwarder_testbed::hostile::{FLOODER_IF, RELAY_FLOODER_IF, RELAY_FLOODER_IP, attach_flooder};
use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{
    CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, SERVER_IP, Topology,
};
use forwarder_testbed::{UdpEcho, UdpPinger};

/// The flood's bounds: whichever comes first.
const FLOOD_TIME: Duration = Duration::from_secs(6);
const FLOOD_MAX_PACKETS: u64 = 50_000_000;
/// `forwarder list` must answer within this, flood or not (generous on purpose).
const LIST_BOUND: Duration = Duration::from_secs(10);

fn reason_packets(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["reasons"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reason {reason} in stats: {stats}"))
}

#[test]
fn flood_at_one_session_leaves_the_others_working() {
    let topo = Topology::client_relay_server().unwrap();
    let flooder = attach_flooder(&topo).unwrap();
    let m = MoshThroughRelay::start_on(
        topo,
        &[RELAY_CLIENT_IF, RELAY_SERVER_IF, RELAY_FLOODER_IF],
        &[],
    )
    .unwrap();
    m.roundtrip("calm").unwrap();

    let echo = UdpEcho::start(&m.topo.server, SocketAddr::from((SERVER_IP, 7_000))).unwrap();
    let pinged = m.relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &m.topo.client,
        SocketAddr::from((CLIENT_IP, 0)),
        SocketAddr::from((RELAY_CLIENT_IP, pinged.port)),
    )
    .unwrap();
    assert!(
        pinger.ping_any(10, Duration::from_secs(1)).unwrap(),
        "ping-pong session never answered"
    );

    // The flooded session forwards to the discard port: nothing answers it.
    let flooded = m.relay.add(SocketAddr::from((SERVER_IP, 9)), &[]).unwrap();
    let before = m.relay.stats().unwrap();
    let flood = Flood::start(
        &flooder,
        FLOODER_IF,
        (&m.topo.relay, RELAY_FLOODER_IF),
        SocketAddrV4::new(RELAY_FLOODER_IP, flooded.port),
        FLOOD_MAX_PACKETS,
        FLOOD_TIME,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    m.roundtrip("flooded").unwrap();
    let asked = Instant::now();
    let listed = m.relay.sessions().unwrap();
    let list_time = asked.elapsed();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        list_time < LIST_BOUND,
        "`forwarder list` took {list_time:?} during the flood"
    );

    let (mut pings, mut pongs) = (0u32, 0u32);
    let flood_deadline = Instant::now() + FLOOD_TIME;
    while (flood.is_running() || pings < 200)
        && Instant::now() < flood_deadline + Duration::from_secs(5)
    {
        pings += 1;
        if pinger.ping(Duration::from_secs(1)).unwrap() {
            pongs += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let report = flood.finish();
    m.roundtrip("after").unwrap();
    let after = m.relay.stats().unwrap();

    let delta = |reason: &str| reason_packets(&after, reason) - reason_packets(&before, reason);
    let (no_flow, session_limited, global_limited) = (
        delta("no_flow"),
        delta("slowpath_session_limit"),
        delta("slowpath_global_limit"),
    );
    let flooded_flows = m
        .relay
        .session(&flooded.id)
        .unwrap()
        .map(|s| s.flows.len())
        .unwrap_or_default();
    let delivery = f64::from(pongs) / f64::from(pings) * 100.0;
    println!(
        "flood: {} packets from {FLOOD_SOURCES} spoofed sources in {:.1}s = {:.0} pps offered \
         ({} refused by the interface queue); XDP: {no_flow} handed to the daemon, \
         {session_limited} dropped by the session bucket, {global_limited} by the global bucket; \
         flooded session holds {flooded_flows} flows; slow path: {}",
        report.sent,
        report.elapsed.as_secs_f64(),
        report.pps(),
        report.refused_by_queue,
        after["slow_path"]
    );
    println!(
        "ping-pong during the flood: {pongs}/{pings} = {delivery:.2}% delivered; `forwarder list` answered in {list_time:?}"
    );
    assert!(pings >= 200, "only {pings} pings");
    assert!(delivery >= 99.0, "ping-pong delivery {delivery:.2}% < 99%");
    assert!(
        session_limited > 0,
        "the flood never hit the session's slow-path bucket"
    );
    assert!(
        flooded_flows <= 32,
        "the flooded session exceeded max_flows_per_session: {flooded_flows}"
    );
    drop(echo);
}
