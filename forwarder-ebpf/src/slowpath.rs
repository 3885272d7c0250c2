//! Rate limit on what the program hands to the daemon: packets that would
//! pass to a relay port's socket (new flows, route-lookup failures, NAT
//! rebind candidates) spend a token from their session's bucket and from
//! the relay-wide one, or are dropped once either is empty.
//!
//! Concurrency: the buckets are shared by all CPUs, and one bucket must hold
//! for the session whatever CPU its packets land on, so per-CPU buckets (a
//! limit that scales with the RSS spread of the attacker's flows) are out.
//! A bpf_spin_lock would serialise every CPU of a flood on one lock and
//! needs BTF-described map values. Instead each bucket is one GCRA
//! timestamp (see forwarder_common::slowpath): the check is a plain read and
//! the charge a single atomic add, so concurrent admissions are never lost.
//! The only races are benign: several CPUs passing the check at the same
//! instant overshoot the burst by at most one packet each, and an idle
//! bucket's catch-up store may drop an add made at that same instant.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use forwarder_common::{Reason, SlowpathBucket};

use crate::maps::{SLOWPATH_GLOBAL_BUCKET, SLOWPATH_SESSION_BUCKETS};

/// Lets `reason` through if it hands the packet to the daemon and both
/// buckets have room; otherwise turns it into the matching drop.
/// `session_port` is the session the packet belongs to, if known.
#[inline(always)]
pub fn gate(reason: Reason, session_port: Option<u16>) -> Reason {
    match reason {
        Reason::PassNoFlow
        | Reason::PassFibNoNeigh
        | Reason::PassFibFailed
        | Reason::PassEgressNotAttached
        | Reason::PassNatRebindCandidate
        | Reason::PassIpv6ExtHeaders
        | Reason::PassTranslateNoChecksum
        | Reason::PassTooBig
        | Reason::PassNoHeadroom => {}
        _ => return reason,
    }
    // A tick-granular clock (clock.rs) costs a load where the precise one
    // reads the clock source, the largest single cost of refusing a flood
    // (docs/BENCHMARKS.md). A rate in packets per second needs no finer
    // time: within one tick the burst still bounds admissions, and the
    // tick's time is caught up at the next one.
    let now = crate::clock::now_ns();
    if let Some(port) = session_port
        && let Some(bucket) = SLOWPATH_SESSION_BUCKETS.get_ptr_mut(u32::from(port))
        && !take(bucket, now)
    {
        return Reason::DropSlowpathSessionLimit;
    }
    if let Some(bucket) = SLOWPATH_GLOBAL_BUCKET.get_ptr_mut(0)
        && !take(bucket, now)
    {
        return Reason::DropSlowpathGlobalLimit;
    }
    reason
}

/// Spends one token of `bucket` if it has one.
#[inline(always)]
fn take(bucket: *mut SlowpathBucket, now: u64) -> bool {
    // SAFETY: a map value stays valid for the whole program run (RCU) and is
    // 8-aligned; the daemon only replaces whole entries. The limits are
    // copied out so no reference overlaps the writes to tat_ns below.
    let (limits, tat) = unsafe {
        (
            SlowpathBucket {
                tat_ns: 0,
                interval_ns: (*bucket).interval_ns,
                burst_ns: (*bucket).burst_ns,
            },
            &raw mut (*bucket).tat_ns,
        )
    };
    if limits.is_unlimited() {
        return true;
    }
    // An aligned 64-bit load or store is one BPF instruction, so it never
    // tears against the atomic add; volatile keeps LLVM from caching it.
    // (core's atomic loads do not lower on the generic BPF CPU.)
    // SAFETY: tat points into the live map value above.
    let mut current = unsafe { tat.read_volatile() };
    if current < now {
        // SAFETY: as above.
        unsafe { tat.write_volatile(now) };
        current = now;
    }
    if !limits.fits(current, now) {
        return false;
    }
    // core's AtomicU64 has no read-modify-write on the BPF target; the
    // intrinsic with its result unused lowers to the BPF atomic add.
    // SAFETY: tat points into the live map value above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(tat, limits.interval_ns);
    }
    true
}
