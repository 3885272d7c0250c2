//! Topologies with an attacker in them.
//!
//! ```text
//! shared segment (spoofing tests): a bridge in a "switch" namespace joins
//!   client veth-c 10.77.1.2 ─ sw-c ┐
//!   attacker veth-a 10.77.1.66 ─ sw-a ├─ br0    relay veth-rc 10.77.1.1 | veth-rs ── server
//!   relay veth-rc ─ sw-r ┘
//! own link (flood tests): attacker veth-x 10.77.3.2 ── veth-ra 10.77.3.1 relay
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::netns::{Netns, veth_pair};
use crate::topology::{
    CLIENT_IF, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, SERVER_IF, Topology,
};

pub const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 66);
pub const ATTACKER_IF: &str = "veth-a";
/// The switch's port towards the client: a mirror of everything the client sends and gets.
pub const SWITCH_CLIENT_PORT: &str = "sw-c";

pub const FLOODER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 2);
pub const FLOODER_IF: &str = "veth-x";
pub const RELAY_FLOODER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);
pub const RELAY_FLOODER_IF: &str = "veth-ra";

/// The extra namespaces of the shared-segment topology. Declared after the
/// Topology it belongs to, so it drops first.
#[derive(Debug)]
pub struct Segment {
    pub attacker: Netns,
    pub switch: Netns,
}

/// Client, attacker and the relay's client-facing interface on one bridged
/// segment; relay and server as in [`Topology::client_relay_server`].
pub fn client_segment_with_attacker() -> Result<(Topology, Segment)> {
    let topo = Topology {
        client: Netns::new("client")?,
        relay: Netns::new("relay")?,
        server: Netns::new("server")?,
    };
    let segment = Segment {
        attacker: Netns::new("attacker")?,
        switch: Netns::new("switch")?,
    };
    wire_segment(&topo, &segment).context("building the shared client segment")?;
    Ok((topo, segment))
}

fn wire_segment(topo: &Topology, segment: &Segment) -> Result<()> {
    let switch = &segment.switch;
    switch.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
    veth_pair(&topo.client, CLIENT_IF, switch, SWITCH_CLIENT_PORT)?;
    veth_pair(&segment.attacker, ATTACKER_IF, switch, "sw-a")?;
    veth_pair(&topo.relay, RELAY_CLIENT_IF, switch, "sw-r")?;
    veth_pair(&topo.relay, RELAY_SERVER_IF, &topo.server, SERVER_IF)?;
    for port in [SWITCH_CLIENT_PORT, "sw-a", "sw-r"] {
        switch.ip(&["link", "set", port, "master", "br0"])?;
    }
    switch.ip(&["link", "set", "br0", "up"])?;

    topo.address()?;
    segment.attacker.add_addr(ATTACKER_IP, ATTACKER_IF)?;
    segment.attacker.default_via(RELAY_CLIENT_IP)?;
    Ok(())
}

/// A namespace with its own link into the relay, as a host elsewhere on the
/// internet: its traffic reaches the relay on an interface of its own.
pub fn attach_flooder(topo: &Topology) -> Result<Netns> {
    let flooder = Netns::new("flooder")?;
    veth_pair(&flooder, FLOODER_IF, &topo.relay, RELAY_FLOODER_IF)?;
    flooder.add_addr(FLOODER_IP, FLOODER_IF)?;
    topo.relay.add_addr(RELAY_FLOODER_IP, RELAY_FLOODER_IF)?;
    flooder.default_via(RELAY_FLOODER_IP)?;
    Ok(flooder)
}

/// A forger's place on a segment next to the relay: raw frames out of
/// `ifname` in `ns`, addressed to the relay's interface `relay_if`.
pub struct ForgerSite<'a> {
    pub ns: &'a Netns,
    pub ifname: &'a str,
    pub relay_if: &'a str,
}

/// Sends `rounds` forged "server" datagrams from every site to every target
/// (except those `skip` names), each with a fresh random payload shaped like
/// a server-to-client mosh datagram (direction bit set, 24 bytes or more).
/// Returns every payload sent, for comparison with what the client got.
pub fn forge_server_datagrams(
    relay: &Netns,
    sites: &[ForgerSite<'_>],
    server: SocketAddrV4,
    targets: &[SocketAddrV4],
    rounds: usize,
    skip: impl Fn(usize, SocketAddrV4) -> bool,
) -> Result<HashSet<Vec<u8>>> {
    let targets: Vec<SocketAddr> = targets.iter().copied().map(SocketAddr::V4).collect();
    forge_server_datagrams_any(
        relay,
        sites,
        server.into(),
        &targets,
        rounds,
        |index, target| match target {
            SocketAddr::V4(target) => skip(index, target),
            SocketAddr::V6(_) => unreachable!("only IPv4 targets were given"),
        },
    )
}

/// [`forge_server_datagrams`] for endpoints of either family (IPv6 forgers
/// included): forged "server" datagrams from `server` to every target
/// from every site; returns every payload sent.
pub fn forge_server_datagrams_any(
    relay: &Netns,
    sites: &[ForgerSite<'_>],
    server: SocketAddr,
    targets: &[SocketAddr],
    rounds: usize,
    skip: impl Fn(usize, SocketAddr) -> bool,
) -> Result<HashSet<Vec<u8>>> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    let mut sent = HashSet::new();
    for (index, site) in sites.iter().enumerate() {
        let socket = crate::raw::PacketSocket::open(site.ns, site.ifname)?;
        let macs = (
            crate::raw::mac_of(site.ns, site.ifname)?,
            crate::raw::mac_of(relay, site.relay_if)?,
        );
        for &target in targets.iter().filter(|&&t| !skip(index, t)) {
            for _ in 0..rounds {
                let mut payload = (0x8000_0000_0000_0000u64 | rng.random::<u64>())
                    .to_be_bytes()
                    .to_vec();
                payload.extend((0..rng.random_range(16..120)).map(|_| rng.random::<u8>()));
                socket
                    .send(&crate::raw::udp_frame_any(macs, server, target, &payload))
                    .with_context(|| format!("sending a forged datagram to {target}"))?;
                sent.insert(payload);
            }
        }
    }
    Ok(sent)
}
