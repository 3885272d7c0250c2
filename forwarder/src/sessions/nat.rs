//! Sessions whose mosh-server sits behind a NAT and reached the relay with
//! the punch handshake (see `punch.rs`).
//!
//! Such a session has exactly one backend-facing port Q: the NAT only lets
//! in packets from the endpoint the server punched to, so per-flow ports (the
//! way ordinary sessions leave roaming decisions to mosh-server) cannot work.
//! mosh-server always sees the relay's Q as its client, and the relay itself
//! decides which client endpoint gets the server's packets, with
//! mosh-server's own rule: a packet from a new endpoint moves the session
//! only if its OCB tag verifies with the session key, it goes client to
//! server, and its sequence number is newer than any accepted before.
//!
//! Server-to-client packets (the bulk of mosh's traffic: screen updates)
//! stay in XDP: the backend half of the one flow points at the current
//! client. Client-to-server packets (keystrokes, acks, heartbeats) have no
//! client half in the maps, so they all reach the daemon, which verifies
//! each: only that way does it know the newest sequence number the client
//! sent, so a replay of any packet it captured, sent from elsewhere, cannot
//! move the session. Unverified packets are dropped: they never reach the
//! server nor move the server's replies.
//!
//! The server's endpoint can move too: when its NAT forgets the mapping
//! (reboot, conntrack flush) its next datagrams reach Q from a new external
//! port. The backend half carries `REWRITE_UNKNOWN_SOURCE_TO_DAEMON`, so the
//! XDP program hands such datagrams to the daemon (rate limited by the
//! session's slow-path bucket) instead of dropping them, and the daemon
//! moves the session's server endpoint only for one that verifies with the
//! session key, goes server to client and is newer than every server
//! datagram it verified before (`mosh::accept_server_move`).
//!
//! Punched sessions are stored (see `store.rs`, the key sealed under the
//! punch secret) on every change that matters: allocation, Bind, the key,
//! a client or server move; the newest sequence numbers are written at
//! most every [`PROGRESS_WRITE_INTERVAL`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{debug, info, warn};

use super::{
    ClientVerdict, Relay, Session, admit_from_server, bind_free_port, flow_entries, monotonic_ns,
};
use crate::datapath::Datapath;
use crate::datapath::socket::{Received, RelaySocket};
use crate::datapath::{BackendHalfKey, BackendRoute, BackendState, FlowEntries, InstalledHalves};
use crate::mosh::{self, ClientFollower, MoshKey, Rejected};
use crate::punch::wire::Token;
use crate::store::{KeyBinding, NatRecord};
use forwarder_api::{FlowInfo, NatInfo};

/// A handshake must reach the key within this long, or the session goes
/// (mosh-server itself exits 60 s after starting without a client).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the newest sequence numbers of a busy punched session are
/// written to the store. A restart resumes from the stored ones: older by
/// at most this much traffic, which only widens the window in which a
/// replayed datagram could move the session, never refuses a real one.
pub const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(5);

/// The NAT half of a session.
pub struct NatState {
    pub upstream_port: u16,
    pub upstream: Arc<RelaySocket>,
    pub token: Token,
    /// Where the Allocate request came from: a repeated request from there
    /// (its answer was lost) gets the same session.
    pub punch_source: SocketAddr,
    /// The server's endpoint as packets to Q arrive from it (set by Bind).
    bound: bool,
    follower: Option<ClientFollower>,
    current: Option<NatClient>,
    slot: u32,
    created_ns: u64,
    last_from_server_ns: u64,
    last_from_client_ns: u64,
    last_keepalive_ns: u64,
    slow_to_server: (u64, u64),
    slow_to_client: (u64, u64),
    pub rejected_packets: u64,
    /// Datagrams from unknown server endpoints that failed the rule and were dropped.
    pub rejected_server_packets: u64,
    /// Newest server-to-client nonce the daemon verified (direction bit set).
    newest_server_seq: Option<u64>,
    /// Sequence numbers as last written to the store, and when.
    stored_seqs: (Option<u64>, Option<u64>),
    stored_ns: u64,
}

