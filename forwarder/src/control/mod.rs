//! The control API: one message set (`proto`), served by the daemon over a
//! root-only Unix socket (`server`) and spoken by the CLI verbs (`client`).

pub mod client;
pub mod proto;
pub mod server;

use std::path::PathBuf;

/// Where the control socket of `instance` lives.
pub fn socket_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/forwarder/{instance}.sock"))
}

/// The packaged unit that runs `instance`: forwarder.service runs the
/// default instance, the template forwarder@NAME.service every other one.
pub fn systemd_unit(instance: &str) -> String {
    if instance == "default" { "forwarder".to_string() } else { format!("forwarder@{instance}") }
}
