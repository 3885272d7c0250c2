//! Several relays behind one address share their sessions through a real
//! etcd (`forwarder run --etcd`): a session added on one relay works
//! through every relay with real mosh, a mosh session survives the death of
//! its relay, and an etcd outage stops nothing that forwards, refuses adds
//! and removes with a clear error, and is reconciled when etcd returns.
//! Sessions keep their owner and their (sealed) key across relays:
//! self-service and the shared port work in a cluster.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::cluster::{
    BACKEND_IP, ClusterSecret, ClusterTopology, ETCD_IP, ETCD_PORT, Etcd, Pki, RELAY_DOWN_IF,
    RELAY_UP_IF, VIP, mosh_key_bytes, relay_name,
};
use forwarder_testbed::scenario::{MOSH_SERVER_PORT, roundtrip, wait_for_shell};
use forwarder_testbed::users::{
    PERMISSION_DENIED, TestGroup, TestUser, UserCli, refused, user_session, user_sessions,
};
use forwarder_testbed::{
    MoshClient, MoshServer, Relay, Session, SessionInfo, UdpEcho, UdpPinger, prereq,
};
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

/// Holds [`ONE_CLUSTER_AT_A_TIME`] for the rest of a test (a test that
/// failed while holding it poisons nothing for the next one).
fn one_cluster_at_a_time() -> MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The etcd of most tests: plain HTTP on the router.
fn plain_etcd(topo: &ClusterTopology) -> Result<Etcd> {
    Etcd::start(&topo.router, ETCD_IP, ETCD_PORT)
}

impl Cluster {
    /// `relays` relays on a plain etcd, each serving its metrics.
    fn start(relays: usize) -> Result<Self> {
        Self::start_with(relays, plain_etcd, |topo, index| {
            topo.start_relay(index, &["--metrics", METRICS])
        })
    }

    /// A topology of `relays` relays, the etcd `etcd` starts in it, and
    /// relay `index` as `relay` starts it.
    fn start_with(
        relays: usize,
        etcd: impl FnOnce(&ClusterTopology) -> Result<Etcd>,
        relay: impl Fn(&ClusterTopology, usize) -> Result<Relay>,
    ) -> Result<Self> {
        prereq::require()?;
        let topo = ClusterTopology::build(relays)?;
        let etcd = etcd(&topo)?;
        let relays = (0..relays)
            .map(|index| relay(&topo, index))
            .collect::<Result<_>>()?;
        Ok(Self { relays, etcd, topo })
    }

    /// Waits until every relay says whether etcd answers, as `connected`.
    fn wait_etcd_connected(&self, connected: bool, timeout: Duration) -> Result<()> {
        for relay in &self.relays {
            wait_etcd_connected(relay, connected, timeout)?;
        }
        Ok(())
    }

    /// Adds a session for `backend` (with `extra` flags) on relay `on` and
    /// waits until every relay lists it.
    fn add_everywhere(&self, on: usize, backend: SocketAddr, extra: &[&str]) -> Result<Session> {
        let session = self.relays[on].add(backend, extra)?;
        self.wait_programmed_everywhere(&session.id, session.port)?;
        Ok(session)
    }

