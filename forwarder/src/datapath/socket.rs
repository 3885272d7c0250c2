//! A relay port's UDP socket: binding it reserves the port, and it carries
//! whatever the XDP program hands to the stack. IP_PKTINFO / IPV6_PKTINFO
//! tell which relay address a client used, and let replies leave from that
//! same address.
//!
//! Both families: a client-facing port is one dual-stack IPv6 socket
//! (IPV6_V6ONLY off), so one bind reserves the port in both families at
//! once, one reader and one slow-path bucket serve it, and nothing else on
//! the host can take the port's other half. IPv4 clients arrive as
//! v4-mapped addresses (`::ffff:a.b.c.d`), normalised here to plain IPv4,
//! so the rest of the daemon sees each family as itself. A flow's
//! backend-facing port is bound in the backend's family at the route's
//! source address only (an IPv4 socket, or an IPv6 one with IPV6_V6ONLY
//! on), so the kernel refuses that port at any other address of either
//! family. On a host without IPv6 (`ipv6.disable=1`) a client-facing port
//! falls back to IPv4 alone.

use std::io::IoSlice;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, SockaddrLike, sendmmsg,
    setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

/// Bytes per receive slot. mosh datagrams stay under 1.3 kB; anything that
/// does not fit is truncated by the kernel, and dropped here rather than
/// forwarded damaged.
const SLOT_BYTES: usize = 4096;

/// Datagrams moved per system call (recvmmsg/sendmmsg) and per wake-up.
const MAX_BATCH: usize = 64;

/// Control-message room for one IP_PKTINFO (CMSG_SPACE(12) is 32 on Linux)
/// or one IPV6_PKTINFO (CMSG_SPACE(20) is 40), with room to spare.
type ControlSlot = [u64; 8];

thread_local! {
    /// One batch of receive buffers per worker thread, not per socket: a
    /// relay with tens of thousands of flow sockets would otherwise hold a
    /// buffer for each.
    static RECV_BATCH: std::cell::RefCell<Box<RecvBatch>> = std::cell::RefCell::new(RecvBatch::new());
}

pub struct RelaySocket {
    pub port: u16,
    /// An AF_INET6 socket (dual-stack or IPv6 only); else AF_INET.
    inet6: bool,
    fd: AsyncFd<UdpSocket>,
    /// The task reading this socket (aborted when the port is given up),
    /// and whether that already happened.
    reader: Mutex<(Option<AbortHandle>, bool)>,
}

/// One received datagram: its length, who sent it, which local address it
/// was sent to and the interface it arrived on (both from IP_PKTINFO or
/// IPV6_PKTINFO): what the relay's "only the server reaches a client" rule
/// is judged on. IPv4 addresses are always plain IPv4, never v4-mapped.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub to: IpAddr,
    pub ifindex: u32,
}

/// `address` with a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4
/// address it stands for: what a dual-stack socket reports for IPv4 peers.
/// A real IPv6 address keeps its scope (a link-local peer needs it).
pub fn canonical(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => address,
        },
        SocketAddr::V4(_) => address,
    }
}

/// `address` as an AF_INET6 socket takes it: IPv4 as v4-mapped.
fn as_inet6(address: SocketAddr) -> SocketAddrV6 {
    match address {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => v6,
    }
}

/// `address` as an AF_INET socket takes it; None for a real IPv6 one.
fn as_inet(address: SocketAddr) -> Option<SocketAddrV4> {
    match canonical(address) {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(_) => None,
    }
}

