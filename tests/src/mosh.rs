//! Real, unmodified mosh-server and mosh-client, driven through tmux.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, SHORT};
use crate::netns::{Netns, random_tag};

/// mosh refuses to start without a UTF-8 locale; C.UTF-8 exists on every Debian.
pub const UTF8_LOCALE: &str = "C.UTF-8";

/// A detached mosh-server running `/bin/sh`, killed on drop.
#[derive(Debug)]
pub struct MoshServer {
    pid: Option<i32>,
    pub port: u16,
    pub key: String,
}

impl MoshServer {
    /// Runs `mosh-server new` in `ns`, bound to `ip:port`. mosh-server forks a
    /// detached child and the parent exits after printing `MOSH CONNECT PORT KEY`.
    pub fn start(ns: &Netns, ip: impl Into<IpAddr>, port: u16) -> Result<Self> {
        let ip = ip.into().to_string();
        let port_arg = port.to_string();
        let mut cmd = ns.exec("mosh-server");
        cmd.args(["new", "-i", &ip, "-p", &port_arg])
            .args(["-l", &format!("LANG={UTF8_LOCALE}")])
            .args(["--", "/bin/sh"])
            .env("LANG", UTF8_LOCALE)
            .env("LC_ALL", UTF8_LOCALE)
            // A plain prompt keeps screen matching predictable.
            .env("PS1", "$ ");
        let out = cmd::run(&mut cmd, SHORT)?;
        let (port, key) = parse_connect(&out.stdout).with_context(|| {
            format!(
                "mosh-server printed no `MOSH CONNECT` line ({}):\n  stdout: {}\n  stderr: {}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            )
        })?;
        Ok(Self {
            pid: parse_pid(&out.stderr),
            port,
            key,
        })
    }
}

/// What `forwarder mosh-server` printed besides the server itself.
#[derive(Debug)]
pub struct Wrapped {
    /// The `MOSH IP` line: the relay address clients use (IPv6 bare, as mosh prints it).
    pub ip: IpAddr,
    /// The wrapper's own messages (and mosh-server's stderr).
    pub stderr: String,
}

impl MoshServer {
    /// Runs `forwarder mosh-server WRAPPER_ARGS new -l LANG=C.UTF-8 -- /bin/sh`
    /// in `ns`, as the stock `mosh` wrapper would through ssh.
    pub fn start_wrapped(ns: &Netns, wrapper_args: &[&str]) -> Result<(Self, Wrapped)> {
        let bin = crate::relay::forwarder_bin()?;
        let mut cmd = ns.exec(bin.to_str().context("binary path is not UTF-8")?);
        cmd.arg("mosh-server")
            .args(wrapper_args)
            .args([
                "new",
                "-c",
                "8",
                "-s",
                "-l",
                &format!("LANG={UTF8_LOCALE}"),
                "--",
                "/bin/sh",
            ])
            .env("LANG", UTF8_LOCALE)
            .env("LC_ALL", UTF8_LOCALE)
            .env("PS1", "$ ");
        let out = cmd::run(&mut cmd, SHORT)?;
        let found = parse_connect(&out.stdout).zip(parse_ip(&out.stdout));
        let Some(((port, key), ip)) = found.filter(|_| out.success()) else {
            bail!(
                "`forwarder mosh-server` failed ({}):\n  stdout: {}\n  stderr: {}",
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            );
        };
        let server = Self {
            pid: parse_pid(&out.stderr),
            port,
            key,
        };
        Ok((
            server,
            Wrapped {
                ip,
                stderr: out.stderr,
            },
        ))
    }
}

/// From `MOSH IP 10.0.0.1`.
fn parse_ip(stdout: &str) -> Option<IpAddr> {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("MOSH IP ")?.trim().parse().ok())
}

fn parse_connect(stdout: &str) -> Option<(u16, String)> {
    stdout.lines().find_map(|line| {
        let mut words = line
            .trim()
            .strip_prefix("MOSH CONNECT ")?
            .split_whitespace();
        let port = words.next()?.parse().ok()?;
        let key = words.next()?.to_owned();
        Some((port, key))
    })
}

