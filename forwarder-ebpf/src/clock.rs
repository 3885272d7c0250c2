//! The program's clock: CLOCK_MONOTONIC to the tick, from jiffies
//! (forwarder_common::clock says why and how the daemon measures it).

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use forwarder_common::clock::JiffiesClock;

/// The daemon's measurement, set at load time
/// (`forwarder_common::clock::JIFFIES_CLOCK_GLOBAL`); all zero here, which
/// keeps the coarse clock for a loader that measured nothing.
#[unsafe(no_mangle)]
static JIFFIES_CLOCK: JiffiesClock = JiffiesClock::UNMEASURED;

/// CLOCK_MONOTONIC nanoseconds, tick-granular. The global is read-only, so
/// the verifier knows which branch runs and drops the other.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a plain read of an initialised static; volatile keeps LLVM
    // from folding in the all-zero value compiled here (see config.rs).
    let clock = unsafe { core::ptr::read_volatile(&raw const JIFFIES_CLOCK) };
    if clock.is_measured() {
        // SAFETY: bpf_jiffies64 has no preconditions.
        clock.now_ns(unsafe { bpf_jiffies64() })
    } else {
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}
