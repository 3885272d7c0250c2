//! Several relays behind one address share their sessions through a real
//! etcd (`forwarder run --etcd`): a session added on one relay works
//! through every relay with real mosh, a mosh session survives the death of
//! its relay, and an etcd outage stops nothing that forwards, refuses adds
//! and removes with a clear error, and is reconciled when etcd returns.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::cluster::{
    BACKEND_IP, ClusterTopology, ETCD_IP, ETCD_PORT, Etcd, Pki, RELAY_DOWN_IF, RELAY_UP_IF, VIP,
    relay_name,
};
use forwarder_testbed::scenario::{MOSH_SERVER_PORT, roundtrip, wait_for_shell};
use forwarder_testbed::{MoshClient, MoshServer, Relay, SessionInfo, UdpEcho, UdpPinger, prereq};
use serde_json::Value;

/// The three tests each run etcd, mosh and up to three daemons: one at a
/// time, so a busy machine does not turn them into timing tests.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

const PROGRAMMED: Duration = Duration::from_secs(20);
/// Every relay serves its metrics on its own namespace's loopback.
const METRICS: &str = "127.0.0.1:9464";

/// Field order is drop order: relays before etcd, etcd before the namespaces.
struct Cluster {
    relays: Vec<Relay>,
    etcd: Etcd,
    topo: ClusterTopology,
}

impl Cluster {
    fn start(relays: usize) -> Result<Self> {
        prereq::require()?;
        let topo = ClusterTopology::build(relays)?;
        let etcd = Etcd::start(&topo.router, ETCD_IP, ETCD_PORT)?;
        let relays = (0..relays)
            .map(|index| topo.start_relay(index, &["--metrics", METRICS]))
            .collect::<Result<_>>()?;
        Ok(Self { relays, etcd, topo })
    }

    /// Waits until every relay lists the session, on its port.
    fn wait_programmed_everywhere(&self, id: &str, port: u16) -> Result<()> {
        for relay in &self.relays {
            relay.wait_until(
                &format!("session {id} programmed from etcd"),
                PROGRAMMED,
                |sessions| {
                    sessions
                        .iter()
                        .find(|s| s.id == id && s.port == port)
                        .map(drop)
                },
            )?;
        }
        Ok(())
    }
}

fn backend(server: &MoshServer) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, server.port))
}

/// The relay (by index) holding an answered flow of the session that
/// carried the newest traffic.
fn holder(relays: &[Option<&Relay>], id: &str) -> Result<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (index, relay) in relays.iter().enumerate() {
        let Some(relay) = relay else { continue };
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
        .with_context(|| format!("no relay holds an answered flow of session {id}"))
}

fn stats_cluster(relay: &Relay) -> Result<Value> {
    let stats = relay.stats()?;
    stats
        .get("cluster")
        .cloned()
        .with_context(|| format!("`forwarder stats --json` shows no cluster: {stats}"))
}

