//! The punch handshake that lets a mosh server behind a NAT use the relay.
//!
//! Every message is one UDP datagram:
//! `"FWDP" | version | kind | unix time (u64 BE) | nonce[16] | body | HMAC-SHA256[32]`,
//! the HMAC keyed with the relay's shared secret and covering everything before it.
//!
//! ```text
//! server:X ──Allocate──────────────► relay:PUNCH   (relay picks P and Q, a token)
//! server:X ◄─Allocated(P,Q,token)── relay:PUNCH
//! server:X ──Bind(token)───────────► relay:Q       (relay learns NAT endpoint for Q)
//! server:X ◄─Bound───────────────── relay:Q       (proves the hole through Q)
//!            mosh-server new -p X starts and prints its key
//! server:Y ──Key(token,P,key)──────► relay:PUNCH
//! server:Y ◄─KeyAccepted─────────── relay:PUNCH
//! ```
//!
//! Why a second punch to Q: a NAT with endpoint-dependent mapping (Linux
//! masquerade with `random`, most CGNATs) gives X a different external port
//! for every destination, and one with endpoint-dependent filtering only
//! lets in packets from the exact destination X sent to. The session's
//! traffic leaves the relay from Q, so the server must open its hole towards
//! Q, and the relay must learn the external endpoint that packets to Q get.
//!
//! IPv6: `Allocated` and `Bound` carry an address, so each has a second
//! kind (`Allocated6`, `Bound6`) whose body holds 16 bytes where the first
//! holds 4; every other message is the same in both families. The relay
//! sends the IPv6 kinds only when the address is IPv6, which a wrapper
//! that speaks IPv4 only (older versions) never asks for: it punches over
//! IPv4 and gets IPv4 answers, byte for byte as before.
//!
//! Replies are authenticated too, so nobody can point a wrapper at another
//! relay. A refusal echoes the request's nonce (unforgeable off-path) but
//! carries no HMAC: a peer with a wrong secret could not check it anyway.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytemuck::{Pod, Zeroable};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::limits::{RecentSet, TokenBucket};

const MAGIC: [u8; 4] = *b"FWDP";
const VERSION: u8 = 1;
const HEADER_LEN: usize = size_of::<Header>();
const MAC_LEN: usize = 32;
pub const NONCE_LEN: usize = 16;
pub const TOKEN_LEN: usize = 16;
/// Requests older or newer than this (clock skew plus transit) are refused.
pub const TIME_WINDOW: Duration = Duration::from_secs(30);
/// Largest message: header, the biggest body (Allocated6), MAC.
pub const MAX_MESSAGE: usize = HEADER_LEN + size_of::<Allocated6Body>() + MAC_LEN;

pub type Nonce = [u8; NONCE_LEN];
pub type Token = [u8; TOKEN_LEN];

/// One handshake message, without its envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Server → relay punch port: "give me a session".
    Allocate,
    /// Relay → server: clients use `relay_addr:client_port`; punch again to `upstream_port`.
    Allocated {
        request: Nonce,
        relay_addr: IpAddr,
        client_port: u16,
        upstream_port: u16,
        token: Token,
    },
    /// Server mosh port → relay:Q: opens the NAT towards Q.
    Bind {
        token: Token,
    },
    /// Relay:Q → server: the hole works; `seen` is the server's external endpoint.
    Bound {
        request: Nonce,
        seen: SocketAddr,
    },
    /// Server → relay punch port: the session key mosh-server printed.
    Key {
        token: Token,
        client_port: u16,
        key: [u8; 16],
    },
    KeyAccepted {
        request: Nonce,
    },
    /// Relay → sender: refused, and why (not authenticated).
    Refused {
        request: Nonce,
        reason: RefusalReason,
    },
}

/// Why the relay refused a request; sent back so the wrapper can say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum RefusalReason {
    #[error("the HMAC does not verify: the secret differs from the relay's (check --secret-file)")]
    BadSecret = 1,
    #[error("the timestamp is outside ±30 s of the relay's clock: synchronise the clocks (NTP)")]
    Stale = 2,
    #[error("a replay of a request already seen")]
    Replay = 3,
    #[error("unknown or expired session token: run the handshake again")]
    UnknownSession = 4,
    #[error("the relay has no free port or flow slot for a new session")]
    NoCapacity = 5,
    #[error("malformed message")]
    Malformed = 6,
}

