//! forwarder: an XDP-accelerated UDP relay for mosh. The library holds the
//! daemon and the control API; `main.rs` is a thin CLI over it.

pub mod datapath;
