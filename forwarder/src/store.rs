//! Sessions on disk, so a restarted daemon comes back to exactly the sessions
//! it had. One redb database per instance under /var/lib/forwarder/<instance>/;
//! each add or remove is one committed (fsynced) transaction, so a crash
//! leaves either the old or the new row, never a torn one.
//!
//! Flows are not stored: the pinned flow maps are their record (see
//! `sessions::restore`), which avoids a second copy that could disagree.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Client-facing port → JSON of [`SessionRecord`]. JSON so a later version can
/// add fields with defaults without migrating the file.
const SESSIONS: TableDefinition<u16, &[u8]> = TableDefinition::new("sessions");

/// What a session is, independent of the running process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub port: u16,
    pub backend: SocketAddrV4,
    /// The route the session's flows were built with (source address and
    /// the interface the backend answers on).
    pub route_source: Ipv4Addr,
    pub route_ifindex: u32,
    pub idle_timeout_secs: u64,
}

/// The default folder of an instance's state.
pub fn default_state_dir(instance: &str) -> PathBuf {
    PathBuf::from("/var/lib/forwarder").join(instance)
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<dir>/sessions.redb`. redb recovers from a crash
    /// by itself on open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state folder {} (give --state-dir a writable folder)", dir.display()))?;
        let path = dir.join("sessions.redb");
        let db = Database::create(&path).with_context(|| {
            format!(
                "opening the session store {}: is another daemon of this instance running? \
                 If the file is damaged, move it away (sessions are then forgotten) and restart",
                path.display()
            )
        })?;
        let write = db.begin_write()?;
        write.open_table(SESSIONS)?;
        write.commit()?;
        Ok(Self { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every stored session, by port. Rows that no longer parse are reported
    /// and skipped rather than stopping the relay.
    pub fn sessions(&self) -> anyhow::Result<Vec<SessionRecord>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(SESSIONS)?;
        let mut records = Vec::new();
        for row in table.iter()? {
            let (port, bytes) = row?;
            match serde_json::from_slice::<SessionRecord>(bytes.value()) {
                Ok(record) => records.push(record),
                Err(error) => tracing::error!(port = port.value(), %error, "skipping an unreadable session row"),
            }
        }
        Ok(records)
    }

    /// Stores a session durably (returns once committed to disk).
    pub fn put(&self, record: &SessionRecord) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let write = self.db.begin_write()?;
        write.open_table(SESSIONS)?.insert(record.port, bytes.as_slice())?;
        write.commit().context("committing a session to the store")?;
        Ok(())
    }

    /// Forgets a session durably.
    pub fn delete(&self, port: u16) -> anyhow::Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(SESSIONS)?.remove(port)?;
        write.commit().context("removing a session from the store")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> SessionRecord {
        SessionRecord {
            id: format!("{port:08x}"),
            port,
            backend: "10.0.2.2:60001".parse().unwrap(),
            route_source: "10.0.2.1".parse().unwrap(),
            route_ifindex: 3,
            idle_timeout_secs: 600,
        }
    }

    #[test]
    fn sessions_survive_reopening_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&record(60000)).unwrap();
            store.put(&record(60001)).unwrap();
            store.delete(60000).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.sessions().unwrap(), vec![record(60001)]);
    }
}
