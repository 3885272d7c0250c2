//! Raw Ethernet frames in and out of an interface inside a namespace
//! (AF_PACKET): what an attacker on a segment can send and see, and a
//! capture the tests can check byte for byte.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Upper bounds on a capture, whatever the test does.
const CAPTURE_MAX_FRAMES: usize = 200_000;
const CAPTURE_MAX_LIFETIME: Duration = Duration::from_secs(300);

/// An AF_PACKET socket bound to one interface: sends whole frames out of
/// it and receives every frame it sends or receives.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket inside `ns`, bound to `ifname` there.
    pub fn open(ns: &Netns, ifname: &str) -> Result<Self> {
        let name = ifname.to_string();
        ns.within(move || Self::open_here(&name))
            .with_context(|| format!("opening a packet socket on {ifname} in {}", ns.name()))
    }

    fn open_here(ifname: &str) -> Result<Self> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_PACKET) (needs root)");
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .with_context(|| format!("no interface {ifname}"))?;
        // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex as i32;
        // SAFETY: `address` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("binding the packet socket");
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of exactly this size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("setting SO_RCVTIMEO");
        }
        Ok(Self { fd })
    }

    /// Sends one frame; `Ok(false)` when the interface queue is full (ENOBUFS).
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: the buffer is valid for its length; the socket is bound, so no address is needed.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOBUFS)
                || error.kind() == io::ErrorKind::WouldBlock
            {
                return Ok(false);
            }
            return Err(error);
        }
        Ok(true)
    }

    /// Receives one frame, or `None` after the 100 ms receive timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: the buffer is valid and writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock
                || error.kind() == io::ErrorKind::Interrupted
            {
                return Ok(None);
            }
            return Err(error);
        }
        Ok(Some(n as usize))
    }
}

/// Records every frame seen on an interface until stopped (bounded in
/// frames and time).
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(ns: &Netns, ifname: &str) -> Result<Self> {
        let socket = PacketSocket::open(ns, ifname)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + CAPTURE_MAX_LIFETIME;
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && frames.len() < CAPTURE_MAX_FRAMES
                {
                    if let Ok(Some(n)) = socket.recv(&mut buf) {
                        frames.push(buf[..n].to_vec());
                    }
                }
                frames
            })
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns the frames, in the order seen.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP datagram found in a captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub payload: Vec<u8>,
}

/// The IPv4/UDP datagrams among `frames` (parsed with etherparse), others skipped.
pub fn udp_datagrams(frames: &[Vec<u8>]) -> Vec<Datagram> {
    use std::net::SocketAddr;
    udp_datagrams_any(frames)
        .into_iter()
        .filter_map(|datagram| match (datagram.src, datagram.dst) {
            (SocketAddr::V4(src), SocketAddr::V4(dst)) => Some(Datagram {
                src,
                dst,
                payload: datagram.payload,
            }),
            _ => None,
        })
        .collect()
}

/// The MAC address of `dev` in `ns`, from `ip -j link`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = crate::cmd::run_ok(
        Command::new("ip").args(["-n", ns.name(), "-j", "link", "show", "dev", dev]),
        crate::cmd::SHORT,
    )?;
    let value: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
    let text = value[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC address for {dev} in `ip -j link`: {out}"))?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text}"))?;
    }
    Ok(mac)
}

/// An Ethernet/IPv4/UDP frame with valid checksums, built by etherparse.
pub fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    write_frame(
        etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .udp(src.port(), dst.port()),
        payload,
    )
}

/// The frame `builder` makes around `payload` (etherparse fills in the
/// lengths and checksums).
fn write_frame(
    builder: etherparse::PacketBuilderStep<etherparse::UdpHeader>,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("writing into a Vec cannot fail");
    frame
}

/// A UDP datagram of either family found in a captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnyDatagram {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub payload: Vec<u8>,
}

/// The IPv4/UDP and IPv6/UDP datagrams among `frames`, others skipped
/// (IPv6 behind extension headers included: etherparse walks them).
pub fn udp_datagrams_any(frames: &[Vec<u8>]) -> Vec<AnyDatagram> {
    use std::net::{IpAddr, SocketAddr};
    frames
        .iter()
        .filter_map(|frame| {
            let packet = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
            let (src, dst): (IpAddr, IpAddr) = match packet.net? {
                etherparse::NetSlice::Ipv4(ip) => (
                    ip.header().source_addr().into(),
                    ip.header().destination_addr().into(),
                ),
                etherparse::NetSlice::Ipv6(ip) => (
                    ip.header().source_addr().into(),
                    ip.header().destination_addr().into(),
                ),
            };
            let Some(etherparse::TransportSlice::Udp(udp)) = packet.transport else {
                return None;
            };
            Some(AnyDatagram {
                src: SocketAddr::new(src, udp.source_port()),
                dst: SocketAddr::new(dst, udp.destination_port()),
                payload: udp.payload().to_vec(),
            })
        })
        .collect()
}

/// An Ethernet/IP/UDP frame of either family (both ends the same one)
/// with valid checksums, built by etherparse.
pub fn udp_frame_any(
    macs: ([u8; 6], [u8; 6]),
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    use std::net::SocketAddr;
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => udp_frame(macs, src, dst, payload),
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => write_frame(
            etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
                .ipv6(src.ip().octets(), dst.ip().octets(), 64)
                .udp(src.port(), dst.port()),
            payload,
        ),
        _ => panic!("a frame from {src} to {dst} mixes families"),
    }
}
