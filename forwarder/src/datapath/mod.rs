//! The two ways packets move: the XDP program (load, attach, maps) and the
//! daemon's own UDP sockets (first packets and fallbacks).

pub mod pins;
pub mod socket;
pub mod xdp;
