//! What a flow's two map entries are, built from its addresses in either
//! family, and what restart reconciliation needs to know about the halves
//! the kernel already holds. Sessions see [`FlowEntries`] as an opaque value:
//! which map a half lives in (IPv4, IPv6, or translated) is the datapath's
//! business (see forwarder-common's `flow6` for the table).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, bail};
use forwarder_common::flow::{
    Endpoints, REWRITE_RECORD_CLIENT_SEQ, REWRITE_UNKNOWN_SOURCE_TO_DAEMON,
};
use forwarder_common::flow6::{Endpoints46, WireAddr};
use forwarder_common::{
    BackendKey, BackendKey6, BackendRewrite, ClientKey, ClientKey6, Rewrite, Rewrite6,
};

/// What a flow's two map entries are built from. `client` and `facing` share a
/// family, `upstream` and `backend` share one; when the two differ the flow
/// is translated in XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowAddrs {
    /// The client's endpoint as seen on the wire.
    pub client: SocketAddr,
    /// The relay address the client sent to, and the session (or shared) port.
    pub facing: SocketAddr,
    /// The relay's source address toward the backend (the route's), and the
    /// backend-facing port Q.
    pub upstream: SocketAddr,
    pub backend: SocketAddr,
    /// Slot of the interface of the route to the backend, as the datapath
    /// numbers them (`Datapath::egress_iface`; `IFACE_ANY`: any).
    pub backend_iface: u8,
}

/// A client half: its key, in the map its input family and output family pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientHalf {
    V4(ClientKey, Rewrite),
    V4To6(ClientKey, Rewrite6),
    V6(ClientKey6, Rewrite6),
}

/// A backend half, likewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendHalf {
    V4(BackendKey, BackendRewrite),
    V4To6(BackendKey, Rewrite6),
    V6(BackendKey6, Rewrite6),
}

/// The key of a backend half in whichever map holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendHalfKey {
    V4(BackendKey),
    V4To6(BackendKey),
    V6(BackendKey6),
}

impl BackendHalfKey {
    /// The relay's backend-facing endpoint the half matches packets to.
    pub fn upstream(&self) -> SocketAddr {
        match self {
            Self::V4(key) | Self::V4To6(key) => SocketAddr::new(
                Ipv4Addr::from(key.relay_addr).into(),
                u16::from_be_bytes(key.relay_port),
            ),
            Self::V6(key) => SocketAddr::new(
                Ipv6Addr::from(key.relay_addr).into(),
                u16::from_be_bytes(key.relay_port),
            ),
        }
    }
}

impl BackendHalf {
    pub(crate) fn key(&self) -> BackendHalfKey {
        match self {
            Self::V4(key, _) => BackendHalfKey::V4(*key),
            Self::V4To6(key, _) => BackendHalfKey::V4To6(*key),
            Self::V6(key, _) => BackendHalfKey::V6(*key),
        }
    }

    /// The half with what the XDP program keeps in it (timestamp, route,
    /// counters) cleared: what the daemon wrote.
    fn ours(&self) -> Self {
        match *self {
            Self::V4(key, rewrite) => Self::V4(key, rewrite.as_written()),
            Self::V4To6(key, rewrite) => Self::V4To6(key, rewrite.as_written()),
            Self::V6(key, rewrite) => Self::V6(key, rewrite.as_written()),
        }
    }

    /// Whether the XDP program forwarded anything through the half.
    fn forwarded(&self) -> bool {
        match self {
            Self::V4(_, backend) => backend.rewrite.last_seen != 0,
            Self::V4To6(_, rewrite) | Self::V6(_, rewrite) => rewrite.last_seen != 0,
        }
    }
}

impl ClientHalf {
    fn ours(&self) -> Self {
        match *self {
            Self::V4(key, rewrite) => Self::V4(key, rewrite.as_written()),
            Self::V4To6(key, rewrite) => Self::V4To6(key, rewrite.as_written()),
            Self::V6(key, rewrite) => Self::V6(key, rewrite.as_written()),
        }
    }
}

