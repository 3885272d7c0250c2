//! Sessions on disk, so a restarted daemon comes back to exactly the sessions
//! it had. One redb database per instance under /var/lib/forwarder/<instance>/;
//! each add or remove is one committed (fsynced) transaction, so a crash
//! leaves either the old or the new row, never a torn one.
//!
//! Flows are not stored: the pinned flow maps are their record (see
//! `sessions::restore`), which avoids a second copy that could disagree.
//!
//! Punched (NAT'd) sessions are stored with their NAT state, because after a
//! restart nobody punches again (the wrapper on the server has exited). The
//! one secret in there, the mosh session key, is sealed with
//! XChaCha20-Poly1305 under a key derived (HKDF-SHA256) from the punch
//! secret, which is already a root-only file on the relay: the store file
//! alone gives no key away, and a relay started without that secret cannot
//! use such a record (it drops it and says why). The record's session id and
//! ports are the AEAD's associated data, so a sealed key copied into another
//! record does not open.
//!
//! Keyed sessions (`add --key-file`, reachable on the shared port) carry a
//! mosh key too, sealed the same way (XChaCha20-Poly1305, HKDF-SHA256, the
//! record as associated data) under a key derived from a secret of their
//! own: a relay needs no punch handshake for them. That secret is
//! generated on first use next to the database ([`KEYED_SECRET_FILE`],
//! root-only), so a copy of the database alone (a backup, a bug report)
//! gives no key away.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Client-facing port → JSON of [`SessionRecord`]. JSON so a later version can
/// add fields with defaults without migrating the file.
const SESSIONS: TableDefinition<u16, &[u8]> = TableDefinition::new("sessions");

/// What a session is, independent of the running process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub port: u16,
    pub backend: SocketAddr,
    /// The route the session's flows were built with (source address and
    /// the interface the backend answers on).
    pub route_source: IpAddr,
    pub route_ifindex: u32,
    pub idle_timeout_secs: u64,
    /// Set for a punched session (absent in files written before they were stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatRecord>,
    /// A keyed session's mosh key, sealed with [`Store::keyed_sealer`]
    /// (bound to the record's id and port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
    /// The uid that created it; rows written before owners were recorded
    /// were root's (only root could reach the socket then).
    #[serde(default)]
    pub owner_uid: u32,
    /// A keyed session's client sequence numbers seen so far (at least):
    /// after a restart, a datagram on the shared port must still be newer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_seq_floor: Option<u64>,
}

/// The NAT half of a punched session: what the restarted daemon needs to
/// rebuild it and re-adopt the pinned backend half. The session's `backend`
/// is the server's external endpoint (as Bind saw it, or the newest one a
/// verified datagram moved it to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRecord {
    /// The one backend-facing port Q.
    pub upstream_port: u16,
    /// Unused, written as 0: the flow slot the session held when counters
    /// had slots of their own. Kept so records of either version read.
    pub slot: u32,
    /// Authenticates Bind and Key for this session.
    pub token: [u8; 16],
    /// Where the Allocate came from (a repeated Allocate gets this session).
    pub punch_source: SocketAddr,
    #[serde(default)]
    pub bound: bool,
    /// The mosh session key, sealed; None until the wrapper handed it over.
    #[serde(default)]
    pub sealed_key: Option<SealedKey>,
    /// The client endpoint the server's packets go to, and the relay
    /// address it uses.
    #[serde(default)]
    pub client: Option<(SocketAddr, IpAddr)>,
    /// Newest client-to-server sequence number accepted when last written:
    /// a restarted relay resumes mosh's "newer than any before" rule from it.
    #[serde(default)]
    pub newest_client_seq: Option<u64>,
    /// Newest server-to-client sequence number verified when last written:
    /// a datagram that moves the server's endpoint must be newer.
    #[serde(default)]
    pub newest_server_seq: Option<u64>,
}

/// A mosh session key sealed with XChaCha20-Poly1305: a random nonce per
/// seal, the ciphertext with its 16-byte tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    pub nonce: [u8; 24],
    pub ciphertext: Vec<u8>,
}

/// What a sealed key is bound to: the record it belongs in.
#[derive(Clone, Copy, Debug)]
pub struct KeyBinding<'a> {
    pub session_id: &'a str,
    pub port: u16,
    pub upstream_port: u16,
}

impl KeyBinding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut data = b"forwarder nat session key v1\0".to_vec();
        data.extend_from_slice(self.session_id.as_bytes());
        data.push(0);
        data.extend_from_slice(&self.port.to_be_bytes());
        data.extend_from_slice(&self.upstream_port.to_be_bytes());
        data
    }
}

