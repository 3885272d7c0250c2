//! mosh over TCP: the stream's format, shared by the relay's bridge
//! (`tcpbridge`) and `forwarder mosh --tcp` (`connect`).
//!
//! A stream opens with a hello, then carries datagrams, each after its
//! length as a big-endian u16 (as udptunnel and mullvad's udp-over-tcp
//! frame them), so mosh's datagrams keep their boundaries:
//!
//! ```text
//! hello:  "FWDT"  version (1)  id length (1)  session id  token (32)
//! frame:  length (2, big-endian, 1..=MAX_DATAGRAM)  datagram
//! ```
//!
//! The relay never answers a hello: a stream it refuses is closed at the
//! hello deadline like one that never finished, so a prober learns nothing.
//!
//! The token is HMAC-SHA256, under a secret only the relay holds, of the
//! session's id, port and backend: random to anyone without the secret,
//! different for every session, and nothing to store (the secret is a
//! root-only file in the state folder, as keyed sessions' is).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The hello's first bytes.
pub const MAGIC: &[u8; 4] = b"FWDT";
pub const VERSION: u8 = 1;
/// The token's length: a whole HMAC-SHA256 (256 bits).
pub const TOKEN_LEN: usize = 32;
/// Longest session id a hello may carry (ids are 8 hex digits today).
pub const MAX_ID_LEN: usize = 32;
/// The largest datagram a frame may carry: well above mosh's (at most
/// about 1300 bytes); a longer length closes the stream.
pub const MAX_DATAGRAM: usize = 4096;
/// Bytes before the id: magic, version, id length.
pub const HELLO_HEAD: usize = 6;

/// The secret the relay derives every session's token from.
pub const TOKEN_SECRET_FILE: &str = "tcp-tokens.secret";

/// A session's token: what `add --json` reports and the hello carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Lower-case hex, as `add --json` prints it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let bad = || {
            anyhow::anyhow!(
                "a TCP token is {} hex digits (as `forwarder add --json` reports it in tcp.token)",
                TOKEN_LEN * 2
            )
        };
        if text.len() != TOKEN_LEN * 2 || !text.is_ascii() {
            return Err(bad());
        }
        let mut token = [0u8; TOKEN_LEN];
        for (i, byte) in token.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(token))
    }
}

/// Issues and checks tokens under the relay's secret.
pub struct TokenIssuer {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer(..)")
    }
}

impl TokenIssuer {
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self, id: &str, port: u16, backend: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        mac.update(b"forwarder tcp token v1\0");
        mac.update(&(id.len() as u32).to_be_bytes());
        mac.update(id.as_bytes());
        mac.update(&port.to_be_bytes());
        mac.update(backend.as_bytes());
        mac
    }

    pub fn issue(&self, id: &str, port: u16, backend: &str) -> Token {
        Token(self.mac(id, port, backend).finalize().into_bytes().into())
    }

    /// Whether `token` is the session's, compared in constant time.
    pub fn verify(&self, id: &str, port: u16, backend: &str, token: &[u8]) -> bool {
        self.mac(id, port, backend).verify_slice(token).is_ok()
    }
}

/// The hello a client sends first.
pub fn hello(id: &str, token: &Token) -> Vec<u8> {
    assert!(id.len() <= MAX_ID_LEN, "session ids are short");
    let mut hello = Vec::with_capacity(HELLO_HEAD + id.len() + TOKEN_LEN);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.push(id.len() as u8);
    hello.extend_from_slice(id.as_bytes());
    hello.extend_from_slice(&token.0);
    hello
}

/// What a hello's head says: the id's length, or why it is no hello.
pub fn hello_id_len(head: &[u8; HELLO_HEAD]) -> Option<usize> {
    let id_len = usize::from(head[5]);
    (&head[..4] == MAGIC && head[4] == VERSION && (1..=MAX_ID_LEN).contains(&id_len))
        .then_some(id_len)
}

/// A datagram as a frame.
pub fn frame(datagram: &[u8]) -> Vec<u8> {
    debug_assert!(!datagram.is_empty() && datagram.len() <= MAX_DATAGRAM);
    let mut frame = Vec::with_capacity(2 + datagram.len());
    frame.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    frame.extend_from_slice(datagram);
    frame
}

