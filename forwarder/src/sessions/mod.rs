//! The session and flow table: what the relay forwards, kept consistent with
//! the XDP maps and the daemon's sockets.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tracing::{debug, info, warn};

use crate::datapath::Datapath;
use crate::datapath::socket::{Received, RelaySocket};
use crate::datapath::{
    BackendRoute, FlowAddrs, FlowEntries, FlowMapsReader, LastSeenSnapshot, MapsUsed, PassTotals,
};
use crate::expiry::{self, FlowActivity};
use crate::limits::{RecentSet, TokenBucket};
use crate::ports::{PortPool, PortRange};
use crate::store::{SessionRecord, Store};
use crate::users::{Owner, UserPolicy, UserQuota};
use forwarder_api::{FlowInfo, SessionInfo, SlowPathStats};

pub use crate::datapath::monotonic_ns;

mod report;
mod restore;
/// Room for flows in each family of maps (`--max-flows`, `--max-flows6`).
mod room;
pub use restore::Restored;
use room::{FlowFamily, FlowRoom};
/// Many adds in one store transaction (`Request::AddMany`).
pub mod batch;
/// The etcd-shared half: sessions the cluster defines (see `crate::cluster`).
mod clustered;
pub use clustered::SharedDefinition;

pub mod nat;
pub mod shared;
pub mod tcp;

/// A flow's identity within its session: the relay address and client
/// endpoint, and the client-facing port it arrived on (the session's own
/// or the shared port).
type FlowEndpoint = (IpAddr, SocketAddr, u16);

/// Settings that shape every session.
#[derive(Clone, Debug)]
pub struct Limits {
    pub flow_idle_timeout: Duration,
    pub default_session_idle_timeout: Duration,
    pub max_flows_per_session: usize,
    pub new_flows_per_sec: u32,
    /// Unanswered flows a session may hold (see [`DEFAULT_PROBATION_FLOWS`]).
    pub probation_flows_per_session: usize,
    /// Most sessions the relay holds; `add` beyond it is refused.
    pub max_sessions: usize,
}

pub struct Session {
    pub id: String,
    pub port: u16,
    pub backend: SocketAddr,
    pub route: BackendRoute,
    pub idle_timeout: Duration,
    pub socket: Arc<RelaySocket>,
    /// Newest packet seen on any of its flows (or its creation).
    last_active_ns: u64,
    new_flows: TokenBucket,
    /// Upstream ports of its flows, keyed by (relay address, client
    /// endpoint, client-facing port).
    flows: HashMap<FlowEndpoint, u16>,
    /// Upstream ports of the flows the server has not answered yet, oldest
    /// first: they do not count against the session's limits, and a new
    /// endpoint may evict one (see [`Relay::make_probation_room`]).
    probation: VecDeque<u16>,
    /// Client endpoints recently evicted from probation: one that comes
    /// back is a sender that retries (a real mosh-client does; a flood of
    /// spoofed one-shot sources does not), and is the last to be evicted.
    evicted: RecentSet<(IpAddr, SocketAddr)>,
    /// Set for a server behind a NAT that came through the punch handshake.
    nat: Option<Box<nat::NatState>>,
    /// Set for a session that carries its mosh key (reachable on the shared port).
    key: Option<Box<shared::SessionKey>>,
    /// Who created it (root for punched sessions and old stored ones).
    pub owner: Owner,
    /// The owner's quota, resolved when the session was made or restored.
    quota: UserQuota,
}

impl Session {
    fn new(
        id: String,
        backend: SocketAddr,
        route: BackendRoute,
        idle_timeout: Duration,
        socket: Arc<RelaySocket>,
        limits: &Limits,
        now: u64,
    ) -> Self {
        Self {
            id,
            port: socket.port,
            backend,
            route,
            idle_timeout,
            socket,
            last_active_ns: now,
            new_flows: TokenBucket::new(
                limits.new_flows_per_sec,
                limits.new_flows_per_sec.saturating_mul(2).max(1),
            ),
            flows: HashMap::new(),
            probation: VecDeque::new(),
            evicted: RecentSet::new(EVICTED_MEMORY),
            nat: None,
            key: None,
            owner: Owner::root(),
            quota: UserQuota::unlimited(),
        }
    }

    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            port: self.port,
            backend: self.backend,
            route_source: self.route.source,
            route_ifindex: self.route.ifindex,
            idle_timeout_secs: self.idle_timeout.as_secs(),
            // Punched sessions add theirs (sessions/nat.rs, key sealed).
            nat: None,
            // Keyed sessions add theirs (sessions/shared.rs).
            sealed_key: None,
            owner_uid: self.owner.uid,
            client_seq_floor: None,
        }
    }
}

pub struct Flow {
    pub session_port: u16,
    /// The port the client sends to: `session_port`, or the shared port.
    pub facing_port: u16,
    /// Keyed sessions: the sequence number of the flow's first datagram,
    /// verified with the session key (see `shared::SessionKey`).
    first_seq: Option<u64>,
    pub client: SocketAddr,
    pub relay_addr: IpAddr,
    pub upstream_port: u16,
    pub socket: Arc<RelaySocket>,
    entries: FlowEntries,
    created_ns: u64,
    slow_to_server: (u64, u64),
    slow_to_client: (u64, u64),
    last_slow_to_server_ns: u64,
    last_slow_from_server_ns: u64,
    /// The server answered this flow: it counts against the session's
    /// limits and is never evicted to make room for a new endpoint.
    answered: bool,
    /// Came back after an eviction from probation.
    returning: bool,
}

impl Flow {
    /// A flow as the daemon starts tracking it: its upstream port is its socket's.
    fn new(
        session_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
        socket: Arc<RelaySocket>,
        entries: FlowEntries,
        now: u64,
    ) -> Self {
        Self {
            session_port,
            facing_port: session_port,
            first_seq: None,
            client,
            relay_addr,
            upstream_port: socket.port,
            socket,
            entries,
            created_ns: now,
            slow_to_server: (0, 0),
            slow_to_client: (0, 0),
            last_slow_to_server_ns: 0,
            last_slow_from_server_ns: 0,
            answered: false,
            returning: false,
        }
    }
}

/// Flows per session that wait for the server's first answer, unless
/// `--probation-flows-per-session` says otherwise. A spoofed flood fills
/// this set, never the session's flow limit: each new endpoint evicts the
/// oldest one-shot sender, so a real client's new endpoint always gets in
/// and stays until mosh-server answers it.
pub const DEFAULT_PROBATION_FLOWS: usize = crate::config::defaults::PROBATION_FLOWS_PER_SESSION;

/// How many evicted endpoints a session remembers (see `Session::evicted`).
const EVICTED_MEMORY: usize = 256;

/// What the slow path should do with a packet that reached a session port.
pub enum ClientVerdict {
    /// Send it upstream through this flow socket to the backend.
    Forward {
        socket: Arc<RelaySocket>,
        backend: SocketAddr,
        new_flow: bool,
    },
    Drop,
}

/// The relay as every task shares it.
pub type SharedRelay = Arc<std::sync::Mutex<Relay>>;

/// The whole relay state. Lives behind one mutex: every operation is short
/// and never waits on the network.
pub struct Relay {
    instance: String,
    limits: Limits,
    interfaces: Vec<String>,
    relay_addresses: Vec<IpAddr>,
    datapath: Datapath,
    session_ports: PortPool,
    flow_ports: PortPool,
    flow_room: FlowRoom,
    sessions: BTreeMap<u16, Session>,
    flows: HashMap<u16, Flow>,
    stats: SlowPathStats,
    /// Where sessions are persisted (None: they live only in memory).
    store: Option<Store>,
    /// `--shared-port`, once the daemon opened it.
    shared: Option<shared::SharedPort>,
    /// What non-root owners may do (backend policy, quotas).
    users: UserPolicy,
    /// Each non-root owner's new-flow rate, across all of its sessions.
    owner_new_flows: HashMap<u32, TokenBucket>,
    /// Set when sessions are shared through etcd (see `shared.rs`).
    cluster: Option<forwarder_api::ClusterInfo>,
    /// The id the next `add_session` takes instead of a random one.
    shared_id: Option<String>,
    /// `--tcp-port`, once the daemon listens on it.
    tcp: Option<tcp::TcpOffer>,
    /// While a batch of adds runs: its lookups by backend and id (batch.rs).
    batch_index: Option<Box<batch::Index>>,
}

/// What a relay is built from: [`Relay::new`] takes it whole.
pub struct RelayParts {
    pub instance: String,
    pub limits: Limits,
    /// The interfaces it serves, and their addresses (the ones clients use).
    pub interfaces: Vec<String>,
    pub relay_addresses: Vec<IpAddr>,
    pub datapath: Datapath,
    pub session_ports: PortRange,
    pub flow_ports: PortRange,
    /// Where sessions are persisted (None: they live only in memory).
    pub store: Option<Store>,
}

/// The two map entries of a flow: client → relay:P becomes relay:Q → backend,
/// and backend → relay:Q becomes relay:P → client. The client's family and
/// the backend's may differ (the datapath translates). `datapath` numbers
/// the interface the backend's answers must arrive on.
pub fn flow_entries(
    datapath: &Datapath,
    relay_addr: IpAddr,
    session_port: u16,
    client: SocketAddr,
    route: BackendRoute,
    upstream_port: u16,
    backend: SocketAddr,
) -> FlowEntries {
    FlowEntries::new(&FlowAddrs {
        client,
        facing: SocketAddr::new(relay_addr, session_port),
        upstream: SocketAddr::new(route.source, upstream_port),
        backend,
        backend_iface: datapath.egress_iface(route.ifindex),
    })
}

