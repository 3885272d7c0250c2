//! The two ways packets move: the XDP program (load, attach, maps) and the
//! daemon's own UDP sockets. With the userspace datapath the sockets carry
//! every packet; with XDP they only see first packets and fallbacks.

pub mod bulk;
pub mod clock;
pub mod egress;
pub mod ethtool;
pub mod fds;
pub mod flows;
pub mod health;
pub mod netlink;
pub mod pins;
pub mod portbits;
pub mod slots;
pub mod socket;
pub mod xdp;

use forwarder_common::config::RuntimeSizes;
use forwarder_common::reason::ReasonCounter;
use forwarder_common::{FlowCounter, REASON_COUNT};
use tracing::warn;

pub use self::bulk::{FlowMapsPass, FlowMapsReader, LastSeenSnapshot, MapsUsed, PassTotals, Slice};
pub use self::flows::{
    BackendHalfKey, BackendRoute, BackendState, FlowAddrs, FlowEntries, InstalledClient,
    InstalledHalves, route_to,
};
use self::xdp::{MapUsage, XdpDatapath};

/// CLOCK_MONOTONIC in nanoseconds: what the XDP program's clock reads (to
/// the tick, datapath::clock), so timestamps from the XDP program and from
/// the daemon compare directly.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Which datapath the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathChoice {
    /// XDP, or the userspace datapath (with the reason) when XDP cannot load.
    Auto,
    /// XDP only: fail if it cannot load or attach.
    Xdp,
    /// The daemon's sockets only, for hosts without BPF (containers, odd drivers).
    Userspace,
}

/// A mistake in how the relay is set up (missing interface, a data plane
/// pinned by an incompatible version). Falling back to the userspace
/// datapath would only hide it, so `auto` reports it instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

pub enum Datapath {
    Xdp(Box<XdpDatapath>),
    /// Every packet through the daemon's sockets; nothing to install.
    Userspace {
        sizes: RuntimeSizes,
    },
}

impl Datapath {
    /// Starts the chosen datapath; `start_xdp` loads and attaches XDP (and
    /// says whether it adopted a pinned data plane).
    pub fn start(
        choice: DatapathChoice,
        sizes: RuntimeSizes,
        start_xdp: impl FnOnce() -> anyhow::Result<(XdpDatapath, bool)>,
    ) -> anyhow::Result<(Self, bool)> {
        match choice {
            DatapathChoice::Xdp => {
                start_xdp().map(|(xdp, adopted)| (Self::Xdp(Box::new(xdp)), adopted))
            }
            DatapathChoice::Userspace => Ok((Self::Userspace { sizes }, false)),
            DatapathChoice::Auto => match start_xdp() {
                Ok((xdp, adopted)) => Ok((Self::Xdp(Box::new(xdp)), adopted)),
                Err(error) if error.downcast_ref::<Misconfigured>().is_some() => Err(error),
                Err(error) => {
                    warn!(
                        error = format!("{error:#}"),
                        "XDP is not available; falling back to the userspace datapath (every packet through the daemon). \
                         Use --datapath xdp to make this an error"
                    );
                    Ok((Self::Userspace { sizes }, false))
                }
            },
        }
    }

    /// "native", "skb", "native+skb" or "userspace".
    pub fn mode(&self) -> String {
        match self {
            Self::Xdp(xdp) => xdp.mode.clone(),
            Self::Userspace { .. } => "userspace".into(),
        }
    }

    pub fn install(&mut self, entries: &FlowEntries) -> anyhow::Result<()> {
        match self {
            Self::Xdp(xdp) => xdp.install(entries),
            Self::Userspace { .. } => Ok(()),
        }
    }

    pub fn uninstall(&mut self, entries: &FlowEntries) {
        if let Self::Xdp(xdp) = self {
            xdp.uninstall(entries);
        }
    }

    /// NAT sessions before their first client: only the server-to-client half.
    pub fn install_backend_half(&mut self, entries: &FlowEntries) -> anyhow::Result<()> {
        match self {
            Self::Xdp(xdp) => xdp.install_backend_half(entries),
            Self::Userspace { .. } => Ok(()),
        }
    }

    pub fn uninstall_backend_half(&mut self, entries: &FlowEntries) {
        if let Self::Xdp(xdp) = self {
            xdp.uninstall_backend_half(entries);
        }
    }

    pub fn uninstall_client_half(&mut self, entries: &FlowEntries) {
        if let Self::Xdp(xdp) = self {
            xdp.uninstall_client_half(entries);
        }
    }

    /// Punched sessions: the newest client-to-server nonce XDP forwarded on
    /// `session_port` (0: none; always 0 in userspace, where the daemon
    /// sees every datagram).
    pub fn recorded_client_seq(&self, session_port: u16) -> anyhow::Result<u64> {
        match self {
            Self::Xdp(xdp) => xdp.recorded_client_seq(session_port),
            Self::Userspace { .. } => Ok(0),
        }
    }

    pub fn reset_client_seq(&mut self, session_port: u16) -> anyhow::Result<()> {
        match self {
            Self::Xdp(xdp) => xdp.reset_client_seq(session_port),
            Self::Userspace { .. } => Ok(()),
        }
    }

