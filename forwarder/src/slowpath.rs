//! The daemon's share of forwarding: first packets of new flows, and
//! packets the XDP program handed to the stack (no neighbour yet, fragments,
//! IPv4 options). Each relay port has a task reading its socket.

use std::sync::Arc;

use tracing::warn;

use crate::datapath::socket::{CLIENT_FACING_RECEIVE_BUFFER, Outgoing, Received, RelaySocket};
use crate::sessions::{ClientVerdict, SharedRelay};

/// Reads `socket` until it is closed, sending each datagram where `route`
/// says (or nowhere).
fn spawn_reader(
    socket: Arc<RelaySocket>,
    what: &'static str,
    mut route: impl FnMut(u16, &Received, &[u8]) -> Option<Outgoing> + Send + 'static,
) {
    let reader_socket = socket.clone();
    let task = tokio::spawn(async move {
        let socket = reader_socket;
        let port = socket.port;
        loop {
            if let Err(error) = socket
                .recv_batch(|received, datagram| route(port, received, datagram))
                .await
            {
                warn!(port, %error, "reading a {what} socket");
            }
        }
    });
    socket.set_reader(task.abort_handle());
}

/// Reads a session's client-facing socket: learns new flows and forwards
/// their packets upstream.
pub fn spawn_session_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    socket.grow_receive_buffer(CLIENT_FACING_RECEIVE_BUFFER);
    spawn_reader(socket, "session", move |port, received, datagram| {
        let verdict = {
            let mut relay = relay.lock().expect("relay lock");
            if relay.is_nat_session(port) {
                Ok(relay.on_nat_client_packet(port, received.from, received.to, datagram))
            } else {
                relay.on_client_datagram(port, received.from, received.to, datagram)
            }
        };
        forward_client_verdict(&relay, port, verdict)
    });
}

/// Reads the shared port's socket: new client endpoints are matched to
/// their keyed session, then forwarded like any flow's packets.
pub fn spawn_shared_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    socket.grow_receive_buffer(CLIENT_FACING_RECEIVE_BUFFER);
    spawn_reader(socket, "shared port", move |port, received, datagram| {
        let verdict = relay.lock().expect("relay lock").on_shared_packet(
            received.from,
            received.to,
            datagram,
        );
        forward_client_verdict(&relay, port, verdict)
    });
}

/// Sends a client's datagram where the session table said, starting the
/// reader of a flow it just created.
fn forward_client_verdict(
    relay: &SharedRelay,
    port: u16,
    verdict: anyhow::Result<ClientVerdict>,
) -> Option<Outgoing> {
    {
        match verdict {
            Ok(ClientVerdict::Forward {
                socket: upstream,
                backend,
                new_flow,
            }) => {
                if new_flow {
                    spawn_flow_reader(relay.clone(), upstream.clone());
                }
                Some(Outgoing {
                    socket: upstream,
                    to: backend,
                    from: None,
                })
            }
            Ok(ClientVerdict::Drop) => None,
            Err(error) => {
                warn!(
                    port,
                    error = format!("{error:#}"),
                    "handling a client packet"
                );
                None
            }
        }
    }
}

/// Reads a flow's upstream socket: forwards what the backend sends to the
/// flow's client, and nothing that comes from anybody else.
pub fn spawn_flow_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    spawn_reader(socket, "flow", move |port, received, datagram| {
        let (session_socket, client, relay_addr) = relay
            .lock()
            .expect("relay lock")
            .on_server_packet(port, received, datagram.len())?;
        Some(Outgoing {
            socket: session_socket,
            to: client,
            from: Some(relay_addr),
        })
    });
}
