//! A deterministic UDP echo peer and pinger, with sockets placed in namespaces
//! from inside the test process (see [`Netns::within`]).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Upper bound on an echo server's life, in case a test forgets to drop it.
const ECHO_MAX_LIFETIME: Duration = Duration::from_secs(600);

/// Echoes every datagram back to its source, on a thread, until dropped.
#[derive(Debug)]
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = ns.udp_bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + ECHO_MAX_LIFETIME;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // Timeouts and ICMP errors surface here; both just mean "nothing to echo".
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        // Counted before the reply leaves: a pinger that got
                        // its echo must never read a count that lacks it.
                        echoed.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Ok(Self {
            addr,
            stop,
            echoed,
            thread: Some(thread),
        })
    }

    /// Datagrams received and echoed back so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client socket that sends numbered probes and waits for their echo.
#[derive(Debug)]
pub struct UdpPinger {
    socket: UdpSocket,
    to: SocketAddr,
    seq: u64,
}

impl UdpPinger {
    /// A socket bound to `bind` inside `ns`, aimed at `to`. It stays
    /// unconnected so ICMP errors (port closed after a remove) are not reported
    /// as receive errors: absence of a reply is the only signal.
    pub fn new(ns: &Netns, bind: SocketAddr, to: SocketAddr) -> Result<Self> {
        let socket = ns.udp_bind(bind)?;
        Ok(Self { socket, to, seq: 0 })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Sends one probe and waits up to `timeout` for that same probe to come
    /// back from `to`. Stale replies to earlier probes are skipped.
    pub fn ping(&mut self, timeout: Duration) -> Result<bool> {
        self.seq += 1;
        let probe = format!("fwd-probe {} {}", std::process::id(), self.seq);
        self.socket
            .send_to(probe.as_bytes(), self.to)
            .with_context(|| format!("sending to {}", self.to))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) if from == self.to && &buf[..n] == probe.as_bytes() => {
                    return Ok(true);
                }
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Pings up to `tries` times; true as soon as one probe comes back. The
    /// first packets of a flow go through the daemon and may race neighbour
    /// resolution, hence retries.
    pub fn ping_any(&mut self, tries: u32, each: Duration) -> Result<bool> {
        for _ in 0..tries {
            if self.ping(each)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Upper bound on a stream's life, whatever the test does.
const STREAM_MAX_LIFETIME: Duration = Duration::from_secs(120);

/// A steady numbered UDP stream towards an echo peer: a sender thread paces
/// `rate` datagrams per second, a receiver thread records which came back.
#[derive(Debug)]
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<Vec<bool>>>,
}

/// What a stream saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamReport {
    pub sent: u64,
    pub echoed: u64,
    pub lost: u64,
}

impl UdpStream {
    pub fn start(ns: &Netns, bind: SocketAddr, to: SocketAddr, rate: u32) -> Result<Self> {
        let socket = ns.udp_bind(bind)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let receive_socket = socket.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let per_ms = rate.div_ceil(1000).max(1) as u64;
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) && start.elapsed() < STREAM_MAX_LIFETIME {
                    // Pace against the clock, so a slow iteration is caught up.
                    let due = (start.elapsed().as_millis() as u64 + 1) * per_ms;
                    while seq < due {
                        if socket.send_to(&seq.to_be_bytes(), to).is_err() {
                            break;
                        }
                        seq += 1;
                        sent.store(seq, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let receiver = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut seen = Vec::new();
                let mut buf = [0u8; 64];
                let mut quiet_since = Instant::now();
                loop {
                    if start.elapsed() > STREAM_MAX_LIFETIME + Duration::from_secs(5) {
                        break;
                    }
                    // After stop, linger until a full second passes without echoes.
                    if stop.load(Ordering::Relaxed)
                        && quiet_since.elapsed() > Duration::from_secs(1)
                    {
                        break;
                    }
                    match receive_socket.recv_from(&mut buf) {
                        Ok((8, from)) if from == to => {
                            let seq =
                                u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
                            if seq >= seen.len() {
                                seen.resize(seq + 1, false);
                            }
                            seen[seq] = true;
                            quiet_since = Instant::now();
                        }
                        Ok(_) | Err(_) => {}
                    }
                }
                seen
            })
        };
        Ok(Self {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for the last echoes, and reports.
    pub fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let seen = self
            .receiver
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default();
        let sent = self.sent();
        let echoed = seen.iter().take(sent as usize).filter(|&&s| s).count() as u64;
        StreamReport {
            sent,
            echoed,
            lost: sent - echoed,
        }
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}
