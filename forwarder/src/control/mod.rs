//! The control socket: the daemon serves it (`server`), the CLI verbs speak
//! it (`client`); the messages are `forwarder_api`'s.

pub mod client;
pub mod server;