/// From `[mosh-server detached, pid = 1234]`.
fn parse_pid(stderr: &str) -> Option<i32> {
    let rest = stderr.split("pid = ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Drop for MoshServer {
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        // Guard against pid reuse: only signal it if it is still a mosh-server.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("mosh-server") {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

/// mosh-client running in a detached tmux session inside the client namespace;
/// the tmux server (and with it mosh-client) is killed on drop.
#[derive(Debug)]
pub struct MoshClient {
    socket: String,
    dir: tempfile::TempDir,
}

const TMUX_CONF: &str = "\
set -g remain-on-exit on
set -g default-terminal screen
set -g history-limit 2000
set -g status off
";

impl MoshClient {
    /// Starts `mosh-client IP PORT` with `MOSH_KEY=key`.
    pub fn start(ns: &Netns, ip: impl Into<IpAddr>, port: u16, key: &str) -> Result<Self> {
        let ip = ip.into();
        // Keys are base64 without padding: safe inside the shell command tmux runs.
        if !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
        {
            bail!("unexpected characters in mosh key {key:?}");
        }
        Self::start_in_tmux(
            ns,
            &format!(
                "env MOSH_KEY={key} LANG={UTF8_LOCALE} LC_ALL={UTF8_LOCALE} mosh-client {ip} {port}"
            ),
        )
    }

    /// Runs `shell_cmd` (mosh-client, or the `mosh` wrapper) in a detached
    /// tmux session in `ns`.
    pub fn start_in_tmux(ns: &Netns, shell_cmd: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fwd-tmux-").tempdir()?;
        let conf = dir.path().join("tmux.conf");
        std::fs::write(&conf, TMUX_CONF)?;
        let client = Self {
            socket: format!("fwd-{}-{}", std::process::id(), random_tag()),
            dir,
        };
        let mut cmd = ns.exec("tmux");
        cmd.env("TMUX_TMPDIR", client.dir.path())
            .env_remove("TMUX")
            .args(["-L", &client.socket, "-f"])
            .arg(&conf)
            .args([
                "new-session",
                "-d",
                "-s",
                "mosh",
                "-x",
                "120",
                "-y",
                "40",
                shell_cmd,
            ]);
        cmd::run_ok(&mut cmd, SHORT).context("starting tmux with mosh-client")?;
        Ok(client)
    }

    /// tmux talks to its server over a Unix socket in a shared directory, so
    /// these commands need not enter the namespace.
    fn tmux(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.env("TMUX_TMPDIR", self.dir.path())
            .env_remove("TMUX")
            .args(["-L", &self.socket]);
        cmd
    }

    pub fn tmux_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Types `text` literally, then Enter.
    pub fn type_line(&self, text: &str) -> Result<()> {
        cmd::run_ok(
            self.tmux().args(["send-keys", "-t", "mosh", "-l", text]),
            SHORT,
        )?;
        cmd::run_ok(
            self.tmux().args(["send-keys", "-t", "mosh", "Enter"]),
            SHORT,
        )?;
        Ok(())
    }

    /// The visible screen of the pane.
    pub fn screen(&self) -> Result<String> {
        cmd::run_ok(
            self.tmux().args(["capture-pane", "-p", "-t", "mosh"]),
            SHORT,
        )
    }

    /// Polls the screen until a line contains `needle` (bounded by `timeout`).
    pub fn wait_for_screen(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen()?;
            if screen.lines().any(|line| line.contains(needle)) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{needle}` did not appear on mosh-client's screen within {timeout:?}; screen:\n{}",
                    screen.trim_end()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for MoshClient {
    fn drop(&mut self) {
        let _ = cmd::run(self.tmux().arg("kill-server"), SHORT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mosh_server_output() {
        let stdout = "\r\nMOSH CONNECT 60001 4NeCCgvZFe2RnPgrcU1PQw\r\n";
        assert_eq!(
            parse_connect(stdout),
            Some((60001, "4NeCCgvZFe2RnPgrcU1PQw".to_owned()))
        );
        let stderr = "\nmosh-server (mosh 1.4.0) [build mosh 1.4.0]\n\
                      [mosh-server detached, pid = 4242]\n";
        assert_eq!(parse_pid(stderr), Some(4242));
        assert_eq!(parse_connect("garbage"), None);
        assert_eq!(
            parse_ip("\r\nMOSH IP 10.1.2.3\r\n"),
            Some(std::net::Ipv4Addr::new(10, 1, 2, 3).into())
        );
    }
}
