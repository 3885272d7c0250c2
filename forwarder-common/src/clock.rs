//! The XDP program's clock: jiffies turned into CLOCK_MONOTONIC
//! nanoseconds with a tick length and an offset the daemon measures before
//! it loads the program.
//!
//! Why not `bpf_ktime_get_coarse_ns`: it is a helper call, and around it the
//! compiler spills the packet and entry pointers it holds; the verifier
//! inlines `bpf_jiffies64` into a load. On the forwarding path that was
//! 13-17 ns of about 95 (docs/BENCHMARKS.md, step 10). Both clocks move once
//! a tick, so the program sees the same times either way.
//!
//! Why the conversion is exact: the kernel advances jiffies from
//! CLOCK_MONOTONIC, one jiffy per whole `TICK_NSEC` elapsed since a fixed
//! start, so `jiffies * TICK_NSEC + offset` is the monotonic time of the
//! tick's start for the whole boot. The daemon only has to find `TICK_NSEC`
//! (from HZ, which no interface exposes: `_SC_CLK_TCK` is USER_HZ) and the
//! offset, by watching jiffies change ([`JiffiesClock::calibrate`]).

use bytemuck::{Pod, Zeroable};

/// Name of the read-only global the daemon overrides with its measurement.
pub const JIFFIES_CLOCK_GLOBAL: &str = "JIFFIES_CLOCK";

/// The kernel's HZ choices (Kconfig's `HZ_*` on every architecture); the
/// measured tick is snapped to one of these, so the clock does not drift.
pub const KERNEL_HZ_CHOICES: [u64; 12] = [24, 32, 48, 64, 100, 128, 250, 256, 300, 512, 1000, 1024];

/// The widest window the offset's edge may be timed within: the offset is
/// that far from exact at most, against 16.8 ms stamps.
pub const MAX_EDGE_WINDOW_NS: u64 = 1_000_000;

/// How far from exact the measured tick may be, in thousandths, before it
/// is snapped: a quarter of the 2.4 % between the closest HZ choices (250
/// and 256, 1000 and 1024), so the snap cannot pick a neighbour.
const MAX_TICK_ERROR_PERMILLE: u64 = 5;

/// How far the measured tick may be from a choice's, in thousandths.
const SNAP_TOLERANCE_PERMILLE: u64 = 2 * MAX_TICK_ERROR_PERMILLE;

/// `jiffies * tick_ns + offset_ns` (wrapping) is CLOCK_MONOTONIC at the
/// start of the current tick. All zero: not measured, and the program reads
/// `bpf_ktime_get_coarse_ns` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct JiffiesClock {
    /// The kernel's `TICK_NSEC`: (10^9 + HZ/2) / HZ.
    pub tick_ns: u64,
    pub offset_ns: u64,
}
const _: () = assert!(core::mem::size_of::<JiffiesClock>() == 16);

#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (size asserted above).
unsafe impl aya::Pod for JiffiesClock {}

/// Jiffies changed between two reads: to `jiffies`, at some time in
/// `earliest_ns..=latest_ns` (CLOCK_MONOTONIC, the first read's start and
/// the second read's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffiesEdge {
    pub jiffies: u64,
    pub earliest_ns: u64,
    pub latest_ns: u64,
}

impl JiffiesEdge {
    const fn window_ns(&self) -> u64 {
        self.latest_ns.saturating_sub(self.earliest_ns)
    }

    const fn midpoint_ns(&self) -> u64 {
        self.earliest_ns + self.window_ns() / 2
    }
}

impl JiffiesClock {
    pub const UNMEASURED: Self = Self {
        tick_ns: 0,
        offset_ns: 0,
    };

    #[inline(always)]
    pub const fn is_measured(&self) -> bool {
        self.tick_ns != 0
    }

    /// CLOCK_MONOTONIC nanoseconds at the start of the tick `jiffies` names.
    #[inline(always)]
    pub const fn now_ns(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }

