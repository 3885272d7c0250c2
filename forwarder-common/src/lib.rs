//! The contract between the XDP program and the daemon: map keys and values,
//! verdicts and reasons, and the checksum arithmetic both sides rely on.
//!
//! Everything here is `no_std`, `#[repr(C)]` and `Pod`, with its size pinned
//! by a compile-time assert, so a layout change cannot slip through silently.
#![no_std]

pub mod clientseq;
pub mod clock;
pub mod config;
pub mod csum;
pub mod flow;
pub mod flow6;
pub mod portslot;
pub mod reason;
pub mod slowpath;

pub use config::{MAX_FLOWS, RelayConfig};
pub use flow::{AllowedSource, BackendKey, BackendRewrite, ClientKey, FlowCounter, Rewrite};
pub use flow6::{BackendKey6, ClientKey6, Rewrite6};
pub use reason::{REASON_COUNT, Reason, Verdict};
pub use slowpath::SlowpathBucket;
