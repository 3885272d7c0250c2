//! The kernel's routing and link tables, asked over rtnetlink
//! (netlink-packet-route's typed messages on a netlink-sys socket) instead of
//! running iproute2 and parsing its JSON: no process per question, no output
//! format to track, and errors that are the kernel's own errno.
//!
//! Every call is a short blocking request on its own socket; callers on the
//! async runtime run it with `spawn_blocking`, as they did the command.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp,
};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// What `RTM_GETROUTE` says about one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The address the kernel would send from (RTA_PREFSRC).
    pub source: Option<IpAddr>,
    /// The interface packets leave through (RTA_OIF).
    pub ifindex: Option<u32>,
}

/// One interface as `RTM_GETLINK` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Carrier present (IFF_LOWER_UP).
    pub lower_up: bool,
    pub veth: bool,
    /// The XDP program attached in any mode (IFLA_XDP).
    pub xdp_prog: Option<u32>,
    /// For a veth: the peer's ifindex (IFLA_LINK) ...
    pub peer_index: Option<u32>,
    /// ... and, when the peer lives in another namespace, that namespace's id
    /// as this one sees it (IFLA_LINK_NETNSID).
    pub peer_netnsid: Option<i32>,
    /// IFLA_MTU (0 when the kernel sent none).
    pub mtu: u32,
    /// IFLA_ADDRESS when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
}

/// How this namespace routes to `destination`, like `ip route get`.
pub fn route_get(destination: IpAddr) -> io::Result<Route> {
    let mut message = RouteMessage::default();
    let (family, length, address) = match destination {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    message.header.address_family = family;
    message.header.destination_prefix_length = length;
    message
        .attributes
        .push(RouteAttribute::Destination(address));
    let replies = request(RouteNetlinkMessage::GetRoute(message), false)?;
    let mut route = Route {
        source: None,
        ifindex: None,
    };
    for reply in replies {
        let RouteNetlinkMessage::NewRoute(reply) = reply else {
            continue;
        };
        for attribute in reply.attributes {
            match attribute {
                RouteAttribute::PrefSource(RouteAddress::Inet(source)) => {
                    route.source = Some(source.into());
                }
                RouteAttribute::PrefSource(RouteAddress::Inet6(source)) => {
                    route.source = Some(source.into());
                }
                RouteAttribute::Oif(index) => route.ifindex = Some(index),
                _ => {}
            }
        }
    }
    Ok(route)
}

/// The interface named `name` in this namespace; None when there is none.
pub fn link_by_name(name: &str) -> io::Result<Option<Link>> {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    match request(RouteNetlinkMessage::GetLink(message), false) {
        Ok(replies) => Ok(links_of(replies).into_iter().next()),
        Err(error) if error.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Every interface of the namespace this thread is in.
pub fn links() -> io::Result<Vec<Link>> {
    request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true).map(links_of)
}

/// The id this namespace gives the namespace bound at `path` (as in
/// /run/netns/NAME), the number veths' IFLA_LINK_NETNSID carry; None when
/// it has none assigned.
pub fn nsid_of(path: &Path) -> io::Result<Option<i32>> {
    let namespace = File::open(path)?;
    let mut message = NsidMessage::default();
    let fd = u32::try_from(namespace.as_raw_fd())
        .map_err(|_| io::Error::other("negative file descriptor"))?;
    message.attributes.push(NsidAttribute::Fd(fd));
    let replies = request(RouteNetlinkMessage::GetNsId(message), false)?;
    Ok(replies.into_iter().find_map(|reply| match reply {
        RouteNetlinkMessage::NewNsId(reply) => reply.attributes.into_iter().find_map(|a| match a {
            NsidAttribute::Id(id) if id >= 0 => Some(id),
            _ => None,
        }),
        _ => None,
    }))
}

/// Runs `f` in the network namespace bound at `path`, on a thread of its
/// own: `setns` changes only the calling thread, and that thread ends with
/// `f`, so no other thread of the daemon ever leaves its namespace.
pub fn in_namespace<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let namespace = File::open(path)?;
    std::thread::spawn(move || {
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

fn links_of(replies: Vec<RouteNetlinkMessage>) -> Vec<Link> {
    replies
        .into_iter()
        .filter_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => Some(link_from(link)),
            _ => None,
        })
        .collect()
}

fn link_from(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        up: message.header.flags.contains(LinkFlags::Up),
        lower_up: message.header.flags.contains(LinkFlags::LowerUp),
        veth: false,
        xdp_prog: None,
        peer_index: None,
        peer_netnsid: None,
        mtu: 0,
        mac: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Link(index) => link.peer_index = Some(index),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(id),
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Address(address) => link.mac = address.try_into().ok(),
            LinkAttribute::LinkInfo(infos) => {
                link.veth |= infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::Xdp(xdp) => {
                // IFLA_XDP_PROG_ID names the program when one mode holds
                // it; with several modes at once only the per-mode ids do.
                link.xdp_prog = xdp
                    .iter()
                    .find_map(|x| match x {
                        LinkXdp::ProgId(id) => Some(*id),
                        _ => None,
                    })
                    .or_else(|| {
                        xdp.iter().find_map(|x| match x {
                            LinkXdp::DrvProgId(id)
                            | LinkXdp::SkbProgId(id)
                            | LinkXdp::HwProgId(id) => Some(*id),
                            _ => None,
                        })
                    })
                    .filter(|id| *id != 0);
            }
            _ => {}
        }
    }
    link
}

/// Sends one request and collects its replies: all parts of a dump, or the
/// single answer of a get. A kernel error comes back as its errno.
fn request(message: RouteNetlinkMessage, dump: bool) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let mut replies = Vec::new();
    // A dump ends with NLMSG_DONE; the bound only guards against a kernel
    // that never sends it.
    for _ in 0..100_000 {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(replies),
                    };
                }
                NetlinkPayload::InnerMessage(inner) => {
                    replies.push(inner);
                    if !dump {
                        return Ok(replies);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            // Messages in one datagram start on 4-byte boundaries (NLMSG_ALIGN).
            offset += length.next_multiple_of(4);
        }
    }
    Err(io::Error::other("the kernel's netlink dump did not end"))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_is_found_and_routed() {
        let lo = link_by_name("lo").unwrap().expect("every namespace has lo");
        assert_eq!(lo.index, 1);
        assert!(!lo.veth);
        assert!(links().unwrap().iter().any(|l| l.name == "lo"));
        assert_eq!(link_by_name("no-such-link0").unwrap(), None);
        let route = route_get(Ipv4Addr::LOCALHOST.into()).unwrap();
        assert_eq!(route.ifindex, Some(1));
        assert_eq!(route.source, Some(Ipv4Addr::LOCALHOST.into()));
    }
}
