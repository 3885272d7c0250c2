//! Failover time of a real mosh session in a cluster of three relays that
//! share their sessions through etcd (see docs/BENCHMARKS.md, "Cluster
//! failover"). Not a test: it measures and prints.
//!
//! The server's shell prints a numbered tick every 100 ms. Each round kills
//! the relay that carries the session (SIGKILL, and its link off the
//! router's ECMP route, as a dead machine withdrawn by a health check) and
//! times from the moment the route is gone to the first screen of the
//! mosh-client showing a tick newer than any it showed at that moment. The
//! killed relay is then restarted and put back into the route before the
//! next round.
//!
//! Where the time goes: tcpdump on the client's link stamps every datagram,
//! so each round also prints how long the client took to send its first
//! datagram after the kill (and how long since its previous one: mosh-client
//! sends when it owes an acknowledgement, else at its 3 s heartbeat), and
//! how long the new relay and mosh-server took to answer it.
//!
//! usage (root): FORWARDER_BIN=target/release/forwarder \
//!     cargo run --release -p forwarder-testbed --example cluster_failover [-- KILLS]

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use forwarder_testbed::capture::Capture;
use forwarder_testbed::cluster::{
    BACKEND_IP, CLIENT_IP, ClusterTopology, ETCD_IP, ETCD_PORT, Etcd, VIP,
};
use forwarder_testbed::scenario::{MOSH_SERVER_PORT, roundtrip, wait_for_shell};
use forwarder_testbed::{MoshClient, MoshServer, Relay, prereq};

const RELAYS: usize = 3;
/// No screen change within this long is a failed failover, not a slow one.
const GIVE_UP: Duration = Duration::from_secs(30);

fn newest_tick(client: &MoshClient) -> Result<u64> {
    let screen = client.screen()?;
    Ok(screen
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|word| word.strip_prefix("tick")?.parse().ok())
        .max()
        .unwrap_or(0))
}

/// The relay carrying the session now: the one whose answered flow saw traffic last.
fn holder(relays: &[Relay], id: &str, dead: Option<usize>) -> Result<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (index, relay) in relays.iter().enumerate() {
        if dead == Some(index) {
            continue;
        }
        let Some(session) = relay.session(id)? else {
            continue;
        };
        for flow in session.flows.iter().filter(|f| f.packets_to_client > 0) {
            if best.is_none_or(|(idle, _)| flow.idle_ms < idle) {
                best = Some((flow.idle_ms, index));
            }
        }
    }
    best.map(|(_, index)| index)
        .context("no relay carries the session")
}

/// One round's datagrams on the client's link around the kill at `killed`
/// (since the epoch): the client's previous datagram, its first one after
/// the kill, and the first answer to reach it after that.
struct Split {
    since_previous: Duration,
    client_waited: Duration,
    answered_after: Duration,
    /// Of `answered_after`: from the client's link to mosh-server (the new
    /// relay's slow path), mosh-server's own time to answer, and back.
    to_server: Duration,
    server_took: Duration,
    to_client: Duration,
}

fn split(
    capture: &Capture,
    server_side: &[Capture],
    killed: Duration,
    port: u16,
    server: SocketAddrV4,
) -> Result<Split> {
    let datagrams = capture.udp_timed()?;
    let to_vip = |d: &forwarder_testbed::capture::UdpDatagram| {
        *d.from.ip() == CLIENT_IP && *d.to.ip() == VIP && d.to.port() == port
    };
    let previous = datagrams
        .iter()
        .filter(|(at, d)| *at < killed && to_vip(d))
        .map(|(at, _)| *at)
        .next_back()
        .context("no client datagram before the kill")?;
    let first = datagrams
        .iter()
        .find(|(at, d)| *at >= killed && to_vip(d))
        .map(|(at, _)| *at)
        .context("no client datagram after the kill")?;
    let answer = datagrams
        .iter()
        .find(|(at, d)| *at >= first && *d.from.ip() == VIP && *d.to.ip() == CLIENT_IP)
        .map(|(at, _)| *at)
        .context("no answer after the client's first datagram")?;
    let mut at_server = Vec::new();
    for capture in server_side {
        at_server.extend(capture.udp_timed()?);
    }
    at_server.sort_by_key(|(at, _)| *at);
    let (reached, relay_end) = at_server
        .iter()
        .find(|(at, d)| *at >= first && d.to == server)
        .map(|(at, d)| (*at, d.from))
        .context("the client's datagram never reached mosh-server")?;
    let left = at_server
        .iter()
        .find(|(at, d)| *at >= reached && d.from == server && d.to == relay_end)
        .map(|(at, _)| *at)
        .context("mosh-server never answered through the new relay")?;
    Ok(Split {
        since_previous: first - previous,
        client_waited: first - killed,
        answered_after: answer - first,
        to_server: reached.saturating_sub(first),
        server_took: left - reached,
        to_client: answer.saturating_sub(left),
    })
}

