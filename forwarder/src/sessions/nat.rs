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
//! Both directions of the current client stay in XDP: the backend half of
//! the one flow points at the current client (screen updates), and its
//! client half, keyed by the current client endpoint, rewrites to Q ->
//! server (keystrokes, acks, heartbeats). Only datagrams from any other
//! client endpoint reach the daemon, which verifies each with the session
//! key and moves the session only for one that is newer than every
//! client-to-server datagram before it. Unverified packets are dropped:
//! they never reach the server nor move the server's replies.
//!
//! The daemon no longer sees the current endpoint's datagrams, so it cannot
//! know their sequence numbers by itself: the client half carries
//! `REWRITE_RECORD_CLIENT_SEQ`, and the XDP program raises the session's
//! slot in `CLIENT_SEQS` (by client-facing port, see forwarder-common's
//! `clientseq`) to the nonce of each client-to-server datagram it forwards.
//! Before judging a datagram from a new endpoint, before storing progress
//! and on restore the daemon raises its follower's newest to that record,
//! so a replay, sent from elsewhere, of a datagram XDP forwarded cannot move
//! the session. Every family a punched session can have (IPv4, IPv6 and
//! either translated) records: all three XDP pipelines call the same hook.
//!
//! The trade-off: XDP cannot check the OCB tag, so the record is what the
//! current endpoint's datagrams *claim*. A forger who can send from the
//! current client's address and port can raise it (up to 2^63 - 1 with one
//! datagram), which makes every later move look like a replay: it can
//! refuse the client's roaming, never take the session (a move still needs
//! a datagram sealed with the key), and mosh-server drops the forged
//! datagram itself. Anyone who can spoof the client's endpoint on its path
//! can already cut the session by other means (drop or flood it), and
//! keeping every client datagram in the kernel is what the relay is for.
//! Late (reordered) datagrams of the current endpoint go to the server
//! through XDP, which sorts them out as before.
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
    ClientVerdict, FlowFamily, Relay, Session, admit_from_server, bind_free_port, flow_entries,
    monotonic_ns,
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
    /// The room the session's share of flow capacity is in: its current
    /// client's flow's family, or its server's before any client (see
    /// `Relay::nat_move`).
    family: FlowFamily,
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

