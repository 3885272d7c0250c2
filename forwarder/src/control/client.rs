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
    /// The verb already printed what failed (`add --from-file`, item by
    /// item): the exit status says it failed, no second report follows.
    #[error("some items failed")]
    Reported,
}

/// Whether `error`'s details were already printed by the verb itself.
pub fn already_reported(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<Failure>() == Some(&Failure::Reported))
}

impl Failure {
    pub fn exit_status(self) -> forwarder_api::ExitStatus {
        match self {
            Self::NotFound => forwarder_api::ExitStatus::NotFound,
            Self::DaemonNotRunning => forwarder_api::ExitStatus::DaemonNotRunning,
            Self::PermissionDenied => forwarder_api::ExitStatus::PermissionDenied,
            Self::Reported => forwarder_api::ExitStatus::Error,
        }
    }
}

/// Sends one request to the daemon of `instance` and returns its reply;
/// a daemon-side error becomes an `Err` carrying the daemon's message.
pub fn call(instance: &str, request: &Request) -> anyhow::Result<Reply> {
    let mut connection = Connection::open(instance)?;
    connection.send(request)?;
    connection.receive()
}

/// One control connection, which may carry many requests: each is
/// answered by one reply, in order, so a caller may send several before
/// reading their replies (pipelining).
pub struct Connection {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    path: std::path::PathBuf,
}

impl Connection {
    /// Connects to the daemon of `instance`, naming what to do when it
    /// is not running or the socket is not the caller's to use.
    pub fn open(instance: &str) -> anyhow::Result<Self> {
        let path = socket_path(instance);
        let stream = UnixStream::connect(&path).map_err(|error| match error.kind() {
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
        let reader = BufReader::new(
            stream
                .try_clone()
                .with_context(|| format!("duplicating the connection to {}", path.display()))?,
        );
        Ok(Self {
            writer: stream,
            reader,
            path,
        })
    }

    /// A second handle on the same connection, e.g. for a thread that
    /// writes requests while this one reads replies.
    pub fn try_clone(&self) -> anyhow::Result<Self> {
        let duplicate = |stream: &UnixStream| {
            stream
                .try_clone()
                .with_context(|| format!("duplicating the connection to {}", self.path.display()))
        };
        Ok(Self {
            writer: duplicate(&self.writer)?,
            reader: BufReader::new(duplicate(self.reader.get_ref())?),
            path: self.path.clone(),
        })
    }

    /// [`Connection::receive`], waiting up to `timeout` (a large batch
    /// takes the daemon longer than one request).
    pub fn receive_within(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        self.receive()
    }

    /// Writes one request; its reply comes from [`Connection::receive`].
    pub fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending the request to {}", self.path.display()))
    }

    /// Reads the reply to the oldest request not yet answered.
    pub fn receive(&mut self) -> anyhow::Result<Reply> {
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .with_context(|| format!("reading the daemon's reply on {}", self.path.display()))?;
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
