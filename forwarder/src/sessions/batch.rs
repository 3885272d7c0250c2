//! Many session adds at once (`Request::AddMany`): each item goes through
//! the same checks as a single add (quotas, one session per backend, the
//! port pool, capacity), and the whole batch is made durable in one store
//! transaction instead of one committed (flushed) transaction per session,
//! which is what bounds single adds.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forwarder_api::SessionInfo;

use super::shared::keyed_record;
use super::{Relay, Session};
use crate::datapath::socket::RelaySocket;
use crate::datapath::xdp::BackendRoute;
use crate::mosh::MoshKey;
use crate::users::Owner;

/// One session of a batch, checked and routed by the caller.
pub struct BatchItem {
    pub backend: SocketAddr,
    pub route: BackendRoute,
    pub port: Option<u16>,
    pub idle_timeout: Option<Duration>,
    pub key: Option<MoshKey>,
}

/// A session a batch created: what the caller is told, and the socket
/// whose reader it starts.
pub type Added = (SessionInfo, Arc<RelaySocket>);

/// The lookups `add_session_for` makes over every session (one session
/// per backend, unique ids), as hash lookups while a batch runs: a scan
/// per add made a batch quadratic in the sessions held.
pub(super) struct Index {
    backends: HashMap<SocketAddr, u16>,
    /// Hashes of the ids: a collision only makes the caller draw another id.
    ids: HashSet<u64>,
}

fn id_hash(id: &str) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(id)
}

impl Relay {
    /// The session forwarding to `backend`, if any.
    pub(super) fn session_on_backend(&self, backend: SocketAddr) -> Option<&Session> {
        match &self.batch_index {
            Some(index) => index
                .backends
                .get(&backend)
                .and_then(|port| self.sessions.get(port)),
            None => self.sessions.values().find(|s| s.backend == backend),
        }
    }

    /// Whether a session already has the id `id`.
    pub(super) fn id_taken(&self, id: &str) -> bool {
        match &self.batch_index {
            Some(index) => index.ids.contains(&id_hash(id)),
            None => self.sessions.values().any(|s| s.id == id),
        }
    }

    fn index_batch(&mut self) {
        self.batch_index = Some(Box::new(Index {
            backends: self
                .sessions
                .values()
                .map(|s| (s.backend, s.port))
                .collect(),
            ids: self.sessions.values().map(|s| id_hash(&s.id)).collect(),
        }));
    }

    fn index_session(&mut self, port: u16, present: bool) {
        let Some(session) = self.sessions.get(&port) else {
            return;
        };
        let (backend, id) = (session.backend, id_hash(&session.id));
        if let Some(index) = &mut self.batch_index {
            if present {
                index.backends.insert(backend, port);
                index.ids.insert(id);
            } else {
                // The id's hash stays: it may be another session's too.
                index.backends.remove(&backend);
            }
        }
    }