    /// A mosh-client through the VIP to `port`, with a shell and one
    /// keystroke echoed ("before") already.
    fn mosh_client(&self, port: u16, server: &MoshServer) -> Result<MoshClient> {
        let client = MoshClient::start(&self.topo.client, VIP, port, &server.key)?;
        wait_for_shell(&client)?;
        roundtrip(&client, "before")?;
        Ok(client)
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
    let _one = one_cluster_at_a_time();
    let cluster = Cluster::start(3).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.add_everywhere(1, backend(&server), &[]).unwrap();

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
    let _one = one_cluster_at_a_time();
    let mut cluster = Cluster::start(3).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.add_everywhere(0, backend(&server), &[]).unwrap();
    let client = cluster.mosh_client(session.port, &server).unwrap();

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
    let _one = one_cluster_at_a_time();
    let mut cluster = Cluster::start(2).unwrap();
    let server = MoshServer::start(&cluster.topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let session = cluster.add_everywhere(0, backend(&server), &[]).unwrap();
    let client = cluster.mosh_client(session.port, &server).unwrap();

    cluster.etcd.stop().unwrap();
    cluster
        .wait_etcd_connected(false, Duration::from_secs(20))
        .unwrap();
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
    cluster
        .wait_etcd_connected(true, Duration::from_secs(30))
        .unwrap();
    let added = cluster.add_everywhere(1, backend(&second), &[]).unwrap();
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
    let _one = one_cluster_at_a_time();
    let cluster = Cluster::start(2).unwrap();
    let echo_at = SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, 7));
    let _echo = UdpEcho::start(&cluster.topo.server, echo_at).unwrap();
    let session = cluster
        .add_everywhere(0, echo_at, &["--idle-timeout", "6s"])
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
    let _one = one_cluster_at_a_time();
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
    let _one = one_cluster_at_a_time();
    let pki = Pki::create(ETCD_IP).unwrap();
    let url = format!("https://{ETCD_IP}:{ETCD_PORT}");
    let files =
        [&pki.ca, &pki.client_cert, &pki.client_key].map(|p| p.to_str().unwrap().to_string());
    let cluster = Cluster::start_with(
        2,
        |topo| Etcd::start_tls(&topo.router, ETCD_IP, ETCD_PORT, &pki),
        |topo, index| {
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
        },
    )
    .unwrap();
    cluster
        .wait_etcd_connected(true, Duration::from_secs(20))
        .unwrap();
    let (relays, etcd) = (&cluster.relays, &cluster.etcd);
    let session = relays[0]
        .add(SocketAddr::V4(SocketAddrV4::new(BACKEND_IP, 9)), &[])
        .unwrap();
    relays[1]
        .wait_until("the session programmed over TLS", PROGRAMMED, |sessions| {
            sessions.iter().any(|s| s.id == session.id).then_some(())
        })
        .unwrap();
    assert_eq!(etcd.get_prefix("/forwarder/sessions/").unwrap().len(), 1);
}

/// Outside --ports and --flow-ports, as 443 would be in a real deployment.
const SHARED_PORT: u16 = 443;

