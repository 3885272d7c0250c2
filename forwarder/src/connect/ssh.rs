//! The user's ssh, as `--ssh` names it (default `ssh`): every connection
//! `forwarder mosh` makes goes through it, so the user's ssh config,
//! agent, keys and known hosts apply, host aliases included.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, ToSocketAddrs};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which address families a run may use (`-4`, `-6`, or both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

impl Family {
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::V4 => ip.is_ipv4(),
            Self::V6 => ip.is_ipv6(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Any => "IP",
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// ssh's own option for it.
    pub fn ssh_option(self) -> Option<&'static str> {
        match self {
            Self::Any => None,
            Self::V4 => Some("-4"),
            Self::V6 => Some("-6"),
        }
    }
}

/// ssh's own exit status for its failures (connect, authentication, host
/// key); anything else is the remote command's.
pub const SSH_FAILED: i32 = 255;
/// What a POSIX shell exits with when the command is not found.
pub const NOT_FOUND: i32 = 127;

#[derive(Clone, Debug)]
pub struct Ssh {
    program: String,
    args: Vec<String>,
}

/// A finished ssh run: its status and what it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// ssh's complaint, for messages: its stderr without the chatter a
    /// pty session adds.
    pub fn complaint(&self) -> String {
        complaint(&self.stderr)
    }
}

/// What ssh adds after a failed ProxyJump hop, which only repeats that
/// the hop failed.
const AFTERMATH: &[&str] = &[
    "kex_exchange_identification: Connection closed by remote host",
    "Connection closed by UNKNOWN port 65535",
];

/// ssh's stderr on one line, without blank lines, `Connection to X
/// closed.` and the aftermath of a failed jump.
pub fn complaint(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|line| line.trim())
        .filter(|line| {
            let closed = line.starts_with("Connection to ") && line.ends_with(" closed.");
            !line.is_empty() && !closed
        })
        .collect();
    let cause: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| !AFTERMATH.contains(line))
        .collect();
    let lines = if cause.is_empty() { lines } else { cause };
    if lines.is_empty() {
        "ssh printed nothing".into()
    } else {
        lines.join("; ")
    }
}

/// A destination as ssh takes it: `[USER@]HOST`, never an option.
pub fn check_destination(what: &str, destination: &str) -> anyhow::Result<()> {
    if destination.is_empty() || destination.starts_with('-') {
        bail!(
            "{what} {destination:?} is not a host: give [USER@]HOST (a name from your ssh config works)"
        );
    }
    Ok(())
}

impl Ssh {
    /// Splits `--ssh` as a POSIX shell would (mosh's `--ssh` does the same).
    pub fn parse(command: &str) -> anyhow::Result<Self> {
        let words = shell_words::split(command).with_context(|| {
            format!("cannot split --ssh {command:?} into words: check its quotes")
        })?;
        let Some((program, args)) = words.split_first() else {
            bail!("--ssh is empty: give the ssh command, e.g. --ssh 'ssh -p 2222'");
        };
        Ok(Self {
            program: program.clone(),
            args: args.to_vec(),
        })
    }

    /// The ssh for the bastion's own connections: the program and its
    /// `-F`, the options ssh's own `-J` hands a jump host; the rest of
    /// `--ssh` (a port, a key) is meant for the host, as with `ssh -J`.
    pub fn for_jump_host(&self) -> Self {
        let mut args = Vec::new();
        let mut words = self.args.iter();
        while let Some(word) = words.next() {
            if word == "-F" {
                if let Some(file) = words.next() {
                    args.extend(["-F".to_string(), file.clone()]);
                }
            } else if word.starts_with("-F") {
                args.push(word.clone());
            }
        }
        Self {
            program: self.program.clone(),
            args,
        }
    }

