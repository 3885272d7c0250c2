//! `forwarder mosh --via bastion host` end to end, as a user who is not
//! root anywhere: real sshd in the bastion (relay) and the server
//! namespaces, the client namespace able to reach only the bastion, the
//! bastion's forwarder taking the session from the user through its socket
//! group, and the stock mosh-server and mosh-client at the two ends.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::cmd::{self, SHORT};
use forwarder_testbed::scenario::{MOSH_CONNECT_TIMEOUT, roundtrip, wait_for_shell};
use forwarder_testbed::sshd::{SshUser, Sshd};
use forwarder_testbed::topology::{CLIENT_ROAM_IP, RELAY_CLIENT_IP, RELAY_SERVER_IP, SERVER_IP};
use forwarder_testbed::users::{TestGroup, UserCli};
use forwarder_testbed::{MoshClient, Relay, Topology, prereq};

/// The port of a second sshd on the server, one whose sessions have a
/// PATH without mosh-server.
const NO_MOSH_SSH_PORT: u16 = 2222;
/// A port on the server where nothing listens.
const CLOSED_SSH_PORT: u16 = 2223;

/// The whole setup. Field order is drop order: the daemon first, the
/// namespaces (and every process left in them) before the users.
struct Bed {
    relay: Relay,
    _host_sshd: Sshd,
    _no_mosh_sshd: Sshd,
    _bastion_sshd: Sshd,
    topo: Topology,
    user: SshUser,
    /// In no group: the bastion's forwarder must refuse it.
    outsider: SshUser,
    group: TestGroup,
    /// forwarder where every user may run it: on the laptop and the bastion.
    cli: UserCli,
}

impl Bed {
    /// The daemon lets the socket group's members add sessions to `allow`.
    fn build(allow: &str) -> Result<Self> {
        Self::build_with(allow, &[])
    }

    /// [`Bed::build`] with more `forwarder run` flags.
    fn build_with(allow: &str, relay_args: &[&str]) -> Result<Self> {
        prereq::require()?;
        let group = TestGroup::new()?;
        let user = SshUser::create(&[&group])?;
        let outsider = SshUser::create(&[])?;
        let cli = UserCli::new()?;
        let topo = Topology::client_relay_server()?;
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
    fn mosh_words(&self, rest: &str) -> Result<String> {
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
    fn start_mosh(&self, who: &SshUser, rest: &str) -> Result<MoshClient> {
        MoshClient::start_in_tmux(&self.topo.client, &who.shell_line(&self.mosh_words(rest)?))
    }

    /// `forwarder mosh --via BASTION HOST` as the user: once its shell
    /// answers a typed line (marked `label`), the pane and mosh-client's
    /// arguments.
    fn shell_via_the_bastion(&self, label: &str) -> Result<(MoshClient, Vec<String>)> {
        let client =
            self.start_mosh(&self.user, &format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))?;
        wait_for_shell(&client)?;
        roundtrip(&client, label)?;
        let arguments = key_only_in_the_environment(&self.user)?;
        Ok((client, arguments))
    }

    /// `forwarder mosh REST` as `who`, without a terminal, to its end.
    fn run_mosh(&self, who: &SshUser, rest: &str) -> Result<cmd::Output> {
        let mut command = who.command(&self.topo.client, "sh");
        command.args(["-c", &self.mosh_words(rest)?]);
        cmd::run(&mut command, Duration::from_secs(60))
    }
}

/// The processes of `user` (tests run side by side, each with its own user).
fn processes_of(user: &SshUser) -> Result<Vec<std::path::PathBuf>> {
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
fn key_only_in_the_environment(user: &SshUser) -> Result<Vec<String>> {
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
fn no_ssh_master_left(user: &SshUser) -> Result<()> {
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

/// Waits until the bastion has no session left: mosh-client's exit removed it.
fn wait_removed(relay: &Relay) -> Result<()> {
    relay.wait_until(
        "the session to be removed after mosh-client exited",
        Duration::from_secs(20),
        |sessions| sessions.is_empty().then_some(()),
    )
}

#[test]
fn forwarder_mosh_via_the_bastion_gives_a_shell_that_roams_and_is_the_users() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    let (client, mosh_client) = bed.shell_via_the_bastion("typed").unwrap();
    no_ssh_master_left(&bed.user).unwrap();

    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = &sessions[0];
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), session.port.to_string()],
        "mosh-client goes to the bastion's address and the session's port"
    );
    assert!(session.has_key, "the key went to the bastion: {session:?}");
    assert_eq!(session.owner.name, bed.user.name(), "{session:?}");
    assert_ne!(session.owner.uid, 0, "{session:?}");
    assert!(
        session.backend.starts_with(&format!("{SERVER_IP}:")),
        "the backend is the server as the bastion reaches it: {session:?}"
    );
    assert_eq!(
        session.idle_timeout_secs,
        3 * 24 * 3600,
        "forwarder mosh's default idle timeout: {session:?}"
    );