impl Relay {
    pub fn new(parts: RelayParts) -> Self {
        let RelayParts {
            instance,
            limits,
            interfaces,
            relay_addresses,
            datapath,
            session_ports,
            flow_ports,
            store,
        } = parts;
        let flow_room = FlowRoom::new(datapath.sizes());
        Self {
            instance,
            limits,
            interfaces,
            relay_addresses,
            datapath,
            session_ports: PortPool::new(session_ports),
            flow_ports: PortPool::new(flow_ports),
            flow_room,
            sessions: BTreeMap::new(),
            flows: HashMap::new(),
            stats: SlowPathStats::default(),
            store,
            shared: None,
            users: UserPolicy::new(crate::config::defaults::USER_QUOTA),
            owner_new_flows: HashMap::new(),
            cluster: None,
            shared_id: None,
            tcp: None,
            batch_index: None,
        }
    }

    /// Sets what non-root owners may do; call before [`Relay::restore`], so
    /// restored sessions get their owners' quotas.
    pub fn set_user_policy(&mut self, users: UserPolicy) {
        self.users = users;
    }

    pub fn user_policy(&self) -> &UserPolicy {
        &self.users
    }

    /// The owner of the session on `port`.
    pub fn owner_of(&self, port: u16) -> Option<&Owner> {
        self.sessions.get(&port).map(|session| &session.owner)
    }

    /// Sessions and established (answered) flows of the owner `uid`.
    fn owner_usage(&self, uid: u32) -> (usize, usize) {
        self.sessions
            .values()
            .filter(|session| session.owner.uid == uid)
            .fold((0, 0), |(sessions, flows), session| {
                (
                    sessions + 1,
                    flows + session.flows.len() - session.probation.len(),
                )
            })
    }

    /// Whether the owner of the session on `session_port` may have one more
    /// established flow; names the quota when not.
    fn owner_flow_room(&self, session_port: u16) -> Result<(), String> {
        let Some(session) = self.sessions.get(&session_port) else {
            return Ok(());
        };
        if session.owner.is_root() {
            return Ok(());
        }
        let (_, flows) = self.owner_usage(session.owner.uid);
        let limit = &session.quota.max_flows;
        if limit.has_room(flows) {
            Ok(())
        } else {
            Err(format!(
                "user {} (uid {}) has {flows} established flows, the quota of {} ({});                  raise it in the config file ([user.{}] max_flows) for more",
                session.owner.name,
                session.owner.uid,
                limit.value,
                limit.source,
                session.owner.name
            ))
        }
    }

