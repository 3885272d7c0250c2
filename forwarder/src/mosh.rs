//! Just enough of mosh's wire format to apply mosh-server's roaming rule in
//! the relay: a datagram is `nonce[8] || AES-128-OCB3 ciphertext || tag[16]`,
//! the OCB nonce is four zero bytes followed by those eight, and the session
//! key is the 22-character base64 string of `MOSH CONNECT <port> <key>`.
//!
//! The relay never decrypts for its own sake: it only checks the tag, so a
//! packet whose tag verifies was made by someone holding the key.

use aes::Aes128;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ocb3::Ocb3;
use ocb3::aead::{AeadInPlace, KeyInit};

/// Nonce (8) + tag (16): nothing shorter can be a mosh datagram.
pub const MIN_DATAGRAM: usize = 24;
const NONCE_LEN: usize = 8;
const TAG_LEN: usize = 16;
/// Top bit of the nonce: set on server-to-client datagrams.
const DIRECTION_BIT: u64 = 1 << 63;

/// Why a datagram may not move a session to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("shorter than a mosh datagram")]
    TooShort,
    #[error("the OCB tag does not verify with the session key")]
    BadTag,
    #[error("its direction bit says server-to-client")]
    WrongDirection,
    #[error("sequence number not newer than one already accepted")]
    Replayed,
    #[error("its direction bit says client-to-server")]
    NotFromServer,
    #[error("the relay has no key for this session yet")]
    NoKey,
    #[error("addressed to another relay address than the one the server punched to")]
    WrongPath,
}

/// A mosh session key.
#[derive(Clone)]
pub struct MoshKey {
    cipher: Ocb3<Aes128>,
    raw: [u8; 16],
}

impl std::fmt::Debug for MoshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoshKey(..)")
    }
}

impl MoshKey {
    /// Parses the key as mosh-server prints it (22 base64 characters, no padding).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim().trim_end_matches('=');
        let bytes = STANDARD_NO_PAD.decode(text).map_err(|error| {
            anyhow::anyhow!("malformed mosh key ({error}): expected the 22 base64 characters of `MOSH CONNECT <port> <key>`")
        })?;
        let raw: [u8; 16] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            anyhow::anyhow!("a mosh key is 16 bytes, this one is {}: copy it whole from `MOSH CONNECT <port> <key>`", bytes.len())
        })?;
        Ok(Self::from_bytes(raw))
    }

    pub fn from_bytes(raw: [u8; 16]) -> Self {
        Self {
            cipher: Ocb3::new(&raw.into()),
            raw,
        }
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.raw
    }

    /// The key as mosh prints it.
    pub fn to_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.raw)
    }

    /// Checks that `datagram` was sealed with this key, and returns its
    /// 64-bit nonce (direction bit and sequence number).
    pub fn open_nonce(&self, datagram: &[u8]) -> Result<u64, Rejected> {
        self.open_nonce_with(datagram, &mut Vec::new())
    }

    /// [`MoshKey::open_nonce`] decrypting into `scratch`, so that trying one
    /// datagram against many keys allocates nothing per key.
    pub fn open_nonce_with(&self, datagram: &[u8], scratch: &mut Vec<u8>) -> Result<u64, Rejected> {
        if datagram.len() < MIN_DATAGRAM {
            return Err(Rejected::TooShort);
        }
        let (nonce, rest) = datagram.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut ocb_nonce = [0u8; 12];
        ocb_nonce[4..].copy_from_slice(nonce);
        scratch.clear();
        scratch.extend_from_slice(ciphertext);
        let verified =
            self.cipher
                .decrypt_in_place_detached(&ocb_nonce.into(), &[], scratch, tag.into());
        // The plaintext is the session's: nothing of it outlives the check.
        scratch.fill(0);
        verified.map_err(|_| Rejected::BadTag)?;
        Ok(u64::from_be_bytes(nonce.try_into().expect("split at 8")))
    }

    /// Seals `plaintext` as mosh would, with the given 64-bit nonce. The
    /// relay only uses it in tests; mosh peers do the real sealing.
    pub fn seal(&self, nonce: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut ocb_nonce = [0u8; 12];
        ocb_nonce[4..].copy_from_slice(&nonce.to_be_bytes());
        let mut buffer = plaintext.to_vec();
        let tag = self
            .cipher
            .encrypt_in_place_detached(&ocb_nonce.into(), &[], &mut buffer)
            .expect("OCB seals any length mosh uses");
        let mut datagram = nonce.to_be_bytes().to_vec();
        datagram.extend_from_slice(&buffer);
        datagram.extend_from_slice(&tag);
        datagram
    }
}