    /// `ssh [--ssh's words] OPTIONS`.
    pub fn command(&self, options: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args).args(options);
        command
    }

    /// The host name ssh would connect to for `destination`, after the
    /// user's config (`ssh -G`: aliases, `HostName`, `Match`).
    pub fn hostname(&self, destination: &str) -> anyhow::Result<String> {
        let output = self
            .command(&["-G", destination])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {:?}: is ssh installed?", self.program))?;
        if !output.status.success() {
            bail!(
                "`{} -G {destination}` failed: {}",
                self.program,
                complaint(&String::from_utf8_lossy(&output.stderr))
            );
        }
        parse_hostname(&String::from_utf8_lossy(&output.stdout))
            .with_context(|| format!("`{} -G {destination}` printed no hostname", self.program))
    }

    /// The addresses mosh's UDP may go to for `destination`: ssh's host
    /// name for it, resolved as ssh resolves it (getaddrinfo, whose order
    /// puts the family this machine prefers first), of `family` only when
    /// given (`-4`, `-6`).
    pub fn resolve(&self, destination: &str, family: Family) -> anyhow::Result<Vec<IpAddr>> {
        let hostname = self.hostname(destination)?;
        let found: Vec<IpAddr> = match hostname.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => (hostname.as_str(), 0)
                .to_socket_addrs()
                .with_context(|| {
                    format!("cannot resolve {hostname:?} (ssh's host name for {destination})")
                })?
                .map(|address| address.ip())
                .collect(),
        };
        let mut addresses: Vec<IpAddr> = Vec::new();
        for ip in found {
            let ip = ip.to_canonical();
            if family.admits(ip) && !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        if addresses.is_empty() {
            bail!(
                "{hostname:?} (ssh's host name for {destination}) has no {} address",
                family.name()
            );
        }
        Ok(addresses)
    }

    /// `ssh OPTIONS destination -- remote`, its output piped.
    fn remote(&self, options: &[&str], destination: &str, remote: &str, stdin: Stdio) -> Command {
        let mut command = self.command(options);
        command
            .arg(destination)
            .arg("--")
            .arg(remote)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `destination -- remote` with `stdin` written to the remote
    /// command (nothing: /dev/null) and waits for it.
    pub fn run(
        &self,
        options: &[&str],
        destination: &str,
        remote: &str,
        stdin: Option<&str>,
    ) -> anyhow::Result<Finished> {
        let input = if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = self.spawn(&mut self.remote(options, destination, remote, input))?;
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().context("ssh's stdin")?;
            // A remote command that exits early closes the pipe: its
            // status says what happened, not this write.
            let _ = pipe.write_all(text.as_bytes());
        }
        let stderr = drain(child.stderr.take());
        let mut stdout = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_string(&mut stdout)
                .context("reading ssh's output")?;
        }
        let status = child.wait().context("waiting for ssh")?;
        Ok(Finished {
            status,
            stdout,
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    /// Runs `destination -- remote` and hands each line of its stdout to
    /// `line` until that returns true; then waits for ssh to end.
    pub fn run_until(
        &self,
        options: &[&str],
        destination: &str,
        remote: &str,
        mut line: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Finished> {
        let mut child =
            self.spawn(&mut self.remote(options, destination, remote, Stdio::null()))?;
        let stderr = drain(child.stderr.take());
        let mut seen = String::new();
        let mut done = false;
        let mut rest = None;
        if let Some(pipe) = child.stdout.take() {
            let mut reader = BufReader::new(pipe);
            let mut buffer = String::new();
            while !done {
                buffer.clear();
                if reader
                    .read_line(&mut buffer)
                    .context("reading ssh's output")?
                    == 0
                {
                    break;
                }
                seen.push_str(&buffer);
                done = line(&buffer)?;
            }
            rest = Some(drain(Some(reader)));
        }
        // mosh-server's parent exits right after `MOSH CONNECT` and its
        // detached child closes its copies of the session's output, so ssh
        // ends too; should a remote program hold them open, ssh is not
        // waited for beyond a bound once what was needed has arrived.
        let status = if done {
            wait_bounded(&mut child, LINGER)?
        } else {
            child.wait().context("waiting for ssh")?
        };
        if let Some(rest) = rest {
            seen.push_str(&rest.join().unwrap_or_default());
        }
        Ok(Finished {
            status,
            stdout: seen,
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    fn spawn(&self, command: &mut Command) -> anyhow::Result<Child> {
        command.spawn().with_context(|| {
            format!(
                "cannot run {:?}: install OpenSSH's client, or name yours with --ssh",
                self.program
            )
        })
    }
}

/// One login to the bastion that the hop to the host and `forwarder add`
/// share (`ssh -M -N`, a control socket in a private folder): the bastion is
/// logged in to once during set-up, and a failed login there is told
/// apart from one behind it. Closed on drop, before mosh-client starts:
/// its TCP connection would not survive a roam anyway.
#[derive(Debug)]
pub struct Master {
    ssh: Ssh,
    destination: String,
    socket: std::path::PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Master {
    /// Logs in to `destination` (prompting as ssh does) and keeps the
    /// connection open; on failure, ssh's complaint. The master stays this
    /// process's child in its process group (no `-f`), so a ^C during
    /// set-up ends it too.
    pub fn open(ssh: &Ssh, destination: &str, family: &[&str]) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("fwd-mosh-")
            .tempdir()
            .map_err(|error| format!("creating a folder for ssh's control socket: {error}"))?;
        let socket = dir.path().join("bastion");
        let socket_text = socket.to_string_lossy().into_owned();
        // A file, not a pipe: nobody reads the master's stderr while it runs.
        let mut log =
            tempfile::tempfile().map_err(|error| format!("creating a temporary file: {error}"))?;
        let mut options = vec![
            "-M",
            "-S",
            socket_text.as_str(),
            "-o",
            "ControlPersist=no",
            "-N",
            "-T",
        ];
        options.extend(family);
        let mut child = ssh
            .command(&options)
            .arg(destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                log.try_clone()
                    .map_err(|error| format!("duplicating a file descriptor: {error}"))?,
            )
            .spawn()
            .map_err(|error| {
                format!(
                    "cannot run {:?}: install OpenSSH's client, or name yours with --ssh ({error})",
                    ssh.program
                )
            })?;
        // ssh listens on the control socket once it has logged in; it may
        // first ask for a password or a host key, for as long as that takes.
        loop {
            if socket.exists() {
                break;
            }
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Ok(Some(_)) | Err(_) => {
                    let _ = child.wait();
                    let mut text = String::new();
                    let _ = std::io::Seek::rewind(&mut log);
                    let _ = log.read_to_string(&mut text);
                    return Err(complaint(&text));
                }
            }
        }
        let mut shared = ssh.clone();
        shared.args.extend([
            "-S".to_string(),
            socket_text,
            "-o".to_string(),
            "ControlMaster=no".to_string(),
        ]);
        Ok(Self {
            ssh: shared,
            destination: destination.to_string(),
            socket,
            child,
            _dir: dir,
        })
    }

    /// The ssh that runs its commands over the master connection.
    pub fn ssh(&self) -> &Ssh {
        &self.ssh
    }

    /// A ProxyCommand through the master to the host, what `-J` would
    /// do with a login of its own.
    pub fn proxy_command(&self) -> String {
        let mut words = vec![self.ssh.program.clone()];
        words.extend(self.ssh.args.iter().cloned());
        words.extend([
            "-W".to_string(),
            "[%h]:%p".to_string(),
            self.destination.clone(),
        ]);
        format!("ProxyCommand={}", shell_words::join(words))
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let socket = self.socket.to_string_lossy().into_owned();
        let asked = self
            .ssh
            .command(&["-S", &socket, "-O", "exit"])
            .arg(&self.destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !asked || wait_bounded(&mut self.child, LINGER).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long ssh may go on after the remote side said what was needed.
const LINGER: Duration = Duration::from_secs(10);

/// Waits for `child` at most `limit`, then kills it.
fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().context("waiting for ssh")? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().context("waiting for ssh");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pipe to its end on a thread, so neither pipe fills while the
/// other is read.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// The `hostname` line of `ssh -G`.
fn parse_hostname(config: &str) -> Option<String> {
    config.lines().find_map(|line| {
        let (key, value) = line.trim().split_once(' ')?;
        (key.eq_ignore_ascii_case("hostname") && !value.trim().is_empty())
            .then(|| value.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_ssh_command_like_a_shell() {
        let ssh = Ssh::parse("ssh -F '/home/a b/config' -p 2222").unwrap();
        assert_eq!(ssh.program, "ssh");
        assert_eq!(ssh.args, ["-F", "/home/a b/config", "-p", "2222"]);
        assert!(Ssh::parse("  ").is_err());
        assert!(Ssh::parse("ssh 'unclosed").is_err());
    }

    #[test]
    fn the_jump_host_gets_only_the_config_file() {
        let ssh = Ssh::parse("/opt/ssh -p 2222 -F cfg -i key -F/other").unwrap();
        let jump = ssh.for_jump_host();
        assert_eq!(jump.program, "/opt/ssh");
        assert_eq!(jump.args, ["-F", "cfg", "-F/other"]);
    }

    #[test]
    fn reads_the_hostname_of_ssh_g() {
        let config = "user alice\nhostname 10.77.1.1\nport 22\n";
        assert_eq!(parse_hostname(config).as_deref(), Some("10.77.1.1"));
        assert_eq!(parse_hostname("user alice\n"), None);
    }

    #[test]
    fn destinations_are_never_options() {
        assert!(check_destination("host", "alice@server").is_ok());
        assert!(check_destination("host", "-oProxyCommand=x").is_err());
        assert!(check_destination("--via", "").is_err());
    }

    #[test]
    fn complaint_drops_pty_chatter() {
        assert_eq!(
            complaint(
                "\nConnection to 10.0.0.2 closed.\nssh: connect to host 10.0.0.1 port 22: Connection refused\r\n"
            ),
            "ssh: connect to host 10.0.0.1 port 22: Connection refused"
        );
        assert_eq!(complaint(""), "ssh printed nothing");
        assert_eq!(
            complaint(
                "channel 0: open failed: connect failed: Connection refused\nstdio forwarding failed\n\
                       kex_exchange_identification: Connection closed by remote host\n\
                       Connection closed by UNKNOWN port 65535\n"
            ),
            "channel 0: open failed: connect failed: Connection refused; stdio forwarding failed"
        );
        assert_eq!(
            complaint("Connection closed by UNKNOWN port 65535\n"),
            "Connection closed by UNKNOWN port 65535"
        );
    }
}
