//! NAT-PMP (RFC 6886) on the wire: requests the gateway reads, answers it
//! writes, and the same two the LAN-side client (`forwarder mosh-server
//! --gateway`) writes and reads. Big-endian, fixed layouts.

use std::net::Ipv4Addr;

/// The server's port; announcements go to 224.0.0.1 on [`CLIENT_PORT`].
pub const SERVER_PORT: u16 = 5351;
pub const CLIENT_PORT: u16 = 5350;
pub const VERSION: u8 = 0;

pub const OP_PUBLIC_ADDRESS: u8 = 0;
pub const OP_MAP_UDP: u8 = 1;
pub const OP_MAP_TCP: u8 = 2;
/// Added to the opcode in every answer.
pub const RESPONSE: u8 = 128;

/// RFC 6886 section 3.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResultCode {
    Success = 0,
    UnsupportedVersion = 1,
    /// "Not Authorized/Refused": the rules, secure mode or a quota said no.
    NotAuthorized = 2,
    NetworkFailure = 3,
    OutOfResources = 4,
    UnsupportedOpcode = 5,
}

impl ResultCode {
    pub fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            0 => Self::Success,
            1 => Self::UnsupportedVersion,
            2 => Self::NotAuthorized,
            3 => Self::NetworkFailure,
            4 => Self::OutOfResources,
            5 => Self::UnsupportedOpcode,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    PublicAddress,
    Map {
        /// [`OP_MAP_UDP`] or [`OP_MAP_TCP`].
        opcode: u8,
        internal_port: u16,
        suggested_external_port: u16,
        lifetime: u32,
    },
}

/// What the server cannot take, and the answer it owes for it (if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Too short to carry a version and an opcode, or an answer (a client's
    /// business, or a reflection): no reply.
    Ignore,
    /// Version other than 0 (PCP's 2 is dispatched before this).
    UnsupportedVersion,
    /// An opcode this server does not know (answered with its opcode + 128).
    UnsupportedOpcode(u8),
}

pub fn parse_request(bytes: &[u8]) -> Result<Request, Malformed> {
    let [version, opcode, ..] = *bytes else {
        return Err(Malformed::Ignore);
    };
    if opcode & RESPONSE != 0 {
        return Err(Malformed::Ignore);
    }
    if version != VERSION {
        return Err(Malformed::UnsupportedVersion);
    }
    match opcode {
        // RFC 6886 3.2: two bytes; anything after them is not ours to judge.
        OP_PUBLIC_ADDRESS => Ok(Request::PublicAddress),
        OP_MAP_UDP | OP_MAP_TCP => {
            let Some(fields) = bytes.get(..12) else {
                return Err(Malformed::Ignore);
            };
            Ok(Request::Map {
                opcode,
                internal_port: u16::from_be_bytes([fields[4], fields[5]]),
                suggested_external_port: u16::from_be_bytes([fields[6], fields[7]]),
                lifetime: u32::from_be_bytes([fields[8], fields[9], fields[10], fields[11]]),
            })
        }
        other => Err(Malformed::UnsupportedOpcode(other)),
    }
}

