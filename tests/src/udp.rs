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
