//! mosh-client's side of the ways to the bastion: a local UDP socket on
//! loopback that mosh-client talks to, and the ways on: UDP to the
//! session's port at each of the bastion's addresses (IPv4, IPv6), or a
//! TCP stream to the bastion's TCP port (or to an ssh port forward of it)
//! carrying the datagrams framed (`tcpwire`).
//!
//! The local socket stays while the way on changes, so mosh-client never
//! notices: the bastion sees each way as one more flow of the session,
//! and mosh-server answers whichever flow sent the newest datagram, as
//! when a laptop roams. mosh-client's own socket has one family for its
//! life (mosh cannot roam between families); the bridge's one upstream
//! socket is dual-stack, so it can.
//!
//! On UDP, an address that gives no answer for [`SWITCH_AFTER`] (or that
//! the network refuses at once: no route in that family any more) moves
//! to the next address; once every address had its turn and
//! [`FALLBACK_AFTER`] passed, to TCP when there is one, else round again.
//! On TCP, one of mosh-client's datagrams every [`PROBE_EVERY`] goes by
//! UDP alone, to each address in turn, and an answer there moves back.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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
/// No answer from one of the bastion's addresses for this long: the next.
pub const SWITCH_AFTER: Duration = Duration::from_secs(3);
/// On TCP, how often one datagram tries UDP instead.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A failed stream is dialled again after this.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the bridge sends, and how it starts.
#[derive(Clone, Debug)]
pub struct BridgePlan {
    /// The session's UDP port at each of the bastion's addresses, the
    /// preferred first (one family or both).
    pub relay_udp: Vec<SocketAddr>,
    /// The bastion's TCP port, or an ssh forward of it; None: UDP only.
    pub relay_tcp: Option<SocketAddr>,
    /// The TCP port is the bastion's (not a forward): each dial goes to it
    /// at the address UDP uses now, then the next, so TCP follows the
    /// family the laptop still has.
    pub tcp_follows_udp: bool,
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
    anyhow::ensure!(
        !plan.relay_udp.is_empty(),
        "the bridge needs at least one bastion address"
    );
    let local = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding the local UDP socket for mosh-client")?;
    let upstream = upstream_socket(&plan.relay_udp)?;
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

/// The socket toward the bastion: dual-stack (IPv6 with IPv4 mapped, so
/// one socket reaches both families and the loop reads one), or IPv4 alone
/// on a machine without IPv6.
fn upstream_socket(relays: &[SocketAddr]) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|socket| {
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(socket)
    });
    match dual {
        Ok(socket) => Ok(socket.into()),
        Err(error) if relays.iter().all(SocketAddr::is_ipv4) => {
            tracing::debug!(%error, "no IPv6 socket here; the bridge speaks IPv4");
            std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .context("binding the UDP socket toward the bastion")
        }
        Err(error) => Err(error).context(
            "binding a dual-stack UDP socket toward the bastion (is IPv6 disabled here? give -4)",
        ),
    }
}

/// `to` as the upstream socket sends to it: IPv4 mapped into IPv6 on a
/// dual-stack socket.
fn on_socket(to: SocketAddr, socket_is_v6: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) if socket_is_v6 => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    }
}

/// A peer as the API names it: an IPv4-mapped address is IPv4.
fn plain(from: SocketAddr) -> SocketAddr {
    SocketAddr::new(from.ip().to_canonical(), from.port())
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
    /// Which of `plan.relay_udp` UDP goes to now.
    current: usize,
    /// Addresses given up on since UDP's last answer (the current one not counted).
    given_up: usize,
    /// Where mosh-client sends from.
    client: Option<SocketAddr>,
    /// The oldest datagram sent by UDP since UDP's last answer.
    unanswered_since: Option<Instant>,
    /// The oldest datagram sent to the current address since it answered
    /// (or since the bridge moved to it).
    address_unanswered_since: Option<Instant>,
    last_probe: Instant,
    /// Where the next probe from TCP goes (an index into `plan.relay_udp`).
    next_probe: usize,
    /// mosh-client's newest datagram: resent at once on a new way.
    newest: Option<Arc<[u8]>>,
    queue: broadcast::Sender<Arc<[u8]>>,
    from_stream: mpsc::Sender<Vec<u8>>,
    link: Option<tokio::task::JoinHandle<()>>,
    last_dial: Option<Instant>,
    /// Streams dialled: a failed dial's successor tries the next address.
    dials: usize,
}

