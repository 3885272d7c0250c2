//! Punched sessions' client sequence numbers: a client half flagged
//! `REWRITE_RECORD_CLIENT_SEQ` raises its session's slot in `CLIENT_SEQS`
//! to the nonce of each client-to-server datagram it forwards (see
//! forwarder_common::clientseq), so the daemon can still refuse a move to a
//! new endpoint that brings nothing newer.
//!
//! Concurrency: one slot per session, shared by every CPU, so a move judged
//! on any CPU sees what every other forwarded (a per-CPU array would cost
//! 512 KiB per CPU). The update is a compare-and-exchange loop that only
//! ever raises the slot; a CPU that loses every try (three other CPUs
//! raising the same session's slot at that instant, which RSS keeping one
//! flow on one queue makes all but impossible) leaves it to the winners,
//! whose values are at least as new as what it read.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::programs::XdpContext;
use forwarder_common::clientseq::{NONCE_LEN, raised, recordable};
use forwarder_common::flow::REWRITE_RECORD_CLIENT_SEQ;
use network_types::udp::UdpHdr;

use crate::{maps::CLIENT_SEQS, parse::UDP_LEN};

/// Compare-and-exchange attempts before giving up.
const MAX_TRIES: usize = 4;

/// Records the nonce of a datagram about to be forwarded by a client half
/// with `flags`; `udp` is its bounds-checked UDP header, whose length field
/// the pipeline already checked against the IP header's.
#[inline(always)]
pub fn record(ctx: &XdpContext, flags: u8, udp: *const UdpHdr, session_port: u16) {
    if flags & REWRITE_RECORD_CLIENT_SEQ == 0 {
        return;
    }
    // SAFETY: the parser checked the 8-byte UDP header lies inside the frame.
    let udp_len = usize::from(u16::from_be_bytes(unsafe { (*udp).len }));
    let payload = udp as usize + UDP_LEN;
    // The verifier needs the nonce's bytes inside the frame; the UDP length
    // keeps Ethernet padding after a short datagram from counting.
    if payload + NONCE_LEN > ctx.data_end() {
        return;
    }
    // SAFETY: checked just above that the 8 bytes lie inside the frame; a
    // byte array has no alignment to respect.
    let first = unsafe { *(payload as *const [u8; NONCE_LEN]) };
    let Some(nonce) = recordable(first, udp_len.saturating_sub(UDP_LEN)) else {
        return;
    };
    let Some(slot) = CLIENT_SEQS.get_ptr_mut(u32::from(session_port)) else {
        return;
    };
    // An aligned 64-bit load is one instruction, never torn by the
    // exchanges; volatile keeps LLVM from assuming it.
    // SAFETY: an array slot stays valid for the program run and is 8-aligned.
    let mut seen = unsafe { slot.read_volatile() };
    for _ in 0..MAX_TRIES {
        let Some(newer) = raised(seen, nonce) else {
            return;
        };
        // SAFETY: as above; the kernel's BPF_CMPXCHG on a map value.
        let (previous, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                slot, seen, newer,
            )
        };
        if swapped {
            return;
        }
        seen = previous;
    }
}