    // The laptop changes networks: mosh-client's packets come from a new
    // address, the relay makes a new flow, mosh-server follows it.
    bed.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    bed.relay
        .wait_until(
            "a flow from the new address that the server answers",
            SHORT,
            |sessions| {
                sessions
                    .iter()
                    .flat_map(|s| &s.flows)
                    .any(|f| {
                        f.client.starts_with(&format!("{CLIENT_ROAM_IP}:")) && f.server_current
                    })
                    .then_some(())
            },
        )
        .unwrap();

    // The shell ends, mosh-server and mosh-client with it, and the
    // session goes from the bastion.
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_through_ssh_config_aliases() {
    let bed = Bed::build("10.77.2.0/24").unwrap();
    // -F replaces ~/.ssh/config; ssh hands it to the ProxyJump hop too.
    let config = bed
        .user
        .write_file(
            "aliases",
            &format!(
                "Host jump\n    HostName {RELAY_CLIENT_IP}\nHost box\n    HostName {SERVER_IP}\n"
            ),
        )
        .unwrap();
    let client = bed
        .start_mosh(
            &bed.user,
            &format!("--ssh 'ssh -F {}' --via jump box", config.display()),
        )
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "aliased").unwrap();
    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].owner.name, bed.user.name(), "{sessions:?}");
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_uses_the_bastions_shared_port() {
    const SHARED_PORT: u16 = 4443;
    let shared = SHARED_PORT.to_string();
    let bed = Bed::build_with(&format!("{SERVER_IP}/32"), &["--shared-port", &shared]).unwrap();
    let (client, mosh_client) = bed.shell_via_the_bastion("shared").unwrap();
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), shared],
        "mosh-client goes to the shared port"
    );
    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].shared_port, Some(SHARED_PORT), "{sessions:?}");
    assert!(
        sessions[0]
            .flows
            .iter()
            .any(|f| f.server_current && f.relay_port == Some(SHARED_PORT)),
        "the server answers a flow that came in on the shared port: {sessions:?}"
    );
    bed.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_without_via_is_plain_mosh() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    // The bastion's own sshd as the host: the one host the client reaches
    // directly. mosh-server's port lies outside the relay's ranges.
    let client = bed
        .start_mosh(&bed.user, &format!("-p 62001 {RELAY_CLIENT_IP}"))
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "direct").unwrap();
    let mosh_client = key_only_in_the_environment(&bed.user).unwrap();
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), "62001".to_string()],
        "mosh-client goes to mosh-server itself, on the port -p asked for"
    );
    assert!(bed.relay.sessions().unwrap().is_empty());
    client.type_line("exit").unwrap();
}

/// Runs `forwarder mosh REST` as `who`; it must fail and say `says`.
fn fails_saying(bed: &Bed, who: &SshUser, rest: &str, says: &[&str]) {
    let out = bed.run_mosh(who, rest).unwrap();
    assert!(
        !out.success(),
        "`forwarder mosh {rest}` succeeded:\n{}{}",
        out.stdout,
        out.stderr
    );
    for needle in says {
        assert!(
            out.stderr.contains(needle),
            "`forwarder mosh {rest}` did not say {needle:?}:\n{}",
            out.stderr
        );
    }
    eprintln!("forwarder mosh {rest}\n  -> {}", out.stderr.trim());
}

#[test]
fn forwarder_mosh_names_the_step_that_failed_and_the_fix() {
    // Users may add sessions only towards a network the server is not in.
    let bed = Bed::build("10.77.9.0/24").unwrap();
    let via = format!("--via {RELAY_CLIENT_IP}");
    // The relay's other address: it answers, but no sshd listens there.
    fails_saying(
        &bed,
        &bed.user,
        &format!("--via {RELAY_SERVER_IP} {SERVER_IP}"),
        &[
            &format!("ssh to the bastion {RELAY_SERVER_IP} failed"),
            "Connection refused",
            "fix: make `ssh",
        ],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("--ssh 'ssh -p {CLOSED_SSH_PORT}' {via} {SERVER_IP}"),
        &[&format!(
            "ssh to the host {SERVER_IP} through the bastion {RELAY_CLIENT_IP} failed"
        )],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("--ssh 'ssh -p {NO_MOSH_SSH_PORT}' {via} {SERVER_IP}"),
        &[
            &format!("no mosh-server on the host {SERVER_IP}"),
            "--server PATH",
        ],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("{via} --relay-command /nonexistent/forwarder {SERVER_IP}"),
        &["no forwarder on the bastion", "--relay-command PATH"],
    );
    fails_saying(
        &bed,
        &bed.outsider,
        &format!("{via} {SERVER_IP}"),
        &[
            "forwarder on the bastion",
            "refused your user there",
            &bed.group.name,
        ],
    );
    // The backend policy: the daemon's own words come through.
    fails_saying(
        &bed,
        &bed.user,
        &format!("{via} {SERVER_IP}"),
        &[
            &format!("the bastion {RELAY_CLIENT_IP} refused the session"),
            "exits by itself within a minute",
        ],
    );
    assert!(bed.relay.sessions().unwrap().is_empty());
}

