//! The daemon's share of forwarding: first packets of new flows, and
//! packets the XDP program handed to the stack (no neighbour yet, fragments,
//! IPv4 options). Each relay port has a task reading its socket.

use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use crate::datapath::socket::RelaySocket;
use crate::sessions::{ClientVerdict, Relay};

pub type SharedRelay = Arc<Mutex<Relay>>;

const MAX_DATAGRAM: usize = 65_536;

/// Reads a session's client-facing socket: learns new flows and forwards
/// their packets upstream.
pub fn spawn_session_reader(relay: SharedRelay, socket: Arc<RelaySocket>) {
    let reader_socket = socket.clone();
    let task = tokio::spawn(async move {
        let socket = reader_socket;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = match socket.recv(&mut buf).await {
                Ok(received) => received,
                Err(error) => {
                    warn!(port = socket.port, %error, "reading a session socket");
                    continue;
                }
            };
            let verdict = relay
                .lock()
                .expect("relay lock")
                .on_client_packet(socket.port, received.from, received.to, received.len);
            match verdict {
                Ok(ClientVerdict::Forward { socket: upstream, backend, new_flow }) => {
                    if new_flow {
                        spawn_flow_reader(relay.clone(), upstream.clone());
                    }
                    if let Err(error) = upstream.send(&buf[..received.len], backend, None) {
                        debug!(%error, %backend, "sending upstream");
                    }
                }
                Ok(ClientVerdict::Drop) => {}
                Err(error) => warn!(port = socket.port, error = format!("{error:#}"), "handling a client packet"),
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
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = match socket.recv(&mut buf).await {
                Ok(received) => received,
                Err(error) => {
                    warn!(port = socket.port, %error, "reading a flow socket");
                    continue;
                }
            };
            let target = relay
                .lock()
                .expect("relay lock")
                .on_server_packet(socket.port, received.from, received.len);
            if let Some((session_socket, client, relay_addr)) = target
                && let Err(error) = session_socket.send(&buf[..received.len], client, Some(relay_addr))
            {
                debug!(%error, %client, "sending to a client");
            }
        }
    });
    socket.set_reader(task.abort_handle());
}