/// What a check of the current way decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moved {
    Stayed,
    /// To another of the bastion's UDP addresses.
    Address,
    Tcp,
}

impl Bridge {
    fn relay_udp(&self) -> SocketAddr {
        self.plan.relay_udp[self.current]
    }

    /// Moves on when UDP has not answered: to the next address after
    /// [`SWITCH_AFTER`] (at once when `refused`: the network has no way
    /// there), to TCP once every address had its turn and
    /// [`FALLBACK_AFTER`] passed.
    fn check_silence(&mut self, now: Instant, refused: bool) -> Moved {
        if self.way != Way::Udp {
            return Moved::Stayed;
        }
        let silent_for = |since: Option<Instant>, limit: Duration| {
            since.is_some_and(|since| now - since >= limit)
        };
        let address_silent = refused || silent_for(self.address_unanswered_since, SWITCH_AFTER);
        if !address_silent {
            return Moved::Stayed;
        }
        let count = self.plan.relay_udp.len();
        let every_address_tried = self.given_up + 1 >= count;
        if every_address_tried {
            if let Some(relay_tcp) = self.plan.relay_tcp
                && silent_for(self.unanswered_since, FALLBACK_AFTER)
            {
                self.way = Way::Tcp;
                announce(&format!(
                    "no answer over UDP from {} for {}s: switching to TCP ({relay_tcp})",
                    self.addresses(),
                    FALLBACK_AFTER.as_secs(),
                ));
                return Moved::Tcp;
            }
            if count == 1 || self.plan.relay_tcp.is_some() {
                return Moved::Stayed;
            }
            // No TCP: round again, the network may have come back.
            self.given_up = 0;
        } else {
            self.given_up += 1;
        }
        let from = self.relay_udp();
        self.current = (self.current + 1) % count;
        self.address_unanswered_since = None;
        announce(&format!(
            "no answer over UDP from {from}: trying {}",
            self.relay_udp()
        ));
        Moved::Address
    }

    fn addresses(&self) -> String {
        let all: Vec<String> = self
            .plan
            .relay_udp
            .iter()
            .map(ToString::to_string)
            .collect();
        all.join(", ")
    }

    /// An answer by UDP from `from`: the address it came from is the way.
    fn answered_by_udp(&mut self, from: SocketAddr) -> bool {
        let Some(index) = self.plan.relay_udp.iter().position(|a| *a == from) else {
            return false;
        };
        self.unanswered_since = None;
        self.address_unanswered_since = None;
        self.given_up = 0;
        if self.way == Way::Tcp {
            self.way = Way::Udp;
            self.current = index;
            announce(&format!("UDP answers again: back to UDP ({from})"));
        } else if index != self.current {
            self.current = index;
            announce(&format!("UDP answers from {from}: using it"));
        }
        true
    }

