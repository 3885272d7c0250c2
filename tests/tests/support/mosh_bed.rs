//! The `forwarder mosh` test bed: a client that reaches only the bastion,
//! real sshd on the bastion and the server, a non-root user in the socket
//! group. Shared by tests/forwarder_mosh.rs and examples/time_to_prompt.rs.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use forwarder_testbed::cmd;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::sshd::{SshUser, Sshd};
use forwarder_testbed::topology::{RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::users::{TestGroup, UserCli};
use forwarder_testbed::{MoshClient, Relay, Topology, prereq};

/// The port of a second sshd on the server, one whose sessions have a
/// PATH without mosh-server.
pub const NO_MOSH_SSH_PORT: u16 = 2222;
/// A port on the server where nothing listens.
pub const CLOSED_SSH_PORT: u16 = 2223;

/// The whole setup. Field order is drop order: the daemon first, the
/// namespaces (and every process left in them) before the users.
pub struct Bed {
    pub relay: Relay,
    pub _host_sshd: Sshd,
    pub _no_mosh_sshd: Sshd,
    pub _bastion_sshd: Sshd,
    pub topo: Topology,
    pub user: SshUser,
    /// In no group: the bastion's forwarder must refuse it.
    pub outsider: SshUser,
    pub group: TestGroup,
    /// forwarder where every user may run it: on the laptop and the bastion.
    pub cli: UserCli,
}

impl Bed {
    /// The daemon lets the socket group's members add sessions to `allow`.
    pub fn build(allow: &str) -> Result<Self> {
        Self::build_with(allow, &[])
    }

    /// [`Bed::build`] with more `forwarder run` flags.
    pub fn build_with(allow: &str, relay_args: &[&str]) -> Result<Self> {
        prereq::require()?;
        Self::build_on(Topology::client_relay_server()?, allow, relay_args)
    }

    /// [`Bed::build_with`] on a topology built elsewhere (dual stack, say).
    pub fn build_on(topo: Topology, allow: &str, relay_args: &[&str]) -> Result<Self> {
        prereq::require()?;
        let group = TestGroup::new()?;
        let user = SshUser::create(&[&group])?;
        let outsider = SshUser::create(&[])?;
        let cli = UserCli::new()?;
        // The client reaches the bastion and nothing behind it: no
        // forwarding through the relay namespace at all, only XDP's and
        // the daemon's own sockets.
        topo.relay.run(
            "nft",
            &[
                "add table inet only_the_bastion; \
                 add chain inet only_the_bastion forward { type filter hook forward priority 0; policy drop; }",
            ],
        )?;
        let bastion_sshd = Sshd::start(&topo.relay, RELAY_CLIENT_IP, 22)?;
        let host_sshd = Sshd::start(&topo.server, SERVER_IP, 22)?;
        let no_mosh_sshd = Sshd::start_with(
            &topo.server,
            SERVER_IP,
            NO_MOSH_SSH_PORT,
            "SetEnv PATH=/nonexistent",
        )?;
        for who in [&user, &outsider] {
            for sshd in [&bastion_sshd, &host_sshd, &no_mosh_sshd] {
                sshd.authorize(who.name(), &who.public_key()?)?;
            }
            who.trust(&[&bastion_sshd, &host_sshd, &no_mosh_sshd])?;
        }
        let mut args = vec!["--socket-group", group.name.as_str(), "--user-allow", allow];
        args.extend_from_slice(relay_args);
        let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &args)?;
        // Nothing but the bastion: the server is out of the client's reach.
        if topo.client.ping(&SERVER_IP.to_string()).is_ok() {
            bail!("the client namespace reaches the server directly: the topology is wrong");
        }
        Ok(Self {
            relay,
            _host_sshd: host_sshd,
            _no_mosh_sshd: no_mosh_sshd,
            _bastion_sshd: bastion_sshd,
            topo,
            user,
            outsider,
            group,
            cli,
        })
    }

    /// `forwarder mosh` with the bastion's forwarder and instance named,
    /// as words for a shell (the tests' words need no quoting but --ssh's).
    pub fn mosh_words(&self, rest: &str) -> Result<String> {
        let bin = self.cli.bin();
        let relay_command = if rest.contains("--relay-command") {
            String::new()
        } else {
            format!("--relay-command {} ", bin.display())
        };
        Ok(format!(
            "env LANG=C.UTF-8 LC_ALL=C.UTF-8 {bin} mosh {relay_command}--relay-instance {instance} {rest}",
            bin = bin.display(),
            instance = self.relay.instance()
        ))
    }

    /// `forwarder mosh REST` as `who` in the client namespace, under tmux.
    pub fn start_mosh(&self, who: &SshUser, rest: &str) -> Result<MoshClient> {
        MoshClient::start_in_tmux(&self.topo.client, &who.shell_line(&self.mosh_words(rest)?))
    }

    /// `forwarder mosh --via BASTION HOST` as the user: once its shell
    /// answers a typed line (marked `label`), the pane and mosh-client's
    /// arguments.
    pub fn shell_via_the_bastion(&self, label: &str) -> Result<(MoshClient, Vec<String>)> {
        let client =
            self.start_mosh(&self.user, &format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))?;
        wait_for_shell(&client)?;
        roundtrip(&client, label)?;
        let arguments = key_only_in_the_environment(&self.user)?;
        Ok((client, arguments))
    }

    /// `forwarder mosh REST` as `who`, without a terminal, to its end.
    pub fn run_mosh(&self, who: &SshUser, rest: &str) -> Result<cmd::Output> {
        let mut command = who.command(&self.topo.client, "sh");
        command.args(["-c", &self.mosh_words(rest)?]);
        cmd::run(&mut command, Duration::from_secs(60))
    }
}

