//! The control socket: the daemon serves it (`server`), the CLI verbs speak
//! it (`client`); the messages are `forwarder_api`'s.

pub mod batch;
pub mod client;
pub mod server;

/// The packaged unit that runs `instance`: forwarder.service runs the
/// default instance, the template forwarder@NAME.service every other one.
pub fn systemd_unit(instance: &str) -> String {
    if instance == "default" {
        "forwarder".to_string()
    } else {
        format!("forwarder@{instance}")
    }
}
