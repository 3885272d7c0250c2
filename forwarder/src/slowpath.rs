//! The daemon's share of forwarding: first packets of new flows, and
//! packets the XDP program handed to the stack (no neighbour yet, fragments,
//! IPv4 options). Each relay port has a task reading its socket.

use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::datapath::socket::{Outgoing, RelaySocket};
use crate::sessions::{ClientVerdict, Relay};

pub type SharedRelay = Arc<Mutex<Relay>>;

/// Reads a session's client-facing socket: learns new flows and forwards
/// their packets upstream.
pub fn spawn_session_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    let reader_socket = socket.clone();
    let task = tokio::spawn(async move {
        let socket = reader_socket;
        loop {
            let result = socket
                .recv_batch(|received, datagram| {
                    let verdict = relay.lock().expect("relay lock").on_client_packet(
                        socket.port,
                        received.from,
                        received.to,
                        datagram.len(),
                    );
                    match verdict {
                        Ok(ClientVerdict::Forward { socket: upstream, backend, new_flow }) => {
                            if new_flow {
                                spawn_flow_reader(relay.clone(), upstream.clone());
                            }
                            Some(Outgoing { socket: upstream, to: backend, from: None })
                        }
                        Ok(ClientVerdict::Drop) => None,
                        Err(error) => {
                            warn!(port = socket.port, error = format!("{error:#}"), "handling a client packet");
                            None
                        }
                    }
                })
                .await;
            if let Err(error) = result {
                warn!(port = socket.port, %error, "reading a session socket");
            }
        }
    });
    socket.set_reader(task.abort_handle());
}

/// Reads a flow's upstream socket: forwards what the backend sends to the
/// flow's client, and nothing that comes from anybody else.
pub fn spawn_flow_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    let reader_socket = socket.clone();
    let task = tokio::spawn(async move {
        let socket = reader_socket;
        loop {
            let result = socket
                .recv_batch(|received, datagram| {
                    let (session_socket, client, relay_addr) = relay
                        .lock()
                        .expect("relay lock")
                        .on_server_packet(socket.port, received.from, datagram.len())?;
                    Some(Outgoing { socket: session_socket, to: client, from: Some(relay_addr) })
                })
                .await;
            if let Err(error) = result {
                warn!(port = socket.port, %error, "reading a flow socket");
            }
        }
    });
    socket.set_reader(task.abort_handle());
}