/// Waits until the bastion has no session left: mosh-client's exit removed it.
pub fn wait_removed(relay: &Relay) -> Result<()> {
    relay.wait_until(
        "the session to be removed after mosh-client exited",
        Duration::from_secs(20),
        |sessions| sessions.is_empty().then_some(()),
    )
}

/// The processes of `user` (tests run side by side, each with its own user).
pub fn processes_of(user: &SshUser) -> Result<Vec<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let dir = entry?.path();
        if std::fs::metadata(&dir).is_ok_and(|meta| meta.uid() == user.user.uid) {
            found.push(dir);
        }
    }
    Ok(found)
}

/// The session's key is in the environment of `user`'s mosh-client and on
/// no command line of anyone's; returns mosh-client's arguments.
pub fn key_only_in_the_environment(user: &SshUser) -> Result<Vec<String>> {
    let mut key = None;
    let mut client = Vec::new();
    for dir in processes_of(user)? {
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        // NUL-terminated words.
        let words: Vec<String> = cmdline
            .strip_suffix(&[0])
            .unwrap_or(&cmdline)
            .split(|&b| b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        if words.first().is_some_and(|w| w.ends_with("mosh-client"))
            && words.iter().any(|w| w == &RELAY_CLIENT_IP.to_string())
        {
            let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
            key = environ
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"MOSH_KEY="))
                .map(|k| String::from_utf8_lossy(k).into_owned());
            client = words;
        }
    }
    let key = key.context("no mosh-client to the bastion with MOSH_KEY in its environment")?;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(cmdline) = std::fs::read(entry?.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if line.contains(&key) {
            bail!("the session key is on a command line: {line}");
        }
    }
    Ok(client)
}

/// No ssh master connection outlives the set-up: forwarder mosh closes it
/// before mosh-client starts.
pub fn no_ssh_master_left(user: &SshUser) -> Result<()> {
    for dir in processes_of(user)? {
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if line.contains(" -M ") && line.contains("ControlPersist=no") {
            bail!("an ssh master is still running: {line}");
        }
    }
    Ok(())
}
