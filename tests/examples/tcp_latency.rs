//! Benchmark: what mosh over TCP (`run --tcp-port`) adds to a round trip
//! against UDP through the same relay, p50 and p99, without loss and with
//! 1% and 3% random loss on the client's link (nftables `numgen random`,
//! both directions; this kernel has no netem). A UDP echo on the server
//! stands in for mosh-server; the client sends one 100-byte datagram at a
//! time and waits for its echo (a UDP ping lost on the way is counted as
//! lost after 300 ms; TCP retransmits instead, which is what p99 shows).
//!
//! Run as root: `cargo run --release -p forwarder-testbed --example tcp_latency [PINGS]`
//! (FORWARDER_BIN=target/release/forwarder). Results go to docs/BENCHMARKS.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use forwarder_testbed::relay::unwrap_document;
use forwarder_testbed::topology::{RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{Netns, Relay, SessionInfo, Topology, UdpEcho, prereq};

const TCP_PORT: u16 = 443;
const DATAGRAM: usize = 100;
const UDP_WAIT: Duration = Duration::from_millis(300);
/// One ping every 2 ms at most (500 a second): an interactive mosh
/// session's rate, and under the relay's slow-path budget per session
/// (1000/s), which the TCP flow's replies count against (they reach the
/// daemon, not XDP's redirect, since their client is a loopback socket).
const PACE: Duration = Duration::from_millis(2);

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

struct Run {
    p50_us: f64,
    p99_us: f64,
    lost: usize,
}

fn summarize(mut rtts: Vec<Duration>, lost: usize) -> Run {
    rtts.sort();
    Run {
        p50_us: percentile(&rtts, 0.50),
        p99_us: percentile(&rtts, 0.99),
        lost,
    }
}

fn pace(i: usize) {
    if i > 0 {
        std::thread::sleep(PACE);
    }
}

fn udp_pings(ns: &Netns, to: SocketAddr, pings: usize) -> Result<Run> {
    let socket: UdpSocket = ns.within(|| Ok(UdpSocket::bind("0.0.0.0:0")?))?;
    socket.set_read_timeout(Some(UDP_WAIT))?;
    let (mut rtts, mut lost) = (Vec::new(), 0);
    let mut buf = [0u8; 2048];
    for i in 0..pings {
        let mut datagram = [0u8; DATAGRAM];
        datagram[..8].copy_from_slice(&(i as u64).to_be_bytes());
        pace(i);
        let sent = Instant::now();
        // nftables' drop on output answers EPERM: the ping is lost.
        if socket.send_to(&datagram, to).is_err() {
            lost += 1;
            continue;
        }
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if n == DATAGRAM && buf[..8] == datagram[..8] => {
                    rtts.push(sent.elapsed());
                    break;
                }
                // A late echo of an earlier ping: not this one's.
                Ok(_) => continue,
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    Ok(summarize(rtts, lost))
}

fn tcp_pings(ns: &Netns, session: &SessionInfo, token: &str, pings: usize) -> Result<Run> {
    let mut stream: TcpStream =
        ns.within(|| Ok(TcpStream::connect((RELAY_CLIENT_IP, TCP_PORT))?))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut hello = b"FWDT\x01".to_vec();
    hello.push(session.id.len() as u8);
    hello.extend_from_slice(session.id.as_bytes());
    for i in 0..token.len() / 2 {
        hello.push(u8::from_str_radix(&token[2 * i..2 * i + 2], 16)?);
    }
    stream.write_all(&hello)?;
    let mut rtts = Vec::new();
    let mut echo = [0u8; 2 + DATAGRAM];
    for i in 0..pings {
        let mut frame = [0u8; 2 + DATAGRAM];
        frame[..2].copy_from_slice(&(DATAGRAM as u16).to_be_bytes());
        frame[2..10].copy_from_slice(&(i as u64).to_be_bytes());
        pace(i);
        let sent = Instant::now();
        stream.write_all(&frame)?;
        // The relay's UDP leg (relay to server) is lossless here, so every
        // echo comes back, in order.
        stream.read_exact(&mut echo).context("reading an echo")?;
        rtts.push(sent.elapsed());
    }
    Ok(summarize(rtts, 0))
}

fn lossy(ns: &Netns, percent: u32) -> Result<()> {
    ns.run(
        "nft",
        &[&format!(
            "add table inet lossy; \
             add chain inet lossy out {{ type filter hook output priority 0; }}; \
             add rule inet lossy out oifname != \"lo\" numgen random mod 100 < {percent} drop; \
             add chain inet lossy in {{ type filter hook input priority 0; }}; \
             add rule inet lossy in iifname != \"lo\" numgen random mod 100 < {percent} drop"
        )],
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let pings: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2000);
    prereq::require()?;
    let topo = Topology::client_relay_server()?;
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--tcp-port", &TCP_PORT.to_string()],
    )?;
    let backend = SocketAddr::from((SERVER_IP, 7000));
    let _echo = UdpEcho::start(&topo.server, backend)?;
    let out = relay.verb(&["add", "--backend", &backend.to_string(), "--json"])?;
    let session: SessionInfo =
        serde_json::from_value(unwrap_document(serde_json::from_str(&out)?)?)?;
    let token = session
        .tcp
        .clone()
        .and_then(|t| t.token)
        .context("no TCP token")?;
    let udp_to = SocketAddr::from((RELAY_CLIENT_IP, session.port));
    // Warm both paths (flows learned, XDP entries in place).
    udp_pings(&topo.client, udp_to, 50)?;
    tcp_pings(&topo.client, &session, &token, 50)?;
    println!("{pings} pings of {DATAGRAM} bytes each, one at a time\n");
    println!(
        "| loss | UDP p50 µs | UDP p99 µs | UDP lost | TCP p50 µs | TCP p99 µs | TCP added p50 / p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for percent in [0, 1, 3] {
        if percent > 0 {
            lossy(&topo.client, percent)?;
        }
        let udp = udp_pings(&topo.client, udp_to, pings)?;
        let tcp = tcp_pings(&topo.client, &session, &token, pings)?;
        println!(
            "| {percent}% | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:+.1} / {:+.1} |",
            udp.p50_us,
            udp.p99_us,
            udp.lost,
            tcp.p50_us,
            tcp.p99_us,
            tcp.p50_us - udp.p50_us,
            tcp.p99_us - udp.p99_us
        );
        if percent > 0 {
            topo.client.run("nft", &["delete table inet lossy"])?;
        }
    }
    Ok(())
}
