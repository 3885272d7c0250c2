//! Several relays, one set of sessions: session definitions live in etcd
//! (`forwarder run --etcd URL,...`), every relay watches them and programs
//! its own maps and sockets, and ports are handed out with etcd
//! transactions so no two relays give out the same one. Flows stay local:
//! a client whose datagrams land on another relay is a new flow there, and
//! mosh-server follows the newest authentic datagram.
//!
//! Keys under the prefix (default `/forwarder/`):
//!
//! ```text
//! sessions/PORT      a SharedSession (JSON): port, backend, owner, limits, and a
//!                    keyed session's mosh key sealed under the cluster secret;
//!                    no lease: sessions outlive relays
//! backends/IP:PORT   the port of the session forwarding there (one session per backend)
//! relays/NAME        a RelayPresence (JSON) under the relay's lease: what it holds
//! owners/UID         the id of the user's newest session: every add of a non-root
//!                    user with a session quota rewrites it, so two adds counted
//!                    against the same sessions cannot both commit
//! ```
//!
//! While etcd does not answer, a relay keeps forwarding every session it
//! has and refuses `add` and `remove` (nothing to reconcile later: neither
//! side changed alone); when etcd answers again it takes a fresh snapshot,
//! programs what it lacks and drops what etcd no longer has.
//!
//! Owners and keys: a session records who added it (uid and name), so
//! every relay holds it to the same owner (`list`, `show`, `remove` by
//! owner as on one relay; the owner's session quota is counted over the
//! shared table). A keyed session's mosh key is sealed (XChaCha20-Poly1305
//! under a key derived with HKDF-SHA256 from `--etcd-secret-file`, the one
//! secret every relay of the cluster is given; the session id and port are
//! the associated data), never written in clear: etcd and its backups give
//! no key away. A relay without the secret, or with another one, says why
//! and leaves such a session unprogrammed (`stats` shows it as refused).
//!
//! Punched sessions are not shared: `--etcd` with `--punch-port` is refused
//! (see DESIGN.md, "Several relays through etcd").

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, TlsOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::datapath::socket::RelaySocket;
use crate::datapath::xdp::{self, BackendRoute};
use crate::mosh::MoshKey;
use crate::ports::PortRange;
use crate::sessions::{SharedDefinition, SharedRelay};
use crate::store::{KeyBinding, KeySealer, SealedKey};
use crate::users::Owner;
use forwarder_api::{ClusterInfo, OwnerInfo, RelayPresence, SessionInfo};

mod sync;

/// How long a relay's lease outlives its last keepalive: its presence
/// (what `list` shows it holding) goes this long after it dies.
const LEASE_TTL_SECS: i64 = 5;
/// Every etcd request is bounded: an unreachable etcd answers with an error, not a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Ports tried for one `add` before giving up (each a transaction).
const PORT_ATTEMPTS: usize = 64;

/// Starts reading a new session's socket (the daemon's, as for the control server).
pub type StartReader = Arc<dyn Fn(SharedRelay, Arc<RelaySocket>) + Send + Sync>;

/// `run --etcd ...`: where etcd is and how to reach it.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends with '/'.
    pub prefix: String,
    /// This relay's name in the cluster.
    pub relay_name: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The cluster secret keyed sessions' mosh keys are sealed under in
    /// etcd (`--etcd-secret-file`); without it keyed sessions are refused.
    pub secret_file: Option<PathBuf>,
}

impl ClusterOptions {
    /// The prefix with its trailing '/', so `/a` and `/ab` never share keys.
    pub fn normalized_prefix(prefix: &str) -> String {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        prefix
    }

    fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| {
                format!(
                    "reading the etcd {what} {} (--etcd-{what}-file)",
                    path.display()
                )
            })
        };
        let mut tls = None;
        if let Some(ca) = &self.ca_file {
            tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca, "ca")?)));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read(cert, "cert")?, read(key, "key")?);
                tls = Some(tls.unwrap_or_default().identity(identity));
            }
            (None, None) => {}
            _ => bail!(
                "--etcd-cert-file and --etcd-key-file go together (the client certificate and its key): give both"
            ),
        }
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}

