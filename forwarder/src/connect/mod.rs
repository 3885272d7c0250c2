//! `forwarder mosh`: one command on the laptop for a mosh session through
//! a forwarder bastion. It needs no BPF, no root and no daemon here: it
//! drives the user's own `ssh` and execs nothing but the stock
//! `mosh-client`.
//!
//! 1. ssh to the host (with `--via`, through one master login to the
//!    bastion that step 2 shares, as a ProxyJump would) runs the stock
//!    mosh-server there; the host reports `SSH_CONNECTION`,
//!    whose local half is the host's address as the bastion reaches it,
//!    and mosh-server prints `MOSH CONNECT port key`.
//! 2. ssh to the bastion runs `forwarder add --backend ADDR:PORT
//!    --key-file - --json` there as the user, who thereby owns the
//!    session; the key goes over the channel's stdin.
//! 3. mosh-client connects to the bastion's address (ssh's host name for
//!    it, `ssh -G`) and the session's port (the bastion's shared port when
//!    it has one), `MOSH_KEY` in its environment.
//! 4. When mosh-client exits, ssh to the bastion removes the session; if
//!    this machine never comes back, the session's idle timeout does.
//!
//! Without `--via` it is the stock `mosh`: ssh, mosh-server, mosh-client
//! to the host itself.
//!
//! This room uses nothing of the daemon's: only `forwarder_api`'s types
//! for the documents the bastion's `forwarder` prints.

mod bridge;
mod failure;
mod remote;
mod ssh;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use failure::Failure;
use forwarder_api::SessionInfo;
use remote::{HostReport, RelayAnswer};
use ssh::Ssh;

pub const LONG_HELP: &str = "\
Start a mosh session through a forwarder bastion in one command, like `mosh`:

  forwarder mosh --via bastion host

It logs in to BASTION once (an ssh master connection), ssh'es through it to
HOST (as ssh -J would) and starts the stock mosh-server there, runs `forwarder
add` on BASTION as your user over the same login, and runs mosh-client to the
bastion's address and the session's port (the bastion's shared port, when it
has one). The session key goes to the bastion over the ssh channel and to
mosh-client in its environment, never on a command line. When mosh-client
exits the session is removed; if this machine never comes back, the session
expires after --relay-idle-timeout without traffic.

Everything goes through your ssh (--ssh, default `ssh`), so your ssh config,
agent, keys and host aliases apply. As with `ssh -J`, the options of --ssh
apply to HOST; the bastion's connections take only its program and -F, so
settings for the bastion belong in your ssh config. On the bastion you need
forwarder, membership of its control socket's group (`forwarder` unless
configured) and a backend rule that allows HOST; on HOST, mosh-server.

The bastion's addresses of both families (ssh -G's host name, resolved;
or --relay-addr) are all used: mosh-client then talks to a local bridge,
which sends to the first and moves to the next when one stops answering,
so a laptop that roams from an IPv4-only network to an IPv6-only one (or
back) keeps its session, which mosh alone cannot do. The bastion relays
to the host in the host's own family, translating when they differ.

Each failure names its step (ssh to the bastion, ssh to the host, mosh-server,
the bastion's forwarder, its socket, quota or policy, UDP) and the fix.

Without --via it does what `mosh` does, directly to HOST.";

/// How long a session this command creates lives on the bastion without
/// traffic, when mosh-client cannot remove it (the laptop never came
/// back): long enough for a closed laptop over a weekend, short enough
/// that a forgotten session does not hold a user's quota for a week.
pub const DEFAULT_RELAY_IDLE_TIMEOUT: &str = "3d";

/// mosh's local echo modes (`mosh --predict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Predict {
    Adaptive,
    Always,
    Never,
    Experimental,
}

impl Predict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Adaptive => "adaptive",
            Self::Always => "always",
            Self::Never => "never",
            Self::Experimental => "experimental",
        }
    }
}