/// Both halves of one flow, built together and installed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntries {
    pub(crate) client: ClientHalf,
    pub(crate) backend: BackendHalf,
}

fn wire(ip: IpAddr) -> WireAddr {
    match ip {
        IpAddr::V4(a) => WireAddr::V4(a.octets()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // A v4-mapped address (a dual-stack socket's view of an IPv4
            // peer) is that IPv4 peer on the wire.
            Some(v4) => WireAddr::V4(v4.octets()),
            None => WireAddr::V6(a.octets()),
        },
    }
}

fn ends(saddr: SocketAddr, daddr: SocketAddr) -> Endpoints46 {
    Endpoints46 {
        saddr: wire(saddr.ip()),
        daddr: wire(daddr.ip()),
        sport: saddr.port().to_be_bytes(),
        dport: daddr.port().to_be_bytes(),
    }
}

fn v4(ends: &Endpoints46) -> Option<Endpoints> {
    match (ends.saddr, ends.daddr) {
        (WireAddr::V4(saddr), WireAddr::V4(daddr)) => Some(Endpoints {
            saddr,
            daddr,
            sport: ends.sport,
            dport: ends.dport,
        }),
        _ => None,
    }
}

/// The map entry that turns `from` into `to`: an IPv4 `Rewrite` when both
/// are IPv4, else a `Rewrite6`.
enum Made {
    V4(Rewrite),
    V6(Rewrite6),
}

fn rewrite(from: &Endpoints46, to: &Endpoints46) -> Made {
    match (v4(from), v4(to)) {
        (Some(from), Some(to)) => Made::V4(Rewrite::new(from, to)),
        _ => Made::V6(Rewrite6::new(*from, *to)),
    }
}

impl FlowEntries {
    /// The two map entries of a flow: client → facing becomes upstream →
    /// backend, and backend → upstream becomes facing → client.
    pub fn new(addrs: &FlowAddrs) -> FlowEntries {
        let client_side = ends(addrs.client, addrs.facing);
        let backend_side = ends(addrs.upstream, addrs.backend);
        let swap = |e: Endpoints46| Endpoints46 {
            saddr: e.daddr,
            daddr: e.saddr,
            sport: e.dport,
            dport: e.sport,
        };
        let allowed = wire(addrs.backend.ip());
        let allowed_port = addrs.backend.port().to_be_bytes();

        let client = match (
            rewrite(&client_side, &backend_side),
            client_side.daddr,
            client_side.saddr,
        ) {
            (Made::V4(rewrite), WireAddr::V4(relay), WireAddr::V4(client)) => ClientHalf::V4(
                ClientKey {
                    relay_addr: relay,
                    client_addr: client,
                    relay_port: client_side.dport,
                    client_port: client_side.sport,
                },
                rewrite,
            ),
            (Made::V6(rewrite), relay, client) if relay.is_v4() && client.is_v4() => {
                ClientHalf::V4To6(
                    ClientKey {
                        relay_addr: four(relay),
                        client_addr: four(client),
                        relay_port: client_side.dport,
                        client_port: client_side.sport,
                    },
                    rewrite,
                )
            }
            (made, relay, client) => ClientHalf::V6(
                ClientKey6 {
                    relay_addr: relay.padded(),
                    client_addr: client.padded(),
                    relay_port: client_side.dport,
                    client_port: client_side.sport,
                },
                into6(made, &client_side, &backend_side),
            ),
        };

        let from = swap(backend_side);
        let to = swap(client_side);
        let backend = match (rewrite(&from, &to), backend_side.saddr) {
            (Made::V4(rewrite), WireAddr::V4(relay)) => BackendHalf::V4(
                BackendKey {
                    relay_addr: relay,
                    relay_port: backend_side.sport,
                    _pad: [0; 2],
                },
                BackendRewrite::new(rewrite, four(allowed), allowed_port, addrs.backend_iface),
            ),
            (made, relay) => {
                let mut rewrite = into6(made, &from, &to);
                rewrite.allowed_saddr = allowed.padded();
                rewrite.allowed_sport = allowed_port;
                rewrite.allowed_iface = addrs.backend_iface;
                match relay {
                    WireAddr::V4(relay) => BackendHalf::V4To6(
                        BackendKey {
                            relay_addr: relay,
                            relay_port: backend_side.sport,
                            _pad: [0; 2],
                        },
                        rewrite,
                    ),
                    WireAddr::V6(relay) => BackendHalf::V6(
                        BackendKey6 {
                            relay_addr: relay,
                            relay_port: backend_side.sport,
                            _pad: [0; 2],
                        },
                        rewrite,
                    ),
                }
            }
        };
        FlowEntries { client, backend }
    }

