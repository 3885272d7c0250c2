//! Every way `forwarder mosh` fails, each naming its step and the fix.

use forwarder_api::{ErrorInfo, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(
        "cannot run mosh-client here ({client:?}: {detail}); fix: install mosh on this machine \
         (apt install mosh), or name mosh-client with --client PATH"
    )]
    NoLocalClient { client: String, detail: String },
    #[error(
        "cannot find the address of {destination}: {detail}; fix: check the name (`ssh -G {destination}` shows \
         what your ssh config makes of it)"
    )]
    Resolve { destination: String, detail: String },
    #[error(
        "ssh to the bastion {bastion} failed: {detail}; fix: make `ssh {bastion}` work from here first \
         (its name and port, your key, its host key in known_hosts; settings for it belong in your ssh config)"
    )]
    SshBastion { bastion: String, detail: String },
    #[error(
        "ssh to the host {host}{} failed: {detail}; fix: make `ssh {}{host}` work from here first \
         (its name and port as {} reaches it, that sshd listening there, your key there, its host key in known_hosts)",
        via.as_ref().map(|b| format!(" through the bastion {b}")).unwrap_or_default(),
        via.as_ref().map(|b| format!("-J {b} ")).unwrap_or_default(),
        via.as_deref().unwrap_or("this machine")
    )]
    SshHost {
        host: String,
        via: Option<String>,
        detail: String,
    },
    #[error(
        "no mosh-server on the host {host} (`{server}` was not found: {detail}); fix: install mosh there \
         (apt install mosh), or name its path with --server PATH"
    )]
    NoMoshServer {
        host: String,
        server: String,
        detail: String,
    },
    #[error(
        "mosh-server on the host {host} did not start (no `MOSH CONNECT` line): {detail}; fix: what mosh-server \
         said above (a UTF-8 locale there, e.g. LANG=C.UTF-8, a free UDP port for --port)"
    )]
    MoshServerFailed { host: String, detail: String },
    #[error(
        "the host {host} did not report SSH_CONNECTION, so the address the bastion reaches it on is unknown; \
         fix: let sshd there set it (it always does unless a ForceCommand or login script clears it)"
    )]
    NoSshConnection { host: String },
    #[error(
        "the bastion reaches the host {host} at {address}, which the relay cannot forward to (not an IP \
         address, or IPv6 link-local, which needs an interface); fix: give the host's global IPv4 or IPv6 \
         address, or a name for it that resolves to one on the bastion"
    )]
    NotForwardable { host: String, address: String },
    #[error(
        "no forwarder on the bastion {bastion} (`{command}` was not found: {detail}); fix: install forwarder \
         there, or name it with --relay-command PATH"
    )]
    NoRelay {
        bastion: String,
        command: String,
        detail: String,
    },
    /// No access to the control socket, or a session of another user:
    /// the bastion's forwarder names the socket's group and the fix.
    #[error(
        "forwarder on the bastion {bastion} refused your user there: {message}{}",
        if message.contains("group") { "" } else {
            "; fix: ask the bastion's admin to add that user to the control socket's group \
             (`forwarder` unless configured: `adduser USER forwarder`), then log in again"
        }
    )]
    RelayDenied { bastion: String, message: String },
    #[error(
        "no forwarder daemon runs on the bastion {bastion}{}: {message}; fix: ask its admin to start it, \
         or name the right instance with --relay-instance NAME",
        instance.as_ref().map(|i| format!(" for instance {i}")).unwrap_or_default()
    )]
    RelayNotRunning {
        bastion: String,
        instance: Option<String>,
        message: String,
    },
    /// A quota, the backend policy or a full relay: the daemon's own
    /// message says which limit and what to do.
    #[error("the bastion {bastion} refused the session: {message}")]
    RelayRefused { bastion: String, message: String },
    #[error(
        "`{command}` on the bastion {bastion} did not answer with a session: {detail}; fix: install a forwarder \
         there that has `add --key-file` and `--json` (or name it with --relay-command PATH)"
    )]
    RelayUnreadable {
        bastion: String,
        command: String,
        detail: String,
    },
    /// With its own step in front: a session was refused after mosh-server started.
    #[error(
        "{failure}; the mosh-server started on {host} exits by itself within a minute, since no client came"
    )]
    AfterServerStarted { failure: Box<Failure>, host: String },
    #[error(
        "no answer over UDP: the bastion {bastion} received nothing from this machine on UDP port {port}; \
         fix: a firewall between here and the bastion drops it: allow outgoing UDP to port {port} there, or ask \
         the bastion's admin for a port this network lets through (its --shared-port, e.g. 443)"
    )]
    NoUdpToBastion { bastion: String, port: u16 },
    #[error(
        "no answer over UDP: the bastion {bastion} forwarded this machine's packets to {backend}, but mosh-server \
         on {host} never answered; fix: allow UDP between the bastion and {host} (mosh-server's port, --port), \
         or check that mosh-server still runs there"
    )]
    NoUdpFromServer {
        bastion: String,
        host: String,
        backend: String,
    },
    #[error(
        "--tcp: the bastion {bastion} offers no TCP port for mosh; fix: its operator starts forwarder with \
         --tcp-port PORT (or tcp_port in its config), or leave out --tcp"
    )]
    NoTcpPort { bastion: String },
}