    /// Queues a datagram for the stream, dialling it when there is none.
    fn send_by_tcp(&mut self, datagram: Arc<[u8]>, now: Instant) {
        let Some(relay_tcp) = self.plan.relay_tcp else {
            return;
        };
        let alive = self.link.as_ref().is_some_and(|l| !l.is_finished());
        if !alive && self.last_dial.is_none_or(|at| now - at >= REDIAL_AFTER) {
            self.last_dial = Some(now);
            let relay_tcp = if self.plan.tcp_follows_udp {
                let count = self.plan.relay_udp.len();
                let at = self.plan.relay_udp[(self.current + self.dials) % count];
                self.dials += 1;
                SocketAddr::new(at.ip(), relay_tcp.port())
            } else {
                relay_tcp
            };
            self.link = Some(tokio::spawn(stream_link(
                relay_tcp,
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

/// Sends one datagram by UDP; whether the network refused it at once (no
/// route or no address of that family: the laptop left that network).
async fn send_by_udp(upstream: &UdpSocket, datagram: &[u8], to: SocketAddr) -> bool {
    let socket_is_v6 = upstream.local_addr().is_ok_and(|a| a.is_ipv6());
    match upstream
        .send_to(datagram, on_socket(to, socket_is_v6))
        .await
    {
        Ok(_) => false,
        Err(error) => {
            tracing::debug!(%to, %error, "sending by UDP");
            // A blocked network may refuse at once too (EPERM from a
            // firewall rule): that is no answer, not a missing route.
            use nix::errno::Errno;
            matches!(
                error.raw_os_error().map(Errno::from_raw),
                Some(
                    Errno::ENETUNREACH
                        | Errno::EHOSTUNREACH
                        | Errno::EADDRNOTAVAIL
                        | Errno::EAFNOSUPPORT
                )
            )
        }
    }
}

async fn run(plan: BridgePlan, local: UdpSocket, upstream: UdpSocket) -> anyhow::Result<()> {
    let (queue, _) = broadcast::channel::<Arc<[u8]>>(tcpwire::WRITE_QUEUE);
    let (from_stream, mut from_stream_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut bridge = Bridge {
        way: if plan.start_on_tcp && plan.relay_tcp.is_some() {
            Way::Tcp
        } else {
            Way::Udp
        },
        plan,
        current: 0,
        given_up: 0,
        client: None,
        unanswered_since: None,
        address_unanswered_since: None,
        last_probe: Instant::now(),
        next_probe: 0,
        newest: None,
        queue,
        from_stream,
        link: None,
        last_dial: None,
        dials: 0,
    };
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
                if bridge.check_silence(now, false) == Moved::Tcp {
                    bridge.send_by_tcp(datagram, now);
                    continue;
                }
                let to = match bridge.way {
                    Way::Udp => Some(bridge.relay_udp()),
                    Way::Tcp if now - bridge.last_probe >= PROBE_EVERY => {
                        bridge.last_probe = now;
                        let count = bridge.plan.relay_udp.len();
                        let to = bridge.plan.relay_udp[bridge.next_probe % count];
                        bridge.next_probe = (bridge.next_probe + 1) % count;
                        Some(to)
                    }
                    Way::Tcp => None,
                };
                let Some(to) = to else {
                    bridge.send_by_tcp(datagram, now);
                    continue;
                };
                let refused = send_by_udp(&upstream, &datagram, to).await;
                bridge.unanswered_since.get_or_insert(now);
                if bridge.way == Way::Udp {
                    bridge.address_unanswered_since.get_or_insert(now);
                    // Gone from this family's network: the next address at once.
                    if refused && bridge.check_silence(now, true) == Moved::Address {
                        let _ = send_by_udp(&upstream, &datagram, bridge.relay_udp()).await;
                        bridge.address_unanswered_since.get_or_insert(now);
                    }
                }
            }
            received = upstream.recv_from(&mut upstream_buf) => {
                let Ok((len, from)) = received else { continue };
                if !bridge.answered_by_udp(plain(from)) {
                    continue;
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
                // newest datagram goes the new way as soon as the old is given up.
                let now = Instant::now();
                let moved = bridge.check_silence(now, false);
                let Some(newest) = bridge.newest.clone() else { continue };
                match moved {
                    Moved::Tcp => bridge.send_by_tcp(newest, now),
                    Moved::Address => {
                        let _ = send_by_udp(&upstream, &newest, bridge.relay_udp()).await;
                        bridge.address_unanswered_since.get_or_insert(now);
                    }
                    Moved::Stayed => {}
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

    /// A bastion with an IPv4 address that stopped answering and an IPv6
    /// one that answers: the bridge moves to IPv6 on the same local port,
    /// without TCP, and stays there.
    #[test]
    fn moves_to_the_other_family_when_one_stops_answering() {
        let silent_v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        v6.set_read_timeout(Some(SWITCH_AFTER + Duration::from_secs(5)))
            .unwrap();
        let port = start(BridgePlan {
            relay_udp: vec![silent_v4.local_addr().unwrap(), v6.local_addr().unwrap()],
            relay_tcp: None,
            tcp_follows_udp: false,
            hello: Vec::new(),
            start_on_tcp: false,
        })
        .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.send(b"first").unwrap();
        silent_v4
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        let (len, _) = silent_v4.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"first", "the first address is tried first");
        // Silence: the newest datagram goes to the IPv6 address unprompted.
        let (len, from) = v6.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"first", "resent to the other family");
        assert!(from.is_ipv6());
        v6.send_to(b"over v6", from).unwrap();
        let len = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"over v6");
        client.send(b"typing").unwrap();
        let (len, _) = v6.recv_from(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            b"typing",
            "it stays on the family that answers"
        );
        // A datagram from elsewhere is not the bastion's: mosh-client never sees it.
        let stranger = std::net::UdpSocket::bind("[::1]:0").unwrap();
        stranger.send_to(b"forged", from).unwrap();
        v6.send_to(b"real", from).unwrap();
        let len = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"real");
    }

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
        let port = start(BridgePlan {
            relay_udp: vec![relay_udp.local_addr().unwrap()],
            relay_tcp: Some(listener.local_addr().unwrap()),
            tcp_follows_udp: false,
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
