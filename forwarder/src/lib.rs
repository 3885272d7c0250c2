//! forwarder: an XDP-accelerated UDP relay for mosh. The library holds the
//! daemon, the session table and the control API; `main.rs` is a thin CLI.
//!
//! Data flows one way: cli → control → sessions → datapath.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod expiry;
pub mod limits;
pub mod metrics;
pub mod ports;
pub mod sessions;
pub mod slowpath;
pub mod store;
