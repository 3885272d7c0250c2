//! `cargo xtask bench`: the relay against what an operator would use instead,
//! on the same namespace path, in one run. Prints a Markdown table and JSON.
//!
//! Every relay gets a fresh client — relay — server topology. Load comes from
//! `forwarder-bench loadgen` (sendmmsg, many flows) in the client namespace;
//! the server counts arrivals with one nftables ingress rule (count and
//! drop), which costs the same whatever relayed the packet.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use forwarder_testbed::cmd::{self, SHORT};
use forwarder_testbed::netns::{Netns, veth_pair};
use forwarder_testbed::relay::Relay;
use forwarder_testbed::topology::{
    CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, RELAY_SERVER_IP, SERVER_IF,
    SERVER_IP, Topology,
};
use serde_json::{Value, json};

/// Where the server sinks the load and answers ping-pongs.
const LOAD_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
/// Relay ports for the non-forwarder relays.
const RELAY_LOAD_PORT: u16 = 60000;
const RELAY_ECHO_PORT: u16 = 60001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    Ceiling,
    XdpNative,
    XdpGeneric,
    Userspace,
    Nftables,
    Socat,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::Ceiling,
        Kind::XdpNative,
        Kind::XdpGeneric,
        Kind::Userspace,
        Kind::Nftables,
        Kind::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct (no relay)",
            Kind::Ceiling => "raw XDP redirect (ceiling)",
            Kind::XdpNative => "forwarder XDP native",
            Kind::XdpGeneric => "forwarder XDP generic",
            Kind::Userspace => "forwarder userspace",
            Kind::Nftables => "nftables DNAT+SNAT",
            Kind::Socat => "socat",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ceiling => "ceiling",
            Kind::XdpNative => "xdp_native",
            Kind::XdpGeneric => "xdp_generic",
            Kind::Userspace => "userspace",
            Kind::Nftables => "nftables",
            Kind::Socat => "socat",
        }
    }

    /// Whether replies come back (the ceiling relays one way only).
    fn has_return_path(self) -> bool {
        self != Kind::Ceiling
    }
}

/// How big a run is.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seconds: f64,
    pub reps: usize,
    pub flows: usize,
    pub sizes: Vec<usize>,
    pub ping_samples: usize,
    pub scale_flows: Vec<usize>,
    /// Flows in the table for the table-full measurement (real plus synthetic).
    pub fill_flows: usize,
    pub adds: usize,
    /// Keyed sessions on the shared port for the admission measurement.
    pub admission_sessions: Vec<usize>,
    pub admission_reps: usize,
    /// BPF_PROG_TEST_RUN calls per program-cost case (forwarding, refusals, floors).
    pub progcost_calls: usize,
    /// Flow counts of the program-cost round-robin cases: a sweep shows the
    /// count at which the flows' entries outgrow a cache level.
    pub progcost_rings: Vec<u16>,
    /// Relay keys (and `scale`, `control`, `cores`, `latency`) to run; empty: everything.
    pub only: Vec<String>,
    /// Session adds through the control API on one connection, per mode.
    pub api_adds: usize,
    /// Sessions per `add_many` request.
    pub add_batch: usize,
    /// New flows for the learning rate, and the rate they are offered at.
    pub learn_flows: usize,
    pub learn_rate: f64,
    /// Sender core counts for forwarder against nftables (`--cores`).
    pub cores: Vec<usize>,
    /// Flows per sender process in the core-count run.
    pub flows_per_sender: usize,
    /// `--max-flows` of the scale run's daemon (`--max-flows` of the bench).
    pub max_flows: u32,
    /// Unanswered flows held while the idle daemon's CPU is measured, and for how long.
    pub idle_flows: usize,
    pub idle_seconds: f64,
}

impl Plan {
    fn runs(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == key)
    }
}

impl Plan {
    pub fn full() -> Self {
        Self {
            seconds: 3.0,
            reps: 3,
            flows: 64,
            sizes: vec![64, 1200],
            ping_samples: 20_000,
            // A socket per flow: this sandbox allows 20000 open files.
            scale_flows: vec![1, 1_000, 15_000],
            fill_flows: 65_000,
            adds: 500,
            admission_sessions: vec![1, 100, 1_000, 10_000],
            admission_reps: 1_000,
            only: Vec::new(),
            progcost_calls: 400,
            progcost_rings: vec![1_000, 2_000, 4_000, 8_000, 15_000],
            api_adds: 5_000,
            add_batch: 500,
            learn_flows: 10_000,
            learn_rate: 40_000.0,
            cores: vec![1, 2, 4, 8, 12],
            flows_per_sender: 16,
            max_flows: BENCH_MAX_FLOWS,
            idle_flows: 16_000,
            idle_seconds: 30.0,
        }
    }

    /// CI's smoke run: every relay and code path once, tiny numbers.
    pub fn smoke() -> Self {
        Self {
            seconds: 0.3,
            reps: 1,
            flows: 4,
            sizes: vec![64],
            ping_samples: 200,
            scale_flows: vec![1, 50],
            fill_flows: 1_000,
            adds: 20,
            admission_sessions: vec![1, 100],
            admission_reps: 10,
            only: Vec::new(),
            progcost_calls: 5,
            progcost_rings: vec![1_000, 15_000],
            api_adds: 40,
            add_batch: 16,
            learn_flows: 200,
            learn_rate: 5_000.0,
            cores: vec![1, 2, 4],
            flows_per_sender: 4,
            max_flows: BENCH_MAX_FLOWS,
            idle_flows: 200,
            idle_seconds: 2.0,
        }
    }
}

/// Builds the bench's own binary (with its ceiling program); the product
/// build never does.
fn bench_bin() -> Result<PathBuf> {
    crate::run_visible(crate::cargo().args(["build", "--release", "-p", "forwarder-bench"]))?;
    let forwarder = forwarder_testbed::forwarder_bin()?;
    let bench = forwarder.with_file_name("forwarder-bench");
    if !bench.exists() {
        bail!(
            "{} is missing after building forwarder-bench",
            bench.display()
        );
    }
    Ok(bench)
}

/// Where the load goes and where ping-pongs go, for one relay kind.
struct Path2 {
    load: SocketAddrV4,
    echo: SocketAddrV4,
}