/// Seals and opens session keys for the store, under a key derived from
/// the punch secret. HKDF with a purpose label keeps this key independent
/// of the HMAC key the handshake uses, though both come from one secret.
pub struct KeySealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for KeySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySealer(..)")
    }
}

const SEAL_SALT: &[u8] = b"forwarder session store";
const SEAL_INFO: &[u8] = b"mosh session key sealing v1";
const KEYED_SEAL_INFO: &[u8] = b"keyed session mosh key sealing v1";
const CLUSTER_SEAL_INFO: &[u8] = b"cluster session mosh key sealing v1";

/// The secret keyed sessions' keys are sealed under, in the state folder.
pub const KEYED_SECRET_FILE: &str = "keyed-sessions.secret";

impl KeySealer {
    /// Derives the sealing key from the punch secret's bytes.
    pub fn derive(secret: &[u8]) -> Self {
        Self::derive_for(secret, SEAL_INFO)
    }

    /// A sealer for keyed sessions' keys, from their own secret.
    pub fn derive_keyed(secret: &[u8]) -> Self {
        Self::derive_for(secret, KEYED_SEAL_INFO)
    }

    /// A sealer for the keys of sessions shared through etcd, from the
    /// secret every relay of the cluster is given (`--etcd-secret-file`).
    pub fn derive_cluster(secret: &[u8]) -> Self {
        Self::derive_for(secret, CLUSTER_SEAL_INFO)
    }

    fn derive_for(secret: &[u8], info: &[u8]) -> Self {
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(SEAL_SALT), secret)
            .expand(info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = XChaCha20Poly1305::new(&key.into());
        key.fill(0);
        Self { cipher }
    }

    pub fn seal(&self, key: &[u8; 16], binding: KeyBinding<'_>) -> SealedKey {
        let nonce: [u8; 24] = rand::random();
        let aad = binding.associated_data();
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: key,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 seals 16 bytes");
        SealedKey { nonce, ciphertext }
    }

    /// The key, or an error if it was sealed under another secret or for another record.
    pub fn open(&self, sealed: &SealedKey, binding: KeyBinding<'_>) -> anyhow::Result<[u8; 16]> {
        let aad = binding.associated_data();
        let Ok(mut plain) = self.cipher.decrypt(
            XNonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: &aad,
            },
        ) else {
            bail!(
                "its sealed session key does not open: the punch secret differs from the one it was stored under \
                 (start with the previous --punch-secret-file), or the record was altered"
            );
        };
        let key: Result<[u8; 16], _> = plain.as_slice().try_into();
        plain.fill(0);
        key.map_err(|_| {
            anyhow::anyhow!("its sealed session key is not 16 bytes: the record was altered")
        })
    }
}

/// Reads the keyed sessions' secret from `dir`, creating it (32 random
/// bytes, mode 0600) the first time.
fn keyed_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    state_secret(dir, KEYED_SECRET_FILE)
}

/// Reads the secret `name` from the state folder `dir`, creating it (32
/// random bytes, mode 0600) the first time.
pub fn state_secret(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => bail!(
            "{} is shorter than 32 bytes: it was altered; move it away and restart (keyed sessions are then dropped at start, TCP tokens change)",
            path.display()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
    }
    let secret: [u8; 32] = rand::random();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| {
            format!(
                "creating {} (give --state-dir a writable folder)",
                path.display()
            )
        })?;
    file.write_all(&secret)?;
    file.sync_all()?;
    Ok(secret.to_vec())
}

/// The default folder of an instance's state.
pub fn default_state_dir(instance: &str) -> PathBuf {
    PathBuf::from("/var/lib/forwarder").join(instance)
}

pub struct Store {
    db: Database,
    path: PathBuf,
    /// Present when the punch handshake is configured: punched sessions
    /// can then be stored and restored.
    sealer: Option<KeySealer>,
    /// Seals keyed sessions' keys (always present).
    keyed_sealer: KeySealer,
}

