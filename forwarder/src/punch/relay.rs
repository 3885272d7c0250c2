//! The relay's end of the punch handshake: a socket on the punch port for
//! Allocate and Key, readers on each NAT session's Q for Bind and the
//! server's packets, and the keepalives that hold the NAT mappings open.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::wire::{self as punch, Authority, Message, RefusalReason, Secret, Verdict};
use crate::datapath::socket::{Outgoing, Received, RelaySocket};
use crate::datapath::xdp::{self, BackendRoute};
use crate::mosh::MoshKey;
use crate::sessions::SharedRelay;
use crate::sessions::monotonic_ns;
use crate::slowpath::spawn_session_reader;

/// `forwarder run --punch-port ...`.
#[derive(Clone, Debug)]
pub struct PunchOptions {
    pub port: u16,
    pub secret: Secret,
    /// The address clients must use, when not the one servers reach
    /// (either family: it is what the wrapper prints as `MOSH IP`).
    pub public_addr: Option<IpAddr>,
    /// Send a keepalive to a NAT'd server after this long without a packet from it.
    pub keepalive: Duration,
}

type SharedAuthority = Arc<Mutex<Authority>>;

/// Binds the punch port (so a taken port fails the start) and returns the
/// service: the handshake on that port and the keepalives, run as one task
/// by the daemon. Readers on the upstream sockets of punched sessions a
/// restart restored start with it.
pub fn service(
    relay: SharedRelay,
    options: PunchOptions,
    restored_upstreams: Vec<Arc<RelaySocket>>,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let socket = Arc::new(RelaySocket::bind_client_facing(options.port)?);
    let authority: SharedAuthority = Arc::new(Mutex::new(Authority::new(options.secret.clone())));
    info!(port = options.port, public_addr = ?options.public_addr, keepalive = ?options.keepalive, "punch handshake enabled");
    Ok(async move {
        for upstream in restored_upstreams {
            spawn_upstream_reader(relay.clone(), authority.clone(), upstream);
        }
        tokio::join!(
            serve(relay.clone(), authority, socket, options.public_addr),
            keepalive_forever(relay, options.keepalive)
        );
    })
}

async fn route(ip: IpAddr) -> anyhow::Result<BackendRoute> {
    tokio::task::spawn_blocking(move || xdp::route_to(ip)).await?
}

/// Judges a datagram; refusals are logged with their reason and answered.
fn judge(
    authority: &SharedAuthority,
    socket: &RelaySocket,
    data: &[u8],
    received: &Received,
) -> Option<punch::Envelope> {
    let verdict = authority.lock().expect("authority lock").check(
        data,
        received.from.ip(),
        punch::unix_now(),
        monotonic_ns(),
    );
    match verdict {
        Verdict::Accept(envelope) => Some(envelope),
        Verdict::Garbage => {
            debug!(from = %received.from, port = socket.port, "not a punch message; dropped");
            None
        }
        Verdict::RateLimited => {
            debug!(from = %received.from, "punch request over the rate limit; dropped");
            None
        }
        Verdict::Refuse(request, reason) => {
            warn!(from = %received.from, port = socket.port, %reason, "punch request refused");
            refuse(socket, received, request, reason);
            None
        }
    }
}

fn refuse(socket: &RelaySocket, received: &Received, request: punch::Nonce, reason: RefusalReason) {
    let _ = socket.send(
        &punch::refusal(request, reason),
        received.from,
        Some(received.to),
    );
}

async fn serve(
    relay: SharedRelay,
    authority: SharedAuthority,
    socket: Arc<RelaySocket>,
    public_addr: Option<IpAddr>,
) {
    loop {
        for (received, datagram) in receive(&socket, "the punch socket").await {
            handle_request(
                &relay,
                &authority,
                &socket,
                public_addr,
                &received,
                &datagram,
            )
            .await;
        }
    }
}

/// The datagrams of one batch, copied out: handling them may wait (route
/// lookups), which the batch receiver's callback must not.
async fn receive(socket: &RelaySocket, what: &str) -> Vec<(Received, Vec<u8>)> {
    let mut datagrams = Vec::new();
    let result = socket
        .recv_batch(|received, datagram| {
            datagrams.push((*received, datagram.to_vec()));
            None
        })
        .await;
    if let Err(error) = result {
        warn!(port = socket.port, %error, "reading {what}");
    }
    datagrams
}

async fn handle_request(
    relay: &SharedRelay,
    authority: &SharedAuthority,
    socket: &RelaySocket,
    public_addr: Option<IpAddr>,
    received: &Received,
    datagram: &[u8],
) {
    let Some(envelope) = judge(authority, socket, datagram, received) else {
        return;
    };
    let reply = match envelope.message {
        Message::Allocate => {
            allocate(relay, authority, received, public_addr, envelope.nonce).await
        }
        Message::Key {
            token,
            client_port,
            key,
        } => {
            let accepted = relay.lock().expect("relay lock").set_nat_key(
                client_port,
                &token,
                MoshKey::from_bytes(key),
            );
            if accepted {
                Ok(Message::KeyAccepted {
                    request: envelope.nonce,
                })
            } else {
                warn!(from = %received.from, client_port, "punch key refused: no NAT session with that port and token");
                Err(RefusalReason::UnknownSession)
            }
        }
        other => {
            debug!(from = %received.from, ?other, "unexpected message on the punch port");
            Err(RefusalReason::Malformed)
        }
    };
    match reply {
        Ok(message) => {
            let bytes = authority.lock().expect("authority lock").reply(&message);
            if let Err(error) = socket.send(&bytes, received.from, Some(received.to)) {
                debug!(%error, to = %received.from, "answering a punch request");
            }
        }
        Err(reason) => refuse(socket, received, envelope.nonce, reason),
    }
}