#[derive(Args, Debug)]
pub struct MoshArgs {
    /// The forwarder bastion to relay through, [USER@]HOST as ssh takes it (a name from your ssh
    /// config works). Without it, mosh-client connects to HOST directly, as `mosh` does.
    #[arg(long, value_name = "[USER@]BASTION")]
    pub via: Option<String>,
    /// The ssh command, split like a shell would (like mosh's --ssh), e.g. 'ssh -p 2222'; its options
    /// apply to HOST, only its program and -F to the bastion (as with ssh -J).
    #[arg(long, value_name = "COMMAND", default_value = "ssh")]
    pub ssh: String,
    /// The forwarder command on the bastion (like mosh's --server), e.g. '/usr/local/bin/forwarder'.
    #[arg(long, value_name = "CMD", default_value = "forwarder")]
    pub relay_command: String,
    /// The bastion's forwarder instance (its --instance) [default: the bastion's default].
    #[arg(long, value_name = "NAME")]
    pub relay_instance: Option<String>,
    /// Remove the session on the bastion after this long without traffic.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_RELAY_IDLE_TIMEOUT,
          value_parser = humantime::parse_duration)]
    pub relay_idle_timeout: Duration,
    /// Connect to the session's own port even when the bastion has a shared port (its --shared-port),
    /// which is otherwise used: the one port its operator opened for every session.
    #[arg(long)]
    pub no_shared_port: bool,
    /// Carry mosh over TCP to the bastion's TCP port (its --tcp-port) from the start, for networks
    /// that block UDP; moves to UDP if UDP answers later. Without it, a bastion with a TCP port is
    /// used when UDP gives no answer for 5 s (announced on stderr).
    #[arg(long, conflicts_with = "no_tcp")]
    pub tcp: bool,
    /// Never use the bastion's TCP port (UDP only; the local bridge still moves between the
    /// bastion's address families, when it has both).
    #[arg(long)]
    pub no_tcp: bool,
    /// mosh-client talks to the bastion's first address itself: no local bridge, so neither TCP
    /// nor a move to the other address family when that one stops answering.
    #[arg(long, conflicts_with = "tcp")]
    pub direct: bool,
    /// The bastion's address for mosh's UDP (and TCP), instead of ssh's host name for it resolved;
    /// repeat it for each family (e.g. --relay-addr 203.0.113.1 --relay-addr 2001:db8::1).
    #[arg(long, value_name = "IP")]
    pub relay_addr: Vec<IpAddr>,
    /// Dial this address instead of the bastion's TCP port, e.g. the local end of
    /// `ssh -L 4443:localhost:443 bastion` for networks where only ssh gets out.
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp_connect: Option<std::net::SocketAddr>,
    /// mosh-client on this machine.
    #[arg(long, value_name = "PATH", default_value = "mosh-client")]
    pub client: String,
    /// mosh-server on the host (a command, like mosh's --server).
    #[arg(long, value_name = "COMMAND", default_value = "mosh-server")]
    pub server: String,
    /// Local echo: adaptive (mosh's default), always, never or experimental
    /// [default: $MOSH_PREDICTION_DISPLAY, else adaptive].
    #[arg(long, value_enum, value_name = "MODE")]
    pub predict: Option<Predict>,
    /// --predict=always.
    #[arg(short = 'a', conflicts_with_all = ["predict", "never"])]
    pub always: bool,
    /// --predict=never.
    #[arg(short = 'n', conflicts_with = "predict")]
    pub never: bool,
    /// Prediction overwrites instead of inserting.
    #[arg(short = 'o', long)]
    pub predict_overwrite: bool,
    /// mosh-server's UDP port or range on the host, PORT[:PORT2] (no effect on ssh's port).
    #[arg(short = 'p', long, value_name = "PORT[:PORT2]")]
    pub port: Option<String>,
    /// Which address mosh-server answers from: ssh (the one ssh reached, mosh's default), any, or an IP.
    #[arg(long, value_name = "ssh|any|IP", default_value = "ssh")]
    pub bind_server: String,
    /// Do not allocate a pseudo terminal for the ssh connection that starts mosh-server.
    #[arg(long)]
    pub no_ssh_pty: bool,
    /// Do not send the terminal initialization string.
    #[arg(long)]
    pub no_init: bool,
    /// IPv4 only: ssh and mosh (passed to ssh as -4).
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 only: ssh and mosh (passed to ssh as -6).
    #[arg(short = '6')]
    pub ipv6: bool,
    /// The host to run mosh-server on, [USER@]HOST as ssh takes it.
    #[arg(value_name = "[USER@]HOST")]
    pub host: String,
    /// The command to run there instead of your login shell.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

