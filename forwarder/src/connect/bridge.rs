//! mosh-client's side of mosh over TCP: a local UDP socket on loopback
//! that mosh-client talks to, and two ways on to the bastion: UDP to the
//! session's port, or a TCP stream to the bastion's TCP port (or to an
//! ssh port forward of it) carrying the datagrams framed (`tcpwire`).
//!
//! The local socket stays while the way on changes, so mosh-client never
//! notices: the bastion sees the stream as one more flow of the session,
//! and mosh-server answers whichever flow sent the newest datagram, as
//! when a laptop roams. On UDP, a path that gives no answer for
//! [`FALLBACK_AFTER`] moves to TCP; on TCP, one of mosh-client's datagrams
//! every [`PROBE_EVERY`] goes by UDP alone, and an answer there moves back.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, timeout};

use crate::tcpwire::{self, MAX_DATAGRAM};

/// No answer over UDP for this long, while mosh-client sends: TCP.
/// mosh-server acknowledges within a fraction of a second and mosh sends
/// at least every 3 s, so a working path answers well within it.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(5);
/// On TCP, how often one datagram tries UDP instead.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A failed stream is dialled again after this.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the bridge sends, and how it starts.
#[derive(Clone, Debug)]
pub struct BridgePlan {
    pub relay_udp: SocketAddrV4,
    /// The bastion's TCP port, or an ssh forward of it.
    pub relay_tcp: SocketAddr,
    pub hello: Vec<u8>,
    /// `--tcp`: TCP from the first datagram.
    pub start_on_tcp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Udp,
    Tcp,
}

/// Starts the bridge on a thread of its own; returns the local port for
/// mosh-client. It runs until this process exits.
pub fn start(plan: BridgePlan) -> anyhow::Result<u16> {
    let local = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding the local UDP socket for mosh-client")?;
    let upstream = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .context("binding the UDP socket toward the bastion")?;
    let port = local.local_addr()?.port();
    for socket in [&local, &upstream] {
        socket.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name("tcp-bridge".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            runtime.block_on(async move {
                let local = UdpSocket::from_std(local).expect("a tokio socket");
                let upstream = UdpSocket::from_std(upstream).expect("a tokio socket");
                if let Err(error) = run(plan, local, upstream).await {
                    eprintln!("\r\nforwarder mosh: the local bridge stopped: {error:#}\r");
                }
            });
        })
        .context("starting the bridge's thread")?;
    Ok(port)
}

fn announce(what: &str) {
    // mosh-client owns the terminal: a line of its own, carriage returns included.
    eprint!("\r\nforwarder mosh: {what}\r\n");
    tracing::info!("{what}");
}

/// The bridge's state between events.
struct Bridge {
    plan: BridgePlan,
    way: Way,
    /// Where mosh-client sends from.
    client: Option<SocketAddr>,
    /// The oldest datagram sent by UDP since UDP's last answer.
    unanswered_since: Option<Instant>,
    last_probe: Instant,
    /// mosh-client's newest datagram: resent over TCP when UDP is given up.
    newest: Option<Arc<[u8]>>,
    queue: broadcast::Sender<Arc<[u8]>>,
    from_stream: mpsc::Sender<Vec<u8>>,
    link: Option<tokio::task::JoinHandle<()>>,
    last_dial: Option<Instant>,
}

impl Bridge {
    /// Gives up on UDP when it has not answered for [`FALLBACK_AFTER`].
    fn check_fallback(&mut self, now: Instant) -> bool {
        let silent = self
            .unanswered_since
            .is_some_and(|since| now - since >= FALLBACK_AFTER);
        if self.way != Way::Udp || !silent {
            return false;
        }
        self.way = Way::Tcp;
        announce(&format!(
            "no answer over UDP from {} for {}s: switching to TCP ({})",
            self.plan.relay_udp,
            FALLBACK_AFTER.as_secs(),
            self.plan.relay_tcp
        ));
        true
    }

    /// Queues a datagram for the stream, dialling it when there is none.
    fn send_by_tcp(&mut self, datagram: Arc<[u8]>, now: Instant) {
        let alive = self.link.as_ref().is_some_and(|l| !l.is_finished());
        if !alive && self.last_dial.is_none_or(|at| now - at >= REDIAL_AFTER) {
            self.last_dial = Some(now);
            self.link = Some(tokio::spawn(stream_link(
                self.plan.relay_tcp,
                self.plan.hello.clone(),
                self.queue.subscribe(),
                self.from_stream.clone(),
            )));
        }
        // No receiver while no stream could be dialled: the datagram is
        // lost, as on a lossy path; mosh resends.
        let _ = self.queue.send(datagram);
    }
}