impl RelaySocket {
    /// Binds `address:port`. `::` (IPv6 unspecified) is a client-facing
    /// port, reachable on every relay address of both families (dual-stack;
    /// IPv4 alone where the host has no IPv6); `0.0.0.0` is every IPv4
    /// address only; a specific address is a flow's port at the
    /// backend-side address, in that address's family only, so the kernel
    /// itself refuses datagrams sent to that port at any other address.
    /// Must run inside the tokio runtime.
    pub fn bind(address: IpAddr, port: u16) -> anyhow::Result<Self> {
        let dual_stack = address == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let socket = match open(address, port, dual_stack) {
            Ok(socket) => socket,
            Err(error) if dual_stack && error.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                warn_no_ipv6_once();
                open(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, false)
                    .map_err(|error| bind_error(error, address, port))?
            }
            Err(error) => return Err(bind_error(error, address, port)),
        };
        let inet6 = matches!(socket.local_addr()?, SocketAddr::V6(_));
        socket.set_nonblocking(true)?;
        if inet6 {
            // Delivered for IPv4 datagrams on a dual-stack socket too (as a
            // v4-mapped address), so one option serves both families.
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
        } else {
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        }
        // SAFETY: the socket moves into the AsyncFd, which owns it, so its fd
        // stays open and unshared for as long as it is registered.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(std::io::Error::from)?;
        Ok(Self {
            port,
            inet6,
            fd,
            reader: Mutex::new((None, false)),
        })
    }

    /// A client-facing port: every relay address, both families.
    pub fn bind_client_facing(port: u16) -> anyhow::Result<Self> {
        Self::bind(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    }
    /// Registers the reading task; a socket closed before its reader started
    /// stops that reader at once.
    pub fn set_reader(&self, reader: AbortHandle) {
        let mut state = self.reader.lock().expect("reader lock");
        if state.1 {
            reader.abort();
        } else {
            state.0 = Some(reader);
        }
    }

    /// Stops the reader; the port is free once the last handle is dropped.
    pub fn close(&self) {
        let mut state = self.reader.lock().expect("reader lock");
        state.1 = true;
        if let Some(reader) = state.0.take() {
            reader.abort();
        }
    }

    /// Waits until the socket is readable, receives up to `MAX_BATCH`
    /// datagrams with one recvmmsg, asks `route` where each goes, and sends
    /// them with one sendmmsg per destination socket.
    pub async fn recv_batch(
        &self,
        mut route: impl FnMut(&Received, &[u8]) -> Option<Outgoing>,
    ) -> std::io::Result<()> {
        let mut guard = self.fd.readable().await?;
        RECV_BATCH.with_borrow_mut(|batch| {
            let count = match guard.try_io(|socket| batch.receive(socket.get_ref().as_raw_fd())) {
                Ok(Ok(count)) => count,
                Ok(Err(error)) => return Err(error),
                // Drained: readiness is cleared, wait for the next wake-up.
                Err(_would_block) => return Ok(()),
            };
            let mut outbox: Vec<(Outgoing, usize)> = Vec::with_capacity(count);
            for index in 0..count {
                let Some((received, datagram)) = batch.message(index) else {
                    continue;
                };
                if let Some(outgoing) = route(&received, datagram) {
                    outbox.push((outgoing, index));
                }
            }
            // Consecutive datagrams for the same socket leave in one call.
            let mut start = 0;
            while start < outbox.len() {
                let socket = &outbox[start].0.socket;
                let end = outbox[start..]
                    .iter()
                    .position(|(o, _)| !Arc::ptr_eq(&o.socket, socket))
                    .map_or(outbox.len(), |offset| start + offset);
                let messages: Vec<(SocketAddr, Option<IpAddr>, &[u8])> = outbox[start..end]
                    .iter()
                    .map(|(o, index)| (o.to, o.from, batch.payload(*index)))
                    .collect();
                if let Err(error) = socket.send_many(&messages) {
                    debug!(%error, port = socket.port, "sendmmsg");
                }
                start = end;
            }
            Ok(())
        })
    }

    /// Sends datagrams with sendmmsg, each to its address and from its local
    /// address (None: the route chooses). A full socket buffer drops the
    /// rest, as a router would. nix gives every datagram of one call the
    /// same control messages, so datagrams leave in runs that share their
    /// source address (the common case is one run: a flow's replies).
    pub fn send_many(
        &self,
        messages: &[(SocketAddr, Option<IpAddr>, &[u8])],
    ) -> std::io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        for run in messages.chunk_by(|a, b| a.1 == b.1) {
            for chunk in run.chunks(MAX_BATCH) {
                if self.inet6 {
                    let addresses: Vec<Option<SockaddrIn6>> = chunk
                        .iter()
                        .map(|(to, _, _)| Some(SockaddrIn6::from(as_inet6(*to))))
                        .collect();
                    let pktinfo = chunk[0].1.map(|from| libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: match from {
                                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                                IpAddr::V6(v6) => v6.octets(),
                            },
                        },
                        ipi6_ifindex: 0,
                    });
                    let controls: Vec<ControlMessage<'_>> =
                        pktinfo.iter().map(ControlMessage::Ipv6PacketInfo).collect();
                    let room = pktinfo.map(|_| nix::cmsg_space!(libc::in6_pktinfo));
                    send_chunk(fd, chunk, &addresses, &controls, room)?;
                } else {
                    let addresses: Vec<Option<SockaddrIn>> = chunk
                        .iter()
                        .map(|(to, _, _)| as_inet(*to).map(SockaddrIn::from))
                        .collect();
                    if addresses.iter().any(Option::is_none) {
                        return Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
                    }
                    let pktinfo = chunk[0]
                        .1
                        .and_then(|from| match from.to_canonical() {
                            IpAddr::V4(v4) => Some(v4),
                            IpAddr::V6(_) => None,
                        })
                        .map(|from| libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr {
                                s_addr: u32::from(from).to_be(),
                            },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        });
                    let controls: Vec<ControlMessage<'_>> =
                        pktinfo.iter().map(ControlMessage::Ipv4PacketInfo).collect();
                    let room = pktinfo.map(|_| nix::cmsg_space!(libc::in_pktinfo));
                    send_chunk(fd, chunk, &addresses, &controls, room)?;
                }
            }
        }
        Ok(())
    }

    /// Sends one datagram (see [`Self::send_many`]).
    pub fn send(&self, data: &[u8], to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<()> {
        self.send_many(&[(to, from, data)])
    }
}