impl RefusalReason {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::BadSecret,
            2 => Self::Stale,
            3 => Self::Replay,
            4 => Self::UnknownSession,
            5 => Self::NoCapacity,
            6 => Self::Malformed,
            _ => return None,
        })
    }
}

/// A message with its envelope, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub timestamp: u64,
    pub nonce: Nonce,
    pub message: Message,
}

/// The `kind` byte of the header. Values are the wire format: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum MessageKind {
    Allocate = 1,
    Allocated = 2,
    Bind = 3,
    Bound = 4,
    Key = 5,
    KeyAccepted = 6,
    Refused = 7,
    /// `Allocated` with an IPv6 relay address.
    Allocated6 = 8,
    /// `Bound` with an IPv6 endpoint.
    Bound6 = 9,
}

impl MessageKind {
    fn of(message: &Message) -> Self {
        match message {
            Message::Allocate => Self::Allocate,
            Message::Allocated {
                relay_addr: IpAddr::V4(_),
                ..
            } => Self::Allocated,
            Message::Allocated { .. } => Self::Allocated6,
            Message::Bind { .. } => Self::Bind,
            Message::Bound {
                seen: SocketAddr::V4(_),
                ..
            } => Self::Bound,
            Message::Bound { .. } => Self::Bound6,
            Message::Key { .. } => Self::Key,
            Message::KeyAccepted { .. } => Self::KeyAccepted,
            Message::Refused { .. } => Self::Refused,
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        [
            Self::Allocate,
            Self::Allocated,
            Self::Bind,
            Self::Bound,
            Self::Key,
            Self::KeyAccepted,
            Self::Refused,
            Self::Allocated6,
            Self::Bound6,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == value)
    }
}

/// The envelope's header as it is on the wire (all fields byte arrays, so
/// the struct has no padding and any 30 bytes are a valid value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Header {
    magic: [u8; 4],
    version: u8,
    kind: u8,
    /// Unix time in seconds, big-endian.
    timestamp: [u8; 8],
    nonce: Nonce,
}
const _: () = assert!(size_of::<Header>() == 30);

/// Bodies, one per message kind that has one, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct AllocatedBody {
    request: Nonce,
    relay_addr: [u8; 4],
    client_port: [u8; 2],
    upstream_port: [u8; 2],
    token: Token,
}
const _: () = assert!(size_of::<AllocatedBody>() == 40);

/// [`AllocatedBody`] with an IPv6 relay address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Allocated6Body {
    request: Nonce,
    relay_addr: [u8; 16],
    client_port: [u8; 2],
    upstream_port: [u8; 2],
    token: Token,
}
const _: () = assert!(size_of::<Allocated6Body>() == 52);

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct BoundBody {
    request: Nonce,
    seen_addr: [u8; 4],
    seen_port: [u8; 2],
}
const _: () = assert!(size_of::<BoundBody>() == 22);

/// [`BoundBody`] with an IPv6 endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Bound6Body {
    request: Nonce,
    seen_addr: [u8; 16],
    seen_port: [u8; 2],
}
const _: () = assert!(size_of::<Bound6Body>() == 34);

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct KeyBody {
    token: Token,
    client_port: [u8; 2],
    key: [u8; 16],
}
const _: () = assert!(size_of::<KeyBody>() == 34);

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct RefusedBody {
    request: Nonce,
    reason: u8,
}
const _: () = assert!(size_of::<RefusedBody>() == 17);

/// The body of `kind`, if `bytes` is exactly its size.
fn body<T: Pod>(bytes: &[u8]) -> Option<T> {
    bytemuck::try_pod_read_unaligned(bytes).ok()
}

