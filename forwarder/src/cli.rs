//! The command line: thin verbs over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{FileConfig, defaults};
use crate::control::client::call;
use crate::daemon::{self, RunOptions};
use crate::datapath::DatapathChoice;
use crate::datapath::xdp::ModeChoice;
use crate::ports::PortRange;
use crate::sessions::Limits;
use crate::store::default_state_dir;
use crate::users::{BackendRule, Quota, UserPolicy};
use forwarder_api::{Reply, Request, SessionInfo, StatsInfo};

#[derive(Parser, Debug)]
#[command(
    name = "forwarder",
    version,
    about = "XDP-accelerated UDP relay for mosh"
)]
pub struct Cli {
    /// Names the control socket, so several relays can share a host (not for `mosh-server`)
    /// [default: default].
    #[arg(long, global = true, env = "FORWARDER_INSTANCE")]
    pub instance: Option<String>,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Run the relay daemon in the foreground.
    Run(RunArgs),
    /// Create a session towards a mosh-server and print the port to give mosh-client.
    Add {
        /// The mosh server: IPV4:PORT or [IPV6]:PORT (the port from `MOSH CONNECT <port> <key>`);
        /// a client of either family reaches it, the relay translating between them.
        #[arg(long, required_unless_present = "from_file")]
        backend: Option<String>,
        /// Add many sessions over one connection: a file (`-`: standard input) of one
        /// session per line, `BACKEND [port=PORT] [idle_timeout=DURATION]` or a JSON object
        /// {"backend": ..., "port": ..., "idle_timeout_secs": ..., "key": ...}; each line
        /// is reported, and the command fails if any line was not added.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["backend", "port", "idle_timeout", "key_file"])]
        from_file: Option<PathBuf>,
        /// Client-facing port to use (default: the next free one).
        #[arg(long)]
        port: Option<u16>,
        /// Remove the session after this long without traffic [default: the daemon's
        /// --session-idle-timeout, 7d unless configured].
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<Duration>,
        /// File holding the session's mosh key (MOSH_KEY, the 22 characters of
        /// `MOSH CONNECT <port> <key>`), `-` for standard input: the session is then
        /// reachable on the relay's --shared-port too. Kept sealed, never shown.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Print the new session as JSON ({"schema_version": 1, "session": ...}).
        #[arg(long)]
        json: bool,
    },
    /// Remove a session and every flow of it.
    Remove {
        /// The session's id or its client-facing port (see `forwarder list`).
        target: String,
        /// Print the removed session as JSON ({"schema_version": 1, "session": ...}).
        #[arg(long)]
        json: bool,
    },
    /// List sessions and their flows with counters.
    List {
        /// Print JSON ({"schema_version": 1, "sessions": [...]}).
        #[arg(long)]
        json: bool,
    },
    /// Everything about one session: backend, limits, NAT state, every flow with its counters.
    Show {
        /// The session's id or its client-facing port.
        target: String,
        /// Print JSON ({"schema_version": 1, "session": ...}).
        #[arg(long)]
        json: bool,
    },
    /// Show the data plane's verdict and reason counters, capacity, open files and warnings.
    Stats {
        /// Print JSON ({"schema_version": 1, "stats": ...}).
        #[arg(long)]
        json: bool,
    },
    /// Remove the instance's pinned XDP program, links and maps (the daemon
    /// must be stopped): forwarding of every flow ends.
    Detach {
        /// Also delete the session store, forgetting every session.
        #[arg(long)]
        purge: bool,
        /// The session store's folder (default /var/lib/forwarder/<instance>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print what was removed as JSON ({"schema_version": 1, "detached": ...}).
        #[arg(long)]
        json: bool,
    },
    /// On a mosh server behind NAT: open a path through a relay, start
    /// mosh-server, and print MOSH IP / MOSH CONNECT for the relay.
    #[command(long_about = crate::punch::server::LONG_HELP)]
    MoshServer(crate::punch::server::WrapperArgs),
    /// On the laptop: a mosh session through a forwarder bastion in one
    /// command (ssh, mosh-server, the bastion's session, mosh-client).
    #[command(long_about = crate::connect::LONG_HELP)]
    Mosh(crate::connect::MoshArgs),
    /// Man pages and shell completions from these very definitions, for
    /// packagers (`cargo xtask deb` runs it on the binary it packages).
    #[command(hide = true, subcommand)]
    Generate(Generate),
}

/// What `forwarder generate` writes.
#[derive(Subcommand, Debug)]
pub enum Generate {
    /// forwarder.1 and one forwarder-VERB.1 per verb, as roff, into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
    /// A completion script on standard output.
    Completion { shell: clap_complete::Shell },
}

/// `run` flags. Each one overrides the same key of `--config`; unset in
/// both, the documented default applies.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config file (the package installs /etc/forwarder/forwarder.toml, every key
    /// explained); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface to attach XDP to (repeat for each side of the relay).
    #[arg(long = "iface")]
    pub interfaces: Vec<String>,
    /// How XDP attaches: native (in the driver), skb (generic, slower, works everywhere), or auto
    /// (native, falling back to skb with a logged reason) [default: auto].
    #[arg(long, value_enum)]
    pub xdp_mode: Option<ModeChoice>,
    /// XDP fast path, the daemon's sockets only (hosts without BPF), or XDP
    /// falling back to sockets with the reason logged [default: auto].
    #[arg(long, value_enum)]
    pub datapath: Option<DatapathChoice>,
    /// Client-facing session ports [default: 60000-60999].
    #[arg(long)]
    pub ports: Option<PortRange>,
    /// Backend-facing per-flow ports [default: 61000-61999].
    #[arg(long)]
    pub flow_ports: Option<PortRange>,
    /// Forget a client endpoint after this long without traffic [default: 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub flow_idle_timeout: Option<Duration>,
    /// Default idle timeout of a session, long enough for a laptop to sleep overnight [default: 7d].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub session_idle_timeout: Option<Duration>,
    /// Most client endpoints the server answered that one session may have at once; endpoints the
    /// server has not answered wait on a per-session probation set of 16 and do not count [default: 32].
    #[arg(long)]
    pub max_flows_per_session: Option<usize>,
    /// Client endpoints per second that become established (answered by the server) in one session,
    /// bursts of twice that; 0: unlimited [default: 4].
    #[arg(long)]
    pub new_flows_per_sec: Option<u32>,
    /// Client endpoints per session that may wait for the server's first answer; a newer one
    /// evicts the oldest one-shot sender [default: 16].
    #[arg(long)]
    pub probation_flows_per_session: Option<usize>,
    /// Most sessions at once; `add` beyond it is refused [default: 4096].
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Flows the kernel maps hold; pinned maps keep their size, so a restart with another value is refused until `forwarder detach` [default: 16384].
    #[arg(long)]
    pub max_flows: Option<u32>,
    /// IPv6 and translated flows the kernel maps hold (flows with an IPv6 client or backend); their entries are allocated per flow and only their hash buckets follow this, so the default keeps a large IPv4 relay's IPv6 maps small. Pinned maps keep their size, like --max-flows [default: the smaller of --max-flows and 65536].
    #[arg(long)]
    pub max_flows6: Option<u32>,
    /// The daemon's open-file limit (RLIMIT_NOFILE). Every session and every
    /// flow holds a socket; by default the daemon raises its limit as far as
    /// the kernel allows (fs.nr_open). A low value is for tests and for
    /// hosts that must cap the daemon.
    #[arg(long)]
    pub max_open_files: Option<u64>,
    /// Folder of the session store [default: /var/lib/forwarder/<instance>].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Packets per second the XDP program hands to the daemon for one
    /// session (new client endpoints, route misses); beyond it they are
    /// dropped and counted. 0: unlimited [default: 1000].
    #[arg(long)]
    pub slowpath_pps_per_session: Option<u32>,
    /// Packets per second the XDP program hands to the daemon for all relay
    /// ports together. 0: unlimited [default: 20000].
    #[arg(long)]
    pub slowpath_pps: Option<u32>,
    /// UDP port for the punch handshake of servers behind NAT (`forwarder mosh-server --relay`).
    /// Off unless given; must lie outside --ports and --flow-ports.
    #[arg(long)]
    pub punch_port: Option<u16>,
    /// File holding the shared secret punch requests are authenticated with (16+ bytes).
    #[arg(long)]
    pub punch_secret_file: Option<PathBuf>,
    /// Address clients must use, when it is not the one servers send punch requests to
    /// (clients arrive on another interface, or the relay sits behind a 1:1 NAT).
    #[arg(long)]
    pub public_addr: Option<std::net::IpAddr>,
    /// Keep a NAT'd server's mapping open: send a keepalive after this long without a packet from it [default: 15s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub punch_keepalive: Option<Duration>,
    /// One UDP port (e.g. 443) on which every session added with a key (`add --key-file`)
    /// is reachable as well, matched by its mosh key. Off unless given; outside --flow-ports.
    #[arg(long, value_name = "PORT")]
    pub shared_port: Option<u16>,
    /// A TCP port (e.g. 443) for mosh over TCP, for client networks that block UDP
    /// (`forwarder mosh --tcp`): a stream authenticated with a session's token becomes one more
    /// flow of it. Off unless given.
    #[arg(long, value_name = "PORT")]
    pub tcp_port: Option<u16>,
    /// TCP streams open at once on --tcp-port, authenticated or not [default: 1024].
    #[arg(long, value_name = "N")]
    pub tcp_max_streams: Option<usize>,
    /// TCP streams one session may have at once [default: 4].
    #[arg(long, value_name = "N")]
    pub tcp_streams_per_session: Option<usize>,
    /// Who besides root may use the control socket, and what they may do.
    #[command(flatten, next_help_heading = "Self-service (non-root users)")]
    pub users: Box<UserArgs>,
    #[command(flatten)]
    pub gateway_mode: Box<GatewayArgs>,
    /// Sharing sessions with other relays through etcd (boxed: `Verb` stays small).
    #[command(flatten)]
    pub cluster: Box<ClusterArgs>,
}

