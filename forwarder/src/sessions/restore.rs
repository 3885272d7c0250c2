//! Restart reconciliation: the store says which sessions exist, the pinned
//! flow maps say which flows the kernel forwards. Every session ends up
//! complete (row, client-facing socket) or absent; every flow complete (both
//! map halves consistent with its session, socket on Q, slot and port taken)
//! or absent. Nothing half-made survives a start.
//!
//! A punched (NAT'd) session comes back from its stored NAT half: its key
//! unsealed with the punch secret, its one port Q and a share of the flow table taken
//! back, and its pinned halves adopted (both re-installed if either is
//! missing or different). Without the punch secret such a session is dropped.

use std::collections::HashSet;

use super::*;
use crate::datapath::{BackendHalfKey, BackendState, InstalledClient, InstalledHalves};

/// What a start brought back, and the sockets whose readers the daemon starts.
#[derive(Default)]
pub struct Restored {
    pub session_sockets: Vec<Arc<RelaySocket>>,
    pub flow_sockets: Vec<Arc<RelaySocket>>,
    /// Punched sessions' backend-facing sockets (read by the punch service).
    pub nat_upstream_sockets: Vec<Arc<RelaySocket>>,
    pub dropped_sessions: usize,
    pub dropped_halves: usize,
}

impl Relay {
    /// Rebuilds the table from the stored sessions and the pinned maps.
    /// Call once, before any socket reader runs.
    pub fn restore(&mut self, records: Vec<SessionRecord>) -> Restored {
        let now = monotonic_ns();
        let mut restored = Restored::default();
        let installed = self.datapath.installed();
        let mut claimed = HashSet::new();
        // Punched sessions' client halves: theirs, not ordinary flows.
        let mut nat_clients = Vec::new();
        for record in records {
            match self.restore_session(&record, &installed, now) {
                Ok((socket, nat)) => {
                    restored.session_sockets.push(socket);
                    if let Some(nat) = nat {
                        restored.nat_upstream_sockets.push(nat.upstream);
                        claimed.extend(nat.backend_key);
                        nat_clients.extend(nat.client_entries);
                    }
                }
                Err(error) => {
                    warn!(
                        session = %record.id,
                        port = record.port,
                        error = format!("{error:#}"),
                        "stored session dropped: it cannot be restored"
                    );
                    restored.dropped_sessions += 1;
                    if let Some(store) = &self.store
                        && let Err(error) = store.delete(record.port)
                    {
                        warn!(
                            port = record.port,
                            error = format!("{error:#}"),
                            "forgetting an unrestorable session"
                        );
                    }
                }
            }
        }

        for found in &installed.clients {
            if nat_clients.iter().any(|entries| found.matches(entries)) {
                continue;
            }
            match self.restore_flow(found, &installed, now) {
                Ok((backend_key, socket)) => {
                    claimed.insert(backend_key);
                    restored.flow_sockets.push(socket);
                }
                Err(why) => {
                    warn!(
                        client = %found.client,
                        port = found.facing.port(),
                        why,
                        "pinned flow removed"
                    );
                    self.datapath.remove_client_half(found);
                    restored.dropped_halves += 1;
                }
            }
        }
        for key in installed
            .backend_keys()
            .filter(|key| !claimed.contains(*key))
        {
            warn!(
                upstream_port = key.upstream().port(),
                "pinned backend half without its flow removed"
            );
            self.datapath.remove_backend_half(key);
            restored.dropped_halves += 1;
        }
        restored
    }