    /// The clock from edges seen in order, once they pin it down. The
    /// tick comes from the narrowest edge of the first half and the
    /// narrowest of the second, once their windows leave it within
    /// [`MAX_TICK_ERROR_PERMILLE`], snapped to a [`KERNEL_HZ_CHOICES`]
    /// tick; the narrowest edge gives the offset. Wide windows (a sampling
    /// step the scheduler interrupted) only ask for more span. `None` while
    /// the edges do not pin it (too few, too close, or a tick no kernel
    /// has: then the caller keeps the coarse clock).
    pub fn calibrate(edges: &[JiffiesEdge]) -> Option<Self> {
        let narrowest =
            |edges: &[JiffiesEdge]| edges.iter().min_by_key(|edge| edge.window_ns()).copied();
        let (early, late) = edges.split_at(edges.len() / 2);
        let (first, last) = (narrowest(early)?, narrowest(late)?);
        let span_ns = last.midpoint_ns().checked_sub(first.midpoint_ns())?;
        let ticks = last.jiffies.checked_sub(first.jiffies)?;
        let uncertainty_ns = first.window_ns() / 2 + last.window_ns() / 2;
        if ticks == 0
            || uncertainty_ns.saturating_mul(1000) > span_ns.saturating_mul(MAX_TICK_ERROR_PERMILLE)
        {
            return None;
        }
        let measured_ns = span_ns / ticks;
        let tick_ns = KERNEL_HZ_CHOICES
            .iter()
            .map(|&hz| (1_000_000_000 + hz / 2) / hz)
            .find(|&tick| measured_ns.abs_diff(tick) * 1000 <= tick * SNAP_TOLERANCE_PERMILLE)?;
        let best = narrowest(edges).filter(|edge| edge.window_ns() <= MAX_EDGE_WINDOW_NS)?;
        Some(Self {
            tick_ns,
            offset_ns: best
                .midpoint_ns()
                .wrapping_sub(best.jiffies.wrapping_mul(tick_ns)),
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Edges of a kernel at `hz` whose jiffies were `base` at monotonic 0,
    /// seen `window` wide, from jiffy `from` on, every `every` jiffies.
    fn edges(
        hz: u64,
        base: u64,
        from: u64,
        count: u64,
        every: u64,
        window: u64,
    ) -> Vec<JiffiesEdge> {
        let tick = (1_000_000_000 + hz / 2) / hz;
        (0..count)
            .map(|i| {
                let jiffies = base.wrapping_add(from + i * every);
                let at = (from + i * every) * tick;
                JiffiesEdge {
                    jiffies,
                    earliest_ns: at - window / 3,
                    latest_ns: at + window - window / 3,
                }
            })
            .collect()
    }

    #[test]
    fn every_kernel_hz_is_found_exactly() {
        for hz in KERNEL_HZ_CHOICES {
            let tick = (1_000_000_000 + hz / 2) / hz;
            let count = 4;
            // jiffies start 300 s before wrapping, as INITIAL_JIFFIES does.
            let base = 0u64.wrapping_sub(300 * hz);
            let clock = JiffiesClock::calibrate(&edges(hz, base, 5_000, count, 1, 4_000))
                .unwrap_or_else(|| panic!("HZ {hz} not found"));
            assert_eq!(clock.tick_ns, tick, "HZ {hz}");
            // A tick's start, to within the edge's window, a day later too.
            let later = 5_000 + 86_400 * hz;
            let truth = later * tick;
            assert!(
                clock.now_ns(base.wrapping_add(later)).abs_diff(truth) <= 4_000,
                "HZ {hz}"
            );
        }
    }

    #[test]
    fn too_little_evidence_gives_no_clock() {
        assert_eq!(JiffiesClock::calibrate(&[]), None);
        // One edge: no tick.
        assert_eq!(
            JiffiesClock::calibrate(&edges(250, 7, 10, 1, 1, 1_000)),
            None
        );
        // Windows too wide for the span between them: 40 µs over 4 ms is 1 %.
        assert_eq!(
            JiffiesClock::calibrate(&edges(250, 7, 10, 2, 1, 40_000)),
            None
        );
        // The same windows over 40 ms pin it.
        assert!(JiffiesClock::calibrate(&edges(250, 7, 10, 11, 1, 40_000)).is_some());
    }

    #[test]
    fn wide_edges_are_left_out_and_skipped_ticks_counted() {
        let mut seen = edges(1000, 42, 100, 30, 2, 3_000);
        // Interrupted steps, wider than the offset may come from.
        seen[0].latest_ns += 5_000_000;
        seen[29].earliest_ns -= 5_000_000;
        let clock = JiffiesClock::calibrate(&seen).expect("a clock from the narrow edges");
        assert_eq!(clock.tick_ns, 1_000_000);
    }

    #[test]
    fn a_tick_no_kernel_has_is_refused() {
        // 400 Hz: 2.5 ms, 20 % from 300 and 60 % from 250.
        let seen: Vec<JiffiesEdge> = (0..12u64)
            .map(|i| JiffiesEdge {
                jiffies: i,
                earliest_ns: i * 2_500_000,
                latest_ns: i * 2_500_000 + 1_000,
            })
            .collect();
        assert_eq!(JiffiesClock::calibrate(&seen), None);
    }
}