/// `run`'s etcd flags.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Share sessions with other relays through etcd at these client URLs (comma-separated,
    /// e.g. http://10.0.0.5:2379); off unless given. Every relay of a cluster needs the same
    /// --ports and --etcd-prefix.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of the cluster in etcd [default: /forwarder/].
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// CA certificate (PEM) etcd's server certificate must chain to (https:// URLs).
    #[arg(long)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication; with --etcd-key-file.
    #[arg(long)]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long)]
    pub etcd_key_file: Option<PathBuf>,
    /// The cluster secret (at least 32 bytes, mode 0600, the same file on every relay) that keyed
    /// sessions' mosh keys are sealed under in etcd; without it `add --key-file` is refused.
    #[arg(long)]
    pub etcd_secret_file: Option<PathBuf>,
    /// This relay's name in the cluster, as `list` and the metrics show it [default: HOSTNAME-INSTANCE].
    #[arg(long)]
    pub relay_name: Option<String>,
}

/// `run` flags for self-service: the socket's group, the backend policy and
/// the quotas of non-root callers (boxed: `run`'s flags are many already).
#[derive(Args, Debug)]
pub struct UserArgs {
    /// Group whose members may use the control socket (mode 0660, root:GROUP) to create, list,
    /// show and remove their own sessions; it must exist (`root` keeps the socket root's) [default: forwarder].
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Backends non-root users may create sessions towards, as CIDR[:PORTS] (10.0.0.0/8:60000-61000,
    /// 192.0.2.7:22,60000-60100; no ports: all); repeat for more. Without one users may add nothing;
    /// root may add anything. Replaces user_allow of the config file.
    #[arg(long = "user-allow", value_name = "CIDR[:PORTS]")]
    pub user_allow: Vec<BackendRule>,
    /// Backends refused to non-root users even where --user-allow permits them, as CIDR[:PORTS];
    /// repeat for more. Replaces user_deny of the config file.
    #[arg(long = "user-deny", value_name = "CIDR[:PORTS]")]
    pub user_deny: Vec<BackendRule>,
    /// Sessions one non-root user may hold at once (overrides per user and group: the config
    /// file's [user.NAME] and [group.NAME]); 0: unlimited [default: 8].
    #[arg(long)]
    pub user_max_sessions: Option<u32>,
    /// Established flows (client endpoints the server answered) one non-root user may have
    /// across its sessions; 0: unlimited [default: 32].
    #[arg(long)]
    pub user_max_flows: Option<u32>,
    /// Client endpoints per second that become established across one non-root user's sessions,
    /// bursts of twice that; 0: unlimited [default: 4].
    #[arg(long)]
    pub user_new_flows_per_sec: Option<u32>,
}

/// Gateway mode's `run` flags (boxed into [`RunArgs`]: they are many).
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Gateway mode: serve NAT-PMP, PCP and UPnP IGD on this LAN interface (repeat for each; each
    /// also an --iface). LAN hosts' mappings become sessions on the WAN interface's address.
    #[arg(long = "gateway")]
    pub gateway: Vec<String>,
    /// A permission rule, miniupnpd's syntax: `allow|deny EXTERNAL_PORTS HOST/MASK INTERNAL_PORTS`
    /// (repeat; the first match decides, none matching denies). Without any: hosts on each LAN
    /// interface's subnet may map external ports within --ports.
    #[arg(long = "gateway-rule")]
    pub gateway_rules: Vec<String>,
    /// Secure mode: a LAN host may map ports only to itself [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub gateway_secure_mode: Option<bool>,
    /// Shortest mapping lifetime granted; shorter requests get this [default: 2m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub gateway_min_lifetime: Option<Duration>,
    /// Longest mapping lifetime granted (UPnP's "permanent" gets this) [default: 1day].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub gateway_max_lifetime: Option<Duration>,
    /// Most mappings one LAN host may hold [default: 16].
    #[arg(long)]
    pub gateway_max_mappings_per_host: Option<usize>,
    /// TCP port of the UPnP IGD's description and SOAP control, on each LAN address [default: 5000].
    #[arg(long)]
    pub gateway_upnp_port: Option<u16>,
}

/// Gateway mode's options from the flags over the config file, or None
/// when no LAN interface is named.
fn gateway_options(
    args: &GatewayArgs,
    file: &FileConfig,
) -> anyhow::Result<Option<crate::gateway::GatewayOptions>> {
    let interfaces = if args.gateway.is_empty() {
        file.gateway.clone().unwrap_or_default()
    } else {
        args.gateway.clone()
    };
    if interfaces.is_empty() {
        return Ok(None);
    }
    let lines = if args.gateway_rules.is_empty() {
        file.gateway_rules.clone().unwrap_or_default()
    } else {
        args.gateway_rules.clone()
    };
    let rules = lines
        .iter()
        .map(|line| line.parse::<crate::gateway::rules::Rule>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("--gateway-rule {error}"))?;
    let min_lifetime = args
        .gateway_min_lifetime
        .or(file.gateway_min_lifetime)
        .unwrap_or(defaults::GATEWAY_MIN_LIFETIME);
    let max_lifetime = args
        .gateway_max_lifetime
        .or(file.gateway_max_lifetime)
        .unwrap_or(defaults::GATEWAY_MAX_LIFETIME);
    if min_lifetime > max_lifetime || max_lifetime.is_zero() {
        bail!(
            "--gateway-min-lifetime {} is over --gateway-max-lifetime {}: give 0 < MIN <= MAX",
            humantime::format_duration(min_lifetime),
            humantime::format_duration(max_lifetime)
        );
    }
    Ok(Some(crate::gateway::GatewayOptions {
        interfaces,
        rules,
        secure_mode: args
            .gateway_secure_mode
            .or(file.gateway_secure_mode)
            .unwrap_or(defaults::GATEWAY_SECURE_MODE),
        min_lifetime,
        max_lifetime,
        max_mappings_per_host: args
            .gateway_max_mappings_per_host
            .or(file.gateway_max_mappings_per_host)
            .unwrap_or(defaults::GATEWAY_MAX_MAPPINGS_PER_HOST),
        upnp_http_port: args
            .gateway_upnp_port
            .or(file.gateway_upnp_port)
            .unwrap_or(defaults::GATEWAY_UPNP_PORT),
    }))
}

/// The one place `--max-flows`, `--max-flows6` and `--max-sessions` become
/// map sizes. `max_flows6`: as given (flag or file), else derived from
/// `max_flows`.
fn runtime_sizes(
    max_flows: u32,
    max_flows6: Option<u32>,
    max_sessions: usize,
) -> anyhow::Result<forwarder_common::config::RuntimeSizes> {
    use forwarder_common::config::{MAX_FLOWS_LIMIT, MAX_SESSIONS_LIMIT, RuntimeSizes, SizeError};
    let sessions = u32::try_from(max_sessions).unwrap_or(u32::MAX);
    let flows6 = max_flows6.unwrap_or(defaults::max_flows6(max_flows));
    RuntimeSizes::new(max_flows, flows6, sessions).map_err(|error| match error {
        SizeError::FlowsOutOfRange(n) => {
            anyhow::anyhow!("--max-flows {n} is out of range: give 1 to {MAX_FLOWS_LIMIT}")
        }
        SizeError::Flows6OutOfRange(n) => anyhow::anyhow!(
            "--max-flows6 {n} is out of range: give 1 to {MAX_FLOWS_LIMIT} (or leave it out: the smaller of \
             --max-flows and {})",
            forwarder_common::config::DEFAULT_MAX_FLOWS6_CAP
        ),
        SizeError::SessionsOutOfRange(_) => anyhow::anyhow!(
            "--max-sessions {max_sessions} is out of range: give 1 to {MAX_SESSIONS_LIMIT} (one client-facing port each)"
        ),
    })
}

/// A relay's name in a cluster unless `--relay-name` gives one: unique per
/// host and instance.
fn default_relay_name(instance: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "relay".into());
    format!("{host}-{instance}")
}

