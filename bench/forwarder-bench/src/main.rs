//! Benchmark tools run inside the bench's namespaces by `cargo xtask bench`:
//! a load generator, an echo server and a ping-pong latency probe, the XDP
//! ceiling program, and a reader of the kernel's BPF run-time statistics.
//! Every loop here is bounded by a count or a deadline.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aya::maps::{Array, DevMap};
use aya::programs::{Xdp, XdpMode};
use clap::{Parser, Subcommand};
use forwarder_bench_common::CeilingConfig;
use forwarder_common::BackendRewrite;
use forwarder_common::flow::{Endpoints, IFACE_ANY, Rewrite};
use serde_json::json;

mod control;
mod progcost;

/// The ceiling XDP program, built by build.rs and embedded.
static CEILING_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-ceiling"));

#[derive(Parser)]
#[command(
    name = "forwarder-bench",
    about = "Benchmark tools for `cargo xtask bench`"
)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// Send UDP as fast as possible from many source ports (flows) with sendmmsg.
    Loadgen {
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        flows: usize,
        /// UDP payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Send one packet per flow first and wait this long (lets a relay learn the flows).
        #[arg(long, default_value_t = 0)]
        warmup_ms: u64,
        /// Only the warm-up: open the flows and exit.
        #[arg(long)]
        warmup_only: bool,
        /// Source ports BASE, BASE+1, ...: the same flows across runs (0: any ports).
        #[arg(long, default_value_t = 0)]
        src_port_base: u16,
    },
    /// Answer every datagram with itself, for at most `--seconds`.
    Echo {
        #[arg(long)]
        bind: SocketAddrV4,
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
    },
    /// One outstanding request at a time: round-trip time percentiles.
    Pingpong {
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 20_000)]
        samples: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Attach the ceiling program: UDP to `--port` is rewritten to `--to` and redirected.
    Ceiling {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        egress: String,
        /// Relay address and port the load is sent to.
        #[arg(long)]
        relay: SocketAddrV4,
        /// Client address of the load (its source ports are kept).
        #[arg(long)]
        client: Ipv4Addr,
        /// Relay's address towards the server.
        #[arg(long)]
        source: Ipv4Addr,
        #[arg(long)]
        to: SocketAddrV4,
        /// Next hop MAC (the server's), aa:bb:cc:dd:ee:ff.
        #[arg(long)]
        dmac: String,
        #[arg(long, default_value = "native")]
        mode: String,
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
    },
    /// Fill an instance's pinned flow maps with `--count` synthetic flows
    /// (addresses from 198.18.0.0/15, never on the wire): measures the XDP
    /// program with a full table without holding a socket per flow.
    Fill {
        /// The pinned data plane's folder, /sys/fs/bpf/forwarder/<instance>/layout-….
        #[arg(long)]
        pins: std::path::PathBuf,
        #[arg(long)]
        count: u32,
    },
    /// Admission on the shared port: time to match a new endpoint's first
    /// datagram to its session among `--sessions` keyed sessions, the
    /// matching key tried last, on one core as the daemon does it. Pure
    /// CPU: no namespace, no socket.
    Admission {
        /// Keyed sessions on the port, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000,10000")]
        sessions: Vec<usize>,
        /// Datagram bytes (mosh's first datagram of a new endpoint is about 100).
        #[arg(long, value_delimiter = ',', default_value = "100,1252")]
        sizes: Vec<usize>,
        /// Searches timed per point.
        #[arg(long, default_value_t = 200)]
        reps: usize,
    },
    /// Per-packet cost of forwarder's XDP program, the raw-redirect ceiling
    /// and a bare XDP_DROP through BPF_PROG_TEST_RUN (timed in the kernel):
    /// forwarding both ways, and refusing the junk a flood is made of. Runs
    /// in a private network namespace of its own.
    Progcost {
        /// Test-run calls per case (each repeats the program 250 or 10,000 times).
        #[arg(long, default_value_t = 200)]
        calls: usize,
        /// Another build of forwarder's object to measure beside this one,
        /// LABEL=PATH (repeatable): before/after in one interleaved run.
        #[arg(long)]
        object: Vec<String>,
        /// Flow counts of the round-robin cases (comma-separated); a sweep
        /// such as 1000,2000,4000,8000,15000 shows where the flows' entries
        /// outgrow a cache level.
        #[arg(long, value_delimiter = ',', default_values_t = progcost::DEFAULT_RINGS)]
        rings: Vec<u16>,
    },
    /// Session adds through the control API on one connection: single
    /// adds pipelined (`--batch 0`) or `add_many` requests of `--batch` each.
    Adds {
        #[arg(long)]
        instance: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        batch: usize,
        /// Backends are BACKEND_IP:BASE_PORT, BASE_PORT+1, ...
        #[arg(long)]
        backend_ip: Ipv4Addr,
        #[arg(long, default_value_t = 20_000)]
        base_port: u16,
    },
    /// The first datagram of `--flows` new flows, paced to `--rate` per second.
    Learn {
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long)]
        flows: usize,
        #[arg(long, default_value_t = 40_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 20_000)]
        src_port_base: u16,
    },
    /// Counts what `learn` sent where the relay delivers it: the learning rate.
    LearnSink {
        #[arg(long)]
        bind: SocketAddrV4,
        #[arg(long)]
        expect: usize,
        /// Stop after this long without a datagram.
        #[arg(long, default_value_t = 2_000)]
        idle_ms: u64,
    },
    /// Run time and run count of loaded XDP programs named `--name`.
    BpfStats {
        #[arg(long)]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().tool {
        Tool::Loadgen {
            dst,
            flows,
            size,
            seconds,
            warmup_ms,
            warmup_only,
            src_port_base,
        } => loadgen(
            dst,
            flows,
            size,
            seconds,
            warmup_ms,
            warmup_only,
            src_port_base,
        ),
        Tool::Echo { bind, seconds } => echo(bind, seconds),
        Tool::Pingpong { dst, samples, size } => pingpong(dst, samples, size),
        Tool::Ceiling {
            iface,
            egress,
            relay,
            client,
            source,
            to,
            dmac,
            mode,
            seconds,
        } => ceiling(
            &iface, &egress, relay, client, source, to, &dmac, &mode, seconds,
        ),
        Tool::BpfStats { name } => bpf_stats(&name),
        Tool::Adds {
            instance,
            count,
            batch,
            backend_ip,
            base_port,
        } => control::adds(&instance, count, batch, backend_ip, base_port),
        Tool::Learn {
            dst,
            flows,
            rate,
            src_port_base,
        } => control::learn(dst, flows, rate, src_port_base),
        Tool::LearnSink {
            bind,
            expect,
            idle_ms,
        } => control::learn_sink(bind, expect, idle_ms),
        Tool::Progcost {
            calls,
            object,
            rings,
        } => progcost::run(calls, &object, &rings),
        Tool::Fill { pins, count } => fill(&pins, count),
        Tool::Admission {
            sessions,
            sizes,
            reps,
        } => admission(&sessions, &sizes, reps),
    }
}