    /// Punched (NAT'd) sessions: a datagram from another source on the
    /// backend half goes to the daemon instead of being dropped.
    pub fn send_unknown_sources_to_daemon(&mut self) {
        match &mut self.backend {
            BackendHalf::V4(_, backend) => {
                backend.rewrite.flags |= REWRITE_UNKNOWN_SOURCE_TO_DAEMON
            }
            BackendHalf::V4To6(_, rewrite) | BackendHalf::V6(_, rewrite) => {
                rewrite.flags |= REWRITE_UNKNOWN_SOURCE_TO_DAEMON
            }
        }
    }

    /// Punched (NAT'd) sessions: the client half records the nonce of each
    /// client-to-server datagram it forwards (forwarder_common::clientseq).
    pub fn record_client_seqs(&mut self) {
        match &mut self.client {
            ClientHalf::V4(_, rewrite) => rewrite.flags |= REWRITE_RECORD_CLIENT_SEQ,
            ClientHalf::V4To6(_, rewrite) | ClientHalf::V6(_, rewrite) => {
                rewrite.flags |= REWRITE_RECORD_CLIENT_SEQ
            }
        }
    }

    /// The key of the backend half, as [`InstalledHalves`] lists them.
    pub fn backend_key(&self) -> BackendHalfKey {
        self.backend.key()
    }
}

fn four(addr: WireAddr) -> [u8; 4] {
    match addr {
        WireAddr::V4(a) => a,
        // Callers match on the family first.
        WireAddr::V6(_) => [0; 4],
    }
}

/// The `Rewrite6` of a half that lives in an IPv6 or translated map. Both
/// sides IPv4 never get here (they take the IPv4 maps), but a side whose two
/// addresses disagree in family still gets a well-formed entry.
fn into6(made: Made, from: &Endpoints46, to: &Endpoints46) -> Rewrite6 {
    match made {
        Made::V6(rewrite) => rewrite,
        Made::V4(_) => Rewrite6::new(*from, *to),
    }
}

/// A client half the kernel holds, as a restarted daemon sees it.
#[derive(Clone, Copy, Debug)]
pub struct InstalledClient {
    /// The relay address and port the client sends to.
    pub facing: SocketAddr,
    pub client: SocketAddr,
    /// Where the half sends to: the backend and the relay's port Q.
    pub backend: SocketAddr,
    pub upstream_port: u16,
    pub(crate) half: ClientHalf,
}

fn sock(addr: &[u8], port: [u8; 2], v4_out: bool) -> SocketAddr {
    let port = u16::from_be_bytes(port);
    let ip: IpAddr = if v4_out {
        Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).into()
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&addr[..16]);
        Ipv6Addr::from(a).into()
    };
    SocketAddr::new(ip, port)
}

