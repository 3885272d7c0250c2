//! The control API of forwarder: the requests and replies of the control
//! socket (one JSON document per line), the JSON views that `list`, `show`
//! and `stats` print, where the socket lives, and the parsing of the
//! addresses a request carries. It depends on nothing of the daemon: the
//! CLI, the daemon and the test bed all use these definitions.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::bail;

use serde::{Deserialize, Serialize};

/// Where the control socket of `instance` lives.
pub fn socket_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/forwarder/{instance}.sock"))
}

/// Parses a backend given on the command line or the control socket:
/// `192.0.2.1:60001`, or an IPv6 address in brackets, `[2001:db8::1]:60001`
/// (as `SocketAddr` prints it). A bare IPv6 address is refused: its last
/// group cannot be told from a port.
pub fn parse_backend(text: &str) -> anyhow::Result<SocketAddr> {
    const FORMS: &str = "IPV4:PORT or [IPV6]:PORT, e.g. 10.0.2.2:60001 or [2001:db8::2]:60001";
    let text = text.trim();
    if text.parse::<Ipv6Addr>().is_ok() {
        // `2001:db8::1:6000` is an address on its own, or one with a port.
        if let Some((host, port)) = text.rsplit_once(':')
            && host.parse::<Ipv6Addr>().is_ok()
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
        {
            bail!(
                "backend {text:?} is an IPv6 address without brackets, which cannot be told from a port: \
                 write [{host}]:{port} if {port} is the port, or [{text}]:PORT if it is all address"
            );
        }
        bail!(
            "backend {text:?} is an IPv6 address without a port: write it in brackets with the port \
             mosh-server listens on, e.g. [{text}]:60001"
        );
    }
    if !text.starts_with('[') && text.matches(':').count() > 1 {
        let (host, port) = text.rsplit_once(':').expect("has colons");
        if host.parse::<Ipv6Addr>().is_ok() {
            bail!(
                "backend {text:?} is an IPv6 address without brackets, which cannot be told from its \
                 port: write [{host}]:{port}"
            );
        }
        bail!("malformed backend address {text:?}: expected {FORMS}");
    }
    let (ip, port): (IpAddr, &str) = if let Some(bracketed) = text.strip_prefix('[') {
        let Some((inner, rest)) = bracketed.split_once(']') else {
            bail!(
                "malformed backend address {text:?}: the bracket is not closed; expected {FORMS}"
            );
        };
        let Some(port) = rest.strip_prefix(':') else {
            bail!(
                "backend {text:?} has no port: give the port mosh-server listens on after the bracket, \
                 e.g. [{inner}]:60001"
            );
        };
        match inner.parse::<Ipv6Addr>() {
            Ok(ip) => (IpAddr::V6(ip), port),
            Err(_) if inner.contains('%') => bail!(
                "backend {text:?} carries a zone (%interface): link-local backends are not supported; \
                 give the server's global or unique local IPv6 address"
            ),
            Err(_) => bail!(
                "malformed backend address {text:?}: {inner:?} in brackets is not an IPv6 address \
                 (IPv4 addresses go without brackets); expected {FORMS}"
            ),
        }
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            bail!("malformed backend address {text:?}: expected {FORMS}");
        };
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => (IpAddr::V4(ip), port),
            Err(_) if host.chars().any(|c| c.is_ascii_alphabetic()) => bail!(
                "backend {text:?} names a host: host names are not supported yet; give the server's IPv4 or \
                 IPv6 address ({FORMS})"
            ),
            Err(_) => bail!("malformed backend address {text:?}: expected {FORMS}"),
        }
    };
    let port: u16 = match port.parse::<u64>() {
        Ok(port) if port > u64::from(u16::MAX) => {
            bail!("backend {text:?}: port {port} is out of range (1-65535)")
        }
        Ok(port) => u16::try_from(port).expect("checked above"),
        Err(_) => {
            bail!("malformed backend address {text:?}: expected {FORMS}, with a numeric port")
        }
    };
    if port == 0 {
        bail!(
            "backend {text:?} has port 0: give the port mosh-server listens on (MOSH CONNECT <port>)"
        );
    }
    match ip {
        IpAddr::V4(ip) => {
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
                bail!(
                    "backend {text:?} is not a unicast address: give the mosh server's IPv4 address"
                );
            }
        }
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                bail!(
                    "backend {text:?} is an IPv4-mapped IPv6 address: give the IPv4 address itself, {}",
                    SocketAddr::from((v4, port))
                );
            }
            if ip.is_unspecified() || ip.is_multicast() {
                bail!(
                    "backend {text:?} is not a unicast address: give the mosh server's IPv6 address"
                );
            }
            if ip.is_unicast_link_local() {
                bail!(
                    "backend {text:?} is link-local (fe80::/10), which needs an interface to mean anything: \
                     give the server's global or unique local IPv6 address"
                );
            }
        }
    }
    if ip.is_loopback() {
        bail!(
            "backend {text:?} is a loopback address: the relay would forward to itself; give the server's address"
        );
    }
    Ok(SocketAddr::new(ip, port))
}

