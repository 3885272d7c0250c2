//! The punch handshake, for mosh servers behind a NAT: one room with its
//! three parts.
//!
//! - `wire`: the messages, their authenticated envelope and the relay's
//!   authority (freshness, replays, rate);
//! - `relay`: the relay's service (the punch port, each NAT session's Q,
//!   keepalives), started by the daemon;
//! - `server`: `forwarder mosh-server`, the drop-in for mosh-server that
//!   runs the server's side and prints what mosh-server prints.
//!
//! The NAT half of a session itself (which client the server's packets go
//! to, verified roaming, the stored sealed key) is part of the session
//! table, in `sessions::nat`: it changes the same maps and limits as every
//! other session.

pub mod relay;
pub mod server;
pub mod wire;