/// A session as etcd holds it: what every relay needs to program it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSession {
    pub id: String,
    pub port: u16,
    pub backend: SocketAddr,
    pub idle_timeout_secs: u64,
    /// The relay that handed the port out.
    pub created_by: String,
    /// Who added it (the caller's uid on that relay's control socket);
    /// records written before owners were shared are root's.
    #[serde(default)]
    pub owner: OwnerInfo,
    /// A keyed session's mosh key, sealed under the cluster secret and
    /// bound to the session's id and port ([`binding`]); never in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
}

/// What a shared session's sealed key is bound to: its id and port, so a
/// sealed key copied into another record does not open.
fn binding(id: &str, port: u16) -> KeyBinding<'_> {
    KeyBinding {
        session_id: id,
        port,
        upstream_port: 0,
    }
}

/// Reads the cluster secret: root's alone (no access for group or
/// others: it opens every shared session's key), at least 32 bytes;
/// surrounding whitespace (a trailing newline) is not part of it.
fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "reading the cluster secret {} (--etcd-secret-file)",
            path.display()
        )
    })?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "the cluster secret {} is open to group or others (mode {:o}); it opens every shared session's \
             mosh key, so it must be the owner's alone: `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    let text = std::fs::read(path).with_context(|| {
        format!(
            "reading the cluster secret {} (--etcd-secret-file)",
            path.display()
        )
    })?;
    let secret = text.trim_ascii();
    if secret.len() < 32 {
        bail!(
            "the cluster secret {} is {} bytes; give every relay of the cluster the same file of at least 32 \
             random bytes, e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`",
            path.display(),
            secret.len()
        );
    }
    Ok(secret.to_vec())
}

/// What `forwarder add` asks of the cluster.
pub struct NewShared {
    pub backend: SocketAddr,
    pub route: BackendRoute,
    pub port: Option<u16>,
    pub idle_timeout: Option<Duration>,
    /// The caller: the session's owner.
    pub owner: Owner,
    pub key: Option<MoshKey>,
}

/// How a `remove` in the cluster ended.
pub enum Removal {
    /// Boxed: a session's report is large beside the other outcomes.
    Removed(Box<SessionInfo>),
    NotFound,
    /// Another user's session: the refusal, said to the caller.
    Denied(String),
}

/// What this relay knows of etcd, shared by the sync task and the control
/// requests.
#[derive(Default)]
struct State {
    /// Set while etcd answers.
    client: Option<Client>,
    last_error: Option<String>,
    /// etcd's sessions by port, with each key's mod revision; valid once `synced`.
    sessions: BTreeMap<u16, (SharedSession, i64)>,
    synced: bool,
    /// The relays holding a lease, as last read.
    presence: Vec<RelayPresence>,
    /// Ports an `add` on this relay is handing out right now: the sync
    /// task leaves them alone until the transaction settles.
    pending: HashSet<u16>,
    /// Why a shared session could not be programmed here, by port (each
    /// reason is logged once).
    refused: BTreeMap<u16, String>,
}

/// The cluster as the daemon's tasks share it (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    options: Arc<ClusterOptions>,
    connect: ConnectOptions,
    session_ports: PortRange,
    default_idle_timeout: Duration,
    /// Seals and opens keyed sessions' keys; None without `--etcd-secret-file`.
    sealer: Option<Arc<KeySealer>>,
    state: Arc<Mutex<State>>,
}