/// A relay under test: its topology and whatever processes make it relay.
/// Fields drop in order: the daemon before the namespaces it runs in.
struct Setup {
    relay: Option<Relay>,
    children: Vec<Child>,
    path: Path2,
    client: Netns,
    server: Netns,
    _relay_ns: Option<Netns>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_in(ns: &Netns, program: &Path, args: &[&str], cpu: Option<usize>) -> Result<Child> {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = ns.exec("taskset");
            c.args(["-c", &cpu.to_string()]).arg(program);
            c
        }
        None => ns.exec(program.to_str().context("path is not UTF-8")?),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Pins every thread of `pid`; tried again when a thread ended while
/// taskset walked them (the daemon's blocking pool comes and goes).
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let args = ["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()];
    let mut tries = 0;
    loop {
        match cmd::sh("taskset", &args) {
            Ok(_) => return Ok(()),
            Err(_) if tries < 3 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    }
}

/// The server's sink: count and drop the load at ingress; answer ping-pongs.
fn server_side(
    server: &Netns,
    server_if: &str,
    bench: &Path,
    children: &mut Vec<Child>,
) -> Result<()> {
    let rules = format!(
        "table netdev bench {{\n chain ingress {{\n type filter hook ingress device {server_if} priority 0;\n udp dport {LOAD_PORT} counter drop\n }}\n}}\n"
    );
    nft_apply(server, &rules)?;
    children.push(spawn_in(
        server,
        bench,
        &["echo", "--bind", &format!("0.0.0.0:{ECHO_PORT}")],
        None,
    )?);
    Ok(())
}

/// Loads an nftables ruleset into `ns` (from a file: `nft` parses whole
/// rulesets only from files).
fn nft_apply(ns: &Netns, rules: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "fwd-bench-{}.nft",
        forwarder_testbed::netns::random_tag()
    ));
    std::fs::write(&path, rules)?;
    let result = ns.run(
        "nft",
        &["-f", path.to_str().context("temp path is not UTF-8")?],
    );
    let _ = std::fs::remove_file(&path);
    result.map(drop)
}

fn sink_count(server: &Netns) -> Result<u64> {
    let out = server.run("nft", &["-j", "list", "table", "netdev", "bench"])?;
    let value: Value = serde_json::from_str(&out)?;
    for item in value["nftables"].as_array().into_iter().flatten() {
        if let Some(rule) = item.get("rule") {
            for expr in rule["expr"].as_array().into_iter().flatten() {
                if let Some(packets) = expr["counter"]["packets"].as_u64() {
                    return Ok(packets);
                }
            }
        }
    }
    bail!("no counter in the server's sink rule")
}

fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    Ok(ns
        .run("cat", &[&format!("/sys/class/net/{dev}/address")])?
        .trim()
        .to_string())
}

fn setup(kind: Kind, bench: &Path, layout: usize) -> Result<Setup> {
    setup_sized(kind, bench, layout, BENCH_MAX_FLOWS)
}

/// [`setup`] with the daemon's flow capacity (`--max-flows`) given.
fn setup_sized(kind: Kind, bench: &Path, layout: usize, max_flows: u32) -> Result<Setup> {
    let max_flows = max_flows.to_string();
    // Userspace relays get the sender's core in layout 1, their own in layout 2.
    let relay_cpu = if layout == 1 { 0 } else { 1 };
    if kind == Kind::Direct {
        let client = Netns::new("bclient")?;
        let server = Netns::new("bserver")?;
        veth_pair(&client, "veth-c", &server, SERVER_IF)?;
        // The server sits on the client's own subnet: no hop in between.
        let server_ip = Ipv4Addr::new(10, 77, 1, 9);
        client.add_addr(CLIENT_IP, "veth-c")?;
        server.add_addr(server_ip, SERVER_IF)?;
        let mut children = Vec::new();
        server_side(&server, SERVER_IF, bench, &mut children)?;
        return Ok(Setup {
            relay: None,
            children,
            path: Path2 {
                load: SocketAddrV4::new(server_ip, LOAD_PORT),
                echo: SocketAddrV4::new(server_ip, ECHO_PORT),
            },
            client,
            server,
            _relay_ns: None,
        });
    }
    let Topology {
        client,
        relay: relay_ns,
        server,
    } = Topology::client_relay_server()?;
    let mut children = Vec::new();
    server_side(&server, SERVER_IF, bench, &mut children)?;
    // Resolve neighbours both ways before any relay starts.
    client.ping(&SERVER_IP.to_string())?;
    let mut relay = None;
    let mut path = Path2 {
        load: SocketAddrV4::new(RELAY_CLIENT_IP, RELAY_LOAD_PORT),
        echo: SocketAddrV4::new(RELAY_CLIENT_IP, RELAY_ECHO_PORT),
    };
    match kind {
        Kind::Direct => unreachable!("handled above"),
        Kind::XdpNative | Kind::XdpGeneric | Kind::Userspace => {
            let mode: &[&str] = match kind {
                Kind::XdpNative => &["--xdp-mode", "native"],
                Kind::XdpGeneric => &["--xdp-mode", "skb"],
                _ => &["--datapath", "userspace"],
            };
            let mut args = vec![
                "--ports",
                "60000-60999",
                "--flow-ports",
                "5000-59999",
                "--max-flows",
                &max_flows,
            ];
            args.extend_from_slice(NO_LEARNING_LIMITS);
            args.extend_from_slice(mode);
            let mut daemon = Relay::start(&relay_ns, &[RELAY_CLIENT_IF, RELAY_SERVER_IF], &args)?;
            daemon.quiet();
            pin(daemon.pid(), relay_cpu)?;
            let load = daemon.add(SocketAddr::V4(SocketAddrV4::new(SERVER_IP, LOAD_PORT)), &[])?;
            let echo = daemon.add(SocketAddr::V4(SocketAddrV4::new(SERVER_IP, ECHO_PORT)), &[])?;
            path.load.set_port(load.port);
            path.echo.set_port(echo.port);
            relay = Some(daemon);
        }
        Kind::Nftables => {
            let rules = format!(
                "table ip bench {{
                   chain prerouting {{ type nat hook prerouting priority dstnat;
                     udp dport {RELAY_LOAD_PORT} dnat to {SERVER_IP}:{LOAD_PORT}
                     udp dport {RELAY_ECHO_PORT} dnat to {SERVER_IP}:{ECHO_PORT}
                   }}
                   chain postrouting {{ type nat hook postrouting priority srcnat;
                     ip daddr {SERVER_IP} snat to {RELAY_SERVER_IP}
                   }}
                 }}"
            );
            nft_apply(&relay_ns, &rules)?;
        }
        Kind::Socat => {
            let socat = which::which("socat")
                .context("socat not found: apt-get install socat (cargo xtask prereq)")?;
            for (listen, to) in [(RELAY_LOAD_PORT, LOAD_PORT), (RELAY_ECHO_PORT, ECHO_PORT)] {
                let mut cmd = relay_ns.exec("taskset");
                cmd.args(["-c", &relay_cpu.to_string()])
                    .arg(&socat)
                    .arg(format!("UDP4-LISTEN:{listen},fork,reuseaddr"))
                    .arg(format!("UDP4:{SERVER_IP}:{to}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                children.push(cmd.spawn().context("starting socat")?);
            }
        }
        Kind::Ceiling => {
            let dmac = mac_of(&server, SERVER_IF)?;
            let relay_addr = format!("{RELAY_CLIENT_IP}:{RELAY_LOAD_PORT}");
            let to = format!("{SERVER_IP}:{LOAD_PORT}");
            let client_ip = CLIENT_IP.to_string();
            let source = RELAY_SERVER_IP.to_string();
            let args = [
                "ceiling",
                "--iface",
                RELAY_CLIENT_IF,
                "--egress",
                RELAY_SERVER_IF,
                "--relay",
                &relay_addr,
                "--client",
                &client_ip,
                "--source",
                &source,
                "--to",
                &to,
                "--dmac",
                &dmac,
            ];
            let mut child = relay_ns.nsenter(bench.to_str().context("path is not UTF-8")?);
            let log = std::env::temp_dir().join(format!(
                "fwd-ceiling-{}.log",
                forwarder_testbed::netns::random_tag()
            ));
            child
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?);
            let mut child = child.spawn().context("starting the ceiling")?;
            // The bench's veth peer takes redirects only with an XDP program or
            // GRO; the testbed turns GRO on. Wait until it is attached.
            let stdout = child.stdout.take().context("no stdout")?;
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
            let errors = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            if !line.contains("attached") {
                bail!("the ceiling program did not attach: {errors}");
            }
            children.push(child);
            // The ceiling needs no echo path; latency is not measured for it.
        }
    }
    if layout == 2 {
        steer_to_relay_core(&relay_ns, RELAY_CLIENT_IF)?;
    }
    Ok(Setup {
        relay,
        children,
        path,
        client,
        server,
        _relay_ns: Some(relay_ns),
    })
}