/// The client endpoint the server's packets currently go to.
struct NatClient {
    client: SocketAddr,
    relay_addr: IpAddr,
    entries: FlowEntries,
    since_ns: u64,
}

/// What the punch service needs to answer an Allocate.
pub struct Allocation {
    pub client_port: u16,
    pub upstream_port: u16,
    pub token: Token,
    /// Sockets whose readers must be started (None when renewed).
    pub new_sockets: Option<(Arc<RelaySocket>, Arc<RelaySocket>)>,
}

impl NatState {
    pub fn info(&self) -> NatInfo {
        NatInfo {
            upstream_port: self.upstream_port,
            bound: self.bound,
            key_received: self.follower.is_some(),
            rejected_packets: self.rejected_packets,
            rejected_server_packets: self.rejected_server_packets,
        }
    }

    fn seqs(&self) -> (Option<u64>, Option<u64>) {
        (
            self.follower.as_ref().and_then(ClientFollower::newest),
            self.newest_server_seq,
        )
    }
}

/// The map entries of a punched session's one flow: only the backend half
/// is installed, and it hands unknown sources to the daemon.
fn nat_entries(
    relay_addr: IpAddr,
    session_port: u16,
    client: SocketAddr,
    route: BackendRoute,
    upstream_port: u16,
    backend: SocketAddr,
    slot: u32,
) -> FlowEntries {
    let mut entries = flow_entries(
        relay_addr,
        session_port,
        client,
        route,
        upstream_port,
        backend,
        slot,
    );
    entries.send_unknown_sources_to_daemon();
    entries
}

fn nat_of(session: &Session) -> Option<&NatState> {
    session.nat.as_deref()
}

impl Relay {
    fn nat_port_by_upstream(&self, upstream_port: u16) -> Option<u16> {
        self.sessions
            .values()
            .find(|s| nat_of(s).is_some_and(|n| n.upstream_port == upstream_port))
            .map(|s| s.port)
    }

    /// Creates a NAT session for a server whose Allocate came from
    /// `punch_source`, or returns the one it already has.
    pub fn allocate_nat_session(
        &mut self,
        punch_source: SocketAddr,
        route: BackendRoute,
    ) -> anyhow::Result<Allocation> {
        if let Some(session) = self
            .sessions
            .values()
            .find(|s| nat_of(s).is_some_and(|n| n.punch_source == punch_source))
        {
            let nat = nat_of(session).expect("found by its NAT state");
            return Ok(Allocation {
                client_port: session.port,
                upstream_port: nat.upstream_port,
                token: nat.token,
                new_sockets: None,
            });
        }
        let Some(slot) = self.free_slots.pop_front() else {
            bail!("the relay's flow table is full");
        };
        let upstream = match bind_free_port(&mut self.flow_ports, route.source) {
            Ok(upstream) => upstream,
            Err((refusal, _)) => {
                self.free_slots.push_front(slot);
                bail!("{refusal}");
            }
        };
        let upstream_port = upstream.port;
        // Until Bind says otherwise, the server is where the request came from.
        let (info, session_socket) = match self.add_session(punch_source, route, None, None) {
            Ok(added) => added,
            Err(error) => {
                upstream.close();
                self.flow_ports.release(upstream_port);
                self.free_slots.push_front(slot);
                return Err(error);
            }
        };
        let token: Token = rand::random();
        let now = monotonic_ns();
        let session = self.sessions.get_mut(&info.port).expect("just added");
        session.nat = Some(Box::new(NatState {
            upstream_port,
            upstream: upstream.clone(),
            token,
            punch_source,
            bound: false,
            follower: None,
            current: None,
            slot,
            created_ns: now,
            last_from_server_ns: 0,
            last_from_client_ns: 0,
            last_keepalive_ns: 0,
            slow_to_server: (0, 0),
            slow_to_client: (0, 0),
            rejected_packets: 0,
            rejected_server_packets: 0,
            newest_server_seq: None,
            stored_seqs: (None, None),
            stored_ns: 0,
        }));
        info!(session = %info.id, port = info.port, upstream_port, %punch_source, "NAT session allocated");
        // add_session stored it as an ordinary session: now with its NAT
        // half, or not at all (a restart must not find an ordinary session
        // pointing at the server's punch source).
        if !self.persist_nat(info.port)
            && let Some(store) = &self.store
            && let Err(error) = store.delete(info.port)
        {
            warn!(
                port = info.port,
                error = format!("{error:#}"),
                "removing a punched session's incomplete row from the store"
            );
        }
        Ok(Allocation {
            client_port: info.port,
            upstream_port,
            token,
            new_sockets: Some((session_socket, upstream)),
        })
    }

