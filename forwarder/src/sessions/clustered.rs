//! The session table's side of sharing sessions through etcd (the
//! `cluster` room drives it): sessions programmed with the cluster's id,
//! the cluster's view kept for `list` and `stats`, and no local idle
//! expiry of sessions (a session idle here may be busy on another relay).

use forwarder_api::{ClusterInfo, SessionHolder};

use super::*;
use crate::mosh::MoshKey;

/// A session as the cluster defines it, for [`Relay::add_shared_session`].
pub struct SharedDefinition<'a> {
    pub id: &'a str,
    pub port: u16,
    pub backend: SocketAddr,
    pub idle_timeout: Duration,
    pub owner: Owner,
    /// The mosh key, opened from its sealed form in etcd.
    pub key: Option<MoshKey>,
}

impl Relay {
    /// Switches the relay to shared sessions, with what it knows of the
    /// cluster (replaced as the cluster changes).
    pub fn set_cluster(&mut self, cluster: ClusterInfo) {
        self.cluster = Some(cluster);
    }

    pub fn cluster(&self) -> Option<&ClusterInfo> {
        self.cluster.as_ref()
    }

    /// Programs a session the cluster defined: its id, port, owner and key
    /// are etcd's, the route to its backend is this relay's own. The
    /// owner's session quota is the cluster's to check (across every
    /// relay, when the session was added), not this relay's alone.
    pub fn add_shared_session(
        &mut self,
        shared: SharedDefinition<'_>,
        route: BackendRoute,
    ) -> anyhow::Result<Arc<RelaySocket>> {
        let SharedDefinition {
            id,
            port,
            backend,
            idle_timeout,
            owner,
            key,
        } = shared;
        if let Some(other) = self.sessions.values().find(|s| s.id == id) {
            bail!(
                "session {id} is already programmed here on port {}",
                other.port
            );
        }
        self.shared_id = Some(id.to_string());
        let added = self.add_session_for(owner, backend, route, Some(port), Some(idle_timeout));
        // Taken on success; a refused add must not pass it to the next one.
        self.shared_id = None;
        let (_, socket) = added?;
        debug_assert_eq!(self.sessions.get(&port).map(|s| s.id.as_str()), Some(id));
        if let Some(key) = key
            && let Err(error) = self.set_session_key(port, key)
        {
            // A keyed session exists with its key or not at all.
            self.remove_session(port, "its key could not be set");
            return Err(error);
        }
        info!(session = id, port, %backend, "shared session programmed");
        Ok(socket)
    }

    /// The live relays holding the session on `port`: this one with its
    /// flows now, the others as they last published.
    pub(super) fn holders(&self, port: u16, local_flows: u64) -> Vec<SessionHolder> {
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        let mut holders = vec![SessionHolder {
            relay: cluster.relay.clone(),
            flows: local_flows,
        }];
        holders.extend(
            cluster
                .relays
                .iter()
                .filter(|relay| relay.relay != cluster.relay)
                .filter_map(|relay| {
                    relay.sessions.get(&port).map(|held| SessionHolder {
                        relay: relay.relay.clone(),
                        flows: held.flows,
                    })
                }),
        );
        holders
    }
}
