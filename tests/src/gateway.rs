//! A home LAN behind a Linux router, for gateway mode (NAT-PMP, PCP, UPnP IGD).
//!
//! ```text
//!  wan host                router                         switch (br0)        LAN hosts
//!  veth-w 11.77.1.2 ── veth-gw 11.77.1.1 | veth-gl 10.77.2.1/24 ── sw-r  sw-1 ── veth-l 10.77.2.2 (lan1)
//!                                                                       sw-2 ── veth-l 10.77.2.3 (lan2)
//! ```
//! The LAN hosts' default route is the router; the WAN host knows only its
//! own subnet, so it reaches LAN servers only through mappings on 11.77.1.1.
//!
//! The WAN side has a public address on purpose: miniupnpc and miniupnpd
//! both treat a private or documentation address (RFC 1918, TEST-NET) on the
//! WAN side as "not connected" and refuse to map. Nothing leaves these
//! namespaces: they have no link to any other network.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, SHORT};
use crate::netns::{Netns, veth_pair};

pub const WAN_HOST_IP: Ipv4Addr = Ipv4Addr::new(11, 77, 1, 2);
pub const ROUTER_WAN_IP: Ipv4Addr = Ipv4Addr::new(11, 77, 1, 1);
pub const ROUTER_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
pub const LAN1_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
pub const LAN2_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 3);
pub const WAN_IF: &str = "veth-gw";
pub const LAN_IF: &str = "veth-gl";
pub const HOST_WAN_IF: &str = "veth-w";
pub const HOST_LAN_IF: &str = "veth-l";

#[derive(Debug)]
pub struct GatewayTopology {
    pub wan: Netns,
    pub router: Netns,
    pub switch: Netns,
    pub lan1: Netns,
    pub lan2: Netns,
}

impl GatewayTopology {
    pub fn new() -> Result<Self> {
        let topo = Self {
            wan: Netns::new("wan")?,
            router: Netns::new("router")?,
            switch: Netns::new("switch")?,
            lan1: Netns::new("lan")?,
            lan2: Netns::new("lan")?,
        };
        topo.wire()
            .context("building the WAN-router-LAN topology")?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        veth_pair(&self.wan, HOST_WAN_IF, &self.router, WAN_IF)?;
        self.switch
            .ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        veth_pair(&self.router, LAN_IF, &self.switch, "sw-r")?;
        veth_pair(&self.lan1, HOST_LAN_IF, &self.switch, "sw-1")?;
        veth_pair(&self.lan2, HOST_LAN_IF, &self.switch, "sw-2")?;
        for port in ["sw-r", "sw-1", "sw-2"] {
            self.switch.ip(&["link", "set", port, "master", "br0"])?;
        }
        self.switch.ip(&["link", "set", "br0", "up"])?;
        self.wan
            .ip(&["addr", "add", "11.77.1.2/24", "dev", HOST_WAN_IF])?;
        self.router
            .ip(&["addr", "add", "11.77.1.1/24", "dev", WAN_IF])?;
        self.router
            .ip(&["addr", "add", "10.77.2.1/24", "dev", LAN_IF])?;
        self.lan1
            .ip(&["addr", "add", "10.77.2.2/24", "dev", HOST_LAN_IF])?;
        self.lan2
            .ip(&["addr", "add", "10.77.2.3/24", "dev", HOST_LAN_IF])?;
        self.lan1.default_via(ROUTER_LAN_IP)?;
        self.lan2.default_via(ROUTER_LAN_IP)?;
        self.router.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// `forwarder run --iface WAN --iface LAN --gateway LAN EXTRA...`.
    pub fn relay_args<'a>(&self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--gateway", LAN_IF];
        args.extend_from_slice(extra);
        args
    }

    pub fn ifaces(&self) -> [&'static str; 2] {
        [WAN_IF, LAN_IF]
    }

    /// An XDP program on the switch's port towards the router (a second
    /// forwarder with no sessions: it passes every frame). Hairpin traffic
    /// leaves the router's LAN veth with XDP_TX, and the veth driver
    /// (6.x) queues XDP_TX frames in the peer's ring but only kicks the
    /// peer's NAPI when the peer has an XDP program of its own: with GRO
    /// alone each frame waits for the next one to arrive (mosh's steady
    /// stream hides it, a single datagram stalls). Physical NICs transmit
    /// XDP_TX themselves; see docs/DESIGN.md, Gateway mode.
    pub fn xdp_on_switch_port(&self) -> Result<crate::relay::Relay> {
        crate::relay::Relay::start(&self.switch, &["sw-r"], &["--xdp-mode", "native"])
    }
}

/// What `natpmpc -a` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatpmpMapping {
    pub public_ip: Option<Ipv4Addr>,
    pub public_port: u16,
    pub private_port: u16,
    pub lifetime: u32,
}