    /// A Bind with `token` reached Q from `seen`: that is the server's
    /// external endpoint for Q. Returns the session's client-facing port.
    pub fn bind_nat_session(
        &mut self,
        upstream_port: u16,
        token: &Token,
        seen: SocketAddr,
        route: BackendRoute,
    ) -> Option<u16> {
        let port = self.nat_port_by_upstream(upstream_port)?;
        let session = self.sessions.get_mut(&port)?;
        let nat = session.nat.as_deref_mut()?;
        if nat.token != *token {
            return None;
        }
        if session.backend != seen || !nat.bound {
            info!(session = %session.id, backend = %seen, previous = %session.backend, "NAT session bound: server reached through its NAT");
        }
        session.backend = seen;
        session.route = route;
        nat.bound = true;
        nat.last_from_server_ns = monotonic_ns();
        if let Some(current) = nat.current.take() {
            // The NAT mapping changed under a live session: re-point both halves.
            let (client, relay_addr) = (current.client, current.relay_addr);
            self.datapath.uninstall_backend_half(&current.entries);
            if let Err(error) = self.nat_move(port, client, relay_addr) {
                warn!(
                    error = format!("{error:#}"),
                    "re-installing a rebound NAT session"
                );
            }
        }
        self.persist_nat(port);
        Some(port)
    }

    /// The wrapper handed over mosh-server's key for the session on `client_port`.
    pub fn set_nat_key(&mut self, client_port: u16, token: &Token, key: MoshKey) -> bool {
        let Some(session) = self.sessions.get_mut(&client_port) else {
            return false;
        };
        let Some(nat) = session.nat.as_deref_mut() else {
            return false;
        };
        if nat.token != *token {
            return false;
        }
        // A repeated Key (its answer was lost) must not forget accepted sequence numbers.
        if nat
            .follower
            .as_ref()
            .is_none_or(|f| f.key_bytes() != key.bytes())
        {
            nat.follower = Some(ClientFollower::new(key));
            info!(session = %session.id, port = client_port, "NAT session has its key: clients may connect");
            self.persist_nat(client_port);
        }
        true
    }

    /// Whether `session_port` is a NAT session: its client packets go to
    /// [`Relay::on_nat_client_packet`].
    pub fn is_nat_session(&self, session_port: u16) -> bool {
        self.sessions
            .get(&session_port)
            .is_some_and(|s| s.nat.is_some())
    }