/// Polls until the relay says whether etcd answers, as `connected`.
fn wait_etcd_connected(relay: &Relay, connected: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let cluster = stats_cluster(relay)?;
        if cluster["etcd_connected"] == connected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "relay {} did not report etcd_connected={connected} within {timeout:?}: {cluster}",
                relay.instance()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_session_added_on_one_relay_works_through_every_relay() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::start(3).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.relays[1].add(backend(&server), &[]).unwrap();
    cluster
        .wait_programmed_everywhere(&session.id, session.port)
        .unwrap();

    // etcd holds the definition once, under its port; the relays publish what they hold.
    let stored = cluster.etcd.get_prefix("/forwarder/sessions/").unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, format!("/forwarder/sessions/{}", session.port));
    assert!(stored[0].1.contains(&session.id), "{stored:?}");
    assert!(
        stored[0]
            .1
            .contains(&format!("\"created_by\":\"{}\"", relay_name(1))),
        "{stored:?}"
    );

    // One mosh-client; the router sends it through each relay in turn. Each
    // relay forwards it as a new flow and mosh-server follows it there.
    cluster.topo.route_vip_over(&[0]).unwrap();
    let client = MoshClient::start(&cluster.topo.client, VIP, session.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    for index in 0..cluster.relays.len() {
        cluster.topo.route_vip_over(&[index]).unwrap();
        roundtrip(&client, &format!("via{index}"))
            .with_context(|| format!("mosh through relay {index}"))
            .unwrap();
        cluster.relays[index]
            .wait_until(
                &format!("a flow the server answered through relay {index}"),
                PROGRAMMED,
                |sessions| {
                    let s = sessions.iter().find(|s| s.id == session.id)?;
                    s.flows.iter().find(|f| f.packets_to_client > 0).map(drop)
                },
            )
            .unwrap();
    }

    // `list` on any relay shows which relays hold it, with their flows.
    let listed: SessionInfo = cluster.relays[0]
        .wait_until(
            "every relay listed as holding the session with a flow",
            PROGRAMMED,
            |sessions| {
                let s = sessions.iter().find(|s| s.id == session.id)?;
                let held = s.relays.iter().filter(|h| h.flows > 0).count();
                (held == cluster.relays.len()).then(|| s.clone())
            },
        )
        .unwrap();
    let mut names: Vec<String> = listed.relays.iter().map(|h| h.relay.clone()).collect();
    names.sort();
    assert_eq!(names, (0..3).map(relay_name).collect::<Vec<_>>());
    let text = cluster.relays[0].verb(&["list"]).unwrap();
    assert!(text.contains("held by relay0 (1 flow)"), "{text}");
    let metrics = cluster.topo.relays[2]
        .http_get(METRICS, "/metrics")
        .unwrap();
    for (family, holder) in [
        ("forwarder_cluster_held_sessions", "relay0"),
        ("forwarder_cluster_held_flows", "relay1"),
    ] {
        assert!(
            metrics.lines().any(|line| line.starts_with(family)
                && line.contains(&format!("holder=\"{holder}\""))
                && line.ends_with(" 1")),
            "{family} for {holder} missing from:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("forwarder_cluster_etcd_connected{")
                && line.ends_with(" 1")),
        "{metrics}"
    );
    let metrics_cluster = stats_cluster(&cluster.relays[2]).unwrap();
    assert_eq!(metrics_cluster["etcd_connected"], true);
    assert_eq!(metrics_cluster["relays"].as_array().map(Vec::len), Some(3));

    // A port another relay handed out is refused here, through etcd.
    let taken = cluster.relays[0]
        .verb(&[
            "add",
            "--backend",
            &format!("{BACKEND_IP}:9"),
            "--port",
            &session.port.to_string(),
        ])
        .unwrap_err()
        .to_string();
    assert!(taken.contains(&session.port.to_string()), "{taken}");

    // Removed on one relay: gone from every relay and from etcd.
    cluster.relays[2].remove(&session.id).unwrap();
    for relay in &cluster.relays {
        relay
            .wait_until(
                "the session gone from every relay",
                PROGRAMMED,
                |sessions| (!sessions.iter().any(|s| s.id == session.id)).then_some(()),
            )
            .unwrap();
    }
    assert!(
        cluster
            .etcd
            .get_prefix("/forwarder/sessions/")
            .unwrap()
            .is_empty()
    );
    assert!(
        cluster
            .etcd
            .get_prefix("/forwarder/backends/")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn mosh_keeps_working_when_its_relay_is_killed() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start(3).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.relays[0].add(backend(&server), &[]).unwrap();
    cluster
        .wait_programmed_everywhere(&session.id, session.port)
        .unwrap();
    let client = MoshClient::start(&cluster.topo.client, VIP, session.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "before").unwrap();

    let relays: Vec<Option<&Relay>> = cluster.relays.iter().map(Some).collect();
    let dead = holder(&relays, &session.id).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    cluster.relays[dead].kill9().unwrap();
    cluster.topo.cut_relay(dead, &survivors).unwrap();

    roundtrip(&client, "after")
        .with_context(|| format!("mosh after relay {dead} was killed"))
        .unwrap();
    let relays: Vec<Option<&Relay>> = cluster
        .relays
        .iter()
        .enumerate()
        .map(|(i, r)| (i != dead).then_some(r))
        .collect();
    let now = holder(&relays, &session.id).unwrap();
    assert_ne!(now, dead);

    // Its lease lapses: the survivors stop listing it as a holder.
    let dead_name = relay_name(dead);
    cluster.relays[survivors[0]]
        .wait_until(
            "the killed relay gone from the session's holders",
            Duration::from_secs(30),
            |sessions| {
                let s = sessions.iter().find(|s| s.id == session.id)?;
                (!s.relays.iter().any(|h| h.relay == dead_name) && !s.relays.is_empty())
                    .then_some(())
            },
        )
        .unwrap();
    roundtrip(&client, "still").unwrap();
}

#[test]
fn an_etcd_outage_keeps_forwarding_refuses_changes_and_is_reconciled() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::start(2).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.relays[0].add(backend(&server), &[]).unwrap();
    cluster
        .wait_programmed_everywhere(&session.id, session.port)
        .unwrap();
    let client = MoshClient::start(&cluster.topo.client, VIP, session.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "before").unwrap();

    cluster.etcd.stop().unwrap();
    for relay in &cluster.relays {
        wait_etcd_connected(relay, false, Duration::from_secs(20)).unwrap();
    }
    roundtrip(&client, "during").unwrap();
    let second = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT + 1).unwrap();
    let refused = cluster.relays[1]
        .add(backend(&second), &[])
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("etcd") && refused.contains("does not answer"),
        "{refused}"
    );
    assert!(refused.contains("keeps forwarding"), "{refused}");
    let refused = cluster.relays[0]
        .remove(&session.id)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("does not answer"), "{refused}");
    // A relay restarted while etcd is away comes back with what it had.
    cluster.relays[1].kill9().unwrap();
    cluster.relays[1].restart().unwrap();
    assert!(cluster.relays[1].session(&session.id).unwrap().is_some());
    wait_etcd_connected(&cluster.relays[1], false, Duration::from_secs(10)).unwrap();
    roundtrip(&client, "restarted").unwrap();

    cluster.etcd.resume().unwrap();
    for relay in &cluster.relays {
        wait_etcd_connected(relay, true, Duration::from_secs(30)).unwrap();
    }
    let added = cluster.relays[1].add(backend(&second), &[]).unwrap();
    cluster
        .wait_programmed_everywhere(&added.id, added.port)
        .unwrap();
    roundtrip(&client, "after").unwrap();

    // Nothing lost, nothing twice: both sessions, once each, everywhere.
    let stored = cluster.etcd.get_prefix("/forwarder/sessions/").unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
    let mut expected = vec![
        (session.id.clone(), session.port),
        (added.id.clone(), added.port),
    ];
    expected.sort();
    for relay in &cluster.relays {
        let mut listed: Vec<(String, u16)> = relay
            .sessions()
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.port))
            .collect();
        listed.sort();
        assert_eq!(listed, expected, "relay {}", relay.instance());
    }
    assert_eq!(
        stats_cluster(&cluster.relays[0]).unwrap()["shared_sessions"],
        2
    );
}

