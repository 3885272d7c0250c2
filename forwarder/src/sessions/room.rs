//! Room left in the flow maps, counted per family of maps: IPv4 flows fill
//! the IPv4 maps (`--max-flows`), IPv6 and translated flows the IPv6 and
//! translated ones (`--max-flows6`). Only counts: the entries carry their
//! own counters, so a share names no slot in any map.

use std::net::SocketAddr;

use forwarder_common::config::RuntimeSizes;

use crate::datapath::flows::{BackendHalfKey, FlowEntries};

/// Which maps a flow's two halves live in, and so which room it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlowFamily {
    /// Client and backend both IPv4 on the wire: `CLIENT_FLOWS` and
    /// `BACKEND_FLOWS`.
    V4,
    /// An IPv6 client or backend, translated or not: one half in
    /// `CLIENT_FLOWS6` or `CLIENT_FLOWS_4TO6`, the other in `BACKEND_FLOWS6`
    /// or `BACKEND_FLOWS_4TO6`, each sized `--max-flows6`.
    V6,
}

impl FlowFamily {
    /// The family of a flow's entries. The backend half is IPv4 exactly when
    /// both ends are IPv4 (a translated flow's backend half is a 4to6 or an
    /// IPv6 one), and then so is the client half.
    pub(crate) fn of(entries: &FlowEntries) -> Self {
        match entries.backend_key() {
            BackendHalfKey::V4(_) => Self::V4,
            BackendHalfKey::V4To6(_) | BackendHalfKey::V6(_) => Self::V6,
        }
    }

    /// A punched session's family before any client is known: its server's.
    /// An IPv6 server's flows are all IPv6 or translated; an IPv4 server's
    /// are IPv4 until an IPv6 client comes (the share then moves, see
    /// `nat_move`).
    pub(crate) fn of_backend(backend: SocketAddr) -> Self {
        // A v4-mapped address is that IPv4 peer on the wire.
        if backend.ip().to_canonical().is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    /// The family a flow between `client` and `backend` will have, before
    /// its entries are built: IPv4 exactly when both ends are IPv4 on the
    /// wire, which is what [`FlowFamily::of`] finds in the entries.
    pub(crate) fn of_ends(client: SocketAddr, backend: SocketAddr) -> Self {
        match (Self::of_backend(client), Self::of_backend(backend)) {
            (Self::V4, Self::V4) => Self::V4,
            _ => Self::V6,
        }
    }
}

/// Room left in the flow maps: each flow, and each punched session's NAT
/// half, holds one share of its family's capacity while it lives.
#[derive(Debug)]
pub(crate) struct FlowRoom {
    free: u32,
    free6: u32,
    max_flows: u32,
    max_flows6: u32,
}

impl FlowRoom {
    pub(crate) fn new(sizes: RuntimeSizes) -> Self {
        Self {
            free: sizes.max_flows,
            free6: sizes.max_flows6,
            max_flows: sizes.max_flows,
            max_flows6: sizes.max_flows6,
        }
    }

    fn free_mut(&mut self, family: FlowFamily) -> &mut u32 {
        match family {
            FlowFamily::V4 => &mut self.free,
            FlowFamily::V6 => &mut self.free6,
        }
    }

    /// Whether a flow of `family` would fit.
    pub(crate) fn has_room(&self, family: FlowFamily) -> bool {
        match family {
            FlowFamily::V4 => self.free > 0,
            FlowFamily::V6 => self.free6 > 0,
        }
    }

    /// Takes a share; false when the family's maps are full.
    #[must_use]
    pub(crate) fn take(&mut self, family: FlowFamily) -> bool {
        let free = self.free_mut(family);
        let Some(left) = free.checked_sub(1) else {
            return false;
        };
        *free = left;
        true
    }

    pub(crate) fn give_back(&mut self, family: FlowFamily) {
        *self.free_mut(family) += 1;
    }

    /// Why a flow of `family` is refused when [`FlowRoom::take`] said no:
    /// which maps are full, and the knob that sizes them.
    pub(crate) fn full(&self, family: FlowFamily) -> String {
        match family {
            FlowFamily::V4 => format!(
                "the relay's flow table is full ({} IPv4 flows: raise --max-flows for more)",
                self.max_flows
            ),
            FlowFamily::V6 => format!(
                "the relay's IPv6 flow table is full ({} IPv6 and translated flows: raise --max-flows6 for more)",
                self.max_flows6
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(max_flows: u32, max_flows6: u32) -> FlowRoom {
        FlowRoom::new(RuntimeSizes::new(max_flows, max_flows6, 1).unwrap())
    }

    #[test]
    fn each_family_has_its_own_room() {
        let mut room = room(2, 1);
        assert!(room.take(FlowFamily::V6));
        // The IPv6 room is spent: another IPv6 flow is refused...
        assert!(!room.has_room(FlowFamily::V6));
        assert!(!room.take(FlowFamily::V6));
        // ...while IPv4 flows still fit.
        assert!(room.take(FlowFamily::V4));
        assert!(room.take(FlowFamily::V4));
        assert!(!room.take(FlowFamily::V4));
        room.give_back(FlowFamily::V6);
        assert!(room.take(FlowFamily::V6));
        assert!(!room.has_room(FlowFamily::V4));
        room.give_back(FlowFamily::V4);
        assert!(room.take(FlowFamily::V4));
    }

    #[test]
    fn refusals_name_the_knob_to_raise() {
        let room = room(2, 1);
        let v4 = room.full(FlowFamily::V4);
        assert!(v4.starts_with("the relay's flow table is full"), "{v4}");
        assert!(v4.contains("2 IPv4 flows: raise --max-flows "), "{v4}");
        let v6 = room.full(FlowFamily::V6);
        assert!(v6.contains("IPv6 flow table is full"), "{v6}");
        assert!(v6.contains("raise --max-flows6"), "{v6}");
    }

    #[test]
    fn a_punched_session_without_a_client_takes_its_servers_family() {
        let of = |addr: &str| FlowFamily::of_backend(addr.parse().unwrap());
        assert_eq!(of("192.0.2.1:60001"), FlowFamily::V4);
        assert_eq!(of("[::ffff:192.0.2.1]:60001"), FlowFamily::V4);
        assert_eq!(of("[2001:db8::1]:60001"), FlowFamily::V6);
    }
}