    /// A client packet reached the daemon on a NAT session's port.
    pub fn on_nat_client_packet(
        &mut self,
        session_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
        datagram: &[u8],
    ) -> ClientVerdict {
        let now = monotonic_ns();
        let Some(session) = self.sessions.get_mut(&session_port) else {
            return ClientVerdict::Drop;
        };
        let backend = session.backend;
        let Some(nat) = session.nat.as_deref_mut() else {
            return ClientVerdict::Drop;
        };
        let (Some(follower), true) = (nat.follower.as_mut(), nat.bound) else {
            self.stats.dropped_no_session += 1;
            return ClientVerdict::Drop;
        };
        let is_current = nat
            .current
            .as_ref()
            .is_some_and(|c| c.client == client && c.relay_addr == relay_addr);
        let verdict = follower.accept(datagram);
        // From the current client, late (reordered) packets still go to the
        // server, which sorts them out; a new endpoint must bring a newer one.
        let acceptable = match verdict {
            Ok(_) => true,
            Err(Rejected::Replayed) => is_current,
            Err(_) => false,
        };
        if let (false, Err(reason)) = (acceptable, verdict) {
            nat.rejected_packets += 1;
            self.stats.dropped_unverified_client += 1;
            debug!(session = %session.id, %client, %reason, "packet from a new client endpoint refused");
            return ClientVerdict::Drop;
        }
        nat.slow_to_server.0 += 1;
        nat.slow_to_server.1 += datagram.len() as u64;
        nat.last_from_client_ns = now;
        session.last_active_ns = now;
        let upstream = nat.upstream.clone();
        self.stats.forwarded_to_server += 1;
        if !is_current {
            let had_client = nat.current.take().is_some();
            match self.nat_move(session_port, client, relay_addr) {
                Ok(()) if had_client => self.stats.nat_client_moves += 1,
                Ok(()) => {}
                Err(error) => {
                    warn!(error = format!("{error:#}"), %client, "installing a NAT session's client")
                }
            }
        }
        ClientVerdict::Forward {
            socket: upstream,
            backend,
            new_flow: false,
        }
    }

    /// Points the session's flow at `client`: the backend half rewritten to
    /// reach it (replacing the previous client's, which has the same key).
    fn nat_move(
        &mut self,
        session_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
    ) -> anyhow::Result<()> {
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("caller found it");
        let nat = session.nat.as_deref_mut().expect("caller checked");
        let entries = nat_entries(
            relay_addr,
            session_port,
            client,
            session.route,
            nat.upstream_port,
            session.backend,
            nat.slot,
        );
        // The slow path follows `current` even if the maps refuse the entries.
        nat.current = Some(NatClient {
            client,
            relay_addr,
            entries,
            since_ns: monotonic_ns(),
        });
        nat.slow_to_server = (0, 0);
        nat.slow_to_client = (0, 0);
        info!(session = %session.id, %client, relay = %relay_addr, upstream_port = nat.upstream_port, "NAT session follows its client");
        let installed = self.datapath.install_backend_half(&entries);
        self.persist_nat(session_port);
        installed
    }

