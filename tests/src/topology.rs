//! Client — relay — server, each in its own namespace.
//!
//! ```text
//!  client                relay                          server
//!  veth-c 10.77.1.2 ── veth-rc 10.77.1.1 | veth-rs 10.77.2.1 ── veth-s 10.77.2.2
//! ```
//! Client and server route everything through the relay, which forwards as a
//! plain router (ip_forward=1) unless a forwarder daemon takes over its ports.
//!
//! Dual stack ([`Topology::dual_stack`]) adds IPv6 beside it, each end of
//! each link in its own /64 (ULA, fd77:1::/64 and fd77:2::/64), either end
//! optionally left IPv4-only or IPv6-only:
//!
//! ```text
//!  veth-c fd77:1::2 ── veth-rc fd77:1::1 | veth-rs fd77:2::1 ── veth-s fd77:2::2
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use crate::netns::{Netns, veth_pair};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
/// A second client address, for roaming tests.
pub const CLIENT_ROAM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 3);
pub const RELAY_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
pub const RELAY_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);

pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 2);
/// A second client IPv6 address, for roaming tests.
pub const CLIENT_ROAM_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 3);
pub const RELAY_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1);
pub const RELAY_SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 1);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 2, 0, 0, 0, 0, 0, 2);

/// Which families an end of the dual-stack topology has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 and IPv6.
    Dual,
    V4Only,
    V6Only,
}

impl Stack {
    fn has_v6(self) -> bool {
        self != Self::V4Only
    }
}

pub const CLIENT_IF: &str = "veth-c";
pub const RELAY_CLIENT_IF: &str = "veth-rc";
pub const RELAY_SERVER_IF: &str = "veth-rs";
pub const SERVER_IF: &str = "veth-s";

/// The three namespaces; dropping it removes them (after whatever guards were
/// created later, since locals drop in reverse order).
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub relay: Netns,
    pub server: Netns,
}

impl Topology {
    pub fn client_relay_server() -> Result<Self> {
        let topo = Self {
            client: Netns::new("client")?,
            relay: Netns::new("relay")?,
            server: Netns::new("server")?,
        };
        topo.wire()
            .context("building the client-relay-server topology")?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        veth_pair(&self.client, CLIENT_IF, &self.relay, RELAY_CLIENT_IF)?;
        veth_pair(&self.relay, RELAY_SERVER_IF, &self.server, SERVER_IF)?;
        self.address()
    }

    /// Addresses, routes and forwarding, once the four interfaces exist
    /// (however they are linked: directly, or through a switch).
    pub(crate) fn address(&self) -> Result<()> {
        self.client.add_addr(CLIENT_IP, CLIENT_IF)?;
        self.relay.add_addr(RELAY_CLIENT_IP, RELAY_CLIENT_IF)?;
        self.relay.add_addr(RELAY_SERVER_IP, RELAY_SERVER_IF)?;
        self.server.add_addr(SERVER_IP, SERVER_IF)?;

        self.client.default_via(RELAY_CLIENT_IP)?;
        self.server.default_via(RELAY_SERVER_IP)?;
        self.relay.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// The client-relay-server topology with IPv6 beside IPv4: the relay
    /// has both families on both sides and forwards IPv6 as well; the
    /// client and the server have what `client` and `server` say.
    pub fn dual_stack(client: Stack, server: Stack) -> Result<Self> {
        let topo = Self::client_relay_server()?;
        topo.add_v6(client, server)
            .context("adding IPv6 to the client-relay-server topology")?;
        Ok(topo)
    }

    /// IPv6 addresses, routes and forwarding on the wired topology.
    pub fn add_v6(&self, client: Stack, server: Stack) -> Result<()> {
        self.relay.add_addr6(RELAY_CLIENT_IP6, RELAY_CLIENT_IF)?;
        self.relay.add_addr6(RELAY_SERVER_IP6, RELAY_SERVER_IF)?;
        // Forwarding on every interface (as a router: it also stops the
        // relay from taking router advertisements).
        self.relay.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (ns, stack, ip, dev, gateway) in [
            (
                &self.client,
                client,
                CLIENT_IP6,
                CLIENT_IF,
                RELAY_CLIENT_IP6,
            ),
            (
                &self.server,
                server,
                SERVER_IP6,
                SERVER_IF,
                RELAY_SERVER_IP6,
            ),
        ] {
            if stack.has_v6() {
                ns.add_addr6(ip, dev)?;
                ns.default_via6(gateway)?;
            }
            if stack == Stack::V6Only {
                ns.drop_ipv4(dev)?;
            }
        }
        Ok(())
    }

    /// Client and server reach each other through the relay over IPv6.
    pub fn check_connectivity6(&self) -> Result<()> {
        self.client.ping(&RELAY_CLIENT_IP6.to_string())?;
        self.server.ping(&RELAY_SERVER_IP6.to_string())?;
        self.client.ping(&SERVER_IP6.to_string())?;
        Ok(())
    }

    /// The laptop leaves its IPv4 network for an IPv6-only one: the client
    /// gets `ip6` (and an IPv6 default route, if it had none) and loses
    /// every IPv4 address, so IPv4 sends fail at once (no route).
    pub fn client_roam_to_v6_only(&self, ip6: Ipv6Addr) -> Result<()> {
        self.client.add_addr6(ip6, CLIENT_IF)?;
        self.client.ip(&[
            "-6",
            "route",
            "replace",
            "default",
            "via",
            &RELAY_CLIENT_IP6.to_string(),
            "dev",
            CLIENT_IF,
            "src",
            &ip6.to_string(),
        ])?;
        self.client.drop_ipv4(CLIENT_IF)
    }

    /// The relay's interfaces, as `forwarder run --iface` takes them.
    pub fn relay_ifaces(&self) -> [&'static str; 2] {
        [RELAY_CLIENT_IF, RELAY_SERVER_IF]
    }

    /// Gives the client a second address and makes it the preferred source for
    /// everything, as when a laptop changes networks: existing unconnected UDP
    /// sockets (mosh-client's) start sending from the new address.
    pub fn client_roam_to(&self, ip: Ipv4Addr) -> Result<()> {
        client_roam(&self.client, ip)
    }

    /// Client and server reach each other through the relay (kernel forwarding).
    pub fn check_connectivity(&self) -> Result<()> {
        self.client.ping(&RELAY_CLIENT_IP.to_string())?;
        self.server.ping(&RELAY_SERVER_IP.to_string())?;
        self.client.ping(&SERVER_IP.to_string())?;
        Ok(())
    }
}

/// See [`Topology::client_roam_to`]; shared with the NAT topology.
pub fn client_roam(c: &Netns, ip: Ipv4Addr) -> Result<()> {
    c.add_addr(ip, CLIENT_IF)?;
    let src = ip.to_string();
    c.ip(&[
        "route",
        "replace",
        "10.77.1.0/24",
        "dev",
        CLIENT_IF,
        "src",
        &src,
    ])?;
    c.ip(&[
        "route",
        "replace",
        "default",
        "via",
        &RELAY_CLIENT_IP.to_string(),
        "dev",
        CLIENT_IF,
        "src",
        &src,
    ])?;
    Ok(())
}