impl Cluster {
    pub fn new(
        options: ClusterOptions,
        session_ports: PortRange,
        default_idle_timeout: Duration,
    ) -> anyhow::Result<Self> {
        if options.endpoints.is_empty() {
            bail!("--etcd needs at least one URL, e.g. --etcd http://10.0.0.5:2379");
        }
        let connect = options.connect_options()?;
        let sealer = match &options.secret_file {
            Some(path) => Some(Arc::new(KeySealer::derive_cluster(&read_secret(path)?))),
            None => None,
        };
        Ok(Self {
            options: Arc::new(options),
            connect,
            session_ports,
            default_idle_timeout,
            sealer,
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    pub fn relay_name(&self) -> &str {
        &self.options.relay_name
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("cluster state lock")
    }

    fn session_key(&self, port: u16) -> String {
        format!("{}sessions/{port}", self.options.prefix)
    }

    fn backend_key(&self, backend: SocketAddr) -> String {
        format!("{}backends/{backend}", self.options.prefix)
    }

    fn owner_key(&self, uid: u32) -> String {
        format!("{}owners/{uid}", self.options.prefix)
    }

    fn relay_key(&self, name: &str) -> String {
        format!("{}relays/{name}", self.options.prefix)
    }

    /// What `list` and `stats` show of the cluster.
    fn info(&self) -> ClusterInfo {
        let state = self.state();
        ClusterInfo {
            relay: self.options.relay_name.clone(),
            etcd: self.options.endpoints.clone(),
            etcd_connected: state.client.is_some(),
            etcd_error: state.last_error.clone(),
            shared_sessions: state.sessions.len() as u64,
            relays: state.presence.clone(),
            refused: state.refused.clone(),
        }
    }

    /// The mosh key of a shared session, opened; None for a keyless one.
    /// Refused with the reason (and the fix) when it does not open here.
    fn open_key(&self, record: &SharedSession) -> anyhow::Result<Option<MoshKey>> {
        let Some(sealed) = &record.sealed_key else {
            return Ok(None);
        };
        let Some(sealer) = &self.sealer else {
            bail!(
                "it carries a mosh key sealed under the cluster secret, and this relay has none: start it with \
                 --etcd-secret-file (etcd_secret_file in the config), the same file every relay of the cluster has"
            );
        };
        match sealer.open(sealed, binding(&record.id, record.port)) {
            Ok(raw) => Ok(Some(MoshKey::from_bytes(raw))),
            Err(_) => bail!(
                "its sealed mosh key does not open: this relay's --etcd-secret-file differs from the one of {}, \
                 which added it (give every relay of the cluster the same file), or the record was altered",
                record.created_by
            ),
        }
    }

    /// The etcd client, or why there is none, said so an operator knows
    /// that nothing changed and what to do.
    fn client(&self, what: &str) -> anyhow::Result<Client> {
        let state = self.state();
        match (&state.client, state.synced) {
            (Some(client), true) => Ok(client.clone()),
            _ => bail!(
                "cannot {what}: etcd ({}) does not answer{}. This relay keeps forwarding the sessions it has; \
                 sessions are added and removed only while etcd answers, so that every relay agrees. \
                 Bring etcd back (or check --etcd and its TLS options) and try again",
                self.options.endpoints.join(","),
                state
                    .last_error
                    .as_ref()
                    .map(|error| format!(" ({error})"))
                    .unwrap_or_default()
            ),
        }
    }

    /// `forwarder add` in a cluster: the port is handed out by an etcd
    /// transaction (it succeeds only if no relay holds that port or that
    /// backend), after this relay has bound it; every other relay programs
    /// it from its watch. The owner's session quota counts its sessions in
    /// the whole cluster, read from etcd, and the transaction commits only
    /// if no other add of that owner committed since that read.
    pub async fn add(
        &self,
        relay: &SharedRelay,
        start_reader: &StartReader,
        request: NewShared,
    ) -> anyhow::Result<SessionInfo> {
        let NewShared {
            backend,
            route,
            port,
            idle_timeout,
            owner,
            key,
        } = request;
        let mut client = self.client("add a session")?;
        if key.is_some() && self.sealer.is_none() {
            bail!(
                "this relay shares its sessions through etcd and has no cluster secret to seal the session's \
                 key with, so a keyed session cannot be shared: start every relay of the cluster with \
                 --etcd-secret-file FILE (etcd_secret_file in the config; the same file of at least 32 random \
                 bytes, mode 0600, on every relay), or add the session without --key-file"
            );
        }
        let idle_timeout = idle_timeout.unwrap_or(self.default_idle_timeout);
        let quota = relay
            .lock()
            .expect("relay lock")
            .user_policy()
            .quota_for(&owner)
            .max_sessions;
        // The owner's sessions as etcd has them now, and the revision the
        // transaction below requires its owner key not to have moved past.
        let owner_guard = if owner.is_root() || quota.value == 0 {
            None
        } else {
            let prefix = format!("{}sessions/", self.options.prefix);
            let snapshot = sync::bounded(
                "counting the user's sessions in the cluster",
                client.get(
                    prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                ),
            )
            .await?;
            let revision = snapshot.header().map_or(0, |header| header.revision());
            let sessions = snapshot
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice::<SharedSession>(kv.value()).ok())
                .filter(|s| s.owner.uid == owner.uid)
                .count();
            if !quota.has_room(sessions) {
                bail!(
                    "user {} (uid {}) has {sessions} sessions in the cluster, the quota of {} ({}): remove one \
                         (`forwarder list`, `forwarder remove ID`), or ask the relays' administrator to raise it \
                         ([user.{}] max_sessions in the config file of every relay)",
                    owner.name,
                    owner.uid,
                    quota.value,
                    quota.source,
                    owner.name
                );
            }
            Some((self.owner_key(owner.uid), revision))
        };
        let candidates: Vec<u16> = {
            let state = self.state();
            if let Some((existing, _)) = state.sessions.values().find(|(s, _)| s.backend == backend)
            {
                // Another user's session is not the caller's to name or remove.
                if !owner.is_root() && existing.owner.uid != owner.uid {
                    bail!(
                        "another user's session already forwards to {backend} in the cluster: one backend has \
                         one session; ask that user or the relays' administrator"
                    );
                }
                bail!(
                    "session {} (port {}) already forwards to {backend} in the cluster: use it, or `forwarder remove {}` first",
                    existing.id,
                    existing.port,
                    existing.id
                );
            }
            match port {
                Some(port) => vec![port],
                None => (self.session_ports.lo..=self.session_ports.hi)
                    .filter(|port| {
                        !state.sessions.contains_key(port) && !state.pending.contains(port)
                    })
                    .take(PORT_ATTEMPTS)
                    .collect(),
            }
        };
        let mut last_refusal = None;
        for candidate in candidates {
            let id = loop {
                let id = format!("{:08x}", rand::random::<u32>());
                if !self.state().sessions.values().any(|(s, _)| s.id == id) {
                    break id;
                }
            };
            let sealed_key = match (&key, &self.sealer) {
                (Some(key), Some(sealer)) => {
                    Some(sealer.seal(&key.bytes(), binding(&id, candidate)))
                }
                _ => None,
            };
            let record = SharedSession {
                id: id.clone(),
                port: candidate,
                backend,
                idle_timeout_secs: idle_timeout.as_secs(),
                created_by: self.options.relay_name.clone(),
                owner: owner.info(),
                sealed_key,
            };
            if !self.state().pending.insert(candidate) {
                continue;
            }
            let _pending = Pending {
                cluster: self,
                port: candidate,
            };
            let definition = SharedDefinition {
                id: &id,
                port: candidate,
                backend,
                idle_timeout,
                owner: owner.clone(),
                key: key.clone(),
            };
            let socket = match relay
                .lock()
                .expect("relay lock")
                .add_shared_session(definition, route)
            {
                Ok(socket) => socket,
                Err(error) if port.is_some() => return Err(error),
                Err(error) => {
                    last_refusal = Some(error);
                    continue;
                }
            };
            let session_key = self.session_key(candidate);
            let backend_key = self.backend_key(backend);
            let mut when = vec![
                Compare::create_revision(session_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(backend_key.as_str(), CompareOp::Equal, 0),
            ];
            let mut then = vec![
                TxnOp::put(session_key.as_str(), serde_json::to_vec(&record)?, None),
                TxnOp::put(backend_key.as_str(), candidate.to_string(), None),
            ];
            let mut otherwise = vec![TxnOp::get(backend_key.as_str(), None)];
            if let Some((owner_key, revision)) = &owner_guard {
                when.push(Compare::mod_revision(
                    owner_key.as_str(),
                    CompareOp::Less,
                    revision + 1,
                ));
                then.push(TxnOp::put(owner_key.as_str(), id.clone(), None));
                otherwise.push(TxnOp::get(owner_key.as_str(), None));
            }
            let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await;
            let undo = |why: &str| {
                relay
                    .lock()
                    .expect("relay lock")
                    .remove_session(candidate, why);
            };
            match outcome {
                Ok(Ok(response)) if response.succeeded() => {
                    // Known before the watch reports it, so the sync task
                    // never takes the new session for a stale one.
                    let revision = response.header().map_or(0, |header| header.revision());
                    self.state()
                        .sessions
                        .insert(candidate, (record.clone(), revision));
                    start_reader(relay.clone(), socket);
                    let info = relay
                        .lock()
                        .expect("relay lock")
                        .session_info(candidate, crate::datapath::monotonic_ns())
                        .context("the session vanished as it was added")?;
                    return Ok(info);
                }
                Ok(Ok(response)) => {
                    undo("its port or backend was taken in the cluster");
                    let responses = response.op_responses();
                    // The newest revision of the key the index-th `get` read, if it exists.
                    let read = |index: usize| match responses.get(index) {
                        Some(etcd_client::TxnOpResponse::Get(get)) => {
                            get.kvs().first().map(|kv| kv.mod_revision())
                        }
                        _ => None,
                    };
                    let owner_raced = owner_guard.as_ref().is_some_and(|(_, revision)| {
                        read(1).is_some_and(|moved| moved > *revision)
                    });
                    if owner_raced {
                        bail!(
                            "another session of user {} was added in the cluster at the same moment, so this one \
                             could not be counted against the quota: try again (`forwarder list` shows your sessions)",
                            owner.name
                        );
                    }
                    if read(0).is_some() {
                        bail!(
                            "another relay has just added a session forwarding to {backend}: see `forwarder list`"
                        );
                    }
                    if port.is_some() {
                        bail!(
                            "port {candidate} is handed out already in the cluster: see `forwarder list`, \
                             or leave out --port to get a free one"
                        );
                    }
                }
                Ok(Err(error)) => {
                    undo("etcd refused it");
                    return Err(self.unconfirmed(error.into()));
                }
                Err(_) => {
                    undo("etcd did not answer");
                    return Err(
                        self.unconfirmed(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
                    );
                }
            }
        }
        match last_refusal {
            Some(error) => Err(error.context(format!(
                "no client-facing port in {} is free both here and in the cluster",
                self.session_ports
            ))),
            None => bail!(
                "all client-facing ports in {} are handed out in the cluster: remove sessions, \
                 or run every relay with a wider --ports",
                self.session_ports
            ),
        }
    }

    fn unconfirmed(&self, error: anyhow::Error) -> anyhow::Error {
        warn!(error = format!("{error:#}"), "etcd did not confirm an add");
        anyhow::anyhow!(
            "etcd ({}) did not confirm the new session ({error:#}), so this relay did not add it. \
             Check that etcd answers (`forwarder stats` shows the cluster) and try again",
            self.options.endpoints.join(",")
        )
    }

    /// `forwarder remove` in a cluster: gone from etcd first (every relay
    /// drops it from its watch), then here. A session etcd holds and this
    /// relay has not programmed (e.g. a key it cannot open) is removed all
    /// the same. Root removes any session, anyone else only its own.
    pub async fn remove(
        &self,
        relay: &SharedRelay,
        caller: &Owner,
        target: &str,
    ) -> anyhow::Result<Removal> {
        let mut client = self.client("remove a session")?;
        let (local, before, local_owner) = {
            let relay = relay.lock().expect("relay lock");
            let local = relay.find_session(target);
            let before =
                local.and_then(|port| relay.session_info(port, crate::datapath::monotonic_ns()));
            let owner = local.and_then(|port| relay.owner_of(port).map(|owner| owner.uid));
            (local, before, owner)
        };
        let shared = {
            let state = self.state();
            state
                .sessions
                .values()
                .find(|(s, _)| {
                    s.id == target || local == Some(s.port) || target.parse() == Ok(s.port)
                })
                .cloned()
        };
        let owner_uid = match (&shared, local_owner) {
            (Some((record, _)), _) => record.owner.uid,
            (None, Some(uid)) => uid,
            (None, None) => return Ok(Removal::NotFound),
        };
        if !caller.is_root() && owner_uid != caller.uid {
            return Ok(Removal::Denied(format!(
                "session {target} belongs to another user: user {} (uid {}) may remove only its own sessions \
                 (`forwarder list` shows them); root may remove any",
                caller.name, caller.uid
            )));
        }
        if let Some((record, revision)) = &shared {
            let session_key = self.session_key(record.port);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    session_key.as_str(),
                    CompareOp::Equal,
                    *revision,
                )])
                .and_then([
                    TxnOp::delete(session_key.as_str(), None),
                    TxnOp::delete(self.backend_key(record.backend).as_str(), None),
                ]);
            match tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await {
                Ok(Ok(response)) if response.succeeded() => {
                    let mut state = self.state();
                    state.sessions.remove(&record.port);
                    state.refused.remove(&record.port);
                }
                Ok(Ok(_)) => bail!(
                    "session {} changed in the cluster while it was being removed: see `forwarder list` and try again",
                    record.id
                ),
                Ok(Err(error)) => bail!("etcd refused to remove session {}: {error}", record.id),
                Err(_) => bail!(
                    "etcd did not answer within {REQUEST_TIMEOUT:?}: session {} is not removed; try again",
                    record.id
                ),
            }
        }
        let port = local.or(shared.as_ref().map(|(record, _)| record.port));
        let why = if caller.is_root() {
            "removed by root"
        } else {
            "removed by its owner"
        };
        let removed =
            port.and_then(|port| relay.lock().expect("relay lock").remove_session(port, why));
        // The watch may have removed it here already, as the delete's echo;
        // one never programmed here is described by its record.
        let info = removed
            .or(before)
            .or_else(|| shared.map(|(record, _)| unprogrammed_info(&record)));
        Ok(info.map_or(Removal::NotFound, |info| Removal::Removed(Box::new(info))))
    }
}

/// What `remove` reports of a session this relay never programmed.
fn unprogrammed_info(record: &SharedSession) -> SessionInfo {
    SessionInfo {
        id: record.id.clone(),
        port: record.port,
        backend: record.backend.to_string(),
        relay_addresses: Vec::new(),
        idle_timeout_secs: record.idle_timeout_secs,
        idle_ms: 0,
        flows: Vec::new(),
        nat: None,
        has_key: record.sealed_key.is_some(),
        shared_port: None,
        owner: record.owner.clone(),
        relays: Vec::new(),
        tcp: None,
    }
}

/// Releases an `add`'s hold on a port however the add ends.
struct Pending<'a> {
    cluster: &'a Cluster,
    port: u16,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.cluster.state().pending.remove(&self.port);
    }
}

/// The route to a backend, looked up off the async threads (it runs `ip`).
async fn route_to(backend: SocketAddr) -> anyhow::Result<BackendRoute> {
    let ip = backend.ip();
    tokio::task::spawn_blocking(move || xdp::route_to(ip)).await?
}