/// One sendmmsg of `chunk` (at most [`MAX_BATCH`]), in the socket's own
/// address type. Control room only when a source is set: an empty buffer
/// that claims a length is refused by the kernel.
fn send_chunk<S: SockaddrLike + Copy>(
    fd: RawFd,
    chunk: &[(SocketAddr, Option<IpAddr>, &[u8])],
    addresses: &[Option<S>],
    controls: &[ControlMessage<'_>],
    room: Option<Vec<u8>>,
) -> std::io::Result<()> {
    let slices: Vec<[IoSlice<'_>; 1]> = chunk
        .iter()
        .map(|(_, _, data)| [IoSlice::new(data)])
        .collect();
    let mut headers = MultiHeaders::<S>::preallocate(chunk.len(), room);
    match sendmmsg(
        fd,
        &mut headers,
        &slices,
        addresses,
        controls,
        MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// A UDP socket at `address:port`: AF_INET for IPv4, AF_INET6 for IPv6,
/// with IPV6_V6ONLY off only for the dual-stack client-facing socket (set
/// explicitly: the host's `net.ipv6.bindv6only` default must not decide).
fn open(address: IpAddr, port: u16, dual_stack: bool) -> std::io::Result<UdpSocket> {
    let domain = match address {
        IpAddr::V4(_) => Domain::IPV4,
        IpAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.bind(&SocketAddr::new(address, port).into())?;
    Ok(socket.into())
}

fn bind_error(error: std::io::Error, address: IpAddr, port: u16) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "UDP port {port} is in use by another program on this host: pick another port or stop that program"
        )
    } else {
        anyhow::anyhow!(
            "binding UDP port {}: {error}",
            SocketAddr::new(address, port)
        )
    }
}

/// Said once per daemon: every client-facing port would say it otherwise.
fn warn_no_ipv6_once() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        warn!(
            "this host has no IPv6 (AF_INET6 sockets are refused, e.g. ipv6.disable=1): client-facing \
             ports listen on IPv4 only"
        );
    });
}

/// Where a received datagram goes: out of `socket`, to `to`, from the local
/// address `from` (None: the route chooses).
pub struct Outgoing {
    pub socket: Arc<RelaySocket>,
    pub to: SocketAddr,
    pub from: Option<IpAddr>,
}