    fn restore_session(
        &mut self,
        record: &SessionRecord,
        installed: &InstalledHalves,
        now: u64,
    ) -> anyhow::Result<(Arc<RelaySocket>, Option<nat::RestoredNat>)> {
        if self.sessions.values().any(|s| s.id == record.id) {
            bail!("another stored session has the same id");
        }
        self.session_ports.take(record.port)?;
        let socket = match RelaySocket::bind_client_facing(record.port) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                self.session_ports.release(record.port);
                return Err(error);
            }
        };
        if let Err(error) = self.datapath.add_session_bucket(record.port) {
            self.session_ports.release(record.port);
            return Err(error);
        }
        let mut session = Session::new(
            record.id.clone(),
            record.backend,
            BackendRoute {
                source: record.route_source,
                ifindex: record.route_ifindex,
            },
            Duration::from_secs(record.idle_timeout_secs),
            socket.clone(),
            &self.limits,
            now,
        );
        session.owner = crate::users::Owner::lookup(record.owner_uid, None);
        session.quota = self.users.quota_for(&session.owner);
        let nat = match &record.nat {
            Some(nat) => match self.restore_nat(&mut session, nat, installed, now) {
                Ok(restored) => Some(restored),
                Err(error) => {
                    socket.close();
                    self.datapath.remove_session_bucket(record.port);
                    self.session_ports.release(record.port);
                    return Err(error);
                }
            },
            None => None,
        };
        if let Some(sealed) = &record.sealed_key
            && let Err(error) = self.restore_key(&mut session, sealed, record.client_seq_floor)
        {
            socket.close();
            self.datapath.remove_session_bucket(record.port);
            self.session_ports.release(record.port);
            return Err(error);
        }
        info!(session = %session.id, port = session.port, backend = %session.backend, punched = nat.is_some(), keyed = session.key.is_some(), owner = %session.owner.name, "session restored");
        self.sessions.insert(record.port, session);
        Ok((socket, nat))
    }

    /// Adopts one client half found in the pinned maps (either family),
    /// with its backend half.
    fn restore_flow(
        &mut self,
        found: &InstalledClient,
        installed: &InstalledHalves,
        now: u64,
    ) -> Result<(BackendHalfKey, Arc<RelaySocket>), String> {
        let facing_port = found.facing.port();
        // A flow on the shared port belongs to the keyed session whose
        // backend it forwards to (backends are unique per session).
        let session_port = match &self.shared {
            Some(shared) if shared.port == facing_port => {
                let backend = found.backend;
                self.sessions
                    .values()
                    .find(|s| s.backend == backend && s.key.is_some())
                    .map(|s| s.port)
                    .ok_or_else(|| format!("no keyed session forwards to {backend}"))?
            }
            _ => facing_port,
        };
        let session = self
            .sessions
            .get(&session_port)
            .ok_or_else(|| format!("no stored session on port {session_port}"))?;
        let relay_addr = found.facing.ip();
        let client = found.client;
        let upstream_port = found.upstream_port;
        let entries = flow_entries(
            &self.datapath,
            relay_addr,
            facing_port,
            client,
            session.route,
            upstream_port,
            session.backend,
        );
        if !found.matches(&entries) {
            return Err("the client half does not match its session".into());
        }
        // In the room of the maps it was found in.
        let family = FlowFamily::of(&entries);
        if !self.flow_room.has_room(family) {
            return Err(self.flow_room.full(family));
        }
        let answered = match installed.backend_state(&entries) {
            BackendState::Matches { answered } => answered,
            BackendState::Differs => {
                return Err("the backend half does not match its session".into());
            }
            BackendState::Missing => return Err("the backend half is missing".into()),
        };
        self.flow_ports
            .take(upstream_port)
            .map_err(|error| error.to_string())?;
        let socket = match RelaySocket::bind(session.route.source, upstream_port) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                self.flow_ports.release(upstream_port);
                return Err(format!("{error:#}"));
            }
        };
        let taken = self.flow_room.take(family);
        debug_assert!(taken, "room was checked above, and nothing since took any");
        let session = self
            .sessions
            .get_mut(&session_port)
            .expect("looked up above");
        session
            .flows
            .insert((relay_addr, client, facing_port), upstream_port);
        info!(session = %session.id, %client, relay = %relay_addr, upstream_port, "flow restored");
        // A flow the server answered before the restart stays established;
        // the others wait on probation again.
        let mut flow = Flow::new(
            session_port,
            client,
            relay_addr,
            socket.clone(),
            entries,
            now,
        );
        flow.facing_port = facing_port;
        if let Some(shared) = &mut self.shared
            && shared.port == facing_port
        {
            shared.flows.insert((relay_addr, client), session_port);
        }
        flow.answered = answered;
        if !flow.answered {
            session.probation.push_back(upstream_port);
        }
        self.flows.insert(upstream_port, flow);
        Ok((entries.backend_key(), socket))
    }
}