#[test]
fn a_shared_session_expires_only_when_idle_on_every_relay() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::start(2).unwrap();
    let echo_at = SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, 7));
    let _echo = UdpEcho::start(&cluster.topo.server, echo_at).unwrap();
    let session = cluster.relays[0]
        .add(echo_at, &["--idle-timeout", "6s"])
        .unwrap();
    cluster
        .wait_programmed_everywhere(&session.id, session.port)
        .unwrap();

    // Traffic through relay 1 only, for well past the idle timeout: relay 0
    // sees none, and must not expire the session for the cluster.
    cluster.topo.route_vip_over(&[1]).unwrap();
    let mut pinger = UdpPinger::new(
        &cluster.topo.client,
        "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V4(SocketAddrV4::new(VIP, session.port)),
    )
    .unwrap();
    let busy_until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < busy_until {
        assert!(
            pinger.ping_any(5, Duration::from_millis(400)).unwrap(),
            "the echo through relay 1 stopped"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for relay in &cluster.relays {
        assert!(
            relay.session(&session.id).unwrap().is_some(),
            "relay {} dropped a session busy on another relay",
            relay.instance()
        );
    }

    // Idle everywhere now: gone from every relay and from etcd.
    for relay in &cluster.relays {
        relay
            .wait_until(
                "the idle shared session removed",
                Duration::from_secs(40),
                |sessions| (!sessions.iter().any(|s| s.id == session.id)).then_some(()),
            )
            .unwrap();
    }
    assert!(
        cluster
            .etcd
            .get_prefix("/forwarder/sessions/")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn punched_sessions_are_not_shared_and_say_so() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    prereq::require().unwrap();
    let ns = forwarder_testbed::Netns::new("relay").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("punch.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let bin = forwarder_testbed::forwarder_bin().unwrap();
    let instance = format!("t{}-punch", std::process::id());
    let out = forwarder_testbed::cmd::run(
        ns.nsenter(bin.to_str().unwrap()).args([
            "run",
            "--instance",
            &instance,
            "--iface",
            "lo",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--etcd",
            "http://127.0.0.1:2379",
            "--punch-port",
            "7000",
            "--punch-secret-file",
            secret.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(!out.success(), "started: {}", out.stderr);
    assert!(
        out.stderr
            .contains("--etcd and --punch-port do not go together"),
        "{}",
        out.stderr
    );
}

#[test]
fn relays_reach_etcd_over_tls_with_client_certificates() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    prereq::require().unwrap();
    let topo = ClusterTopology::build(2).unwrap();
    let pki = Pki::create(ETCD_IP).unwrap();
    let etcd = Etcd::start_tls(&topo.router, ETCD_IP, ETCD_PORT, &pki).unwrap();
    let url = format!("https://{ETCD_IP}:{ETCD_PORT}");
    let files =
        [&pki.ca, &pki.client_cert, &pki.client_key].map(|p| p.to_str().unwrap().to_string());
    let relays: Vec<Relay> = (0..2)
        .map(|index| {
            let name = relay_name(index);
            Relay::start(
                &topo.relays[index],
                &[RELAY_UP_IF, RELAY_DOWN_IF],
                &[
                    "--etcd",
                    &url,
                    "--relay-name",
                    &name,
                    "--etcd-ca-file",
                    &files[0],
                    "--etcd-cert-file",
                    &files[1],
                    "--etcd-key-file",
                    &files[2],
                ],
            )
        })
        .collect::<Result<_>>()
        .unwrap();
    for relay in &relays {
        wait_etcd_connected(relay, true, Duration::from_secs(20)).unwrap();
    }
    let session = relays[0]
        .add(SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, 9)), &[])
        .unwrap();
    relays[1]
        .wait_until("the session programmed over TLS", PROGRAMMED, |sessions| {
            sessions.iter().any(|s| s.id == session.id).then_some(())
        })
        .unwrap();
    assert_eq!(etcd.get_prefix("/forwarder/sessions/").unwrap().len(), 1);
    drop(relays);
}