/// Largest request line the daemon reads; anything longer is refused.
/// One connection may carry many lines (pipelining): each is answered
/// with one reply line, in order.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Add {
        backend: String,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        idle_timeout_secs: Option<u64>,
        /// mosh's session key (the 22 base64 characters of `MOSH CONNECT
        /// <port> <key>`): the session is then reachable on the relay's
        /// shared port too. Kept sealed by the daemon, never shown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// Many adds in one request: one reply ([`Reply::AddedMany`]) with a
    /// result per item, in order. An item that fails leaves the others be.
    AddMany {
        sessions: Vec<NewSession>,
    },
    Remove {
        /// A session id or its client-facing port.
        target: String,
    },
    List {},
    /// Everything about one session, by id or client-facing port.
    Show {
        target: String,
    },
    Stats {},
}

/// Most sessions one [`Request::AddMany`] may carry: a batch is one
/// relay-lock hold and one store transaction, kept short for the other
/// callers and the slow path.
pub const MAX_BATCH_SESSIONS: usize = 1000;

/// One session to add, as [`Request::Add`] takes it: an item of
/// [`Request::AddMany`], and one line of `forwarder add --from-file` in its
/// JSON form.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// mosh's session key, as in [`Request::Add`]; never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The outcome of one item of [`Request::AddMany`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AddResult {
    /// Boxed: a session is large, an error small.
    Session(Box<SessionInfo>),
    /// What went wrong with this item and how to fix it.
    Error(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Session(SessionInfo),
    /// The results of [`Request::AddMany`], one per item, in order.
    AddedMany(Vec<AddResult>),
    Sessions(Vec<SessionInfo>),
    Removed(SessionInfo),
    /// Boxed: the report is large, and every other reply small.
    Stats(Box<StatsInfo>),
    Error(String),
    /// The session a request named does not exist (its own exit code).
    NotFound(String),
    /// The caller may not do this (another user's session, a root-only
    /// verb): its own exit code, as for the socket's file permissions.
    PermissionDenied(String),
}

/// Version of the `--json` documents the CLI prints: every one is an object
/// `{"schema_version": N, "<what>": ...}`, as `nft -j` carries its schema
/// version, so scripts can tell a format change from a bug.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// Exit codes of the CLI, for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitStatus {
    Ok = 0,
    /// Anything else that went wrong; the message says what and how to fix it.
    Error = 1,
    /// The command line itself is wrong (clap's own code).
    Usage = 2,
    /// The session (or other thing) named does not exist.
    NotFound = 3,
    /// No daemon answers on the instance's control socket.
    DaemonNotRunning = 4,
    /// The control socket (or another file) may not be used by this user.
    PermissionDenied = 5,
}

/// The `error` of a `--json` error document
/// (`{"schema_version": 1, "error": {...}}`), printed instead of the verb's
/// own document when it fails.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorInfo {
    /// [`ExitStatus::name`] of the exit status.
    pub kind: String,
    pub exit_code: u8,
    /// What went wrong and how to fix it.
    pub message: String,
}