/// Why `relay` says it leaves the cluster's session on `port` out, once it
/// says so (within [`PROGRAMMED`]).
fn refusal(relay: &Relay, port: u16) -> String {
    let deadline = Instant::now() + PROGRAMMED;
    loop {
        let cluster = stats_cluster(relay).unwrap();
        if let Some(why) = cluster["refused"][port.to_string()].as_str() {
            return why.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "relay {} never said why: {cluster}",
            relay.instance()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn owners_and_sealed_keys_follow_sessions_across_relays() {
    let _one = one_cluster_at_a_time();
    prereq::require().unwrap();
    let group = TestGroup::new().unwrap();
    let alice = TestUser::new(&[&group]).unwrap();
    let bob = TestUser::new(&[&group]).unwrap();
    let cli = UserCli::new().unwrap();
    let secret = ClusterSecret::create().unwrap();
    let shared_port = SHARED_PORT.to_string();
    let allow = format!("{BACKEND_IP}/32");
    let common = [
        "--socket-group",
        group.name.as_str(),
        "--user-allow",
        allow.as_str(),
        "--user-max-sessions",
        "2",
        "--shared-port",
        shared_port.as_str(),
        "--metrics",
        METRICS,
    ];
    // Relays 0 and 1 have the cluster secret; relay 2 was started without it.
    let cluster = Cluster::start_with(3, plain_etcd, |topo, index| {
        let mut args = common.to_vec();
        if index < 2 {
            args.extend(["--etcd-secret-file", secret.path_str()]);
        }
        topo.start_relay(index, &args)
    })
    .unwrap();
    cluster
        .wait_etcd_connected(true, Duration::from_secs(20))
        .unwrap();
    let (relays, etcd, topo) = (&cluster.relays, &cluster.etcd, &cluster.topo);
    let server = MoshServer::start(&topo.server, BACKEND_IP, MOSH_SERVER_PORT).unwrap();
    let keyed_server = MoshServer::start(&topo.server, BACKEND_IP, MOSH_SERVER_PORT + 1).unwrap();

    // Alice's session, added through relay 0, carries real mosh through relay 1.
    let alices = user_session(
        cli.json(
            &alice,
            &relays[0],
            &["add", "--backend", &backend(&server).to_string()],
        )
        .unwrap(),
    );
    assert_eq!(
        (alices.owner.uid, alices.owner.name.as_str()),
        (alice.uid, alice.name.as_str())
    );
    for relay in relays {
        let programmed = relay
            .wait_until("alice's session programmed", PROGRAMMED, |sessions| {
                sessions.iter().find(|s| s.id == alices.id).cloned()
            })
            .unwrap();
        assert_eq!(programmed.owner, alices.owner, "relay {}", relay.instance());
    }
    topo.route_vip_over(&[1]).unwrap();
    let client = MoshClient::start(&topo.client, VIP, alices.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "alice").unwrap();
    drop(client);

    // On every relay she sees hers and Bob sees nothing of it; Bob may
    // neither show nor remove it, through any relay.
    for relay in relays {
        let listed = user_sessions(cli.json(&alice, relay, &["list"]).unwrap());
        assert_eq!(
            listed.iter().map(|s| &s.id).collect::<Vec<_>>(),
            [&alices.id]
        );
        assert!(user_sessions(cli.json(&bob, relay, &["list"]).unwrap()).is_empty());
    }
    for (verb, relay) in [("show", &relays[1]), ("remove", &relays[2])] {
        let out = cli.run(&bob, relay, &[verb, &alices.id]).unwrap();
        refused(&out, &format!("bob's {verb}"), &["belongs to another user"]);
        assert_eq!(out.status.code(), Some(PERMISSION_DENIED), "{verb}");
    }
    // Root sees it with its owner.
    let rooted = relays[2].session(&alices.id).unwrap().unwrap();
    assert_eq!(rooted.owner.uid, alice.uid);

    // A keyed session of Alice's, added on relay 0: reachable on the shared
    // port of relay 1, which opened its key with the cluster secret.
    let key_dir = tempfile::Builder::new()
        .prefix("fwd-key-")
        .tempdir()
        .unwrap();
    let key_file = key_dir.path().join("mosh.key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&key_file, format!("{}\n", keyed_server.key)).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let keyed_backend = backend(&keyed_server).to_string();
    let key_arg = key_file.to_str().unwrap();
    // Relay 2 has no secret to seal it with: refused, with the fix.
    let out = cli
        .run(
            &alice,
            &relays[2],
            &["add", "--backend", &keyed_backend, "--key-file", key_arg],
        )
        .unwrap();
    refused(
        &out,
        "a keyed add without the cluster secret",
        &["--etcd-secret-file"],
    );
    let keyed = user_session(
        cli.json(
            &alice,
            &relays[0],
            &["add", "--backend", &keyed_backend, "--key-file", key_arg],
        )
        .unwrap(),
    );
    assert!(keyed.has_key, "{keyed:?}");
    let on_relay1 = relays[1]
        .wait_until(
            "the keyed session programmed on relay 1",
            PROGRAMMED,
            |sessions| sessions.iter().find(|s| s.id == keyed.id).cloned(),
        )
        .unwrap();
    assert!(on_relay1.has_key, "{on_relay1:?}");
    assert_eq!(on_relay1.shared_port, Some(SHARED_PORT));
    assert_eq!(on_relay1.owner.uid, alice.uid);
    topo.route_vip_over(&[1]).unwrap();
    let client = MoshClient::start(&topo.client, VIP, SHARED_PORT, &keyed_server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "shared").unwrap();
    let shown = user_session(cli.json(&alice, &relays[1], &["show", &keyed.id]).unwrap());
    assert!(
        shown
            .flows
            .iter()
            .any(|f| f.relay_port == Some(SHARED_PORT) && f.packets_to_client > 0),
        "no answered flow on relay 1's shared port: {shown:?}"
    );
    drop(client);

    // Relay 2 cannot open the key: it says why and leaves that session out.
    let why = refusal(&relays[2], keyed.port);
    assert!(why.contains("--etcd-secret-file"), "{why}");
    assert!(relays[2].session(&keyed.id).unwrap().is_none());
    let metrics = topo.relays[2].http_get(METRICS, "/metrics").unwrap();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("forwarder_cluster_refused_sessions{") && line.ends_with(" 1")
        ),
        "{metrics}"
    );

    // The key is in etcd sealed only: neither its text nor its bytes.
    let stored = etcd.get_prefix("/forwarder/sessions/").unwrap();
    let raw = mosh_key_bytes(&keyed_server.key).unwrap();
    let as_json_bytes = raw.iter().map(u8::to_string).collect::<Vec<_>>().join(",");
    let record = stored
        .iter()
        .find(|(key, _)| key.ends_with(&format!("/{}", keyed.port)))
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| panic!("no record of the keyed session: {stored:?}"));
    assert!(record.contains("\"sealed_key\""), "{record}");
    assert!(
        record.contains(&format!("\"uid\":{}", alice.uid)),
        "{record}"
    );
    for (_, value) in &stored {
        assert!(
            !value.contains(&keyed_server.key),
            "the key in clear: {value}"
        );
        assert!(
            !value.contains(&as_json_bytes),
            "the key's bytes in clear: {value}"
        );
        assert!(
            !value.as_bytes().windows(16).any(|w| w == raw.as_slice()),
            "{value}"
        );
    }

    // The quota counts her sessions in the whole cluster (two, on relay 0).
    let out = cli
        .run(
            &alice,
            &relays[2],
            &["add", "--backend", &format!("{BACKEND_IP}:60005")],
        )
        .unwrap();
    refused(
        &out,
        "alice's third session",
        &["sessions in the cluster", "quota of 2"],
    );

    // Removing a session etcd holds and relay 2 never programmed: the
    // owner check still holds, and then it goes from etcd and every relay.
    let out = cli.run(&bob, &relays[2], &["remove", &keyed.id]).unwrap();
    refused(
        &out,
        "bob's remove of an unprogrammed session",
        &["belongs to another user"],
    );
    let removed = cli
        .json(&alice, &relays[2], &["remove", &keyed.id])
        .unwrap();
    assert_eq!(removed["id"], keyed.id.as_str(), "{removed}");
    for relay in relays {
        relay
            .wait_until(
                "the keyed session gone everywhere",
                PROGRAMMED,
                |sessions| (!sessions.iter().any(|s| s.id == keyed.id)).then_some(()),
            )
            .unwrap();
    }
    let stored = etcd.get_prefix("/forwarder/sessions/").unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stats_cluster(&relays[2]).unwrap()["refused"].is_null());
}