/// mosh-server's rule for following a client, kept per session: a datagram
/// counts only if it verifies, goes client-to-server and is newer than every
/// datagram accepted before.
#[derive(Debug)]
pub struct ClientFollower {
    key: MoshKey,
    newest: Option<u64>,
}

impl ClientFollower {
    pub fn new(key: MoshKey) -> Self {
        Self { key, newest: None }
    }

    /// Picks up where a previous daemon left off: `newest` is the newest
    /// sequence number it had stored (possibly older than the newest it
    /// accepted, never newer).
    pub fn resume(key: MoshKey, newest: Option<u64>) -> Self {
        Self { key, newest }
    }

    pub fn key(&self) -> &MoshKey {
        &self.key
    }

    /// Accepts the datagram (remembering its sequence number) or says why not.
    pub fn accept(&mut self, datagram: &[u8]) -> Result<u64, Rejected> {
        let nonce = self.key.open_nonce(datagram)?;
        if nonce & DIRECTION_BIT != 0 {
            return Err(Rejected::WrongDirection);
        }
        if self.newest.is_some_and(|newest| nonce <= newest) {
            return Err(Rejected::Replayed);
        }
        self.newest = Some(nonce);
        Ok(nonce)
    }

    /// Counts `recorded` as accepted: the newest client-to-server nonce the
    /// XDP program forwarded from the current endpoint, which the daemon
    /// never saw (0: nothing recorded). Raises, never lowers; a nonce with
    /// the direction bit set is not a client's and changes nothing.
    pub fn raise(&mut self, recorded: u64) {
        if recorded != 0 && is_client_to_server(recorded) {
            self.newest = self.newest.max(Some(recorded));
        }
    }

    pub fn key_bytes(&self) -> [u8; 16] {
        self.key.bytes()
    }

    /// Sequence number of the newest accepted datagram.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }
}

/// The keys of the sessions reachable on the shared port, each with its
/// cipher state already expanded, for matching a new client endpoint's
/// first datagram to its session: the session whose key verifies the OCB
/// tag, going client to server.
///
/// A full tag check per key costs the whole datagram (about 150 ns for 100
/// bytes, 1.6 µs for 1,252 here), too slow for 10,000 sessions. So each key
/// first decrypts only the first ciphertext block (two AES block
/// operations: OCB's offset from the nonce, and the block), which for a
/// mosh datagram starts with two 16-bit timestamps and the big-endian
/// 64-bit instruction id of its fragment, a counter from 0: its top three
/// bytes are zero in any session (2^40 instructions), while under a wrong
/// key they are zero once in 2^24. Only keys that pass take the full tag
/// check, which alone decides; the filter only saves time.
///
/// The filters live in a vector of their own, in the same order as the
/// keys: the scan then reads one dense array (about 370 bytes a key)
/// instead of striding over the full ciphers it rarely needs.
pub struct KeyRing<T> {
    filters: Vec<FirstBlock>,
    keys: Vec<(T, MoshKey)>,
}

impl<T> Default for KeyRing<T> {
    fn default() -> Self {
        Self {
            filters: Vec::new(),
            keys: Vec::new(),
        }
    }
}

