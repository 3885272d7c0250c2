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

/// Declares [`Reason`] from one table: each row gives the variant, its
/// counter index, its name in `stats` and the metrics, and its verdict, so
/// the enum, [`REASON_COUNT`], [`Reason::ALL`], the names and the verdicts
/// cannot drift apart, and the `match`es it generates have no wildcard arm:
/// a new reason without a verdict does not compile. Indices are counter
/// slots read by deployed dashboards: append new rows with the next index,
/// never renumber or reuse one (Cilium's drop_reasons.h rule).
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident = $index:literal, $name:literal, $verdict:ident;)*) => {
        /// Why a packet got its verdict. The discriminant is the counter index.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant = $index,)*
        }

        /// Number of reasons: the size of the reason counter array.
        pub const REASON_COUNT: u32 = [$($index),*].len() as u32;

        impl Reason {
            /// Every reason, at its own index.
            pub const ALL: [Reason; REASON_COUNT as usize] = [$(Reason::$variant),*];

            pub const fn verdict(self) -> Verdict {
                match self {
                    $(Reason::$variant => Verdict::$verdict,)*
                }
            }

            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    /// Ethernet header cut short.
    PassTruncatedEth = 0, "truncated_eth", Pass;
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): not ours. (Named
    /// before the relay spoke IPv6; the name is part of the counters' contract.)
    PassNotIpv4 = 1, "not_ipv4", Pass;
    /// IPv4 header cut short or claiming less than 20 bytes.
    PassTruncatedIp = 2, "truncated_ip", Pass;
    /// Not UDP: not ours.
    PassNotUdp = 3, "not_udp", Pass;
    /// IPv4 options: rare enough to leave to the stack and the daemon.
    PassIpOptions = 4, "ip_options", Pass;
    /// A fragment: the stack reassembles it for the daemon's socket.
    PassFragment = 5, "fragment", Pass;
    /// UDP header cut short.
    PassTruncatedUdp = 6, "truncated_udp", Pass;
    /// UDP to a port the relay does not own.
    PassNotRelayPort = 7, "not_relay_port", Pass;
    /// A relay port but no flow entry: the daemon decides.
    PassNoFlow = 8, "no_flow", Pass;
    /// TTL would expire here: the stack answers like a router would.
    PassTtlExpiring = 9, "ttl_expiring", Pass;
    /// No neighbour entry for the next hop yet: the daemon's socket send resolves it.
    PassFibNoNeigh = 10, "fib_no_neigh", Pass;
    /// Any other route lookup failure (no route, forwarding disabled, ...).
    PassFibFailed = 11, "fib_failed", Pass;
    /// The egress interface is not one the relay redirects to.
    PassEgressNotAttached = 12, "egress_not_attached", Pass;
    /// Lengths in the IPv4 or UDP header disagree with the frame.
    DropMalformed = 13, "malformed", Drop;
    /// Claims to come from a flow's server but the source or ingress is wrong.
    DropSpoofedServer = 14, "spoofed_server", Drop;
    /// Forwarded back out of the interface it came in on.
    TxForwarded = 15, "forwarded_tx", Tx;
    /// Forwarded out of another interface.
    RedirectForwarded = 16, "forwarded_redirect", Redirect;
    /// Would go to the daemon, but its session's slow-path bucket is empty.
    DropSlowpathSessionLimit = 17, "slowpath_session_limit", Drop;
    /// Would go to the daemon, but the relay-wide slow-path bucket is empty.
    DropSlowpathGlobalLimit = 18, "slowpath_global_limit", Drop;
    /// Arrived at a punched session's backend-facing port from an endpoint
    /// other than the server's: the daemon checks whether the server's NAT
    /// moved it (the datagram must verify with the session key).
    PassNatRebindCandidate = 19, "nat_rebind_candidate", Pass;
    /// IPv6 UDP with a zero checksum: invalid in IPv6 (RFC 8200 8.1).
    DropIpv6ZeroChecksum = 20, "ipv6_zero_checksum", Drop;
    /// IPv6 extension headers the program does not walk (more than a few,
    /// a routing header still to be followed, an unknown one) or any in a
    /// packet to translate: the stack and the daemon handle them.
    PassIpv6ExtHeaders = 21, "ipv6_ext_headers", Pass;
    /// An IPv4 datagram without UDP checksum for an IPv6 output, where zero
    /// is invalid: the daemon relays it (its socket computes one).
    PassTranslateNoChecksum = 22, "translate_no_checksum", Pass;
    /// An IPv6 or translated packet larger than the egress MTU: IPv6 routers
    /// do not fragment, so the daemon's socket sends it (the local stack
    /// fragments what it originates).
    PassTooBig = 23, "too_big", Pass;
    /// A translation to IPv6 found no headroom to grow the packet into
    /// (`bpf_xdp_adjust_head` refused): the daemon relays it.
    PassNoHeadroom = 24, "no_headroom", Pass;
}

/// Each reason's index is its position in [`Reason::ALL`]: indices are dense
/// and none is used twice, checked when the crate compiles.
const _: () = {
    let mut index = 0;
    while index < Reason::ALL.len() {
        assert!(
            Reason::ALL[index] as usize == index,
            "reason indices must be 0, 1, 2, ... in table order"
        );
        index += 1;
    }
};

/// Packets and bytes counted under one reason (per CPU in the kernel). The
/// bytes are the frame's as it leaves the program: a translated packet
/// counts its new size (20 bytes more or less than it arrived with).
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

    /// The IPv6 reasons came after the IPv4 ones, at the end.
    #[test]
    fn ipv6_reasons_are_appended() {
        assert_eq!(Reason::DropIpv6ZeroChecksum as u32, 20);
        assert_eq!(Reason::PassNoHeadroom as u32, REASON_COUNT - 1);
        assert_eq!(Reason::DropIpv6ZeroChecksum.verdict(), Verdict::Drop);
        assert_eq!(Reason::PassIpv6ExtHeaders.verdict(), Verdict::Pass);
    }

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
        assert_eq!(Reason::PassNatRebindCandidate as u32, 19);
        assert_eq!(Reason::DropSlowpathGlobalLimit as u32, 18);
        assert_eq!(Reason::PassNatRebindCandidate.verdict(), Verdict::Pass);
        assert_eq!(
            Reason::PassNatRebindCandidate.name(),
            "nat_rebind_candidate"
        );
    }
}