impl MoshArgs {
    fn predict(&self) -> anyhow::Result<&'static str> {
        if self.always {
            return Ok(Predict::Always.as_str());
        }
        if self.never {
            return Ok(Predict::Never.as_str());
        }
        if let Some(mode) = self.predict {
            return Ok(mode.as_str());
        }
        match std::env::var("MOSH_PREDICTION_DISPLAY") {
            Ok(mode) => Predict::from_str(&mode, false)
                .map(Predict::as_str)
                .map_err(|_| anyhow::anyhow!(
                    "unknown prediction mode {mode:?} in MOSH_PREDICTION_DISPLAY: use adaptive, always, never or experimental"
                )),
            Err(_) => Ok(Predict::Adaptive.as_str()),
        }
    }
}

/// mosh's port request: `PORT` or `LOW:HIGH`, as mosh checks it.
fn check_port_request(request: &str) -> anyhow::Result<()> {
    let bad = || {
        anyhow::anyhow!(
            "--port {request:?} is not a port or range: give PORT or LOW:HIGH (1-65535, low <= high), e.g. 60001:60010"
        )
    };
    let parse = |text: &str| text.parse::<u16>().map_err(|_| bad());
    match request.split_once(':') {
        None => {
            parse(request)?;
        }
        Some((low, high)) => {
            let (low, high) = (parse(low)?, parse(high)?);
            if low == 0 || high == 0 || low > high {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// The locale variables mosh hands to mosh-server (`-l NAME=VALUE`).
const LOCALE_VARIABLES: &[&str] = &[
    "LANG",
    "LANGUAGE",
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "LC_COLLATE",
    "LC_MONETARY",
    "LC_MESSAGES",
    "LC_PAPER",
    "LC_NAME",
    "LC_ADDRESS",
    "LC_TELEPHONE",
    "LC_MEASUREMENT",
    "LC_IDENTIFICATION",
    "LC_ALL",
];

/// mosh-server's arguments, as the stock mosh wrapper builds them.
fn server_args(args: &MoshArgs, colors: u32, locale: &[(String, String)]) -> Vec<String> {
    let mut out = vec!["new".to_string(), "-c".to_string(), colors.to_string()];
    match args.bind_server.as_str() {
        bind if bind.eq_ignore_ascii_case("ssh") => out.push("-s".into()),
        bind if bind.eq_ignore_ascii_case("any") => {}
        ip => out.extend(["-i".to_string(), ip.to_string()]),
    }
    if let Some(port) = &args.port {
        out.extend(["-p".to_string(), port.clone()]);
    }
    for (name, value) in locale {
        out.extend(["-l".to_string(), format!("{name}={value}")]);
    }
    if !args.command.is_empty() {
        out.push("--".into());
        out.extend(args.command.iter().cloned());
    }
    out
}

fn locale_from_environment() -> Vec<(String, String)> {
    LOCALE_VARIABLES
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect()
}

/// mosh-client's colour count for this terminal (`mosh-client -c`), which
/// mosh-server needs up front; 0 when it cannot tell, as mosh does.
fn count_colors(client: &str) -> Result<u32, Failure> {
    let output =
        Command::new(client)
            .arg("-c")
            .output()
            .map_err(|error| Failure::NoLocalClient {
                client: client.to_string(),
                detail: error.to_string(),
            })?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// mosh-server running on the host.
#[derive(Debug)]
struct Started {
    /// The host's address of the ssh connection (as the bastion reaches it, with --via).
    ssh_local_addr: Option<String>,
    port: u16,
    key: String,
}

/// The whole run, once the command line is checked.
struct Plan<'a> {
    args: &'a MoshArgs,
    /// For the host (step 1, and everything without --via).
    ssh: Ssh,
    /// For the bastion's own connections: `forwarder add` and `remove`.
    bastion_ssh: Ssh,
    /// `-4` for every ssh, when asked.
    family: Vec<&'static str>,
}

impl Plan<'_> {
    /// Step: ssh to the host (through the bastion) and start mosh-server.
    fn start_server(&self, master: Option<&ssh::Master>) -> Result<Started, Failure> {
        let args = self.args;
        let colors = count_colors(&args.client)?;
        let remote = remote::host_command(
            &args.server,
            &server_args(args, colors, &locale_from_environment()),
        );
        let mut options = vec!["-n"];
        options.push(if args.no_ssh_pty { "-T" } else { "-tt" });
        options.extend(&self.family);
        let proxy = master.map(ssh::Master::proxy_command);
        if let Some(proxy) = &proxy {
            options.extend(["-o", proxy.as_str()]);
        }
        let mut report = HostReport::default();
        let finished = self
            .ssh
            .run_until(&options, &args.host, &remote, |line| report.take_line(line))
            .map_err(|error| self.host_failure(format!("{error:#}")))?;
        if let Some((port, key)) = report.connect {
            return Ok(Started {
                ssh_local_addr: report.ssh_local_addr,
                port,
                key,
            });
        }
        // What the host's side printed, then ssh's own words.
        let said = |lines: &[String]| {
            let mut all: Vec<String> = lines.to_vec();
            if !finished.stderr.trim().is_empty() || all.is_empty() {
                all.push(finished.complaint());
            }
            all.join("; ")
        };
        Err(match finished.code() {
            Some(ssh::SSH_FAILED) => self.host_failure(said(&report.other_lines)),
            Some(ssh::NOT_FOUND) => Failure::NoMoshServer {
                host: args.host.clone(),
                server: args.server.clone(),
                detail: said(&report.other_lines),
            },
            _ => Failure::MoshServerFailed {
                host: args.host.clone(),
                detail: said(&report.other_lines),
            },
        })
    }

    fn host_failure(&self, detail: String) -> Failure {
        Failure::SshHost {
            host: self.args.host.clone(),
            via: self.args.via.clone(),
            detail,
        }
    }

    /// Step: log in to the bastion once for the set-up.
    fn open_master(&self, bastion: &str) -> Result<ssh::Master, Failure> {
        ssh::Master::open(&self.bastion_ssh, bastion, &self.family).map_err(|detail| {
            Failure::SshBastion {
                bastion: bastion.to_string(),
                detail,
            }
        })
    }

    /// Runs a `forwarder` verb on the bastion with `--json` and reads its session.
    fn relay_verb(
        &self,
        ssh: &Ssh,
        bastion: &str,
        verb: &[String],
        stdin: Option<&str>,
        batch: bool,
    ) -> Result<SessionInfo, Failure> {
        let args = self.args;
        let remote =
            remote::relay_command(&args.relay_command, args.relay_instance.as_deref(), verb);
        let mut options = vec!["-T"];
        if stdin.is_none() {
            options.push("-n");
        }
        if batch {
            options.extend(["-o", "BatchMode=yes"]);
        }
        options.extend(&self.family);
        let finished = ssh
            .run(&options, bastion, &remote, stdin)
            .map_err(|error| Failure::SshBastion {
                bastion: bastion.to_string(),
                detail: format!("{error:#}"),
            })?;
        let relay = || (bastion.to_string(), args.relay_command.clone());
        match finished.code() {
            Some(ssh::SSH_FAILED) => {
                return Err(Failure::SshBastion {
                    bastion: bastion.to_string(),
                    detail: finished.complaint(),
                });
            }
            Some(ssh::NOT_FOUND) => {
                let (bastion, command) = relay();
                return Err(Failure::NoRelay {
                    bastion,
                    command,
                    detail: finished.complaint(),
                });
            }
            _ => {}
        }
        match remote::relay_answer(&finished.stdout, &finished.stderr) {
            RelayAnswer::Session(session) => Ok(session),
            RelayAnswer::Refused(error) => Err(Failure::from_relay_error(
                bastion,
                args.relay_instance.as_deref(),
                error,
            )),
            RelayAnswer::Unreadable(detail) => {
                let (bastion, command) = relay();
                Err(Failure::RelayUnreadable {
                    bastion,
                    command,
                    detail,
                })
            }
        }
    }

    /// Step: create the session on the bastion, owned by the user ssh logs in as.
    fn add_session(
        &self,
        master: &ssh::Master,
        bastion: &str,
        backend: &str,
        key: &str,
    ) -> Result<SessionInfo, Failure> {
        let idle = format!("{}s", self.args.relay_idle_timeout.as_secs().max(1));
        let verb: Vec<String> = [
            "add",
            "--backend",
            backend,
            "--idle-timeout",
            &idle,
            "--key-file",
            "-",
            "--json",
        ]
        .map(String::from)
        .to_vec();
        // The key goes over the ssh channel, never on a command line. With
        // it the session may use the bastion's shared port, where a new
        // client endpoint is admitted only when its datagram verifies.
        let stdin = format!("{key}\n");
        self.relay_verb(master.ssh(), bastion, &verb, Some(&stdin), false)
    }

    /// Removes the session; what it carried at the end tells whether UDP
    /// ever got through.
    fn remove_session(&self, bastion: &str, id: &str) -> Result<SessionInfo, Failure> {
        let verb: Vec<String> = ["remove", id, "--json"].map(String::from).to_vec();
        // The terminal may be gone (a closed window): no prompts then.
        let batch = !std::io::stdin().is_terminal();
        self.relay_verb(&self.bastion_ssh, bastion, &verb, None, batch)
    }
}

/// Step: mosh-client to `ip:port`; waits for it and returns how it ended.
/// mosh-client takes an IPv6 address as it is, without brackets.
fn run_client(args: &MoshArgs, ip: IpAddr, port: u16, key: &str) -> anyhow::Result<ExitStatus> {
    let mut command = Command::new(&args.client);
    command
        .arg(ip.to_string())
        .arg(port.to_string())
        // The key goes in the environment only: a command line is
        // readable by every user of this machine (`ps`).
        .env("MOSH_KEY", key)
        .env("MOSH_PREDICTION_DISPLAY", args.predict()?);
    if args.predict_overwrite {
        command.env("MOSH_PREDICTION_OVERWRITE", "yes");
    }
    if args.no_init {
        command.env("MOSH_NO_TERM_INIT", "1");
    }
    let mut child = command.spawn().map_err(|error| Failure::NoLocalClient {
        client: args.client.clone(),
        detail: error.to_string(),
    })?;
    // mosh-client owns the terminal now. A closed window (SIGHUP) or a
    // stray ^C/^\ must not end this process before it removed the session.
    // Set after the spawn, so mosh-client keeps the default dispositions.
    ignore_terminal_signals();
    child.wait().context("waiting for mosh-client")
}

fn ignore_terminal_signals() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for which in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code, so nothing can run in
        // signal context; the previous disposition is not needed.
        let _ = unsafe { signal(which, SigHandler::SigIgn) };
    }
}

/// What the session's flows say when it is removed: a diagnosis when UDP
/// never got through, else nothing.
fn udp_diagnosis(session: &SessionInfo, port: u16, bastion: &str, host: &str) -> Option<Failure> {
    if session.flows.is_empty() {
        return Some(Failure::NoUdpToBastion {
            bastion: bastion.to_string(),
            port,
        });
    }
    let answered = session
        .flows
        .iter()
        .any(|flow| flow.answered || flow.packets_to_client > 0);
    (!answered).then(|| Failure::NoUdpFromServer {
        bastion: bastion.to_string(),
        host: host.to_string(),
        backend: session.backend.clone(),
    })
}

pub fn main(args: MoshArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Where the time to the prompt goes (RUST_LOG=forwarder::connect=debug).
    let step_done = |step: &str| {
        tracing::debug!(
            step,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "step done"
        );
    };
    ssh::check_destination("the host", &args.host)?;
    if let Some(bastion) = &args.via {
        ssh::check_destination("--via", bastion)?;
    }
    if let Some(port) = &args.port {
        check_port_request(port)?;
    }
    args.predict()?;
    if (args.tcp || args.tcp_connect.is_some()) && args.via.is_none() {
        bail!("--tcp and --tcp-connect need a forwarder bastion: give --via BASTION");
    }
    if !args.relay_addr.is_empty() && args.via.is_none() {
        bail!("--relay-addr names the bastion's addresses: give --via BASTION too");
    }
    let family = match (args.ipv4, args.ipv6) {
        (true, _) => ssh::Family::V4,
        (_, true) => ssh::Family::V6,
        _ => ssh::Family::Any,
    };
    if let Some(wrong) = args.relay_addr.iter().find(|ip| !family.admits(**ip)) {
        bail!(
            "--relay-addr {wrong} is not {}, as -4/-6 asks",
            family.name()
        );
    }
    let ssh = Ssh::parse(&args.ssh)?;
    let plan = Plan {
        args: &args,
        bastion_ssh: ssh.for_jump_host(),
        ssh,
        family: family.ssh_option().into_iter().collect(),
    };
    // Local and quick: a typo in a host name fails before any login.
    let resolver = if args.via.is_some() {
        &plan.bastion_ssh
    } else {
        &plan.ssh
    };
    let targets = if args.relay_addr.is_empty() {
        resolver
            .resolve(args.via.as_deref().unwrap_or(&args.host), family)
            .map_err(|error| Failure::Resolve {
                destination: args.via.clone().unwrap_or_else(|| args.host.clone()),
                detail: format!("{error:#}"),
            })?
    } else {
        args.relay_addr.clone()
    };
    let target = targets[0];
    step_done("resolve");
    let master = match &args.via {
        Some(bastion) => Some(plan.open_master(bastion)?),
        None => None,
    };
    step_done("bastion login");
    let server = plan.start_server(master.as_ref())?;
    step_done("mosh-server");
    let (Some(bastion), Some(master)) = (&args.via, master) else {
        let status = run_client(&args, target, server.port, &server.key)?;
        return client_outcome(status);
    };
    let backend = server
        .ssh_local_addr
        .as_deref()
        .ok_or_else(|| Failure::NoSshConnection {
            host: args.host.clone(),
        })
        .and_then(|address| {
            remote::backend_ip(address).ok_or_else(|| Failure::NotForwardable {
                host: args.host.clone(),
                address: address.to_string(),
            })
        })?;
    // `[v6]:port` for IPv6, as the bastion's `forwarder add` takes it.
    let backend = SocketAddr::new(backend, server.port).to_string();
    let session = plan
        .add_session(&master, bastion, &backend, &server.key)
        .map_err(|failure| failure.after_server_started(&args.host))?;
    drop(master);
    step_done("session");
    // The operator opened one port for every session: the one most likely
    // to pass this network's firewall.
    let port = match session.shared_port {
        Some(shared) if !args.no_shared_port => shared,
        _ => session.port,
    };
    let (client_ip, client_port) = match local_bridge(&args, &session, &targets, port)? {
        Some(local_port) => (Ipv4Addr::LOCALHOST.into(), local_port),
        None => (target, port),
    };
    let status = run_client(&args, client_ip, client_port, &server.key);
    match plan.remove_session(bastion, &session.id) {
        Ok(removed) => {
            if let Some(diagnosis) = udp_diagnosis(&removed, port, bastion, &args.host) {
                eprintln!("forwarder mosh: {diagnosis}");
            }
        }
        Err(failure) => eprintln!(
            "forwarder mosh: the session {} stays on {bastion} until {} without traffic: removing it failed: {failure}",
            session.id,
            humantime::format_duration(args.relay_idle_timeout)
        ),
    }
    client_outcome(status?)
}

/// Starts the local bridge when there is more than one way to the bastion:
/// its TCP port (offered, and not refused), or addresses of more than one
/// family (or several of one). mosh-client then talks to its loopback port.
fn local_bridge(
    args: &MoshArgs,
    session: &SessionInfo,
    bastion: &[IpAddr],
    udp_port: u16,
) -> anyhow::Result<Option<u16>> {
    if args.direct {
        return Ok(None);
    }
    let offer = session
        .tcp
        .as_ref()
        .and_then(|tcp| Some((tcp.port, tcp.token.as_deref()?)))
        .filter(|_| !args.no_tcp);
    if offer.is_none() && args.tcp {
        bail!(Failure::NoTcpPort {
            bastion: args.via.clone().unwrap_or_default(),
        });
    }
    if offer.is_none() && bastion.len() < 2 {
        return Ok(None);
    }
    let (relay_tcp, hello) = match offer {
        Some((tcp_port, token)) => {
            let token = crate::tcpwire::Token::from_hex(token)
                .context("the bastion's forwarder reported a malformed TCP token")?;
            let relay_tcp = args
                .tcp_connect
                .unwrap_or(SocketAddr::new(bastion[0], tcp_port));
            (Some(relay_tcp), crate::tcpwire::hello(&session.id, &token))
        }
        None => (None, Vec::new()),
    };
    let port = bridge::start(bridge::BridgePlan {
        relay_udp: bastion
            .iter()
            .map(|ip| SocketAddr::new(*ip, udp_port))
            .collect(),
        relay_tcp,
        tcp_follows_udp: args.tcp_connect.is_none(),
        hello,
        start_on_tcp: args.tcp,
    })?;
    Ok(Some(port))
}

fn client_outcome(status: ExitStatus) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("mosh-client ended with {status}")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: MoshArgs,
    }

    fn parse(line: &[&str]) -> MoshArgs {
        Wrapper::try_parse_from(std::iter::once("mosh").chain(line.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn server_args_are_what_the_stock_wrapper_passes() {
        let args = parse(&[
            "--via",
            "bastion",
            "-p",
            "60001:60010",
            "alice@host",
            "--",
            "top",
            "-d",
            "1",
        ]);
        assert_eq!(args.via.as_deref(), Some("bastion"));
        assert_eq!(args.command, ["top", "-d", "1"]);
        let locale = [("LANG".to_string(), "C.UTF-8".to_string())];
        assert_eq!(
            server_args(&args, 256, &locale),
            [
                "new",
                "-c",
                "256",
                "-s",
                "-p",
                "60001:60010",
                "-l",
                "LANG=C.UTF-8",
                "--",
                "top",
                "-d",
                "1"
            ]
        );
        let any = parse(&["--bind-server", "any", "host"]);
        assert_eq!(server_args(&any, 8, &[]), ["new", "-c", "8"]);
        let ip = parse(&["--bind-server", "10.0.0.2", "host", "ls"]);
        assert_eq!(
            server_args(&ip, 8, &[]),
            ["new", "-c", "8", "-i", "10.0.0.2", "--", "ls"]
        );
    }

    #[test]
    fn client_options_parse_like_moshs() {
        assert_eq!(parse(&["-a", "host"]).predict().unwrap(), "always");
        assert_eq!(parse(&["-n", "host"]).predict().unwrap(), "never");
        assert_eq!(
            parse(&["--predict", "experimental", "host"])
                .predict()
                .unwrap(),
            "experimental"
        );
        let args = parse(&["-o", "--no-init", "-4", "--no-ssh-pty", "host"]);
        assert!(args.predict_overwrite && args.no_init && args.ipv4 && args.no_ssh_pty);
        let args = parse(&[
            "-6",
            "--relay-addr",
            "2001:db8::1",
            "--relay-addr",
            "10.0.0.1",
            "host",
        ]);
        assert!(args.ipv6 && !args.ipv4);
        assert_eq!(args.relay_addr.len(), 2);
        assert!(Wrapper::try_parse_from(["mosh", "-4", "-6", "host"]).is_err());
        assert!(
            Wrapper::try_parse_from(["mosh", "--relay-addr", "2001:db8::1:x", "host"]).is_err()
        );
        assert!(Wrapper::try_parse_from(["mosh", "-a", "-n", "host"]).is_err());
        assert_eq!(
            parse(&["host"]).relay_idle_timeout,
            humantime::parse_duration(DEFAULT_RELAY_IDLE_TIMEOUT).unwrap()
        );
    }

    #[test]
    fn port_requests_are_checked_like_moshs() {
        for good in ["60001", "60001:60010", "0"] {
            assert!(check_port_request(good).is_ok(), "{good}");
        }
        for bad in ["", "x", "70000", "0:10", "10:5", "1:2:3"] {
            assert!(check_port_request(bad).is_err(), "{bad}");
        }
    }

    fn session(flows: Vec<forwarder_api::FlowInfo>) -> SessionInfo {
        SessionInfo {
            id: "s1".into(),
            port: 60000,
            backend: "10.0.0.2:60001".into(),
            relay_addresses: vec![],
            idle_timeout_secs: 60,
            idle_ms: 0,
            flows,
            nat: None,
            owner: forwarder_api::OwnerInfo::default(),
            has_key: true,
            shared_port: None,
            relays: Vec::new(),
            tcp: None,
        }
    }

    fn flow(packets_to_client: u64) -> forwarder_api::FlowInfo {
        forwarder_api::FlowInfo {
            client: "10.0.1.2:40000".into(),
            relay_addr: "10.0.1.1".into(),
            relay_port: None,
            upstream_port: 61000,
            packets_to_server: 3,
            bytes_to_server: 300,
            packets_to_client,
            bytes_to_client: packets_to_client * 100,
            fast_path_packets: 0,
            slow_path_packets: 3,
            idle_ms: 0,
            server_current: packets_to_client > 0,
            answered: packets_to_client > 0,
        }
    }

    #[test]
    fn the_removed_session_tells_where_udp_stopped() {
        let nothing = udp_diagnosis(&session(vec![]), 60000, "bastion", "host").unwrap();
        assert!(
            matches!(nothing, Failure::NoUdpToBastion { port: 60000, .. }),
            "{nothing}"
        );
        let silent = udp_diagnosis(&session(vec![flow(0)]), 60000, "bastion", "host").unwrap();
        assert!(
            matches!(silent, Failure::NoUdpFromServer { .. }),
            "{silent}"
        );
        assert!(
            udp_diagnosis(&session(vec![flow(0), flow(5)]), 60000, "bastion", "host").is_none()
        );
    }
}
