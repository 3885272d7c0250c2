//! Which flows and sessions have gone idle. Pure decisions over timestamps
//! (CLOCK_MONOTONIC nanoseconds, which the XDP program's clock reads too:
//! datapath::clock), so they are unit-tested without a kernel.

use std::time::Duration;

/// Activity of one flow, newest of the XDP and the slow-path timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowActivity {
    /// Last packet in either direction (or the flow's creation).
    pub last_active_ns: u64,
    /// Last packet from the server (0 if it never answered).
    pub last_from_server_ns: u64,
}

/// Indices of the flows to expire. The flow the server last replied to goes
/// last: it stays while any other flow of the session is still alive, since
/// mosh-server keeps sending there until a newer client packet moves it.
pub fn idle_flows(flows: &[FlowActivity], now_ns: u64, idle: Duration) -> Vec<usize> {
    let idle_ns = idle.as_nanos() as u64;
    let is_idle = |flow: &FlowActivity| now_ns.saturating_sub(flow.last_active_ns) >= idle_ns;
    let server_current = server_current(flows);
    let all_idle = flows.iter().all(is_idle);
    flows
        .iter()
        .enumerate()
        .filter(|(index, flow)| is_idle(flow) && (all_idle || Some(*index) != server_current))
        .map(|(index, _)| index)
        .collect()
}

/// The flow mosh-server currently sends to: the one it answered last.
pub fn server_current(flows: &[FlowActivity]) -> Option<usize> {
    flows
        .iter()
        .enumerate()
        .filter(|(_, flow)| flow.last_from_server_ns > 0)
        .max_by_key(|(_, flow)| flow.last_from_server_ns)
        .map(|(index, _)| index)
}

/// Whether a session whose newest activity is `last_active_ns` has been idle
/// for its whole timeout.
pub fn session_idle(last_active_ns: u64, now_ns: u64, idle: Duration) -> bool {
    now_ns.saturating_sub(last_active_ns) >= idle.as_nanos() as u64
}

/// Entries the expiry tick reads per tick at least: a slice of a few
/// milliseconds, so the flow maps of an ordinary relay are read whole
/// every tick and a million entries are spread over seconds.
pub const SLICE_ENTRIES: usize = 65_536;

/// Entries to read this tick so that a pass over `expected` entries (one
/// tick every `tick`) takes at most an eighth of `shortest_idle`: flows are
/// judged when a pass completes, so they go at most that much late.
pub fn slice_entries(expected: usize, shortest_idle: Duration, tick: Duration) -> usize {
    let ticks = (shortest_idle / 8).as_nanos() / tick.as_nanos().max(1);
    let ticks = usize::try_from(ticks).unwrap_or(usize::MAX).max(1);
    SLICE_ENTRIES.max(expected.div_ceil(ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(last_active_s: u64, last_from_server_s: u64) -> FlowActivity {
        FlowActivity {
            last_active_ns: last_active_s * S,
            last_from_server_ns: last_from_server_s * S,
        }
    }

    #[test]
    fn keeps_fresh_flows() {
        let flows = [flow(95, 95), flow(99, 0)];
        assert!(idle_flows(&flows, 100 * S, Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn expires_idle_flows() {
        let flows = [flow(10, 0), flow(99, 99)];
        assert_eq!(
            idle_flows(&flows, 100 * S, Duration::from_secs(10)),
            vec![0]
        );
    }

    #[test]
    fn server_current_flow_goes_last() {
        // Flow 0 is idle but the server still answers it: a roamed client's
        // old flow 1 is fresh, so flow 0 must wait for flow 1.
        let flows = [flow(10, 10), flow(99, 0), flow(5, 0)];
        assert_eq!(
            idle_flows(&flows, 100 * S, Duration::from_secs(10)),
            vec![2]
        );
    }

    #[test]
    fn everything_idle_expires_together() {
        let flows = [flow(10, 10), flow(20, 0)];
        assert_eq!(
            idle_flows(&flows, 100 * S, Duration::from_secs(10)),
            vec![0, 1]
        );
    }

    #[test]
    fn server_current_is_the_newest_reply() {
        assert_eq!(
            server_current(&[flow(1, 5), flow(1, 7), flow(1, 0)]),
            Some(1)
        );
        assert_eq!(server_current(&[flow(1, 0)]), None);
    }

    #[test]
    fn a_pass_takes_at_most_an_eighth_of_the_shortest_timeout() {
        let tick = Duration::from_secs(1);
        // An ordinary relay: one slice is the whole pass.
        assert_eq!(
            slice_entries(30_000, Duration::from_secs(120), tick),
            SLICE_ENTRIES
        );
        // A million flows (two halves each), 120 s: 15 ticks a pass at most.
        let slice = slice_entries(2_000_000, Duration::from_secs(120), tick);
        assert_eq!(slice, 133_334);
        assert!(2_000_000usize.div_ceil(slice) <= 15);
        // Ten minutes leave 75 ticks: the floor of a slice decides.
        assert_eq!(
            slice_entries(2_000_000, Duration::from_secs(600), tick),
            SLICE_ENTRIES
        );
        // A timeout under eight ticks: the whole pass in one tick.
        assert_eq!(
            slice_entries(2_000_000, Duration::from_secs(3), tick),
            2_000_000
        );
        assert_eq!(slice_entries(0, Duration::ZERO, tick), SLICE_ENTRIES);
    }

    #[test]
    fn session_idle_uses_its_own_timeout() {
        assert!(!session_idle(50 * S, 100 * S, Duration::from_secs(60)));
        assert!(session_idle(30 * S, 100 * S, Duration::from_secs(60)));
    }
}
