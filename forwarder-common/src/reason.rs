//! Every packet the XDP program sees ends in exactly one reason, and every
//! reason implies one verdict. The program counts the reason at its single
//! exit; the daemon reports both.

use bytemuck::{Pod, Zeroable};

/// What the XDP program did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Tx,
    Redirect,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Tx => "tx",
            Verdict::Redirect => "redirect",
        }
    }
}

/// Why a packet got its verdict. The discriminant is the counter index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Ethernet header cut short.
    PassTruncatedEth = 0,
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...): not ours.
    PassNotIpv4 = 1,
    /// IPv4 header cut short or claiming less than 20 bytes.
    PassTruncatedIp = 2,
    /// Not UDP: not ours.
    PassNotUdp = 3,
    /// IPv4 options: rare enough to leave to the stack and the daemon.
    PassIpOptions = 4,
    /// A fragment: the stack reassembles it for the daemon's socket.
    PassFragment = 5,
    /// UDP header cut short.
    PassTruncatedUdp = 6,
    /// UDP to a port the relay does not own.
    PassNotRelayPort = 7,
    /// A relay port but no flow entry: the daemon decides.
    PassNoFlow = 8,
    /// TTL would expire here: the stack answers like a router would.
    PassTtlExpiring = 9,
    /// No neighbour entry for the next hop yet: the daemon's socket send resolves it.
    PassFibNoNeigh = 10,
    /// Any other route lookup failure (no route, forwarding disabled, ...).
    PassFibFailed = 11,
    /// The egress interface is not one the relay redirects to.
    PassEgressNotAttached = 12,
    /// Lengths in the IPv4 or UDP header disagree with the frame.
    DropMalformed = 13,
    /// Claims to come from a flow's server but the source or ingress is wrong.
    DropSpoofedServer = 14,
    /// Forwarded back out of the interface it came in on.
    TxForwarded = 15,
    /// Forwarded out of another interface.
    RedirectForwarded = 16,
    /// Would go to the daemon, but its session's slow-path bucket is empty.
    DropSlowpathSessionLimit = 17,
    /// Would go to the daemon, but the relay-wide slow-path bucket is empty.
    DropSlowpathGlobalLimit = 18,
    /// From an unknown source on a punched (NAT'd) session's backend-facing
    /// port, on the right interface: the server's NAT may have moved it, so
    /// the daemon checks it with the session key (see `Rewrite::flags`).
    PassNatRebindCandidate = 19,
}

/// Number of reasons: the size of the reason counter array.
pub const REASON_COUNT: u32 = 20;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassTruncatedEth,
        Reason::PassNotIpv4,
        Reason::PassTruncatedIp,
        Reason::PassNotUdp,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassTruncatedUdp,
        Reason::PassNotRelayPort,
        Reason::PassNoFlow,
        Reason::PassTtlExpiring,
        Reason::PassFibNoNeigh,
        Reason::PassFibFailed,
        Reason::PassEgressNotAttached,
        Reason::DropMalformed,
        Reason::DropSpoofedServer,
        Reason::TxForwarded,
        Reason::RedirectForwarded,
        Reason::DropSlowpathSessionLimit,
        Reason::DropSlowpathGlobalLimit,
        Reason::PassNatRebindCandidate,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Reason::DropMalformed
            | Reason::DropSpoofedServer
            | Reason::DropSlowpathSessionLimit
            | Reason::DropSlowpathGlobalLimit => Verdict::Drop,
            Reason::TxForwarded => Verdict::Tx,
            Reason::RedirectForwarded => Verdict::Redirect,
            _ => Verdict::Pass,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassTruncatedEth => "truncated_eth",
            Reason::PassNotIpv4 => "not_ipv4",
            Reason::PassTruncatedIp => "truncated_ip",
            Reason::PassNotUdp => "not_udp",
            Reason::PassIpOptions => "ip_options",
            Reason::PassFragment => "fragment",
            Reason::PassTruncatedUdp => "truncated_udp",
            Reason::PassNotRelayPort => "not_relay_port",
            Reason::PassNoFlow => "no_flow",
            Reason::PassTtlExpiring => "ttl_expiring",
            Reason::PassFibNoNeigh => "fib_no_neigh",
            Reason::PassFibFailed => "fib_failed",
            Reason::PassEgressNotAttached => "egress_not_attached",
            Reason::DropMalformed => "malformed",
            Reason::DropSpoofedServer => "spoofed_server",
            Reason::TxForwarded => "forwarded_tx",
            Reason::RedirectForwarded => "forwarded_redirect",
            Reason::DropSlowpathSessionLimit => "slowpath_session_limit",
            Reason::DropSlowpathGlobalLimit => "slowpath_global_limit",
            Reason::PassNatRebindCandidate => "nat_rebind_candidate",
        }
    }
}

/// Packets and bytes counted under one reason (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReasonCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ReasonCounter>() == 16);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] plain-old-data, no padding (size asserted above).
unsafe impl aya::Pod for ReasonCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_at_its_index() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?}");
        }
    }

    /// Counter indices are part of the pinned data plane: a reason added
    /// later goes at the end, so an older daemon's counters keep their meaning.
    #[test]
    fn nat_rebind_candidate_is_appended_and_passes() {
        assert_eq!(Reason::PassNatRebindCandidate as u32, REASON_COUNT - 1);
        assert_eq!(Reason::DropSlowpathGlobalLimit as u32, 18);
        assert_eq!(Reason::PassNatRebindCandidate.verdict(), Verdict::Pass);
        assert_eq!(Reason::PassNatRebindCandidate.name(), "nat_rebind_candidate");
    }
}
