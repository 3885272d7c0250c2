//! Relay-wide settings: map sizes, map names, and the port ranges the XDP
//! program reads from a read-only global set at load time.

use bytemuck::{Pod, Zeroable};

/// Default capacity of each flow map (client half and backend half). Only
/// the size the object is compiled with: the daemon sizes every map from
/// [`RuntimeSizes`] when it loads the program.
pub const MAX_FLOWS: u32 = 16_384;

/// Default `--max-sessions`.
pub const DEFAULT_MAX_SESSIONS: u32 = 4_096;

/// Most flows `--max-flows` (and `--max-flows6`) may ask for: over a
/// gigabyte of kernel memory for the preallocated IPv4 maps alone.
pub const MAX_FLOWS_LIMIT: u32 = 1 << 22;

/// Most IPv6 and translated flows `--max-flows6` gives by default, whatever
/// `--max-flows` is. Those four maps allocate their elements per entry
/// (`BPF_F_NO_PREALLOC`): only their bucket arrays, 16 B per entry of
/// capacity rounded up to a power of two, follow the capacity. So the default
/// `min(max_flows, 65_536)` gives a typical relay the same room in both
/// families, and keeps a million-flow IPv4 relay's IPv6 buckets to ~4 MB
/// (4 maps x 65,536 x 16 B) instead of ~64 MB (~64 B per flow of capacity
/// paid for nothing).
pub const DEFAULT_MAX_FLOWS6_CAP: u32 = 65_536;

/// `--max-flows6` unless given: see [`DEFAULT_MAX_FLOWS6_CAP`].
pub const fn default_max_flows6(max_flows: u32) -> u32 {
    if max_flows < DEFAULT_MAX_FLOWS6_CAP {
        max_flows
    } else {
        DEFAULT_MAX_FLOWS6_CAP
    }
}

/// Most sessions: one client-facing UDP port each.
pub const MAX_SESSIONS_LIMIT: u32 = 65_535;

/// Slots of the redirect device map: the most interfaces one relay attaches to.
pub const MAX_INTERFACES: u32 = 64;

/// The names of the maps in the XDP object: the daemon finds, sizes and pins
/// them by these names, so both sides take them from here.
pub mod map_names {
    pub const CLIENT_FLOWS: &str = "CLIENT_FLOWS";
    pub const BACKEND_FLOWS: &str = "BACKEND_FLOWS";
    pub const REASON_COUNTERS: &str = "REASON_COUNTERS";
    pub const EGRESS: &str = "EGRESS";
    pub const EGRESS_IFACES: &str = "EGRESS_IFACES";
    pub const EGRESS_SLOTS: &str = "EGRESS_SLOTS";
    pub const SLOWPATH_SESSION_BUCKETS: &str = "SLOWPATH_SESSION_BUCKETS";
    pub const SLOWPATH_GLOBAL_BUCKET: &str = "SLOWPATH_GLOBAL_BUCKET";
    pub const CLIENT_FLOWS6: &str = "CLIENT_FLOWS6";
    pub const BACKEND_FLOWS6: &str = "BACKEND_FLOWS6";
    pub const CLIENT_FLOWS_4TO6: &str = "CLIENT_FLOWS_4TO6";
    pub const BACKEND_FLOWS_4TO6: &str = "BACKEND_FLOWS_4TO6";
    pub const PORTS_4TO6: &str = "PORTS_4TO6";
    pub const CLIENT_SEQS: &str = "CLIENT_SEQS";
    pub const CLIENT_PORT_SLOTS: &str = "CLIENT_PORT_SLOTS";
    pub const BACKEND_PORT_SLOTS: &str = "BACKEND_PORT_SLOTS";
    pub const CLIENT_PORTS_HASHED: &str = "CLIENT_PORTS_HASHED";
    pub const BACKEND_PORTS_HASHED: &str = "BACKEND_PORTS_HASHED";
}

/// Every size that depends on the run's flags, derived in one place: the
/// daemon sets each map's `max_entries` from [`RuntimeSizes::map_max_entries`]
/// at load time, counts room for flows from `max_flows` and `max_flows6`,
/// and checks pinned maps against the same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeSizes {
    /// Entries of each IPv4 flow map (client halves, backend halves): IPv4
    /// flows, the ones whose client and backend are both IPv4.
    pub max_flows: u32,
    /// Entries of each IPv6 and translated flow map (`CLIENT_FLOWS6`,
    /// `BACKEND_FLOWS6`, `CLIENT_FLOWS_4TO6`, `BACKEND_FLOWS_4TO6`): every
    /// flow with an IPv6 end puts one half in a client map and one in a
    /// backend map of these, so this many such flows always fit.
    pub max_flows6: u32,
    /// Most sessions (the daemon's limit; the per-session slow-path bucket
    /// array has a slot per port whatever this is).
    pub max_sessions: u32,
}

/// Why `--max-flows` / `--max-flows6` / `--max-sessions` cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    FlowsOutOfRange(u32),
    Flows6OutOfRange(u32),
    SessionsOutOfRange(u32),
}

impl RuntimeSizes {
    /// `max_flows6` may exceed `max_flows` (an IPv6-only relay asks for it);
    /// [`default_max_flows6`] is what to pass when the operator gave none.
    pub const fn new(
        max_flows: u32,
        max_flows6: u32,
        max_sessions: u32,
    ) -> Result<Self, SizeError> {
        if max_flows == 0 || max_flows > MAX_FLOWS_LIMIT {
            return Err(SizeError::FlowsOutOfRange(max_flows));
        }
        if max_flows6 == 0 || max_flows6 > MAX_FLOWS_LIMIT {
            return Err(SizeError::Flows6OutOfRange(max_flows6));
        }
        if max_sessions == 0 || max_sessions > MAX_SESSIONS_LIMIT {
            return Err(SizeError::SessionsOutOfRange(max_sessions));
        }
        Ok(Self {
            max_flows,
            max_flows6,
            max_sessions,
        })
    }

