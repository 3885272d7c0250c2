//! `forwarder run`: adopt (or load and pin) the XDP data plane, restore the
//! stored sessions, serve the control socket and expire idle flows and
//! sessions. Stopping leaves the pinned data plane forwarding; `forwarder
//! detach` removes it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use anyhow::{Context, bail};
use forwarder_common::RelayConfig;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use forwarder_common::config::RuntimeSizes;

use crate::control::{self};
use crate::datapath::fds;
use crate::datapath::pins::PinDir;
use crate::datapath::xdp::{self, ModeChoice, XdpDatapath};
use crate::datapath::{Datapath, DatapathChoice, FlowMapsPass, Slice};
use crate::expiry;
use crate::ports::PortRange;
use crate::sessions::SharedRelay;
use crate::sessions::{Limits, Relay, RelayParts, monotonic_ns};
use crate::slowpath::{spawn_flow_reader, spawn_session_reader, spawn_shared_reader};
use crate::store::Store;

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
    /// Every map size and slot count, from --max-flows and --max-sessions.
    pub sizes: RuntimeSizes,
    /// --max-open-files: the open-file limit to set instead of raising it.
    pub max_open_files: Option<u64>,
    /// Where the session store lives.
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// The punch handshake for servers behind NAT, when enabled.
    pub punch: Option<crate::punch::relay::PunchOptions>,
    /// `--shared-port`: the one port every keyed session is reachable on too.
    pub shared_port: Option<u16>,
    /// The control socket's group: its members may create sessions.
    pub socket_group: String,
    /// What those non-root callers may do: backend policy and quotas.
    pub users: crate::users::UserPolicy,
    /// Gateway mode (NAT-PMP, PCP, UPnP IGD on the LAN side), when enabled.
    pub gateway: Option<crate::gateway::GatewayOptions>,
    /// Sessions shared with other relays through etcd (`--etcd`), when given.
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// `--tcp-port`: mosh over TCP for networks that block UDP.
    pub tcp: Option<crate::tcpbridge::TcpBridgeOptions>,
}

/// Checks an instance name: it becomes part of file paths.
pub fn validate_instance(instance: &str) -> anyhow::Result<()> {
    let ok = !instance.is_empty()
        && instance.len() <= 32
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        bail!("instance name {instance:?} must be 1-32 characters of A-Z a-z 0-9 - _");
    }
    Ok(())
}

