//! The relay's TCP port (`run --tcp-port`): mosh for clients whose
//! network blocks UDP. A stream's hello names a session and carries its
//! token (see `tcpwire`); its framed datagrams then go to the session's
//! own port from a loopback UDP socket of the stream's, so the session
//! table sees one more client endpoint and makes it a flow like any other
//! (limits, probation, mosh-server answering whichever flow sent the
//! newest datagram). What the session sends that socket goes back into
//! the stream. A client can therefore move between UDP and TCP in
//! mid-session and back, as it roams between addresses.
//!
//! Hostile-safe: streams are bounded in all and per session, the hello has
//! a deadline, a stream that sends nothing for the idle timeout is closed,
//! a frame's length over the limit closes the stream, and a hello that is
//! wrong in any way gets no answer: the stream is held to the hello
//! deadline and closed, exactly as one that never finished.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info};

use crate::sessions::SharedRelay;
use crate::sessions::tcp::TcpCounters;
use crate::tcpwire::{self, FrameEnd, HELLO_HEAD, MAX_DATAGRAM, TOKEN_LEN};

/// `forwarder run --tcp-port` and its limits.
#[derive(Clone, Debug)]
pub struct TcpBridgeOptions {
    pub port: u16,
    /// Streams open at once, authenticated or not.
    pub max_streams: usize,
    /// Authenticated streams one session may have at once.
    pub streams_per_session: usize,
    /// A stream's hello must arrive within this.
    pub hello_deadline: Duration,
    /// A stream without a frame from its client for this long is closed
    /// (mosh sends at least every 3 s while it runs).
    pub idle_timeout: Duration,
}

/// Binds the TCP port on every address of both families (one dual-stack
/// socket, as the UDP ports; IPv4 alone on a host without IPv6).
pub async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    let listen = |dual_stack: bool| -> std::io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let (domain, address): (Domain, SocketAddr) = if dual_stack {
            (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into())
        } else {
            (Domain::IPV4, (Ipv4Addr::UNSPECIFIED, port).into())
        };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        if dual_stack {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    };
    match listen(true) {
        Err(error) if error.raw_os_error() == Some(libc::EAFNOSUPPORT) => listen(false),
        other => other,
    }
    .with_context(|| {
        format!("listening on TCP port {port} (--tcp-port): is another program using it?")
    })
}

struct Bridge {
    relay: SharedRelay,
    options: TcpBridgeOptions,
    counters: Arc<TcpCounters>,
    /// Authenticated streams per session port.
    per_session: Mutex<HashMap<u16, usize>>,
}