impl InstalledClient {
    pub(crate) fn from_half(half: ClientHalf) -> Self {
        match half {
            ClientHalf::V4(key, rewrite) => Self {
                facing: sock(&key.relay_addr, key.relay_port, true),
                client: sock(&key.client_addr, key.client_port, true),
                backend: sock(&rewrite.new_daddr, rewrite.new_dport, true),
                upstream_port: u16::from_be_bytes(rewrite.new_sport),
                half,
            },
            ClientHalf::V4To6(key, rewrite) => Self {
                facing: sock(&key.relay_addr, key.relay_port, true),
                client: sock(&key.client_addr, key.client_port, true),
                backend: sock(&rewrite.new_daddr, rewrite.new_dport, rewrite.out_v4()),
                upstream_port: u16::from_be_bytes(rewrite.new_sport),
                half,
            },
            ClientHalf::V6(key, rewrite) => Self {
                facing: sock(&key.relay_addr, key.relay_port, false),
                client: sock(&key.client_addr, key.client_port, false),
                backend: sock(&rewrite.new_daddr, rewrite.new_dport, rewrite.out_v4()),
                upstream_port: u16::from_be_bytes(rewrite.new_sport),
                half,
            },
        }
    }

    /// Whether this installed half is exactly the client half of `expected`
    /// (what the XDP program keeps in it aside).
    pub fn matches(&self, expected: &FlowEntries) -> bool {
        self.half.ours() == expected.client.ours()
    }
}

/// What a backend half the kernel holds says about `expected`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Missing,
    Differs,
    /// Installed as expected; `answered`: the server has sent through it.
    Matches {
        answered: bool,
    },
}

/// Every flow half the kernel holds, of both families: what a restarted
/// daemon adopts or removes.
#[derive(Debug, Default)]
pub struct InstalledHalves {
    pub clients: Vec<InstalledClient>,
    backends: HashMap<BackendHalfKey, BackendHalf>,
}

impl InstalledHalves {
    pub(crate) fn new(clients: Vec<ClientHalf>, backends: Vec<BackendHalf>) -> Self {
        Self {
            clients: clients
                .into_iter()
                .map(InstalledClient::from_half)
                .collect(),
            backends: backends.into_iter().map(|b| (b.key(), b)).collect(),
        }
    }

    /// How `expected`'s backend half compares with the installed one.
    pub fn backend_state(&self, expected: &FlowEntries) -> BackendState {
        match self.backends.get(&expected.backend.key()) {
            None => BackendState::Missing,
            Some(found) if found.ours() == expected.backend.ours() => BackendState::Matches {
                answered: found.forwarded(),
            },
            Some(_) => BackendState::Differs,
        }
    }

    /// Every installed backend half's key.
    pub fn backend_keys(&self) -> impl Iterator<Item = &BackendHalfKey> {
        self.backends.keys()
    }
}

/// The relay's route towards a backend: which local address packets leave
/// from and which interface the backend's answers must arrive on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRoute {
    pub source: IpAddr,
    pub ifindex: u32,
}

impl BackendRoute {
    /// The source as IPv4, for callers that only speak IPv4 yet; an IPv6
    /// source reads as 0.0.0.0. Routes to IPv4 backends always have an IPv4
    /// source.
    pub fn source_v4(&self) -> Ipv4Addr {
        match self.source {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }
}

/// Asks the kernel (rtnetlink's RTM_GETROUTE, as `ip route get` does) how
/// this namespace reaches `backend`, in its family.
pub fn route_to(backend: IpAddr) -> anyhow::Result<BackendRoute> {
    let route = match super::netlink::route_get(backend) {
        Ok(route) => route,
        Err(error) => bail!(
            "the relay has no route to backend {backend}: {error} (check `ip route` / `ip -6 route` in the relay's namespace)"
        ),
    };
    let ifindex = route.ifindex.with_context(|| {
        format!(
            "the kernel's route to {backend} names no interface (check `ip route get {backend}`)"
        )
    })?;
    let family = if backend.is_ipv4() { "IPv4" } else { "IPv6" };
    let source = route.source.with_context(|| {
        format!(
            "the route to backend {backend} names no source address: give the relay an {family} address on \
             the backend's side"
        )
    })?;
    Ok(BackendRoute { source, ifindex })
}

#[cfg(test)]
mod tests {
    use forwarder_common::csum;

    use super::*;