async fn allocate(
    relay: &SharedRelay,
    authority: &SharedAuthority,
    received: &Received,
    public_addr: Option<IpAddr>,
    request: punch::Nonce,
) -> Result<Message, RefusalReason> {
    let route = route(received.from.ip()).await.map_err(|error| {
        warn!(from = %received.from, error = format!("{error:#}"), "punch request refused: no route back");
        RefusalReason::NoCapacity
    })?;
    let allocation = relay
        .lock()
        .expect("relay lock")
        .allocate_nat_session(received.from, route)
        .map_err(|error| {
            warn!(from = %received.from, error = format!("{error:#}"), "punch request refused");
            RefusalReason::NoCapacity
        })?;
    if let Some((session_socket, upstream)) = allocation.new_sockets {
        spawn_session_reader(relay.clone(), session_socket);
        spawn_upstream_reader(relay.clone(), authority.clone(), upstream);
    }
    Ok(Message::Allocated {
        request,
        relay_addr: public_addr.unwrap_or(received.to),
        client_port: allocation.client_port,
        upstream_port: allocation.upstream_port,
        token: allocation.token,
    })
}

/// Reads a NAT session's Q: Bind punches from the server, and the server's
/// packets the XDP program left to the stack.
fn spawn_upstream_reader(relay: SharedRelay, authority: SharedAuthority, socket: Arc<RelaySocket>) {
    let reader_socket = socket.clone();
    let task = tokio::spawn(async move {
        let socket = reader_socket;
        loop {
            let mut punches = Vec::new();
            let result = socket
                .recv_batch(|received, datagram| {
                    if punch::looks_like_punch(datagram) {
                        punches.push((*received, datagram.to_vec()));
                        return None;
                    }
                    let (session_socket, client, relay_addr) = relay
                        .lock()
                        .expect("relay lock")
                        .on_nat_server_packet(socket.port, received, datagram)?;
                    Some(Outgoing {
                        socket: session_socket,
                        to: client,
                        from: Some(relay_addr),
                    })
                })
                .await;
            if let Err(error) = result {
                warn!(port = socket.port, %error, "reading a NAT session's upstream socket");
            }
            for (received, datagram) in punches {
                bind(&relay, &authority, &socket, &datagram, &received).await;
            }
        }
    });
    socket.set_reader(task.abort_handle());
}

async fn bind(
    relay: &SharedRelay,
    authority: &SharedAuthority,
    socket: &RelaySocket,
    data: &[u8],
    received: &Received,
) {
    let Some(envelope) = judge(authority, socket, data, received) else {
        return;
    };
    let Message::Bind { token } = envelope.message else {
        refuse(socket, received, envelope.nonce, RefusalReason::Malformed);
        return;
    };
    let route = match route(received.from.ip()).await {
        Ok(route) => route,
        Err(error) => {
            warn!(from = %received.from, error = format!("{error:#}"), "punch bind refused: no route back");
            return;
        }
    };
    let bound = relay.lock().expect("relay lock").bind_nat_session(
        socket.port,
        &token,
        received.from,
        route,
    );
    if bound.is_none() {
        warn!(from = %received.from, port = socket.port, "punch bind refused: wrong token for this port");
        refuse(
            socket,
            received,
            envelope.nonce,
            RefusalReason::UnknownSession,
        );
        return;
    }
    let seen = received.from;
    let bytes = authority
        .lock()
        .expect("authority lock")
        .reply(&Message::Bound {
            request: envelope.nonce,
            seen,
        });
    if let Err(error) = socket.send(&bytes, received.from, Some(received.to)) {
        debug!(%error, to = %received.from, "answering a bind");
    }
}

/// A keepalive: one byte, which mosh-server cannot decrypt and drops.
const KEEPALIVE: &[u8] = &[0];

async fn keepalive_forever(relay: SharedRelay, interval: Duration) {
    let mut tick = tokio::time::interval((interval / 4).max(Duration::from_millis(250)));
    loop {
        tick.tick().await;
        let due = {
            let mut relay = relay.lock().expect("relay lock");
            // The same tick writes punched sessions' newest sequence
            // numbers to the store (rate limited there).
            relay.store_nat_progress();
            relay.nat_keepalives_due(interval)
        };
        for (socket, server) in due {
            if let Err(error) = socket.send(KEEPALIVE, server, None) {
                debug!(%error, %server, "sending a NAT keepalive");
            }
        }
    }
}
