//! Punched sessions' client-to-server sequence numbers as the XDP program
//! forwards them: the daemon no longer sees the current client endpoint's
//! datagrams, so the program records the newest nonce it forwarded for the
//! session, and the daemon refuses a move to a new endpoint that does not
//! bring a newer one (mosh-server's own rule, see the daemon's `mosh.rs`).
//!
//! The record is one `u64` per session in the `CLIENT_SEQS` array, indexed
//! by the session's client-facing port (host order): punched sessions are
//! never reachable on the shared port, so the client half's destination
//! port names the session. All CPUs update the same slot with a bounded
//! compare-and-exchange loop, raising it only; 0 means nothing recorded
//! (the daemon has verified every session's first datagram itself, so a
//! recorded 0 would never raise anything).

/// Slots of the `CLIENT_SEQS` array: one per UDP port (512 KiB in all,
/// whatever the number of CPUs: one shared array, not a per-CPU one).
pub const CLIENT_SEQ_SLOTS: u32 = 65_536;

/// Top bit of mosh's 64-bit nonce: set on server-to-client datagrams.
pub const DIRECTION_BIT: u64 = 1 << 63;

/// Bytes of mosh's nonce at the start of every datagram (big endian).
pub const NONCE_LEN: usize = 8;

/// The nonce a client half's datagram of `udp_payload_len` bytes starting
/// with `first` makes the program record, if any: only datagrams long
/// enough to hold a nonce, going client to server (direction bit clear).
/// The program cannot check the OCB tag, so this is an upper bound of what
/// the client really sent, never a proof.
#[inline(always)]
pub fn recordable(first: [u8; NONCE_LEN], udp_payload_len: usize) -> Option<u64> {
    if udp_payload_len < NONCE_LEN {
        return None;
    }
    let nonce = u64::from_be_bytes(first);
    (nonce & DIRECTION_BIT == 0).then_some(nonce)
}

/// What the slot should hold after `recorded` met `nonce`: the larger.
#[inline(always)]
pub fn raised(recorded: u64, nonce: u64) -> Option<u64> {
    (nonce > recorded).then_some(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_client_to_server_nonces_of_whole_datagrams_count() {
        assert_eq!(recordable(7u64.to_be_bytes(), 24), Some(7));
        assert_eq!(recordable(7u64.to_be_bytes(), 8), Some(7));
        assert_eq!(recordable(7u64.to_be_bytes(), 7), None, "too short");
        assert_eq!(recordable(7u64.to_be_bytes(), 0), None);
        assert_eq!(
            recordable((DIRECTION_BIT | 7).to_be_bytes(), 100),
            None,
            "server to client"
        );
        assert_eq!(
            recordable((DIRECTION_BIT - 1).to_be_bytes(), 100),
            Some(DIRECTION_BIT - 1)
        );
        assert_eq!(raised(5, 6), Some(6));
        assert_eq!(raised(6, 6), None);
        assert_eq!(raised(6, 5), None);
        assert_eq!(raised(0, 1), Some(1));
    }
}