    #[cfg(test)]
    fn record_of(&self, port: u16) -> SessionRecord {
        self.sessions[&port].record()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Creates a session owned by root: reserves its client-facing port by binding it.
    pub fn add_session(
        &mut self,
        backend: SocketAddr,
        route: BackendRoute,
        port: Option<u16>,
        idle_timeout: Option<Duration>,
    ) -> anyhow::Result<(SessionInfo, Arc<RelaySocket>)> {
        self.add_session_for(Owner::root(), backend, route, port, idle_timeout)
    }

    /// Creates a session owned by `owner`, within its quota of sessions.
    /// The backend policy is the caller's to check (the control server).
    pub fn add_session_for(
        &mut self,
        owner: Owner,
        backend: SocketAddr,
        route: BackendRoute,
        port: Option<u16>,
        idle_timeout: Option<Duration>,
    ) -> anyhow::Result<(SessionInfo, Arc<RelaySocket>)> {
        let quota = self.users.quota_for(&owner);
        // A shared session's count was checked across the cluster (cluster::add).
        if !owner.is_root() && self.shared_id.is_none() {
            let (sessions, _) = self.owner_usage(owner.uid);
            let limit = &quota.max_sessions;
            if !limit.has_room(sessions) {
                bail!(
                    "user {} (uid {}) has {sessions} sessions, the quota of {} ({}): remove one \
                     (`forwarder list`, `forwarder remove ID`), or ask the relay's administrator to raise it \
                     ([user.{}] max_sessions in the config file)",
                    owner.name,
                    owner.uid,
                    limit.value,
                    limit.source,
                    owner.name
                );
            }
        }
        // An IPv4 backend written as ::ffff:a.b.c.d is the IPv4 one.
        let backend = crate::datapath::socket::canonical(backend);
        if self.relay_addresses.contains(&backend.ip()) {
            bail!(
                "backend {backend} is one of this relay's own addresses: the relay would forward to itself; \
                 give the mosh server's address"
            );
        }
        if backend.is_ipv4() != route.source.is_ipv4() {
            bail!(
                "the route to backend {backend} leaves from {}, an address of the other family: the relay \
                 reaches a backend in the backend's own family; give the relay an address of that family on \
                 the backend's side",
                route.source
            );
        }
        if let Some(existing) = self.session_on_backend(backend) {
            // Another user's session is not the caller's to name or remove.
            if !owner.is_root() && existing.owner.uid != owner.uid {
                bail!(
                    "another user's session already forwards to {backend}: one backend has one session; \
                     ask that user or the relay's administrator"
                );
            }
            bail!(
                "session {} (port {}) already forwards to {backend}: use it, or `forwarder remove {}` first",
                existing.id,
                existing.port,
                existing.id
            );
        }
        // The descriptors kept in reserve serve the control socket and the
        // metrics, as for new flows.
        if let Err(at_limit) = crate::datapath::fds::check_headroom() {
            bail!("{at_limit}");
        }
        if self.sessions.len() >= self.session_capacity() {
            bail!(
                "the relay holds its maximum of {} sessions{}: remove unused ones (`forwarder list`) \
                 or raise max_sessions in the config (--max-sessions)",
                self.session_capacity(),
                shared::capacity_note(self.shared.is_some())
            );
        }
        let socket = match port {
            Some(port) => {
                self.session_ports.take(port)?;
                match RelaySocket::bind_client_facing(port) {
                    Ok(socket) => socket,
                    Err(error) => {
                        self.session_ports.release(port);
                        return Err(error);
                    }
                }
            }
            None => {
                let mut bound = None;
                let port =
                    self.session_ports.allocate(|port| {
                        match RelaySocket::bind_client_facing(port) {
                            Ok(socket) => {
                                bound = Some(socket);
                                true
                            }
                            Err(_) => false,
                        }
                    });
                match (port, bound) {
                    (Some(_), Some(socket)) => socket,
                    _ => bail!(
                        "all client-facing ports in {} are in use: remove sessions or restart the daemon with a wider --ports",
                        self.session_ports.range()
                    ),
                }
            }
        };
        let socket = Arc::new(socket);
        let port = socket.port;
        if let Err(error) = self.datapath.add_session_bucket(port) {
            socket.close();
            self.session_ports.release(port);
            return Err(error);
        }
        let now = monotonic_ns();
        // A shared session arrives with the cluster's id (shared.rs).
        let id = self.shared_id.take();
        let id = id.unwrap_or_else(|| {
            loop {
                let candidate = format!("{:08x}", rand::random::<u32>());
                if !self.id_taken(&candidate) {
                    break candidate;
                }
            }
        });
        let idle_timeout = idle_timeout.unwrap_or(self.limits.default_session_idle_timeout);
        let mut session = Session::new(
            id,
            backend,
            route,
            idle_timeout,
            socket.clone(),
            &self.limits,
            now,
        );
        session.owner = owner;
        session.quota = quota;
        // Durable before it is announced: a session the caller was told about
        // survives a crash; one that never got committed never existed.
        if let Some(store) = &self.store
            && let Err(error) = store.put(&session.record())
        {
            socket.close();
            self.datapath.remove_session_bucket(port);
            self.session_ports.release(port);
            return Err(error);
        }
        info!(session = %session.id, port, %backend, owner = %session.owner.name, "session added");
        self.sessions.insert(port, session);
        Ok((self.session_info(port, now).expect("just inserted"), socket))
    }

    /// Finds a session by id or by its client-facing port.
    pub fn find_session(&self, target: &str) -> Option<u16> {
        if let Some(session) = self.sessions.values().find(|s| s.id == target) {
            return Some(session.port);
        }
        let port: u16 = target.parse().ok()?;
        self.sessions.contains_key(&port).then_some(port)
    }

    /// Removes a session and every flow of it.
    pub fn remove_session(&mut self, port: u16, why: &str) -> Option<SessionInfo> {
        let info = self.session_info(port, monotonic_ns())?;
        // Forgotten on disk first: a crash in between leaves flows without a
        // session, which the next start removes.
        if let Some(store) = &self.store
            && let Err(error) = store.delete(port)
        {
            warn!(
                port,
                error = format!("{error:#}"),
                "removing a session from the store"
            );
        }
        let upstream_ports: Vec<u16> = self.sessions.get(&port)?.flows.values().copied().collect();
        for upstream_port in upstream_ports {
            self.remove_flow(upstream_port, why);
        }
        if let Some(shared) = &mut self.shared {
            shared.ring.remove(port);
        }
        let session = self.sessions.remove(&port)?;
        if let Some(nat) = session.nat {
            self.release_nat(*nat);
        }
        session.socket.close();
        self.datapath.remove_session_bucket(port);
        self.session_ports.release(port);
        info!(session = %session.id, port, reason = why, "session removed");
        Some(info)
    }

    /// A packet from `client` to `relay_addr:session_port` reached the
    /// daemon: either the first of a new flow, or one the XDP program could
    /// not forward itself (no neighbour yet, ...).
    pub fn on_client_packet(
        &mut self,
        session_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
        len: usize,
    ) -> anyhow::Result<ClientVerdict> {
        self.client_packet(session_port, session_port, client, relay_addr, len, None)
    }

    /// [`Relay::on_client_packet`] for a client sending to `facing_port`
    /// (the session's own, or the shared port); `first_seq` is the verified
    /// sequence number of the datagram, if the session's key verified it.
    fn client_packet(
        &mut self,
        session_port: u16,
        facing_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
        len: usize,
        first_seq: Option<u64>,
    ) -> anyhow::Result<ClientVerdict> {
        let now = monotonic_ns();
        let Some(session) = self.sessions.get_mut(&session_port) else {
            self.stats.dropped_no_session += 1;
            return Ok(ClientVerdict::Drop);
        };
        if let Some(&upstream_port) = session.flows.get(&(relay_addr, client, facing_port)) {
            session.last_active_ns = now;
            let backend = session.backend;
            let flow = self
                .flows
                .get_mut(&upstream_port)
                .expect("session flows are in the flow table");
            flow.slow_to_server.0 += 1;
            flow.slow_to_server.1 += len as u64;
            flow.last_slow_to_server_ns = now;
            self.stats.forwarded_to_server += 1;
            return Ok(ClientVerdict::Forward {
                socket: flow.socket.clone(),
                backend,
                new_flow: false,
            });
        }
        // Nothing from the backend's side becomes a client: the server's own
        // address (a forged "client" would loop the server to itself) and
        // the relay's own addresses (a datagram the relay would send itself).
        if client.ip() == session.backend.ip() || self.relay_addresses.contains(&client.ip()) {
            self.stats.dropped_client_is_backend += 1;
            return Ok(ClientVerdict::Drop);
        }
        // Flows on probation that the server has answered may already fill
        // the limit: establish them before judging.
        if session.flows.len() >= self.limits.max_flows_per_session {
            self.promote_answered(session_port, now, None);
        }
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("looked up above");
        if session.flows.len() - session.probation.len() >= self.limits.max_flows_per_session {
            self.stats.refused_flow_limit += 1;
            warn!(session = %session.id, %client, limit = self.limits.max_flows_per_session, "new flow refused: session has its maximum of flows");
            return Ok(ClientVerdict::Drop);
        }
        if let Err(refusal) = self.owner_flow_room(session_port) {
            self.stats.refused_flow_limit += 1;
            warn!(session = %session_port, %client, "new flow refused: {refusal}");
            return Ok(ClientVerdict::Drop);
        }
        let session = self.sessions.get(&session_port).expect("looked up above");
        if session.probation.len() >= self.limits.probation_flows_per_session {
            self.make_probation_room(session_port, now);
        }
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("looked up above");
        if session.probation.len() >= self.limits.probation_flows_per_session {
            // Every flow waiting there was answered, and the session's limits
            // keep them from being established yet.
            self.stats.refused_flow_limit += 1;
            warn!(session = %session.id, %client, "new flow refused: the session's answered flows wait for room under its limits");
            return Ok(ClientVerdict::Drop);
        }
        let family = FlowFamily::of_ends(client, session.backend);
        if !self.flow_room.take(family) {
            self.stats.refused_flow_limit += 1;
            let full = self.flow_room.full(family);
            warn!(session = %session.id, %client, "new flow refused: {full}");
            return Ok(ClientVerdict::Drop);
        }
        let socket = match bind_free_port(&mut self.flow_ports, session.route.source) {
            Ok(socket) => socket,
            Err((refusal, log)) => {
                self.flow_room.give_back(family);
                self.stats.refused_flow_limit += 1;
                if log {
                    warn!(session = %session.id, %client, "new flow refused: {refusal}");
                }
                return Ok(ClientVerdict::Drop);
            }
        };
        let upstream_port = socket.port;
        let entries = flow_entries(
            &self.datapath,
            relay_addr,
            facing_port,
            client,
            session.route,
            upstream_port,
            session.backend,
        );
        if let Err(error) = self.datapath.install(&entries) {
            socket.close();
            self.flow_ports.release(upstream_port);
            self.flow_room.give_back(family);
            return Err(error.context("installing a flow"));
        }
        session
            .flows
            .insert((relay_addr, client, facing_port), upstream_port);
        session.probation.push_back(upstream_port);
        session.last_active_ns = now;
        let backend = session.backend;
        let returning = session.evicted.contains(&(relay_addr, client));
        info!(session = %session.id, %client, relay = %relay_addr, upstream_port, returning, "flow learned, on probation until the server answers");
        let mut flow = Flow::new(
            session_port,
            client,
            relay_addr,
            socket.clone(),
            entries,
            now,
        );
        flow.slow_to_server = (1, len as u64);
        flow.last_slow_to_server_ns = now;
        flow.returning = returning;
        flow.facing_port = facing_port;
        flow.first_seq = first_seq;
        self.flows.insert(upstream_port, flow);
        self.stats.flows_created += 1;
        self.stats.forwarded_to_server += 1;
        Ok(ClientVerdict::Forward {
            socket,
            backend,
            new_flow: true,
        })
    }

    /// A packet reached a flow's upstream socket: forward it to the client
    /// only when it is the server's (see [`admit_from_server`]). Returns the
    /// session socket, the client and the relay address to send from.
    pub fn on_server_packet(
        &mut self,
        upstream_port: u16,
        received: &Received,
        len: usize,
    ) -> Option<(Arc<RelaySocket>, SocketAddr, IpAddr)> {
        let now = monotonic_ns();
        let Some(flow) = self.flows.get_mut(&upstream_port) else {
            self.stats.dropped_no_session += 1;
            return None;
        };
        let session = self.sessions.get_mut(&flow.session_port)?;
        if !admit_from_server(&mut self.stats, received, session.backend, session.route) {
            return None;
        }
        session.last_active_ns = now;
        flow.slow_to_client.0 += 1;
        flow.slow_to_client.1 += len as u64;
        flow.last_slow_from_server_ns = now;
        self.stats.forwarded_to_client += 1;
        // A flow on the shared port answers its client from there.
        let facing_socket = match &self.shared {
            Some(shared) if flow.facing_port == shared.port => shared.socket.clone(),
            _ => session.socket.clone(),
        };
        Some((facing_socket, flow.client, flow.relay_addr))
    }

    fn remove_flow(&mut self, upstream_port: u16, why: &str) {
        let Some(flow) = self.flows.get(&upstream_port) else {
            return;
        };
        // What it saw still bounds what a new endpoint must bring.
        let bound = shared::flow_seq_bound(&self.datapath, flow);
        let flow = self.flows.remove(&upstream_port).expect("looked up above");
        if let Some(shared) = &mut self.shared
            && flow.facing_port == shared.port
        {
            shared.flows.remove(&(flow.relay_addr, flow.client));
        }
        self.datapath.uninstall(&flow.entries);
        flow.socket.close();
        self.flow_ports.release(upstream_port);
        self.flow_room.give_back(FlowFamily::of(&flow.entries));
        if let Some(session) = self.sessions.get_mut(&flow.session_port) {
            session
                .flows
                .remove(&(flow.relay_addr, flow.client, flow.facing_port));
            if let Some(key) = &mut session.key {
                key.retire(bound);
            }
            session.probation.retain(|&port| port != upstream_port);
            info!(session = %session.id, client = %flow.client, upstream_port, reason = why, "flow removed");
        }
    }

    fn activity(&self, flow: &Flow) -> FlowActivity {
        flow_activity(&self.datapath, flow, None)
    }

    /// Moves the session's answered flows out of probation, as far as its
    /// flow limit and its new-flow rate allow: only flows the server
    /// answered (mosh-server answers only datagrams that decrypt) take up
    /// the session's limits, so a spoofed flood cannot exhaust them.
    /// `seen`: the expiry tick's snapshot of the maps, else read them now.
    fn promote_answered(&mut self, session_port: u16, now: u64, seen: Option<&LastSeenSnapshot>) {
        let Some(uid) = self.sessions.get(&session_port).map(|s| s.owner.uid) else {
            return;
        };
        // The owner's quotas count every session of theirs (root has none).
        let (_, mut owner_flows) = if uid == 0 {
            (0, 0)
        } else {
            self.owner_usage(uid)
        };
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("looked up above");
        let mut index = 0;
        while index < session.probation.len() {
            let port = session.probation[index];
            let flow = self
                .flows
                .get_mut(&port)
                .expect("probation flows are in the flow table");
            let answered = flow_activity(&self.datapath, flow, seen).last_from_server_ns > 0;
            let room = session.flows.len() - session.probation.len()
                < self.limits.max_flows_per_session
                && session.quota.max_flows.has_room(owner_flows);
            if !answered || !room {
                index += 1;
                continue;
            }
            if !session.new_flows.try_take(now) {
                self.stats.refused_rate_limit += 1;
                return;
            }
            let owner_rate = session.quota.new_flows_per_sec.value;
            if uid != 0
                && owner_rate != 0
                && !self
                    .owner_new_flows
                    .entry(uid)
                    .or_insert_with(|| {
                        TokenBucket::new(owner_rate, owner_rate.saturating_mul(2).max(1))
                    })
                    .try_take(now)
            {
                self.stats.refused_rate_limit += 1;
                debug!(session = %session.id, owner = %session.owner.name, quota = owner_rate, source = %session.quota.new_flows_per_sec.source, "flow stays on probation: the owner's new-flow rate is spent");
                return;
            }
            owner_flows += 1;
            session.probation.remove(index);
            flow.answered = true;
            self.stats.flows_promoted += 1;
            debug!(session = %session.id, client = %flow.client, upstream_port = port, "the server answered: flow established");
        }
    }

    /// Makes room in a full probation set: evicts the oldest flow that sent
    /// one datagram, never came back and got no answer (what a spoofed
    /// source looks like), or failing that the oldest unanswered one. Flows
    /// the server answered are established instead (the expiry tick does
    /// that too, at the end of each pass through the flow maps).
    fn make_probation_room(&mut self, session_port: u16, now: u64) {
        let Some(session) = self.sessions.get(&session_port) else {
            return;
        };
        let mut oldest_unanswered = None;
        let mut one_shot = None;
        for &port in &session.probation {
            let flow = &self.flows[&port];
            let (client_seen, backend_seen) = self.datapath.last_seen(&flow.entries);
            if backend_seen > 0 || flow.last_slow_from_server_ns > 0 {
                continue;
            }
            oldest_unanswered.get_or_insert(port);
            if !flow.returning && client_seen == 0 && flow.slow_to_server.0 <= 1 {
                one_shot = Some(port);
                break;
            }
        }
        let Some(victim) = one_shot.or(oldest_unanswered) else {
            self.promote_answered(session_port, now, None);
            return;
        };
        let endpoint = {
            let flow = &self.flows[&victim];
            (flow.relay_addr, flow.client)
        };
        self.remove_flow(victim, "evicted from probation by a newer endpoint");
        self.stats.flows_evicted_unanswered += 1;
        if let Some(session) = self.sessions.get_mut(&session_port) {
            session.evicted.insert(endpoint, now);
        }
    }

    /// Establishes answered flows, drops idle flows, then idle sessions,
    /// reading each flow's map entries now.
    pub fn expire(&mut self, now_ns: u64) {
        self.expire_seen(now_ns, None);
    }

    /// Own descriptors of the flow maps, so the expiry tick can read them
    /// in bulk without this relay locked (None: nothing to read).
    pub fn flow_maps_reader(&self) -> Option<FlowMapsReader> {
        let mut used = MapsUsed::default();
        for flow in self.flows.values() {
            used.add(&flow.entries);
        }
        self.datapath.flow_maps_reader(used)
    }

    /// Records how long the last expiry tick took, for `stats`.
    pub fn note_expiry_tick(&mut self, read: Duration, locked: Duration) {
        self.stats.expiry_tick_read_us = read.as_micros() as u64;
        self.stats.expiry_tick_locked_us = locked.as_micros() as u64;
    }

    /// Records the last complete pass through the flow maps, for `stats`:
    /// its slices, what they read, and the lock held for its decisions.
    pub fn note_expiry_pass(&mut self, totals: PassTotals, locked: Duration) {
        self.stats.expiry_pass_ticks = u64::from(totals.ticks);
        self.stats.expiry_pass_entries = totals.entries as u64;
        self.stats.expiry_pass_read_us = totals.read.as_micros() as u64;
        self.stats.expiry_pass_locked_us = locked.as_micros() as u64;
    }

    /// The shortest idle timeout anything here has (flows, the default for
    /// sessions, each session's own): what bounds a pass's length.
    pub fn shortest_idle_timeout(&self) -> Duration {
        self.sessions
            .values()
            .map(|session| session.idle_timeout)
            .fold(
                self.limits
                    .flow_idle_timeout
                    .min(self.limits.default_session_idle_timeout),
                Duration::min,
            )
    }

    /// [`Self::expire`] with the maps' last-seen times taken from `seen`
    /// (a pass through the maps begun at `now_ns`, read outside the lock)
    /// for every flow it speaks for; flows created since, and halves it did
    /// not find, are read from the maps now.
    pub fn expire_seen(&mut self, now_ns: u64, seen: Option<&LastSeenSnapshot>) {
        let ports: Vec<u16> = self.sessions.keys().copied().collect();
        for port in ports {
            self.promote_answered(port, now_ns, seen);
        }
        let mut idle_flow_ports = Vec::new();
        let mut idle_sessions = Vec::new();
        for session in self.sessions.values_mut() {
            let ports: Vec<u16> = session.flows.values().copied().collect();
            let activity: Vec<FlowActivity> = ports
                .iter()
                .map(|port| flow_activity(&self.datapath, &self.flows[port], seen))
                .collect();
            if let Some(newest) = activity.iter().map(|a| a.last_active_ns).max() {
                session.last_active_ns = session.last_active_ns.max(newest);
            }
            if let Some(nat) = &session.nat {
                session.last_active_ns = session
                    .last_active_ns
                    .max(Self::nat_last_active(&self.datapath, nat));
            }
            for index in expiry::idle_flows(&activity, now_ns, self.limits.flow_idle_timeout) {
                idle_flow_ports.push(ports[index]);
            }
            // A shared session is idle only when it is idle on every relay:
            // the cluster judges that (cluster::sync), not one relay alone.
            if self.cluster.is_none()
                && expiry::session_idle(session.last_active_ns, now_ns, session.idle_timeout)
            {
                idle_sessions.push(session.port);
            }
        }
        for port in idle_flow_ports {
            self.remove_flow(port, "idle");
            self.stats.flows_expired += 1;
        }
        for port in idle_sessions {
            let owner = self.owner_of(port).cloned();
            if let (Some(info), Some(owner)) = (self.remove_session(port, "idle"), owner) {
                crate::users::audit_change(&owner, "expire", &info);
            }
            self.stats.sessions_expired += 1;
        }
        for port in self.stalled_nat_handshakes(now_ns) {
            self.remove_session(port, "punch handshake never delivered the key");
            self.stats.sessions_expired += 1;
        }
    }

    pub fn session_info(&self, port: u16, now_ns: u64) -> Option<SessionInfo> {
        let session = self.sessions.get(&port)?;
        let flows: Vec<&Flow> = session.flows.values().map(|p| &self.flows[p]).collect();
        let activity: Vec<FlowActivity> = flows.iter().map(|flow| self.activity(flow)).collect();
        let current = expiry::server_current(&activity);
        let last_active = activity
            .iter()
            .map(|a| a.last_active_ns)
            .fold(session.last_active_ns, u64::max);
        let millis = |ns: u64| now_ns.saturating_sub(ns) / 1_000_000;
        let mut infos: Vec<FlowInfo> = flows
            .iter()
            .zip(&activity)
            .enumerate()
            .map(|(index, (flow, activity))| {
                let (to_server, to_client) = self.datapath.flow_counters(&flow.entries);
                FlowInfo {
                    client: flow.client.to_string(),
                    relay_addr: flow.relay_addr.to_string(),
                    relay_port: (flow.facing_port != port).then_some(flow.facing_port),
                    upstream_port: flow.upstream_port,
                    packets_to_server: to_server.packets + flow.slow_to_server.0,
                    bytes_to_server: to_server.bytes + flow.slow_to_server.1,
                    packets_to_client: to_client.packets + flow.slow_to_client.0,
                    bytes_to_client: to_client.bytes + flow.slow_to_client.1,
                    fast_path_packets: to_server.packets + to_client.packets,
                    slow_path_packets: flow.slow_to_server.0 + flow.slow_to_client.0,
                    idle_ms: millis(activity.last_active_ns),
                    server_current: current == Some(index),
                    answered: flow.answered || activity.last_from_server_ns > 0,
                }
            })
            .collect();
        if let Some(nat) = &session.nat {
            infos.extend(self.nat_flow_info(nat, now_ns));
        }
        infos.sort_by_key(|f| f.upstream_port);
        Some(SessionInfo {
            id: session.id.clone(),
            port,
            backend: session.backend.to_string(),
            // Link-local addresses are no way in from another network.
            relay_addresses: self
                .relay_addresses
                .iter()
                .filter(|address| !matches!(address, IpAddr::V6(v6) if v6.is_unicast_link_local()))
                .map(ToString::to_string)
                .collect(),
            idle_timeout_secs: session.idle_timeout.as_secs(),
            idle_ms: millis(last_active),
            relays: self.holders(port, infos.len() as u64),
            flows: infos,
            nat: session.nat.as_deref().map(nat::NatState::info),
            has_key: session.key.is_some(),
            shared_port: self
                .shared
                .as_ref()
                .filter(|_| session.key.is_some())
                .map(|shared| shared.port),
            owner: session.owner.info(),
            tcp: self.tcp_port_info(),
        })
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let now = monotonic_ns();
        self.sessions
            .keys()
            .filter_map(|&port| self.session_info(port, now))
            .collect()
    }

    /// Removes everything (daemon shutdown): map entries and sockets.
    pub fn clear(&mut self) {
        let ports: Vec<u16> = self.sessions.keys().copied().collect();
        for port in ports {
            self.remove_session(port, "shutdown");
        }
    }

    /// Counts as activity on a session, so its idle timeout starts again
    /// (a gateway mapping renewed by its host). False: no such session.
    pub fn touch_session(&mut self, port: u16) -> bool {
        let Some(session) = self.sessions.get_mut(&port) else {
            return false;
        };
        session.last_active_ns = session.last_active_ns.max(monotonic_ns());
        true
    }

    /// The id and backend of the session on `port`, if there is one.
    pub fn session_backend(&self, port: u16) -> Option<(&str, SocketAddr)> {
        self.sessions
            .get(&port)
            .map(|session| (session.id.as_str(), session.backend))
    }
}

/// Takes the next port of `pool` that this host lets us bind at `address`, bound; or
/// says why there is none. The open-file limit is checked first and named
/// as such: at the limit every bind fails, which would otherwise read as a
/// full port range. The flag says whether to log the refusal (the
/// open-file limit is logged at most once a second).
fn bind_free_port(
    pool: &mut PortPool,
    address: IpAddr,
) -> Result<Arc<RelaySocket>, (String, bool)> {
    use crate::datapath::fds;
    if let Err(at_limit) = fds::check_headroom() {
        return Err((at_limit.to_string(), fds::count_refusal()));
    }
    let mut bound = None;
    let mut exhausted = None;
    let port = pool.allocate(|port| match RelaySocket::bind(address, port) {
        Ok(socket) => {
            bound = Some(socket);
            true
        }
        Err(error) => {
            // No other port would bind either: stop at the first.
            exhausted = fds::exhausted(&error);
            exhausted.is_some()
        }
    });
    if let Some(at_limit) = exhausted {
        if let Some(port) = port {
            pool.release(port);
        }
        return Err((at_limit.to_string(), fds::count_refusal()));
    }
    bound.map(Arc::new).ok_or_else(|| {
        (
            format!(
                "no free upstream port in {}; widen --flow-ports",
                pool.range()
            ),
            true,
        )
    })
}

/// The XDP program's rule for the server's half of a flow (`check_source`
/// in forwarder-ebpf), applied to whatever reaches the daemon's sockets
/// instead: a datagram is the server's only if it comes from the backend
/// endpoint, is addressed to the relay address the flow uses towards the
/// backend, and arrived on the interface the route to the backend uses.
/// Anything else could be a forger on the client's segment writing to the
/// client through the relay. Counts what it refuses.
fn admit_from_server(
    stats: &mut SlowPathStats,
    received: &Received,
    backend: SocketAddr,
    route: BackendRoute,
) -> bool {
    if received.from != backend {
        stats.dropped_not_from_server += 1;
        return false;
    }
    // ifindex 0: a route the daemon could not pin to an interface (it
    // never forwards to such a backend in XDP either).
    let wrong_interface = route.ifindex != 0 && received.ifindex != route.ifindex;
    if received.to != route.source || wrong_interface {
        stats.dropped_server_wrong_path += 1;
        return false;
    }
    true
}

/// A flow's newest activity, from the XDP program's timestamps and the
/// daemon's own.
fn flow_activity(
    datapath: &Datapath,
    flow: &Flow,
    seen: Option<&LastSeenSnapshot>,
) -> FlowActivity {
    let (client_seen, backend_seen) = datapath.last_seen_in(seen, &flow.entries, flow.created_ns);
    let from_server = backend_seen.max(flow.last_slow_from_server_ns);
    FlowActivity {
        last_active_ns: flow
            .created_ns
            .max(client_seen)
            .max(flow.last_slow_to_server_ns)
            .max(from_server),
        last_from_server_ns: from_server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    /// A relay on the userspace datapath with sockets on loopback: the
    /// session table's admission rules without any XDP.
    fn loopback_relay(max_flows_per_session: usize) -> Relay {
        loopback_relay_sized(max_flows_per_session, 4096, 4096)
    }

    /// [`loopback_relay`] with room for `max_flows` IPv4 and `max_flows6`
    /// IPv6 and translated flows.
    fn loopback_relay_sized(
        max_flows_per_session: usize,
        max_flows: u32,
        max_flows6: u32,
    ) -> Relay {
        let limits = Limits {
            flow_idle_timeout: Duration::from_secs(120),
            default_session_idle_timeout: Duration::from_secs(3600),
            max_flows_per_session,
            new_flows_per_sec: 1000,
            probation_flows_per_session: DEFAULT_PROBATION_FLOWS,
            max_sessions: 64,
        };
        Relay::new(RelayParts {
            instance: "unit".into(),
            limits,
            interfaces: Vec::new(),
            // 2001:db8::1 stands for the relay's own IPv6 address (loopback has
            // only ::1, which the IPv6 tests use for backends).
            relay_addresses: vec![LO, "2001:db8::1".parse().unwrap()],
            datapath: Datapath::Userspace {
                sizes: forwarder_common::config::RuntimeSizes::new(max_flows, max_flows6, 64)
                    .expect("valid sizes"),
            },
            session_ports: PortRange {
                lo: 42_000,
                hi: 42_099,
            },
            flow_ports: PortRange {
                lo: 42_100,
                hi: 42_999,
            },
            store: None,
        })
    }

    fn forwarded(verdict: ClientVerdict) -> bool {
        matches!(verdict, ClientVerdict::Forward { .. })
    }

    #[tokio::test]
    async fn a_spoofed_flood_stays_on_probation_and_a_retrying_client_gets_in() {
        let mut relay = loopback_relay(4);
        let route = BackendRoute {
            source: LO,
            ifindex: 0,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let relay_addr = LO;
        let spoofed = |i: u32| v4(Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8), 40_000);
        for i in 0..1_000 {
            assert!(forwarded(
                relay
                    .on_client_packet(info.port, spoofed(i), relay_addr, 64)
                    .unwrap()
            ));
        }
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert_eq!(
            flows.len(),
            DEFAULT_PROBATION_FLOWS,
            "a flood holds the probation set, no more"
        );
        assert!(flows.iter().all(|f| !f.answered));
        assert_eq!(
            relay.stats.flows_evicted_unanswered,
            1_000 - DEFAULT_PROBATION_FLOWS as u64
        );

        // A real client sends again from its endpoint (mosh retransmits):
        // it outlives the one-shot sources around it.
        let client: SocketAddr = "192.0.2.7:50000".parse().unwrap();
        relay
            .on_client_packet(info.port, client, relay_addr, 64)
            .unwrap();
        relay
            .on_client_packet(info.port, client, relay_addr, 64)
            .unwrap();
        for i in 1_000..1_100 {
            relay
                .on_client_packet(info.port, spoofed(i), relay_addr, 64)
                .unwrap();
        }
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert!(
            flows.iter().any(|f| f.client == client.to_string()),
            "the retrying client was evicted"
        );

        // Evicted anyway (a client that sent once) and back: remembered as returning.
        let once: SocketAddr = "192.0.2.8:50000".parse().unwrap();
        relay
            .on_client_packet(info.port, once, relay_addr, 64)
            .unwrap();
        for i in 2_000..2_000 + DEFAULT_PROBATION_FLOWS as u32 {
            relay
                .on_client_packet(info.port, spoofed(i), relay_addr, 64)
                .unwrap();
        }
        assert!(
            !relay
                .session_info(info.port, monotonic_ns())
                .unwrap()
                .flows
                .iter()
                .any(|f| f.client == once.to_string())
        );
        relay
            .on_client_packet(info.port, once, relay_addr, 64)
            .unwrap();
        for i in 3_000..3_100 {
            relay
                .on_client_packet(info.port, spoofed(i), relay_addr, 64)
                .unwrap();
        }
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert!(
            flows.iter().any(|f| f.client == once.to_string()),
            "a returning client was evicted again"
        );
        assert!(relay.flow_count() <= DEFAULT_PROBATION_FLOWS);
    }

    #[tokio::test]
    async fn the_tick_decides_from_its_snapshot_for_flows_older_than_it() {
        let mut relay = loopback_relay(1);
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let client: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let ClientVerdict::Forward { socket, .. } =
            relay.on_client_packet(info.port, client, LO, 64).unwrap()
        else {
            panic!("the flow was refused");
        };
        let flow = &relay.flows[&socket.port];
        let (entries, created) = (flow.entries, flow.created_ns);
        let s = 1_000_000_000;
        // A snapshot from before the flow existed does not speak for it.
        let stale = LastSeenSnapshot::for_test(created, &entries, (created, created));
        relay.expire_seen(created + s, Some(&stale));
        assert_eq!(relay.stats.flows_promoted, 0);
        // One taken after: the server's answer in it establishes the flow.
        let answered = LastSeenSnapshot::for_test(created + s, &entries, (0, created + s / 2));
        relay.expire_seen(created + s, Some(&answered));
        assert_eq!(relay.stats.flows_promoted, 1);
        // Its times decide idleness too: seen 100 s in, the flow is not
        // idle at 121 s (timeout 120 s), though nothing else saw it since creation.
        let at = created + 121 * s;
        let recent = LastSeenSnapshot::for_test(at, &entries, (created + 100 * s, 0));
        relay.expire_seen(at, Some(&recent));
        assert_eq!(relay.stats.flows_expired, 0);
        let quiet = LastSeenSnapshot::for_test(at, &entries, (0, 0));
        relay.expire_seen(at, Some(&quiet));
        assert_eq!(relay.stats.flows_expired, 1);
    }

    #[tokio::test]
    async fn answered_flows_are_established_and_count_against_the_limit() {
        let mut relay = loopback_relay(1);
        // ifindex 1: loopback, where the route to the backend points.
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let first: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let OneFlow {
            info,
            upstream: socket,
            from_server,
            _session_socket,
        } = one_flow(&mut relay, backend, route, first, LO);
        assert!(
            relay
                .on_server_packet(socket.port, &from_server, 64)
                .is_some()
        );
        // The server's endpoint at another relay address, or through another
        // interface, is a forger.
        server_forgers_are_dropped(
            &mut relay,
            socket.port,
            &from_server,
            &[Ipv4Addr::new(127, 0, 0, 9).into()],
            "127.0.0.2:10".parse().unwrap(),
        );

        // The answered flow fills the limit of one: a second endpoint is refused.
        let second: SocketAddr = "192.0.2.2:50000".parse().unwrap();
        assert!(!forwarded(
            relay.on_client_packet(info.port, second, LO, 64).unwrap()
        ));
        assert_eq!(relay.stats.refused_flow_limit, 1);
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert_eq!(flows.len(), 1);
        assert!(flows[0].answered);

        // Nothing from the backend's address becomes a client.
        let reflected = SocketAddr::new(backend.ip(), 1234);
        assert!(!forwarded(
            relay
                .on_client_packet(info.port, reflected, LO, 64)
                .unwrap()
        ));
        assert_eq!(relay.stats.dropped_client_is_backend, 1);
    }

    /// A session and its first flow, as [`one_flow`] made them.
    struct OneFlow {
        info: SessionInfo,
        /// The session's socket, held as long as the test holds the flow.
        _session_socket: Arc<RelaySocket>,
        /// The flow's own socket, on its upstream port Q.
        upstream: Arc<RelaySocket>,
        /// What the server sends the flow: from the backend, to the route's
        /// source, through the route's interface.
        from_server: Received,
    }

    /// A session for `backend` (reached as `route` says) and the flow of a
    /// first datagram from `client` to the relay's `relay_addr`.
    fn one_flow(
        relay: &mut Relay,
        backend: SocketAddr,
        route: BackendRoute,
        client: SocketAddr,
        relay_addr: IpAddr,
    ) -> OneFlow {
        let (info, session_socket) = relay.add_session(backend, route, None, None).unwrap();
        let ClientVerdict::Forward { socket, .. } = relay
            .on_client_packet(info.port, client, relay_addr, 64)
            .unwrap()
        else {
            panic!("the first flow, from {client}, was refused");
        };
        OneFlow {
            info,
            _session_socket: session_socket,
            upstream: socket,
            from_server: Received {
                len: 64,
                from: backend,
                to: route.source,
                ifindex: route.ifindex,
            },
        }
    }

    /// The forger checks of either family on a fresh relay's flow at
    /// `upstream_port`: `from_server` sent to any of `wrong_addresses` (relay
    /// addresses the server's route does not use) or through another
    /// interface is a wrong path, and anybody but the server at the right
    /// address (`elsewhere`) is not the server; none of them is forwarded.
    fn server_forgers_are_dropped(
        relay: &mut Relay,
        upstream_port: u16,
        from_server: &Received,
        wrong_addresses: &[IpAddr],
        elsewhere: SocketAddr,
    ) {
        let forged = wrong_addresses
            .iter()
            .map(|&to| Received { to, ..*from_server })
            .chain([Received {
                ifindex: 7,
                ..*from_server
            }]);
        for forged in forged {
            assert!(relay.on_server_packet(upstream_port, &forged, 64).is_none());
        }
        assert_eq!(
            relay.stats.dropped_server_wrong_path,
            wrong_addresses.len() as u64 + 1
        );
        let elsewhere = Received {
            from: elsewhere,
            ..*from_server
        };
        assert!(
            relay
                .on_server_packet(upstream_port, &elsewhere, 64)
                .is_none()
        );
        assert_eq!(relay.stats.dropped_not_from_server, 1);
    }

    #[tokio::test]
    async fn an_owner_is_held_to_its_quota_across_its_sessions() {
        let mut relay = loopback_relay(8);
        relay.set_user_policy(UserPolicy {
            quota: crate::users::Quota {
                max_sessions: 2,
                max_flows: 1,
                new_flows_per_sec: 0,
            },
            ..UserPolicy::new(crate::config::defaults::USER_QUOTA)
        });
        let alice = Owner {
            uid: 1000,
            name: "alice".into(),
            groups: vec!["alice".into()],
        };
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let backend = |n: u8| v4(Ipv4Addr::new(127, 0, 0, n), 9);
        let mut ports = Vec::new();
        for n in [2, 3] {
            let (info, _socket) = relay
                .add_session_for(alice.clone(), backend(n), route, None, None)
                .unwrap();
            assert_eq!(info.owner.name, "alice");
            assert_eq!(relay.record_of(info.port).owner_uid, 1000);
            ports.push(info.port);
        }
        let Err(refused) = relay.add_session_for(alice.clone(), backend(4), route, None, None)
        else {
            panic!("a third session was allowed");
        };
        let refused = refused.to_string();
        assert!(
            refused.contains("has 2 sessions, the quota of 2 (user_max_sessions"),
            "{refused}"
        );
        // Root is held to no quota.
        relay.add_session(backend(4), route, None, None).unwrap();
        // Another user's backend: refused without naming that session.
        let bob = Owner {
            uid: 1001,
            name: "bob".into(),
            groups: Vec::new(),
        };
        let Err(taken) = relay.add_session_for(bob, backend(2), route, None, None) else {
            panic!("two sessions for one backend");
        };
        let taken = taken.to_string();
        assert!(taken.contains("another user's session"), "{taken}");
        assert!(!taken.contains(&ports[0].to_string()), "{taken}");

        // One answered flow on each of alice's sessions: only one may be
        // established under her quota of one flow.
        for (index, &port) in ports.iter().enumerate() {
            let client = v4(Ipv4Addr::new(192, 0, 2, 1), 50_000 + index as u16);
            let ClientVerdict::Forward { socket, .. } =
                relay.on_client_packet(port, client, LO, 64).unwrap()
            else {
                panic!("alice's first flow on {port} was refused");
            };
            let answer = Received {
                len: 64,
                from: backend(2 + index as u8),
                to: LO,
                ifindex: 1,
            };
            assert!(relay.on_server_packet(socket.port, &answer, 64).is_some());
        }
        relay.expire(monotonic_ns());
        assert_eq!(relay.stats.flows_promoted, 1, "past alice's flow quota");
        // With her quota spent, a new endpoint is refused on any of her sessions.
        let late: SocketAddr = "192.0.2.9:50000".parse().unwrap();
        assert!(!forwarded(
            relay.on_client_packet(ports[0], late, LO, 64).unwrap()
        ));
        assert_eq!(relay.stats.refused_flow_limit, 1);
        let quota = relay.owner_flow_room(ports[1]).unwrap_err();
        assert!(
            quota.contains("1 established flows, the quota of 1 (user_max_flows"),
            "{quota}"
        );
    }

    #[tokio::test]
    async fn an_owners_flows_are_established_at_its_own_rate() {
        let mut relay = loopback_relay(8);
        relay.set_user_policy(UserPolicy::new(crate::users::Quota {
            max_sessions: 0,
            max_flows: 0,
            new_flows_per_sec: 1,
        }));
        let bob = Owner {
            uid: 1001,
            name: "bob".into(),
            groups: Vec::new(),
        };
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        // Three sessions, one answered flow each: the owner's bucket (1/s,
        // bursts of 2) lets two be established now, whatever the sessions' own.
        for n in 2..5u8 {
            let backend = v4(Ipv4Addr::new(127, 0, 0, n), 9);
            let (info, _socket) = relay
                .add_session_for(bob.clone(), backend, route, None, None)
                .unwrap();
            let client = v4(Ipv4Addr::new(192, 0, 2, n), 50_000);
            let ClientVerdict::Forward { socket, .. } =
                relay.on_client_packet(info.port, client, LO, 64).unwrap()
            else {
                panic!("bob's flow was refused");
            };
            let answer = Received {
                len: 64,
                from: backend,
                to: LO,
                ifindex: 1,
            };
            assert!(relay.on_server_packet(socket.port, &answer, 64).is_some());
        }
        relay.expire(monotonic_ns());
        assert_eq!(relay.stats.flows_promoted, 2);
        assert_eq!(relay.stats.refused_rate_limit, 1);
    }

    #[tokio::test]
    async fn the_shared_port_admits_by_key_and_refuses_replays_forgeries_and_the_wrong_direction() {
        use crate::mosh::MoshKey;
        let mut relay = loopback_relay(4);
        let shared_port = 42_099;
        relay.open_shared_port(shared_port).unwrap();
        let route = BackendRoute {
            source: LO,
            ifindex: 0,
        };
        // 40 keyed sessions and one without a key.
        let mut keyed = Vec::new();
        for index in 0..40u16 {
            let backend = v4(Ipv4Addr::new(127, 0, 0, 2), 9_000 + index);
            let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
            let key = MoshKey::from_bytes(rand::random());
            relay.set_session_key(info.port, key.clone()).unwrap();
            keyed.push((info.port, key));
        }
        let backend = v4(Ipv4Addr::new(127, 0, 0, 2), 8_999);
        let (keyless, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let keyless_key = MoshKey::from_bytes(rand::random());
        let relay_addr = LO;
        let endpoint = |i: u16| v4(Ipv4Addr::new(192, 0, 2, 1), 40_000 + i);
        let flows_of =
            |relay: &Relay, port: u16| relay.session_info(port, monotonic_ns()).unwrap().flows;

        // The right session, found among all keys (the 33rd here).
        let (port, key) = keyed[33].clone();
        let first = genuine(&key, 10);
        let verdict = relay
            .on_shared_packet(endpoint(1), relay_addr, &first)
            .unwrap();
        assert!(matches!(
            verdict,
            ClientVerdict::Forward { new_flow: true, .. }
        ));
        let flows = flows_of(&relay, port);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].client, endpoint(1).to_string());
        assert_eq!(flows[0].relay_port, Some(shared_port));
        assert!(
            keyed
                .iter()
                .filter(|(p, _)| *p != port)
                .all(|(p, _)| flows_of(&relay, *p).is_empty())
        );
        let info = relay.session_info(port, monotonic_ns()).unwrap();
        assert!(info.has_key);
        assert_eq!(info.shared_port, Some(shared_port));
        // The known endpoint goes on through its flow, whatever it sends.
        assert!(forwarded(
            relay
                .on_shared_packet(endpoint(1), relay_addr, b"anything at all, 24+ bytes")
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_admitted, 1);

        // A replay of it from another endpoint: verifies, not newer.
        assert!(!forwarded(
            relay
                .on_shared_packet(endpoint(2), relay_addr, &first)
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_replayed, 1);
        // The server's direction: verifies, refused.
        let from_server = genuine(&key, (1 << 63) | 50);
        assert!(!forwarded(
            relay
                .on_shared_packet(endpoint(3), relay_addr, &from_server)
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_wrong_direction, 1);
        // Forged: random bytes, a valid header with a flipped tag, a keyless session's key.
        let random: Vec<u8> = (0..84).map(|_| rand::random()).collect();
        let mut flipped = genuine(&key, 11);
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        let keyless_datagram = genuine(&keyless_key, 1);
        for forged in [&random, &flipped, &keyless_datagram] {
            assert!(!forwarded(
                relay
                    .on_shared_packet(endpoint(4), relay_addr, forged)
                    .unwrap()
            ));
        }
        assert_eq!(relay.stats.shared_unverified, 3);
        assert!(flows_of(&relay, keyless.port).is_empty());
        assert!(
            !relay
                .session_info(keyless.port, monotonic_ns())
                .unwrap()
                .has_key
        );

        // The client roams: its next datagram from a new endpoint is newer.
        let roamed = genuine(&key, 12);
        assert!(forwarded(
            relay
                .on_shared_packet(endpoint(5), relay_addr, &roamed)
                .unwrap()
        ));
        assert_eq!(flows_of(&relay, port).len(), 2);
        // Datagrams the flow forwarded raise the bar: 10 was its first, it
        // forwarded two, so 11 has been seen and is refused from elsewhere.
        assert!(!forwarded(
            relay
                .on_shared_packet(endpoint(6), relay_addr, &genuine(&key, 11))
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_replayed, 2);
        assert_eq!(relay.stats.shared_admitted, 2);

        // Another session's client gets its own session.
        let (other_port, other_key) = keyed[0].clone();
        assert!(forwarded(
            relay
                .on_shared_packet(endpoint(7), relay_addr, &genuine(&other_key, 1))
                .unwrap()
        ));
        assert_eq!(flows_of(&relay, other_port).len(), 1);

        // What the session's own port saw bounds the shared port too.
        let own = genuine(&other_key, 40);
        assert!(forwarded(
            relay
                .on_client_datagram(other_port, endpoint(9), relay_addr, &own)
                .unwrap()
        ));
        assert!(!forwarded(
            relay
                .on_shared_packet(endpoint(10), relay_addr, &own)
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_replayed, 3);

        // Removed sessions leave the ring.
        relay.remove_session(other_port, "test");
        assert!(!forwarded(
            relay
                .on_shared_packet(endpoint(8), relay_addr, &genuine(&other_key, 2))
                .unwrap()
        ));
        assert_eq!(relay.stats.shared_unverified, 4);
    }

    /// A datagram as mosh-client would seal it (its plaintext starts with
    /// timestamps and a small instruction id), with sequence number `seq`.
    fn genuine(key: &crate::mosh::MoshKey, seq: u64) -> Vec<u8> {
        let mut plaintext = [0u8; 60];
        plaintext[..4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        plaintext[14] = 0x78;
        key.seal(seq, &plaintext)
    }

    const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    /// The addresses the session table built a flow's entries from, read
    /// back by rebuilding them: what the datapath installs.
    fn expect_entries(relay: &Relay, upstream_port: u16, addrs: FlowAddrs) {
        let flow = &relay.flows[&upstream_port];
        assert_eq!(flow.entries, FlowEntries::new(&addrs));
    }

    #[tokio::test]
    async fn a_client_roaming_from_ipv4_to_ipv6_is_a_new_flow_of_the_same_session() {
        let mut relay = loopback_relay(4);
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let on_v4: SocketAddr = "192.0.2.7:50000".parse().unwrap();
        let on_v6: SocketAddr = "[2001:db8:7::7]:50000".parse().unwrap();
        let mut upstreams = Vec::new();
        for (client, relay_addr) in [(on_v4, LO), (on_v6, LO6)] {
            let ClientVerdict::Forward {
                socket,
                backend: to,
                new_flow,
            } = relay
                .on_client_packet(info.port, client, relay_addr, 64)
                .unwrap()
            else {
                panic!("{client} was refused");
            };
            assert!(new_flow);
            // Whatever the client's family, upstream is the backend's.
            assert_eq!(to, backend);
            expect_entries(
                &relay,
                socket.port,
                FlowAddrs {
                    client,
                    facing: SocketAddr::new(relay_addr, info.port),
                    upstream: SocketAddr::new(LO, socket.port),
                    backend,
                    // The userspace datapath checks no interface.
                    backend_iface: forwarder_common::flow::IFACE_ANY,
                },
            );
            upstreams.push(socket.port);
        }
        assert_ne!(upstreams[0], upstreams[1], "each flow has its own port Q");
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        let clients: Vec<&str> = flows.iter().map(|f| f.client.as_str()).collect();
        assert!(clients.contains(&"192.0.2.7:50000"), "{clients:?}");
        assert!(clients.contains(&"[2001:db8:7::7]:50000"), "{clients:?}");
        assert!(flows.iter().any(|f| f.relay_addr == "::1"));
        assert_eq!(relay.session_count(), 1);

        // The server answers the IPv6 flow (it decrypted its datagram): the
        // reply goes to the IPv6 client from the relay's IPv6 address.
        let answer = Received {
            len: 64,
            from: backend,
            to: LO,
            ifindex: 1,
        };
        let (_, to, from) = relay.on_server_packet(upstreams[1], &answer, 64).unwrap();
        assert_eq!((to, from), (on_v6, LO6));
        let (_, to, from) = relay.on_server_packet(upstreams[0], &answer, 64).unwrap();
        assert_eq!((to, from), (on_v4, LO));
    }

    #[tokio::test]
    async fn ipv6_and_translated_flows_have_their_own_room() {
        // Room for 2 IPv4 flows and 1 IPv6 or translated flow.
        let mut relay = loopback_relay_sized(8, 2, 1);
        let v4_route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let v6_route = BackendRoute {
            source: LO6,
            ifindex: 1,
        };
        let (to_v4, _socket4) = relay
            .add_session("127.0.0.2:9".parse().unwrap(), v4_route, None, None)
            .unwrap();
        let (to_v6, _socket6) = relay
            .add_session("[::1]:9".parse().unwrap(), v6_route, None, None)
            .unwrap();
        let new_flow = |relay: &mut Relay, port, client: &str, relay_addr| match relay
            .on_client_packet(port, client.parse().unwrap(), relay_addr, 64)
            .unwrap()
        {
            ClientVerdict::Forward { socket, .. } => Some(socket.port),
            ClientVerdict::Drop => None,
        };
        // An IPv6 client of the IPv4 server (translated) takes the IPv6 room...
        let translated = new_flow(&mut relay, to_v4.port, "[2001:db8:7::7]:50000", LO6)
            .expect("room for one IPv6 flow");
        // ...so an IPv4 client of the IPv6 server (translated too) is refused,
        assert_eq!(
            new_flow(&mut relay, to_v6.port, "192.0.2.1:50000", LO),
            None
        );
        // and so is an IPv6 client of the IPv6 server,
        assert_eq!(
            new_flow(&mut relay, to_v6.port, "[2001:db8:7::8]:50000", LO6),
            None
        );
        assert_eq!(relay.stats.refused_flow_limit, 2);
        // while IPv4 flows still fit, as many as --max-flows.
        let first = new_flow(&mut relay, to_v4.port, "192.0.2.1:50000", LO).expect("IPv4 room");
        new_flow(&mut relay, to_v4.port, "192.0.2.2:50000", LO).expect("IPv4 room");
        // Then the IPv4 room is full, and the IPv6 room still is.
        assert_eq!(
            new_flow(&mut relay, to_v4.port, "192.0.2.3:50000", LO),
            None
        );
        assert_eq!(relay.stats.refused_flow_limit, 3);
        // A flow that goes gives its own family's room back.
        relay.remove_flow(first, "test");
        assert_eq!(
            new_flow(&mut relay, to_v6.port, "[2001:db8:7::8]:50000", LO6),
            None,
            "an IPv4 flow's room is no IPv6 room"
        );
        new_flow(&mut relay, to_v4.port, "192.0.2.3:50000", LO).expect("the IPv4 room came back");
        relay.remove_flow(translated, "test");
        new_flow(&mut relay, to_v6.port, "192.0.2.1:50000", LO).expect("the IPv6 room came back");
        assert_eq!(relay.stats.refused_flow_limit, 4);
    }

    #[test]
    fn a_flows_family_is_the_family_of_the_maps_it_takes() {
        let family = |client: &str, facing: &str, upstream: &str, backend: &str| {
            let of_maps = FlowFamily::of(&FlowEntries::new(&FlowAddrs {
                client: client.parse().unwrap(),
                facing: facing.parse().unwrap(),
                upstream: upstream.parse().unwrap(),
                backend: backend.parse().unwrap(),
                backend_iface: forwarder_common::flow::IFACE_ANY,
            }));
            // What the room is taken by, before any entry exists.
            let of_ends = FlowFamily::of_ends(client.parse().unwrap(), backend.parse().unwrap());
            assert_eq!(of_ends, of_maps, "{client} to {backend}");
            of_maps
        };
        let v4 = ("192.0.2.1:50000", "10.0.0.1:60000");
        let v6 = ("[2001:db8:7::7]:50000", "[2001:db8::1]:60000");
        let to_v4 = ("10.0.1.1:61000", "10.0.1.2:60001");
        let to_v6 = ("[2001:db8:1::1]:61000", "[2001:db8:1::2]:60001");
        assert_eq!(family(v4.0, v4.1, to_v4.0, to_v4.1), FlowFamily::V4);
        assert_eq!(family(v6.0, v6.1, to_v6.0, to_v6.1), FlowFamily::V6);
        assert_eq!(family(v4.0, v4.1, to_v6.0, to_v6.1), FlowFamily::V6);
        assert_eq!(family(v6.0, v6.1, to_v4.0, to_v4.1), FlowFamily::V6);
        // A dual-stack socket's view of an IPv4 client is IPv4 on the wire.
        assert_eq!(
            family(
                "[::ffff:192.0.2.1]:50000",
                "[::ffff:10.0.0.1]:60000",
                to_v4.0,
                to_v4.1
            ),
            FlowFamily::V4
        );
    }

    #[tokio::test]
    async fn an_ipv6_backend_takes_ipv6_flow_ports_and_the_server_rule_in_ipv6() {
        let mut relay = loopback_relay(1);
        let route = BackendRoute {
            source: LO6,
            ifindex: 1,
        };
        let backend: SocketAddr = "[::1]:9".parse().unwrap();
        // An IPv4 client reaches the IPv6 server: translated in the datapath.
        let client: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let OneFlow {
            info,
            upstream: socket,
            from_server,
            _session_socket,
        } = one_flow(&mut relay, backend, route, client, LO);
        expect_entries(
            &relay,
            socket.port,
            FlowAddrs {
                client,
                facing: SocketAddr::new(LO, info.port),
                upstream: SocketAddr::new(LO6, socket.port),
                backend,
                backend_iface: forwarder_common::flow::IFACE_ANY,
            },
        );
        // The server's endpoint at the relay's IPv4 address, or at another
        // IPv6 one, is a forger; so is anybody else at the right address.
        server_forgers_are_dropped(
            &mut relay,
            socket.port,
            &from_server,
            &[LO, "2001:db8::1".parse().unwrap()],
            "[::1]:10".parse().unwrap(),
        );
        let (_, to, from) = relay
            .on_server_packet(socket.port, &from_server, 64)
            .unwrap();
        assert_eq!((to, from), (client, LO));

        // Nothing from the backend's address or the relay's own becomes a
        // client, in either family.
        for reflected in ["[::1]:1234", "[2001:db8::1]:1234", "127.0.0.1:1234"] {
            let reflected: SocketAddr = reflected.parse().unwrap();
            assert!(!forwarded(
                relay
                    .on_client_packet(info.port, reflected, LO6, 64)
                    .unwrap()
            ));
        }
        assert_eq!(relay.stats.dropped_client_is_backend, 3);

        // The relay's own IPv6 address is no backend; nor is a backend whose
        // route leaves from the other family.
        let own = relay.add_session("[2001:db8::1]:9".parse().unwrap(), route, None, None);
        let Err(own) = own else {
            panic!("the relay's own address became a backend");
        };
        assert!(own.to_string().contains("own addresses"), "{own}");
        let crossed = relay.add_session(
            "[::1]:10".parse().unwrap(),
            BackendRoute {
                source: LO,
                ifindex: 1,
            },
            None,
            None,
        );
        let Err(crossed) = crossed else {
            panic!("a route of the other family was taken");
        };
        assert!(crossed.to_string().contains("other family"), "{crossed}");
        // One backend, one session: its v4-mapped spelling is the same one.
        let (v4_backend, _) = relay
            .add_session(
                "127.0.0.2:9".parse().unwrap(),
                BackendRoute {
                    source: LO,
                    ifindex: 1,
                },
                None,
                None,
            )
            .unwrap();
        let mapped = relay.add_session(
            "[::ffff:127.0.0.2]:9".parse().unwrap(),
            BackendRoute {
                source: LO,
                ifindex: 1,
            },
            None,
            None,
        );
        let Err(mapped) = mapped else {
            panic!("a v4-mapped backend got a second session");
        };
        assert!(
            mapped.to_string().contains(&v4_backend.id),
            "a v4-mapped backend is the IPv4 one: {mapped}"
        );
    }

    #[tokio::test]
    async fn a_sessions_limits_count_flows_of_both_families() {
        let mut relay = loopback_relay(1);
        let route = BackendRoute {
            source: LO,
            ifindex: 1,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let OneFlow {
            info,
            upstream: socket,
            from_server: answer,
            _session_socket,
        } = one_flow(
            &mut relay,
            backend,
            route,
            "[2001:db8:7::7]:50000".parse().unwrap(),
            LO6,
        );
        assert!(relay.on_server_packet(socket.port, &answer, 64).is_some());
        // The answered IPv6 flow fills the limit of one: an IPv4 endpoint
        // of the same session is refused, and the other way round.
        assert!(!forwarded(
            relay
                .on_client_packet(info.port, "192.0.2.1:50000".parse().unwrap(), LO, 64)
                .unwrap()
        ));
        assert_eq!(relay.stats.refused_flow_limit, 1);

        // Probation is one set for both families: a flood of IPv6 sources
        // churns it, an IPv4 client that retries stays.
        let mut relay = loopback_relay(4);
        let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let retrying: SocketAddr = "192.0.2.9:50000".parse().unwrap();
        for _ in 0..2 {
            relay.on_client_packet(info.port, retrying, LO, 64).unwrap();
        }
        for i in 0..200u16 {
            let spoofed = SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, i)),
                40_000,
            );
            relay.on_client_packet(info.port, spoofed, LO6, 64).unwrap();
        }
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert_eq!(flows.len(), DEFAULT_PROBATION_FLOWS);
        assert!(flows.iter().any(|f| f.client == retrying.to_string()));
        assert_eq!(
            relay.stats.flows_evicted_unanswered,
            201 - DEFAULT_PROBATION_FLOWS as u64
        );
    }

    #[tokio::test]
    async fn the_shared_port_admits_an_ipv6_endpoint_by_key_and_a_roam_back_to_ipv4() {
        use crate::mosh::MoshKey;
        let mut relay = loopback_relay(4);
        let shared_port = 42_098;
        relay.open_shared_port(shared_port).unwrap();
        let route = BackendRoute {
            source: LO,
            ifindex: 0,
        };
        let backend: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let (info, _socket) = relay.add_session(backend, route, None, None).unwrap();
        let key = MoshKey::from_bytes(rand::random());
        relay.set_session_key(info.port, key.clone()).unwrap();

        let on_v6: SocketAddr = "[2001:db8:7::7]:40000".parse().unwrap();
        let first = genuine(&key, 10);
        let ClientVerdict::Forward {
            socket,
            new_flow: true,
            ..
        } = relay.on_shared_packet(on_v6, LO6, &first).unwrap()
        else {
            panic!("the IPv6 endpoint's verified datagram was refused");
        };
        expect_entries(
            &relay,
            socket.port,
            FlowAddrs {
                client: on_v6,
                facing: SocketAddr::new(LO6, shared_port),
                upstream: SocketAddr::new(LO, socket.port),
                backend,
                backend_iface: forwarder_common::flow::IFACE_ANY,
            },
        );
        // Its replay from an IPv4 endpoint is refused; the client's next
        // datagram from IPv4 is a new flow of the same session.
        let on_v4: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        assert!(!forwarded(
            relay.on_shared_packet(on_v4, LO, &first).unwrap()
        ));
        assert_eq!(relay.stats.shared_replayed, 1);
        assert!(forwarded(
            relay
                .on_shared_packet(on_v4, LO, &genuine(&key, 11))
                .unwrap()
        ));
        let flows = relay.session_info(info.port, monotonic_ns()).unwrap().flows;
        assert_eq!(flows.len(), 2);
        assert!(flows.iter().all(|f| f.relay_port == Some(shared_port)));
        assert_eq!(relay.stats.shared_admitted, 2);
        // The server's answer to the IPv6 flow leaves the shared port to it.
        let answer = Received {
            len: 64,
            from: backend,
            to: LO,
            ifindex: 0,
        };
        let (facing, to, from) = relay.on_server_packet(socket.port, &answer, 64).unwrap();
        assert_eq!((facing.port, to, from), (shared_port, on_v6, LO6));
    }
}