async fn run(plan: BridgePlan, local: UdpSocket, upstream: UdpSocket) -> anyhow::Result<()> {
    let (queue, _) = broadcast::channel::<Arc<[u8]>>(tcpwire::WRITE_QUEUE);
    let (from_stream, mut from_stream_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut bridge = Bridge {
        way: if plan.start_on_tcp {
            Way::Tcp
        } else {
            Way::Udp
        },
        plan,
        client: None,
        unanswered_since: None,
        last_probe: Instant::now(),
        newest: None,
        queue,
        from_stream,
        link: None,
        last_dial: None,
    };
    let relay_udp = SocketAddr::V4(bridge.plan.relay_udp);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut local_buf = vec![0u8; 65536];
    let mut upstream_buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = local.recv_from(&mut local_buf) => {
                let (len, from) = received.context("reading mosh-client's datagrams")?;
                if len == 0 || len > MAX_DATAGRAM {
                    continue;
                }
                bridge.client = Some(from);
                let datagram: Arc<[u8]> = Arc::from(&local_buf[..len]);
                bridge.newest = Some(datagram.clone());
                let now = Instant::now();
                bridge.check_fallback(now);
                let by_udp = match bridge.way {
                    Way::Udp => true,
                    Way::Tcp if now - bridge.last_probe >= PROBE_EVERY => {
                        bridge.last_probe = now;
                        true
                    }
                    Way::Tcp => false,
                };
                if by_udp {
                    // A blocked network may refuse at once (EPERM from a
                    // firewall rule): that is no answer either.
                    let _ = upstream.send_to(&datagram, relay_udp).await;
                    bridge.unanswered_since.get_or_insert(now);
                } else {
                    bridge.send_by_tcp(datagram, now);
                }
            }
            received = upstream.recv_from(&mut upstream_buf) => {
                let Ok((len, from)) = received else { continue };
                if from != relay_udp {
                    continue;
                }
                bridge.unanswered_since = None;
                if bridge.way == Way::Tcp {
                    bridge.way = Way::Udp;
                    announce(&format!("UDP answers again: back to UDP ({relay_udp})"));
                }
                if let Some(client) = bridge.client {
                    let _ = local.send_to(&upstream_buf[..len], client).await;
                }
            }
            Some(datagram) = from_stream_rx.recv() => {
                if let Some(client) = bridge.client {
                    let _ = local.send_to(&datagram, client).await;
                }
            }
            _ = tick.tick() => {
                // mosh-client may wait seconds before it sends again: its
                // newest datagram goes over TCP as soon as UDP is given up.
                let now = Instant::now();
                if bridge.check_fallback(now)
                    && let Some(newest) = bridge.newest.clone()
                {
                    bridge.send_by_tcp(newest, now);
                }
            }
        }
    }
}

/// One stream to the bastion: the hello, then frames both ways until it breaks.
async fn stream_link(
    relay_tcp: SocketAddr,
    hello: Vec<u8>,
    mut queue: broadcast::Receiver<Arc<[u8]>>,
    from_stream: mpsc::Sender<Vec<u8>>,
) {
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(relay_tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::warn!(%relay_tcp, %error, "connecting the TCP stream");
            return;
        }
        Err(_) => {
            tracing::warn!(%relay_tcp, "connecting the TCP stream timed out");
            return;
        }
    };
    if let Err(error) = tcpwire::tune(&stream) {
        tracing::debug!(%error, "TCP_NODELAY or the send buffer");
    }
    let (mut reader, mut writer) = stream.into_split();
    use tokio::io::AsyncWriteExt;
    if writer.write_all(&hello).await.is_err() {
        return;
    }
    let read = async {
        let mut buf = [0u8; MAX_DATAGRAM];
        while let Ok(len) = tcpwire::read_frame(&mut reader, &mut buf).await {
            if from_stream.send(buf[..len].to_vec()).await.is_err() {
                return;
            }
        }
    };
    let write = tcpwire::write_frames(&mut writer, &mut queue, |lost| {
        tracing::debug!(lost, "stale datagrams dropped before the stream");
    });
    tokio::select! {
        () = read => {}
        () = write => {}
    }
    tracing::debug!(%relay_tcp, "the TCP stream ended");
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A bastion made of two loopback sockets: its UDP port stays silent
    /// until told otherwise, its TCP port takes the bridge's stream.
    #[test]
    fn falls_back_to_tcp_and_returns_to_udp_on_one_local_port() {
        let relay_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        relay_udp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let hello = tcpwire::hello("s1", &tcpwire::Token([9; tcpwire::TOKEN_LEN]));
        let SocketAddr::V4(udp_addr) = relay_udp.local_addr().unwrap() else {
            unreachable!()
        };
        let port = start(BridgePlan {
            relay_udp: udp_addr,
            relay_tcp: listener.local_addr().unwrap(),
            hello: hello.clone(),
            start_on_tcp: false,
        })
        .unwrap();
        // mosh-client: a socket connected to the bridge, so it takes
        // datagrams from that one port only.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.send(b"first").unwrap();
        let mut buf = [0u8; 256];
        let (len, _) = relay_udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"first", "UDP is tried first");

        // No answer over UDP: the bridge dials TCP and resends its newest datagram.
        let deadline = std::time::Instant::now() + FALLBACK_AFTER + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => panic!("the bridge never fell back to TCP: {error}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got_hello = vec![0u8; hello.len()];
        stream.read_exact(&mut got_hello).unwrap();
        assert_eq!(got_hello, hello);
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).unwrap();
        let mut datagram = vec![0u8; usize::from(u16::from_be_bytes(head))];
        stream.read_exact(&mut datagram).unwrap();
        assert_eq!(datagram, b"first", "the newest datagram, resent over TCP");
        stream.write_all(&tcpwire::frame(b"over tcp")).unwrap();
        let len = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"over tcp");

        // UDP answers again: one datagram every PROBE_EVERY tries it, and
        // the answer moves the bridge back.
        let mut answered = false;
        for _ in 0..20 {
            client.send(b"typing").unwrap();
            relay_udp
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            if let Ok((len, from)) = relay_udp.recv_from(&mut buf) {
                assert_eq!(&buf[..len], b"typing");
                relay_udp.send_to(b"over udp", from).unwrap();
                answered = true;
                break;
            }
        }
        assert!(answered, "no probe came over UDP");
        let len = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"over udp");
        // Back on UDP: the next datagram goes there straight away.
        client.send(b"after").unwrap();
        relay_udp
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (len, _) = relay_udp.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"after");
    }
}