/// The relay's shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.len() < 16 {
            anyhow::bail!(
                "the punch secret is {} bytes; use at least 16 random bytes, e.g. `head -c 32 /dev/urandom | base64 > FILE`",
                bytes.len()
            );
        }
        Ok(Self(bytes.to_vec()))
    }

    /// Reads a secret file; surrounding whitespace (a trailing newline) is not part of it.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).map_err(|error| {
            anyhow::anyhow!(
                "cannot read the punch secret file {}: {error}",
                path.display()
            )
        })?;
        let trimmed = text.trim_ascii();
        Self::new(trimmed).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))
    }

    /// The key that seals punched sessions' mosh keys in the session store
    /// (derived from this secret, independent of the handshake's HMAC key).
    pub fn key_sealer(&self) -> crate::store::KeySealer {
        crate::store::KeySealer::derive(&self.0)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds a datagram for `message`, timestamped now with a fresh nonce.
pub fn seal(secret: &Secret, message: &Message) -> (Vec<u8>, Nonce) {
    let nonce: Nonce = rand::random();
    (seal_with(secret, message, unix_now(), nonce), nonce)
}

/// A refusal: unauthenticated, see the module comment.
pub fn refusal(request: Nonce, reason: RefusalReason) -> Vec<u8> {
    encode(
        None,
        &Message::Refused { request, reason },
        unix_now(),
        rand::random(),
    )
}

pub fn seal_with(secret: &Secret, message: &Message, timestamp: u64, nonce: Nonce) -> Vec<u8> {
    encode(Some(secret), message, timestamp, nonce)
}

fn encode(secret: Option<&Secret>, message: &Message, timestamp: u64, nonce: Nonce) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_MESSAGE);
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        kind: MessageKind::of(message) as u8,
        timestamp: timestamp.to_be_bytes(),
        nonce,
    };
    out.extend_from_slice(bytemuck::bytes_of(&header));
    match *message {
        Message::Allocate => {}
        Message::Allocated {
            request,
            relay_addr,
            client_port,
            upstream_port,
            token,
        } => match relay_addr {
            IpAddr::V4(relay_addr) => out.extend_from_slice(bytemuck::bytes_of(&AllocatedBody {
                request,
                relay_addr: relay_addr.octets(),
                client_port: client_port.to_be_bytes(),
                upstream_port: upstream_port.to_be_bytes(),
                token,
            })),
            IpAddr::V6(relay_addr) => out.extend_from_slice(bytemuck::bytes_of(&Allocated6Body {
                request,
                relay_addr: relay_addr.octets(),
                client_port: client_port.to_be_bytes(),
                upstream_port: upstream_port.to_be_bytes(),
                token,
            })),
        },
        Message::Bind { token } => out.extend_from_slice(&token),
        Message::Bound { request, seen } => match seen {
            SocketAddr::V4(seen) => out.extend_from_slice(bytemuck::bytes_of(&BoundBody {
                request,
                seen_addr: seen.ip().octets(),
                seen_port: seen.port().to_be_bytes(),
            })),
            SocketAddr::V6(seen) => out.extend_from_slice(bytemuck::bytes_of(&Bound6Body {
                request,
                seen_addr: seen.ip().octets(),
                seen_port: seen.port().to_be_bytes(),
            })),
        },
        Message::Key {
            token,
            client_port,
            key,
        } => {
            out.extend_from_slice(bytemuck::bytes_of(&KeyBody {
                token,
                client_port: client_port.to_be_bytes(),
                key,
            }));
        }
        Message::KeyAccepted { request } => out.extend_from_slice(&request),
        Message::Refused { request, reason } => {
            out.extend_from_slice(bytemuck::bytes_of(&RefusedBody {
                request,
                reason: reason as u8,
            }));
        }
    }
    if let Some(secret) = secret.filter(|_| !matches!(message, Message::Refused { .. })) {
        let mut mac = secret.mac();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// Whether a datagram claims to be a handshake message at all (mosh
/// datagrams on Q start with a nonce, never with this magic and version).
pub fn looks_like_punch(datagram: &[u8]) -> bool {
    header(datagram).is_some()
}

/// The header of a datagram that carries this protocol's magic and version.
fn header(datagram: &[u8]) -> Option<Header> {
    let header: Header = body(datagram.get(..HEADER_LEN)?)?;
    (header.magic == MAGIC && header.version == VERSION).then_some(header)
}

/// Why a datagram was not accepted as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Not worth an answer (no magic, truncated).
    Garbage,
    /// Worth a refusal carrying the request nonce.
    Refuse(Nonce, RefusalReason),
}