/// Accepts streams until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    relay: SharedRelay,
    options: TcpBridgeOptions,
    counters: Arc<TcpCounters>,
) {
    let bridge = Arc::new(Bridge {
        relay,
        options,
        counters,
        per_session: Mutex::new(HashMap::new()),
    });
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // EMFILE and the like: the next accept may work once streams close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let counters = &bridge.counters;
        TcpCounters::bump(&counters.streams_accepted);
        if counters.streams_open.load(Ordering::Relaxed) >= bridge.options.max_streams as u64 {
            TcpCounters::bump(&counters.refused_stream_limit);
            debug!(%peer, "TCP stream refused: the relay has its limit of streams");
            continue;
        }
        TcpCounters::bump(&counters.streams_open);
        let bridge = bridge.clone();
        tokio::spawn(async move {
            bridge.handle(stream, peer).await;
            bridge.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Reads a hello: the session id and the token, or None for anything that is no hello.
async fn read_hello(stream: &mut TcpStream) -> Option<(String, [u8; TOKEN_LEN])> {
    let mut head = [0u8; HELLO_HEAD];
    stream.read_exact(&mut head).await.ok()?;
    let id_len = tcpwire::hello_id_len(&head)?;
    let mut rest = vec![0u8; id_len + TOKEN_LEN];
    stream.read_exact(&mut rest).await.ok()?;
    let id = String::from_utf8(rest[..id_len].to_vec()).ok()?;
    let token = rest[id_len..].try_into().ok()?;
    Some((id, token))
}

impl Bridge {
    async fn handle(&self, mut stream: TcpStream, peer: SocketAddr) {
        let deadline = Instant::now() + self.options.hello_deadline;
        let hello = match timeout_at(deadline, read_hello(&mut stream)).await {
            Ok(hello) => hello,
            Err(_) => {
                TcpCounters::bump(&self.counters.refused_hello_timeout);
                debug!(%peer, "TCP stream closed: no hello before the deadline");
                return;
            }
        };
        let port = hello.and_then(|(id, token)| {
            self.relay
                .lock()
                .expect("relay lock")
                .tcp_session_for(&id, &token)
        });
        let Some(port) = port else {
            TcpCounters::bump(&self.counters.refused_bad_hello);
            debug!(%peer, "TCP stream refused: its hello names no session with that token");
            // No answer, and the close comes when a silent stream's would.
            let mut sink = [0u8; 512];
            let _ = timeout_at(deadline, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            return;
        };
        let Some(_slot) = self.session_slot(port) else {
            TcpCounters::bump(&self.counters.refused_stream_limit);
            debug!(%peer, port, "TCP stream refused: the session has its limit of streams");
            return;
        };
        TcpCounters::bump(&self.counters.streams_authenticated);
        if let Err(error) = self.bridge(stream, port, peer).await {
            debug!(%peer, port, error = format!("{error:#}"), "TCP stream ended");
        }
    }

    /// Counts a stream against its session's limit while the guard lives.
    fn session_slot(&self, port: u16) -> Option<SessionSlot<'_>> {
        let mut per_session = self.per_session.lock().expect("stream count lock");
        let count = per_session.entry(port).or_default();
        if *count >= self.options.streams_per_session {
            return None;
        }
        *count += 1;
        Some(SessionSlot { bridge: self, port })
    }

    async fn bridge(&self, stream: TcpStream, port: u16, peer: SocketAddr) -> anyhow::Result<()> {
        tcpwire::tune(&stream).context("setting TCP_NODELAY and the send buffer")?;
        // The stream's client endpoint, as the session table sees it.
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        udp.connect((Ipv4Addr::LOCALHOST, port)).await?;
        info!(%peer, port, endpoint = %udp.local_addr()?, "TCP stream joined its session");
        let (mut reader, mut writer) = stream.into_split();
        let (queue, mut dequeue) = tokio::sync::broadcast::channel(tcpwire::WRITE_QUEUE);
        let counters = &self.counters;
        let to_server = async {
            let mut buf = [0u8; MAX_DATAGRAM];
            loop {
                match timeout(
                    self.options.idle_timeout,
                    tcpwire::read_frame(&mut reader, &mut buf),
                )
                .await
                {
                    Err(_) => {
                        TcpCounters::bump(&counters.closed_idle);
                        return anyhow::Ok("idle");
                    }
                    Ok(Err(FrameEnd::BadLength(len))) => {
                        TcpCounters::bump(&counters.closed_bad_frame);
                        debug!(%peer, len, "TCP stream closed: a frame of a length no mosh datagram has");
                        return Ok("bad frame");
                    }
                    Ok(Err(FrameEnd::Closed)) => return Ok("closed by the client"),
                    Ok(Ok(len)) => {
                        udp.send(&buf[..len]).await.context("the session's port")?;
                        TcpCounters::bump(&counters.datagrams_to_server);
                    }
                }
            }
        };
        let to_client = async {
            let mut buf = [0u8; 65536];
            loop {
                let len = udp.recv(&mut buf).await.context("the session's port")?;
                if len == 0 || len > MAX_DATAGRAM {
                    continue;
                }
                // Fails only while the writer has no receiver: never here.
                let _ = queue.send(Arc::<[u8]>::from(&buf[..len]));
                TcpCounters::bump(&counters.datagrams_to_client);
            }
            #[expect(
                unreachable_code,
                reason = "the loop ends only by an error; this names the block's type"
            )]
            anyhow::Ok(())
        };
        let write = tcpwire::write_frames(&mut writer, &mut dequeue, |lost| {
            counters.dropped_stale.fetch_add(lost, Ordering::Relaxed);
        });
        let why = tokio::select! {
            why = to_server => why?,
            result = to_client => { result?; "the session" }
            () = write => "the stream broke",
        };
        info!(%peer, port, why, "TCP stream closed");
        Ok(())
    }
}

struct SessionSlot<'a> {
    bridge: &'a Bridge,
    port: u16,
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        let mut per_session = self.bridge.per_session.lock().expect("stream count lock");
        if let Some(count) = per_session.get_mut(&self.port) {
            *count -= 1;
            if *count == 0 {
                per_session.remove(&self.port);
            }
        }
    }
}
