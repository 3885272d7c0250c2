//! Relay-wide settings the XDP program reads from a one-slot array map.

use bytemuck::{Pod, Zeroable};

/// Default capacity of each flow map (client half and backend half).
pub const MAX_FLOWS: u32 = 16_384;

/// Counter slots: every flow owns two, one per direction.
pub const FLOW_COUNTER_SLOTS: u32 = MAX_FLOWS * 2;

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
}
const _: () = assert!(core::mem::size_of::<RelayConfig>() == 8);

impl RelayConfig {
    #[inline(always)]
    pub fn is_session_port(&self, port: u16) -> bool {
        port >= self.session_port_lo && port <= self.session_port_hi
    }

    #[inline(always)]
    pub fn is_flow_port(&self, port: u16) -> bool {
        port >= self.flow_port_lo && port <= self.flow_port_hi
    }
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (size asserted above).
unsafe impl aya::Pod for RelayConfig {}
