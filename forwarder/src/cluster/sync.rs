//! The sync task: connect, hold the lease, take a snapshot of the sessions,
//! watch them from that revision, and keep the relay's own table equal to
//! etcd's (program what it lacks, drop what etcd no longer has). On any
//! error it starts over with a fresh snapshot, so nothing that happened
//! while etcd was away is missed or applied twice.

use std::collections::BTreeMap;
use std::time::Instant;

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use forwarder_api::HeldSession;
use tracing::{debug, info};

use super::*;

/// Pause between attempts to reach etcd.
const RETRY: Duration = Duration::from_secs(1);
/// A relay republishes what it holds at least this often (flows and idle
/// times move; changes in what it holds go out at once).
const REPUBLISH: Duration = Duration::from_secs(5);

impl Cluster {
    /// Runs for the daemon's life (the daemon starts it).
    pub async fn run(self, relay: SharedRelay, start_reader: StartReader) {
        self.publish_view(&relay);
        let mut reported = false;
        loop {
            let Err(error) = self.connected(&relay, &start_reader).await;
            let error = format!("{error:#}");
            let was_connected = {
                let mut state = self.state();
                let was = state.client.take().is_some();
                state.last_error = Some(error.clone());
                was
            };
            self.publish_view(&relay);
            if was_connected || !reported {
                warn!(
                    etcd = %self.options.endpoints.join(","),
                    error,
                    "etcd does not answer: every session keeps forwarding; add and remove are refused until it answers"
                );
                reported = true;
            } else {
                debug!(error, "etcd still does not answer");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// One connection's life; returns only with the reason it ended.
    async fn connected(
        &self,
        relay: &SharedRelay,
        start_reader: &StartReader,
    ) -> anyhow::Result<std::convert::Infallible> {
        let mut client = bounded(
            "connecting to etcd",
            Client::connect(self.options.endpoints.clone(), Some(self.connect.clone())),
        )
        .await?;
        let lease = bounded(
            "granting the relay's lease",
            client.lease_grant(LEASE_TTL_SECS, None),
        )
        .await?
        .id();
        let (mut keeper, mut keepalives) =
            bounded("keeping the lease alive", client.lease_keep_alive(lease)).await?;
        let prefix = format!("{}sessions/", self.options.prefix);
        let snapshot = bounded(
            "reading the shared sessions",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = snapshot
            .header()
            .context("etcd's answer carries no header")?
            .revision();
        let mut sessions = BTreeMap::new();
        for kv in snapshot.kvs() {
            if let Some(record) = parse_session(kv.key(), kv.value()) {
                sessions.insert(record.port, (record, kv.mod_revision()));
            }
        }
        let count = sessions.len();
        {
            let mut state = self.state();
            state.sessions = sessions;
            state.synced = true;
            state.client = Some(client.clone());
            state.last_error = None;
        }
        info!(
            relay = %self.options.relay_name,
            etcd = %self.options.endpoints.join(","),
            shared_sessions = count,
            revision,
            "etcd answers: reconciling with the shared sessions"
        );
        let mut published = None;
        self.tick(&mut client, lease, relay, start_reader, &mut published)
            .await?;
        let mut events = bounded(
            "watching the shared sessions",
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let lease_ttl = Duration::from_secs(LEASE_TTL_SECS as u64);
        let mut renewed = Instant::now();
        let mut asked = Instant::now();
        loop {
            tokio::select! {
                message = events.message() => {
                    let response = message
                        .context("the session watch failed")?
                        .context("etcd ended the session watch")?;
                    if response.canceled() {
                        bail!("etcd cancelled the session watch: {}", response.cancel_reason());
                    }
                    self.apply(response.events());
                    self.reconcile(relay, start_reader).await;
                    self.publish_view(relay);
                }
                answer = keepalives.message() => {
                    let answer = answer
                        .context("the lease keepalive failed")?
                        .context("etcd ended the lease keepalive")?;
                    if answer.ttl() <= 0 {
                        bail!("the relay's lease expired");
                    }
                    renewed = Instant::now();
                }
                _ = ticks.tick() => {
                    if renewed.elapsed() > lease_ttl {
                        bail!("etcd has not renewed the relay's lease for {:?}", renewed.elapsed());
                    }
                    if asked.elapsed() >= lease_ttl / 3 {
                        bounded("renewing the lease", keeper.keep_alive()).await?;
                        asked = Instant::now();
                    }
                    self.tick(&mut client, lease, relay, start_reader, &mut published).await?;
                }
            }
        }
    }

    /// Applies watched changes to the known sessions.
    fn apply(&self, events: &[etcd_client::Event]) {
        let mut state = self.state();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    if let Some(record) = parse_session(kv.key(), kv.value()) {
                        state
                            .sessions
                            .insert(record.port, (record, kv.mod_revision()));
                    }
                }
                EventType::Delete => {
                    if let Some(port) = port_of(kv.key()) {
                        state.sessions.remove(&port);
                    }
                }
            }
        }
    }

    /// Once a second: say what this relay holds, read what the others
    /// hold, remove sessions idle on every relay, reconcile.
    async fn tick(
        &self,
        client: &mut Client,
        lease: i64,
        relay: &SharedRelay,
        start_reader: &StartReader,
        published: &mut Option<(RelayPresence, Instant)>,
    ) -> anyhow::Result<()> {
        let local = relay.lock().expect("relay lock").list();
        let presence = RelayPresence {
            relay: self.options.relay_name.clone(),
            addresses: local
                .first()
                .map(|s| s.relay_addresses.clone())
                .unwrap_or_default(),
            sessions: local
                .iter()
                .map(|s| {
                    let held = HeldSession {
                        flows: s.flows.len() as u64,
                        idle_ms: s.idle_ms,
                    };
                    (s.port, held)
                })
                .collect(),
        };
        let changed = published.as_ref().is_none_or(|(last, at)| {
            at.elapsed() >= REPUBLISH
                || last.sessions.len() != presence.sessions.len()
                || last
                    .sessions
                    .iter()
                    .zip(&presence.sessions)
                    .any(|((a, x), (b, y))| a != b || x.flows != y.flows)
        });
        if changed {
            bounded(
                "publishing what this relay holds",
                client.put(
                    self.relay_key(&self.options.relay_name),
                    serde_json::to_vec(&presence)?,
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
            *published = Some((presence, Instant::now()));
        }
        let prefix = format!("{}relays/", self.options.prefix);
        let relays = bounded(
            "reading what the relays hold",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let presence: Vec<RelayPresence> = relays
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        self.state().presence = presence;
        self.expire_idle(client, &local).await?;
        self.reconcile(relay, start_reader).await;
        self.publish_view(relay);
        Ok(())
    }

    /// A shared session is idle when it is idle on every live relay that
    /// holds it (a relay that does not hold it does not keep it alive).
    async fn expire_idle(&self, client: &mut Client, local: &[SessionInfo]) -> anyhow::Result<()> {
        let idle: Vec<(SharedSession, i64)> = {
            let state = self.state();
            state
                .sessions
                .values()
                .filter(|(record, _)| {
                    let here = local
                        .iter()
                        .find(|s| s.port == record.port)
                        .map(|s| s.idle_ms);
                    let elsewhere = state
                        .presence
                        .iter()
                        .filter(|p| p.relay != self.options.relay_name)
                        .filter_map(|p| p.sessions.get(&record.port).map(|held| held.idle_ms));
                    here.into_iter()
                        .chain(elsewhere)
                        .min()
                        .is_some_and(|ms| ms >= record.idle_timeout_secs.saturating_mul(1000))
                })
                .cloned()
                .collect()
        };
        for (record, revision) in idle {
            let session_key = self.session_key(record.port);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    session_key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([
                    TxnOp::delete(session_key.as_str(), None),
                    TxnOp::delete(self.backend_key(record.backend).as_str(), None),
                ]);
            if bounded("removing an idle shared session", client.txn(txn))
                .await?
                .succeeded()
            {
                info!(session = %record.id, port = record.port, "shared session idle on every relay: removed from the cluster");
                self.state().sessions.remove(&record.port);
            }
        }
        Ok(())
    }

    /// Makes the relay's table equal etcd's: drops sessions etcd no longer
    /// has (or has as another session), then programs those it lacks.
    async fn reconcile(&self, relay: &SharedRelay, start_reader: &StartReader) {
        let (wanted, pending) = {
            let state = self.state();
            if !state.synced {
                return;
            }
            let wanted: BTreeMap<u16, SharedSession> = state
                .sessions
                .iter()
                .map(|(port, (record, _))| (*port, record.clone()))
                .collect();
            (wanted, state.pending.clone())
        };
        self.state()
            .refused
            .retain(|port, _| wanted.contains_key(port));
        let local = relay.lock().expect("relay lock").list();
        let mut present = HashSet::new();
        for session in &local {
            if pending.contains(&session.port) {
                continue;
            }
            match wanted.get(&session.port) {
                Some(record)
                    if record.id == session.id && record.backend.to_string() == session.backend =>
                {
                    present.insert(session.port);
                }
                _ => {
                    relay
                        .lock()
                        .expect("relay lock")
                        .remove_session(session.port, "no longer in the cluster");
                }
            }
        }
        for record in wanted.values() {
            if present.contains(&record.port) || pending.contains(&record.port) {
                continue;
            }
            let programmed = match self.definition_of(relay, record).await {
                Ok((owner, key)) => match route_to(record.backend).await {
                    Ok(route) => relay.lock().expect("relay lock").add_shared_session(
                        SharedDefinition {
                            id: &record.id,
                            port: record.port,
                            backend: record.backend,
                            idle_timeout: Duration::from_secs(record.idle_timeout_secs),
                            owner,
                            key,
                        },
                        route,
                    ),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            match programmed {
                Ok(socket) => {
                    self.state().refused.remove(&record.port);
                    start_reader(relay.clone(), socket);
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    let mut state = self.state();
                    if state.refused.get(&record.port) != Some(&error) {
                        warn!(session = %record.id, port = record.port, error, "a shared session cannot be programmed here; retrying every second");
                        state.refused.insert(record.port, error);
                    }
                }
            }
        }
    }

    /// A shared session's owner as this relay knows the uid (its groups
    /// resolve its quotas), held to this relay's backend policy too, and
    /// its key opened.
    async fn definition_of(
        &self,
        relay: &SharedRelay,
        record: &SharedSession,
    ) -> anyhow::Result<(Owner, Option<MoshKey>)> {
        let key = self.open_key(record)?;
        let owner = owner_of(&record.owner).await;
        if let Err(refusal) = relay
            .lock()
            .expect("relay lock")
            .user_policy()
            .check_backend(&owner, record.backend)
        {
            bail!("this relay's backend policy refuses its owner: {refusal}");
        }
        Ok((owner, key))
    }

    /// Hands the relay what `list` and `stats` show of the cluster (the
    /// daemon calls it once before any task runs: from then on the relay
    /// leaves idle expiry of sessions to the cluster).
    pub fn publish_view(&self, relay: &SharedRelay) {
        let info = self.info();
        relay.lock().expect("relay lock").set_cluster(info);
    }
}

/// The owner a shared session names, looked up in this relay's user
/// database off the async threads (NSS may block). A uid this host does
/// not know keeps the name it was added under.
async fn owner_of(owner: &OwnerInfo) -> Owner {
    if owner.uid == 0 {
        return Owner::root();
    }
    let (uid, name) = (owner.uid, owner.name.clone());
    let fallback = Owner {
        uid,
        name: name.clone(),
        groups: Vec::new(),
    };
    tokio::task::spawn_blocking(move || {
        let mut found = Owner::lookup(uid, None);
        if found.name == uid.to_string() {
            found.name = name;
        }
        found
    })
    .await
    .unwrap_or(fallback)
}

/// The port a `sessions/PORT` key names.
fn port_of(key: &[u8]) -> Option<u16> {
    let key = std::str::from_utf8(key).ok()?;
    key.rsplit('/').next()?.parse().ok()
}

/// A session row; one that does not parse is reported and left out
/// (another version's, or damaged), never fatal.
fn parse_session(key: &[u8], value: &[u8]) -> Option<SharedSession> {
    let port = port_of(key)?;
    match serde_json::from_slice::<SharedSession>(value) {
        Ok(record) if record.port == port => Some(record),
        Ok(record) => {
            warn!(
                port,
                record_port = record.port,
                "skipping a shared session whose key and port disagree"
            );
            None
        }
        Err(error) => {
            warn!(port, %error, "skipping an unreadable shared session");
            None
        }
    }
}

/// An etcd request with a deadline: an unreachable etcd is an error, not a hang.
pub(super) async fn bounded<T, E: Into<anyhow::Error>>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(answer) => answer.map_err(Into::into).context(what.to_string()),
        Err(_) => bail!("{what}: etcd gave no answer within {REQUEST_TIMEOUT:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_rows_parse_only_under_their_own_port() {
        let record = SharedSession {
            id: "0badcafe".into(),
            port: 60001,
            backend: "10.0.2.2:60001".parse().unwrap(),
            idle_timeout_secs: 600,
            created_by: "relay-a".into(),
            owner: OwnerInfo {
                uid: 1000,
                name: "alice".into(),
            },
            sealed_key: None,
        };
        let value = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            parse_session(b"/forwarder/sessions/60001", &value),
            Some(record)
        );
        assert_eq!(parse_session(b"/forwarder/sessions/60002", &value), None);
        assert_eq!(parse_session(b"/forwarder/sessions/60001", b"{"), None);
        assert_eq!(parse_session(b"/forwarder/sessions/x", &value), None);
        assert_eq!(port_of(b"/p/sessions/7"), Some(7));
    }

    fn cluster_with_secret(secret: Option<&str>) -> (Cluster, tempfile::TempDir) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret_file = secret.map(|secret| {
            let path = dir.path().join("cluster.secret");
            std::fs::write(&path, secret).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path
        });
        let options = ClusterOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/forwarder/".into(),
            relay_name: "relay-a".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            secret_file,
        };
        let ports = PortRange {
            lo: 60001,
            hi: 60010,
        };
        let cluster = Cluster::new(options, ports, Duration::from_secs(600)).unwrap();
        (cluster, dir)
    }

    #[test]
    fn keys_are_sealed_in_the_record_and_open_only_with_the_cluster_secret() {
        let secret = "a cluster secret of at least thirty-two bytes\n";
        let (cluster, _dir) = cluster_with_secret(Some(secret));
        let key = MoshKey::from_bytes(*b"0123456789abcdef");
        let sealer = cluster.sealer.as_ref().unwrap();
        let mut record = SharedSession {
            id: "0badcafe".into(),
            port: 60001,
            backend: "10.0.2.2:60001".parse().unwrap(),
            idle_timeout_secs: 600,
            created_by: "relay-a".into(),
            owner: OwnerInfo::default(),
            sealed_key: Some(sealer.seal(&key.bytes(), binding("0badcafe", 60001))),
        };
        // Nothing of the key in clear in what etcd stores.
        let text = String::from_utf8(serde_json::to_vec(&record).unwrap()).unwrap();
        assert!(!text.contains(&key.to_base64()), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
        let raw: Vec<String> = key.bytes().iter().map(u8::to_string).collect();
        assert!(!text.contains(&raw.join(",")), "{text}");

        // Another relay given the same secret opens it.
        let (other, _other_dir) = cluster_with_secret(Some(secret));
        let opened = other.open_key(&record).unwrap().unwrap();
        assert_eq!(opened.bytes(), key.bytes());
        // Another secret, no secret, or the key moved to another port: refused, saying why.
        let (stranger, _d) = cluster_with_secret(Some("another secret, thirty-two bytes or more"));
        let error = format!("{:#}", stranger.open_key(&record).unwrap_err());
        assert!(error.contains("--etcd-secret-file differs"), "{error}");
        let (keyless, _d) = cluster_with_secret(None);
        let error = format!("{:#}", keyless.open_key(&record).unwrap_err());
        assert!(
            error.contains("start it with --etcd-secret-file"),
            "{error}"
        );
        record.port = 60002;
        assert!(other.open_key(&record).is_err());
        record.sealed_key = None;
        assert!(other.open_key(&record).unwrap().is_none());
    }

    #[test]
    fn the_cluster_secret_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "x".repeat(40)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let error = format!("{:#}", read_secret(&path).unwrap_err());
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap().len(), 40);
        std::fs::write(&path, "short\n").unwrap();
        let error = format!("{:#}", read_secret(&path).unwrap_err());
        assert!(error.contains("at least 32"), "{error}");
        let error = format!("{:#}", read_secret(&dir.path().join("none")).unwrap_err());
        assert!(error.contains("--etcd-secret-file"), "{error}");
    }

    #[test]
    fn records_without_an_owner_are_roots() {
        let old = br#"{"id":"0badcafe","port":60001,"backend":"10.0.2.2:60001","idle_timeout_secs":600,"created_by":"relay-a"}"#;
        let record = parse_session(b"/forwarder/sessions/60001", old).unwrap();
        assert_eq!(record.owner, OwnerInfo::default());
        assert_eq!(record.sealed_key, None);
    }

    #[test]
    fn prefixes_end_in_a_slash() {
        assert_eq!(ClusterOptions::normalized_prefix("/a"), "/a/");
        assert_eq!(ClusterOptions::normalized_prefix("/a/"), "/a/");
    }
}