    /// A packet reached a NAT session's Q socket that is not a handshake
    /// message: forward it to the current client if it comes from the
    /// server. From another endpoint it may be the server whose NAT moved
    /// it: then it must pass [`mosh::accept_server_move`], and the session
    /// follows it (keepalives, client packets and the backend half).
    pub fn on_nat_server_packet(
        &mut self,
        upstream_port: u16,
        received: &Received,
        datagram: &[u8],
    ) -> Option<(Arc<RelaySocket>, SocketAddr, IpAddr)> {
        let port = self.nat_port_by_upstream(upstream_port)?;
        let session = self.sessions.get_mut(&port)?;
        let (from, to) = (received.from, received.to);
        let nat = session.nat.as_deref_mut()?;
        let now = monotonic_ns();
        let wrong_interface =
            session.route.ifindex != 0 && received.ifindex != session.route.ifindex;
        if from == session.backend {
            // The server's endpoint at another relay address or through
            // another interface came in some other way (a forger on the
            // client's side): the rule every path applies.
            if !admit_from_server(&mut self.stats, received, session.backend, session.route) {
                return None;
            }
            // Every server datagram the daemon sees raises the bar a moved
            // endpoint's first datagram must clear.
            if let Some(nonce) = nat
                .follower
                .as_ref()
                .and_then(|f| mosh::verified_server_nonce(f.key(), datagram))
            {
                nat.newest_server_seq = nat.newest_server_seq.max(Some(nonce));
            }
        } else {
            // Only to the address the server punched towards: what reaches Q
            // at another relay address never came through the server's path.
            let verdict = match (&nat.follower, nat.bound) {
                _ if to != session.route.source || wrong_interface => Err(Rejected::WrongPath),
                (Some(follower), true) => {
                    mosh::accept_server_move(follower.key(), datagram, nat.newest_server_seq)
                }
                _ => Err(Rejected::NoKey),
            };
            let nonce = match verdict {
                Ok(nonce) => nonce,
                Err(reason) => {
                    nat.rejected_server_packets += 1;
                    self.stats.dropped_unverified_server += 1;
                    debug!(session = %session.id, %from, %reason, "datagram from an unknown server endpoint refused");
                    return None;
                }
            };
            info!(
                session = %session.id,
                previous = %session.backend,
                backend = %from,
                "NAT session's server moved: its NAT gave it a new endpoint (verified with the session key)"
            );
            nat.newest_server_seq = Some(nonce);
            session.backend = from;
            self.stats.nat_server_moves += 1;
            let current = nat.current.as_ref().map(|c| (c.client, c.relay_addr));
            match current {
                // Re-installs the backend half with the new allowed source
                // (same key: it replaces the old one), and stores the session.
                Some((client, relay_addr)) => {
                    if let Err(error) = self.nat_move(port, client, relay_addr) {
                        warn!(
                            error = format!("{error:#}"),
                            "re-installing a NAT session whose server moved"
                        );
                    }
                }
                None => {
                    self.persist_nat(port);
                }
            }
        }
        let session = self.sessions.get_mut(&port)?;
        let nat = session.nat.as_deref_mut()?;
        nat.last_from_server_ns = now;
        let current = nat.current.as_ref()?;
        nat.slow_to_client.0 += 1;
        nat.slow_to_client.1 += datagram.len() as u64;
        session.last_active_ns = now;
        self.stats.forwarded_to_client += 1;
        Some((session.socket.clone(), current.client, current.relay_addr))
    }

    /// Sessions whose server has sent nothing for `interval`: send a
    /// keepalive from Q so the NAT keeps its mapping (mosh-server drops
    /// datagrams that do not decrypt, and goes silent 40 s after its client).
    pub fn nat_keepalives_due(
        &mut self,
        interval: Duration,
    ) -> Vec<(Arc<RelaySocket>, SocketAddr)> {
        let now = monotonic_ns();
        let interval = interval.as_nanos() as u64;
        let mut due = Vec::new();
        for session in self.sessions.values_mut() {
            let Some(nat) = session.nat.as_deref_mut() else {
                continue;
            };
            if !nat.bound {
                continue;
            }
            let from_server = nat
                .current
                .as_ref()
                .map(|c| self.datapath.last_seen(&c.entries).1)
                .unwrap_or(0)
                .max(nat.last_from_server_ns);
            if now.saturating_sub(from_server.max(nat.last_keepalive_ns)) >= interval {
                nat.last_keepalive_ns = now;
                due.push((nat.upstream.clone(), session.backend));
            }
        }
        due
    }