#[test]
fn forwarder_mosh_says_when_udp_never_reached_the_bastion() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    // ssh (TCP) gets through, UDP from the laptop does not.
    bed.topo
        .client
        .run(
            "nft",
            &[&format!(
                "add table inet no_udp; \
                 add chain inet no_udp out {{ type filter hook output priority 0; policy accept; }}; \
                 add rule inet no_udp out ip daddr {RELAY_CLIENT_IP} udp dport 60000-60999 drop"
            )],
        )
        .unwrap();
    let client = bed
        .start_mosh(&bed.user, &format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))
        .unwrap();
    // mosh-client gives up by itself when the server never answered.
    client
        .wait_for_screen("no answer over UDP", Duration::from_secs(90))
        .unwrap();
    let screen = client.screen().unwrap();
    eprintln!("{}", screen.trim());
    assert!(
        screen.contains("received nothing from this machine on UDP port"),
        "{screen}"
    );
    wait_removed(&bed.relay).unwrap();
}

/// Time from the command to the prompt: `forwarder mosh --via` next to
/// `ssh -J`, same topology, same user, same keys. A measurement, not a
/// test: `cargo test ... --test forwarder_mosh -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement for docs/BENCHMARKS.md, not a check"]
fn time_to_prompt() {
    const RUNS: usize = 5;
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    let ssh_line = bed.user.shell_line(&format!(
        "env LANG=C.UTF-8 LC_ALL=C.UTF-8 ssh -tt -J {RELAY_CLIENT_IP} {SERVER_IP}"
    ));
    // Each step's time goes to a log the user may write.
    let steps = bed.user.write_file("steps.log", "").unwrap();
    let mosh_line = bed.user.shell_line(&format!(
        "env RUST_LOG=forwarder::connect=debug {} 2>>{}",
        bed.mosh_words(&format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))
            .unwrap(),
        steps.display()
    ));
    let mut ssh_times = Vec::new();
    let mut mosh_times = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let ssh = MoshClient::start_in_tmux(&bed.topo.client, &ssh_line).unwrap();
        ssh_times.push(until_prompt(&ssh, started).unwrap());
        drop(ssh);

        let started = Instant::now();
        let mosh = MoshClient::start_in_tmux(&bed.topo.client, &mosh_line).unwrap();
        mosh_times.push(until_prompt(&mosh, started).unwrap());
        mosh.type_line("exit").unwrap();
        wait_removed(&bed.relay).unwrap();
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let log = std::fs::read_to_string(&steps).unwrap();
    for step in ["resolve", "bastion login", "mosh-server", "session"] {
        let mut times: Vec<u64> = log
            .lines()
            .filter(|line| line.contains(&format!("step=\"{step}\"")))
            .filter_map(|line| {
                line.split("elapsed_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        times.sort_unstable();
        eprintln!("forwarder mosh, {step:<13} done after (ms, each run): {times:?}");
    }
    eprintln!(
        "time to prompt over {RUNS} runs (median; all):\n  ssh -J bastion host:              {:?}; {ssh_times:?}\n  forwarder mosh --via bastion host: {:?}; {mosh_times:?}",
        median(&mut ssh_times.clone()),
        median(&mut mosh_times.clone()),
    );
}

/// Polls the pane every 10 ms until the shell's prompt shows.
fn until_prompt(pane: &MoshClient, started: Instant) -> Result<Duration> {
    let deadline = started + MOSH_CONNECT_TIMEOUT;
    while Instant::now() < deadline {
        if pane.screen()?.lines().any(|line| line.starts_with('$')) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "no prompt within {MOSH_CONNECT_TIMEOUT:?}; screen:\n{}",
        pane.screen()?
    )
}
