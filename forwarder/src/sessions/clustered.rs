//! The session table's side of sharing sessions through etcd (the
//! `cluster` room drives it): sessions programmed with the cluster's id,
//! the cluster's view kept for `list` and `stats`, and no local idle
//! expiry of sessions (a session idle here may be busy on another relay).

use forwarder_api::{ClusterInfo, SessionHolder};

use super::*;

impl Relay {
    /// Switches the relay to shared sessions, with what it knows of the
    /// cluster (replaced as the cluster changes).
    pub fn set_cluster(&mut self, cluster: ClusterInfo) {
        self.cluster = Some(cluster);
    }

    pub fn cluster(&self) -> Option<&ClusterInfo> {
        self.cluster.as_ref()
    }

    /// Programs a session the cluster defined: its id and port are etcd's,
    /// the route to its backend is this relay's own.
    pub fn add_shared_session(
        &mut self,
        id: &str,
        port: u16,
        backend: impl Into<SocketAddr>,
        route: BackendRoute,
        idle_timeout: Duration,
    ) -> anyhow::Result<Arc<RelaySocket>> {
        let backend = backend.into();
        if let Some(other) = self.sessions.values().find(|s| s.id == id) {
            bail!(
                "session {id} is already programmed here on port {}",
                other.port
            );
        }
        self.shared_id = Some(id.to_string());
        let added = self.add_session(backend, route, Some(port), Some(idle_timeout));
        // Taken on success; a refused add must not pass it to the next one.
        self.shared_id = None;
        let (_, socket) = added?;
        debug_assert_eq!(self.sessions.get(&port).map(|s| s.id.as_str()), Some(id));
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
