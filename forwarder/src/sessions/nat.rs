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

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tracing::{debug, info, warn};

use super::{ClientVerdict, Relay, Session, bind_free_port, flow_entries, monotonic_ns};
use crate::control::proto::{FlowInfo, NatInfo};
use crate::datapath::socket::RelaySocket;
use crate::datapath::Datapath;
use crate::datapath::xdp::{BackendRoute, FlowEntries};
use crate::mosh::{ClientFollower, MoshKey, Rejected};
use crate::punch::Token;

/// A handshake must reach the key within this long, or the session goes
/// (mosh-server itself exits 60 s after starting without a client).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);

/// The NAT half of a session.
pub struct NatState {
    pub upstream_port: u16,
    pub upstream: Arc<RelaySocket>,
    pub token: Token,
    /// Where the Allocate request came from: a repeated request from there
    /// (its answer was lost) gets the same session.
    pub punch_source: SocketAddrV4,
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
}

/// The client endpoint the server's packets currently go to.
struct NatClient {
    client: SocketAddrV4,
    relay_addr: Ipv4Addr,
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
        }
    }
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
        punch_source: SocketAddrV4,
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
        let upstream = match bind_free_port(&mut self.flow_ports) {
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
        // A punched session lives as long as the daemon: its key never goes
        // to disk, and after a restart the server side punches again.
        if let Some(store) = &self.store
            && let Err(error) = store.delete(info.port)
        {
            warn!(port = info.port, error = format!("{error:#}"), "keeping a punched session out of the store");
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
            slot,
            created_ns: now,
            last_from_server_ns: 0,
            last_from_client_ns: 0,
            last_keepalive_ns: 0,
            slow_to_server: (0, 0),
            slow_to_client: (0, 0),
            rejected_packets: 0,
        }));
        info!(session = %info.id, port = info.port, upstream_port, %punch_source, "NAT session allocated");
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
        seen: SocketAddrV4,
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
        client: SocketAddrV4,
        relay_addr: Ipv4Addr,
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
        client: SocketAddrV4,
        relay_addr: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("caller found it");
        let nat = session.nat.as_deref_mut().expect("caller checked");
        let entries = flow_entries(
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
        self.datapath.install_backend_half(&entries)
    }

    /// A packet reached a NAT session's Q socket that is not a handshake
    /// message: forward it to the current client if it comes from the server.
    pub fn on_nat_server_packet(
        &mut self,
        upstream_port: u16,
        from: SocketAddrV4,
        len: usize,
    ) -> Option<(Arc<RelaySocket>, SocketAddrV4, Ipv4Addr)> {
        let port = self.nat_port_by_upstream(upstream_port)?;
        let session = self.sessions.get_mut(&port)?;
        if from != session.backend {
            self.stats.dropped_not_from_server += 1;
            return None;
        }
        let nat = session.nat.as_deref_mut()?;
        let now = monotonic_ns();
        nat.last_from_server_ns = now;
        let current = nat.current.as_ref()?;
        nat.slow_to_client.0 += 1;
        nat.slow_to_client.1 += len as u64;
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
    ) -> Vec<(Arc<RelaySocket>, SocketAddrV4)> {
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
            .flow_counter(current.entries.backend_rewrite.counter_slot);
        let last = Self::nat_last_active(&self.datapath, nat).max(current.since_ns);
        Some(FlowInfo {
            client: current.client.to_string(),
            relay_addr: current.relay_addr.to_string(),
            upstream_port: nat.upstream_port,
            packets_to_server: nat.slow_to_server.0,
            bytes_to_server: nat.slow_to_server.1,
            packets_to_client: to_client.packets + nat.slow_to_client.0,
            bytes_to_client: to_client.bytes + nat.slow_to_client.1,
            fast_path_packets: to_client.packets,
            slow_path_packets: nat.slow_to_server.0 + nat.slow_to_client.0,
            idle_secs: now_ns.saturating_sub(last) as f64 / 1e9,
            server_current: true,
        })
    }
}
