//! Gateway mappings on disk, beside the session store: each mapping's lease
//! (who asked, through which protocol, until when) and the epoch NAT-PMP
//! and PCP report, so a restarted daemon keeps both. The sessions
//! themselves are in the session store; a lease names its session by id.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// External port → JSON of [`Lease`].
const LEASES: TableDefinition<u16, &[u8]> = TableDefinition::new("leases");
/// "epoch_start": the Unix second the NAT-PMP/PCP epoch counts from.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    NatPmp,
    Pcp,
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NatPmp => "NAT-PMP",
            Self::Pcp => "PCP",
            Self::Upnp => "UPnP",
        })
    }
}

/// One mapping: WAN address:`external_port` → `internal`, a relay session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal: SocketAddrV4,
    /// The host that asked (the internal host itself, in secure mode).
    pub requester: Ipv4Addr,
    pub session_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// PCP's mapping nonce: only a request with the same one changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<[u8; 12]>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

pub struct LeaseStore {
    db: Database,
    path: PathBuf,
}

impl LeaseStore {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state folder {}", dir.display()))?;
        let path = dir.join("gateway.redb");
        let db = Database::create(&path).with_context(|| {
            format!(
                "opening the gateway's lease store {}: is another daemon of this instance running? \
                 If the file is damaged, move it away (mappings are then forgotten) and restart",
                path.display()
            )
        })?;
        let write = db.begin_write()?;
        write.open_table(LEASES)?;
        write.open_table(META)?;
        write.commit()?;
        Ok(Self { db, path })
    }

    /// The epoch's start, set to `now` the first time.
    pub fn epoch_start(&self, now: u64) -> anyhow::Result<u64> {
        let write = self.db.begin_write()?;
        let start = {
            let mut meta = write.open_table(META)?;
            let stored = meta.get("epoch_start")?.map(|value| value.value());
            match stored {
                Some(start) if start <= now => start,
                // None yet, or a clock that went back past it: start anew.
                _ => {
                    meta.insert("epoch_start", now)?;
                    now
                }
            }
        };
        write.commit()?;
        Ok(start)
    }

    pub fn leases(&self) -> anyhow::Result<Vec<Lease>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(LEASES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (port, json) = entry?;
            match serde_json::from_slice::<Lease>(json.value()) {
                Ok(lease) => out.push(lease),
                Err(error) => tracing::warn!(
                    port = port.value(),
                    %error,
                    store = %self.path.display(),
                    "an unreadable gateway lease is ignored"
                ),
            }
        }
        Ok(out)
    }

    pub fn put(&self, lease: &Lease) -> anyhow::Result<()> {
        let json = serde_json::to_vec(lease)?;
        let write = self.db.begin_write()?;
        write
            .open_table(LEASES)?
            .insert(lease.external_port, json.as_slice())?;
        write
            .commit()
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    pub fn delete(&self, external_port: u16) -> anyhow::Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(LEASES)?.remove(external_port)?;
        write
            .commit()
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_and_the_epoch_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Lease {
            protocol: Protocol::Pcp,
            external_port: 60010,
            internal: "10.0.0.2:60001".parse().unwrap(),
            requester: Ipv4Addr::new(10, 0, 0, 2),
            session_id: "0badcafe".into(),
            expires_at: 1_000_000,
            nonce: Some([7; 12]),
            description: String::new(),
        };
        {
            let store = LeaseStore::open(dir.path()).unwrap();
            assert_eq!(store.epoch_start(500).unwrap(), 500);
            store.put(&lease).unwrap();
        }
        let store = LeaseStore::open(dir.path()).unwrap();
        assert_eq!(store.epoch_start(900).unwrap(), 500);
        assert_eq!(store.leases().unwrap(), vec![lease]);
        store.delete(60010).unwrap();
        assert!(store.leases().unwrap().is_empty());
        // A clock set back before the start begins a new epoch.
        assert_eq!(store.epoch_start(100).unwrap(), 100);
    }
}
