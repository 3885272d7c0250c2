//! `forwarder run`: load and attach the XDP program, serve the control
//! socket, expire idle flows and sessions, and clean up on SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use forwarder_common::{REASON_COUNT, Reason, RelayConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::control::proto::{PacketsBytes, StatsInfo};
use crate::control::{self};
use crate::datapath::xdp::ModeChoice;
use crate::datapath::{Datapath, DatapathChoice};
use crate::ports::PortRange;
use crate::sessions::{Limits, Relay, monotonic_ns};
use crate::slowpath::SharedRelay;

/// Everything `forwarder run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub instance: String,
    pub interfaces: Vec<String>,
    pub datapath: DatapathChoice,
    pub xdp_mode: ModeChoice,
    pub session_ports: PortRange,
    pub flow_ports: PortRange,
    pub limits: Limits,
    /// Rate limits on what the XDP program hands to the daemon (0: unlimited).
    pub slowpath_pps_per_session: u32,
    pub slowpath_pps: u32,
}

/// Checks an instance name: it becomes part of file paths.
pub fn validate_instance(instance: &str) -> anyhow::Result<()> {
    let ok = !instance.is_empty()
        && instance.len() <= 32
        && instance.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("instance name {instance:?} must be 1-32 characters of A-Z a-z 0-9 - _");
    }
    Ok(())
}

fn interface_addresses(interfaces: &[String]) -> Vec<Ipv4Addr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addresses
        .filter(|a| interfaces.contains(&a.interface_name))
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect()
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    validate_instance(&options.instance)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("forwarder run must run as root (it loads an XDP program and binds relay ports): use sudo");
    }
    if options.interfaces.is_empty() {
        bail!("no interface given: pass --iface IF for every interface clients or servers reach the relay on");
    }
    if options.session_ports.overlaps(&options.flow_ports) {
        bail!(
            "--ports {} and --flow-ports {} overlap: give them disjoint ranges",
            options.session_ports,
            options.flow_ports
        );
    }
    raise_fd_limit();
    let socket_path = control::socket_path(&options.instance);
    let listener = control::server::bind(&socket_path, &options.instance)?;

    let config = RelayConfig {
        session_port_lo: options.session_ports.lo,
        session_port_hi: options.session_ports.hi,
        flow_port_lo: options.flow_ports.lo,
        flow_port_hi: options.flow_ports.hi,
    };
    let mut datapath = Datapath::start(options.datapath, &options.interfaces, options.xdp_mode, config)?;
    datapath.limit_slowpath(options.slowpath_pps_per_session, options.slowpath_pps)?;
    let relay_addresses = interface_addresses(&options.interfaces);
    info!(
        instance = %options.instance,
        interfaces = ?options.interfaces,
        datapath = %datapath.mode(),
        ports = %options.session_ports,
        flow_ports = %options.flow_ports,
        socket = %socket_path.display(),
        "forwarder ready"
    );
    let relay: SharedRelay = Arc::new(Mutex::new(Relay::new(
        options.instance.clone(),
        options.limits.clone(),
        options.interfaces.clone(),
        relay_addresses,
        datapath,
        options.session_ports,
        options.flow_ports,
    )));

    let server = tokio::spawn(control::server::serve(listener, relay.clone()));
    let expiry = tokio::spawn(expire_forever(relay.clone()));

    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => info!("SIGINT: shutting down"),
    }
    server.abort();
    expiry.abort();
    let _ = std::fs::remove_file(&socket_path);
    relay.lock().expect("relay lock").clear();
    info!("stopped; the XDP program is detached");
    Ok(())
}

/// Every session port and every flow holds a socket: lift the soft limit on
/// open files to the hard one so large relays do not run out at 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, "could not raise the open-file limit; large relays may run out of sockets");
            }
        }
        _ => {}
    }
}

async fn expire_forever(relay: SharedRelay) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        relay.lock().expect("relay lock").expire(monotonic_ns());
    }
}

/// Global counters for `forwarder stats`.
pub fn stats(relay: &Relay) -> StatsInfo {
    let counters = relay.datapath.reason_counters();
    let mut verdicts: BTreeMap<String, u64> = ["pass", "drop", "tx", "redirect"]
        .into_iter()
        .map(|v| (v.to_string(), 0))
        .collect();
    let mut reasons = BTreeMap::new();
    for (reason, counter) in Reason::ALL.iter().zip(&counters).take(REASON_COUNT as usize) {
        *verdicts.entry(reason.verdict().name().to_string()).or_default() += counter.packets;
        reasons.insert(
            reason.name().to_string(),
            PacketsBytes { packets: counter.packets, bytes: counter.bytes },
        );
    }
    StatsInfo {
        instance: relay.instance.clone(),
        xdp_mode: relay.datapath.mode(),
        interfaces: relay.interfaces.clone(),
        sessions: relay.session_count(),
        flows: relay.flow_count(),
        verdicts,
        reasons,
        slow_path: relay.stats.clone(),
    }
}