/// The served interfaces' addresses of both families: the ones clients
/// send to, and never a client themselves.
fn interface_addresses(interfaces: &[String]) -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter(|a| interfaces.contains(&a.interface_name))
        .filter_map(|a| {
            let address = a.address?;
            match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            }
        })
        .collect()
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    validate_instance(&options.instance)?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "forwarder run must run as root (it loads an XDP program and binds relay ports): use sudo"
        );
    }
    if options.interfaces.is_empty() {
        bail!(
            "no interface given: pass --iface IF for every interface clients or servers reach the relay on"
        );
    }
    if options.session_ports.overlaps(&options.flow_ports) {
        bail!(
            "--ports {} and --flow-ports {} overlap: give them disjoint ranges",
            options.session_ports,
            options.flow_ports
        );
    }
    match options.max_open_files {
        Some(limit) => fds::set_limit(limit)?,
        None => raise_fd_limit(),
    }
    if let Some(punch) = &options.punch
        && (options.session_ports.contains(punch.port) || options.flow_ports.contains(punch.port))
    {
        bail!(
            "--punch-port {} lies inside --ports {} or --flow-ports {}: give it a port outside both",
            punch.port,
            options.session_ports,
            options.flow_ports
        );
    }
    if let (Some(shared), Some(punch)) = (options.shared_port, &options.punch)
        && shared == punch.port
    {
        bail!("--shared-port and --punch-port are both {shared}: give them different ports");
    }
    if let Some(shared) = options.shared_port
        && options.flow_ports.contains(shared)
    {
        bail!(
            "--shared-port {shared} lies inside --flow-ports {}: give a port outside it",
            options.flow_ports
        );
    }
    if options.cluster.is_some() && options.punch.is_some() {
        bail!(
            "--etcd and --punch-port do not go together yet: a punched session lives on the one relay its \
             server punched to, so it cannot be shared; run the relays for servers behind NAT without --etcd"
        );
    }
    let cluster = match options.cluster.clone() {
        Some(cluster) => Some(crate::cluster::Cluster::new(
            cluster,
            options.session_ports,
            options.limits.default_session_idle_timeout,
        )?),
        None => None,
    };
    let socket_path = forwarder_api::socket_path(&options.instance);
    let socket_group = control::server::SocketGroup::lookup(&options.socket_group)?;
    for table in options.users.unknown_names() {
        tracing::warn!(
            "the config's {table} names no user or group on this host: it applies to nobody until it exists \
             (check the spelling)"
        );
    }
    let listener = control::server::bind(&socket_path, &options.instance, &socket_group)?;
    // From here on a failed start removes what it built (see StartGuard).
    let mut guard = StartGuard {
        socket_path: socket_path.clone(),
        fresh_pins: None,
        armed: true,
    };
    // Before the data plane: an address in use is the cheapest failure.
    let metrics_listener = match options.metrics {
        Some(address) => Some((address, crate::metrics::bind(address).await?)),
        None => None,
    };
    let tcp_listener = match &options.tcp {
        Some(tcp) => Some(crate::tcpbridge::bind(tcp.port).await?),
        None => None,
    };

    let config = RelayConfig {
        session_port_lo: options.session_ports.lo,
        session_port_hi: options.session_ports.hi,
        flow_port_lo: options.flow_ports.lo,
        flow_port_hi: options.flow_ports.hi,
        shared_port: options.shared_port.unwrap_or(0),
        _pad: 0,
    };
    let pins = PinDir::new(&options.instance, xdp::layout()?);
    let mut fresh_pins = false;
    let started_xdp = Datapath::start(options.datapath, options.sizes, || {
        let adopting = pins.prepare(&options.instance)?;
        fresh_pins = !adopting;
        let xdp = XdpDatapath::start(
            &options.interfaces,
            options.xdp_mode,
            config,
            options.sizes,
            &pins,
        );
        if xdp.is_err() && fresh_pins {
            // Falling back to the userspace datapath (auto) keeps no XDP: drop
            // the maps the loader pinned before it failed.
            pins.remove_fresh();
        }
        Ok((xdp?, adopting))
    });
    if fresh_pins {
        guard.fresh_pins = Some(pins.clone());
    }
    let (mut datapath, adopting) = started_xdp?;
    let egress_table = datapath.take_egress_table();
    // Before the restore below, which gives every restored session its bucket.
    datapath.limit_slowpath(options.slowpath_pps_per_session, options.slowpath_pps)?;
    let mut store = Store::open(&options.state_dir)?;
    // Punched sessions are stored with their key sealed under the punch secret.
    if let Some(punch) = &options.punch {
        store.set_key_sealer(punch.secret.key_sealer());
    }
    let records = store.sessions()?;
    let relay_addresses = interface_addresses(&options.interfaces);
    let mode = datapath.mode();
    let relay: SharedRelay = Arc::new(Mutex::new(Relay::new(RelayParts {
        instance: options.instance.clone(),
        limits: options.limits.clone(),
        interfaces: options.interfaces.clone(),
        relay_addresses,
        datapath,
        session_ports: options.session_ports,
        flow_ports: options.flow_ports,
        store: Some(store),
    })));
    // Before the restore, which adopts the pinned flows on the shared port.
    let shared_socket = match options.shared_port {
        Some(port) => Some(relay.lock().expect("relay lock").open_shared_port(port)?),
        None => None,
    };
    let tcp_counters = match &options.tcp {
        Some(tcp) => {
            let secret =
                crate::store::state_secret(&options.state_dir, crate::tcpwire::TOKEN_SECRET_FILE)?;
            Some(
                relay
                    .lock()
                    .expect("relay lock")
                    .offer_tcp(tcp.port, secret),
            )
        }
        None => None,
    };
    let restored = {
        let mut relay = relay.lock().expect("relay lock");
        relay.set_user_policy(options.users.clone());
        relay.restore(records)
    };
    // Shared sessions: the sync task reconciles the restored ones with etcd.
    let cluster_sync = cluster.clone().map(|cluster| {
        cluster.publish_view(&relay);
        let start_reader: crate::cluster::StartReader = Arc::new(spawn_session_reader);
        tokio::spawn(cluster.run(relay.clone(), start_reader))
    });
    let (sessions, flows) = (restored.session_sockets.len(), restored.flow_sockets.len());
    let nat_upstreams = restored.nat_upstream_sockets;
    for socket in restored.session_sockets {
        spawn_session_reader(relay.clone(), socket);
    }
    for socket in restored.flow_sockets {
        spawn_flow_reader(relay.clone(), socket);
    }
    if let Some(socket) = shared_socket {
        spawn_shared_reader(relay.clone(), socket);
    }
    info!(
        instance = %options.instance,
        interfaces = ?options.interfaces,
        mode = %mode,
        ports = %options.session_ports,
        flow_ports = %options.flow_ports,
        shared_port = ?options.shared_port,
        tcp_port = ?options.tcp.as_ref().map(|tcp| tcp.port),
        socket = %socket_path.display(),
        socket_group = %socket_group.name,
        user_allow_rules = options.users.allow.len(),
        pins = %pins.dir.display(),
        adopted = adopting,
        sessions_restored = sessions,
        flows_restored = flows,
        sessions_dropped = restored.dropped_sessions,
        map_halves_dropped = restored.dropped_halves,
        ready_ms = started.elapsed().as_millis() as u64,
        "forwarder ready"
    );

    let metrics = match metrics_listener {
        Some((address, listener)) => {
            info!(%address, "serving Prometheus metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(listener, relay.clone())))
        }
        None => None,
    };
    let server = tokio::spawn(control::server::serve(
        listener,
        relay.clone(),
        std::sync::Arc::new(spawn_session_reader),
        cluster,
    ));
    let expiry = tokio::spawn(expire_forever(relay.clone()));
    let punch = match options.punch.clone() {
        Some(punch) => Some(tokio::spawn(crate::punch::relay::service(
            relay.clone(),
            punch,
            nat_upstreams,
        )?)),
        None => None,
    };
    let gateway = match options.gateway.clone() {
        Some(gateway) => {
            let (_, serve) = crate::gateway::service::start(crate::gateway::service::Parts {
                relay: relay.clone(),
                start_reader: std::sync::Arc::new(spawn_session_reader),
                options: gateway,
                relay_interfaces: options.interfaces.clone(),
                session_ports: options.session_ports,
                state_dir: options.state_dir.clone(),
                instance: options.instance.clone(),
            })?;
            Some(tokio::spawn(serve))
        }
        None => None,
    };
    let tcp =
        match (tcp_listener, options.tcp.clone(), tcp_counters) {
            (Some(listener), Some(tcp), Some(counters)) => Some(tokio::spawn(
                crate::tcpbridge::serve(listener, relay.clone(), tcp, counters),
            )),
            _ => None,
        };
    let health = tokio::spawn(crate::datapath::health::watch(
        options.interfaces.clone(),
        mode.clone(),
    ));
    let egress = egress_table.map(|table| tokio::spawn(crate::datapath::egress::watch(table)));
    // Started: from now on the pinned data plane outlives the daemon on purpose.
    guard.armed = false;

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => info!("SIGINT: shutting down"),
    }
    server.abort();
    // What keyed sessions have seen, for the next start's replay rule.
    relay.lock().expect("relay lock").store_keyed_progress(true);
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    expiry.abort();
    health.abort();
    if let Some(egress) = egress {
        egress.abort();
    }
    if let Some(cluster_sync) = cluster_sync {
        cluster_sync.abort();
    }
    if let Some(punch) = punch {
        punch.abort();
    }
    if let Some(gateway) = gateway {
        gateway.abort();
    }
    if let Some(tcp) = tcp {
        tcp.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    info!(
        pins = %pins.dir.display(),
        "stopped; the pinned data plane keeps forwarding established flows (`forwarder detach` removes it)"
    );
    Ok(())
}