    /// Applies a rewrite to a header built from `ends` and returns the
    /// resulting endpoints, checking the checksums match a full recomputation.
    fn forward(ends: Endpoints, rewrite: &Rewrite) -> Endpoints {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[8] = 64;
        ip[9] = 17;
        ip[3] = 28;
        ip[12..16].copy_from_slice(&ends.saddr);
        ip[16..20].copy_from_slice(&ends.daddr);
        let c = csum::ipv4_header(&ip).to_ne_bytes();
        ip[10..12].copy_from_slice(&c);
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&ends.sport);
        udp[2..4].copy_from_slice(&ends.dport);
        udp[5] = 8;
        let c = csum::udp_ipv4(ends.saddr, ends.daddr, &udp).to_ne_bytes();
        udp[6..8].copy_from_slice(&c);
        csum::rewrite_ipv4_udp(&mut ip, &mut udp, rewrite);
        assert_eq!(csum::sum(0, &ip), 0xffff, "IPv4 checksum verifies");
        let mut check = udp;
        check[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(
            csum::udp_ipv4(
                ip[12..16].try_into().unwrap(),
                ip[16..20].try_into().unwrap(),
                &check
            )
            .to_ne_bytes(),
            [udp[6], udp[7]]
        );
        Endpoints {
            saddr: ip[12..16].try_into().unwrap(),
            daddr: ip[16..20].try_into().unwrap(),
            sport: udp[0..2].try_into().unwrap(),
            dport: udp[2..4].try_into().unwrap(),
        }
    }

    fn addrs(client: &str, facing: &str, upstream: &str, backend: &str) -> FlowAddrs {
        FlowAddrs {
            client: client.parse().unwrap(),
            facing: facing.parse().unwrap(),
            upstream: upstream.parse().unwrap(),
            backend: backend.parse().unwrap(),
            backend_iface: 7,
        }
    }

    #[test]
    fn halves_land_in_the_map_of_their_families() {
        let v4 = FlowEntries::new(&addrs(
            "198.51.100.7:41000",
            "203.0.113.1:60000",
            "10.0.2.1:61000",
            "10.0.2.2:60001",
        ));
        assert!(matches!(v4.client, ClientHalf::V4(..)));
        assert!(matches!(v4.backend, BackendHalf::V4(..)));

        let v6 = FlowEntries::new(&addrs(
            "[2001:db8::7]:41000",
            "[2001:db8::1]:60000",
            "[fd00::1]:61000",
            "[fd00::2]:60001",
        ));
        let ClientHalf::V6(key, rewrite) = v6.client else {
            panic!("{v6:?}")
        };
        assert_eq!(key.client_port, 41000u16.to_be_bytes());
        assert!(!rewrite.out_v4());
        let BackendHalf::V6(key, rewrite) = v6.backend else {
            panic!("{v6:?}")
        };
        assert_eq!(key.relay_port, 61000u16.to_be_bytes());
        assert_eq!(rewrite.allowed_sport, 60001u16.to_be_bytes());
        assert_eq!(rewrite.allowed_iface, 7);

        // An IPv6 client to an IPv4 backend: the client half shrinks to
        // IPv4, the backend half (IPv4 in) grows to IPv6.
        let t = FlowEntries::new(&addrs(
            "[2001:db8::7]:41000",
            "[2001:db8::1]:60000",
            "10.0.2.1:61000",
            "10.0.2.2:60001",
        ));
        let ClientHalf::V6(_, rewrite) = t.client else {
            panic!("{t:?}")
        };
        assert!(rewrite.out_v4());
        assert_eq!(rewrite.new_daddr[..4], [10, 0, 2, 2]);
        let BackendHalf::V4To6(key, rewrite) = t.backend else {
            panic!("{t:?}")
        };
        assert_eq!(key.relay_addr, [10, 0, 2, 1]);
        assert!(!rewrite.out_v4());
        assert_eq!(rewrite.allowed_saddr[..4], [10, 0, 2, 2]);
        assert_eq!(
            Ipv6Addr::from(rewrite.new_daddr),
            "2001:db8::7".parse::<Ipv6Addr>().unwrap()
        );

        // And the other way.
        let t = FlowEntries::new(&addrs(
            "198.51.100.7:41000",
            "203.0.113.1:60000",
            "[fd00::1]:61000",
            "[fd00::2]:60001",
        ));
        assert!(matches!(t.client, ClientHalf::V4To6(..)));
        let BackendHalf::V6(_, rewrite) = t.backend else {
            panic!("{t:?}")
        };
        assert!(rewrite.out_v4());
    }

