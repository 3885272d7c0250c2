//! Keyed sessions and the shared port (`forwarder run --shared-port PORT`):
//! one client-facing UDP port on which every session that carries its mosh
//! key is reachable, as well as on its own port.
//!
//! Flows are keyed by client endpoint already (`ClientKey`: relay address,
//! client address and port, and the port the client sends to), so a flow on
//! the shared port is an ordinary flow of its session whose client half is
//! keyed by the shared port and whose backend half answers from it: once
//! installed, XDP forwards it like any other. Only a new client endpoint
//! reaches the daemon (the XDP program's miss, rate limited by the shared
//! port's own slow-path bucket), which must find its session without any
//! port to go by: the first datagram's OCB tag verifies under exactly one
//! key ([`KeyRing`]), it must go client to server, and its sequence number
//! must be newer than anything the session has seen (mosh-server's own
//! rule, so a datagram captured anywhere and replayed from a new endpoint
//! creates nothing). The flow is then learned as any other of that session:
//! its limits, probation and roaming rules apply unchanged.
//!
//! What the session has seen: the daemon verifies the first datagram of
//! every flow of a keyed session (on the shared port, and on its own port
//! too), and XDP counts the datagrams each flow forwards. mosh numbers its
//! datagrams one by one, so a flow whose first datagram carried sequence
//! `s` and that forwarded `n` datagrams has seen at least `s + n - 1`
//! ([`flow_seq_bound`]); the session's bound is the largest over its flows,
//! those removed included. A datagram lost before the relay leaves the
//! bound lower than the truth (a replay of a later one would pass the
//! relay, and mosh-server drops it: it creates an unanswered flow on
//! probation, no more). Datagrams forged from a live flow's own endpoint
//! raise the count and so the bound, by one each, so such a forger would
//! delay a roam of that client through the shared port by as many
//! datagrams as it sent, never let anything in. The bound is stored with
//! the session ([`Relay::store_keyed_progress`]) so a restart keeps it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use tracing::{debug, info};

use super::{ClientVerdict, Flow, Relay, Session};
use crate::datapath::Datapath;
use crate::datapath::socket::RelaySocket;
use crate::mosh::{KeyRing, MoshKey, Rejected};
use crate::store::{KeyBinding, SealedKey, SessionRecord, Store};

/// The key a session carries, and what bounds the sequence numbers its
/// client has used.
pub struct SessionKey {
    key: MoshKey,
    /// Newest client-to-server sequence number the daemon verified itself.
    newest_verified: Option<u64>,
    /// The largest bound of the session's flows that are gone (and, after
    /// a restart, the bound the previous daemon stored).
    retired_bound: Option<u64>,
    /// The bound as last written to the store, and when.
    stored_floor: Option<u64>,
    stored_ns: u64,
}

impl SessionKey {
    fn new(key: MoshKey, floor: Option<u64>) -> Self {
        Self {
            key,
            newest_verified: None,
            retired_bound: floor,
            stored_floor: floor,
            stored_ns: super::monotonic_ns(),
        }
    }

    /// A removed flow's bound stays the session's.
    pub(super) fn retire(&mut self, bound: Option<u64>) {
        self.retired_bound = self.retired_bound.max(bound);
    }
}

/// The shared port: its socket, the keys of the sessions on it, and which
/// session each of its client endpoints belongs to.
pub struct SharedPort {
    pub port: u16,
    pub socket: Arc<RelaySocket>,
    /// Keyed sessions, by their own client-facing port.
    pub(super) ring: KeyRing<u16>,
    /// (relay address, client endpoint) → session port, for flows on the shared port.
    pub(super) flows: HashMap<(IpAddr, SocketAddr), u16>,
}

/// The newest sequence number `flow` has carried at least: its verified
/// first one plus the datagrams it forwarded since (see the module's
/// header). None when its first datagram was not verified.
pub(super) fn flow_seq_bound(datapath: &Datapath, flow: &Flow) -> Option<u64> {
    let first = flow.first_seq?;
    let forwarded = datapath.to_server_counter(&flow.entries).packets + flow.slow_to_server.0;
    Some(first.saturating_add(forwarded.saturating_sub(1)))
}

/// What a keyed session's sealed key is bound to: its id and port.
fn binding(session: &Session) -> KeyBinding<'_> {
    KeyBinding {
        session_id: &session.id,
        port: session.port,
        upstream_port: 0,
    }
}

/// Why the session limit is one short with a shared port, for its refusal.
pub(super) fn capacity_note(shared: bool) -> &'static str {
    if shared {
        " (--max-sessions less the slow-path bucket the shared port takes)"
    } else {
        ""
    }
}