#[test]
fn a_relay_whose_policy_denies_a_users_session_does_not_forward_it_and_says_why() {
    let _one = one_cluster_at_a_time();
    prereq::require().unwrap();
    let group = TestGroup::new().unwrap();
    let alice = TestUser::new(&[&group]).unwrap();
    let cli = UserCli::new().unwrap();
    // Relay 0 lets users reach every port of the server; relay 1 only 60001.
    let allows = [format!("{BACKEND_IP}/32"), format!("{BACKEND_IP}/32:60001")];
    let cluster = Cluster::start_with(2, plain_etcd, |topo, index| {
        topo.start_relay(
            index,
            &[
                "--socket-group",
                &group.name,
                "--user-allow",
                &allows[index],
            ],
        )
    })
    .unwrap();
    cluster
        .wait_etcd_connected(true, Duration::from_secs(20))
        .unwrap();
    let relays = &cluster.relays;
    let allowed = user_session(
        cli.json(
            &alice,
            &relays[0],
            &["add", "--backend", &format!("{BACKEND_IP}:60001")],
        )
        .unwrap(),
    );
    let denied = user_session(
        cli.json(
            &alice,
            &relays[0],
            &["add", "--backend", &format!("{BACKEND_IP}:60002")],
        )
        .unwrap(),
    );
    relays[1]
        .wait_until(
            "the allowed session programmed on relay 1",
            PROGRAMMED,
            |sessions| sessions.iter().any(|s| s.id == allowed.id).then_some(()),
        )
        .unwrap();
    let why = refusal(&relays[1], denied.port);
    assert!(why.contains("backend policy"), "{why}");
    assert!(relays[1].session(&denied.id).unwrap().is_none());
    // Relay 1 itself refuses that add outright, as a single relay would.
    let out = cli
        .run(
            &alice,
            &relays[1],
            &["add", "--backend", &format!("{BACKEND_IP}:60003")],
        )
        .unwrap();
    refused(&out, "an add outside relay 1's policy", &["user_allow"]);
}