pub fn encode_request(request: &Request) -> Vec<u8> {
    match *request {
        Request::PublicAddress => vec![VERSION, OP_PUBLIC_ADDRESS],
        Request::Map {
            opcode,
            internal_port,
            suggested_external_port,
            lifetime,
        } => {
            let mut out = vec![VERSION, opcode, 0, 0];
            out.extend_from_slice(&internal_port.to_be_bytes());
            out.extend_from_slice(&suggested_external_port.to_be_bytes());
            out.extend_from_slice(&lifetime.to_be_bytes());
            out
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    PublicAddress {
        result: ResultCode,
        epoch: u32,
        address: Ipv4Addr,
    },
    Map {
        opcode: u8,
        result: ResultCode,
        epoch: u32,
        internal_port: u16,
        external_port: u16,
        lifetime: u32,
    },
    /// An error answer to an opcode (or version) without a body of its own.
    Bare {
        opcode: u8,
        result: ResultCode,
        epoch: u32,
    },
}

fn header(opcode: u8, result: ResultCode, epoch: u32) -> Vec<u8> {
    let mut out = vec![VERSION, opcode | RESPONSE];
    out.extend_from_slice(&(result as u16).to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

pub fn encode_response(response: &Response) -> Vec<u8> {
    match *response {
        Response::PublicAddress {
            result,
            epoch,
            address,
        } => {
            let mut out = header(OP_PUBLIC_ADDRESS, result, epoch);
            out.extend_from_slice(&address.octets());
            out
        }
        Response::Map {
            opcode,
            result,
            epoch,
            internal_port,
            external_port,
            lifetime,
        } => {
            let mut out = header(opcode, result, epoch);
            out.extend_from_slice(&internal_port.to_be_bytes());
            out.extend_from_slice(&external_port.to_be_bytes());
            out.extend_from_slice(&lifetime.to_be_bytes());
            out
        }
        Response::Bare {
            opcode,
            result,
            epoch,
        } => header(opcode, result, epoch),
    }
}

/// What the LAN-side client reads back.
pub fn parse_response(bytes: &[u8]) -> Option<Response> {
    let [VERSION, opcode, r0, r1, e0, e1, e2, e3, ref body @ ..] = *bytes else {
        return None;
    };
    if opcode & RESPONSE == 0 {
        return None;
    }
    let result = ResultCode::from_u16(u16::from_be_bytes([r0, r1]))?;
    let epoch = u32::from_be_bytes([e0, e1, e2, e3]);
    let opcode = opcode & !RESPONSE;
    match (opcode, body) {
        (OP_PUBLIC_ADDRESS, [a, b, c, d, ..]) => Some(Response::PublicAddress {
            result,
            epoch,
            address: Ipv4Addr::new(*a, *b, *c, *d),
        }),
        (OP_MAP_UDP | OP_MAP_TCP, [i0, i1, x0, x1, l0, l1, l2, l3, ..]) => Some(Response::Map {
            opcode,
            result,
            epoch,
            internal_port: u16::from_be_bytes([*i0, *i1]),
            external_port: u16::from_be_bytes([*x0, *x1]),
            lifetime: u32::from_be_bytes([*l0, *l1, *l2, *l3]),
        }),
        _ => Some(Response::Bare {
            opcode,
            result,
            epoch,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::PublicAddress,
            Request::Map {
                opcode: OP_MAP_UDP,
                internal_port: 60001,
                suggested_external_port: 60002,
                lifetime: 7200,
            },
            Request::Map {
                opcode: OP_MAP_TCP,
                internal_port: 22,
                suggested_external_port: 0,
                lifetime: 0,
            },
        ] {
            assert_eq!(parse_request(&encode_request(&request)), Ok(request));
        }
    }

    /// The bytes RFC 6886 3.3 lays out, as natpmpc sends them.
    #[test]
    fn map_request_layout() {
        let bytes = [0, 1, 0, 0, 0xea, 0x61, 0xea, 0x62, 0, 0, 0x1c, 0x20];
        assert_eq!(
            parse_request(&bytes),
            Ok(Request::Map {
                opcode: 1,
                internal_port: 60001,
                suggested_external_port: 60002,
                lifetime: 7200
            })
        );
    }

    #[test]
    fn responses_round_trip() {
        for response in [
            Response::PublicAddress {
                result: ResultCode::Success,
                epoch: 12,
                address: Ipv4Addr::new(198, 51, 100, 1),
            },
            Response::Map {
                opcode: OP_MAP_UDP,
                result: ResultCode::NotAuthorized,
                epoch: 99,
                internal_port: 60001,
                external_port: 0,
                lifetime: 0,
            },
            Response::Bare {
                opcode: 77,
                result: ResultCode::UnsupportedOpcode,
                epoch: 1,
            },
        ] {
            assert_eq!(parse_response(&encode_response(&response)), Some(response));
        }
        let bytes = encode_response(&Response::PublicAddress {
            result: ResultCode::Success,
            epoch: 0x0102_0304,
            address: Ipv4Addr::new(198, 51, 100, 1),
        });
        assert_eq!(bytes, [0, 128, 0, 0, 1, 2, 3, 4, 198, 51, 100, 1]);
        assert_eq!(
            encode_response(&Response::Map {
                opcode: 1,
                result: ResultCode::Success,
                epoch: 0,
                internal_port: 1,
                external_port: 2,
                lifetime: 3
            })
            .len(),
            16
        );
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(parse_request(&[]), Err(Malformed::Ignore));
        assert_eq!(parse_request(&[0]), Err(Malformed::Ignore));
        // A map request cut short is not guessed at.
        assert_eq!(parse_request(&[0, 1, 0, 0, 1]), Err(Malformed::Ignore));
        // Answers are never answered (no loops between two gateways).
        assert_eq!(parse_request(&[0, 129, 0, 0]), Err(Malformed::Ignore));
        assert_eq!(parse_request(&[1, 0]), Err(Malformed::UnsupportedVersion));
        assert_eq!(parse_request(&[0, 3]), Err(Malformed::UnsupportedOpcode(3)));
        assert_eq!(parse_response(&[0, 1, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(
            parse_response(&[0, 128, 0, 9, 0, 0, 0, 0, 1, 2, 3, 4]),
            None
        );
    }
}