/// Every session port and every flow holds a socket: lift the limit on open
/// files (hard limit too, up to the kernel's fs.nr_open, which root may) so
/// large relays do not run out of sockets.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .max(hard);
    if soft >= ceiling {
        return;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_err()
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(%error, soft, "could not raise the open-file limit; large relays may run out of sockets");
    }
}

/// Undoes a `run` that failed before it was ready: the control socket's
/// file, and the data plane when this run created it. A data plane adopted
/// from an earlier run is left alone: it is still forwarding established flows.
struct StartGuard {
    socket_path: PathBuf,
    fresh_pins: Option<PinDir>,
    armed: bool,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = std::fs::remove_file(&self.socket_path);
        if let Some(pins) = &self.fresh_pins {
            pins.remove_fresh();
            info!(pins = %pins.dir.display(), "start failed: removed the data plane it had begun to build");
        }
    }
}

/// What `forwarder detach` removed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detached {
    pub instance: String,
    pub pins_removed: usize,
    pub store_removed: bool,
    /// A control socket file left by a daemon that died without cleaning up.
    pub stale_socket_removed: bool,
}

/// How long `detach` waits for a daemon's reply to one request.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How long `detach` waits for a silent holder of the control socket to go.
const SILENT_HOLDER_WAIT: Duration = Duration::from_secs(6);

