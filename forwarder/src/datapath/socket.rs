//! A relay port's UDP socket: binding it reserves the port, and it carries
//! whatever the XDP program hands to the stack. IP_PKTINFO tells which relay
//! address a client used, and lets replies leave from that same address.

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use anyhow::bail;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg, setsockopt, sockopt,
};
use tokio::io::unix::AsyncFd;
use tokio::task::AbortHandle;

/// Largest datagram the relay carries (IPv4's limit: reassembled fragments included).
const MAX_DATAGRAM: usize = 65_536;

/// Datagrams read per wake-up before yielding to other sockets.
const MAX_BATCH: usize = 64;

thread_local! {
    static RECV_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

pub struct RelaySocket {
    pub port: u16,
    fd: AsyncFd<UdpSocket>,
    /// The task reading this socket (aborted when the port is given up),
    /// and whether that already happened.
    reader: Mutex<(Option<AbortHandle>, bool)>,
}

/// One received datagram: its length, who sent it and which local address it was sent to.
pub struct Received {
    pub len: usize,
    pub from: SocketAddrV4,
    pub to: Ipv4Addr,
}

impl RelaySocket {
    /// Binds `0.0.0.0:port`. Must run inside the tokio runtime.
    pub fn bind(port: u16) -> anyhow::Result<Self> {
        let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(socket) => socket,
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                bail!("UDP port {port} is in use by another program on this host: pick another port or stop that program")
            }
            Err(error) => bail!("binding UDP port {port}: {error}"),
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

    /// Waits until the socket is readable, then hands up to `MAX_BATCH`
    /// queued datagrams to `handle`. The receive buffer is per thread, not
    /// per socket: a relay with tens of thousands of flow sockets would
    /// otherwise hold a 64 KiB buffer for each.
    pub async fn recv_batch(&self, mut handle: impl FnMut(Received, &[u8])) -> std::io::Result<()> {
        let mut guard = self.fd.readable().await?;
        RECV_BUFFER.with_borrow_mut(|buf| {
            for _ in 0..MAX_BATCH {
                match guard.try_io(|socket| recv_pktinfo(socket.get_ref(), buf)) {
                    Ok(Ok(Some(received))) => {
                        let len = received.len.min(buf.len());
                        handle(received, &buf[..len]);
                    }
                    // Not IPv4 or no address: nothing we can answer.
                    Ok(Ok(None)) => {}
                    Ok(Err(error)) => return Err(error),
                    // Drained: readiness is cleared, wait for the next wake-up.
                    Err(_would_block) => return Ok(()),
                }
            }
            Ok(())
        })
    }

    /// Sends `data` to `to`, from the local address `from` (None: let the route choose).
    /// A full socket buffer drops the datagram, as a router would.
    pub fn send(&self, data: &[u8], to: SocketAddrV4, from: Option<Ipv4Addr>) -> std::io::Result<()> {
        let info = from.map(|from| libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr { s_addr: u32::from(from).to_be() },
            ipi_addr: libc::in_addr { s_addr: 0 },
        });
        let control: Vec<ControlMessage> = info.iter().map(ControlMessage::Ipv4PacketInfo).collect();
        let destination = SockaddrIn::from(to);
        match sendmsg(
            self.fd.get_ref().as_raw_fd(),
            &[IoSlice::new(data)],
            &control,
            MsgFlags::MSG_DONTWAIT,
            Some(&destination),
        ) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(errno) => Err(errno.into()),
        }
    }
}

fn recv_pktinfo(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Option<Received>> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!(libc::in_pktinfo);
    let message = recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_DONTWAIT)
        .map_err(std::io::Error::from)?;
    let mut to = None;
    for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::Ipv4PacketInfo(info) = cmsg {
            to = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
        }
    }
    let (Some(from), Some(to)) = (message.address, to) else {
        return Ok(None);
    };
    Ok(Some(Received {
        len: message.bytes,
        from: SocketAddrV4::new(from.ip(), from.port()),
        to,
    }))
}
