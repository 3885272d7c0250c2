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
//! sessions/PORT      a SharedSession (JSON); no lease: sessions outlive relays
//! backends/IP:PORT   the port of the session forwarding there (one session per backend)
//! relays/NAME        a RelayPresence (JSON) under the relay's lease: what it holds
//! ```
//!
//! While etcd does not answer, a relay keeps forwarding every session it
//! has and refuses `add` and `remove` (nothing to reconcile later: neither
//! side changed alone); when etcd answers again it takes a fresh snapshot,
//! programs what it lacks and drops what etcd no longer has.
//!
//! Punched sessions are not shared: `--etcd` with `--punch-port` is refused
//! (see DESIGN.md, "Several relays through etcd").

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddrV4;
use std::path::PathBuf;
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
use crate::ports::PortRange;
use crate::sessions::SharedRelay;
use forwarder_api::{ClusterInfo, RelayPresence, SessionInfo};

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
    pub backend: SocketAddrV4,
    pub idle_timeout_secs: u64,
    /// The relay that handed the port out.
    pub created_by: String,
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
        Ok(Self {
            options: Arc::new(options),
            connect,
            session_ports,
            default_idle_timeout,
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

    fn backend_key(&self, backend: SocketAddrV4) -> String {
        format!("{}backends/{backend}", self.options.prefix)
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
    /// it from its watch.
    pub async fn add(
        &self,
        relay: &SharedRelay,
        start_reader: &StartReader,
        backend: SocketAddrV4,
        route: BackendRoute,
        port: Option<u16>,
        idle_timeout: Option<Duration>,
    ) -> anyhow::Result<SessionInfo> {
        let mut client = self.client("add a session")?;
        let idle_timeout = idle_timeout.unwrap_or(self.default_idle_timeout);
        let candidates: Vec<u16> = {
            let state = self.state();
            if let Some((existing, _)) = state.sessions.values().find(|(s, _)| s.backend == backend)
            {
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
            let record = SharedSession {
                id: id.clone(),
                port: candidate,
                backend,
                idle_timeout_secs: idle_timeout.as_secs(),
                created_by: self.options.relay_name.clone(),
            };
            if !self.state().pending.insert(candidate) {
                continue;
            }
            let _pending = Pending {
                cluster: self,
                port: candidate,
            };
            let socket = match relay.lock().expect("relay lock").add_shared_session(
                &id,
                candidate,
                backend,
                route,
                idle_timeout,
            ) {
                Ok(socket) => socket,
                Err(error) if port.is_some() => return Err(error),
                Err(error) => {
                    last_refusal = Some(error);
                    continue;
                }
            };
            let session_key = self.session_key(candidate);
            let backend_key = self.backend_key(backend);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(session_key.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(backend_key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(session_key.as_str(), serde_json::to_vec(&record)?, None),
                    TxnOp::put(backend_key.as_str(), candidate.to_string(), None),
                ])
                .or_else([TxnOp::get(backend_key.as_str(), None)]);
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
                    let backend_taken = response.op_responses().into_iter().any(|op| {
                        matches!(op, etcd_client::TxnOpResponse::Get(get) if !get.kvs().is_empty())
                    });
                    if backend_taken {
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
    /// drops it from its watch), then here.
    pub async fn remove(
        &self,
        relay: &SharedRelay,
        target: &str,
    ) -> anyhow::Result<Option<SessionInfo>> {
        let mut client = self.client("remove a session")?;
        let (local, before) = {
            let relay = relay.lock().expect("relay lock");
            let local = relay.find_session(target);
            let before =
                local.and_then(|port| relay.session_info(port, crate::datapath::monotonic_ns()));
            (local, before)
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
                    self.state().sessions.remove(&record.port);
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
        let port = local.or(shared.map(|(record, _)| record.port));
        let removed = port.and_then(|port| {
            relay
                .lock()
                .expect("relay lock")
                .remove_session(port, "removed by operator")
        });
        // The watch may have removed it here already, as the delete's echo.
        Ok(removed.or(before))
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
async fn route_to(backend: SocketAddrV4) -> anyhow::Result<BackendRoute> {
    let ip = *backend.ip();
    tokio::task::spawn_blocking(move || xdp::route_to(ip.into())).await?
}