/// The map entries of a punched session's one flow: the backend half hands
/// unknown sources to the daemon, the client half records sequence numbers.
fn nat_entries(
    datapath: &Datapath,
    relay_addr: IpAddr,
    session_port: u16,
    client: SocketAddr,
    route: BackendRoute,
    upstream_port: u16,
    backend: SocketAddr,
) -> FlowEntries {
    let mut entries = flow_entries(
        datapath,
        relay_addr,
        session_port,
        client,
        route,
        upstream_port,
        backend,
    );
    entries.send_unknown_sources_to_daemon();
    entries.record_client_seqs();
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
        let family = FlowFamily::of_backend(punch_source);
        if !self.flow_room.take(family) {
            bail!("{}", self.flow_room.full(family));
        }
        let upstream = match bind_free_port(&mut self.flow_ports, route.source) {
            Ok(upstream) => upstream,
            Err((refusal, _)) => {
                self.flow_room.give_back(family);
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
                self.flow_room.give_back(family);
                return Err(error);
            }
        };
        // A port's record outlives the session that used it before.
        if let Err(error) = self.datapath.reset_client_seq(info.port) {
            warn!(
                port = info.port,
                error = format!("{error:#}"),
                "a new NAT session may inherit an earlier one's client sequence numbers: its client's moves could be refused until it catches up"
            );
        }
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
            family,
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
        if let Some((client, relay_addr)) = nat.current.as_ref().map(|c| (c.client, c.relay_addr)) {
            // The NAT mapping changed under a live session: re-point both halves.
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
        let recorded = self.recorded_client_seq(session_port);
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
        // What XDP forwarded from the current endpoint counts as accepted:
        // a replay of it from here is no newer.
        follower.raise(recorded);
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
            let had_client = nat.current.is_some();
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
    /// reach it (replacing the previous client's, which has the same key
    /// unless the route's source moved) and a client half for it, the
    /// previous client's removed (its datagrams go to the daemon again).
    /// A client of another family moves the session's share of flow room
    /// to that family's; with no room there the entries are not installed
    /// and the daemon carries the client (as when the maps refuse them).
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
            &self.datapath,
            relay_addr,
            session_port,
            client,
            session.route,
            nat.upstream_port,
            session.backend,
        );
        let family = FlowFamily::of(&entries);
        let room = if family == nat.family {
            true
        } else if self.flow_room.take(family) {
            self.flow_room.give_back(nat.family);
            nat.family = family;
            true
        } else {
            false
        };
        // The slow path follows `current` even if the maps refuse the entries.
        let previous = nat.current.replace(NatClient {
            client,
            relay_addr,
            entries,
            since_ns: monotonic_ns(),
        });
        nat.slow_to_server = (0, 0);
        nat.slow_to_client = (0, 0);
        info!(session = %session.id, %client, relay = %relay_addr, upstream_port = nat.upstream_port, "NAT session follows its client");
        if let Some(previous) = previous {
            if (previous.client, previous.relay_addr) != (client, relay_addr) {
                self.datapath.uninstall_client_half(&previous.entries);
            }
            if previous.entries.backend_key() != entries.backend_key() {
                self.datapath.uninstall_backend_half(&previous.entries);
            }
        }
        if !room {
            self.persist_nat(session_port);
            bail!(
                "{}: the punched session's client {client} goes through the daemon",
                self.flow_room.full(family)
            );
        }
        // Backend half first: the client half's datagrams get answers.
        let installed = self.datapath.install(&entries);
        self.persist_nat(session_port);
        installed
    }

    /// What XDP recorded for the punched session on `session_port` (0 when
    /// nothing, or when the map cannot be read: then the daemon judges by
    /// what it verified itself, the narrower window a restart also has).
    fn recorded_client_seq(&self, session_port: u16) -> u64 {
        self.datapath
            .recorded_client_seq(session_port)
            .unwrap_or_else(|error| {
                warn!(
                    port = session_port,
                    error = format!("{error:#}"),
                    "reading what XDP recorded of a NAT session's client"
                );
                0
            })
    }

    /// Raises the session's follower to what XDP forwarded since.
    fn sync_client_seq(&mut self, port: u16) {
        let recorded = self.recorded_client_seq(port);
        if let Some(follower) = self
            .sessions
            .get_mut(&port)
            .and_then(|s| s.nat.as_deref_mut())
            .and_then(|n| n.follower.as_mut())
        {
            follower.raise(recorded);
        }
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

    /// Newest traffic of a NAT session, through XDP or the daemon.
    pub(super) fn nat_last_active(datapath: &Datapath, nat: &NatState) -> u64 {
        let (client_seen, server_seen) = nat
            .current
            .as_ref()
            .map_or((0, 0), |c| datapath.last_seen(&c.entries));
        client_seen.max(server_seen).max(nat.last_from_client_ns)
    }

    /// Gives back what a removed NAT session held.
    pub(super) fn release_nat(&mut self, nat: NatState) {
        if let Some(current) = &nat.current {
            self.datapath.uninstall(&current.entries);
        }
        nat.upstream.close();
        self.flow_ports.release(nat.upstream_port);
        self.flow_room.give_back(nat.family);
    }

    /// The current client as a flow, for `list`.
    pub(super) fn nat_flow_info(&self, nat: &NatState, now_ns: u64) -> Option<FlowInfo> {
        let current = nat.current.as_ref()?;
        let (to_server, to_client) = self.datapath.flow_counters(&current.entries);
        let last = Self::nat_last_active(&self.datapath, nat).max(current.since_ns);
        Some(FlowInfo {
            client: current.client.to_string(),
            relay_addr: current.relay_addr.to_string(),
            relay_port: None,
            upstream_port: nat.upstream_port,
            packets_to_server: to_server.packets + nat.slow_to_server.0,
            bytes_to_server: to_server.bytes + nat.slow_to_server.1,
            packets_to_client: to_client.packets + nat.slow_to_client.0,
            bytes_to_client: to_client.bytes + nat.slow_to_client.1,
            fast_path_packets: to_server.packets + to_client.packets,
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
    /// Its current client's halves, adopted or re-installed: not an orphan.
    pub client_entries: Option<FlowEntries>,
}

impl Relay {
    /// Writes a punched session to the store (its key sealed); says whether
    /// it did. Failures are logged: the session keeps working, it just might
    /// not survive a restart.
    pub(super) fn persist_nat(&mut self, port: u16) -> bool {
        if self.store.is_none() {
            return false;
        }
        self.sync_client_seq(port);
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
            slot: 0,
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
        let waited: Vec<u16> = self
            .sessions
            .values()
            .filter(|s| {
                nat_of(s).is_some_and(|n| {
                    now.saturating_sub(n.stored_ns) >= PROGRESS_WRITE_INTERVAL.as_nanos() as u64
                })
            })
            .map(|s| s.port)
            .collect();
        // The client's numbers mostly move in XDP now: one map read per
        // session per interval, only for those whose interval is up.
        for port in waited {
            self.sync_client_seq(port);
            let moved = self
                .sessions
                .get(&port)
                .and_then(nat_of)
                .is_some_and(|n| n.seqs() != n.stored_seqs);
            if moved {
                self.persist_nat(port);
            }
        }
    }

    /// Rebuilds a stored punched session's NAT half (the session itself is
    /// built, not yet inserted): unseals its key, takes its port Q and a
    /// share of the flow table back, and adopts the pinned backend half (or installs
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
        let mut follower = match &record.sealed_key {
            Some(sealed) => Some(ClientFollower::resume(
                MoshKey::from_bytes(sealer.open(sealed, binding)?),
                record.newest_client_seq,
            )),
            None => None,
        };
        // The pinned record kept counting while no daemon ran.
        let recorded = self.recorded_client_seq(session.port);
        if let Some(follower) = &mut follower {
            follower.raise(recorded);
        }
        // The stored slot names nothing in the maps any more (the counters
        // are in the entries): the session takes a share of the capacity,
        // in its client's family; without room there, in its server's, and
        // the daemon carries the client (as `nat_move` does).
        let client_family = record
            .client
            .map(|(client, _)| FlowFamily::of_ends(client, session.backend));
        let family = match client_family {
            Some(family) if self.flow_room.has_room(family) => family,
            _ => FlowFamily::of_backend(session.backend),
        };
        if !self.flow_room.has_room(family) {
            bail!("{}", self.flow_room.full(family));
        }
        let in_maps = client_family == Some(family);
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
        let taken = self.flow_room.take(family);
        debug_assert!(taken, "room was checked above, and nothing since took any");
        let mut backend_key = None;
        let mut client_entries = None;
        let punch_source = record.punch_source;
        let current = record.client.map(|(client, relay_addr)| {
            let entries = nat_entries(&self.datapath, relay_addr, session.port, client, session.route, record.upstream_port, session.backend);
            if !in_maps {
                // Its halves, if pinned, are not claimed: they go.
                let full = self.flow_room.full(client_family.unwrap_or(family));
                warn!(session = %session.id, %client, "NAT session's client restored through the daemon: {full}");
                return NatClient { client, relay_addr, entries, since_ns: now };
            }
            let adopted = matches!(installed.backend_state(&entries), BackendState::Matches { .. })
                && installed.clients.iter().any(|found| found.matches(&entries));
            if !adopted {
                // Missing (userspace datapath, a detach) or from an older
                // daemon, which installed no client half: install what
                // the record says.
                if let Err(error) = self.datapath.install(&entries) {
                    warn!(session = %session.id, error = format!("{error:#}"), "re-installing a restored NAT session's halves");
                }
            }
            backend_key = Some(entries.backend_key());
            client_entries = Some(entries);
            if adopted {
                info!(session = %session.id, %client, relay = %relay_addr, upstream_port = record.upstream_port, "NAT session's client restored; pinned halves adopted");
            } else {
                info!(session = %session.id, %client, relay = %relay_addr, upstream_port = record.upstream_port, "NAT session's client restored; halves installed again");
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
            family,
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
            client_entries,
        })
    }
}
