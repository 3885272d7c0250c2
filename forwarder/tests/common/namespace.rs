//! The forwarding topology, in a network namespace of its own:
//!
//! ```text
//!   front (10.0.1.1/24, FRONT_MAC) <== veth ==> back (10.0.2.1/24, BACK_MAC)
//!   neighbours: CLIENT and NEAR_BACKEND on front, BACKEND on back.
//!   IPv6: front fd00:1::1/64, back fd00:2::1/64, the same neighbours at ::2
//!   (and NEAR_BACKEND at fd00:1::3), IPv6 forwarding on.
//! ```
//!
//! Each test that forwards builds its own, holding both ends of one veth
//! pair, runs inside it on a dedicated thread and passes the veth's ifindex
//! as `xdp_md.ingress_ifindex` in `ctx_in`: the kernel then runs the
//! program as if the frame arrived there, and `bpf_fib_lookup` sees this
//! namespace's routes and neighbours. The namespace itself is the testbed's
//! [`Netns`], the same helper every integration test uses.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use forwarder_testbed::{Netns, veth_pair};

use super::{
    BACK_MAC, BACKEND, BACKEND_MAC, BACKEND6, CLIENT, CLIENT_MAC, CLIENT6, FRONT_MAC, NEAR_BACKEND,
    NEAR_BACKEND_MAC, NEAR_BACKEND6, RELAY_BACK, RELAY_BACK6, RELAY_FRONT, RELAY_FRONT6,
    require_root,
};

/// The topology above, deleted on drop (also when the test panics).
pub struct Namespace {
    netns: Netns,
}

/// Interface indexes inside the namespace.
#[derive(Clone, Copy)]
pub struct Topology {
    pub front: u32,
    pub back: u32,
}

impl Namespace {
    pub fn create() -> Self {
        require_root();
        let netns = Netns::new("xdp").expect("creating the test namespace");
        build(&netns).expect("building the test topology (install iproute2 and ethtool)");
        Self { netns }
    }

    /// The namespace, to change it under a running test.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Runs `body` on a fresh thread that has entered the namespace, so
    /// the test harness's own threads never change namespace.
    pub fn enter<T: Send>(&self, body: impl FnOnce(Topology) -> T + Send) -> T {
        self.netns
            .scoped(|| {
                body(Topology {
                    front: ifindex("front"),
                    back: ifindex("back"),
                })
            })
            .expect("entering the test namespace")
    }
}

fn build(ns: &Netns) -> Result<()> {
    veth_pair(ns, "front", ns, "back")?;
    // Crafted frames name these MACs, and the rewrite must write them.
    ns.set_mac("front", FRONT_MAC)?;
    ns.set_mac("back", BACK_MAC)?;
    ns.add_addr(Ipv4Addr::from(RELAY_FRONT), "front")?;
    ns.add_addr(Ipv4Addr::from(RELAY_BACK), "back")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    for (addr, mac, dev) in [
        (CLIENT, CLIENT_MAC, "front"),
        (NEAR_BACKEND, NEAR_BACKEND_MAC, "front"),
        (BACKEND, BACKEND_MAC, "back"),
    ] {
        ns.add_neigh(Ipv4Addr::from(addr), mac, dev)
            .with_context(|| format!("neighbour {}", Ipv4Addr::from(addr)))?;
    }
    // IPv6: no DAD, so the addresses are usable at once; permanent
    // neighbours, as for IPv4, so no NDP is needed.
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for (addr, dev) in [(RELAY_FRONT6, "front"), (RELAY_BACK6, "back")] {
        let addr = format!("{}/64", Ipv6Addr::from(addr));
        ns.ip(&["-6", "addr", "add", &addr, "dev", dev, "nodad"])?;
    }
    for (addr, mac, dev) in [
        (CLIENT6, CLIENT_MAC, "front"),
        (NEAR_BACKEND6, NEAR_BACKEND_MAC, "front"),
        (BACKEND6, BACKEND_MAC, "back"),
    ] {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &Ipv6Addr::from(addr).to_string(),
            "lladdr",
            &mac,
            "nud",
            "permanent",
            "dev",
            dev,
        ])
        .with_context(|| format!("neighbour {}", Ipv6Addr::from(addr)))?;
    }
    Ok(())
}

/// Index of `name` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name)
        .unwrap_or_else(|e| panic!("no interface {name:?} in the namespace: {e}"))
}