    /// NAT sessions whose handshake never delivered the key.
    pub(super) fn stalled_nat_handshakes(&self, now_ns: u64) -> Vec<u16> {
        self.sessions
            .values()
            .filter(|s| {
                nat_of(s).is_some_and(|n| {
                    n.follower.is_none()
                        && now_ns.saturating_sub(n.created_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64
                })
            })
            .map(|s| s.port)
            .collect()
    }

    /// Newest traffic of a NAT session: the client's (all through the
    /// daemon) and the server's (mostly through XDP).
    pub(super) fn nat_last_active(datapath: &Datapath, nat: &NatState) -> u64 {
        let server_seen = nat
            .current
            .as_ref()
            .map_or(0, |c| datapath.last_seen(&c.entries).1);
        server_seen.max(nat.last_from_client_ns)
    }

    /// Gives back what a removed NAT session held.
    pub(super) fn release_nat(&mut self, nat: NatState) {
        if let Some(current) = &nat.current {
            self.datapath.uninstall_backend_half(&current.entries);
        }
        nat.upstream.close();
        self.flow_ports.release(nat.upstream_port);
        self.free_slots.push_back(nat.slot);
    }

    /// The current client as a flow, for `list`.
    pub(super) fn nat_flow_info(&self, nat: &NatState, now_ns: u64) -> Option<FlowInfo> {
        let current = nat.current.as_ref()?;
        let to_client = self
            .datapath
            .flow_counter(current.entries.counter_slots().1);
        let last = Self::nat_last_active(&self.datapath, nat).max(current.since_ns);
        Some(FlowInfo {
            client: current.client.to_string(),
            relay_addr: current.relay_addr.to_string(),
            relay_port: None,
            upstream_port: nat.upstream_port,
            packets_to_server: nat.slow_to_server.0,
            bytes_to_server: nat.slow_to_server.1,
            packets_to_client: to_client.packets + nat.slow_to_client.0,
            bytes_to_client: to_client.bytes + nat.slow_to_client.1,
            fast_path_packets: to_client.packets,
            slow_path_packets: nat.slow_to_server.0 + nat.slow_to_client.0,
            idle_ms: now_ns.saturating_sub(last) / 1_000_000,
            server_current: true,
            answered: true,
        })
    }
}

/// What restoring a punched session brought back.
pub(super) struct RestoredNat {
    pub upstream: Arc<RelaySocket>,
    /// The pinned backend half it adopted or re-installed.
    pub backend_key: Option<BackendHalfKey>,
}

impl Relay {
    /// Writes a punched session to the store (its key sealed); says whether
    /// it did. Failures are logged: the session keeps working, it just might
    /// not survive a restart.
    pub(super) fn persist_nat(&mut self, port: u16) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        let Some(session) = self.sessions.get_mut(&port) else {
            return false;
        };
        let mut record = session.record();
        let Some(nat) = session.nat.as_deref_mut() else {
            return false;
        };
        let Some(sealer) = store.key_sealer() else {
            // Only a relay with the punch handshake makes punched sessions,
            // and it always has a sealer; keep nothing unsealed regardless.
            warn!(session = %session.id, "not storing a punched session: no punch secret to seal its key with");
            return false;
        };
        let binding = KeyBinding {
            session_id: &session.id,
            port,
            upstream_port: nat.upstream_port,
        };
        let seqs = nat.seqs();
        record.nat = Some(NatRecord {
            upstream_port: nat.upstream_port,
            slot: nat.slot,
            token: nat.token,
            punch_source: nat.punch_source,
            bound: nat.bound,
            sealed_key: nat
                .follower
                .as_ref()
                .map(|f| sealer.seal(&f.key_bytes(), binding)),
            client: nat.current.as_ref().map(|c| (c.client, c.relay_addr)),
            newest_client_seq: seqs.0,
            newest_server_seq: seqs.1,
        });
        match store.put(&record) {
            Ok(()) => {
                nat.stored_seqs = seqs;
                nat.stored_ns = monotonic_ns();
                true
            }
            Err(error) => {
                warn!(
                    session = %session.id,
                    error = format!("{error:#}"),
                    "storing a punched session failed: it works, but would not survive a restart"
                );
                false
            }
        }
    }

    /// Stores punched sessions whose newest sequence numbers moved since
    /// they were last written, at most once per [`PROGRESS_WRITE_INTERVAL`].
    pub fn store_nat_progress(&mut self) {
        let now = monotonic_ns();
        let due: Vec<u16> = self
            .sessions
            .values()
            .filter(|s| {
                nat_of(s).is_some_and(|n| {
                    n.seqs() != n.stored_seqs
                        && now.saturating_sub(n.stored_ns)
                            >= PROGRESS_WRITE_INTERVAL.as_nanos() as u64
                })
            })
            .map(|s| s.port)
            .collect();
        for port in due {
            self.persist_nat(port);
        }
    }

