//! The embedded XDP object and everything that touches its maps.

/// The compiled XDP program (forwarder-ebpf), embedded by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));

/// Name of the XDP program inside [`EBPF_OBJECT`].
pub const PROGRAM_NAME: &str = "forwarder";
