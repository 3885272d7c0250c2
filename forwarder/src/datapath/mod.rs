//! Load, attach and pin the XDP program; read and write its maps.

pub mod xdp;
