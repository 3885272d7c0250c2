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
//! usage (root): FORWARDER_BIN=target/release/forwarder \
//!     cargo run --release -p forwarder-testbed --example cluster_failover [-- KILLS]

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::cluster::{BACKEND_IP, ClusterTopology, ETCD_IP, ETCD_PORT, Etcd, VIP};
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

    let all: Vec<usize> = (0..RELAYS).collect();
    let mut times = Vec::new();
    for round in 1..=kills {
        // Let the client settle on whichever relay the hash gives it.
        std::thread::sleep(Duration::from_secs(3));
        let dead = holder(&relays, &session.id, None)?;
        let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != dead).collect();
        relays[dead].kill9()?;
        topo.cut_relay(dead, &survivors)?;
        let killed = Instant::now();
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
        println!(
            "round {round:>2}: killed relay{dead}, output again after {:>5} ms (now through relay{now})",
            elapsed.as_millis()
        );
        times.push(elapsed);
        relays[dead].restart()?;
        topo.restore_relay(dead, &all)?;
    }
    times.sort();
    let ms = |d: Duration| d.as_millis();
    println!(
        "failover over {} kills: min {} ms, median {} ms, max {} ms",
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
    drop(client);
    drop(relays);
    drop(etcd);
    Ok(())
}