impl Store {
    /// Opens (or creates) `<dir>/sessions.redb`. redb recovers from a crash
    /// by itself on open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the state folder {} (give --state-dir a writable folder)",
                dir.display()
            )
        })?;
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
        let keyed_sealer = KeySealer::derive_keyed(&keyed_secret(dir)?);
        Ok(Self {
            db,
            path,
            sealer: None,
            keyed_sealer,
        })
    }

    pub fn keyed_sealer(&self) -> &KeySealer {
        &self.keyed_sealer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets the store keep punched sessions (their keys sealed with `sealer`).
    pub fn set_key_sealer(&mut self, sealer: KeySealer) {
        self.sealer = Some(sealer);
    }

    pub fn key_sealer(&self) -> Option<&KeySealer> {
        self.sealer.as_ref()
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
                Err(error) => {
                    tracing::error!(port = port.value(), %error, "skipping an unreadable session row")
                }
            }
        }
        Ok(records)
    }

    /// Stores a session durably (returns once committed to disk).
    pub fn put(&self, record: &SessionRecord) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let write = self.db.begin_write()?;
        write
            .open_table(SESSIONS)?
            .insert(record.port, bytes.as_slice())?;
        write
            .commit()
            .context("committing a session to the store")?;
        Ok(())
    }

    /// Stores many sessions in one committed transaction: one disk flush
    /// for a whole batch of adds; all of them are stored or none.
    pub fn put_many(&self, records: &[SessionRecord]) -> anyhow::Result<()> {
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(SESSIONS)?;
            for record in records {
                let bytes = serde_json::to_vec(record)?;
                table.insert(record.port, bytes.as_slice())?;
            }
        }
        write
            .commit()
            .context("committing a batch of sessions to the store")?;
        Ok(())
    }

    /// Forgets a session durably.
    pub fn delete(&self, port: u16) -> anyhow::Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(SESSIONS)?.remove(port)?;
        write
            .commit()
            .context("removing a session from the store")?;
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
            nat: None,
            sealed_key: None,
            owner_uid: 0,
            client_seq_floor: None,
        }
    }

    fn binding(record: &SessionRecord) -> KeyBinding<'_> {
        KeyBinding {
            session_id: &record.id,
            port: record.port,
            upstream_port: 61000,
        }
    }

    #[test]
    fn sealed_keys_round_trip_and_open_only_with_their_secret_and_record() {
        let sealer = KeySealer::derive(b"0123456789abcdef0123456789abcdef");
        let key = [0x5a; 16];
        let a = record(60000);
        let sealed = sealer.seal(&key, binding(&a));
        assert_eq!(
            sealed.ciphertext.len(),
            32,
            "16 bytes of key and a 16-byte tag"
        );
        assert_ne!(
            &sealed.ciphertext[..16],
            &key,
            "the key is not stored in clear"
        );
        assert_eq!(sealer.open(&sealed, binding(&a)).unwrap(), key);
        // A fresh nonce every time: sealing the same key twice differs.
        assert_ne!(sealer.seal(&key, binding(&a)), sealed);

        let wrong_secret = KeySealer::derive(b"another-secret-another-secret-00");
        let error = wrong_secret
            .open(&sealed, binding(&a))
            .unwrap_err()
            .to_string();
        assert!(error.contains("punch secret differs"), "{error}");

        // Moved into another record (other id, port or upstream port): refused.
        let b = record(60001);
        assert!(
            sealer.open(&sealed, binding(&b)).is_err(),
            "moved to another session"
        );
        let other_q = KeyBinding {
            upstream_port: 61001,
            ..binding(&a)
        };
        assert!(
            sealer.open(&sealed, other_q).is_err(),
            "moved to another upstream port"
        );
        let mut tampered = sealed.clone();
        tampered.ciphertext[3] ^= 1;
        assert!(sealer.open(&tampered, binding(&a)).is_err(), "altered");
    }

    #[test]
    fn punched_sessions_are_stored_and_old_rows_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = KeySealer::derive(b"0123456789abcdef0123456789abcdef");
        let mut punched = record(60002);
        punched.nat = Some(NatRecord {
            upstream_port: 61000,
            slot: 4,
            token: [7; 16],
            punch_source: "10.77.2.2:40000".parse().unwrap(),
            bound: true,
            sealed_key: Some(sealer.seal(&[1; 16], binding(&punched))),
            client: Some((
                "10.77.1.2:50000".parse().unwrap(),
                "10.77.1.1".parse().unwrap(),
            )),
            newest_client_seq: Some(41),
            newest_server_seq: Some((1 << 63) | 17),
        });
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&punched).unwrap();
            // A row as an older version wrote it: no `nat` and no `owner_uid`
            // field at all (it reads as root's).
            let old = br#"{"id":"0000ea61","port":60001,"backend":"10.0.2.2:60001","route_source":"10.0.2.1","route_ifindex":3,"idle_timeout_secs":600}"#;
            let write = store.db.begin_write().unwrap();
            write
                .open_table(SESSIONS)
                .unwrap()
                .insert(60001, old.as_slice())
                .unwrap();
            write.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut old = record(60001);
        old.id = "0000ea61".into();
        assert_eq!(store.sessions().unwrap(), vec![old, punched.clone()]);
        let stored = store.sessions().unwrap().pop().unwrap();
        let sealed = stored.nat.unwrap().sealed_key.unwrap();
        assert_eq!(sealer.open(&sealed, binding(&punched)).unwrap(), [1; 16]);
        let file = std::fs::read(store.path()).unwrap();
        assert!(
            file.windows(11).any(|w| w == b"\"token\":[7,"),
            "the row is in the file as JSON"
        );
        for clear in [&[1u8; 16][..], b"[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]"] {
            assert!(
                !file.windows(clear.len()).any(|w| w == clear),
                "the key is in the file in clear"
            );
        }
    }

    #[test]
    fn ipv6_and_translated_sessions_round_trip_and_v4_rows_read_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = KeySealer::derive(b"0123456789abcdef0123456789abcdef");
        let v6 = SessionRecord {
            backend: "[2001:db8:2::2]:60001".parse().unwrap(),
            route_source: "2001:db8:2::1".parse().unwrap(),
            ..record(60004)
        };
        // A punched server reached over IPv6 whose client roamed in over IPv4.
        let mut mixed = SessionRecord {
            backend: "[2001:db8:77::2]:40000".parse().unwrap(),
            route_source: "2001:db8:77::1".parse().unwrap(),
            ..record(60005)
        };
        mixed.nat = Some(NatRecord {
            upstream_port: 61005,
            slot: 9,
            token: [3; 16],
            punch_source: "[2001:db8:77::2]:40000".parse().unwrap(),
            bound: true,
            sealed_key: Some(sealer.seal(&[2; 16], binding(&mixed))),
            client: Some((
                "198.51.100.7:50000".parse().unwrap(),
                "203.0.113.1".parse().unwrap(),
            )),
            newest_client_seq: None,
            newest_server_seq: None,
        });
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&v6).unwrap();
            store.put(&mixed).unwrap();
            store.put(&record(60003)).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.sessions().unwrap(),
            vec![record(60003), v6.clone(), mixed]
        );
        // The JSON is what `list` prints: brackets around IPv6, none around IPv4,
        // so an IPv4 row is byte for byte what older versions wrote and read.
        let json = String::from_utf8(serde_json::to_vec(&v6).unwrap()).unwrap();
        assert!(
            json.contains(r#""backend":"[2001:db8:2::2]:60001""#),
            "{json}"
        );
        assert!(json.contains(r#""route_source":"2001:db8:2::1""#), "{json}");
        let v4 = String::from_utf8(serde_json::to_vec(&record(60003)).unwrap()).unwrap();
        assert!(
            v4.contains(r#""backend":"10.0.2.2:60001","route_source":"10.0.2.1""#),
            "{v4}"
        );
    }

    #[test]
    fn sessions_survive_reopening_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let owned = SessionRecord {
            owner_uid: 1001,
            ..record(60001)
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&record(60000)).unwrap();
            store.put(&owned).unwrap();
            store.delete(60000).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.sessions().unwrap(), vec![owned], "the owner is kept");
    }

    #[test]
    fn keyed_sessions_keep_their_key_sealed_under_a_secret_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut keyed = record(60003);
        {
            let store = Store::open(dir.path()).unwrap();
            let binding = KeyBinding {
                session_id: &keyed.id,
                port: keyed.port,
                upstream_port: 0,
            };
            keyed.sealed_key = Some(store.keyed_sealer().seal(&[9; 16], binding));
            store.put(&keyed).unwrap();
        }
        let secret = dir.path().join(KEYED_SECRET_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Reopened: the same secret, the key opens; the file never holds it in clear.
        let store = Store::open(dir.path()).unwrap();
        let stored = store.sessions().unwrap().pop().unwrap();
        assert_eq!(stored, keyed);
        let binding = KeyBinding {
            session_id: &keyed.id,
            port: keyed.port,
            upstream_port: 0,
        };
        let sealed = stored.sealed_key.unwrap();
        assert_eq!(
            store.keyed_sealer().open(&sealed, binding).unwrap(),
            [9; 16]
        );
        let file = std::fs::read(store.path()).unwrap();
        assert!(!file.windows(16).any(|w| w == [9; 16]));
        // Not the punch sealer's key, even from the same bytes.
        let bytes = std::fs::read(&secret).unwrap();
        assert!(KeySealer::derive(&bytes).open(&sealed, binding).is_err());
    }
}