/// Layout 2: the relay's receive processing runs on core 1, away from the
/// sender on core 0. Threaded NAPI (pinned) moves native XDP there; RPS moves
/// the stack's processing (generic XDP, nftables, sockets).
fn steer_to_relay_core(relay_ns: &Netns, dev: &str) -> Result<()> {
    relay_ns.run("sh", &["-c", &format!("echo 2 > /sys/class/net/{dev}/queues/rx-0/rps_cpus && echo 1 > /sys/class/net/{dev}/threaded")])?;
    let threads = cmd::sh("ps", &["-eo", "pid=,comm="])?;
    let prefix = format!("napi/{dev}-");
    for line in threads.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(pid), Some(comm)) = (fields.next(), fields.next())
            && comm.starts_with(&prefix)
        {
            cmd::sh("taskset", &["-p", "-c", "1", pid])?;
        }
    }
    Ok(())
}

/// Busy and total jiffies of one CPU, from /proc/stat.
fn cpu_jiffies(cpu: usize) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("no cpu{cpu} in /proc/stat"))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn run_json(cmd: &mut Command, timeout: Duration) -> Result<Value> {
    let out = cmd::run_ok(cmd, timeout)?;
    let line = out.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

fn loadgen(
    s: &Setup,
    bench: &Path,
    flows: usize,
    size: usize,
    seconds: f64,
    warmup: bool,
) -> Result<Value> {
    let mut cmd = s.client.exec("taskset");
    cmd.args(["-c", "0"]).arg(bench).args([
        "loadgen",
        "--dst",
        &s.path.load.to_string(),
        "--flows",
        &flows.to_string(),
        "--size",
        &size.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--warmup-ms",
        if warmup { "300" } else { "0" },
        // Fixed source ports: the warm-up and every run use the same flows.
        "--src-port-base",
        "10000",
    ]);
    run_json(&mut cmd, Duration::from_secs_f64(seconds + 60.0))
}

/// One load run: packets per second received at the server, sent by the
/// client, and how busy core 1 (the relay's core in layout 2) was.
struct Run {
    received_pps: f64,
    sent_pps: f64,
    core1_busy: f64,
}

fn throughput(s: &Setup, bench: &Path, flows: usize, size: usize, seconds: f64) -> Result<Run> {
    let before = sink_count(&s.server)?;
    let cpu_before = cpu_jiffies(1)?;
    let sent = loadgen(s, bench, flows, size, seconds, false)?;
    let cpu_after = cpu_jiffies(1)?;
    // Packets in flight land within a few milliseconds.
    std::thread::sleep(Duration::from_millis(100));
    let after = sink_count(&s.server)?;
    let elapsed = sent["seconds"].as_f64().unwrap_or(seconds);
    let total = (cpu_after.1 - cpu_before.1).max(1);
    Ok(Run {
        received_pps: (after - before) as f64 / elapsed,
        sent_pps: sent["pps"].as_f64().unwrap_or(0.0),
        core1_busy: (cpu_after.0 - cpu_before.0) as f64 / total as f64,
    })
}

fn pingpong(s: &Setup, bench: &Path, samples: usize) -> Result<Value> {
    let mut cmd = s.client.exec(bench.to_str().context("path")?);
    cmd.args([
        "pingpong",
        "--dst",
        &s.path.echo.to_string(),
        "--samples",
        &samples.to_string(),
    ]);
    run_json(&mut cmd, Duration::from_secs(120))
}

/// Total run time and run count of the loaded XDP programs called `name`.
fn bpf_stats(bench: &Path, name: &str) -> Result<(u64, u64)> {
    let value = run_json(
        Command::new(bench).args(["bpf-stats", "--name", name]),
        SHORT,
    )?;
    let mut total = (0, 0);
    for program in value.as_array().into_iter().flatten() {
        total.0 += program["run_time_ns"].as_u64().unwrap_or(0);
        total.1 += program["run_count"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// Mean and sample standard deviation.
fn spread(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// Kernel memory of every map the daemon holds (memlock from fdinfo: what
/// the kernel charges, preallocated or not) per flow it can hold, and per
/// flow installed when `installed` is given.
fn kernel_memory_per_flow(relay: &Relay, max_flows: u32, installed: Option<u64>) -> Result<Value> {
    let mut maps = BTreeMap::new();
    let mut shapes = Vec::new();
    let dir = format!("/proc/{}/fdinfo", relay.pid());
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if let (Some(id), Some(memlock), Some(max)) =
            (field("map_id:"), field("memlock:"), field("max_entries:"))
        {
            if !maps.contains_key(&id) {
                shapes.push(json!({
                    "map_id": id, "map_type": field("map_type:"), "map_flags": field("map_flags:"),
                    "key_size": field("key_size:"), "value_size": field("value_size:"),
                    "max_entries": max, "memlock_bytes": memlock.parse::<u64>().unwrap_or(0),
                }));
            }
            maps.insert(
                id,
                (
                    memlock.parse::<u64>().unwrap_or(0),
                    max.parse::<u64>().unwrap_or(0),
                ),
            );
        }
    }
    let total: u64 = maps.values().map(|(m, _)| m).sum();
    let flows = u64::from(max_flows);
    let mut out = json!({"maps": maps.len(), "memlock_bytes": total, "max_flows": flows, "bytes_per_flow": total / flows.max(1), "per_map": shapes});
    if let Some(installed) = installed {
        out["installed_flows"] = json!(installed);
        out["bytes_per_installed_flow"] = json!(total / installed.max(1));
    }
    Ok(out)
}

/// The flow capacity the bench's daemon runs with (`--max-flows`).
const BENCH_MAX_FLOWS: u32 = 65_536;

/// The kernel's BPF run-time statistics, on for as long as this lives and
/// then back to what they were: left on, every BPF program on the host pays
/// two clock reads per run (a bare XDP_DROP's test run went from about 45
/// to 72 ns here), the bench's own `BPF_PROG_TEST_RUN` timings included.
struct BpfStatsOn {
    before: String,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsOn {
    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| {
                format!("reading {BPF_STATS_SYSCTL} (the bench runs as root on Linux 5.1 or later)")
            })?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS_SYSCTL, "1").with_context(|| {
            format!("turning BPF run-time statistics on ({BPF_STATS_SYSCTL}); the bench needs root")
        })?;
        Ok(Self { before })
    }
}

impl Drop for BpfStatsOn {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(BPF_STATS_SYSCTL, &self.before) {
            eprintln!(
                "xtask: could not turn BPF run-time statistics back to {} ({error}); \
                 `sysctl -w kernel.bpf_stats_enabled={}` does it",
                self.before, self.before
            );
        }
    }
}

pub fn run(plan: &Plan) -> Result<Value> {
    forwarder_testbed::prereq::require()?;
    let bench = bench_bin()?;
    let mut results = json!({"plan": format!("{plan:?}"), "throughput": {}, "latency": {}, "xdp_cost": {}, "scale": {}});
    // Pure CPU, no namespace: first, and printed at once. Both before the
    // run-time statistics go on, which would add their clock reads to
    // progcost's test runs.
    if plan.runs("admission") {
        results["admission"] = admission(plan, &bench)?;
    }
    if plan.runs("progcost") {
        results["progcost"] = progcost(plan, &bench)?;
    }
    let _stats = BpfStatsOn::enable()?;
    let mut table = String::from(
        "| relay | layout | payload | received kpps (mean ± sd) | sent kpps | core 1 busy | kpps per relay core |\n|---|---|---|---|---|---|---|\n",
    );
    for layout in [1, 2] {
        for kind in Kind::ALL.into_iter().filter(|k| plan.runs(k.key())) {
            let s = setup(kind, &bench, layout)
                .with_context(|| format!("setting up {}", kind.name()))?;
            // Open the flows once (first packets go through a relay's slow path).
            loadgen(&s, &bench, plan.flows, 64, 0.0, true)?;
            for &size in &plan.sizes {
                let mut received = Vec::new();
                let mut sent = Vec::new();
                let mut busy = Vec::new();
                let program = match kind {
                    Kind::XdpNative | Kind::XdpGeneric => Some("forwarder"),
                    // The kernel keeps 15 characters of a program's name.
                    Kind::Ceiling => Some("forwarder_ceili"),
                    _ => None,
                };
                let stats_before = program.map(|name| bpf_stats(&bench, name)).transpose()?;
                for _ in 0..plan.reps {
                    let run = throughput(&s, &bench, plan.flows, size, plan.seconds)?;
                    received.push(run.received_pps / 1000.0);
                    sent.push(run.sent_pps / 1000.0);
                    busy.push(run.core1_busy);
                }
                let (mean, sd) = spread(&received);
                let (sent_mean, _) = spread(&sent);
                let (busy_mean, _) = spread(&busy);
                // In layout 2 the relay has core 1 to itself: what it moved per
                // fully busy core is its capacity, whatever the sender managed.
                let per_core = if layout == 2 && kind != Kind::Direct && busy_mean > 0.01 {
                    format!("{:.0}", mean / busy_mean)
                } else {
                    "-".into()
                };
                table.push_str(&format!(
                    "| {} | {layout} | {size} B | {mean:.0} ± {sd:.0} | {sent_mean:.0} | {:.0}% | {per_core} |\n",
                    kind.name(),
                    busy_mean * 100.0
                ));
                results["throughput"][format!("{}/layout{layout}/{size}", kind.key())] = json!({
                    "received_kpps": received, "mean": mean, "sd": sd, "sent_kpps_mean": sent_mean,
                    "core1_busy": busy_mean, "kpps_per_relay_core": if per_core == "-" { Value::Null } else { json!(mean / busy_mean) },
                });
                if let (Some(before), Some(name)) = (stats_before, program) {
                    let after = bpf_stats(&bench, name)?;
                    let runs = after.1 - before.1;
                    if runs > 0 {
                        results["xdp_cost"][format!("{}/layout{layout}/{size}", kind.key())] = json!({"ns_per_packet": (after.0 - before.0) as f64 / runs as f64, "runs": runs});
                    }
                }
            }
            if layout == 1 && kind.has_return_path() {
                let ping = pingpong(&s, &bench, plan.ping_samples)?;
                results["latency"][kind.key()] = ping;
            }
            if layout == 1
                && kind == Kind::XdpNative
                && let Some(relay) = &s.relay
            {
                results["kernel_memory"] = kernel_memory_per_flow(relay, BENCH_MAX_FLOWS, None)?;
            }
            drop(s);
        }
    }
    results["table"] = Value::String(table.clone());
    // The relay comparison is printed before the long scale run, so a
    // failure there does not lose it.
    print_report(&results, &table);
    if plan.runs("control") {
        results["control"] = control_plane(plan, &bench)?;
    }
    if plan.runs("idle") {
        results["idle"] = idle_tick(plan, &bench)?;
    }
    if plan.runs("cores") {
        results["cores"] = cores(plan, &bench)?;
    }
    if plan.runs("latency") {
        results["latency_analysis"] = latency_analysis(plan, &bench)?;
    }
    if !plan.runs("scale") {
        return Ok(results);
    }
    results["scale"] = scale(plan, &bench)?;
    println!(
        "\n## Scale\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&results["scale"]).unwrap_or_default()
    );
    Ok(results)
}

/// The daemon's core in the scale rows: not the sender's (core 0, where
/// the XDP program runs in layout 1), so what the daemon does with many
/// flows (the expiry tick's reads) does not take the program's CPU, and
/// every row has the same placement.
const SCALE_DAEMON_CPU: usize = 1;

/// What the expiry tick did lately, from `stats`: the last complete pass
/// through the flow maps (ticks, entries read, reading time over all its
/// slices, lock held for its decisions) and the last few ticks' slice read
/// times, one `stats` a tick (`stats` reads the maps' fill itself, so
/// never during a measured window).
fn expiry_pass(relay: &Relay, samples: usize) -> Result<Value> {
    let mut read_us = Vec::new();
    let mut locked_us = Vec::new();
    let mut stats = json!({});
    for sample in 0..samples {
        if sample > 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
        stats = relay.stats()?;
        let tick = &stats["slow_path"];
        if let (Some(read), Some(locked)) = (
            tick["expiry_tick_read_us"].as_u64(),
            tick["expiry_tick_locked_us"].as_u64(),
        ) {
            read_us.push(read as f64);
            locked_us.push(locked as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let pass = &stats["slow_path"];
    Ok(json!({
        "pass_ticks": pass["expiry_pass_ticks"],
        "pass_entries": pass["expiry_pass_entries"],
        "pass_read_ms": pass["expiry_pass_read_us"].as_f64().map(|us| us / 1000.0),
        "pass_lock_held_us": pass["expiry_pass_locked_us"],
        "slice_read_ms_median": median(&mut read_us).map(|us| us / 1000.0),
        "slice_read_ms_max": read_us.iter().copied().reduce(f64::max).map(|us| us / 1000.0),
        "tick_lock_held_us_median": median(&mut locked_us),
    }))
}

/// Waits until the expiry tick has completed a pass that read at least
/// `entries` entries (the flow maps as they are now, both halves).
fn wait_for_pass(relay: &Relay, entries: u64, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let stats = relay.stats()?;
        let Some(read) = stats["slow_path"]["expiry_pass_entries"].as_u64() else {
            // A daemon from before the sliced tick (a before run with
            // FORWARDER_BIN): it walks everything every tick anyway.
            std::thread::sleep(Duration::from_secs(5));
            return Ok(());
        };
        if read >= entries {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the expiry tick completed no pass over {entries} entries in {timeout:?} (the last read {read}): \
                 is the daemon's tick stuck? See its log"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Per-packet XDP cost with more and more established flows, and how fast the
/// control plane adds sessions and learns flows.
fn scale(plan: &Plan, bench: &Path) -> Result<Value> {
    let mut out = json!({"daemon_cpu": SCALE_DAEMON_CPU});
    let s = setup_sized(Kind::XdpNative, bench, 1, plan.max_flows)?;
    let relay = s.relay.as_ref().context("no daemon")?;
    for &flows in &plan.scale_flows {
        // Every row: threads the daemon started since come along.
        pin(relay.pid(), SCALE_DAEMON_CPU)?;
        let started = std::time::Instant::now();
        loadgen(&s, bench, flows, 64, 0.0, true)?;
        let learned = relay.wait_until(
            "the flows to be learned",
            Duration::from_secs(120),
            |sessions| {
                let n: usize = sessions.iter().map(|s| s.flows.len()).sum();
                (n >= flows).then_some(n)
            },
        )?;
        let learn_secs = started.elapsed().as_secs_f64();
        let before = bpf_stats(bench, "forwarder")?;
        let rx = throughput(&s, bench, flows, 64, plan.seconds)?.received_pps;
        let after = bpf_stats(bench, "forwarder")?;
        let runs = (after.1 - before.1).max(1);
        out[format!("flows_{flows}")] = json!({
            "established_flows": learned,
            "ns_per_packet": (after.0 - before.0) as f64 / runs as f64,
            "received_kpps": rx / 1000.0,
            "seconds_to_learn": learn_secs,
            "expiry": expiry_pass(relay, 3)?,
        });
    }
    // The flow table nearly full: synthetic entries fill the pinned maps
    // (a socket per flow would exceed this sandbox's open-file limit).
    let pins = std::fs::read_dir(format!("/sys/fs/bpf/forwarder/{}", relay.instance()))?
        .next()
        .context("no pinned data plane")??
        .path();
    let used: usize = relay.sessions()?.iter().map(|s| s.flows.len()).sum();
    // Leave room for the one flow the load then opens through the daemon.
    let fill = plan.fill_flows.saturating_sub(used + 1);
    let filled = run_json(
        Command::new(bench).args([
            "fill",
            "--pins",
            pins.to_str().context("path")?,
            "--count",
            &fill.to_string(),
        ]),
        Duration::from_secs(300),
    )?;
    loadgen(&s, bench, 1, 64, 0.0, true)?;
    let installed = used as u64 + 1 + filled["inserted"].as_u64().unwrap_or(0);
    // Measured once the tick has read all of them (both halves a flow),
    // so the window sees its steady slices, not a pass over fewer.
    wait_for_pass(relay, installed * 2 * 99 / 100, Duration::from_secs(300))?;
    pin(relay.pid(), SCALE_DAEMON_CPU)?;
    let before = bpf_stats(bench, "forwarder")?;
    let rx = throughput(&s, bench, 1, 64, plan.seconds)?.received_pps;
    let after = bpf_stats(bench, "forwarder")?;
    let runs = (after.1 - before.1).max(1);
    let one_flow_kpps = out["flows_1"]["received_kpps"].as_f64();
    out["table_full"] = json!({
        "entries_per_map": installed,
        "max_flows": plan.max_flows,
        "ns_per_packet": (after.0 - before.0) as f64 / runs as f64,
        "received_kpps": rx / 1000.0,
        "kpps_against_one_flow": one_flow_kpps.map(|one| rx / 1000.0 / one.max(1e-9)),
        "expiry": expiry_pass(relay, 5)?,
        "kernel_memory": kernel_memory_per_flow(relay, plan.max_flows, Some(installed))?,
    });
    // Session adds through the CLI (each a process and a control round trip).
    let started = std::time::Instant::now();
    for index in 0..plan.adds {
        let port = 30_000 + index as u16;
        relay.add(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 77, 2, 2), port)),
            &[],
        )?;
    }
    out["session_adds_per_sec"] = json!(plan.adds as f64 / started.elapsed().as_secs_f64());
    Ok(out)
}

/// Shared-port admission: the time to match a new endpoint's first datagram
/// to its session among N keyed sessions, the matching key tried last
/// (`forwarder-bench admission`, one core, as the daemon runs it).
fn admission(plan: &Plan, bench: &Path) -> Result<Value> {
    let sessions: Vec<String> = plan
        .admission_sessions
        .iter()
        .map(ToString::to_string)
        .collect();
    let reps = plan.admission_reps.to_string();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(bench).args([
        "admission",
        "--sessions",
        &sessions.join(","),
        "--reps",
        &reps,
    ]);
    let value = run_json(&mut cmd, Duration::from_secs(600))?;
    println!("\n## Shared-port admission (one core, matching key last)\n");
    println!(
        "| keyed sessions | datagram | bytes | p50 µs | p99 µs | max µs | CPU p50 µs | CPU p99 µs |\n|---|---|---|---|---|---|---|---|"
    );
    for point in value["admission"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            point["sessions"],
            point["datagram"].as_str().unwrap_or("?"),
            point["datagram_bytes"],
            point["p50_us"].as_f64().unwrap_or(0.0),
            point["p99_us"].as_f64().unwrap_or(0.0),
            point["max_us"].as_f64().unwrap_or(0.0),
            point["cpu_p50_us"].as_f64().unwrap_or(0.0),
            point["cpu_p99_us"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(value["admission"].clone())
}

/// Per-packet program costs timed in the kernel (BPF_PROG_TEST_RUN): the
/// load-independent figure for the program against the ceiling, and for
/// refusing a flood against a bare XDP_DROP. Runs in its own namespace.
fn progcost(plan: &Plan, bench: &Path) -> Result<Value> {
    let calls = plan.progcost_calls.to_string();
    let rings = plan
        .progcost_rings
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(bench);
    cmd.args(["progcost", "--calls", &calls, "--rings", &rings]);
    let value = run_json(&mut cmd, Duration::from_secs(600))?;
    println!("\n## XDP program cost (BPF_PROG_TEST_RUN, ns per run)\n");
    println!("| case | p50 | p10–p90 | over bare XDP_DROP, p50 |\n|---|---|---|---|");
    for point in value["points"].as_array().into_iter().flatten() {
        let ns = &point["ns"];
        println!(
            "| {} | {:.0} | {:.0}–{:.0} | {:.0} |",
            point["case"].as_str().unwrap_or("?"),
            ns["p50"].as_f64().unwrap_or(0.0),
            ns["p10"].as_f64().unwrap_or(0.0),
            ns["p90"].as_f64().unwrap_or(0.0),
            point["ns_over_bare_drop"]["p50"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(value["points"].clone())
}

fn print_report(results: &Value, table: &str) {
    println!("\n## Throughput\n\n{table}");
    println!("## Added latency (ping-pong, one outstanding)\n");
    println!("| relay | p50 µs | p99 µs | added p50 µs | added p99 µs |\n|---|---|---|---|---|");
    let direct = &results["latency"]["direct"];
    for kind in Kind::ALL {
        let l = &results["latency"][kind.key()];
        if let (Some(p50), Some(p99)) = (l["p50_us"].as_f64(), l["p99_us"].as_f64()) {
            let d50 = direct["p50_us"].as_f64().unwrap_or(0.0);
            let d99 = direct["p99_us"].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {p50:.1} | {p99:.1} | {:.1} | {:.1} |",
                kind.name(),
                p50 - d50,
                p99 - d99
            );
        }
    }
    println!("\n## XDP program cost (kernel BPF run-time stats)\n");
    if let Some(costs) = results["xdp_cost"].as_object() {
        for (key, value) in costs {
            println!(
                "- {key}: {:.0} ns/packet over {} runs",
                value["ns_per_packet"].as_f64().unwrap_or(0.0),
                value["runs"]
            );
        }
    }
    println!(
        "\n## Kernel memory\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&results["kernel_memory"]).unwrap_or_default()
    );
}

/// Daemon flags that take every limit on learning flows out of the way, so
/// a bench measures the daemon itself. The loads are one way (their flows
/// are never answered, so they stay on probation), and the flood limiter
/// would otherwise be what is measured.
const NO_LEARNING_LIMITS: &[&str] = &[
    "--new-flows-per-sec",
    "1000000",
    "--max-flows-per-session",
    "100000",
    "--probation-flows-per-session",
    "100000",
    "--slowpath-pps-per-session",
    "0",
    "--slowpath-pps",
    "0",
];

/// Where `learn-sink` listens on the server (the load port's sink drops at ingress).
const LEARN_PORT: u16 = 9002;

/// The daemon the control-plane rows run against: every limit out of the
/// way (the rows measure the daemon, not its limiters), ports for
/// thousands of sessions.
fn control_daemon(topo: &Topology) -> Result<Relay> {
    let args = [
        "--ports",
        "20000-39999",
        "--max-sessions",
        "20000",
        "--flow-ports",
        "40000-64999",
        "--max-flows",
        "65536",
        "--xdp-mode",
        "native",
    ]
    .into_iter()
    .chain(NO_LEARNING_LIMITS.iter().copied())
    .collect::<Vec<_>>();
    let mut daemon = Relay::start(&topo.relay, &[RELAY_CLIENT_IF, RELAY_SERVER_IF], &args)?;
    daemon.quiet();
    pin(daemon.pid(), 1)?;
    Ok(daemon)
}

/// Session adds per second (single adds through the CLI, one process
/// each; single adds pipelined on one API connection; `add_many` batches
/// on one connection; `add --from-file` in one CLI process), and new flows
/// learned per second relay-wide, counted where the relay delivers them.
fn control_plane(plan: &Plan, bench: &Path) -> Result<Value> {
    let mut out = json!({});
    let bench_str = bench.to_str().context("path is not UTF-8")?;
    let server_ip = SERVER_IP.to_string();
    // A fresh daemon per mode: each starts from an empty table.
    let modes: [(&str, usize); 2] = [("api_single_pipelined", 0), ("api_batch", plan.add_batch)];
    for (key, batch) in modes {
        let topo = Topology::client_relay_server()?;
        let daemon = control_daemon(&topo)?;
        let value = run_json(
            Command::new("taskset").args(["-c", "0"]).arg(bench).args([
                "adds",
                "--instance",
                daemon.instance(),
                "--count",
                &plan.api_adds.to_string(),
                "--batch",
                &batch.to_string(),
                "--backend-ip",
                &server_ip,
            ]),
            Duration::from_secs(600),
        )?;
        out[key] = value;
    }
    {
        let topo = Topology::client_relay_server()?;
        let daemon = control_daemon(&topo)?;
        // One CLI process per add, as an operator's script would (fewer: each costs a process).
        let cli_adds = plan.adds.min(plan.api_adds);
        let started = std::time::Instant::now();
        for index in 0..cli_adds {
            daemon.add(
                SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 20_000 + index as u16)),
                &[],
            )?;
        }
        out["cli_single"] = json!({"added": cli_adds, "adds_per_sec": cli_adds as f64 / started.elapsed().as_secs_f64()});
        // Every line in one CLI process.
        let file = std::env::temp_dir().join(format!(
            "fwd-bench-adds-{}.txt",
            forwarder_testbed::netns::random_tag()
        ));
        let lines: String = (0..plan.api_adds)
            .map(|index| format!("{SERVER_IP}:{}\n", 30_000 + index))
            .collect();
        std::fs::write(&file, lines)?;
        let started = std::time::Instant::now();
        let printed = daemon.verb(&[
            "add",
            "--from-file",
            file.to_str().context("temp path is not UTF-8")?,
            "--json",
        ]);
        let seconds = started.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&file);
        let document: Value = serde_json::from_str(&printed?)?;
        let added = document["added"].as_u64().unwrap_or(0);
        out["cli_from_file"] = json!({"added": added, "failed": document["failed"], "seconds": seconds, "adds_per_sec": added as f64 / seconds});
    }
    // Flows learned: one session, `learn_flows` new client endpoints.
    {
        let topo = Topology::client_relay_server()?;
        topo.client.ping(&SERVER_IP.to_string())?;
        let daemon = control_daemon(&topo)?;
        let session = daemon.add(
            SocketAddr::V4(SocketAddrV4::new(SERVER_IP, LEARN_PORT)),
            &[],
        )?;
        let mut sink = topo.server.nsenter(bench_str);
        sink.args([
            "learn-sink",
            "--bind",
            &format!("0.0.0.0:{LEARN_PORT}"),
            "--expect",
            &plan.learn_flows.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut sink = sink.spawn().context("starting learn-sink")?;
        let mut sink_out =
            std::io::BufReader::new(sink.stdout.take().context("learn-sink has no stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut sink_out, &mut line)?;
        if !line.contains("listening") {
            let _ = sink.kill();
            let _ = sink.wait();
            bail!("learn-sink did not start: {line:?}");
        }
        let mut sender = topo.client.exec("taskset");
        sender.args(["-c", "0"]).arg(bench).args([
            "learn",
            "--dst",
            &SocketAddrV4::new(RELAY_CLIENT_IP, session.port).to_string(),
            "--flows",
            &plan.learn_flows.to_string(),
            "--rate",
            &plan.learn_rate.to_string(),
        ]);
        let sent = run_json(&mut sender, Duration::from_secs(300));
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut sink_out, &mut rest)?;
        let _ = sink.wait();
        let sent = sent?;
        let counted: Value =
            serde_json::from_str(rest.lines().last().context("learn-sink printed nothing")?)?;
        let stats = daemon.stats()?;
        out["flows_learned"] = json!({
            "offered": sent, "counted_at_server": counted,
            "flows_created": stats["slow_path"]["flows_created"],
        });
    }
    println!("\n## Control plane\n");
    println!("| what | rate /s |\n|---|---|");
    for (key, what) in [
        ("cli_single", "session adds, one CLI process each"),
        (
            "cli_from_file",
            "session adds, `add --from-file` (one process)",
        ),
        (
            "api_single_pipelined",
            "session adds, single `add` pipelined on one connection",
        ),
        (
            "api_batch",
            "session adds, `add_many` batches on one connection",
        ),
    ] {
        println!(
            "| {what} | {:.0} |",
            out[key]["adds_per_sec"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "| new flows learned (counted at the server, {} of {} arrived) | {:.0} |",
        out["flows_learned"]["counted_at_server"]["received"],
        plan.learn_flows,
        out["flows_learned"]["counted_at_server"]["learned_per_sec"]
            .as_f64()
            .unwrap_or(0.0)
    );
    Ok(out)
}

/// User plus system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("odd /proc/PID/stat field")
    };
    Ok(field(11)? + field(12)?)
}

/// An idle daemon holding many unanswered flows: its CPU over
/// `idle_seconds` (from /proc/PID/stat) and what `stats` says the expiry
/// tick took (the bulk read without the lock, the decisions with it).
fn idle_tick(plan: &Plan, bench: &Path) -> Result<Value> {
    let topo = Topology::client_relay_server()?;
    topo.client.ping(&SERVER_IP.to_string())?;
    let daemon = control_daemon(&topo)?;
    // Nothing listens there: the flows stay unanswered, on probation.
    let session = daemon.add(
        SocketAddr::V4(SocketAddrV4::new(SERVER_IP, LEARN_PORT)),
        &[],
    )?;
    let mut sender = topo.client.exec("taskset");
    sender.args(["-c", "0"]).arg(bench).args([
        "learn",
        "--dst",
        &SocketAddrV4::new(RELAY_CLIENT_IP, session.port).to_string(),
        "--flows",
        &plan.idle_flows.to_string(),
        "--rate",
        "10000",
    ]);
    run_json(&mut sender, Duration::from_secs(300))?;
    let flows = daemon.wait_until(
        "the idle flows to be learned",
        Duration::from_secs(120),
        |sessions| {
            let n: usize = sessions.iter().map(|s| s.flows.len()).sum();
            (n >= plan.idle_flows * 99 / 100).then_some(n)
        },
    )?;
    let clock_ticks: f64 = cmd::sh("getconf", &["CLK_TCK"])
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0);
    // Nothing asks the daemon anything meanwhile (`stats` itself walks the maps).
    let before = cpu_ticks(daemon.pid())?;
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(plan.idle_seconds));
    let seconds = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(daemon.pid())? - before) as f64 / clock_ticks / seconds;
    // Then what the last few ticks took, one `stats` a tick.
    let mut read_us = Vec::new();
    let mut locked_us = Vec::new();
    for _ in 0..5 {
        let stats = daemon.stats()?;
        if let (Some(read), Some(locked)) = (
            stats["slow_path"]["expiry_tick_read_us"].as_u64(),
            stats["slow_path"]["expiry_tick_locked_us"].as_u64(),
        ) {
            read_us.push(read as f64);
            locked_us.push(locked as f64);
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    let held = daemon
        .sessions()?
        .iter()
        .map(|s| s.flows.len())
        .sum::<usize>();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let out = json!({
        "flows_at_start": flows, "flows_at_end": held, "seconds": seconds,
        "daemon_cpu_fraction": cpu,
        "tick_read_us_median": median(&mut read_us), "tick_read_us_max": read_us.iter().copied().reduce(f64::max),
        "tick_locked_us_median": median(&mut locked_us), "tick_locked_us_max": locked_us.iter().copied().reduce(f64::max),
    });
    println!(
        "\n## Idle daemon with {flows} unanswered flows\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&out).unwrap_or_default()
    );
    Ok(out)
}

/// Received packets per second with the load sent from 1, 2, ... cores
/// (one loadgen process pinned to each), forwarder's XDP against nftables
/// on the same path. Counts above this machine's cores are skipped with
/// the reason, never measured on shared cores.
fn cores(plan: &Plan, bench: &Path) -> Result<Value> {
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let mut out = json!({"available_cores": available, "points": {}});
    let mut counts = plan.cores.clone();
    counts.sort_unstable();
    counts.dedup();
    let runnable: Vec<usize> = counts
        .iter()
        .copied()
        .filter(|&count| count >= 1 && count <= available)
        .collect();
    for &count in counts
        .iter()
        .filter(|&&count| count < 1 || count > available)
    {
        let reason = format!(
            "skipped: {count} sender cores asked for, this machine has {available} (available_parallelism)"
        );
        println!("cores {count}: {reason}");
        out["points"][count.to_string()] = json!({"skipped": reason});
    }
    let most = runnable.iter().copied().max().unwrap_or(0);
    for kind in [Kind::XdpNative, Kind::Nftables] {
        if most == 0 {
            break;
        }
        let s = setup(kind, bench, 1).with_context(|| format!("setting up {}", kind.name()))?;
        // Every sender's flows opened once, through the relay's slow path.
        loadgen(&s, bench, most * plan.flows_per_sender, 64, 0.0, true)?;
        for &count in &runnable {
            let mut received = Vec::new();
            for _ in 0..plan.reps {
                received.push(parallel_load(&s, bench, count, plan)? / 1000.0);
            }
            let (mean, sd) = spread(&received);
            out["points"][count.to_string()][kind.key()] =
                json!({"received_kpps": received, "mean": mean, "sd": sd});
        }
    }
    println!("\n## Sender cores: forwarder XDP against nftables (received kpps)\n");
    println!(
        "| sender cores | forwarder XDP native | nftables DNAT+SNAT | ratio |\n|---|---|---|---|"
    );
    for count in counts {
        let point = &out["points"][count.to_string()];
        if let Some(reason) = point["skipped"].as_str() {
            println!("| {count} | - | - | {reason} |");
            continue;
        }
        let xdp = point["xdp_native"]["mean"].as_f64().unwrap_or(0.0);
        let nft = point["nftables"]["mean"].as_f64().unwrap_or(0.0);
        let ratio = if nft > 0.0 { xdp / nft } else { 0.0 };
        out["points"][count.to_string()]["ratio"] = json!(ratio);
        println!("| {count} | {xdp:.0} | {nft:.0} | {ratio:.2}x |");
    }
    Ok(out)
}

/// One run of `count` loadgen processes, one pinned to each core 0..count,
/// each with its own flows: packets per second counted at the server.
fn parallel_load(s: &Setup, bench: &Path, count: usize, plan: &Plan) -> Result<f64> {
    let before = sink_count(&s.server)?;
    let mut children = Vec::new();
    for core in 0..count {
        let mut cmd = s.client.exec("taskset");
        cmd.args(["-c", &core.to_string()]).arg(bench).args([
            "loadgen",
            "--dst",
            &s.path.load.to_string(),
            "--flows",
            &plan.flows_per_sender.to_string(),
            "--size",
            "64",
            "--seconds",
            &plan.seconds.to_string(),
            "--src-port-base",
            &(10_000 + core * plan.flows_per_sender).to_string(),
        ]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        children.push(cmd.spawn().context("starting a loadgen")?);
    }
    let mut longest: f64 = 0.0;
    for child in children {
        let output = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let value: Value =
            serde_json::from_str(text.lines().last().context("loadgen printed nothing")?)?;
        longest = longest.max(value["seconds"].as_f64().unwrap_or(plan.seconds));
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = sink_count(&s.server)?;
    Ok((after - before) as f64 / longest.max(1e-3))
}

/// NET_RX and NET_TX softirqs run so far, summed over every CPU.
fn softirqs() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/softirqs")?;
    let sum = |name: &str| -> u64 {
        text.lines()
            .find(|line| line.trim_start().starts_with(name))
            .map(|line| {
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    Ok((sum("NET_RX:"), sum("NET_TX:")))
}

/// Context switches of the ksoftirqd threads so far: softirq work the
/// kernel deferred to a thread (which waits for the scheduler).
fn ksoftirqd_switches() -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !comm.starts_with("ksoftirqd/") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(value) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// A ping-pong run with what the kernel did for it: softirqs and
/// ksoftirqd wake-ups per round trip.
/// Pages the kernel allocated so far, every zone (`pgalloc_*` of /proc/vmstat).
fn pages_allocated() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/vmstat").context("reading /proc/vmstat")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("pgalloc_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

fn pingpong_traced(s: &Setup, bench: &Path, samples: usize) -> Result<Value> {
    let (rx_before, tx_before) = softirqs()?;
    let switches_before = ksoftirqd_switches()?;
    let pages_before = pages_allocated()?;
    let mut ping = pingpong(s, bench, samples)?;
    let pages_after = pages_allocated()?;
    let (rx_after, tx_after) = softirqs()?;
    let switches_after = ksoftirqd_switches()?;
    let rtts = ping["samples"].as_f64().unwrap_or(1.0).max(1.0);
    ping["net_rx_softirqs_per_rtt"] = json!((rx_after - rx_before) as f64 / rtts);
    ping["net_tx_softirqs_per_rtt"] = json!((tx_after - tx_before) as f64 / rtts);
    ping["ksoftirqd_switches_per_1000_rtt"] =
        json!((switches_after - switches_before) as f64 * 1000.0 / rtts);
    // Machine-wide: whatever else runs allocates too, so the direct path's
    // figure is the floor the relays are read against.
    ping["pages_allocated_per_rtt"] = json!(pages_after.saturating_sub(pages_before) as f64 / rtts);
    Ok(ping)
}

/// Native XDP's added latency against generic XDP's, with the kernel's
/// work per round trip beside each, and native XDP again with threaded
/// NAPI on the relay's interfaces, in one run. The paths take turns, round
/// by round, and each figure is the median over the rounds: a stall of the
/// shared machine then spoils one round of one path, not the comparison.
fn latency_analysis(plan: &Plan, bench: &Path) -> Result<Value> {
    const ROUNDS: usize = 5;
    let samples = (plan.ping_samples / ROUNDS).max(50);
    let setups: Vec<(Kind, Setup)> = [Kind::Direct, Kind::XdpNative, Kind::XdpGeneric]
        .into_iter()
        .map(|kind| {
            setup(kind, bench, 1)
                .with_context(|| format!("setting up {}", kind.name()))
                .map(|s| (kind, s))
        })
        .collect::<Result<_>>()?;
    let threaded = |s: &Setup, on: bool| -> Result<()> {
        let relay_ns = s._relay_ns.as_ref().context("no relay namespace")?;
        for dev in [RELAY_CLIENT_IF, RELAY_SERVER_IF] {
            relay_ns.run(
                "sh",
                &[
                    "-c",
                    &format!("echo {} > /sys/class/net/{dev}/threaded", u8::from(on)),
                ],
            )?;
        }
        Ok(())
    };
    let mut rounds: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for _ in 0..ROUNDS {
        for (kind, s) in &setups {
            rounds
                .entry(kind.key())
                .or_default()
                .push(pingpong_traced(s, bench, samples)?);
            // Busy polling is not a candidate here: it polls a socket's
            // NAPI context, and the relay's XDP path has no socket.
            if *kind == Kind::XdpNative {
                threaded(s, true)?;
                let ping = pingpong_traced(s, bench, samples);
                threaded(s, false)?;
                rounds
                    .entry("xdp_native_threaded_napi")
                    .or_default()
                    .push(ping?);
            }
        }
    }
    let median = |values: &[Value], key: &str| -> f64 {
        let mut v: Vec<f64> = values.iter().filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let mut out = json!({"rounds": ROUNDS, "samples_per_round": samples});
    for (key, values) in &rounds {
        let mut summary = json!({"rounds": values});
        for field in [
            "p50_us",
            "p99_us",
            "net_rx_softirqs_per_rtt",
            "net_tx_softirqs_per_rtt",
            "ksoftirqd_switches_per_1000_rtt",
            "pages_allocated_per_rtt",
        ] {
            summary[field] = json!(median(values, field));
        }
        out[*key] = summary;
    }
    let direct99 = out["direct"]["p99_us"].as_f64().unwrap_or(0.0);
    let direct50 = out["direct"]["p50_us"].as_f64().unwrap_or(0.0);
    println!(
        "\n## Latency analysis (ping-pong, one outstanding; medians of {ROUNDS} interleaved rounds)\n"
    );
    println!(
        "| path | added p50 µs | added p99 µs | NET_RX softirqs per RTT | NET_TX per RTT | ksoftirqd switches per 1000 RTT | pages allocated per RTT |\n|---|---|---|---|---|---|---|"
    );
    for key in [
        "direct",
        "xdp_native",
        "xdp_native_threaded_napi",
        "xdp_generic",
    ] {
        let l = &out[key];
        println!(
            "| {key} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
            l["p50_us"].as_f64().unwrap_or(0.0) - direct50,
            l["p99_us"].as_f64().unwrap_or(0.0) - direct99,
            l["net_rx_softirqs_per_rtt"].as_f64().unwrap_or(0.0),
            l["net_tx_softirqs_per_rtt"].as_f64().unwrap_or(0.0),
            l["ksoftirqd_switches_per_1000_rtt"].as_f64().unwrap_or(0.0),
            l["pages_allocated_per_rtt"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(out)
}