/// This thread's CPU time: what a search costs without the time the
/// scheduler gave other work (the bench host is shared).
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(now.tv_sec() as f64 + now.tv_nsec() as f64 * 1e-9)
}

/// See [`Tool::Admission`]. Prints one JSON document: per session count,
/// datagram size and datagram kind, the median, 99th percentile and worst
/// search time in microseconds (wall clock), and the median and 99th
/// percentile of the thread's CPU time per search.
fn admission(sessions: &[usize], sizes: &[usize], reps: usize) -> anyhow::Result<()> {
    use forwarder::mosh::{KeyRing, MoshKey};
    let mut points = Vec::new();
    for &count in sessions {
        let keys: Vec<MoshKey> = (0..count.max(1))
            .map(|_| MoshKey::from_bytes(rand::random()))
            .collect();
        let target = keys.last().expect("at least one").clone();
        let mut ring = KeyRing::default();
        for (index, key) in keys.iter().enumerate() {
            ring.insert(index, key.clone());
        }
        for &size in sizes {
            // What mosh's first datagram of a new endpoint holds: two
            // timestamps, a small instruction id, the fragment number, zlib.
            let mut plaintext = vec![0u8; size.saturating_sub(24).max(16)];
            plaintext[..4].copy_from_slice(&rand::random::<[u8; 4]>());
            plaintext[11] = 42;
            plaintext[12] = 0x80;
            plaintext[14] = 0x78;
            let genuine = target.seal(7, &plaintext);
            // Made without any key: what a flood costs, every key tried.
            let forged: Vec<u8> = (0..genuine.len()).map(|_| rand::random()).collect();
            for (kind, datagram, expected) in [
                ("genuine, key tried last", &genuine, Ok(keys.len() - 1)),
                ("forged, matches no key", &forged, Err(())),
            ] {
                let mut micros = Vec::with_capacity(reps);
                let mut cpu_micros = Vec::with_capacity(reps);
                for _ in 0..reps.max(1) {
                    let cpu_started = thread_cpu_seconds()?;
                    let started = Instant::now();
                    let found = ring.find(datagram);
                    micros.push(started.elapsed().as_secs_f64() * 1e6);
                    cpu_micros.push((thread_cpu_seconds()? - cpu_started) * 1e6);
                    if found.map(|(index, _)| index).map_err(|_| ()) != expected {
                        bail!("{kind}: wrong match among {count} keys");
                    }
                }
                micros.sort_by(f64::total_cmp);
                cpu_micros.sort_by(f64::total_cmp);
                let at = |values: &[f64], q: f64| {
                    values[((values.len() - 1) as f64 * q).round() as usize]
                };
                points.push(json!({
                    "sessions": count, "datagram_bytes": datagram.len(), "datagram": kind,
                    "p50_us": at(&micros, 0.5), "p99_us": at(&micros, 0.99), "max_us": at(&micros, 1.0),
                    "cpu_p50_us": at(&cpu_micros, 0.5), "cpu_p99_us": at(&cpu_micros, 0.99),
                    "reps": micros.len(),
                }));
            }
        }
    }
    println!("{}", json!({ "admission": points }));
    Ok(())
}