fn main() -> Result<()> {
    let kills: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("KILLS must be a number")?,
        None => 10,
    };
    prereq::require()?;
    let topo = ClusterTopology::build(RELAYS)?;
    let etcd = Etcd::start(&topo.router, ETCD_IP, ETCD_PORT)?;
    let mut relays: Vec<Relay> = (0..RELAYS)
        .map(|index| topo.start_relay(index, &[]))
        .collect::<Result<_>>()?;
    for relay in &mut relays {
        relay.quiet();
    }
    let server = MoshServer::start(&topo.server, BACKEND_IP, MOSH_SERVER_PORT)?;
    let backend = SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, server.port));
    let session = relays[0].add(backend, &[])?;
    for relay in &relays {
        relay.wait_until("the shared session", Duration::from_secs(20), |s| {
            s.iter().any(|s| s.id == session.id).then_some(())
        })?;
    }
    let client = MoshClient::start(&topo.client, VIP, session.port, &server.key)?;
    wait_for_shell(&client)?;
    roundtrip(&client, "ready")?;
    client.type_line("i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done")?;
    client.wait_for_screen("tick20", Duration::from_secs(20))?;

    let capture = Capture::start(&topo.client, "veth-c", "udp")?;
    let server_side: Vec<Capture> = (0..RELAYS)
        .map(|index| Capture::start(&topo.server, &format!("veth-s{index}"), "udp"))
        .collect::<Result<_>>()?;
    let server_at = SocketAddrV4::new(BACKEND_IP, server.port);
    let all: Vec<usize> = (0..RELAYS).collect();
    let mut times = Vec::new();
    let mut answers = Vec::new();
    for round in 1..=kills {
        // Let the client settle on whichever relay the hash gives it.
        std::thread::sleep(Duration::from_secs(3));
        let dead = holder(&relays, &session.id, None)?;
        let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != dead).collect();
        relays[dead].kill9()?;
        topo.cut_relay(dead, &survivors)?;
        let killed = Instant::now();
        let killed_at = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let seen = newest_tick(&client)?;
        let elapsed = loop {
            if newest_tick(&client)? > seen {
                break killed.elapsed();
            }
            if killed.elapsed() > GIVE_UP {
                bail!(
                    "round {round}: no new output within {GIVE_UP:?} after relay {dead} died; screen:\n{}",
                    client.screen()?
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let now = holder(&relays, &session.id, Some(dead))?;
        // tcpdump writes each packet at once; give the last one a moment.
        std::thread::sleep(Duration::from_millis(100));
        let split = split(&capture, &server_side, killed_at, session.port, server_at)?;
        let us = |d: Duration| d.as_micros();
        println!(
            "round {round:>2}: killed relay{dead}, output again after {:>5} ms (now through relay{now}); \
             client's first datagram {:>5} ms after the kill ({:>5} ms after its previous one), \
             answered {:>3} ms later (to mosh-server {} us, mosh-server {} us, back {} us)",
            elapsed.as_millis(),
            split.client_waited.as_millis(),
            split.since_previous.as_millis(),
            split.answered_after.as_millis(),
            us(split.to_server),
            us(split.server_took),
            us(split.to_client)
        );
        times.push(elapsed);
        answers.push(split.answered_after);
        relays[dead].restart()?;
        topo.restore_relay(dead, &all)?;
    }
    times.sort();
    answers.sort();
    let ms = |d: Duration| d.as_millis();
    println!(
        "failover over {} kills: min {} ms, median {} ms, max {} ms; relay and server answered the \
         client's first datagram in min {} ms, median {} ms, max {} ms",
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        ms(answers[0]),
        ms(answers[answers.len() / 2]),
        ms(answers[answers.len() - 1])
    );
    drop(capture);
    drop(server_side);
    drop(client);
    drop(relays);
    drop(etcd);
    Ok(())
}