/// A keyed session's row: its key sealed, and the sequence bound so far.
pub(super) fn keyed_record(
    store: &Store,
    session: &Session,
    key: &MoshKey,
    floor: Option<u64>,
) -> SessionRecord {
    let mut record = session.record();
    record.sealed_key = Some(store.keyed_sealer().seal(&key.bytes(), binding(session)));
    record.client_seq_floor = floor;
    record
}

impl Relay {
    /// Sessions the relay may hold: the shared port's slow-path bucket
    /// takes one of the `--max-sessions` slots of the kernel's bucket map.
    pub(super) fn session_capacity(&self) -> usize {
        self.limits
            .max_sessions
            .saturating_sub(usize::from(self.shared.is_some()))
    }

    /// Opens the shared port: binds its socket (taking it out of the
    /// session pool when it lies inside `--ports`) and gives it a slow-path
    /// bucket of its own. Call before [`Relay::restore`], which adopts the
    /// pinned flows on it. Returns the socket, whose reader the daemon starts.
    pub fn open_shared_port(&mut self, port: u16) -> anyhow::Result<Arc<RelaySocket>> {
        if self.flow_ports.range().contains(port) {
            bail!(
                "--shared-port {port} lies inside --flow-ports {}: give a port outside it",
                self.flow_ports.range()
            );
        }
        let in_pool = self.session_ports.range().contains(port);
        if in_pool {
            self.session_ports.take(port)?;
        }
        let socket = match RelaySocket::bind_client_facing(port) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                if in_pool {
                    self.session_ports.release(port);
                }
                return Err(error.context(format!(
                    "binding the shared port {port}: is another program using it (`ss -ulpn sport = :{port}`)?"
                )));
            }
        };
        self.datapath
            .add_session_bucket(port)
            .context("the shared port's slow-path bucket")?;
        info!(port, "shared port open: keyed sessions are reachable on it");
        self.shared = Some(SharedPort {
            port,
            socket: socket.clone(),
            ring: KeyRing::default(),
            flows: HashMap::new(),
        });
        Ok(socket)
    }

    pub fn shared_port(&self) -> Option<u16> {
        self.shared.as_ref().map(|shared| shared.port)
    }

    /// Gives the session on `port` its mosh key: stored sealed, then the
    /// session is reachable on the shared port. Punched sessions have a
    /// key of their own (the punch handshake's) and take none here.
    pub fn set_session_key(&mut self, port: u16, key: MoshKey) -> anyhow::Result<()> {
        let Some(session) = self.sessions.get_mut(&port) else {
            bail!("no session on port {port}");
        };
        if session.nat.is_some() {
            bail!(
                "session {} is punched: its key comes from the punch handshake",
                session.id
            );
        }
        if let Some(store) = &self.store {
            let record = keyed_record(store, session, &key, None);
            store
                .put(&record)
                .context("storing the session's sealed key")?;
        }
        if let Some(shared) = &mut self.shared {
            shared.ring.insert(port, key.clone());
        }
        info!(session = %session.id, port, "session carries its mosh key");
        session.key = Some(Box::new(SessionKey::new(key, None)));
        Ok(())
    }

    /// Writes keyed sessions whose sequence bound moved since they were
    /// last stored: at most every [`super::nat::PROGRESS_WRITE_INTERVAL`]
    /// each, or all of them now with `force` (a clean shutdown). A daemon
    /// killed in between restarts with a lower bound, which only widens
    /// the window a replay could slip through, never refuses a real client.
    pub fn store_keyed_progress(&mut self, force: bool) {
        let now = super::monotonic_ns();
        let interval = super::nat::PROGRESS_WRITE_INTERVAL.as_nanos() as u64;
        let due: Vec<(u16, Option<u64>)> = self
            .sessions
            .values()
            .filter_map(|s| {
                let key = s.key.as_ref()?;
                let bound = self.client_seq_bound(s.port);
                let stale = force || now.saturating_sub(key.stored_ns) >= interval;
                (bound != key.stored_floor && stale).then_some((s.port, bound))
            })
            .collect();
        let Some(store) = &self.store else {
            return;
        };
        for (port, bound) in due {
            let Some(session) = self.sessions.get_mut(&port) else {
                continue;
            };
            let Some(key) = session.key.as_deref() else {
                continue;
            };
            let record = keyed_record(store, session, &key.key, bound);
            match store.put(&record) {
                Ok(()) => {
                    let key = session.key.as_deref_mut().expect("checked above");
                    key.stored_floor = bound;
                    key.stored_ns = now;
                }
                Err(error) => tracing::warn!(
                    session = %session.id,
                    error = format!("{error:#}"),
                    "storing a keyed session's sequence bound failed: a restart would start from an older one"
                ),
            }
        }
    }

    /// Unseals a stored keyed session's key (the session is built, not yet inserted).
    pub(super) fn restore_key(
        &mut self,
        session: &mut Session,
        sealed: &SealedKey,
        floor: Option<u64>,
    ) -> anyhow::Result<()> {
        let Some(store) = &self.store else {
            bail!("no session store");
        };
        let raw = store
            .keyed_sealer()
            .open(sealed, binding(session))
            .with_context(|| {
                format!(
                    "its mosh key (sealed under {} in the state folder)",
                    crate::store::KEYED_SECRET_FILE
                )
            })?;
        let key = MoshKey::from_bytes(raw);
        if let Some(shared) = &mut self.shared {
            shared.ring.insert(session.port, key.clone());
        }
        session.key = Some(Box::new(SessionKey::new(key, floor)));
        Ok(())
    }

    /// The newest client sequence number the session on `port` has seen, at least.
    fn client_seq_bound(&self, port: u16) -> Option<u64> {
        let session = self.sessions.get(&port)?;
        let key = session.key.as_ref()?;
        session
            .flows
            .values()
            .filter_map(|upstream| flow_seq_bound(&self.datapath, &self.flows[upstream]))
            .chain(key.newest_verified)
            .chain(key.retired_bound)
            .max()
    }

    /// A datagram reached a keyed session's own port: for a new flow, the
    /// session's key verifies it if it can, so the flow's sequence numbers
    /// bound what a new endpoint on the shared port must bring. Nothing is
    /// refused for failing that (the session's own port admits as it
    /// always did; mosh-server decides).
    pub fn on_client_datagram(
        &mut self,
        session_port: u16,
        client: SocketAddr,
        relay_addr: IpAddr,
        datagram: &[u8],
    ) -> anyhow::Result<ClientVerdict> {
        let first_seq = match self.sessions.get_mut(&session_port) {
            Some(session)
                if !session
                    .flows
                    .contains_key(&(relay_addr, client, session_port)) =>
            {
                session.key.as_mut().and_then(|key| {
                    let nonce = key.key.open_nonce(datagram).ok()?;
                    let client_to_server = crate::mosh::is_client_to_server(nonce);
                    client_to_server.then(|| {
                        key.newest_verified = key.newest_verified.max(Some(nonce));
                        nonce
                    })
                })
            }
            _ => None,
        };
        self.client_packet(
            session_port,
            session_port,
            client,
            relay_addr,
            datagram.len(),
            first_seq,
        )
    }

    /// A datagram reached the shared port from `client`: a known endpoint's
    /// goes on through its flow; a new endpoint becomes a flow of the
    /// keyed session whose key verifies the datagram, going client to
    /// server and newer than anything the session has seen. Anything else
    /// creates nothing and is counted.
    pub fn on_shared_packet(
        &mut self,
        client: SocketAddr,
        relay_addr: IpAddr,
        datagram: &[u8],
    ) -> anyhow::Result<ClientVerdict> {
        let Some(shared) = &self.shared else {
            return Ok(ClientVerdict::Drop);
        };
        let shared_port = shared.port;
        if let Some(&session_port) = shared.flows.get(&(relay_addr, client)) {
            return self.client_packet(
                session_port,
                shared_port,
                client,
                relay_addr,
                datagram.len(),
                None,
            );
        }
        let (session_port, nonce) = match shared.ring.find(datagram) {
            Ok(found) => found,
            Err(Rejected::WrongDirection) => {
                self.stats.shared_wrong_direction += 1;
                debug!(%client, "shared port: a server-to-client datagram from a new endpoint refused");
                return Ok(ClientVerdict::Drop);
            }
            Err(reason) => {
                self.stats.shared_unverified += 1;
                debug!(%client, %reason, "shared port: a datagram that verifies under no session key refused");
                return Ok(ClientVerdict::Drop);
            }
        };
        if self
            .client_seq_bound(session_port)
            .is_some_and(|bound| nonce <= bound)
        {
            self.stats.shared_replayed += 1;
            debug!(%client, session_port, nonce, "shared port: a datagram not newer than its session has seen refused (a replay)");
            return Ok(ClientVerdict::Drop);
        }
        if let Some(key) = self
            .sessions
            .get_mut(&session_port)
            .and_then(|s| s.key.as_mut())
        {
            key.newest_verified = key.newest_verified.max(Some(nonce));
        }
        let verdict = self.client_packet(
            session_port,
            shared_port,
            client,
            relay_addr,
            datagram.len(),
            Some(nonce),
        )?;
        if let ClientVerdict::Forward { new_flow: true, .. } = verdict
            && let Some(shared) = &mut self.shared
        {
            shared.flows.insert((relay_addr, client), session_port);
            self.stats.shared_admitted += 1;
            if let Some(session) = self.sessions.get(&session_port) {
                info!(session = %session.id, %client, relay = %relay_addr, "shared port: new endpoint matched to its session by key");
            }
        }
        Ok(verdict)
    }
}
