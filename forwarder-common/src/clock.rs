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

/// The widest window an edge may be timed within to count: a sampling
/// step the scheduler interrupted says little about when the tick came.
pub const MAX_EDGE_WINDOW_NS: u64 = 200_000;

/// The least time between the first and the last edge that agree with a
/// tick. A neighbouring HZ choice is 2.4 % away at the closest (250 and
/// 256, 1000 and 1024): over 20 ms its times drift 480 µs from the edges,
/// more than twice the widest window, so no wrong choice agrees with
/// edges that far apart.
pub const MIN_EDGE_SPAN_NS: u64 = 20_000_000;

/// The fewest edges that must agree with a tick.
pub const MIN_AGREEING_EDGES: usize = 3;

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

    /// The clock from edges seen in order, once they pin it down, or
    /// `None` while they do not (too few, too close, or agreeing with no
    /// kernel's tick, or with two: the caller then keeps the coarse clock).
    ///
    /// The kernel never moves jiffies early, only late (a tick the host
    /// delayed), so for the true tick every edge's window ends at or after
    /// `jiffies * tick + offset`, and the punctual edges' windows contain
    /// it. For each [`KERNEL_HZ_CHOICES`] tick the edges give an upper
    /// bound on the offset (the least of their windows' ends less
    /// `jiffies * tick`); the edges whose windows reach down to it agree
    /// with that tick. A tick is taken when at least
    /// [`MIN_AGREEING_EDGES`] edges spanning [`MIN_EDGE_SPAN_NS`] agree with
    /// it and with no other choice; the offset is the middle of what those
    /// edges leave open. A late edge only drops out of the agreement.
    pub fn calibrate(edges: &[JiffiesEdge]) -> Option<Self> {
        let narrow = || {
            edges
                .iter()
                .filter(|edge| edge.window_ns() <= MAX_EDGE_WINDOW_NS)
        };
        let reference = narrow().next()?;
        let mut found = None;
        for hz in KERNEL_HZ_CHOICES {
            let tick_ns = (1_000_000_000 + hz / 2) / hz;
            // Offsets relative to the reference edge's, which keeps them
            // small and signed whatever the jiffies' absolute value.
            let base = reference
                .latest_ns
                .wrapping_sub(reference.jiffies.wrapping_mul(tick_ns));
            let relative = |at_ns: u64, jiffies: u64| {
                at_ns
                    .wrapping_sub(jiffies.wrapping_mul(tick_ns))
                    .wrapping_sub(base) as i64
            };
            let Some(upper) = narrow()
                .map(|edge| relative(edge.latest_ns, edge.jiffies))
                .min()
            else {
                continue;
            };
            let agreeing =
                || narrow().filter(|edge| relative(edge.earliest_ns, edge.jiffies) <= upper);
            let (Some(first), Some(last)) = (agreeing().next(), agreeing().next_back()) else {
                continue;
            };
            let span_ns = last.midpoint_ns().saturating_sub(first.midpoint_ns());
            if agreeing().count() < MIN_AGREEING_EDGES || span_ns < MIN_EDGE_SPAN_NS {
                continue;
            }
            if found.is_some() {
                return None;
            }
            let lower = agreeing()
                .map(|edge| relative(edge.earliest_ns, edge.jiffies))
                .max()
                .unwrap_or(upper);
            let offset_relative = lower + (upper - lower) / 2;
            found = Some(Self {
                tick_ns,
                offset_ns: base.wrapping_add(offset_relative as u64),
            });
        }
        found
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
            let count = (MIN_EDGE_SPAN_NS / tick + 2).max(MIN_AGREEING_EDGES as u64);
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
        // Two edges: too few.
        assert_eq!(
            JiffiesClock::calibrate(&edges(250, 7, 10, 2, 5, 1_000)),
            None
        );
        // Three edges 8 ms apart: too close.
        assert_eq!(
            JiffiesClock::calibrate(&edges(250, 7, 10, 3, 1, 1_000)),
            None
        );
        // Every step interrupted.
        assert_eq!(
            JiffiesClock::calibrate(&edges(250, 7, 10, 20, 1, 300_000)),
            None
        );
        // Seven edges over 24 ms pin it.
        let clock = JiffiesClock::calibrate(&edges(250, 7, 10, 7, 1, 40_000));
        assert_eq!(clock.map(|clock| clock.tick_ns), Some(4_000_000));
    }

    #[test]
    fn late_ticks_skew_neither_the_tick_nor_the_offset() {
        // HZ 250, the first edge 450 µs late: taken as it came, over the
        // 24 ms to the last edge it would make the tick 1.9 % short, within
        // 1 % of HZ 256's; two more are late by 1 and 3 ms.
        let mut seen = edges(250, 1_000, 10, 7, 1, 20_000);
        for (index, late) in [(0, 450_000), (3, 1_000_000), (5, 3_000_000)] {
            seen[index].earliest_ns += late;
            seen[index].latest_ns += late;
        }
        let clock = JiffiesClock::calibrate(&seen).expect("a clock from the punctual edges");
        assert_eq!(clock.tick_ns, 4_000_000);
        // Truth: jiffy 1,000 + 10 began at 40 ms.
        assert!(clock.now_ns(1_010).abs_diff(40_000_000) <= 20_000);
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
