//! The CLI side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, bail};

use forwarder_api::socket_path;
use forwarder_api::{Reply, Request};

/// What went wrong in a way a script may want to tell apart (each has its
/// own exit code); carried inside the `anyhow::Error`, under its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("not found")]
    NotFound,
    #[error("the daemon is not running")]
    DaemonNotRunning,
    #[error("permission denied")]
    PermissionDenied,
}

impl Failure {
    pub fn exit_status(self) -> forwarder_api::ExitStatus {
        match self {
            Self::NotFound => forwarder_api::ExitStatus::NotFound,
            Self::DaemonNotRunning => forwarder_api::ExitStatus::DaemonNotRunning,
            Self::PermissionDenied => forwarder_api::ExitStatus::PermissionDenied,
        }
    }
}

/// Sends one request to the daemon of `instance` and returns its reply;
/// a daemon-side error becomes an `Err` carrying the daemon's message.
pub fn call(instance: &str, request: &Request) -> anyhow::Result<Reply> {
    let path = socket_path(instance);
    let mut stream = UnixStream::connect(&path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::Error::new(Failure::DaemonNotRunning)
            .context(format!(
                "no forwarder daemon is running for instance {instance:?} ({} is missing or dead): start it with \
                 `systemctl start {}` or `forwarder run --iface IF --instance {instance}`",
                path.display(),
                super::systemd_unit(instance)
            )),
        std::io::ErrorKind::PermissionDenied => {
            anyhow::Error::new(Failure::PermissionDenied).context(permission_denied(&path))
        }
        _ => anyhow::anyhow!("connecting to {}: {error}", path.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .with_context(|| format!("sending the request to {}", path.display()))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading the daemon's reply on {}", path.display()))?;
    if reply.is_empty() {
        bail!("the daemon closed the control connection without answering: see its log");
    }
    match serde_json::from_str(&reply).context("the daemon's reply is not valid JSON")? {
        Reply::Error(message) => bail!("{message}"),
        Reply::NotFound(message) => Err(anyhow::Error::new(Failure::NotFound).context(message)),
        Reply::PermissionDenied(message) => {
            Err(anyhow::Error::new(Failure::PermissionDenied).context(message))
        }
        reply => Ok(reply),
    }
}

/// Why the socket refused us, naming the group that may use it.
fn permission_denied(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let group = std::fs::metadata(path).ok().map(|meta| {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
            .ok()
            .flatten()
            .map_or_else(|| meta.gid().to_string(), |group| group.name)
    });
    match group {
        Some(group) if group != "root" => format!(
            "permission denied on {}: the control socket is for root and the members of group {group:?}; \
             ask the relay's administrator to add you (`adduser USER {group}`), then log in again so the \
             membership applies",
            path.display()
        ),
        _ => format!(
            "permission denied on {}: the control socket is root's (the daemon runs with --socket-group root); \
             run this as root, or ask the relay's administrator to open it to a group",
            path.display()
        ),
    }
}
