//! Packet capture with tcpdump inside a namespace, read back with
//! `pcap-file` and `etherparse`: real packets to replay at the relay.

use std::net::SocketAddrV4;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;

use crate::netns::Netns;

/// One captured UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpDatagram {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// A running tcpdump, stopped on drop.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Capture {
    /// Captures packets on `iface` in `ns` that match the pcap `filter`.
    pub fn start(ns: &Netns, iface: &str, filter: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fwd-pcap-").tempdir()?;
        let path = dir.path().join("capture.pcap");
        let mut cmd = ns.exec("tcpdump");
        // Immediate mode and -U hand over and write each packet at once (no
        // block timeout to wait for); -Z root keeps it able to write our temp dir.
        cmd.args([
            "-i",
            iface,
            "-U",
            "--immediate-mode",
            "-n",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&path)
        .arg(filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .context("starting tcpdump (`cargo xtask prereq` installs it)")?;
        let capture = Self {
            child,
            _dir: dir,
            path,
        };
        // tcpdump writes the file header once it is capturing.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&capture.path)
            .map(|m| m.len())
            .unwrap_or(0)
            < 24
        {
            if Instant::now() >= deadline {
                bail!(
                    "tcpdump on {iface} in {} did not start capturing within 5 s",
                    ns.name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(capture)
    }

    /// The UDP datagrams captured so far, in order.
    pub fn udp(&self) -> Result<Vec<UdpDatagram>> {
        Ok(self
            .udp_timed()?
            .into_iter()
            .map(|(_, datagram)| datagram)
            .collect())
    }

    /// The UDP datagrams captured so far, in order, each with when it was
    /// captured (since the Unix epoch, as tcpdump stamps it).
    pub fn udp_timed(&self) -> Result<Vec<(Duration, UdpDatagram)>> {
        let file = std::fs::File::open(&self.path)?;
        let mut reader = PcapReader::new(file).context("reading tcpdump's capture")?;
        let mut datagrams = Vec::new();
        while let Some(packet) = reader.next_packet() {
            // The last record may still be being written.
            let Ok(packet) = packet else { break };
            let Ok(sliced) = SlicedPacket::from_ethernet(&packet.data) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) =
                (sliced.net, sliced.transport)
            else {
                continue;
            };
            let header = ip.header();
            datagrams.push((
                packet.timestamp,
                UdpDatagram {
                    from: SocketAddrV4::new(header.source_addr(), udp.source_port()),
                    to: SocketAddrV4::new(header.destination_addr(), udp.destination_port()),
                    payload: udp.payload().to_vec(),
                },
            ));
        }
        Ok(datagrams)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