/// Buffers and headers for one recvmmsg call. Boxed and never moved, since
/// the headers point into the other fields.
///
/// Receiving stays on libc: nix's `MultiHeaders` does not restore the name
/// and control lengths the kernel rewrites in each header, so safe reuse
/// needs fresh headers per call, which measured 11-16% more CPU per
/// datagram for the one-datagram wake-ups typical of interactive mosh
/// (sending goes through nix, at no measurable cost: docs/BENCHMARKS.md).
struct RecvBatch {
    slots: Vec<[u8; SLOT_BYTES]>,
    /// Room for either family's address (sockaddr_in6 is the larger).
    names: Vec<libc::sockaddr_in6>,
    controls: Vec<ControlSlot>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new() -> Box<Self> {
        let mut batch = Box::new(Self {
            slots: vec![[0; SLOT_BYTES]; MAX_BATCH],
            // SAFETY: sockaddr_in6 and mmsghdr are plain C data; zero is valid.
            names: vec![unsafe { std::mem::zeroed() }; MAX_BATCH],
            controls: vec![[0; 8]; MAX_BATCH],
            iovecs: Vec::with_capacity(MAX_BATCH),
            // SAFETY: as above.
            headers: (0..MAX_BATCH)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
        });
        for index in 0..MAX_BATCH {
            let base = batch.slots[index].as_mut_ptr().cast();
            batch.iovecs.push(libc::iovec {
                iov_base: base,
                iov_len: SLOT_BYTES,
            });
        }
        batch
    }

    /// One recvmmsg into every slot; returns how many datagrams arrived.
    fn receive(&mut self, fd: RawFd) -> std::io::Result<usize> {
        for index in 0..MAX_BATCH {
            let header = &mut self.headers[index].msg_hdr;
            header.msg_name = (&raw mut self.names[index]).cast();
            header.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
            header.msg_iov = &raw mut self.iovecs[index];
            header.msg_iovlen = 1;
            header.msg_control = self.controls[index].as_mut_ptr().cast();
            header.msg_controllen = size_of::<ControlSlot>();
            header.msg_flags = 0;
        }
        // SAFETY: every header points into this boxed batch, which is not
        // moved or freed during the call.
        let count = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                MAX_BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(count as usize)
    }

    /// The `index`th datagram of the last receive: sender, the local address
    /// it was sent to, and its bytes. None for a truncated one, or one whose
    /// sender or destination cannot be told.
    fn message(&self, index: usize) -> Option<(Received, &[u8])> {
        let entry = &self.headers[index];
        if entry.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            debug!(
                len = entry.msg_len,
                "dropping a datagram larger than the relay carries"
            );
            return None;
        }
        let name = &self.names[index];
        let from = match i32::from(name.sin6_family) {
            libc::AF_INET6 => SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(name.sin6_addr.s6_addr),
                u16::from_be(name.sin6_port),
                0,
                name.sin6_scope_id,
            )),
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in into this slot
                // (its family says so), which is smaller than the slot and
                // no more aligned than sockaddr_in6.
                let name = unsafe { &*(&raw const *name).cast::<libc::sockaddr_in>() };
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
                    u16::from_be(name.sin_port),
                ))
            }
            _ => return None,
        };
        let mut destination = None;
        // SAFETY: the kernel filled msg_control/msg_controllen for this
        // header; the CMSG macros walk only within that buffer.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&entry.msg_hdr);
            while !cmsg.is_null() {
                let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
                if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                    let info =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                    destination = Some((
                        IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))),
                        u32::try_from(info.ipi_ifindex).unwrap_or(0),
                    ));
                } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                    let info =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>());
                    destination = Some((
                        IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                        info.ipi6_ifindex,
                    ));
                }
                cmsg = libc::CMSG_NXTHDR(&entry.msg_hdr, cmsg);
            }
        }
        let len = entry.msg_len as usize;
        let (to, ifindex) = destination?;
        Some((
            Received {
                len,
                from: canonical(from),
                to: to.to_canonical(),
                ifindex,
            },
            &self.slots[index][..len],
        ))
    }

    fn payload(&self, index: usize) -> &[u8] {
        &self.slots[index][..self.headers[index].msg_len as usize]
    }
}

