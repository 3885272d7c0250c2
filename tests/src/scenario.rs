//! Ready-made setups shared by the integration tests and `cargo xtask demo`.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::mosh::{MoshClient, MoshServer};
use crate::prereq;
use crate::relay::{Relay, Session};
use crate::topology::{RELAY_CLIENT_IP, SERVER_IP, Topology};

/// The port mosh-server listens on inside the server namespace. Any port works:
/// the namespace is private to one test.
pub const MOSH_SERVER_PORT: u16 = 60001;

/// How long mosh may take to show a first screen: mosh-client retries its
/// first packets, and the relay's first packet of a flow goes through userspace.
pub const MOSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long typed output may take to come back once connected.
pub const MOSH_ECHO_TIMEOUT: Duration = Duration::from_secs(20);

/// A real mosh session from the client namespace through the forwarder in the
/// relay namespace to mosh-server in the server namespace.
///
/// Field order is drop order: the client goes before the server, the daemon
/// before the namespaces it runs in.
#[derive(Debug)]
pub struct MoshThroughRelay {
    pub client: MoshClient,
    pub server: MoshServer,
    pub session: Session,
    pub relay: Relay,
    pub topo: Topology,
}

impl MoshThroughRelay {
    /// Builds the topology, starts the daemon with `relay_args`, creates a
    /// session for mosh-server and connects mosh-client to the session's port.
    /// Returns once the client shows the remote shell.
    pub fn start(relay_args: &[&str]) -> Result<Self> {
        prereq::require()?;
        let topo = Topology::client_relay_server()?;
        let ifaces = topo.relay_ifaces();
        Self::start_on(topo, &ifaces, relay_args)
    }

    /// [`Self::start`] on a topology built elsewhere, with the daemon on `ifaces`.
    pub fn start_on(topo: Topology, ifaces: &[&str], relay_args: &[&str]) -> Result<Self> {
        prereq::require()?;
        let relay = Relay::start(&topo.relay, ifaces, relay_args)?;
        let server = MoshServer::start(&topo.server, SERVER_IP, MOSH_SERVER_PORT)?;
        let backend = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, server.port));
        let session = relay.add(backend, &[])?;
        let client = MoshClient::start(&topo.client, RELAY_CLIENT_IP, session.port, &server.key)?;
        let this = Self {
            client,
            server,
            session,
            relay,
            topo,
        };
        wait_for_shell(&this.client).context("mosh through the relay never showed the shell")?;
        Ok(this)
    }

    /// Types `echo PREFIX-$((6*7))-ok` and waits for `PREFIX-42-ok`: the shell
    /// computes it, so the typed line itself never matches.
    pub fn roundtrip(&self, prefix: &str) -> Result<String> {
        roundtrip(&self.client, prefix)
    }
}

/// Waits until mosh-client shows anything: the screen stays blank until the
/// server's first state arrives.
pub fn wait_for_shell(client: &MoshClient) -> Result<()> {
    client.wait_for_screen("$", MOSH_CONNECT_TIMEOUT)?;
    Ok(())
}

/// See [`MoshThroughRelay::roundtrip`].
pub fn roundtrip(client: &MoshClient, prefix: &str) -> Result<String> {
    client.type_line(&format!("echo {prefix}-$((6*7))-ok"))?;
    client.wait_for_screen(&format!("{prefix}-42-ok"), MOSH_ECHO_TIMEOUT)
}
