//! A new-flow flood: UDP datagrams from thousands of spoofed sources, sent
//! as raw frames as fast as one thread can, bounded in count and time.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::Rng as _;

use crate::netns::Netns;
use crate::raw::{PacketSocket, mac_of, udp_frame};

/// Distinct spoofed source endpoints, cycled through.
pub const FLOOD_SOURCES: usize = 4096;

/// Frames a paced flood sends between two looks at the clock.
const PACED_BURST: usize = 64;

/// What a finished flood did.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub sent: u64,
    pub refused_by_queue: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// A flood running on its own thread until [`Flood::finish`], its time or its count runs out.
#[derive(Debug)]
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<FloodReport>>,
}

impl Flood {
    /// Floods `target` out of `ifname` in `ns` towards the MAC of `next_hop_if`
    /// in `next_hop_ns`, with sources in 10.200.0.0/16 and random ports.
    ///
    /// `pps` paces the flood (None: as fast as one thread sends).
    pub fn start(
        ns: &Netns,
        ifname: &str,
        next_hop: (&Netns, &str),
        target: SocketAddrV4,
        max_packets: u64,
        max_time: Duration,
        pps: Option<u32>,
    ) -> Result<Self> {
        let socket = PacketSocket::open(ns, ifname)?;
        let macs = (mac_of(ns, ifname)?, mac_of(next_hop.0, next_hop.1)?);
        let mut rng = rand::rng();
        let frames: Vec<Vec<u8>> = (0..FLOOD_SOURCES)
            .map(|_| {
                let source = SocketAddrV4::new(
                    Ipv4Addr::new(10, 200, rng.random(), rng.random()),
                    rng.random_range(1024..=65535),
                );
                let payload: Vec<u8> = (0..64).map(|_| rng.random()).collect();
                udp_frame(macs, source, target, &payload)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let (mut sent, mut refused) = (0u64, 0u64);
                'flood: while sent < max_packets && started.elapsed() < max_time {
                    if let Some(pps) = pps {
                        // Sleep until the schedule catches up with what was sent.
                        let due = Duration::from_secs_f64(
                            (sent + refused) as f64 / f64::from(pps.max(1)),
                        );
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let burst = if pps.is_some() {
                        PACED_BURST
                    } else {
                        frames.len()
                    };
                    for frame in frames
                        .iter()
                        .cycle()
                        .skip((sent + refused) as usize % frames.len())
                        .take(burst)
                    {
                        match socket.send(frame) {
                            Ok(true) => sent += 1,
                            Ok(false) => refused += 1,
                            Err(_) => break 'flood,
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                FloodReport {
                    sent,
                    refused_by_queue: refused,
                    elapsed: started.elapsed(),
                }
            })
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn is_running(&self) -> bool {
        self.thread
            .as_ref()
            .is_some_and(|thread| !thread.is_finished())
    }

    pub fn finish(mut self) -> FloodReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the flood thread panicked")
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