/// Receive buffer of a client-facing port (a session's, the shared
/// port): every new client endpoint's first datagram queues there until
/// the daemon has made its flow. The kernel's default (about 200 kB, some
/// 300 small datagrams) overflows in a 15 ms stall of the daemon at
/// 20,000 new flows a second; this holds several thousand. Memory is taken
/// only by what actually queues, and the XDP program's slow-path limits
/// bound what may.
pub const CLIENT_FACING_RECEIVE_BUFFER: usize = 4 << 20;

impl RelaySocket {
    /// Sets the receive buffer to `bytes`: past net.core.rmem_max when the
    /// daemon may (CAP_NET_ADMIN, SO_RCVBUFFORCE), else as far as it allows.
    pub fn grow_receive_buffer(&self, bytes: usize) {
        let socket = self.fd.get_ref();
        if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err()
            && let Err(error) = setsockopt(socket, sockopt::RcvBuf, &bytes)
        {
            debug!(%error, port = self.port, "growing a receive buffer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) for one batch on `socket` and returns what it received.
    async fn receive_one(socket: &RelaySocket) -> (Received, Vec<u8>) {
        let mut got = None;
        for _ in 0..50 {
            let read = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                socket.recv_batch(|received, datagram| {
                    got.get_or_insert((*received, datagram.to_vec()));
                    None
                }),
            )
            .await;
            if let Ok(result) = read {
                result.expect("recvmmsg");
            }
            if got.is_some() {
                break;
            }
        }
        got.expect("a datagram within 5 s")
    }

    #[tokio::test]
    async fn a_client_facing_port_speaks_both_families_and_answers_from_the_address_used() {
        let facing = RelaySocket::bind_client_facing(0).unwrap();
        let port = facing.fd.get_ref().local_addr().unwrap().port();
        for (client_ip, relay_ip) in [
            (
                IpAddr::from(Ipv4Addr::LOCALHOST),
                IpAddr::from(Ipv4Addr::LOCALHOST),
            ),
            (
                IpAddr::from(Ipv6Addr::LOCALHOST),
                IpAddr::from(Ipv6Addr::LOCALHOST),
            ),
        ] {
            let client = UdpSocket::bind(SocketAddr::new(client_ip, 0)).unwrap();
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            client
                .send_to(b"hello", SocketAddr::new(relay_ip, port))
                .unwrap();
            let (received, datagram) = receive_one(&facing).await;
            assert_eq!(datagram, b"hello");
            // IPv4 arrives as itself, never as ::ffff:127.0.0.1.
            assert_eq!(received.from, client.local_addr().unwrap());
            assert_eq!(received.to, relay_ip);
            assert_eq!(received.ifindex, 1, "loopback");
            facing
                .send(b"back", received.from, Some(received.to))
                .unwrap();
            let mut buffer = [0u8; 16];
            let (len, from) = client.recv_from(&mut buffer).unwrap();
            assert_eq!(&buffer[..len], b"back");
            assert_eq!(from, SocketAddr::new(relay_ip, port));
        }
    }

    #[tokio::test]
    async fn a_flow_port_is_bound_in_one_family_at_one_address() {
        let flow = RelaySocket::bind(IpAddr::from(Ipv6Addr::LOCALHOST), 0).unwrap();
        let port = flow.fd.get_ref().local_addr().unwrap().port();
        // The IPv4 half of the port is free: IPV6_V6ONLY is on.
        let other = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        drop(other);
        let backend = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        backend
            .send_to(b"reply", (Ipv6Addr::LOCALHOST, port))
            .unwrap();
        let (received, _) = receive_one(&flow).await;
        assert_eq!(received.from, backend.local_addr().unwrap());
        assert_eq!(received.to, IpAddr::from(Ipv6Addr::LOCALHOST));
        // An IPv4 socket cannot reach an IPv6 peer: refused, not misrouted.
        let v4 = RelaySocket::bind(IpAddr::from(Ipv4Addr::LOCALHOST), 0).unwrap();
        let error = v4
            .send(b"x", backend.local_addr().unwrap(), None)
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EAFNOSUPPORT));
    }
}