impl<T> KeyRing<T> {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<T: Copy + PartialEq> KeyRing<T> {
    /// Adds (or replaces) the key of session `id`.
    pub fn insert(&mut self, id: T, key: MoshKey) {
        self.remove(id);
        self.filters.push(FirstBlock::new(&key.raw));
        self.keys.push((id, key));
    }

    pub fn remove(&mut self, id: T) {
        if let Some(index) = self.keys.iter().position(|(entry, _)| *entry == id) {
            self.filters.swap_remove(index);
            self.keys.swap_remove(index);
        }
    }

    /// The session whose key verifies `datagram`, and its nonce, if the
    /// datagram goes client to server. The newer-sequence rule is the
    /// caller's: it knows what each session has seen.
    pub fn find(&self, datagram: &[u8]) -> Result<(T, u64), Rejected> {
        if datagram.len() < MIN_DATAGRAM {
            return Err(Rejected::TooShort);
        }
        let nonce: [u8; NONCE_LEN] = datagram[..NONCE_LEN].try_into().expect("long enough");
        // Only a datagram with a whole first block can be filtered.
        let first_block: Option<[u8; 16]> =
            (datagram.len() >= NONCE_LEN + 16 + TAG_LEN).then(|| {
                datagram[NONCE_LEN..NONCE_LEN + 16]
                    .try_into()
                    .expect("16 bytes")
            });
        let mut scratch = Vec::with_capacity(datagram.len());
        for (filter, (id, key)) in self.filters.iter().zip(&self.keys) {
            if let Some(block) = first_block
                && filter.decrypt_first(nonce, block)[4..7] != [0, 0, 0]
            {
                continue;
            }
            if let Ok(nonce) = key.open_nonce_with(datagram, &mut scratch) {
                if nonce & DIRECTION_BIT != 0 {
                    return Err(Rejected::WrongDirection);
                }
                return Ok((*id, nonce));
            }
        }
        Err(Rejected::BadTag)
    }
}

/// OCB3 (RFC 7253) decryption of a datagram's first ciphertext block alone,
/// with the key schedule and `L_0` computed once per key.
struct FirstBlock {
    aes: Aes128,
    l0: u128,
}

/// OCB's doubling in GF(2^128).
fn double(x: u128) -> u128 {
    (x << 1) ^ if x >> 127 == 1 { 0x87 } else { 0 }
}

impl FirstBlock {
    fn new(raw: &[u8; 16]) -> Self {
        use aes::cipher::{BlockEncrypt, KeyInit as _};
        let aes = Aes128::new(raw.into());
        let mut l_star = aes::Block::default();
        aes.encrypt_block(&mut l_star);
        let l_star = u128::from_be_bytes(l_star.into());
        Self {
            aes,
            l0: double(double(l_star)),
        }
    }

