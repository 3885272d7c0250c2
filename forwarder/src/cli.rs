//! The command line: thin verbs over the library.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::control::client::call;
use crate::control::proto::{Reply, Request, SessionInfo, StatsInfo};
use crate::daemon::{self, RunOptions};
use crate::datapath::DatapathChoice;
use crate::datapath::xdp::ModeChoice;
use crate::ports::PortRange;
use crate::sessions::Limits;

#[derive(Parser, Debug)]
#[command(name = "forwarder", version, about = "XDP-accelerated UDP relay for mosh")]
pub struct Cli {
    /// Names the control socket, so several relays can share a host.
    #[arg(long, global = true, env = "FORWARDER_INSTANCE", default_value = "default")]
    pub instance: String,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Run the relay daemon in the foreground.
    Run(RunArgs),
    /// Create a session towards a mosh-server and print the port to give mosh-client.
    Add {
        /// The mosh server: IPV4:PORT (the port from `MOSH CONNECT <port> <key>`).
        #[arg(long)]
        backend: String,
        /// Client-facing port to use (default: the next free one).
        #[arg(long)]
        port: Option<u16>,
        /// Remove the session after this long without traffic (default 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a session by id or client-facing port.
    Remove {
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// List sessions and their flows with counters.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show the data plane's verdict and reason counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Interface to attach XDP to (repeat for each side of the relay).
    #[arg(long = "iface", required = true)]
    pub interfaces: Vec<String>,
    /// XDP fast path, the daemon's sockets only, or XDP with a fallback to sockets.
    #[arg(long, value_enum, default_value = "auto")]
    pub datapath: DatapathChoice,
    /// How to attach XDP: native falls back to generic (skb) in auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: ModeChoice,
    /// Client-facing session ports.
    #[arg(long, default_value = "60000-60999")]
    pub ports: PortRange,
    /// Backend-facing per-flow ports.
    #[arg(long, default_value = "61000-61999")]
    pub flow_ports: PortRange,
    /// Forget a client endpoint after this long without traffic.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub flow_idle_timeout: Duration,
    /// Default idle timeout of a session (long enough for a laptop to sleep overnight).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub session_idle_timeout: Duration,
    /// Most client endpoints one session may have at once.
    #[arg(long, default_value_t = 32)]
    pub max_flows_per_session: usize,
    /// New client endpoints a session may gain per second (bursts of twice that).
    #[arg(long, default_value_t = 4)]
    pub new_flows_per_sec: u32,
    /// Packets per second the XDP program hands to the daemon for one
    /// session (new client endpoints, route misses); beyond it they are
    /// dropped and counted. 0: unlimited.
    #[arg(long, default_value_t = 1_000)]
    pub slowpath_pps_per_session: u32,
    /// Packets per second the XDP program hands to the daemon for all relay
    /// ports together. 0: unlimited.
    #[arg(long, default_value_t = 20_000)]
    pub slowpath_pps: u32,
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.verb {
        Verb::Run(args) => {
            let options = RunOptions {
                instance: cli.instance,
                interfaces: args.interfaces,
                datapath: args.datapath,
                xdp_mode: args.xdp_mode,
                session_ports: args.ports,
                flow_ports: args.flow_ports,
                limits: Limits {
                    flow_idle_timeout: args.flow_idle_timeout,
                    default_session_idle_timeout: args.session_idle_timeout,
                    max_flows_per_session: args.max_flows_per_session,
                    new_flows_per_sec: args.new_flows_per_sec,
                },
                slowpath_pps_per_session: args.slowpath_pps_per_session,
                slowpath_pps: args.slowpath_pps,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Verb::Add { backend, port, idle_timeout, json } => {
            daemon::validate_instance(&cli.instance)?;
            if idle_timeout.is_some_and(|timeout| timeout.is_zero()) {
                bail!("an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h");
            }
            let request = Request::Add {
                backend,
                port,
                idle_timeout_secs: idle_timeout.map(|d| d.as_secs().max(1)),
            };
            let Reply::Session(session) = call(&cli.instance, &request)? else {
                bail!("the daemon answered `add` with something else: is it the same version?")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&session)?);
            } else {
                let address = session.relay_addresses.first().map(String::as_str).unwrap_or("RELAY");
                println!("session {} forwards port {} to {}", session.id, session.port, session.backend);
                println!("connect with: MOSH_KEY=<key> mosh-client {address} {}", session.port);
            }
            Ok(())
        }
        Verb::Remove { target, json } => {
            daemon::validate_instance(&cli.instance)?;
            let Reply::Removed(session) = call(&cli.instance, &Request::Remove { target })? else {
                bail!("the daemon answered `remove` with something else: is it the same version?")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&session)?);
            } else {
                println!("removed session {} (port {}, backend {})", session.id, session.port, session.backend);
            }
            Ok(())
        }
        Verb::List { json } => {
            daemon::validate_instance(&cli.instance)?;
            let Reply::Sessions(sessions) = call(&cli.instance, &Request::List {})? else {
                bail!("the daemon answered `list` with something else: is it the same version?")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                print!("{}", render_sessions(&sessions));
            }
            Ok(())
        }
        Verb::Stats { json } => {
            daemon::validate_instance(&cli.instance)?;
            let Reply::Stats(stats) = call(&cli.instance, &Request::Stats {})? else {
                bail!("the daemon answered `stats` with something else: is it the same version?")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", render_stats(&stats));
            }
            Ok(())
        }
    }
}

fn render_sessions(sessions: &[SessionInfo]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if sessions.is_empty() {
        out.push_str("no sessions (add one with `forwarder add --backend IP:PORT`)\n");
        return out;
    }
    for s in sessions {
        let _ = writeln!(
            out,
            "session {}  port {}  backend {}  flows {}  idle {:.1}s (expires after {}s)",
            s.id,
            s.port,
            s.backend,
            s.flows.len(),
            s.idle_secs,
            s.idle_timeout_secs
        );
        for f in &s.flows {
            let _ = writeln!(
                out,
                "  flow {} -> {}:{} -> upstream port {}{}",
                f.client,
                f.relay_addr,
                s.port,
                f.upstream_port,
                if f.server_current { "  [server replies here]" } else { "" }
            );
            let _ = writeln!(
                out,
                "    to server {} pkts / {} B, to client {} pkts / {} B; fast path (XDP) {} pkts, slow path (daemon) {} pkts; idle {:.1}s",
                f.packets_to_server,
                f.bytes_to_server,
                f.packets_to_client,
                f.bytes_to_client,
                f.fast_path_packets,
                f.slow_path_packets,
                f.idle_secs
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
        stats.xdp_mode,
        stats.interfaces.join(", "),
        stats.sessions,
        stats.flows
    );
    let verdicts: Vec<String> = stats.verdicts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "XDP verdicts: {}", verdicts.join(", "));
    let _ = writeln!(out, "XDP reasons (packets / bytes):");
    for (name, counter) in stats.reasons.iter().filter(|(_, c)| c.packets > 0) {
        let _ = writeln!(out, "  {name:<22} {:>10} / {}", counter.packets, counter.bytes);
    }
    let s = &stats.slow_path;
    let _ = writeln!(
        out,
        "daemon slow path: {} to servers, {} to clients, {} flows created, {} expired; refused: {} over flow limit, {} over rate; dropped: {} not from the server, {} without session",
        s.forwarded_to_server,
        s.forwarded_to_client,
        s.flows_created,
        s.flows_expired,
        s.refused_flow_limit,
        s.refused_rate_limit,
        s.dropped_not_from_server,
        s.dropped_no_session
    );
    out
}