/// Checks the envelope (magic, length, HMAC) and decodes the message.
/// Freshness and replays are the [`Authority`]'s business.
pub fn open(secret: &Secret, datagram: &[u8]) -> Result<Envelope, OpenError> {
    let Some(header) = header(datagram) else {
        return Err(OpenError::Garbage);
    };
    let (nonce, timestamp) = (header.nonce, u64::from_be_bytes(header.timestamp));
    let kind = MessageKind::from_u8(header.kind);
    if kind == Some(MessageKind::Refused) {
        let refused: RefusedBody = body(&datagram[HEADER_LEN..]).ok_or(OpenError::Garbage)?;
        let reason = RefusalReason::from_u8(refused.reason).ok_or(OpenError::Garbage)?;
        return Ok(Envelope {
            timestamp,
            nonce,
            message: Message::Refused {
                request: refused.request,
                reason,
            },
        });
    }
    if datagram.len() < HEADER_LEN + MAC_LEN {
        return Err(OpenError::Refuse(nonce, RefusalReason::Malformed));
    }
    let (signed, tag) = datagram.split_at(datagram.len() - MAC_LEN);
    let mut mac = secret.mac();
    mac.update(signed);
    if mac.verify_slice(tag).is_err() {
        return Err(OpenError::Refuse(nonce, RefusalReason::BadSecret));
    }
    let bytes = &signed[HEADER_LEN..];
    let message = match kind {
        Some(MessageKind::Allocate) if bytes.is_empty() => Some(Message::Allocate),
        Some(MessageKind::Allocated) => body::<AllocatedBody>(bytes).map(|b| Message::Allocated {
            request: b.request,
            relay_addr: Ipv4Addr::from(b.relay_addr).into(),
            client_port: u16::from_be_bytes(b.client_port),
            upstream_port: u16::from_be_bytes(b.upstream_port),
            token: b.token,
        }),
        Some(MessageKind::Allocated6) => {
            body::<Allocated6Body>(bytes).map(|b| Message::Allocated {
                request: b.request,
                relay_addr: Ipv6Addr::from(b.relay_addr).into(),
                client_port: u16::from_be_bytes(b.client_port),
                upstream_port: u16::from_be_bytes(b.upstream_port),
                token: b.token,
            })
        }
        Some(MessageKind::Bind) => body::<Token>(bytes).map(|token| Message::Bind { token }),
        Some(MessageKind::Bound) => body::<BoundBody>(bytes).map(|b| Message::Bound {
            request: b.request,
            seen: SocketAddr::new(
                Ipv4Addr::from(b.seen_addr).into(),
                u16::from_be_bytes(b.seen_port),
            ),
        }),
        Some(MessageKind::Bound6) => body::<Bound6Body>(bytes).map(|b| Message::Bound {
            request: b.request,
            seen: SocketAddr::new(
                Ipv6Addr::from(b.seen_addr).into(),
                u16::from_be_bytes(b.seen_port),
            ),
        }),
        Some(MessageKind::Key) => body::<KeyBody>(bytes).map(|b| Message::Key {
            token: b.token,
            client_port: u16::from_be_bytes(b.client_port),
            key: b.key,
        }),
        Some(MessageKind::KeyAccepted) => {
            body::<Nonce>(bytes).map(|request| Message::KeyAccepted { request })
        }
        _ => None,
    };
    let message = message.ok_or(OpenError::Refuse(nonce, RefusalReason::Malformed))?;
    Ok(Envelope {
        timestamp,
        nonce,
        message,
    })
}

/// Requests per second one source address may make (bursts of twice that).
const REQUESTS_PER_SEC: u32 = 5;
/// Sources tracked by the rate limiter before the oldest are forgotten.
const MAX_TRACKED_SOURCES: usize = 4096;
/// Nonces remembered: at the rate limit this covers the time window many times over.
const MAX_REMEMBERED_NONCES: usize = 65_536;

