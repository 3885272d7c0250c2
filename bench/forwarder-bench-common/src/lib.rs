//! Configuration of the benchmark's ceiling program: a fixed one-way rewrite
//! and redirect, the least an XDP relay on this path can do. Shared by the
//! ceiling's XDP program (forwarder-bench-ebpf) and `forwarder-bench`.
#![no_std]

use bytemuck::{Pod, Zeroable};

use forwarder_common::Rewrite;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CeilingConfig {
    /// Rewrite applied to every UDP packet to `port`.
    pub rewrite: Rewrite,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// UDP destination port (wire bytes) that the ceiling relays.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// Interface the rewritten packets leave from, for the record: the
    /// redirect reads it from `CEILING_EGRESS` slot 0, as the forwarder does.
    pub egress_ifindex: u32,
    pub _pad_end: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<CeilingConfig>() == 64);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data without implicit padding (size asserted).
unsafe impl aya::Pod for CeilingConfig {}
