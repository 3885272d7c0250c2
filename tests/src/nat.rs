//! Client — relay — NAT — server: a mosh server without a public address.
//!
//! ```text
//!  client              relay                         nat                          server
//!  veth-c 10.77.1.2 ── veth-rc 10.77.1.1 | veth-rn 10.77.2.1 ── veth-no 10.77.2.2 | veth-ni 192.168.77.1 ── veth-s 192.168.77.2
//! ```
//! The NAT box masquerades the server with `random` port mapping, so every
//! destination gets its own external port (endpoint-dependent mapping, as in
//! most carrier-grade NATs), and filters statefully: only replies to what the
//! server sent come in. The relay has no route to 192.168.77.0/24. The only
//! thing forwarded inwards is TCP 2222 → server:22, for the ssh test.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::{Netns, veth_pair};
use crate::relay::Relay;
use crate::topology::{CLIENT_IF, CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, client_roam};

pub const RELAY_NAT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
/// The NAT's public address: what the relay sees as the server.
pub const NAT_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
pub const NAT_INSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const NAT_SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The relay's punch port (outside its default session and flow port ranges).
pub const PUNCH_PORT: u16 = 7000;
/// TCP port on the NAT's public address forwarded to the server's sshd.
pub const NAT_SSH_PORT: u16 = 2222;

pub const RELAY_NAT_IF: &str = "veth-rn";
pub const NAT_OUTSIDE_IF: &str = "veth-no";
pub const NAT_INSIDE_IF: &str = "veth-ni";
pub const SERVER_IF: &str = "veth-s";

/// The four namespaces; dropping it removes them.
#[derive(Debug)]
pub struct NatTopology {
    pub client: Netns,
    pub relay: Netns,
    pub nat: Netns,
    pub server: Netns,
}

fn ruleset() -> String {
    format!(
        "table ip fwdnat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    iifname \"{NAT_OUTSIDE_IF}\" tcp dport {NAT_SSH_PORT} dnat to {NAT_SERVER_IP}:22
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    oifname \"{NAT_OUTSIDE_IF}\" masquerade random
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"{NAT_INSIDE_IF}\" oifname \"{NAT_OUTSIDE_IF}\" accept
    ct status dnat accept
  }}
}}
"
    )
}

impl NatTopology {
    pub fn build() -> Result<Self> {
        let topo = Self {
            client: Netns::new("client")?,
            relay: Netns::new("relay")?,
            nat: Netns::new("nat")?,
            server: Netns::new("server")?,
        };
        topo.wire()
            .context("building the client-relay-nat-server topology")?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        veth_pair(&self.client, CLIENT_IF, &self.relay, RELAY_CLIENT_IF)?;
        veth_pair(&self.relay, RELAY_NAT_IF, &self.nat, NAT_OUTSIDE_IF)?;
        veth_pair(&self.nat, NAT_INSIDE_IF, &self.server, SERVER_IF)?;
        self.client.add_addr(CLIENT_IP, CLIENT_IF)?;
        self.relay.add_addr(RELAY_CLIENT_IP, RELAY_CLIENT_IF)?;
        self.relay.add_addr(RELAY_NAT_IP, RELAY_NAT_IF)?;
        self.nat.add_addr(NAT_PUBLIC_IP, NAT_OUTSIDE_IF)?;
        self.nat.add_addr(NAT_INSIDE_IP, NAT_INSIDE_IF)?;
        self.server.add_addr(NAT_SERVER_IP, SERVER_IF)?;
        self.client.default_via(RELAY_CLIENT_IP)?;
        self.nat.default_via(RELAY_NAT_IP)?;
        self.server.default_via(NAT_INSIDE_IP)?;
        self.relay.sysctl("net.ipv4.ip_forward", "1")?;
        self.nat.sysctl("net.ipv4.ip_forward", "1")?;
        let rules = tempfile::NamedTempFile::new()?;
        std::fs::write(rules.path(), ruleset())?;
        self.nat
            .run("nft", &["-f", rules.path().to_str().context("temp path is not UTF-8")?])
            .context("loading the NAT box's nftables rules (is nftables installed? `cargo xtask prereq`)")?;
        Ok(())
    }

    /// The relay's interfaces, as `forwarder run --iface` takes them.
    pub fn relay_ifaces(&self) -> [&'static str; 2] {
        [RELAY_CLIENT_IF, RELAY_NAT_IF]
    }

    /// Starts the daemon with the punch handshake on [`PUNCH_PORT`] and the
    /// secret in `secret_file`, telling servers that clients use
    /// RELAY_CLIENT_IP; `extra` goes to `forwarder run` as well.
    pub fn start_relay(&self, secret_file: &std::path::Path, extra: &[&str]) -> Result<Relay> {
        let port = PUNCH_PORT.to_string();
        let public = RELAY_CLIENT_IP.to_string();
        let mut args = vec![
            "--punch-port",
            &port,
            "--punch-secret-file",
            secret_file.to_str().context("secret path is not UTF-8")?,
            "--public-addr",
            &public,
        ];
        args.extend_from_slice(extra);
        Relay::start(&self.relay, &self.relay_ifaces(), &args)
    }

    /// Where servers send punch requests: `--relay` of `forwarder mosh-server`.
    pub fn punch_endpoint(&self) -> String {
        format!("{RELAY_NAT_IP}:{PUNCH_PORT}")
    }

    /// Makes the NAT forget idle UDP mappings after `seconds`, both before
    /// and after replies were seen, so a test can watch keepalives hold one.
    pub fn set_udp_mapping_timeout(&self, seconds: u32) -> Result<()> {
        for key in [
            "net.netfilter.nf_conntrack_udp_timeout",
            "net.netfilter.nf_conntrack_udp_timeout_stream",
        ] {
            self.nat.sysctl(key, &seconds.to_string())?;
        }
        Ok(())
    }

    /// See [`crate::Topology::client_roam_to`].
    pub fn client_roam_to(&self, ip: Ipv4Addr) -> Result<()> {
        client_roam(&self.client, ip)
    }
}

/// A random punch secret, as an operator would make one.
pub fn random_secret() -> String {
    format!("{:032x}\n", rand::random::<u128>())
}