fn loadgen(
    dst: SocketAddrV4,
    flows: usize,
    size: usize,
    seconds: f64,
    warmup_ms: u64,
    warmup_only: bool,
    src_port_base: u16,
) -> anyhow::Result<()> {
    forwarder::daemon::raise_fd_limit();
    let payload: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    let mut sockets = Vec::with_capacity(flows);
    for index in 0..flows {
        let port = if src_port_base == 0 {
            0
        } else {
            src_port_base + index as u16
        };
        let socket =
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).context("binding a load socket")?;
        socket.connect(dst)?;
        socket.set_nonblocking(true)?;
        sockets.push(socket);
    }
    let warmup_started = Instant::now();
    // Paced, and twice: a relay learns each flow from its first packet in
    // userspace, and a burst of thousands would overflow its socket buffer.
    for _ in 0..2 {
        for socket in &sockets {
            let _ = socket.send(&payload);
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    std::thread::sleep(Duration::from_millis(warmup_ms));
    if warmup_only {
        println!(
            "{}",
            json!({"flows": flows, "warmup_seconds": warmup_started.elapsed().as_secs_f64()})
        );
        return Ok(());
    }

    const BATCH: usize = 64;
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain C data; zero is a valid "no address, no control" header.
    let mut headers: Vec<libc::mmsghdr> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for header in &mut headers {
        header.msg_hdr.msg_iov = &raw mut iov;
        header.msg_hdr.msg_iovlen = 1;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut round = 0usize;
    while Instant::now() < deadline {
        let socket = &sockets[round % sockets.len()];
        round += 1;
        // SAFETY: every header points at `iov`, which points at `payload`;
        // both outlive the call, and the socket is connected so no address is needed.
        let result =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as u32, 0) };
        if result > 0 {
            sent += result as u64;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"sent": sent, "seconds": elapsed, "pps": sent as f64 / elapsed, "flows": flows, "size": size})
    );
    Ok(())
}

