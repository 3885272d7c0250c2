//! The CLI side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, bail};

use super::proto::{Reply, Request};
use super::socket_path;

/// Sends one request to the daemon of `instance` and returns its reply;
/// a daemon-side error becomes an `Err` carrying the daemon's message.
pub fn call(instance: &str, request: &Request) -> anyhow::Result<Reply> {
    let path = socket_path(instance);
    let mut stream = UnixStream::connect(&path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no forwarder daemon is running for instance {instance:?} ({} is missing or dead): start it with \
             `systemctl start {}` or `forwarder run --iface IF --instance {instance}`",
            path.display(),
            super::systemd_unit(instance)
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: the control socket is root-only, run this as root",
            path.display()
        ),
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
        reply => Ok(reply),
    }
}