impl ExitStatus {
    /// Its name in a `--json` error document.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Usage => "usage",
            Self::NotFound => "not_found",
            Self::DaemonNotRunning => "daemon_not_running",
            Self::PermissionDenied => "permission_denied",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    /// The client-facing port: what mosh-client is given.
    pub port: u16,
    pub backend: String,
    /// The relay's addresses on its interfaces, for the client's command line.
    pub relay_addresses: Vec<String>,
    pub idle_timeout_secs: u64,
    /// Milliseconds since the newest packet (integer, unit in the name).
    pub idle_ms: u64,
    pub flows: Vec<FlowInfo>,
    /// Set for a server behind NAT that came through the punch handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatInfo>,
    /// Whether the relay holds the session's mosh key (`add --key-file`);
    /// the key itself is never shown.
    #[serde(default)]
    pub has_key: bool,
    /// The relay's shared port, where this keyed session is reachable as
    /// well as on `port`; absent for keyless sessions or without `--shared-port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_port: Option<u16>,
    /// Who created it (the caller's uid on the control socket); root for
    /// sessions of daemons that did not record owners.
    #[serde(default)]
    pub owner: OwnerInfo,
    /// In a cluster (`run --etcd`): every live relay that has the session
    /// programmed, with the flows its clients have there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<SessionHolder>,
    /// The relay's TCP port for this session (`run --tcp-port`), for
    /// networks that block UDP; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpInfo>,
}

/// How a session is reached over TCP (`forwarder mosh --tcp`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpInfo {
    pub port: u16,
    /// The session's authentication token (hex), only in the reply to
    /// `add`: the stream's hello must carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The TCP bridge's counters (`run --tcp-port`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpStats {
    pub port: u16,
    /// Streams open now, and authenticated streams among them.
    pub streams_open: u64,
    pub streams_authenticated: u64,
    pub streams_accepted: u64,
    /// Hellos with a wrong magic, version, session or token: held until
    /// the hello deadline and closed, nothing forwarded.
    pub refused_bad_hello: u64,
    /// Streams that did not finish their hello before the deadline.
    pub refused_hello_timeout: u64,
    /// Streams refused because the relay or the session had its limit of streams.
    pub refused_stream_limit: u64,
    /// Streams closed for a frame longer than the limit (or empty).
    pub closed_bad_frame: u64,
    /// Streams closed after the idle timeout without a frame from the client.
    pub closed_idle: u64,
    pub datagrams_to_server: u64,
    pub datagrams_to_client: u64,
    /// Datagrams for the client dropped because the stream's writer was
    /// backed up (fresh beats complete: mosh resends its state).
    pub dropped_stale: u64,
}

/// A session's owner: the uid, and its user name (the uid in decimal when
/// the relay's user database has no name for it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerInfo {
    pub uid: u32,
    pub name: String,
}

impl Default for OwnerInfo {
    fn default() -> Self {
        Self {
            uid: 0,
            name: "root".into(),
        }
    }
}

/// One relay's share of a session shared through etcd.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionHolder {
    pub relay: String,
    pub flows: u64,
}

/// A relay's part in a cluster that shares sessions through etcd.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    /// This relay's name in the cluster (`--relay-name`).
    pub relay: String,
    /// The etcd endpoints, as given.
    pub etcd: Vec<String>,
    /// Whether etcd answers: while it does not, the relay keeps forwarding
    /// what it has and refuses `add` and `remove`.
    pub etcd_connected: bool,
    /// Why etcd does not answer (the last error), while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_error: Option<String>,
    /// Sessions etcd holds, as this relay last saw them.
    pub shared_sessions: u64,
    /// The relays that hold a lease now, this one included, by name.
    pub relays: Vec<RelayPresence>,
    /// Sessions etcd holds that this relay cannot program, by port, with
    /// why (e.g. a sealed key it cannot open); retried every second.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<u16, String>,
}

/// What one live relay publishes under its lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayPresence {
    pub relay: String,
    /// Its interface addresses.
    pub addresses: Vec<String>,
    /// The sessions it has programmed, by client-facing port.
    pub sessions: BTreeMap<u16, HeldSession>,
}

