//! Testbed for forwarder: network-namespace topologies, the relay daemon under
//! test, real mosh peers and a UDP echo pair. Shared by the integration tests in
//! `tests/tests/` and by `cargo xtask demo`.
//!
//! Everything here runs as root and cleans up through Drop guards: namespaces
//! (with every process left inside), the daemon, mosh-server, the tmux server,
//! throwaway users and groups.

pub mod capture;
pub mod cluster;
pub mod cmd;
pub mod control;
pub mod flood;
pub mod gateway;
pub mod hostile;
pub mod mosh;
pub mod nat;
pub mod netns;
pub mod prereq;
pub mod raw;
pub mod relay;
pub mod scenario;
pub mod sshd;
pub mod topology;
pub mod udp;
pub mod users;

pub use mosh::{MoshClient, MoshServer};
pub use netns::{Netns, veth_pair};
pub use relay::{FlowInfo, NatInfo, Relay, Session, SessionInfo, forwarder_bin, workspace_root};
pub use topology::Topology;
pub use udp::{StreamReport, UdpEcho, UdpPinger, UdpStream};
