//! The session table's share of mosh over TCP (`run --tcp-port`): which
//! session a stream's hello names, the token issued with each session,
//! and the bridge's counters for the report. The streams themselves are
//! the `tcpbridge` room's; a stream's datagrams reach a session as one
//! more client endpoint (a loopback socket of the bridge's), so flows,
//! limits and mosh's roaming rule apply to them unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use forwarder_api::{TcpInfo, TcpStats};

use super::Relay;
use crate::tcpwire::TokenIssuer;

/// The relay's TCP port and the secret its tokens come from.
#[derive(Debug)]
pub struct TcpOffer {
    pub port: u16,
    issuer: TokenIssuer,
    pub counters: Arc<TcpCounters>,
}

/// Counters the bridge's tasks bump without the relay lock.
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub streams_open: AtomicU64,
    pub streams_authenticated: AtomicU64,
    pub streams_accepted: AtomicU64,
    pub refused_bad_hello: AtomicU64,
    pub refused_hello_timeout: AtomicU64,
    pub refused_stream_limit: AtomicU64,
    pub closed_bad_frame: AtomicU64,
    pub closed_idle: AtomicU64,
    pub datagrams_to_server: AtomicU64,
    pub datagrams_to_client: AtomicU64,
    pub dropped_stale: AtomicU64,
}

impl TcpCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, port: u16) -> TcpStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TcpStats {
            port,
            streams_open: get(&self.streams_open),
            streams_authenticated: get(&self.streams_authenticated),
            streams_accepted: get(&self.streams_accepted),
            refused_bad_hello: get(&self.refused_bad_hello),
            refused_hello_timeout: get(&self.refused_hello_timeout),
            refused_stream_limit: get(&self.refused_stream_limit),
            closed_bad_frame: get(&self.closed_bad_frame),
            closed_idle: get(&self.closed_idle),
            datagrams_to_server: get(&self.datagrams_to_server),
            datagrams_to_client: get(&self.datagrams_to_client),
            dropped_stale: get(&self.dropped_stale),
        }
    }
}

impl Relay {
    /// Offers every session on TCP `port` too, with tokens derived from `secret`.
    pub fn offer_tcp(&mut self, port: u16, secret: Vec<u8>) -> Arc<TcpCounters> {
        let counters = Arc::new(TcpCounters::default());
        self.tcp = Some(TcpOffer {
            port,
            issuer: TokenIssuer::new(secret),
            counters: counters.clone(),
        });
        counters
    }

    /// The TCP port, without the token: what `list` and `show` report.
    pub(super) fn tcp_port_info(&self) -> Option<TcpInfo> {
        self.tcp.as_ref().map(|offer| TcpInfo {
            port: offer.port,
            token: None,
        })
    }

    /// The TCP port and the session's token: only the reply to `add`
    /// carries it, to the caller who made the session.
    pub fn tcp_info_with_token(&self, session_port: u16) -> Option<TcpInfo> {
        let offer = self.tcp.as_ref()?;
        let session = self.sessions.get(&session_port)?;
        let token = offer
            .issuer
            .issue(&session.id, session_port, &session.backend.to_string());
        Some(TcpInfo {
            port: offer.port,
            token: Some(token.to_hex()),
        })
    }

    /// The client-facing port of the session a hello names, if its token is right.
    pub fn tcp_session_for(&self, id: &str, token: &[u8]) -> Option<u16> {
        let offer = self.tcp.as_ref()?;
        let (&port, session) = self.sessions.iter().find(|(_, s)| s.id == id)?;
        offer
            .issuer
            .verify(id, port, &session.backend.to_string(), token)
            .then_some(port)
    }

    pub(super) fn tcp_stats(&self) -> Option<TcpStats> {
        self.tcp
            .as_ref()
            .map(|offer| offer.counters.report(offer.port))
    }
}