/// A frame's length field: the datagram's size, or None when it is one no
/// peer of ours sends (empty, or over [`MAX_DATAGRAM`]).
pub fn frame_len(head: [u8; 2]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes(head));
    (1..=MAX_DATAGRAM).contains(&len).then_some(len)
}

/// The send buffer of a stream's socket: a few of mosh's datagrams, so a
/// stalled path backs up into the drop-oldest queue, not into the kernel.
pub const SEND_BUFFER_BYTES: usize = 16 * 1024;
/// Datagrams a stream's writer holds before it drops the oldest.
pub const WRITE_QUEUE: usize = 16;

/// TCP_NODELAY (a keystroke goes out now) and a small send buffer.
pub fn tune(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::SndBuf,
        &SEND_BUFFER_BYTES,
    )
    .map_err(std::io::Error::from)
}

/// Why a stream's frames stopped.
#[derive(Debug)]
pub enum FrameEnd {
    /// The peer closed the stream (or it broke).
    Closed,
    /// A length of 0 or over [`MAX_DATAGRAM`].
    BadLength(usize),
}

/// Reads one frame's datagram into `buf`, returning its length.
pub async fn read_frame(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8; MAX_DATAGRAM],
) -> Result<usize, FrameEnd> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|_| FrameEnd::Closed)?;
    let Some(len) = frame_len(head) else {
        return Err(FrameEnd::BadLength(usize::from(u16::from_be_bytes(head))));
    };
    reader
        .read_exact(&mut buf[..len])
        .await
        .map_err(|_| FrameEnd::Closed)?;
    Ok(len)
}

/// Writes the queue's datagrams as frames until the stream or the queue
/// closes. A queue that overflowed lost its oldest datagrams: `on_stale`
/// learns how many.
pub async fn write_frames(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    queue: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<[u8]>>,
    mut on_stale: impl FnMut(u64),
) {
    use tokio::io::AsyncWriteExt;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let datagram = match queue.recv().await {
            Ok(datagram) => datagram,
            Err(RecvError::Lagged(lost)) => {
                on_stale(lost);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if writer.write_all(&frame(&datagram)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_session_and_checked() {
        let issuer = TokenIssuer::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let token = issuer.issue("deadbeef", 60000, "10.0.0.2:60001");
        assert!(issuer.verify("deadbeef", 60000, "10.0.0.2:60001", &token.0));
        assert!(!issuer.verify("deadbeef", 60001, "10.0.0.2:60001", &token.0));
        assert!(!issuer.verify("deadbeee", 60000, "10.0.0.2:60001", &token.0));
        assert_ne!(token, issuer.issue("deadbeef", 60000, "10.0.0.3:60001"));
        let other = TokenIssuer::new(b"another secret, also 32 bytes!!!".to_vec());
        assert!(!other.verify("deadbeef", 60000, "10.0.0.2:60001", &token.0));
        assert_eq!(Token::from_hex(&token.to_hex()).unwrap(), token);
        assert!(Token::from_hex("abc").is_err());
        assert!(format!("{token:?}").contains(".."));
    }

    #[test]
    fn hellos_and_frames_parse_back() {
        let token = Token([7; TOKEN_LEN]);
        let hello = hello("deadbeef", &token);
        let head: [u8; HELLO_HEAD] = hello[..HELLO_HEAD].try_into().unwrap();
        assert_eq!(hello_id_len(&head), Some(8));
        assert_eq!(&hello[HELLO_HEAD..HELLO_HEAD + 8], b"deadbeef");
        assert_eq!(&hello[HELLO_HEAD + 8..], &token.0);
        let mut wrong = head;
        wrong[0] = b'G';
        assert_eq!(hello_id_len(&wrong), None);
        let frame = frame(&[1, 2, 3]);
        assert_eq!(frame, [0, 3, 1, 2, 3]);
        assert_eq!(frame_len([0, 3]), Some(3));
        assert_eq!(frame_len([0, 0]), None);
        assert_eq!(frame_len([0xff, 0xff]), None);
    }
}