    /// P_1 = Offset_1 xor DECIPHER(C_1 xor Offset_1), Offset_1 = Offset_0 xor L_0,
    /// Offset_0 from the nonce as RFC 7253 section 4.2 says (a 96-bit nonce
    /// with mosh's four zero bytes first, 128-bit tag).
    fn decrypt_first(&self, mosh_nonce: [u8; 8], block: [u8; 16]) -> [u8; 16] {
        use aes::cipher::{BlockDecrypt, BlockEncrypt};
        let mut nonce = [0u8; 16];
        nonce[3] = 1;
        nonce[8..].copy_from_slice(&mosh_nonce);
        let bottom = u32::from(nonce[15] & 0x3f);
        nonce[15] &= 0xc0;
        let mut ktop = aes::Block::from(nonce);
        self.aes.encrypt_block(&mut ktop);
        let ktop = u128::from_be_bytes(ktop.into());
        let extension = ((ktop >> 64) as u64) ^ ((ktop << 8) >> 64) as u64;
        let offset0 = if bottom == 0 {
            ktop
        } else {
            (ktop << bottom) | u128::from(extension >> (64 - bottom))
        };
        let offset1 = offset0 ^ self.l0;
        let mut inner = aes::Block::from((u128::from_be_bytes(block) ^ offset1).to_be_bytes());
        self.aes.decrypt_block(&mut inner);
        (u128::from_be_bytes(inner.into()) ^ offset1).to_be_bytes()
    }
}

/// Whether a verified nonce goes client to server (direction bit 0).
pub fn is_client_to_server(nonce: u64) -> bool {
    nonce & DIRECTION_BIT == 0
}

/// The rule for moving a punched session's server endpoint, the mirror of
/// mosh-client following its server: a datagram from a new endpoint counts
/// only if it verifies with the session key, goes server to client
/// (direction bit 1) and is strictly newer than the newest server datagram
/// the relay has verified (`newest`, the full nonce). Returns its nonce.
///
/// `newest` is None when the relay never saw one (the fast path carries
/// them all): then any verified server datagram counts. A replay of an old
/// one from elsewhere could move the endpoint, but only until the real
/// server's next datagram, which is newer and moves it back.
pub fn accept_server_move(
    key: &MoshKey,
    datagram: &[u8],
    newest: Option<u64>,
) -> Result<u64, Rejected> {
    let nonce = key.open_nonce(datagram)?;
    if nonce & DIRECTION_BIT == 0 {
        return Err(Rejected::NotFromServer);
    }
    if newest.is_some_and(|newest| nonce <= newest) {
        return Err(Rejected::Replayed);
    }
    Ok(nonce)
}

/// The nonce of a server-to-client datagram that verifies, for tracking
/// the newest one the relay has seen.
pub fn verified_server_nonce(key: &MoshKey, datagram: &[u8]) -> Option<u64> {
    key.open_nonce(datagram)
        .ok()
        .filter(|nonce| nonce & DIRECTION_BIT != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packets of a real mosh 1.4.0 session, with its key (see the file's header).
    fn capture() -> (MoshKey, Vec<(bool, Vec<u8>)>) {
        let text = include_str!("testdata/mosh-capture.txt");
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let key = MoshKey::parse(lines.next().unwrap()).unwrap();
        let packets = lines
            .map(|line| {
                let (direction, hex) = line.split_once(' ').unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                (direction == "c2s", bytes)
            })
            .collect();
        (key, packets)
    }

    #[test]
    fn real_mosh_packets_verify_with_their_key() {
        let (key, packets) = capture();
        assert!(packets.len() >= 6);
        assert_eq!(key.to_base64().len(), 22);
        for (to_server, packet) in &packets {
            let nonce = key.open_nonce(packet).unwrap();
            assert_eq!(
                nonce & DIRECTION_BIT == 0,
                *to_server,
                "direction bit of {nonce:#x}"
            );
        }
    }

    #[test]
    fn follower_applies_mosh_servers_rule() {
        let (key, packets) = capture();
        let client: Vec<&Vec<u8>> = packets.iter().filter(|(c, _)| *c).map(|(_, p)| p).collect();
        let server = &packets.iter().find(|(c, _)| !c).unwrap().1;
        let mut follower = ClientFollower::new(key.clone());
        assert_eq!(follower.accept(server), Err(Rejected::WrongDirection));
        assert_eq!(follower.accept(client[1]), Ok(1));
        assert_eq!(
            follower.accept(client[0]),
            Err(Rejected::Replayed),
            "older than accepted"
        );
        assert_eq!(
            follower.accept(client[1]),
            Err(Rejected::Replayed),
            "replay of the same"
        );
        assert_eq!(follower.accept(client[2]), Ok(2));

        let mut forged = client[3].clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(follower.accept(&forged), Err(Rejected::BadTag));
        let mut renumbered = client[3].clone();
        renumbered[7] = 0x40;
        assert_eq!(
            follower.accept(&renumbered),
            Err(Rejected::BadTag),
            "the nonce is authenticated"
        );
        assert_eq!(follower.accept(&client[3][..20]), Err(Rejected::TooShort));
        let other = MoshKey::from_bytes([7; 16]);
        assert_eq!(
            ClientFollower::new(other).accept(client[3]),
            Err(Rejected::BadTag)
        );
        assert_eq!(
            follower.accept(client[3]),
            Ok(3),
            "rejections changed nothing"
        );
    }

    #[test]
    fn server_moves_need_the_key_direction_and_a_newer_sequence() {
        let (key, packets) = capture();
        let server: Vec<&Vec<u8>> = packets.iter().filter(|(c, _)| !c).map(|(_, p)| p).collect();
        let client = &packets.iter().find(|(c, _)| *c).unwrap().1;
        assert!(server.len() >= 2, "the capture has server packets");
        let first = key.open_nonce(server[0]).unwrap();
        let second = key.open_nonce(server[1]).unwrap();
        assert!(second > first);

        // Nothing verified yet: any authentic server datagram moves it.
        assert_eq!(accept_server_move(&key, server[0], None), Ok(first));
        assert_eq!(verified_server_nonce(&key, server[0]), Some(first));
        // Newer than the newest verified: moves; the same or older: a replay.
        assert_eq!(accept_server_move(&key, server[1], Some(first)), Ok(second));
        assert_eq!(
            accept_server_move(&key, server[1], Some(second)),
            Err(Rejected::Replayed)
        );
        assert_eq!(
            accept_server_move(&key, server[0], Some(second)),
            Err(Rejected::Replayed)
        );
        // A client's datagram, however new, is not the server.
        assert_eq!(
            accept_server_move(&key, client, None),
            Err(Rejected::NotFromServer)
        );
        assert_eq!(verified_server_nonce(&key, client), None);
        // Forged: a flipped bit, another key, a sealed-by-us fake under another key.
        let mut forged = server[1].clone();
        forged[10] ^= 1;
        assert_eq!(
            accept_server_move(&key, &forged, Some(first)),
            Err(Rejected::BadTag)
        );
        let other = MoshKey::from_bytes([9; 16]);
        let fake = other.seal(DIRECTION_BIT | 1_000_000, b"rm -rf");
        assert_eq!(
            accept_server_move(&key, &fake, Some(first)),
            Err(Rejected::BadTag)
        );
        assert_eq!(
            accept_server_move(&key, &server[1][..10], None),
            Err(Rejected::TooShort)
        );
        // Sealed with the real key (only the server can): accepted.
        let genuine = key.seal(second + 5, b"screen");
        assert_eq!(
            accept_server_move(&key, &genuine, Some(second)),
            Ok(second + 5)
        );
    }

    #[test]
    fn what_xdp_recorded_raises_the_follower_and_nothing_lowers_it() {
        let (key, packets) = capture();
        let client: Vec<&Vec<u8>> = packets.iter().filter(|(c, _)| *c).map(|(_, p)| p).collect();
        let mut follower = ClientFollower::new(key);
        follower.raise(0);
        assert_eq!(follower.newest(), None, "0 is nothing recorded");
        assert_eq!(follower.accept(client[1]), Ok(1));
        // XDP forwarded 2 (the daemon never saw it): its replay is refused.
        follower.raise(2);
        assert_eq!(follower.accept(client[2]), Err(Rejected::Replayed));
        follower.raise(1);
        assert_eq!(follower.newest(), Some(2), "an older record lowers nothing");
        follower.raise(DIRECTION_BIT | 9);
        assert_eq!(follower.newest(), Some(2), "a server nonce is no client's");
        assert_eq!(follower.accept(client[3]), Ok(3));
    }

    #[test]
    fn a_resumed_follower_keeps_the_stored_sequence() {
        let (key, packets) = capture();
        let client: Vec<&Vec<u8>> = packets.iter().filter(|(c, _)| *c).map(|(_, p)| p).collect();
        let mut follower = ClientFollower::resume(key, Some(2));
        assert_eq!(follower.accept(client[1]), Err(Rejected::Replayed));
        assert_eq!(follower.accept(client[2]), Err(Rejected::Replayed));
        assert_eq!(follower.accept(client[3]), Ok(3));
    }

    #[test]
    fn sealing_round_trips_and_keys_parse_strictly() {
        let key = MoshKey::parse("6xoXFHJqYUQUE2f4Q202jg").unwrap();
        let sealed = key.seal(42, b"hello");
        assert_eq!(key.open_nonce(&sealed), Ok(42));
        assert_eq!(
            MoshKey::parse(&key.to_base64()).unwrap().bytes(),
            key.bytes()
        );
        for bad in [
            "",
            "short",
            "6xoXFHJqYUQUE2f4Q202jg6xoX",
            "6xoXFHJqYUQUE2f4Q202j!",
        ] {
            assert!(MoshKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_block_decrypts_as_ocb_does_and_real_datagrams_pass_the_filter() {
        let (key, packets) = capture();
        let filter = FirstBlock::new(&key.bytes());
        for (_, packet) in &packets {
            let nonce: [u8; 8] = packet[..8].try_into().unwrap();
            let (ciphertext, tag) = packet[8..].split_at(packet.len() - 8 - TAG_LEN);
            let mut ocb_nonce = [0u8; 12];
            ocb_nonce[4..].copy_from_slice(&nonce);
            let mut plain = ciphertext.to_vec();
            key.cipher
                .decrypt_in_place_detached(&ocb_nonce.into(), &[], &mut plain, tag.into())
                .unwrap();
            let first = filter.decrypt_first(nonce, ciphertext[..16].try_into().unwrap());
            assert_eq!(first, plain[..16], "first block of nonce {nonce:x?}");
            assert_eq!(first[4..7], [0, 0, 0], "mosh's instruction id is small");
        }
        // Every bottom (the nonce's low 6 bits picks the offset's shift).
        let key = MoshKey::from_bytes([3; 16]);
        let filter = FirstBlock::new(&key.bytes());
        for seq in 0..130u64 {
            let plain: Vec<u8> = (0..40).map(|i| (i as u8).wrapping_mul(seq as u8)).collect();
            let sealed = key.seal(seq, &plain);
            let first = filter.decrypt_first(
                sealed[..8].try_into().unwrap(),
                sealed[8..24].try_into().unwrap(),
            );
            assert_eq!(first, plain[..16], "sequence {seq}");
        }
    }

    #[test]
    fn a_ring_finds_the_one_key_that_verifies_and_refuses_the_rest() {
        let (key, packets) = capture();
        let client = &packets.iter().find(|(c, _)| *c).unwrap().1;
        let server = &packets.iter().find(|(c, _)| !c).unwrap().1;
        let mut ring = KeyRing::default();
        for index in 0..3_000u32 {
            ring.insert(index, MoshKey::from_bytes(rand::random()));
        }
        assert_eq!(
            ring.find(client),
            Err(Rejected::BadTag),
            "no key matches yet"
        );
        ring.insert(9_999, key.clone());
        for index in 3_000..6_000u32 {
            ring.insert(index, MoshKey::from_bytes(rand::random()));
        }
        assert_eq!(ring.len(), 6_001);
        let nonce = key.open_nonce(client).unwrap();
        assert_eq!(ring.find(client), Ok((9_999, nonce)));
        assert_eq!(
            ring.find(server),
            Err(Rejected::WrongDirection),
            "the server's datagram verifies but goes the wrong way"
        );
        let mut forged = client.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(ring.find(&forged), Err(Rejected::BadTag), "a wrong tag");
        let random: Vec<u8> = (0..client.len()).map(|_| rand::random()).collect();
        assert_eq!(ring.find(&random), Err(Rejected::BadTag));
        assert_eq!(ring.find(&client[..20]), Err(Rejected::TooShort));
        // Short datagrams (no whole first block) skip the filter, not the check.
        let short = key.seal(5, b"tiny");
        assert_eq!(ring.find(&short), Ok((9_999, 5)));
        ring.remove(9_999);
        assert_eq!(ring.find(client), Err(Rejected::BadTag), "removed");
    }
}