    #[test]
    fn installed_halves_compare_with_expected_ones() {
        let mut entries = FlowEntries::new(&addrs(
            "[2001:db8::7]:41000",
            "[2001:db8::1]:60000",
            "10.0.2.1:61000",
            "10.0.2.2:60001",
        ));
        // What the XDP program writes into a half does not make it differ.
        let mut seen = entries.backend;
        if let BackendHalf::V4To6(_, rewrite) = &mut seen {
            rewrite.last_seen = 5;
            rewrite.next_hop.iface = 3;
            rewrite.packets = 9;
        }
        let installed = InstalledHalves::new(vec![entries.client], vec![seen]);
        let client = installed.clients[0];
        assert!(client.matches(&entries));
        assert_eq!(client.client, "[2001:db8::7]:41000".parse().unwrap());
        assert_eq!(client.facing, "[2001:db8::1]:60000".parse().unwrap());
        assert_eq!(client.backend, "10.0.2.2:60001".parse().unwrap());
        assert_eq!(client.upstream_port, 61000);
        assert_eq!(
            installed.backend_state(&entries),
            BackendState::Matches { answered: true }
        );
        assert_eq!(
            entries.backend_key().upstream(),
            "10.0.2.1:61000".parse().unwrap()
        );
        entries.send_unknown_sources_to_daemon();
        assert_eq!(installed.backend_state(&entries), BackendState::Differs);
    }

    #[test]
    fn flow_entries_relay_both_ways() {
        let client: std::net::SocketAddrV4 = "198.51.100.7:41000".parse().unwrap();
        let backend: std::net::SocketAddrV4 = "10.0.2.2:60001".parse().unwrap();
        let relay: Ipv4Addr = "203.0.113.1".parse().unwrap();
        let entries = FlowEntries::new(&addrs(
            "198.51.100.7:41000",
            "203.0.113.1:60000",
            "10.0.2.1:61000",
            "10.0.2.2:60001",
        ));
        let (ClientHalf::V4(_, client_rewrite), BackendHalf::V4(backend_key, backend_rewrite)) =
            (entries.client, entries.backend)
        else {
            panic!("an IPv4 flow takes the IPv4 maps: {entries:?}")
        };

        let upstream = forward(
            Endpoints {
                saddr: client.ip().octets(),
                daddr: relay.octets(),
                sport: 41000u16.to_be_bytes(),
                dport: 60000u16.to_be_bytes(),
            },
            &client_rewrite,
        );
        assert_eq!(
            upstream,
            Endpoints {
                saddr: [10, 0, 2, 1],
                daddr: [10, 0, 2, 2],
                sport: 61000u16.to_be_bytes(),
                dport: 60001u16.to_be_bytes()
            }
        );
        assert_eq!(backend_key.relay_addr, upstream.saddr);
        assert_eq!(backend_key.relay_port, upstream.sport);

        let reply = forward(
            Endpoints {
                saddr: upstream.daddr,
                daddr: upstream.saddr,
                sport: upstream.dport,
                dport: upstream.sport,
            },
            &backend_rewrite.rewrite,
        );
        assert_eq!(
            reply,
            Endpoints {
                saddr: relay.octets(),
                daddr: client.ip().octets(),
                sport: 60000u16.to_be_bytes(),
                dport: 41000u16.to_be_bytes()
            }
        );
        assert_eq!(backend_rewrite.allowed.saddr, backend.ip().octets());
        assert_eq!(backend_rewrite.allowed.sport, 60001u16.to_be_bytes());
        assert_eq!(backend_rewrite.allowed.iface, 7);
    }
}
