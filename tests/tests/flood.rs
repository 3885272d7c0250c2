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
    CLIENT_IP, CLIENT_ROAM_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, SERVER_IP,
    Topology,
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

/// A real mosh session through the relay, a second session with a UDP
/// ping-pong that answers, and a flooder on a link of its own. Field order
/// is drop order.
struct Bed {
    pinger: UdpPinger,
    echo: UdpEcho,
    m: MoshThroughRelay,
    flooder: forwarder_testbed::Netns,
}

impl Bed {
    fn start() -> Self {
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
        Self {
            pinger,
            echo,
            m,
            flooder,
        }
    }
}

#[test]
fn flood_at_one_session_leaves_the_others_working() {
    let Bed {
        mut pinger,
        echo,
        m,
        flooder,
    } = Bed::start();

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
        None,
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

/// A sustained flood from thousands of spoofed sources at the mosh session's
/// own port while the real client roams: the new endpoint gets in (flows
/// the server never answered are on probation, evicted oldest one-shot
/// first, and never take the session's flow limit), the server follows it,
/// a second session keeps its delivery, and the flood's share of flows and
/// ports stays bounded.
#[test]
fn roaming_works_during_a_flood_at_the_same_session() {
    const ROAM_FLOOD_PPS: u32 = 5_000;
    const ROAM_FLOOD_TIME: Duration = Duration::from_secs(25);
    /// `PROBATION_FLOWS` in the daemon, plus the client's old and new flows.
    const FLOWS_BOUND: usize = 16 + 2;

    let Bed {
        mut pinger,
        echo,
        m,
        flooder,
    } = Bed::start();

    let flood = Flood::start(
        &flooder,
        FLOODER_IF,
        (&m.topo.relay, RELAY_FLOODER_IF),
        SocketAddrV4::new(RELAY_FLOODER_IP, m.session.port),
        FLOOD_MAX_PACKETS,
        ROAM_FLOOD_TIME,
        Some(ROAM_FLOOD_PPS),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let during = m.relay.stats().unwrap();
    let flows_before_roam = m.relay.session(&m.session.id).unwrap().unwrap().flows.len();

    m.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    let roamed = Instant::now();
    m.roundtrip("roamed").unwrap();
    let time_to_roam = roamed.elapsed();
    let roam_ip = format!("{CLIENT_ROAM_IP}:");
    m.relay
        .wait_until(
            "the server to follow the roamed client during the flood",
            Duration::from_secs(20),
            |s| {
                let s = s.iter().find(|s| s.id == m.session.id)?;
                s.flows
                    .iter()
                    .find(|f| f.client.starts_with(&roam_ip) && f.server_current && f.answered)
                    .cloned()
            },
        )
        .unwrap();

    let (mut pings, mut pongs, mut max_flows) = (0u32, 0u32, flows_before_roam);
    while flood.is_running() && pings < 10_000 {
        pings += 1;
        if pinger.ping(Duration::from_secs(1)).unwrap() {
            pongs += 1;
        }
        if pings % 100 == 0 {
            let flows = m.relay.session(&m.session.id).unwrap().unwrap().flows.len();
            max_flows = max_flows.max(flows);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let still_flooding = flood.is_running();
    let report = flood.finish();
    m.roundtrip("after").unwrap();
    let after = m.relay.stats().unwrap();
    let slow = &after["slow_path"];
    let delivery = f64::from(pongs) / f64::from(pings.max(1)) * 100.0;
    println!(
        "roam under flood: {} packets from {FLOOD_SOURCES} spoofed sources in {:.1}s = {:.0} pps at the mosh \
         session's port; output after the roam arrived in {time_to_roam:?}; the session held at most {max_flows} \
         flows (relay-wide {} flows during the flood); {} flows evicted from probation, {} established; \
         the other session's ping-pong: {pongs}/{pings} = {delivery:.2}%",
        report.sent,
        report.elapsed.as_secs_f64(),
        report.pps(),
        during["flows"],
        slow["flows_evicted_unanswered"],
        slow["flows_promoted"],
    );
    assert!(
        still_flooding || pings >= 200,
        "the flood ended before the measurement: {pings} pings"
    );
    assert!(
        max_flows <= FLOWS_BOUND,
        "the flooded session held {max_flows} flows"
    );
    assert!(
        slow["flows_evicted_unanswered"].as_u64().unwrap() > 0,
        "the flood never reached probation: {slow}"
    );
    assert!(
        delivery >= 99.0,
        "ping-pong delivery {delivery:.2}% < 99% during the flood"
    );
    drop(echo);
}