/// Who is behind an instance's control socket.
enum SocketHolder {
    /// Nobody listens: a killed daemon's leftover file, or no file.
    Nobody,
    /// A daemon answered a request.
    Daemon,
    /// Something accepts connections but does not answer.
    Silent,
}

/// A connection alone does not tell a daemon from a leftover: a child a
/// killed daemon had forked (between fork and exec, or one that keeps the
/// descriptor, as daemons before this one spawned `ethtool` every two
/// seconds) holds the listening socket for a moment after the daemon died,
/// and a connect to it succeeds, unanswered. So a request is sent.
fn socket_holder(socket: &std::path::Path) -> SocketHolder {
    use std::io::{BufRead, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return SocketHolder::Nobody;
    };
    let mut line = serde_json::to_string(&forwarder_api::Request::Stats {})
        .expect("a unit request serialises");
    line.push('\n');
    if stream.set_read_timeout(Some(ANSWER_WAIT)).is_err()
        || stream.write_all(line.as_bytes()).is_err()
    {
        return SocketHolder::Silent;
    }
    let mut reply = String::new();
    // Any reply line, an error one too, comes from a live daemon.
    match std::io::BufReader::new(stream).read_line(&mut reply) {
        Ok(read) if read > 0 => SocketHolder::Daemon,
        _ => SocketHolder::Silent,
    }
}

/// Removes an instance's pinned data plane (the XDP program leaves every
/// interface; established flows stop) and, with `purge`, its session store.
/// Refuses while the daemon runs: it would keep answering for a data plane
/// that is gone.
pub fn detach(
    instance: &str,
    state_dir: &std::path::Path,
    purge: bool,
) -> anyhow::Result<Detached> {
    validate_instance(instance)?;
    let socket = forwarder_api::socket_path(instance);
    let silent_since = Instant::now();
    loop {
        match socket_holder(&socket) {
            SocketHolder::Nobody => break,
            SocketHolder::Daemon => bail!(
                "the daemon of instance {instance:?} is running ({} answers): stop it first \
                 (`systemctl stop {}` or SIGTERM), then detach",
                socket.display(),
                control::systemd_unit(instance)
            ),
            SocketHolder::Silent if silent_since.elapsed() < SILENT_HOLDER_WAIT => {
                std::thread::sleep(Duration::from_millis(200));
            }
            SocketHolder::Silent => bail!(
                "something holds the control socket {} of instance {instance:?} but does not \
                 answer (a stuck daemon, or a process a dead one started): find it with \
                 `ss -xlp | grep {}`, stop it, then detach",
                socket.display(),
                socket.display()
            ),
        }
    }
    // Nobody answers on it (checked above): a killed daemon's leftover.
    let stale_socket_removed = socket.exists()
        && std::fs::remove_file(&socket)
            .map(|()| true)
            .with_context(|| format!("removing the stale control socket {}", socket.display()))?;
    let pins_removed = crate::datapath::pins::remove_instance(instance)?;
    let store_removed = purge && state_dir.is_dir();
    if store_removed {
        std::fs::remove_dir_all(state_dir)
            .with_context(|| format!("removing {}", state_dir.display()))?;
    }
    info!(
        instance,
        pins_removed, store_removed, stale_socket_removed, "data plane detached"
    );
    Ok(Detached {
        instance: instance.to_string(),
        pins_removed,
        store_removed,
        stale_socket_removed,
    })
}

/// The expiry tick's period.
const TICK: Duration = Duration::from_secs(1);

/// Mid-pass failures in a row after which the tick stops reading in bulk.
const MAX_RESTARTS: u32 = 3;