/// Merges flags over the config file over the defaults.
pub fn run_options(instance: Option<String>, args: RunArgs) -> anyhow::Result<RunOptions> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let gateway = gateway_options(&args.gateway_mode, &file)?;
    let instance = instance
        .or(file.instance)
        .unwrap_or_else(|| defaults::INSTANCE.into());
    let xdp_mode = args
        .xdp_mode
        .or(file.xdp_mode)
        .unwrap_or(defaults::XDP_MODE);
    let datapath = args
        .datapath
        .or(file.datapath)
        .unwrap_or(defaults::DATAPATH);
    let interfaces = if args.interfaces.is_empty() {
        file.interfaces.unwrap_or_default()
    } else {
        args.interfaces
    };
    if interfaces.is_empty()
        && let Some(path) = &args.config
    {
        bail!(
            "no interface to attach to: set `interfaces = [\"IF\", ...]` in {} (the interfaces clients and \
             servers reach this relay on; `ip -br link` lists them), or pass --iface IF",
            path.display()
        );
    }
    let punch = match (
        args.punch_port.or(file.punch_port),
        args.punch_secret_file.or(file.punch_secret_file),
    ) {
        (Some(port), Some(secret_file)) => Some(crate::punch::relay::PunchOptions {
            port,
            secret: crate::punch::wire::Secret::read(&secret_file)?,
            public_addr: args.public_addr.or(file.public_addr),
            keepalive: args
                .punch_keepalive
                .or(file.punch_keepalive)
                .unwrap_or(defaults::PUNCH_KEEPALIVE),
        }),
        (None, None) => None,
        _ => bail!(
            "--punch-port and --punch-secret-file (or punch_port and punch_secret_file) go together: give both"
        ),
    };
    let max_flows = args
        .max_flows
        .or(file.max_flows)
        .unwrap_or(defaults::MAX_FLOWS);
    let max_sessions = args
        .max_sessions
        .or(file.max_sessions)
        .unwrap_or(defaults::MAX_SESSIONS);
    let max_flows6 = args.max_flows6.or(file.max_flows6);
    let sizes = runtime_sizes(max_flows, max_flows6, max_sessions)?;
    let shared_port = args.shared_port.or(file.shared_port);
    if shared_port == Some(0) {
        bail!("--shared-port 0 is no port: give the UDP port clients may reach, e.g. 443");
    }
    let or_file = |flags: Vec<BackendRule>, file: Option<Vec<BackendRule>>| {
        if flags.is_empty() {
            file.unwrap_or_default()
        } else {
            flags
        }
    };
    let user_args = *args.users;
    let users = UserPolicy {
        allow: or_file(user_args.user_allow, file.user_allow),
        deny: or_file(user_args.user_deny, file.user_deny),
        quota: Quota {
            max_sessions: user_args
                .user_max_sessions
                .or(file.user_max_sessions)
                .unwrap_or(defaults::USER_QUOTA.max_sessions),
            max_flows: user_args
                .user_max_flows
                .or(file.user_max_flows)
                .unwrap_or(defaults::USER_QUOTA.max_flows),
            new_flows_per_sec: user_args
                .user_new_flows_per_sec
                .or(file.user_new_flows_per_sec)
                .unwrap_or(defaults::USER_QUOTA.new_flows_per_sec),
        },
        users: file.user.unwrap_or_default(),
        groups: file.group.unwrap_or_default(),
    };
    let ClusterArgs {
        etcd,
        etcd_prefix,
        etcd_ca_file,
        etcd_cert_file,
        etcd_key_file,
        etcd_secret_file,
        relay_name,
    } = *args.cluster;
    let etcd = if etcd.is_empty() {
        file.etcd.unwrap_or_default()
    } else {
        etcd
    };
    let cluster = (!etcd.is_empty()).then(|| crate::cluster::ClusterOptions {
        endpoints: etcd,
        prefix: crate::cluster::ClusterOptions::normalized_prefix(
            &etcd_prefix
                .or(file.etcd_prefix)
                .unwrap_or_else(|| defaults::ETCD_PREFIX.into()),
        ),
        relay_name: relay_name
            .or(file.relay_name)
            .unwrap_or_else(|| default_relay_name(&instance)),
        ca_file: etcd_ca_file.or(file.etcd_ca_file),
        cert_file: etcd_cert_file.or(file.etcd_cert_file),
        key_file: etcd_key_file.or(file.etcd_key_file),
        secret_file: etcd_secret_file.or(file.etcd_secret_file),
    });
    let tcp_port = args.tcp_port.or(file.tcp_port);
    if tcp_port == Some(0) {
        bail!("--tcp-port 0 is no port: give the TCP port clients may reach, e.g. 443");
    }
    let tcp = tcp_port.map(|port| crate::tcpbridge::TcpBridgeOptions {
        port,
        max_streams: args
            .tcp_max_streams
            .or(file.tcp_max_streams)
            .unwrap_or(defaults::TCP_MAX_STREAMS),
        streams_per_session: args
            .tcp_streams_per_session
            .or(file.tcp_streams_per_session)
            .unwrap_or(defaults::TCP_STREAMS_PER_SESSION),
        hello_deadline: defaults::TCP_HELLO_DEADLINE,
        idle_timeout: defaults::TCP_IDLE_TIMEOUT,
    });
    Ok(RunOptions {
        tcp,
        socket_group: user_args
            .socket_group
            .or(file.socket_group)
            .unwrap_or_else(|| defaults::SOCKET_GROUP.into()),
        users,
        gateway,
        cluster,
        punch,
        sizes,
        shared_port,
        max_open_files: args.max_open_files.or(file.max_open_files),
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| default_state_dir(&instance)),
        metrics: args.metrics.or(file.metrics),
        interfaces,
        datapath,
        xdp_mode,
        session_ports: args.ports.or(file.ports).unwrap_or(defaults::PORTS),
        flow_ports: args
            .flow_ports
            .or(file.flow_ports)
            .unwrap_or(defaults::FLOW_PORTS),
        limits: Limits {
            flow_idle_timeout: args
                .flow_idle_timeout
                .or(file.flow_idle_timeout)
                .unwrap_or(defaults::FLOW_IDLE_TIMEOUT),
            default_session_idle_timeout: args
                .session_idle_timeout
                .or(file.session_idle_timeout)
                .unwrap_or(defaults::SESSION_IDLE_TIMEOUT),
            max_flows_per_session: args
                .max_flows_per_session
                .or(file.max_flows_per_session)
                .unwrap_or(defaults::MAX_FLOWS_PER_SESSION),
            new_flows_per_sec: args
                .new_flows_per_sec
                .or(file.new_flows_per_sec)
                .unwrap_or(defaults::NEW_FLOWS_PER_SEC),
            probation_flows_per_session: args
                .probation_flows_per_session
                .or(file.probation_flows_per_session)
                .unwrap_or(defaults::PROBATION_FLOWS_PER_SESSION)
                .max(1),
            max_sessions,
        },
        slowpath_pps_per_session: args
            .slowpath_pps_per_session
            .or(file.slowpath_pps_per_session)
            .unwrap_or(defaults::SLOWPATH_PPS_PER_SESSION),
        slowpath_pps: args
            .slowpath_pps
            .or(file.slowpath_pps)
            .unwrap_or(defaults::SLOWPATH_PPS),
        instance,
    })
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    // `run` may take its instance from the config file instead.
    let instance = cli.instance.clone().unwrap_or_else(|| "default".into());
    match cli.verb {
        Verb::Run(args) => {
            let options = run_options(cli.instance, args)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Verb::Detach {
            purge,
            state_dir,
            json,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&instance));
            let detached = daemon::detach(&instance, &state_dir, purge)?;
            if json {
                print_json("detached", &detached)?;
            } else {
                println!(
                    "instance {}: removed {} pins{}{}",
                    detached.instance,
                    detached.pins_removed,
                    if detached.store_removed {
                        " and the session store"
                    } else {
                        ""
                    },
                    if detached.stale_socket_removed {
                        " and a stale control socket"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Verb::Add {
            from_file: Some(path),
            json,
            ..
        } => {
            daemon::validate_instance(&instance)?;
            let sessions = crate::control::batch::parse(&crate::control::batch::read(&path)?)?;
            let results = crate::control::batch::add_all(&instance, sessions)?;
            crate::control::batch::report(&results, json)
        }
        Verb::Add {
            backend,
            port,
            idle_timeout,
            key_file,
            json,
            from_file: None,
        } => {
            let backend = backend.context("--backend IP:PORT is required (or --from-file FILE)")?;
            daemon::validate_instance(&instance)?;
            if idle_timeout.is_some_and(|timeout| timeout.is_zero()) {
                bail!(
                    "an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h"
                );
            }
            let key = key_file.as_deref().map(read_key).transpose()?;
            let request = Request::Add {
                backend,
                port,
                idle_timeout_secs: idle_timeout.map(|d| d.as_secs().max(1)),
                key,
            };
            let Reply::Session(session) = call(&instance, &request)? else {
                bail!("the daemon answered `add` with something else: is it the same version?")
            };
            if json {
                print_json("session", &session)?;
            } else {
                let (address, other_family) = connect_addresses(&session.relay_addresses);
                println!(
                    "session {} forwards port {} to {}",
                    session.id, session.port, session.backend
                );
                println!(
                    "connect with: MOSH_KEY=<key> mosh-client {address} {}",
                    session.port
                );
                if let Some(other) = other_family {
                    println!(
                        "or over the other family: MOSH_KEY=<key> mosh-client {other} {}",
                        session.port
                    );
                }
                if let Some(shared) = session.shared_port {
                    println!(
                        "or through the shared port: MOSH_KEY=<key> mosh-client {address} {shared}"
                    );
                }
                // The token only in `--json`: a terminal's scrollback is no place for it.
                if let Some(tcp) = &session.tcp {
                    println!(
                        "over TCP (networks that block UDP): TCP port {}; `forwarder mosh` does it, \
                         its token is in `add --json`",
                        tcp.port
                    );
                }
            }
            Ok(())
        }
        Verb::Remove { target, json } => {
            daemon::validate_instance(&instance)?;
            let Reply::Removed(session) = call(&instance, &Request::Remove { target })? else {
                bail!("the daemon answered `remove` with something else: is it the same version?")
            };
            if json {
                print_json("session", &session)?;
            } else {
                println!(
                    "removed session {} (port {}, backend {})",
                    session.id, session.port, session.backend
                );
            }
            Ok(())
        }
        Verb::Show { target, json } => {
            daemon::validate_instance(&instance)?;
            let Reply::Session(session) = call(&instance, &Request::Show { target })? else {
                bail!("the daemon answered `show` with something else: is it the same version?")
            };
            if json {
                print_json("session", &session)?;
            } else {
                print!("{}", render_sessions(std::slice::from_ref(&session)));
            }
            Ok(())
        }
        Verb::List { json } => {
            daemon::validate_instance(&instance)?;
            let Reply::Sessions(sessions) = call(&instance, &Request::List {})? else {
                bail!("the daemon answered `list` with something else: is it the same version?")
            };
            if json {
                print_json("sessions", &sessions)?;
            } else {
                print!("{}", render_sessions(&sessions));
            }
            Ok(())
        }
        Verb::MoshServer(args) => {
            // The wrapper talks to a relay's punch port, not to a local
            // daemon: an instance would mean nothing. The variable may be set
            // for the other verbs; only the flag is a mistake.
            let from_environment = std::env::var("FORWARDER_INSTANCE").ok();
            if let Some(given) = cli
                .instance
                .filter(|given| from_environment.as_ref() != Some(given))
            {
                bail!(
                    "--instance {given:?} has no meaning for `forwarder mosh-server`: it reaches the relay through \
                     --relay ADDR:PORT; drop --instance"
                );
            }
            crate::punch::server::main(args)
        }
        Verb::Mosh(args) => {
            // The bastion's instance is --relay-instance; a local instance
            // would mean nothing here.
            let from_environment = std::env::var("FORWARDER_INSTANCE").ok();
            if let Some(given) = cli
                .instance
                .filter(|given| from_environment.as_ref() != Some(given))
            {
                bail!(
                    "--instance {given:?} has no meaning for `forwarder mosh`, which runs no daemon here: \
                     name the bastion's instance with --relay-instance {given}"
                );
            }
            crate::connect::main(args)
        }
        Verb::Generate(what) => generate(what),
        Verb::Stats { json } => {
            daemon::validate_instance(&instance)?;
            let Reply::Stats(stats) = call(&instance, &Request::Stats {})? else {
                bail!("the daemon answered `stats` with something else: is it the same version?")
            };
            if json {
                print_json("stats", &stats)?;
            } else {
                print!("{}", render_stats(&stats));
            }
            Ok(())
        }
    }
}

/// The mosh key of `add --key-file FILE` (`-`: standard input), checked
/// here so a typo is refused before it reaches the daemon. Sent as text in
/// the request (the control socket is root-only); never printed.
fn read_key(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if path == std::path::Path::new("-") {
        std::io::stdin()
            .take(1024)
            .read_to_string(&mut text)
            .context("reading the mosh key from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(1024).read_to_string(&mut text))
            .with_context(|| {
                format!(
                    "reading the mosh key from {} (give a file holding MOSH_KEY, or - for standard input)",
                    path.display()
                )
            })?;
    }
    let text = text.trim();
    crate::mosh::MoshKey::parse(text)?;
    Ok(text.to_string())
}

/// A `--json` document: `{"schema_version": N, "<key>": value}`.
fn print_json(key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut document = serde_json::Map::new();
    document.insert(
        "schema_version".into(),
        forwarder_api::JSON_SCHEMA_VERSION.into(),
    );
    document.insert(key.into(), serde_json::to_value(value)?);
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}

impl Cli {
    /// Whether the verb prints JSON: its errors then go to stdout as JSON too.
    pub fn wants_json(&self) -> bool {
        match &self.verb {
            Verb::Add { json, .. }
            | Verb::Remove { json, .. }
            | Verb::List { json }
            | Verb::Show { json, .. }
            | Verb::Stats { json }
            | Verb::Detach { json, .. } => *json,
            Verb::Run(_) | Verb::MoshServer(_) | Verb::Mosh(_) | Verb::Generate(_) => false,
        }
    }
}

/// Renders the man pages or a completion script. Here rather than in the
/// xtask: the xtask must build on a machine that has no bpf-linker yet
/// (it is what installs it), and linking the forwarder library into it
/// would build the eBPF object first.
fn generate(what: Generate) -> anyhow::Result<()> {
    use clap::CommandFactory;
    match what {
        Generate::Man { dir } => {
            // Built first, so that each verb carries the global flags
            // (--instance) and its synopsis says `forwarder VERB`.
            let mut root = Cli::command();
            root.build();
            let source = format!("forwarder {}", env!("CARGO_PKG_VERSION"));
            let render = |page: String, command: clap::Command| -> anyhow::Result<()> {
                let mut roff = Vec::new();
                clap_mangen::Man::new(command)
                    .source(source.clone())
                    .render(&mut roff)?;
                let path = dir.join(format!("{page}.1"));
                std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let verbs: Vec<clap::Command> = root
                .get_subcommands()
                .filter(|verb| !verb.is_hide_set() && verb.get_name() != "help")
                .cloned()
                .collect();
            for verb in verbs {
                let page = format!("forwarder-{}", verb.get_name());
                render(page.clone(), verb.display_name(page))?;
            }
            render("forwarder".to_string(), root)
        }
        Generate::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "forwarder",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// The exit status for an error, from the typed failure it carries if any.
pub fn exit_status(error: &anyhow::Error) -> forwarder_api::ExitStatus {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<crate::control::client::Failure>())
        .map_or(forwarder_api::ExitStatus::Error, |failure| {
            failure.exit_status()
        })
}

/// What an error says: the outermost messages, without the typed failure's
/// own short name at the end of the chain.
pub fn error_message(error: &anyhow::Error) -> String {
    error
        .chain()
        .filter(|cause| {
            cause
                .downcast_ref::<crate::control::client::Failure>()
                .is_none()
        })
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// An error as a `--json` document on stdout.
pub fn print_json_error(error: &anyhow::Error) {
    let status = exit_status(error);
    let document = serde_json::json!({
        "schema_version": forwarder_api::JSON_SCHEMA_VERSION,
        "error": forwarder_api::ErrorInfo {
            kind: status.name().into(),
            exit_code: status as u8,
            message: error_message(error),
        },
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&document).unwrap_or_default()
    );
}

/// "1 packet", "2 packets".
fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn bytes(count: u64) -> String {
    if count == 1 {
        "1 byte".into()
    } else {
        format!("{count} bytes")
    }
}

/// An idle time to the second, as humantime writes it ("3m 12s").
fn idle(ms: u64) -> String {
    if ms < 1_000 {
        "under 1s".into()
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1_000)).to_string()
    }
}

/// The relay address to print in `mosh-client ADDR PORT` (mosh-client
/// takes IPv6 without brackets), and the first one of the other family,
/// if the relay has one: a client may be on either.
fn connect_addresses(addresses: &[String]) -> (&str, Option<&str>) {
    let Some(first) = addresses.first() else {
        return ("RELAY", None);
    };
    let family = |text: &str| text.parse::<std::net::IpAddr>().ok().map(|ip| ip.is_ipv6());
    let other = addresses
        .iter()
        .find(|a| family(a).is_some() && family(a) != family(first))
        .map(String::as_str);
    (first, other)
}

/// `ADDR:PORT` for a relay address as the API gives it (a bare IP): IPv6
/// in brackets, as everywhere an address carries a port.
fn with_port(address: &str, port: u16) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{address}:{port}"),
    }
}

fn render_sessions(sessions: &[SessionInfo]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if sessions.is_empty() {
        out.push_str(
            "no sessions (add one with `forwarder add --backend IP:PORT`, IPv6 as [IP]:PORT)\n",
        );
        return out;
    }
    for s in sessions {
        let _ = writeln!(
            out,
            "session {}  port {}  backend {}  owner {} (uid {})  {}  idle {} (expires after {} idle)",
            s.id,
            s.port,
            s.backend,
            s.owner.name,
            s.owner.uid,
            plural(s.flows.len() as u64, "flow"),
            idle(s.idle_ms),
            humantime::format_duration(Duration::from_secs(s.idle_timeout_secs))
        );
        if !s.relays.is_empty() {
            let holders: Vec<String> = s
                .relays
                .iter()
                .map(|h| format!("{} ({})", h.relay, plural(h.flows, "flow")))
                .collect();
            let _ = writeln!(out, "  shared; held by {}", holders.join(", "));
        }
        if let Some(nat) = &s.nat {
            let _ = writeln!(
                out,
                "  behind NAT (punched): upstream port {}, {}, {}; {} packets from unverified client endpoints and {} from unverified server endpoints dropped",
                nat.upstream_port,
                if nat.bound {
                    "bound"
                } else {
                    "waiting for the server's bind"
                },
                if nat.key_received {
                    "key received"
                } else {
                    "waiting for the key"
                },
                nat.rejected_packets,
                nat.rejected_server_packets
            );
        }
        if s.has_key {
            let _ = match s.shared_port {
                Some(shared) => writeln!(
                    out,
                    "  keyed: the relay holds its mosh key; reachable on the shared port {shared} too"
                ),
                None => writeln!(
                    out,
                    "  keyed: the relay holds its mosh key (no --shared-port on this relay)"
                ),
            };
        }
        if let Some(tcp) = &s.tcp {
            let _ = writeln!(
                out,
                "  also over TCP port {} (streams are flows from 127.0.0.1)",
                tcp.port
            );
        }
        for f in &s.flows {
            let _ = writeln!(
                out,
                "  flow {:<21} -> {} -> upstream port {}{}{}",
                f.client,
                with_port(&f.relay_addr, f.relay_port.unwrap_or(s.port)),
                f.upstream_port,
                if f.server_current {
                    "  [server replies here]"
                } else {
                    ""
                },
                if f.answered {
                    ""
                } else {
                    "  [on probation: not answered yet]"
                }
            );
            let _ = writeln!(
                out,
                "    to server {} / {}, to client {} / {}; fast path (XDP) {}, slow path (daemon) {}; idle {}",
                plural(f.packets_to_server, "packet"),
                bytes(f.bytes_to_server),
                plural(f.packets_to_client, "packet"),
                bytes(f.bytes_to_client),
                plural(f.fast_path_packets, "packet"),
                plural(f.slow_path_packets, "packet"),
                idle(f.idle_ms)
            );
        }
    }
    out
}

fn render_stats(stats: &StatsInfo) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance {}: datapath {} on {}; {} sessions, {} flows",
        stats.instance,
        stats.datapath,
        stats.interfaces.join(", "),
        stats.sessions,
        stats.flows
    );
    if let Some(cluster) = &stats.cluster {
        let relays: Vec<&str> = cluster.relays.iter().map(|r| r.relay.as_str()).collect();
        let _ = writeln!(
            out,
            "cluster: relay {} on etcd {} ({}); {} shared sessions; live relays: {}",
            cluster.relay,
            cluster.etcd.join(","),
            match &cluster.etcd_error {
                _ if cluster.etcd_connected => "connected".to_string(),
                Some(error) => format!("NOT connected: {error}; adds and removes are refused"),
                None => "connecting".to_string(),
            },
            cluster.shared_sessions,
            relays.join(", ")
        );
        for (port, why) in &cluster.refused {
            let _ = writeln!(
                out,
                "  shared session on port {port} not programmed here: {why}"
            );
        }
    }
    let verdicts: Vec<String> = stats
        .verdicts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, "XDP verdicts: {}", verdicts.join(", "));
    let _ = writeln!(out, "XDP reasons (packets / bytes):");
    for (name, counter) in stats.reasons.iter().filter(|(_, c)| c.packets > 0) {
        let _ = writeln!(
            out,
            "  {name:<22} {:>10} / {}",
            counter.packets, counter.bytes
        );
    }
    let c = &stats.capacity;
    let _ = writeln!(
        out,
        "capacity: {} of {} sessions, {} flows of {} IPv4 and {} IPv6/translated ({} per session); \
         kernel memory per IPv4 flow of capacity {} B",
        stats.sessions,
        c.max_sessions,
        stats.flows,
        c.max_flows,
        c.max_flows6,
        c.max_flows_per_session,
        c.kernel_bytes_per_flow
    );
    // One column for every name, the longest (the session buckets) included.
    let width = c.maps.iter().map(|map| map.name.len()).max().unwrap_or(0);
    for map in &c.maps {
        let fill = map.entries.map_or_else(
            || "array".to_string(),
            |n| format!("{n}/{}", map.max_entries),
        );
        let _ = writeln!(
            out,
            "  map {:<width$} {:>14}  {} B kernel memory",
            map.name, fill, map.memlock_bytes
        );
    }
    let d = &stats.descriptors;
    let _ = writeln!(
        out,
        "open files: {} of {} ({} kept in reserve; new flows stop at {}); {} flows refused at the limit",
        d.open,
        d.limit,
        d.reserve,
        d.limit.saturating_sub(d.reserve),
        d.refused_flows
    );
    if stats.warnings.is_empty() {
        let _ = writeln!(out, "warnings: none");
    } else {
        let _ = writeln!(out, "warnings:");
        for warning in &stats.warnings {
            if warning.interface.is_empty() {
                let _ = writeln!(out, "  [{}] {}", warning.kind, warning.message);
            } else {
                let _ = writeln!(
                    out,
                    "  [{}] {}: {}",
                    warning.kind, warning.interface, warning.message
                );
            }
        }
    }
    let s = &stats.slow_path;
    let _ = writeln!(
        out,
        "daemon slow path: {} to servers, {} to clients, {} flows created, {} expired; refused: {} over flow limit, {} over rate; \
         dropped: {} not from the server, {} from the server's address on the wrong path, {} clients that are the backend or the relay, {} without session",
        s.forwarded_to_server,
        s.forwarded_to_client,
        s.flows_created,
        s.flows_expired,
        s.refused_flow_limit,
        s.refused_rate_limit,
        s.dropped_not_from_server,
        s.dropped_server_wrong_path,
        s.dropped_client_is_backend,
        s.dropped_no_session
    );
    if s.nat_client_moves > 0 || s.dropped_unverified_client > 0 {
        let _ = writeln!(
            out,
            "NAT sessions: {} moves to a verified client endpoint, {} packets from unverified endpoints dropped",
            s.nat_client_moves, s.dropped_unverified_client
        );
    }
    if s.nat_server_moves > 0 || s.dropped_unverified_server > 0 {
        let _ = writeln!(
            out,
            "NAT sessions: {} moves to a verified new server endpoint, {} datagrams from unverified server endpoints dropped",
            s.nat_server_moves, s.dropped_unverified_server
        );
    }
    let shared_seen =
        s.shared_admitted + s.shared_unverified + s.shared_wrong_direction + s.shared_replayed;
    if shared_seen > 0 {
        let _ = writeln!(
            out,
            "shared port: {} new endpoints admitted by key; refused: {} verified under no key, {} server-to-client, {} replayed",
            s.shared_admitted, s.shared_unverified, s.shared_wrong_direction, s.shared_replayed
        );
    }
    if let Some(tcp) = &stats.tcp {
        let _ = writeln!(
            out,
            "TCP port {}: {} streams open, {} authenticated of {} accepted; refused: {} bad hello, {} no hello in time, \
             {} over a limit; closed: {} bad frame, {} idle; datagrams {} to servers, {} to clients, {} stale dropped",
            tcp.port,
            tcp.streams_open,
            tcp.streams_authenticated,
            tcp.streams_accepted,
            tcp.refused_bad_hello,
            tcp.refused_hello_timeout,
            tcp.refused_stream_limit,
            tcp.closed_bad_frame,
            tcp.closed_idle,
            tcp.datagrams_to_server,
            tcp.datagrams_to_client,
            tcp.dropped_stale
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser, ValueEnum};

    use super::*;

    /// The value a help text names as `[default: X]`.
    fn shown_default(flag: &str) -> String {
        let command = Cli::command();
        let run = command.find_subcommand("run").expect("a run verb");
        let argument = run
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no --{flag}"));
        let help = argument
            .get_help()
            .map(ToString::to_string)
            .unwrap_or_default();
        let start = help
            .find("[default: ")
            .unwrap_or_else(|| panic!("--{flag} shows no default: {help}"));
        let rest = &help[start + "[default: ".len()..];
        rest[..rest.find(']').expect("closing bracket")].to_string()
    }

    /// Every default `--help` shows is the one the flag falls back to.
    #[test]
    fn help_shows_the_defaults_the_flags_fall_back_to() {
        let duration = |flag| humantime::parse_duration(&shown_default(flag)).unwrap();
        let number = |flag| shown_default(flag).parse::<u64>().unwrap();
        assert_eq!(
            ModeChoice::from_str(&shown_default("xdp-mode"), true),
            Ok(defaults::XDP_MODE)
        );
        assert_eq!(
            DatapathChoice::from_str(&shown_default("datapath"), true),
            Ok(defaults::DATAPATH)
        );
        assert_eq!(
            shown_default("ports").parse::<PortRange>(),
            Ok(defaults::PORTS)
        );
        assert_eq!(
            shown_default("flow-ports").parse::<PortRange>(),
            Ok(defaults::FLOW_PORTS)
        );
        assert_eq!(duration("flow-idle-timeout"), defaults::FLOW_IDLE_TIMEOUT);
        assert_eq!(
            duration("session-idle-timeout"),
            defaults::SESSION_IDLE_TIMEOUT
        );
        assert_eq!(duration("punch-keepalive"), defaults::PUNCH_KEEPALIVE);
        assert_eq!(
            number("max-flows-per-session"),
            defaults::MAX_FLOWS_PER_SESSION as u64
        );
        assert_eq!(
            number("new-flows-per-sec"),
            u64::from(defaults::NEW_FLOWS_PER_SEC)
        );
        assert_eq!(
            number("probation-flows-per-session"),
            defaults::PROBATION_FLOWS_PER_SESSION as u64
        );
        assert_eq!(number("max-sessions"), defaults::MAX_SESSIONS as u64);
        assert_eq!(number("max-flows"), u64::from(defaults::MAX_FLOWS));
        assert_eq!(
            shown_default("max-flows6"),
            format!(
                "the smaller of --max-flows and {}",
                forwarder_common::config::DEFAULT_MAX_FLOWS6_CAP
            )
        );
        assert_eq!(
            number("slowpath-pps-per-session"),
            u64::from(defaults::SLOWPATH_PPS_PER_SESSION)
        );
        assert_eq!(number("slowpath-pps"), u64::from(defaults::SLOWPATH_PPS));
        assert_eq!(shown_default("socket-group"), defaults::SOCKET_GROUP);
        assert_eq!(
            number("user-max-sessions"),
            u64::from(defaults::USER_MAX_SESSIONS)
        );
        assert_eq!(
            number("user-max-flows"),
            u64::from(defaults::USER_MAX_FLOWS)
        );
        assert_eq!(
            number("user-new-flows-per-sec"),
            u64::from(defaults::USER_NEW_FLOWS_PER_SEC)
        );
        assert_eq!(
            duration("gateway-min-lifetime"),
            defaults::GATEWAY_MIN_LIFETIME
        );
        assert_eq!(
            duration("gateway-max-lifetime"),
            defaults::GATEWAY_MAX_LIFETIME
        );
        assert_eq!(
            number("gateway-max-mappings-per-host"),
            defaults::GATEWAY_MAX_MAPPINGS_PER_HOST as u64
        );
        assert_eq!(
            number("gateway-upnp-port"),
            u64::from(defaults::GATEWAY_UPNP_PORT)
        );
        assert_eq!(
            shown_default("gateway-secure-mode").parse::<bool>(),
            Ok(defaults::GATEWAY_SECURE_MODE)
        );
        assert_eq!(shown_default("etcd-prefix"), defaults::ETCD_PREFIX);
        assert_eq!(number("tcp-max-streams"), defaults::TCP_MAX_STREAMS as u64);
        assert_eq!(
            number("tcp-streams-per-session"),
            defaults::TCP_STREAMS_PER_SESSION as u64
        );
    }

    /// The example config shows the defaults, not values of its own.
    #[test]
    fn ipv6_addresses_print_in_brackets_beside_a_port_and_bare_for_mosh_client() {
        assert_eq!(with_port("2001:db8::1", 60000), "[2001:db8::1]:60000");
        assert_eq!(with_port("10.0.1.1", 60000), "10.0.1.1:60000");
        let both = [
            "10.0.1.1".to_string(),
            "10.0.2.1".into(),
            "2001:db8:1::1".into(),
        ];
        assert_eq!(
            connect_addresses(&both),
            ("10.0.1.1", Some("2001:db8:1::1"))
        );
        assert_eq!(connect_addresses(&both[..2]), ("10.0.1.1", None));
        assert_eq!(connect_addresses(&[]), ("RELAY", None));
        let session = forwarder_api::SessionInfo {
            id: "s1".into(),
            port: 60000,
            backend: "[2001:db8:2::2]:60001".into(),
            relay_addresses: vec!["2001:db8:1::1".into()],
            idle_timeout_secs: 60,
            idle_ms: 0,
            flows: vec![forwarder_api::FlowInfo {
                client: "[2001:db8:1::2]:40000".into(),
                relay_addr: "2001:db8:1::1".into(),
                relay_port: None,
                upstream_port: 61000,
                packets_to_server: 1,
                bytes_to_server: 100,
                packets_to_client: 1,
                bytes_to_client: 100,
                fast_path_packets: 2,
                slow_path_packets: 0,
                idle_ms: 0,
                server_current: true,
                answered: true,
            }],
            nat: None,
            has_key: false,
            shared_port: None,
            owner: forwarder_api::OwnerInfo::default(),
            relays: Vec::new(),
            tcp: None,
        };
        let text = render_sessions(&[session]);
        assert!(text.contains("backend [2001:db8:2::2]:60001"), "{text}");
        assert!(
            text.contains(
                "flow [2001:db8:1::2]:40000 -> [2001:db8:1::1]:60000 -> upstream port 61000"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_example_config_shows_the_defaults() {
        let file = FileConfig::parse(include_str!("../../packaging/forwarder.toml")).unwrap();
        assert_eq!(file.xdp_mode, Some(defaults::XDP_MODE));
        assert_eq!(file.ports, Some(defaults::PORTS));
        assert_eq!(file.flow_ports, Some(defaults::FLOW_PORTS));
        assert_eq!(file.flow_idle_timeout, Some(defaults::FLOW_IDLE_TIMEOUT));
        assert_eq!(
            file.session_idle_timeout,
            Some(defaults::SESSION_IDLE_TIMEOUT)
        );
        assert_eq!(file.max_sessions, Some(defaults::MAX_SESSIONS));
        assert_eq!(file.max_flows, Some(defaults::MAX_FLOWS));
        assert_eq!(
            file.max_flows_per_session,
            Some(defaults::MAX_FLOWS_PER_SESSION)
        );
        assert_eq!(file.new_flows_per_sec, Some(defaults::NEW_FLOWS_PER_SEC));
        assert_eq!(
            file.probation_flows_per_session,
            Some(defaults::PROBATION_FLOWS_PER_SESSION)
        );
        assert_eq!(
            file.slowpath_pps_per_session,
            Some(defaults::SLOWPATH_PPS_PER_SESSION)
        );
        assert_eq!(file.slowpath_pps, Some(defaults::SLOWPATH_PPS));
        assert_eq!(file.socket_group.as_deref(), Some(defaults::SOCKET_GROUP));
        assert_eq!(file.user_max_sessions, Some(defaults::USER_MAX_SESSIONS));
        assert_eq!(file.user_max_flows, Some(defaults::USER_MAX_FLOWS));
        assert_eq!(
            file.user_new_flows_per_sec,
            Some(defaults::USER_NEW_FLOWS_PER_SEC)
        );
        // Users may add nothing until the operator writes an allow rule.
        assert_eq!(file.user_allow, Some(Vec::new()));
        assert_eq!(
            file.gateway_secure_mode,
            Some(defaults::GATEWAY_SECURE_MODE)
        );
        assert_eq!(
            file.gateway_min_lifetime,
            Some(defaults::GATEWAY_MIN_LIFETIME)
        );
        assert_eq!(
            file.gateway_max_lifetime,
            Some(defaults::GATEWAY_MAX_LIFETIME)
        );
        assert_eq!(
            file.gateway_max_mappings_per_host,
            Some(defaults::GATEWAY_MAX_MAPPINGS_PER_HOST)
        );
        assert_eq!(file.gateway_upnp_port, Some(defaults::GATEWAY_UPNP_PORT));
        // The commented rules parse as rules.
        let text = include_str!("../../packaging/forwarder.toml");
        let rules = text
            .lines()
            .find_map(|line| line.strip_prefix("# gateway_rules = "))
            .expect("a gateway_rules example");
        let rules: Vec<String> = toml::from_str::<std::collections::BTreeMap<String, Vec<String>>>(
            &format!("r = {rules}"),
        )
        .unwrap()
        .remove("r")
        .unwrap();
        for rule in rules {
            rule.parse::<crate::gateway::rules::Rule>().unwrap();
        }
        assert_eq!(file.tcp_max_streams, Some(defaults::TCP_MAX_STREAMS));
        assert_eq!(
            file.tcp_streams_per_session,
            Some(defaults::TCP_STREAMS_PER_SESSION)
        );
    }

    #[test]
    fn user_rules_come_from_the_flags_or_else_the_file() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("forwarder.toml");
        std::fs::write(
            &config,
            "interfaces = [\"eth0\"]\nsocket_group = \"ops\"\nuser_allow = [\"10.0.0.0/8\"]\n\
             user_max_sessions = 3\n[group.ops]\nmax_sessions = 5\n",
        )
        .unwrap();
        let options = |extra: &[&str]| {
            let mut argv = vec!["forwarder", "run", "--config", config.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let Verb::Run(args) = Cli::parse_from(argv).verb else {
                panic!("not run")
            };
            run_options(None, args).unwrap()
        };
        let from_file = options(&[]);
        assert_eq!(from_file.socket_group, "ops");
        assert_eq!(from_file.users.allow, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(from_file.users.quota.max_sessions, 3);
        assert_eq!(from_file.users.groups["ops"].max_sessions, Some(5));
        let flags = options(&[
            "--user-allow",
            "192.0.2.0/24:60000-61000",
            "--user-allow",
            "198.51.100.7",
            "--user-deny",
            "192.0.2.9",
            "--socket-group",
            "mosh",
            "--user-max-sessions",
            "1",
        ]);
        assert_eq!(flags.socket_group, "mosh");
        assert_eq!(
            flags.users.allow.len(),
            2,
            "the flags replace the file's rules"
        );
        assert_eq!(flags.users.deny.len(), 1);
        assert_eq!(flags.users.quota.max_sessions, 1);
        let bad = Cli::try_parse_from(["forwarder", "run", "--user-allow", "10.0.0.0/8:x"])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("not a port"), "{bad}");
    }

    #[test]
    fn max_flows6_follows_max_flows_unless_given_and_is_checked_like_it() {
        let sizes = |argv: &str| {
            let cli = Cli::try_parse_from(argv.split_whitespace()).unwrap();
            let Verb::Run(args) = cli.verb else { panic!() };
            run_options(None, args).map(|options| options.sizes)
        };
        let default = sizes("forwarder run --iface a").unwrap();
        assert_eq!(
            (default.max_flows, default.max_flows6),
            (defaults::MAX_FLOWS, defaults::MAX_FLOWS)
        );
        let small = sizes("forwarder run --iface a --max-flows 100").unwrap();
        assert_eq!(
            small.max_flows6, 100,
            "a small relay: the same room in both"
        );
        let large = sizes("forwarder run --iface a --max-flows 1000000").unwrap();
        assert_eq!(
            large.max_flows6, 65_536,
            "a large relay: IPv6 buckets capped"
        );
        // Given, it wins, above --max-flows too (an IPv6-only relay).
        let six = sizes("forwarder run --iface a --max-flows 100 --max-flows6 200000").unwrap();
        assert_eq!((six.max_flows, six.max_flows6), (100, 200_000));
        // And from the file, under the flag.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("forwarder.toml");
        std::fs::write(&config, "interfaces = [\"eth0\"]\nmax_flows6 = 7\n").unwrap();
        let path = config.display();
        assert_eq!(
            sizes(&format!("forwarder run --config {path}"))
                .unwrap()
                .max_flows6,
            7
        );
        assert_eq!(
            sizes(&format!("forwarder run --config {path} --max-flows6 9"))
                .unwrap()
                .max_flows6,
            9
        );
        let zero = sizes("forwarder run --iface a --max-flows6 0")
            .unwrap_err()
            .to_string();
        assert!(
            zero.contains("--max-flows6 0 is out of range: give 1 to"),
            "{zero}"
        );
        let huge = sizes("forwarder run --iface a --max-flows6 99999999")
            .unwrap_err()
            .to_string();
        assert!(
            huge.contains("--max-flows6 99999999 is out of range"),
            "{huge}"
        );
    }

    #[test]
    fn gateway_flags_and_config_merge() {
        let parse = |argv: &str| {
            let cli = Cli::try_parse_from(argv.split_whitespace()).unwrap();
            let Verb::Run(args) = cli.verb else { panic!() };
            run_options(None, args)
        };
        assert!(parse("forwarder run --iface a").unwrap().gateway.is_none());
        let options =
            parse("forwarder run --iface a --iface b --gateway b --gateway-secure-mode false")
                .unwrap()
                .gateway
                .unwrap();
        assert_eq!(options.interfaces, ["b"]);
        assert!(!options.secure_mode);
        assert!(options.rules.is_empty());
        // From the config file; a flag wins over it.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("forwarder.toml");
        std::fs::write(
            &config,
            "interfaces = [\"a\", \"b\"]\ngateway = [\"b\"]\n\
             gateway_rules = [\"deny 60000 10.0.0.0/8 0-65535\", \"allow 60000-60999 10.0.0.0/8 1024-65535\"]\n\
             gateway_max_mappings_per_host = 3\n",
        )
        .unwrap();
        let from_file = parse(&format!("forwarder run --config {}", config.display()))
            .unwrap()
            .gateway
            .unwrap();
        assert_eq!(from_file.interfaces, ["b"]);
        assert_eq!(from_file.rules.len(), 2);
        assert_eq!(from_file.max_mappings_per_host, 3);
        assert!(from_file.secure_mode);
        let mut argv: Vec<String> = format!("forwarder run --config {}", config.display())
            .split_whitespace()
            .map(String::from)
            .collect();
        argv.extend(["--gateway-rule".into(), "allow 1-2 10.0.0.1 3".into()]);
        let Verb::Run(args) = Cli::try_parse_from(argv).unwrap().verb else {
            panic!()
        };
        let overridden = run_options(None, args).unwrap().gateway.unwrap();
        assert_eq!(overridden.rules.len(), 1);
        let error = parse("forwarder run --iface a --gateway a --gateway-rule permit").unwrap_err();
        assert!(error.to_string().contains("allow|deny"), "{error}");
        let error = parse(
            "forwarder run --iface a --gateway a --gateway-min-lifetime 2h --gateway-max-lifetime 1h",
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("gateway-max-lifetime"),
            "{error}"
        );
    }

    #[test]
    fn typed_config_values_say_what_is_wrong() {
        for (text, says) in [
            ("flow_idle_timeout = \"soon\"", "flow_idle_timeout"),
            ("xdp_mode = \"fast\"", "xdp_mode"),
            ("ports = \"60000\"", "ports"),
        ] {
            let error = FileConfig::parse(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