/// A session as one relay holds it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldSession {
    pub flows: u64,
    /// Milliseconds since its newest packet through this relay.
    pub idle_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NatInfo {
    /// The session's one backend-facing port, where the server punched to.
    pub upstream_port: u16,
    /// Whether the server's Bind arrived (the backend is its NAT's endpoint for Q).
    pub bound: bool,
    /// Whether the wrapper handed over the session key (clients are accepted only then).
    pub key_received: bool,
    /// Packets from other client endpoints that failed mosh's rule and were dropped.
    pub rejected_packets: u64,
    /// Datagrams from unknown server endpoints (a NAT rebind, or a forger)
    /// that did not verify as newer server datagrams and were dropped.
    #[serde(default)]
    pub rejected_server_packets: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FlowInfo {
    pub client: String,
    /// The relay address the client sends to.
    pub relay_addr: String,
    /// The port the client sends to when it is not the session's own: the
    /// shared port (the flow was matched to the session by its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_port: Option<u16>,
    /// The backend-facing port (Q) this flow's packets leave from.
    pub upstream_port: u16,
    pub packets_to_server: u64,
    pub bytes_to_server: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    /// Packets the XDP program forwarded (both directions).
    pub fast_path_packets: u64,
    /// Packets the daemon forwarded through its sockets (both directions).
    pub slow_path_packets: u64,
    /// Milliseconds since the newest packet (integer, unit in the name).
    pub idle_ms: u64,
    /// Whether mosh-server currently sends to this flow (it answered it last).
    pub server_current: bool,
    /// The server has answered this flow: it counts against the session's
    /// limits. Unanswered flows are on probation and may be evicted.
    #[serde(default)]
    pub answered: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PacketsBytes {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsInfo {
    pub instance: String,
    /// The datapath in use: "native", "skb", "native+skb" or "userspace".
    pub datapath: String,
    pub interfaces: Vec<String>,
    pub sessions: usize,
    pub flows: usize,
    pub verdicts: BTreeMap<String, u64>,
    pub reasons: BTreeMap<String, PacketsBytes>,
    /// Packets the daemon handled itself: first packets and fib-miss fallbacks.
    pub slow_path: SlowPathStats,
    /// Capacity of the relay and fill of its pinned maps.
    #[serde(default)]
    pub capacity: CapacityInfo,
    /// Open files: every session and flow holds a socket.
    #[serde(default)]
    pub descriptors: DescriptorInfo,
    /// Conditions in which packets are lost or slowed without a counter
    /// saying so (a veth peer that cannot take redirects, an interface
    /// down, forwarding disabled), each with its fix.
    #[serde(default)]
    pub warnings: Vec<Warning>,
    /// Set when the relay shares its sessions through etcd (`run --etcd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterInfo>,
    /// The TCP bridge, when the relay runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpStats>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DescriptorInfo {
    pub open: u64,
    /// The soft RLIMIT_NOFILE.
    pub limit: u64,
    /// Kept free for the control socket, metrics and restarts: new flows stop at limit - reserve.
    pub reserve: u64,
    /// New flows refused because the budget was spent.
    pub refused_flows: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// Stable name for scripts and alerts: veth_peer_drops, interface_down, forwarding_disabled, ...
    pub kind: String,
    pub interface: String,
    /// What happens and how to fix it.
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CapacityInfo {
    pub max_sessions: usize,
    /// Capacity of each IPv4 flow map (`--max-flows`).
    pub max_flows: u32,
    /// Capacity of each IPv6 and translated flow map (`--max-flows6`);
    /// 0 from a daemon older than the knob.
    #[serde(default)]
    pub max_flows6: u32,
    pub max_flows_per_session: usize,
    pub maps: Vec<MapFill>,
    /// Kernel memory of all six flow maps (IPv4, IPv6 and translated, both
    /// halves) divided by the IPv4 flows they can hold (`max_flows`).
    pub kernel_bytes_per_flow: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MapFill {
    pub name: String,
    /// Entries in use; absent for arrays, which are always full.
    pub entries: Option<usize>,
    pub max_entries: u32,
    pub memlock_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SlowPathStats {
    pub forwarded_to_server: u64,
    pub forwarded_to_client: u64,
    pub flows_created: u64,
    pub refused_flow_limit: u64,
    pub refused_rate_limit: u64,
    pub dropped_not_from_server: u64,
    pub dropped_no_session: u64,
    pub flows_expired: u64,
    pub sessions_expired: u64,
    /// The last expiry tick: microseconds reading its slice of the flow
    /// maps in bulk (without the relay lock) and then holding the lock
    /// (deciding, when the tick completed a pass).
    #[serde(default)]
    pub expiry_tick_read_us: u64,
    #[serde(default)]
    pub expiry_tick_locked_us: u64,
    /// The last complete pass through the flow maps (a bounded slice of
    /// them is read each tick, flows are judged when a pass completes):
    /// the ticks it took, the entries it read, its reading time over all
    /// slices, and the lock held for its decisions.
    #[serde(default)]
    pub expiry_pass_ticks: u64,
    #[serde(default)]
    pub expiry_pass_entries: u64,
    #[serde(default)]
    pub expiry_pass_read_us: u64,
    #[serde(default)]
    pub expiry_pass_locked_us: u64,
    /// NAT sessions: packets from new client endpoints that failed mosh's
    /// rule (tag, direction, newer sequence number) and were dropped.
    #[serde(default)]
    pub dropped_unverified_client: u64,
    /// NAT sessions: times the server's packets moved to a verified new client endpoint.
    #[serde(default)]
    pub nat_client_moves: u64,
    /// From the server's endpoint, but addressed to another relay address
    /// than the flow's backend-side one, or arriving on another interface
    /// than the route to the server: a forger, not the server.
    #[serde(default)]
    pub dropped_server_wrong_path: u64,
    /// Flows the server answered, moved out of probation.
    #[serde(default)]
    pub flows_promoted: u64,
    /// Unanswered flows evicted to make room for a newer client endpoint.
    #[serde(default)]
    pub flows_evicted_unanswered: u64,
    /// New client endpoints refused because they are the session's backend
    /// or one of the relay's own addresses (reflections, loops).
    #[serde(default)]
    pub dropped_client_is_backend: u64,
    /// NAT sessions: datagrams from an unknown server endpoint that failed
    /// the rule (tag, direction server-to-client, newer sequence number) and were dropped.
    #[serde(default)]
    pub dropped_unverified_server: u64,
    /// NAT sessions: times the server's NAT gave it a new endpoint and a
    /// verified datagram moved the session there.
    #[serde(default)]
    pub nat_server_moves: u64,
    /// Shared port: new client endpoints matched to their session by key
    /// and handed to it as a new flow.
    #[serde(default)]
    pub shared_admitted: u64,
    /// Shared port: datagrams from new endpoints that verify under no
    /// keyed session's key (forged, junk, or a keyless session's client);
    /// nothing was created.
    #[serde(default)]
    pub shared_unverified: u64,
    /// Shared port: datagrams that verify but go server to client.
    #[serde(default)]
    pub shared_wrong_direction: u64,
    /// Shared port: datagrams that verify but are not newer than what the
    /// session has seen (a replay from a new endpoint); nothing was created.
    #[serde(default)]
    pub shared_replayed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backends_and_explains_mistakes() {
        assert_eq!(
            parse_backend("10.0.0.2:60001").unwrap(),
            "10.0.0.2:60001".parse::<SocketAddr>().unwrap()
        );
        let v6 = parse_backend(" [2001:db8::1]:60001 ").unwrap();
        assert_eq!(v6, "[2001:db8::1]:60001".parse::<SocketAddr>().unwrap());
        // What `list` prints parses back to the same backend.
        assert_eq!(parse_backend(&v6.to_string()).unwrap(), v6);
        assert_eq!(
            parse_backend("[fd00:1::2]:22").unwrap(),
            SocketAddr::new("fd00:1::2".parse().unwrap(), 22)
        );
        for bad in [
            "10.0.0.2",
            "host:1",
            "10.0.0.2:0",
            "0.0.0.0:5",
            "10.0.0.2:70000",
            "[::1]:5",
            "127.0.0.1:60001",
            "10.0.0.2:x",
            "[::]:5",
            "[ff02::1]:5",
            "[2001:db8::1]:0",
            "[2001:db8::1]",
            "[10.0.0.2]:5",
            "[2001:db8::1:5",
            "2001:db8::1:60001",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad}");
        }
        let says = |text: &str| parse_backend(text).unwrap_err().to_string();
        assert!(says("2001:db8::1:60001").contains("write [2001:db8::1]:60001"));
        assert!(says("2001:db8::1").contains("e.g. [2001:db8::1]:60001"));
        assert!(says("fe80::1:22").contains("write [fe80::1]:22"));
        assert!(says("[fe80::1]:22").contains("link-local"));
        assert!(says("[fe80::1%eth0]:22").contains("link-local"));
        assert!(says("[::ffff:10.0.0.2]:22").contains("give the IPv4 address itself, 10.0.0.2:22"));
        assert!(says("server.example:60001").contains("host names are not supported yet"));
        assert!(says("10.0.0.2:70000").contains("port 70000 is out of range (1-65535)"));
        assert!(says("[2001:db8::1]:70000").contains("port 70000 is out of range (1-65535)"));
        assert!(says("127.0.0.1:60001").contains("loopback"));
        assert!(says("[::1]:60001").contains("loopback"));
        assert!(says("10.0.0.2").contains("[IPV6]:PORT"));
    }

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let request = Request::Add {
            backend: "10.0.0.2:60001".into(),
            port: Some(60000),
            idle_timeout_secs: None,
            key: None,
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
    }

    #[test]
    fn a_key_travels_only_when_given() {
        let keyed = Request::Add {
            backend: "10.0.0.2:60001".into(),
            port: None,
            idle_timeout_secs: None,
            key: Some("6xoXFHJqYUQUE2f4Q202jg".into()),
        };
        let line = serde_json::to_string(&keyed).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), keyed);
        // Without a key the request is what older daemons accept.
        let plain = r#"{"verb":"add","backend":"10.0.0.2:60001"}"#;
        let Request::Add { key, .. } = serde_json::from_str::<Request>(plain).unwrap() else {
            panic!("not an add");
        };
        assert_eq!(key, None);
        let unkeyed = Request::Add {
            backend: "10.0.0.2:60001".into(),
            port: None,
            idle_timeout_secs: None,
            key: None,
        };
        assert!(!serde_json::to_string(&unkeyed).unwrap().contains("key"));
    }

    #[test]
    fn a_batch_of_adds_round_trips_and_its_items_refuse_unknown_fields() {
        let request = Request::AddMany {
            sessions: vec![
                NewSession {
                    backend: "10.0.0.2:60001".into(),
                    port: Some(60000),
                    idle_timeout_secs: Some(60),
                    key: None,
                },
                NewSession {
                    backend: "10.0.0.3:60001".into(),
                    port: None,
                    idle_timeout_secs: None,
                    key: Some("6xoXFHJqYUQUE2f4Q202jg".into()),
                },
            ],
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        let typo = r#"{"verb":"add_many","sessions":[{"backend":"10.0.0.2:1","prot":5}]}"#;
        assert!(serde_json::from_str::<Request>(typo).is_err());
        let results = vec![
            AddResult::Error("backend 10.0.0.2 is malformed".into()),
            AddResult::Error("port 1 is outside the relay's range".into()),
        ];
        let reply = serde_json::to_string(&Reply::AddedMany(results.clone())).unwrap();
        let Reply::AddedMany(back) = serde_json::from_str::<Reply>(&reply).unwrap() else {
            panic!("not a batch reply: {reply}");
        };
        assert_eq!(back, results);
    }

    #[test]
    fn unknown_fields_and_verbs_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"verb":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"verb":"format_disk"}"#).is_err());
    }
}
