//! A relay port's UDP socket: binding it reserves the port, and it carries
//! whatever the XDP program hands to the stack. IP_PKTINFO tells which relay
//! address a client used, and lets replies leave from that same address.

use std::io::IoSlice;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use anyhow::bail;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg, setsockopt, sockopt,
};
use tokio::io::unix::AsyncFd;
use tokio::task::AbortHandle;
use tracing::debug;

/// Bytes per receive slot. mosh datagrams stay under 1.3 kB; anything that
/// does not fit is truncated by the kernel, and dropped here rather than
/// forwarded damaged.
const SLOT_BYTES: usize = 4096;

/// Datagrams moved per system call (recvmmsg/sendmmsg) and per wake-up.
const MAX_BATCH: usize = 64;

/// Control-message room for one IP_PKTINFO (CMSG_SPACE(12) is 32 on Linux).
type ControlSlot = [u64; 8];

thread_local! {
    /// One batch of receive buffers per worker thread, not per socket: a
    /// relay with tens of thousands of flow sockets would otherwise hold a
    /// buffer for each.
    static RECV_BATCH: std::cell::RefCell<Box<RecvBatch>> = std::cell::RefCell::new(RecvBatch::new());
}

pub struct RelaySocket {
    pub port: u16,
    fd: AsyncFd<UdpSocket>,
    /// The task reading this socket (aborted when the port is given up),
    /// and whether that already happened.
    reader: Mutex<(Option<AbortHandle>, bool)>,
}

/// One received datagram: its length, who sent it, which local address it
/// was sent to and the interface it arrived on (both from IP_PKTINFO): what
/// the relay's "only the server reaches a client" rule is judged on.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddrV4,
    pub to: Ipv4Addr,
    pub ifindex: u32,
}

impl RelaySocket {
    /// Binds `address:port`: `0.0.0.0` for ports clients reach on any relay
    /// address, the backend-side address for a flow's port, so the kernel
    /// itself refuses datagrams sent to that port at any other address.
    /// Must run inside the tokio runtime.
    pub fn bind(address: Ipv4Addr, port: u16) -> anyhow::Result<Self> {
        let socket = match UdpSocket::bind((address, port)) {
            Ok(socket) => socket,
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                bail!(
                    "UDP port {port} is in use by another program on this host: pick another port or stop that program"
                )
            }
            Err(error) => bail!("binding UDP port {address}:{port}: {error}"),
        };
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        // SAFETY: the socket moves into the AsyncFd, which owns it, so its fd
        // stays open and unshared for as long as it is registered.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(std::io::Error::from)?;
        Ok(Self {
            port,
            fd,
            reader: Mutex::new((None, false)),
        })
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
                let messages: Vec<(SocketAddrV4, Option<Ipv4Addr>, &[u8])> = outbox[start..end]
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
        messages: &[(SocketAddrV4, Option<Ipv4Addr>, &[u8])],
    ) -> std::io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        for run in messages.chunk_by(|a, b| a.1 == b.1) {
            for chunk in run.chunks(MAX_BATCH) {
                let addresses: Vec<Option<SockaddrIn>> = chunk
                    .iter()
                    .map(|(to, _, _)| Some(SockaddrIn::from(*to)))
                    .collect();
                let slices: Vec<[IoSlice<'_>; 1]> = chunk
                    .iter()
                    .map(|(_, _, data)| [IoSlice::new(data)])
                    .collect();
                let pktinfo = chunk[0].1.map(|from| libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(from).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                });
                let controls: Vec<ControlMessage<'_>> =
                    pktinfo.iter().map(ControlMessage::Ipv4PacketInfo).collect();
                // Control room only when a source is set: an empty buffer
                // that claims a length is refused by the kernel.
                let mut headers = MultiHeaders::<SockaddrIn>::preallocate(
                    chunk.len(),
                    pktinfo.map(|_| nix::cmsg_space!(libc::in_pktinfo)),
                );
                match sendmmsg(
                    fd,
                    &mut headers,
                    &slices,
                    &addresses,
                    &controls,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    /// Sends one datagram (see [`Self::send_many`]).
    pub fn send(
        &self,
        data: &[u8],
        to: SocketAddrV4,
        from: Option<Ipv4Addr>,
    ) -> std::io::Result<()> {
        self.send_many(&[(to, from, data)])
    }
}

/// Where a received datagram goes: out of `socket`, to `to`, from the local
/// address `from` (None: the route chooses).
pub struct Outgoing {
    pub socket: Arc<RelaySocket>,
    pub to: SocketAddrV4,
    pub from: Option<Ipv4Addr>,
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
    names: Vec<libc::sockaddr_in>,
    controls: Vec<ControlSlot>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new() -> Box<Self> {
        let mut batch = Box::new(Self {
            slots: vec![[0; SLOT_BYTES]; MAX_BATCH],
            // SAFETY: sockaddr_in and mmsghdr are plain C data; zero is valid.
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
            header.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
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
    /// it was sent to, and its bytes. None for a truncated or non-IPv4 one.
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
        if i32::from(name.sin_family) != libc::AF_INET {
            return None;
        }
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        );
        let mut destination = None;
        // SAFETY: the kernel filled msg_control/msg_controllen for this
        // header; the CMSG macros walk only within that buffer.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&entry.msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let info =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>());
                    destination = Some((
                        Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)),
                        u32::try_from(info.ipi_ifindex).unwrap_or(0),
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
                from,
                to,
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