impl Failure {
    /// A `forwarder --json` error document from the bastion, by its kind.
    pub fn from_relay_error(bastion: &str, instance: Option<&str>, error: ErrorInfo) -> Self {
        let bastion = bastion.to_string();
        let message = error.message;
        if error.kind == ExitStatus::PermissionDenied.name() {
            Self::RelayDenied { bastion, message }
        } else if error.kind == ExitStatus::DaemonNotRunning.name() {
            Self::RelayNotRunning {
                bastion,
                instance: instance.map(str::to_string),
                message,
            }
        } else {
            Self::RelayRefused { bastion, message }
        }
    }

    pub fn after_server_started(self, host: &str) -> Self {
        Self::AfterServerStarted {
            failure: Box::new(self),
            host: host.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_errors_are_told_apart_by_kind() {
        let error = |kind: ExitStatus| ErrorInfo {
            kind: kind.name().into(),
            exit_code: kind as u8,
            message: "the daemon's words".into(),
        };
        let denied = Failure::from_relay_error("b", None, error(ExitStatus::PermissionDenied));
        assert!(
            denied.to_string().contains("adduser USER forwarder"),
            "{denied}"
        );
        let named = Failure::from_relay_error(
            "b",
            None,
            ErrorInfo {
                message: "the control socket is for the members of group \"mosh\"".into(),
                ..error(ExitStatus::PermissionDenied)
            },
        );
        assert!(
            !named.to_string().contains("adduser USER forwarder"),
            "{named}"
        );
        let down =
            Failure::from_relay_error("b", Some("edge"), error(ExitStatus::DaemonNotRunning));
        assert!(down.to_string().contains("for instance edge"), "{down}");
        let refused = Failure::from_relay_error("b", None, error(ExitStatus::Error));
        assert_eq!(
            refused.to_string(),
            "the bastion b refused the session: the daemon's words"
        );
    }

    #[test]
    fn each_message_names_its_step() {
        let host = Failure::SshHost {
            host: "h".into(),
            via: Some("b".into()),
            detail: "Permission denied (publickey)".into(),
        };
        assert!(
            host.to_string()
                .starts_with("ssh to the host h through the bastion b failed: Permission denied"),
            "{host}"
        );
        assert!(host.to_string().contains("`ssh -J b h`"), "{host}");
        let direct = Failure::SshHost {
            host: "h".into(),
            via: None,
            detail: "refused".into(),
        };
        assert!(direct.to_string().contains("`ssh h`"), "{direct}");
        let after = Failure::RelayRefused {
            bastion: "b".into(),
            message: "quota".into(),
        }
        .after_server_started("h");
        assert!(
            after
                .to_string()
                .starts_with("the bastion b refused the session: quota; the mosh-server")
        );
    }
}