/// Busy-polls while a ping-pong runs: a sleeping CPU in a VM takes tens of
/// microseconds to wake, which would drown the relay's own latency in the
/// measurement. Idle, it blocks in `recv` instead of napping: the latency
/// analysis keeps every path's echo up at once, and an idle echo that woke
/// every millisecond took the CPU from the measured path's busy-polling
/// client or echo (on 2 vCPUs, in about 3 % of round trips, each then
/// 30 µs or more: the whole p99).
fn echo(bind: SocketAddrV4, seconds: f64) -> anyhow::Result<()> {
    /// Empty polls before the echo blocks: a few milliseconds of silence.
    const SPINS_BEFORE_BLOCKING: u32 = 20_000;
    /// How often a blocked echo looks at its deadline.
    const BLOCKED_WAIT: Duration = Duration::from_millis(100);
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    socket.set_read_timeout(Some(BLOCKED_WAIT))?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buf = [0u8; 2048];
    let mut idle_spins = 0u32;
    let mut blocking = true;
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                let _ = socket.send_to(&buf[..len], from);
                idle_spins = 0;
                if blocking {
                    socket.set_nonblocking(true)?;
                    blocking = false;
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                idle_spins += 1;
                if !blocking && idle_spins > SPINS_BEFORE_BLOCKING {
                    socket.set_nonblocking(false)?;
                    blocking = true;
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

fn pingpong(dst: SocketAddrV4, samples: usize, size: usize) -> anyhow::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(dst)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut payload = vec![0u8; size.max(8)];
    let wait_reply = |socket: &UdpSocket, buf: &mut [u8]| -> std::io::Result<usize> {
        // Busy-poll (see `echo`), giving up after 200 ms.
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match socket.recv(buf) {
                Err(error)
                    if error.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {}
                other => return other,
            }
        }
    };
    let mut buf = [0u8; 2048];
    // The first exchange opens the relay's flow through its slow path.
    for _ in 0..50 {
        socket.send(&payload)?;
        if socket.recv(&mut buf).is_ok() {
            break;
        }
    }
    socket.set_nonblocking(true)?;
    let mut rtts = Vec::with_capacity(samples);
    let mut lost = 0u64;
    for sequence in 0..samples as u64 {
        payload[..8].copy_from_slice(&sequence.to_be_bytes());
        let started = Instant::now();
        socket.send(&payload)?;
        loop {
            match wait_reply(&socket, &mut buf) {
                Ok(len) if len >= 8 && buf[..8] == sequence.to_be_bytes() => {
                    rtts.push(started.elapsed().as_nanos() as u64);
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    if rtts.is_empty() {
        bail!("no ping-pong reply from {dst}");
    }
    rtts.sort_unstable();
    let percentile = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "{}",
        json!({"samples": rtts.len(), "lost": lost, "p50_us": percentile(0.5), "p99_us": percentile(0.99)})
    );
    Ok(())
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("malformed MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?} does not have 6 bytes"))
}

/// The MAC of an interface in this network namespace (/sys may show
/// another namespace's devices under nsenter, so ask the kernel directly).
fn interface_mac(name: &str) -> anyhow::Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()?
        .filter(|address| address.interface_name == name)
        .find_map(|address| address.address?.as_link_addr()?.addr())
        .with_context(|| format!("no link-layer address for {name}"))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one flag each, straight from the CLI"
)]
fn ceiling(
    iface: &str,
    egress: &str,
    relay: SocketAddrV4,
    client: Ipv4Addr,
    source: Ipv4Addr,
    to: SocketAddrV4,
    dmac: &str,
    mode: &str,
    seconds: f64,
) -> anyhow::Result<()> {
    let egress_ifindex =
        nix::net::if_::if_nametoindex(egress).with_context(|| format!("no interface {egress}"))?;
    let from = Endpoints {
        saddr: client.octets(),
        daddr: relay.ip().octets(),
        sport: [0; 2],
        dport: relay.port().to_be_bytes(),
    };
    let new = Endpoints {
        saddr: source.octets(),
        daddr: to.ip().octets(),
        sport: [0; 2],
        dport: to.port().to_be_bytes(),
    };
    let config = CeilingConfig {
        rewrite: Rewrite::new(from, new),
        smac: interface_mac(egress)?,
        dmac: parse_mac(dmac)?,
        port: relay.port().to_be_bytes(),
        _pad: [0; 2],
        egress_ifindex,
        _pad_end: [0; 4],
    };
    let mut ebpf = aya::Ebpf::load(CEILING_OBJECT).context("loading the ceiling program")?;
    let mut map: Array<_, CeilingConfig> =
        Array::try_from(ebpf.map_mut("CEILING").context("no CEILING map")?)?;
    map.set(0, config, 0)?;
    let mut devmap = DevMap::try_from(
        ebpf.map_mut("CEILING_EGRESS")
            .context("no CEILING_EGRESS map")?,
    )?;
    devmap.set(0, egress_ifindex, None, 0)?;
    let program: &mut Xdp = ebpf
        .program_mut("forwarder_ceiling")
        .context("no forwarder_ceiling program")?
        .try_into()?;
    program.load()?;
    let mode = match mode {
        "native" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        other => bail!("unknown mode {other:?}: native or skb"),
    };
    program
        .attach(iface, mode)
        .with_context(|| format!("attaching the ceiling to {iface}"))?;
    println!("ceiling attached");
    // Stay attached until killed or the deadline, whichever comes first.
    std::thread::sleep(Duration::from_secs_f64(seconds));
    Ok(())
}

fn fill(pins: &std::path::Path, count: u32) -> anyhow::Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use forwarder_common::{BackendKey, ClientKey};
    let open = |name: &str| -> anyhow::Result<MapData> {
        let path = pins.join(format!("map-{name}"));
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    let mut clients: HashMap<_, ClientKey, Rewrite> =
        HashMap::try_from(Map::HashMap(open("CLIENT_FLOWS")?))?;
    let mut backends: HashMap<_, BackendKey, BackendRewrite> =
        HashMap::try_from(Map::HashMap(open("BACKEND_FLOWS")?))?;
    let mut inserted = 0u32;
    for index in 0..count {
        // 198.18.0.0/15 holds 2^17 clients; the port tells the rest apart
        // (a million entries and more).
        let [_, a, b, c] = (index & 0x1_ffff).to_be_bytes();
        let client = [198, 18 | (a & 1), b, c];
        let port = (1 + (index >> 17) as u16).to_be_bytes();
        let rewrite = Rewrite::new(Endpoints::default(), Endpoints::default());
        let client_key = ClientKey {
            relay_addr: [198, 19, 255, 254],
            client_addr: client,
            relay_port: 1u16.to_be_bytes(),
            client_port: port,
        };
        let backend_key = BackendKey {
            relay_addr: client,
            relay_port: port,
            _pad: [0; 2],
        };
        // A full map refuses the rest: that is the table-full state wanted.
        if clients.insert(client_key, rewrite, 0).is_err()
            || backends
                .insert(
                    backend_key,
                    BackendRewrite::new(rewrite, [0; 4], [0; 2], IFACE_ANY),
                    0,
                )
                .is_err()
        {
            break;
        }
        inserted += 1;
    }
    println!("{}", json!({"inserted": inserted}));
    Ok(())
}

fn bpf_stats(name: &str) -> anyhow::Result<()> {
    let mut programs = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.name_as_str() == Some(name) {
            programs.push(json!({
                "id": info.id(),
                "run_time_ns": info.run_time().as_nanos() as u64,
                "run_count": info.run_count(),
            }));
        }
    }
    println!("{}", serde_json::Value::Array(programs));
    Ok(())
}