    /// `max_entries` of every map whose size follows the flags; the others
    /// (one-slot arrays, per-reason counters, the devmap) keep the size
    /// they are compiled with.
    pub const fn map_max_entries(&self) -> [(&'static str, u32); 6] {
        [
            (map_names::CLIENT_FLOWS, self.max_flows),
            (map_names::BACKEND_FLOWS, self.max_flows),
            // The IPv6 and translated maps have their own knob: all four are
            // sized alike, since a flow's client half may be in either
            // client map and its backend half in either backend map.
            (map_names::CLIENT_FLOWS6, self.max_flows6),
            (map_names::BACKEND_FLOWS6, self.max_flows6),
            (map_names::CLIENT_FLOWS_4TO6, self.max_flows6),
            (map_names::BACKEND_FLOWS_4TO6, self.max_flows6),
        ]
    }
}

/// Name of the read-only global the XDP program reads its [`RelayConfig`]
/// from; the daemon sets it when it loads the program.
pub const RELAY_CONFIG_GLOBAL: &str = "RELAY_CONFIG";

/// Port ranges the relay owns, in host byte order, inclusive. A UDP packet to
/// any other port is not the relay's business and passes untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RelayConfig {
    /// Client-facing session ports (P).
    pub session_port_lo: u16,
    pub session_port_hi: u16,
    /// Backend-facing per-flow ports (Q).
    pub flow_port_lo: u16,
    pub flow_port_hi: u16,
    /// The one client-facing port every keyed session is reachable on as
    /// well (`--shared-port`); 0: none. Its flows are client halves like
    /// any, keyed by this port; a miss goes to the daemon, which matches
    /// the datagram to its session by key.
    pub shared_port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RelayConfig>() == 12);

impl RelayConfig {
    #[inline(always)]
    pub fn is_session_port(&self, port: u16) -> bool {
        port >= self.session_port_lo && port <= self.session_port_hi
    }

    /// A port clients send to: a session's own, or the shared one.
    #[inline(always)]
    pub fn is_client_port(&self, port: u16) -> bool {
        self.is_session_port(port) || (self.shared_port != 0 && port == self.shared_port)
    }

    #[inline(always)]
    pub fn is_flow_port(&self, port: u16) -> bool {
        port >= self.flow_port_lo && port <= self.flow_port_hi
    }
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (size asserted above).
unsafe impl aya::Pod for RelayConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_flags_and_refuse_what_cannot_work() {
        let sizes = RuntimeSizes::new(65_536, 1_024, 10_000).unwrap();
        let entries = sizes.map_max_entries();
        assert!(entries.contains(&(map_names::CLIENT_FLOWS, 65_536)));
        assert!(entries.contains(&(map_names::BACKEND_FLOWS, 65_536)));
        // The four IPv6 and translated maps follow --max-flows6.
        for name in [
            map_names::CLIENT_FLOWS6,
            map_names::BACKEND_FLOWS6,
            map_names::CLIENT_FLOWS_4TO6,
            map_names::BACKEND_FLOWS_4TO6,
        ] {
            assert!(entries.contains(&(name, 1_024)), "{name}: {entries:?}");
        }
        // The session buckets are indexed by port: never sized by the flags.
        assert!(
            !entries
                .iter()
                .any(|(name, _)| *name == map_names::SLOWPATH_SESSION_BUCKETS)
        );
        assert_eq!(
            RuntimeSizes::new(0, 1, 1),
            Err(SizeError::FlowsOutOfRange(0))
        );
        assert_eq!(
            RuntimeSizes::new(MAX_FLOWS_LIMIT + 1, 1, 1),
            Err(SizeError::FlowsOutOfRange(MAX_FLOWS_LIMIT + 1))
        );
        assert_eq!(
            RuntimeSizes::new(1, 0, 1),
            Err(SizeError::Flows6OutOfRange(0))
        );
        assert_eq!(
            RuntimeSizes::new(1, MAX_FLOWS_LIMIT + 1, 1),
            Err(SizeError::Flows6OutOfRange(MAX_FLOWS_LIMIT + 1))
        );
        assert_eq!(
            RuntimeSizes::new(1, 1, 70_000),
            Err(SizeError::SessionsOutOfRange(70_000))
        );
        assert!(RuntimeSizes::new(MAX_FLOWS_LIMIT, MAX_FLOWS_LIMIT, 1).is_ok());
        // An IPv6-only relay may ask for more IPv6 room than IPv4 room.
        assert!(RuntimeSizes::new(1, 1_000_000, 1).is_ok());
    }

    #[test]
    fn the_default_ipv6_room_follows_max_flows_up_to_its_cap() {
        assert_eq!(default_max_flows6(1), 1);
        assert_eq!(default_max_flows6(MAX_FLOWS), MAX_FLOWS);
        assert_eq!(default_max_flows6(65_536), 65_536);
        assert_eq!(default_max_flows6(65_537), 65_536);
        assert_eq!(default_max_flows6(1_000_000), 65_536);
        // A million-flow IPv4 relay's four IPv6 bucket arrays: 4 MiB.
        let buckets = 4 * u64::from(default_max_flows6(1_000_000).next_power_of_two()) * 16;
        assert_eq!(buckets, 4 << 20);
    }
}
