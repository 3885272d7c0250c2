//! The XDP program's jiffies clock against CLOCK_MONOTONIC, on this kernel:
//! the daemon's measurement must give the time of the current tick.

mod common;

use common::require_root;
use forwarder::datapath::clock::{JiffiesProbe, measure};
use forwarder_common::clock::KERNEL_HZ_CHOICES;

#[test]
fn measured_clock_reads_as_the_monotonic_time_of_the_tick() {
    require_root();
    let clock = measure().expect("measuring the kernel tick");
    assert!(
        KERNEL_HZ_CHOICES
            .iter()
            .any(|hz| clock.tick_ns == (1_000_000_000 + hz / 2) / hz),
        "tick {} ns is no kernel HZ's",
        clock.tick_ns
    );
    let probe = JiffiesProbe::load().expect("loading the clock probe");
    // Within 1 ms of the measured edge (MAX_EDGE_WINDOW_NS), a jiffy's
    // time is the start of the tick its read fell in.
    let slack = 1_000_000;
    for _ in 0..50 {
        let read = probe.read().expect("reading jiffies");
        let at = clock.now_ns(read.jiffies);
        assert!(
            at <= read.after_ns + slack && at + clock.tick_ns + slack >= read.before_ns,
            "jiffies {} read as {at} ns, outside its tick ({}..{} ns monotonic)",
            read.jiffies,
            read.before_ns,
            read.after_ns
        );
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // A second measurement finds the same clock (the same tick; the offset
    // to within both edges' windows).
    let again = measure().expect("measuring the kernel tick again");
    assert_eq!(again.tick_ns, clock.tick_ns);
    assert!(
        (again.offset_ns.wrapping_sub(clock.offset_ns) as i64).unsigned_abs() <= 2 * slack,
        "offsets {} and {} differ",
        clock.offset_ns,
        again.offset_ns
    );
}