    /// Rebuilds a stored punched session's NAT half (the session itself is
    /// built, not yet inserted): unseals its key, takes its port Q and
    /// counter slot back, and adopts the pinned backend half (or installs
    /// it again if it is missing or differs).
    pub(super) fn restore_nat(
        &mut self,
        session: &mut Session,
        record: &NatRecord,
        installed: &InstalledHalves,
        now: u64,
    ) -> anyhow::Result<RestoredNat> {
        let Some(store) = &self.store else {
            bail!("no session store");
        };
        let Some(sealer) = store.key_sealer() else {
            bail!(
                "it is a punched session, and the punch handshake is not configured: its session key is sealed \
                 under the punch secret, so start the relay with the same --punch-port and --punch-secret-file \
                 to keep such sessions across restarts"
            );
        };
        let binding = KeyBinding {
            session_id: &session.id,
            port: session.port,
            upstream_port: record.upstream_port,
        };
        let follower = match &record.sealed_key {
            Some(sealed) => Some(ClientFollower::resume(
                MoshKey::from_bytes(sealer.open(sealed, binding)?),
                record.newest_client_seq,
            )),
            None => None,
        };
        let slot = record.slot;
        if slot >= self.datapath.max_flows() || !self.free_slots.contains(&slot) {
            bail!("its counter slot {slot} is out of range or used twice");
        }
        self.flow_ports
            .take(record.upstream_port)
            .context("taking its upstream port back")?;
        let upstream = match RelaySocket::bind(session.route.source, record.upstream_port) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                self.flow_ports.release(record.upstream_port);
                return Err(error);
            }
        };
        self.free_slots.retain(|&free| free != slot);
        let mut backend_key = None;
        let punch_source = record.punch_source;
        let current = record.client.map(|(client, relay_addr)| {
            let entries = nat_entries(relay_addr, session.port, client, session.route, record.upstream_port, session.backend, slot);
            let adopted = matches!(installed.backend_state(&entries), BackendState::Matches { .. });
            if !adopted {
                // Missing (userspace datapath, a detach) or from an older
                // layout: install what the record says.
                if let Err(error) = self.datapath.install_backend_half(&entries) {
                    warn!(session = %session.id, error = format!("{error:#}"), "re-installing a restored NAT session's backend half");
                }
            }
            backend_key = Some(entries.backend_key());
            if adopted {
                info!(session = %session.id, %client, relay = %relay_addr, upstream_port = record.upstream_port, "NAT session's client restored; pinned backend half adopted");
            } else {
                info!(session = %session.id, %client, relay = %relay_addr, upstream_port = record.upstream_port, "NAT session's client restored; backend half installed again");
            }
            NatClient { client, relay_addr, entries, since_ns: now }
        });
        let seqs = (
            follower.as_ref().and_then(ClientFollower::newest),
            record.newest_server_seq,
        );
        session.nat = Some(Box::new(NatState {
            upstream_port: record.upstream_port,
            upstream: upstream.clone(),
            token: record.token,
            punch_source,
            bound: record.bound,
            follower,
            current,
            slot,
            created_ns: now,
            // Keepalives resume one interval from now; the server's
            // traffic in the fast path counts as before.
            last_from_server_ns: now,
            last_from_client_ns: now,
            last_keepalive_ns: 0,
            slow_to_server: (0, 0),
            slow_to_client: (0, 0),
            rejected_packets: 0,
            rejected_server_packets: 0,
            newest_server_seq: record.newest_server_seq,
            stored_seqs: seqs,
            stored_ns: now,
        }));
        Ok(RestoredNat {
            upstream,
            backend_key,
        })
    }
}