    /// The slot a backend half names for the interface its route leaves
    /// through (`forwarder_common::flow::IFACE_ANY` without XDP, which
    /// checks nothing).
    pub fn egress_iface(&self, ifindex: u32) -> u8 {
        match self {
            Self::Xdp(xdp) => xdp.egress_iface(ifindex),
            Self::Userspace { .. } => forwarder_common::flow::IFACE_ANY,
        }
    }

    /// The XDP interface numbering's refresher, for the daemon to run.
    pub fn take_egress_table(&mut self) -> Option<egress::EgressTable> {
        match self {
            Self::Xdp(xdp) => xdp.take_egress_table(),
            Self::Userspace { .. } => None,
        }
    }

    /// Last-seen timestamps the XDP program wrote (client half, backend half).
    pub fn last_seen(&self, entries: &FlowEntries) -> (u64, u64) {
        match self {
            Self::Xdp(xdp) => xdp.last_seen(entries),
            Self::Userspace { .. } => (0, 0),
        }
    }

    /// Last-seen timestamps from `snapshot` where it speaks for the flow
    /// (created at `created_ns`), else read from the maps now.
    pub fn last_seen_in(
        &self,
        snapshot: Option<&LastSeenSnapshot>,
        entries: &FlowEntries,
        created_ns: u64,
    ) -> (u64, u64) {
        snapshot
            .and_then(|snapshot| snapshot.last_seen(entries, created_ns))
            .unwrap_or_else(|| self.last_seen(entries))
    }

    /// Own descriptors of the flow maps, for the expiry tick's bulk read
    /// outside the relay lock; None without XDP (nothing to read).
    pub fn flow_maps_reader(&self, used: MapsUsed) -> Option<FlowMapsReader> {
        match self {
            Self::Xdp(xdp) => match xdp.flow_maps_reader(used) {
                Ok(reader) => Some(reader),
                Err(error) => {
                    warn!(%error, "duplicating the flow maps' descriptors for the expiry tick (it reads each flow instead); raise the open-file limit (LimitNOFILE)");
                    None
                }
            },
            Self::Userspace { .. } => None,
        }
    }

    /// Packets the XDP program forwarded in each direction of a flow: (to
    /// the server, to the client).
    pub fn flow_counters(&self, entries: &FlowEntries) -> (FlowCounter, FlowCounter) {
        match self {
            Self::Xdp(xdp) => xdp.flow_counters(entries),
            Self::Userspace { .. } => Default::default(),
        }
    }

    /// What XDP forwarded to the server through the flow's client half.
    pub fn to_server_counter(&self, entries: &FlowEntries) -> FlowCounter {
        match self {
            Self::Xdp(xdp) => xdp.to_server_counter(entries),
            Self::Userspace { .. } => FlowCounter::default(),
        }
    }

    /// How many flows the relay may hold (the XDP maps' size).
    pub fn max_flows(&self) -> u32 {
        self.sizes().max_flows
    }

    /// The run-time sizes everything was built with.
    pub fn sizes(&self) -> RuntimeSizes {
        match self {
            Self::Xdp(xdp) => xdp.sizes,
            Self::Userspace { sizes } => *sizes,
        }
    }

    /// Fill and kernel memory of the XDP maps (none in userspace).
    pub fn map_usage(&self) -> Vec<MapUsage> {
        match self {
            Self::Xdp(xdp) => xdp.map_usage(),
            Self::Userspace { .. } => Vec::new(),
        }
    }

    /// The flow halves the kernel holds, of both families: what a restarted
    /// daemon adopts.
    pub fn installed(&self) -> InstalledHalves {
        match self {
            Self::Xdp(xdp) => xdp.installed(),
            Self::Userspace { .. } => InstalledHalves::default(),
        }
    }

    pub fn remove_client_half(&mut self, half: &InstalledClient) {
        if let Self::Xdp(xdp) = self {
            xdp.remove_client_half(half);
        }
    }

    pub fn remove_backend_half(&mut self, key: &BackendHalfKey) {
        if let Self::Xdp(xdp) = self {
            xdp.remove_backend_half(key);
        }
    }

    /// Rate limits on what the XDP program hands to the daemon; the
    /// userspace datapath has no such stage (the daemon sees everything).
    pub fn limit_slowpath(&mut self, per_session_pps: u32, global_pps: u32) -> anyhow::Result<()> {
        match self {
            Self::Xdp(xdp) => xdp.limit_slowpath(per_session_pps, global_pps),
            Self::Userspace { .. } => Ok(()),
        }
    }

    pub fn add_session_bucket(&mut self, port: u16) -> anyhow::Result<()> {
        match self {
            Self::Xdp(xdp) => xdp.add_session_bucket(port),
            Self::Userspace { .. } => Ok(()),
        }
    }

    pub fn remove_session_bucket(&mut self, port: u16) {
        if let Self::Xdp(xdp) = self {
            xdp.remove_session_bucket(port);
        }
    }

    pub fn reason_counters(&self) -> Vec<ReasonCounter> {
        match self {
            Self::Xdp(xdp) => xdp.reason_counters(),
            Self::Userspace { .. } => vec![ReasonCounter::default(); REASON_COUNT as usize],
        }
    }
}