/// Runs Debian's `natpmpc -g ROUTER_LAN_IP ARGS` in `ns`; its output, or the failure.
pub fn natpmpc(ns: &Netns, gateway: Ipv4Addr, args: &[&str]) -> Result<String> {
    let gateway = gateway.to_string();
    let out = cmd::run(ns.exec("natpmpc").args(["-g", &gateway]).args(args), SHORT)?;
    let text = format!("{}{}", out.stdout, out.stderr);
    if !out.success() {
        bail!("natpmpc {args:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// `natpmpc -a PUBLIC PRIVATE udp LIFETIME`, parsed.
pub fn natpmpc_map(
    ns: &Netns,
    gateway: Ipv4Addr,
    public: u16,
    private: u16,
    lifetime: u32,
) -> Result<NatpmpMapping> {
    let text = natpmpc(
        ns,
        gateway,
        &[
            "-a",
            &public.to_string(),
            &private.to_string(),
            "udp",
            &lifetime.to_string(),
        ],
    )?;
    parse_natpmpc(&text).with_context(|| format!("natpmpc printed no mapping:\n{text}"))
}

/// From "Public IP address : 11.77.1.1" and "Mapped public port 60001
/// protocol UDP to local port 60001 liftime 3600" (natpmpc's spelling).
pub fn parse_natpmpc(text: &str) -> Option<NatpmpMapping> {
    let public_ip = text.lines().find_map(|line| {
        line.strip_prefix("Public IP address :")
            .and_then(|rest| rest.trim().parse().ok())
    });
    let line = text
        .lines()
        .find(|line| line.starts_with("Mapped public port"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |after: &str| -> Option<u32> {
        let index = words.iter().position(|w| *w == after)?;
        words.get(index + 1)?.parse().ok()
    };
    Some(NatpmpMapping {
        public_ip,
        public_port: number("port")? as u16,
        private_port: u16::try_from(
            words
                .iter()
                .rposition(|w| *w == "port")
                .and_then(|i| words.get(i + 1)?.parse::<u32>().ok())?,
        )
        .ok()?,
        lifetime: number("liftime").or_else(|| number("lifetime"))?,
    })
}

/// Runs miniupnpc's `upnpc ARGS` in `ns`; its output (upnpc exits 0 even
/// on many failures, so callers check what it printed).
pub fn upnpc(ns: &Netns, args: &[&str]) -> Result<String> {
    let out = cmd::run(ns.exec("upnpc").args(args), Duration::from_secs(30))?;
    Ok(format!("{}{}", out.stdout, out.stderr))
}

/// One PCP MAP request (RFC 6887 section 11.1), built here byte by byte
/// independently of the daemon's code.
#[derive(Debug, Clone)]
pub struct PcpMap {
    pub client: Ipv4Addr,
    pub lifetime: u32,
    pub nonce: [u8; 12],
    pub internal_port: u16,
    pub suggested_external_port: u16,
    /// THIRD_PARTY option: map for this address instead of the sender's.
    pub third_party: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcpAnswer {
    pub opcode: u8,
    pub result: u8,
    pub lifetime: u32,
    pub epoch: u32,
    pub nonce: [u8; 12],
    pub external_port: u16,
    pub external_ip: Option<Ipv4Addr>,
}

fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&ip.octets());
    out
}

impl PcpMap {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![2, 1, 0, 0];
        out.extend_from_slice(&self.lifetime.to_be_bytes());
        out.extend_from_slice(&mapped(self.client));
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&[17, 0, 0, 0]);
        out.extend_from_slice(&self.internal_port.to_be_bytes());
        out.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        out.extend_from_slice(&[0; 16]);
        if let Some(ip) = self.third_party {
            out.extend_from_slice(&[1, 0, 0, 16]);
            out.extend_from_slice(&mapped(ip));
        }
        out
    }
}

pub fn parse_pcp_answer(bytes: &[u8]) -> Option<PcpAnswer> {
    if bytes.len() < 24 || bytes[0] != 2 || bytes[1] & 0x80 == 0 {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let map = bytes.get(24..60);
    Some(PcpAnswer {
        opcode: bytes[1] & 0x7f,
        result: bytes[3],
        lifetime: u32_at(4),
        epoch: u32_at(8),
        nonce: map.map_or([0; 12], |m| m[0..12].try_into().expect("12 bytes")),
        external_port: map.map_or(0, |m| u16::from_be_bytes([m[18], m[19]])),
        external_ip: map.and_then(|m| {
            (m[20..30] == [0; 10] && m[30..32] == [0xff, 0xff])
                .then(|| Ipv4Addr::new(m[32], m[33], m[34], m[35]))
        }),
    })
}

/// Sends `request` from a socket in `ns` to `to` and waits up to 3 s for an
/// answer (resending each second); None if none came.
pub fn udp_ask(
    ns: &Netns,
    bind: SocketAddrV4,
    to: SocketAddrV4,
    request: &[u8],
) -> Result<Option<Vec<u8>>> {
    let socket: UdpSocket = ns.udp_bind(SocketAddr::V4(bind))?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 1100];
    for _ in 0..3 {
        socket.send_to(request, to)?;
        if let Ok((len, from)) = socket.recv_from(&mut buf)
            && from == SocketAddr::V4(to)
        {
            return Ok(Some(buf[..len].to_vec()));
        }
    }
    Ok(None)
}