/// Every [`TICK`]: a slice of the flow maps is read in bulk with the relay
/// unlocked, resuming the pass the last tick left, so learning and the API
/// go on meanwhile and a million entries cost no core-second at once
/// (slice size: [`expiry::slice_entries`]). Flows are judged when a pass
/// completes, under the lock, from what it read; without bulk reads
/// (userspace datapath, kernels before 5.6) every tick judges them with a
/// lookup each.
async fn expire_forever(relay: SharedRelay) {
    let mut bulk_failed = false;
    let mut restarts = 0;
    let mut pass: Option<FlowMapsPass> = None;
    // Entries the last complete pass read: the next one's expected size.
    let mut last_pass_entries = 0;
    loop {
        tokio::time::sleep(TICK).await;
        // Read before the reader is made: see FlowMapsPass::start.
        let pass_start_ns = monotonic_ns();
        let (shortest_idle, flows) = {
            let relay = relay.lock().expect("relay lock");
            if pass.is_none() && !bulk_failed {
                pass = relay
                    .flow_maps_reader()
                    .map(|reader| FlowMapsPass::start(reader, pass_start_ns));
            }
            (relay.shortest_idle_timeout(), relay.flow_count())
        };
        // None: nothing reads in bulk here (userspace datapath, bulk reads
        // failed, or no descriptors), so each flow is looked up.
        let in_bulk = pass.is_some();
        let started = Instant::now();
        let mut complete = None;
        if let Some(mut reading) = pass.take() {
            // Two halves a flow: what the pass will at least find.
            let expected = last_pass_entries.max(reading.entries()).max(flows * 2);
            let budget = expiry::slice_entries(expected, shortest_idle, TICK);
            let slice = tokio::task::spawn_blocking(move || {
                let slice = reading.read_slice(budget);
                (reading, slice)
            });
            match slice.await {
                Ok((reading, Ok(Slice::Partial))) => pass = Some(reading),
                Ok((reading, Ok(Slice::Complete))) => {
                    restarts = 0;
                    complete = Some(reading.finish());
                }
                Ok((_, Ok(Slice::Restart(error)))) => {
                    restarts += 1;
                    if restarts >= MAX_RESTARTS {
                        warn!(%error, "reading the flow maps in bulk failed in mid-pass {restarts} times in a row; the expiry tick reads each flow under the relay lock from now on");
                        bulk_failed = true;
                    } else {
                        debug!(%error, "reading the flow maps in bulk failed in mid-pass; starting the pass over");
                    }
                }
                Ok((_, Err(error))) => {
                    warn!(%error, "reading the flow maps in bulk (BPF_MAP_LOOKUP_BATCH, Linux 5.6 and later) failed; the expiry tick reads each flow under the relay lock from now on");
                    bulk_failed = true;
                }
                Err(error) => {
                    warn!(%error, "the expiry tick's map read did not finish; starting the pass over");
                }
            }
        }
        let read = started.elapsed();
        let mut guard = relay.lock().expect("relay lock");
        let locked = Instant::now();
        match &complete {
            Some((seen, _)) => guard.expire_seen(seen.taken_ns(), Some(seen)),
            None if !in_bulk || bulk_failed => guard.expire_seen(monotonic_ns(), None),
            // In mid-pass, or it starts over: judged when one completes.
            None => {}
        }
        guard.store_keyed_progress(false);
        let locked = locked.elapsed();
        guard.note_expiry_tick(read, locked);
        if let Some((_, totals)) = &complete {
            guard.note_expiry_pass(*totals, locked);
            last_pass_entries = totals.entries;
        }
        drop(guard);
        // A million entries' snapshot is freed with the relay unlocked.
        drop(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_tells_a_daemon_from_a_silent_holder_and_a_leftover() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        assert!(matches!(socket_holder(&socket), SocketHolder::Nobody));

        // A listener nobody accepts on: what a killed daemon's forked child holds.
        let silent = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(matches!(socket_holder(&socket), SocketHolder::Silent));
        drop(silent);
        // The file is left behind, as by SIGKILL: a leftover.
        assert!(socket.exists());
        assert!(matches!(socket_holder(&socket), SocketHolder::Nobody));

        std::fs::remove_file(&socket).unwrap();
        let daemon = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let answering = std::thread::spawn(move || {
            let (stream, _) = daemon.accept().unwrap();
            let mut request = String::new();
            std::io::BufReader::new(stream.try_clone().unwrap())
                .read_line(&mut request)
                .unwrap();
            (&stream).write_all(b"{\"error\":\"no\"}\n").unwrap();
            request
        });
        assert!(matches!(socket_holder(&socket), SocketHolder::Daemon));
        assert!(answering.join().unwrap().contains("stats"));
    }
}