/// The relay's side of the handshake's security: authenticity, freshness,
/// replays and rate. Holds no session state; a refused request changes nothing here.
pub struct Authority {
    secret: Secret,
    /// Nonces of accepted requests within the time window.
    seen: RecentSet<Nonce>,
    /// Keyed by [`rate_key`]: one bucket per IPv4 address or IPv6 /64.
    per_source: HashMap<IpAddr, TokenBucket>,
}

/// What one rate bucket covers: an IPv4 address, or the /64 an IPv6
/// address is in (one host gets a whole /64 from SLAAC and may use any
/// address in it, so a bucket per /128 would limit nothing).
fn rate_key(from: IpAddr) -> IpAddr {
    match from {
        IpAddr::V4(_) => from,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// What the authority decided about a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Authentic, fresh, first time seen.
    Accept(Envelope),
    /// Over the source's rate: dropped without an answer.
    RateLimited,
    /// Not a handshake message: dropped without an answer.
    Garbage,
    /// Answer with a refusal (logged by the caller).
    Refuse(Nonce, RefusalReason),
}

impl Authority {
    pub fn new(secret: Secret) -> Self {
        Self {
            secret,
            seen: RecentSet::new(MAX_REMEMBERED_NONCES),
            per_source: HashMap::new(),
        }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Judges one request from `from`, received at `now` (unix seconds; `now_ns` monotonic).
    pub fn check(&mut self, datagram: &[u8], from: IpAddr, now: u64, now_ns: u64) -> Verdict {
        if !looks_like_punch(datagram) {
            return Verdict::Garbage;
        }
        let from = rate_key(from);
        if self.per_source.len() >= MAX_TRACKED_SOURCES && !self.per_source.contains_key(&from) {
            self.per_source.clear();
        }
        let bucket = self
            .per_source
            .entry(from)
            .or_insert_with(|| TokenBucket::new(REQUESTS_PER_SEC, REQUESTS_PER_SEC * 2));
        if !bucket.try_take(now_ns) {
            return Verdict::RateLimited;
        }
        let envelope = match open(&self.secret, datagram) {
            Ok(envelope) => envelope,
            Err(OpenError::Garbage) => return Verdict::Garbage,
            Err(OpenError::Refuse(nonce, reason)) => return Verdict::Refuse(nonce, reason),
        };
        if envelope.timestamp.abs_diff(now) > TIME_WINDOW.as_secs() {
            return Verdict::Refuse(envelope.nonce, RefusalReason::Stale);
        }
        // Anything older than the window is refused as stale, so nonces only
        // need remembering for that long.
        self.seen
            .forget_before(now.saturating_sub(2 * TIME_WINDOW.as_secs()));
        if !self.seen.insert(envelope.nonce, now) {
            return Verdict::Refuse(envelope.nonce, RefusalReason::Replay);
        }
        Verdict::Accept(envelope)
    }

    /// Seals a reply with the relay's secret.
    pub fn reply(&self, message: &Message) -> Vec<u8> {
        seal(&self.secret, message).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> Secret {
        Secret::new(&[byte; 32]).unwrap()
    }

    /// The wire format, byte for byte, as deployed wrappers and relays speak it.
    #[test]
    fn allocated_is_laid_out_as_documented() {
        let secret = secret(7);
        let message = Message::Allocated {
            request: [0xaa; 16],
            relay_addr: Ipv4Addr::new(203, 0, 113, 1).into(),
            client_port: 60001,
            upstream_port: 61002,
            token: [0xbb; 16],
        };
        let bytes = seal_with(&secret, &message, 0x0102_0304_0506_0708, [0xcc; 16]);
        let mut expected = b"FWDP".to_vec();
        expected.extend([1, 2, 1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend([0xcc; 16]);
        expected.extend([0xaa; 16]);
        expected.extend([203, 0, 113, 1]);
        expected.extend(60001u16.to_be_bytes());
        expected.extend(61002u16.to_be_bytes());
        expected.extend([0xbb; 16]);
        let mut mac = secret.mac();
        mac.update(&expected);
        expected.extend(mac.finalize().into_bytes());
        assert_eq!(bytes, expected);
        let refused = refusal([0xdd; 16], RefusalReason::NoCapacity);
        assert_eq!(&refused[..6], b"FWDP\x01\x07");
        assert_eq!(
            &refused[HEADER_LEN..],
            [[0xdd; 16].as_slice(), &[5]].concat()
        );
    }

    /// The IPv6 kinds, byte for byte: the IPv4 layout with 16-byte addresses.
    #[test]
    fn ipv6_answers_have_kinds_of_their_own() {
        let secret = secret(7);
        let allocated = Message::Allocated {
            request: [0xaa; 16],
            relay_addr: "2001:db8::1".parse().unwrap(),
            client_port: 60001,
            upstream_port: 61002,
            token: [0xbb; 16],
        };
        let bytes = seal_with(&secret, &allocated, 0x0102_0304_0506_0708, [0xcc; 16]);
        let mut expected = b"FWDP".to_vec();
        expected.extend([1, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend([0xcc; 16]);
        expected.extend([0xaa; 16]);
        expected.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        expected.extend(60001u16.to_be_bytes());
        expected.extend(61002u16.to_be_bytes());
        expected.extend([0xbb; 16]);
        let mut mac = secret.mac();
        mac.update(&expected);
        expected.extend(mac.finalize().into_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), MAX_MESSAGE);

        let bound = Message::Bound {
            request: [0xaa; 16],
            seen: "[2001:db8::9]:40000".parse().unwrap(),
        };
        let bytes = seal_with(&secret, &bound, 0, [0xcc; 16]);
        assert_eq!(bytes[5], 9, "Bound6");
        assert_eq!(bytes.len(), HEADER_LEN + 34 + MAC_LEN);
        // The IPv4 forms keep their kinds and sizes (older wrappers read them).
        let bound4 = Message::Bound {
            request: [0xaa; 16],
            seen: "198.51.100.9:40000".parse().unwrap(),
        };
        let bytes = seal_with(&secret, &bound4, 0, [0xcc; 16]);
        assert_eq!((bytes[5], bytes.len()), (4, HEADER_LEN + 22 + MAC_LEN));
        // A body of the other family's size is malformed, not misread.
        let mut short = seal_with(&secret, &bound4, 0, [0xcc; 16]);
        short[5] = 9;
        let tag_at = short.len() - MAC_LEN;
        short.truncate(tag_at);
        let mut mac = secret.mac();
        mac.update(&short);
        short.extend(mac.finalize().into_bytes());
        assert_eq!(
            open(&secret, &short),
            Err(OpenError::Refuse([0xcc; 16], RefusalReason::Malformed))
        );
    }

    #[test]
    fn every_message_round_trips() {
        let s = secret(1);
        let token = [9; 16];
        let messages = [
            Message::Allocate,
            Message::Allocated {
                request: [1; 16],
                relay_addr: Ipv4Addr::new(203, 0, 113, 1).into(),
                client_port: 60001,
                upstream_port: 61001,
                token,
            },
            Message::Allocated {
                request: [1; 16],
                relay_addr: "2001:db8::1".parse().unwrap(),
                client_port: 60001,
                upstream_port: 61001,
                token,
            },
            Message::Bind { token },
            Message::Bound {
                request: [2; 16],
                seen: "198.51.100.9:40000".parse().unwrap(),
            },
            Message::Bound {
                request: [2; 16],
                seen: "[2001:db8:9::9]:40000".parse().unwrap(),
            },
            Message::Key {
                token,
                client_port: 60001,
                key: [3; 16],
            },
            Message::KeyAccepted { request: [4; 16] },
            Message::Refused {
                request: [5; 16],
                reason: RefusalReason::Replay,
            },
        ];
        for message in messages {
            let (bytes, nonce) = seal(&s, &message);
            assert!(bytes.len() <= MAX_MESSAGE, "{message:?}");
            let envelope = open(&s, &bytes).unwrap();
            assert_eq!((envelope.message, envelope.nonce), (message, nonce));
        }
    }

    #[test]
    fn authority_refuses_wrong_secret_stale_replay_and_tampering() {
        let mut relay = Authority::new(secret(1));
        let from: IpAddr = Ipv4Addr::new(198, 51, 100, 9).into();
        let now = 1_700_000_000;
        let good = seal_with(&secret(1), &Message::Allocate, now, [7; 16]);
        assert!(matches!(
            relay.check(&good, from, now, 0),
            Verdict::Accept(_)
        ));
        assert_eq!(
            relay.check(&good, from, now + 1, 1),
            Verdict::Refuse([7; 16], RefusalReason::Replay)
        );

        let wrong = seal_with(&secret(2), &Message::Allocate, now, [8; 16]);
        assert_eq!(
            relay.check(&wrong, from, now, 2),
            Verdict::Refuse([8; 16], RefusalReason::BadSecret)
        );
        // A refused request leaves no trace: the same nonce, correctly signed, is accepted.
        let fixed = seal_with(&secret(1), &Message::Allocate, now, [8; 16]);
        assert!(matches!(
            relay.check(&fixed, from, now, 3),
            Verdict::Accept(_)
        ));

        let stale = seal_with(&secret(1), &Message::Allocate, now - 31, [10; 16]);
        assert_eq!(
            relay.check(&stale, from, now, 4),
            Verdict::Refuse([10; 16], RefusalReason::Stale)
        );
        let future = seal_with(&secret(1), &Message::Allocate, now + 31, [11; 16]);
        assert_eq!(
            relay.check(&future, from, now, 5),
            Verdict::Refuse([11; 16], RefusalReason::Stale)
        );

        let mut tampered = seal_with(&secret(1), &Message::Bind { token: [1; 16] }, now, [12; 16]);
        tampered[HEADER_LEN] ^= 1;
        assert_eq!(
            relay.check(&tampered, from, now, 6),
            Verdict::Refuse([12; 16], RefusalReason::BadSecret)
        );
        assert_eq!(
            relay.check(b"mosh junk that is long enough to parse", from, now, 7),
            Verdict::Garbage
        );
    }

    #[test]
    fn authority_rate_limits_per_source() {
        let mut relay = Authority::new(secret(1));
        let now = 1_700_000_000;
        let mut accepted = 0;
        for i in 0..50u8 {
            let request = seal_with(&secret(1), &Message::Allocate, now, [i; 16]);
            match relay.check(&request, Ipv4Addr::new(198, 51, 100, 9).into(), now, 0) {
                Verdict::Accept(_) => accepted += 1,
                Verdict::RateLimited => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            accepted,
            REQUESTS_PER_SEC * 2,
            "a burst, then nothing within the same instant"
        );
        let other_source = seal_with(&secret(1), &Message::Allocate, now, [200; 16]);
        assert!(matches!(
            relay.check(
                &other_source,
                Ipv4Addr::new(198, 51, 100, 10).into(),
                now,
                0
            ),
            Verdict::Accept(_)
        ));
        // IPv6: one bucket per /64, whichever address in it a host sends from.
        let mut accepted = 0;
        for i in 0..50u8 {
            let request = seal_with(&secret(1), &Message::Allocate, now, [i + 100; 16]);
            let from = Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, u16::from(i) + 1);
            match relay.check(&request, from.into(), now, 0) {
                Verdict::Accept(_) => accepted += 1,
                Verdict::RateLimited => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(accepted, REQUESTS_PER_SEC * 2, "the /64 shares one bucket");
        let next_prefix = seal_with(&secret(1), &Message::Allocate, now, [201; 16]);
        assert!(matches!(
            relay.check(&next_prefix, "2001:db8:0:8::1".parse().unwrap(), now, 0),
            Verdict::Accept(_)
        ));
    }

    #[test]
    fn short_secrets_are_refused_with_the_fix() {
        let error = Secret::new(b"hunter2").unwrap_err().to_string();
        assert!(error.contains("/dev/urandom"), "{error}");
    }
}