    /// Adds every item for `owner`, in order; an item that fails is
    /// reported and the others are still added (earlier items count
    /// against the owner's quota for later ones). Nothing is announced
    /// before the batch is committed: if the store refuses it, every
    /// session of the batch is undone and each item says why.
    pub fn add_sessions_for(
        &mut self,
        owner: &Owner,
        items: Vec<BatchItem>,
    ) -> Vec<anyhow::Result<Added>> {
        // Without the store in place, add_session_for and set_session_key
        // commit nothing: the rows are written below, together.
        let store = self.store.take();
        self.index_batch();
        let mut results = Vec::with_capacity(items.len());
        let mut keys = Vec::with_capacity(items.len());
        for item in items {
            let added = self.add_session_for(
                owner.clone(),
                item.backend,
                item.route,
                item.port,
                item.idle_timeout,
            );
            if let Ok((info, _)) = &added {
                self.index_session(info.port, true);
            }
            let added = match (added, item.key) {
                (Ok((info, socket)), Some(key)) => {
                    match self.set_session_key(info.port, key.clone()) {
                        Ok(()) => {
                            keys.push((info.port, key));
                            Ok((info, socket))
                        }
                        Err(error) => {
                            // A keyed session exists with its key or not at all.
                            self.index_session(info.port, false);
                            self.remove_session(info.port, "its key could not be stored");
                            Err(error)
                        }
                    }
                }
                (added, _) => added,
            };
            results.push(added);
        }
        self.batch_index = None;
        let committed = match &store {
            Some(store) => {
                let records: Vec<_> = results
                    .iter()
                    .flatten()
                    .map(|(info, _)| {
                        let session = &self.sessions[&info.port];
                        match keys.iter().find(|(port, _)| *port == info.port) {
                            Some((_, key)) => keyed_record(store, session, key, None),
                            None => session.record(),
                        }
                    })
                    .collect();
                store.put_many(&records)
            }
            None => Ok(()),
        };
        if let Err(error) = committed {
            // The store is still out: undoing writes nothing either.
            let reason = format!("{error:#}");
            for result in &mut results {
                if let Ok((info, _)) = result {
                    self.remove_session(info.port, "the batch could not be stored");
                    *result = Err(anyhow::anyhow!(
                        "the session store refused the batch, so none of it was added: {reason}; check the \
                         state folder's disk (free space, permissions) and retry"
                    ));
                }
            }
        }
        self.store = store;
        // The token goes to the caller who made the session, and only here.
        for (info, _) in results.iter_mut().flatten() {
            if keys.iter().any(|(port, _)| *port == info.port)
                && let Some(fresh) = self.session_info(info.port, super::monotonic_ns())
            {
                *info = fresh;
            }
            info.tcp = self.tcp_info_with_token(info.port).or(info.tcp.take());
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::datapath::Datapath;
    use crate::ports::PortRange;
    use crate::sessions::{Limits, RelayParts};
    use crate::store::Store;
    use crate::users::UserPolicy;

    fn relay_with_store(dir: &std::path::Path) -> Relay {
        Relay::new(RelayParts {
            instance: "batch".into(),
            limits: Limits {
                flow_idle_timeout: Duration::from_secs(120),
                default_session_idle_timeout: Duration::from_secs(3600),
                max_flows_per_session: 4,
                new_flows_per_sec: 1000,
                probation_flows_per_session: 4,
                max_sessions: 64,
            },
            interfaces: Vec::new(),
            relay_addresses: vec![Ipv4Addr::LOCALHOST.into()],
            datapath: Datapath::Userspace {
                sizes: forwarder_common::config::RuntimeSizes::new(4096, 4096, 64)
                    .expect("valid sizes"),
            },
            session_ports: PortRange {
                lo: 43_000,
                hi: 43_099,
            },
            flow_ports: PortRange {
                lo: 43_100,
                hi: 43_999,
            },
            store: Some(Store::open(dir).expect("a store in a fresh folder")),
        })
    }

    /// Why an item failed (its success holds a socket, which has no Debug).
    fn why(result: &anyhow::Result<Added>) -> String {
        match result {
            Ok((info, _)) => panic!("session {} was added", info.id),
            Err(error) => format!("{error:#}"),
        }
    }

    fn item(n: u8, port: Option<u16>) -> BatchItem {
        BatchItem {
            backend: SocketAddr::from((Ipv4Addr::new(127, 0, 0, n), 9)),
            route: BackendRoute {
                source: Ipv4Addr::LOCALHOST.into(),
                ifindex: 1,
            },
            port,
            idle_timeout: None,
            key: None,
        }
    }

    #[tokio::test]
    async fn a_batch_reports_each_item_and_stores_what_it_added() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = relay_with_store(dir.path());
        let key = MoshKey::parse("6xoXFHJqYUQUE2f4Q202jg").unwrap();
        let keyed = BatchItem {
            key: Some(key),
            ..item(5, None)
        };
        let results = relay.add_sessions_for(
            &Owner::root(),
            vec![
                item(2, Some(43_010)),
                // The same backend again: refused, the rest go on.
                item(2, None),
                // A port outside --ports.
                item(3, Some(1)),
                item(4, None),
                keyed,
            ],
        );
        assert_eq!(results.len(), 5);
        let ok: Vec<&SessionInfo> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(info, _)| info))
            .collect();
        assert_eq!(ok.len(), 3, "items 0, 3 and 4 are added");
        assert_eq!(
            results[0].as_ref().map(|(info, _)| info.port).ok(),
            Some(43_010)
        );
        let duplicate = why(&results[1]);
        assert!(
            duplicate.contains("already forwards to 127.0.0.2:9"),
            "{duplicate}"
        );
        let out_of_range = why(&results[2]);
        assert!(
            out_of_range.contains("outside the relay's range 43000-43099"),
            "{out_of_range}"
        );
        assert!(results[4].as_ref().is_ok_and(|(info, _)| info.has_key));
        assert_eq!(relay.session_count(), 3);
        // Durable, key sealed: a fresh store on the same folder has them.
        drop(relay);
        let store = Store::open(dir.path()).unwrap();
        let stored = store.sessions().unwrap();
        let mut ports: Vec<u16> = stored.iter().map(|record| record.port).collect();
        ports.sort_unstable();
        let mut expected: Vec<u16> = ok.iter().map(|info| info.port).collect();
        expected.sort_unstable();
        assert_eq!(ports, expected);
        assert_eq!(
            stored.iter().filter(|r| r.sealed_key.is_some()).count(),
            1,
            "the keyed session's row carries its sealed key"
        );
    }

    #[tokio::test]
    async fn a_non_root_owner_is_held_to_its_quota_within_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = relay_with_store(dir.path());
        relay.set_user_policy(UserPolicy {
            quota: crate::users::Quota {
                max_sessions: 2,
                max_flows: 4,
                new_flows_per_sec: 0,
            },
            ..UserPolicy::new(crate::config::defaults::USER_QUOTA)
        });
        let alice = Owner {
            uid: 1000,
            name: "alice".into(),
            groups: vec!["alice".into()],
        };
        let bob = Owner {
            uid: 1001,
            name: "bob".into(),
            groups: Vec::new(),
        };
        let results =
            relay.add_sessions_for(&alice, vec![item(2, None), item(3, None), item(4, None)]);
        assert!(results[0].is_ok() && results[1].is_ok());
        let refused = why(&results[2]);
        assert!(
            refused.contains("has 2 sessions, the quota of 2"),
            "{refused}"
        );
        for (info, _) in results.iter().flatten() {
            assert_eq!(info.owner.uid, 1000);
        }
        // Another user's backend stays another user's, unnamed.
        let results = relay.add_sessions_for(&bob, vec![item(2, None), item(6, None)]);
        let taken = why(&results[0]);
        assert!(taken.contains("another user's session"), "{taken}");
        assert!(
            results[1]
                .as_ref()
                .is_ok_and(|(info, _)| info.owner.name == "bob")
        );
        assert_eq!(relay.session_count(), 3);
    }
}
