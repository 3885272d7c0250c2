//! PCP (RFC 6887, version 2) on the wire: the common header, MAP and
//! ANNOUNCE, options, and error answers built from the request as section
//! 8.3 says (the request copied back with R set and the result code).
//! Addresses are IPv4-mapped IPv6 (::ffff:a.b.c.d); this gateway is IPv4.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const VERSION: u8 = 2;
pub const OP_ANNOUNCE: u8 = 0;
pub const OP_MAP: u8 = 1;
pub const OP_PEER: u8 = 2;
const RESPONSE_BIT: u8 = 0x80;
pub const HEADER_LEN: usize = 24;
pub const MAP_LEN: usize = 36;
/// The largest PCP message (section 7).
pub const MAX_MESSAGE: usize = 1100;

pub const PROTOCOL_ALL: u8 = 0;
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;

pub const OPTION_THIRD_PARTY: u8 = 1;
pub const OPTION_PREFER_FAILURE: u8 = 2;
pub const OPTION_FILTER: u8 = 3;

/// RFC 6887 section 7.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResultCode {
    Success = 0,
    UnsuppVersion = 1,
    NotAuthorized = 2,
    MalformedRequest = 3,
    UnsuppOpcode = 4,
    UnsuppOption = 5,
    MalformedOption = 6,
    NetworkFailure = 7,
    NoResources = 8,
    UnsuppProtocol = 9,
    UserExQuota = 10,
    CannotProvideExternal = 11,
    AddressMismatch = 12,
    ExcessiveRemotePeers = 13,
}

impl ResultCode {
    pub fn from_u8(code: u8) -> Option<Self> {
        use ResultCode::*;
        Some(match code {
            0 => Success,
            1 => UnsuppVersion,
            2 => NotAuthorized,
            3 => MalformedRequest,
            4 => UnsuppOpcode,
            5 => UnsuppOption,
            6 => MalformedOption,
            7 => NetworkFailure,
            8 => NoResources,
            9 => UnsuppProtocol,
            10 => UserExQuota,
            11 => CannotProvideExternal,
            12 => AddressMismatch,
            13 => ExcessiveRemotePeers,
            _ => return None,
        })
    }

    /// The lifetime of an error answer: how long the client should wait
    /// before asking the same again. Short for what may pass (resources,
    /// network), long for what will not (section 7.4's advice).
    pub fn error_lifetime(self) -> u32 {
        match self {
            Self::NetworkFailure | Self::NoResources | Self::UserExQuota => 30,
            _ => 1800,
        }
    }
}

pub fn mapped(address: Ipv4Addr) -> [u8; 16] {
    address.to_ipv6_mapped().octets()
}

pub fn unmapped(bytes: [u8; 16]) -> Option<Ipv4Addr> {
    Ipv6Addr::from(bytes).to_ipv4_mapped()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcpOption {
    pub code: u8,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRequest {
    pub nonce: [u8; 12],
    pub protocol: u8,
    pub internal_port: u16,
    pub suggested_external_port: u16,
    pub suggested_external_address: [u8; 16],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Announce,
    Map(MapRequest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub lifetime: u32,
    /// The client's own idea of its address (the PCP client IP field).
    pub client_address: [u8; 16],
    pub body: Body,
    pub options: Vec<PcpOption>,
}

/// A request this server refuses to read: silently (`None`) or with the
/// error answer already built.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub Option<Vec<u8>>);

/// The error answer for `request` (section 8.3): its first 1100 bytes with
/// R set, the result code, the error lifetime and the epoch.
pub fn error_answer(request: &[u8], result: ResultCode, epoch: u32) -> Vec<u8> {
    let mut out = request[..request.len().min(MAX_MESSAGE)].to_vec();
    // A request too short for a header still gets a full one back.
    out.resize(out.len().max(HEADER_LEN), 0);
    out.truncate(out.len() & !3);
    fill_header(&mut out, result, result.error_lifetime(), epoch);
    out
}

fn fill_header(out: &mut [u8], result: ResultCode, lifetime: u32, epoch: u32) {
    out[0] = VERSION;
    out[1] |= RESPONSE_BIT;
    out[2] = 0;
    out[3] = result as u8;
    out[4..8].copy_from_slice(&lifetime.to_be_bytes());
    out[8..12].copy_from_slice(&epoch.to_be_bytes());
    out[12..24].fill(0);
}

pub fn parse_request(bytes: &[u8], epoch: u32) -> Result<Request, Refused> {
    // Section 8.3: under two bytes, or an answer, is dropped without a word.
    if bytes.len() < 2 || bytes[1] & RESPONSE_BIT != 0 {
        return Err(Refused(None));
    }
    let refuse = |code| Err(Refused(Some(error_answer(bytes, code, epoch))));
    if bytes[0] != VERSION {
        return refuse(ResultCode::UnsuppVersion);
    }
    if bytes.len() < HEADER_LEN || bytes.len() > MAX_MESSAGE || !bytes.len().is_multiple_of(4) {
        return refuse(ResultCode::MalformedRequest);
    }
    let opcode = bytes[1] & !RESPONSE_BIT;
    let lifetime = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let client_address: [u8; 16] = bytes[8..24].try_into().expect("16 bytes");
    let (body, rest) = match opcode {
        OP_ANNOUNCE => (Body::Announce, &bytes[HEADER_LEN..]),
        OP_MAP => {
            let Some(map) = bytes.get(HEADER_LEN..HEADER_LEN + MAP_LEN) else {
                return refuse(ResultCode::MalformedRequest);
            };
            let request = MapRequest {
                nonce: map[0..12].try_into().expect("12 bytes"),
                protocol: map[12],
                internal_port: u16::from_be_bytes([map[16], map[17]]),
                suggested_external_port: u16::from_be_bytes([map[18], map[19]]),
                suggested_external_address: map[20..36].try_into().expect("16 bytes"),
            };
            (Body::Map(request), &bytes[HEADER_LEN + MAP_LEN..])
        }
        _ => return refuse(ResultCode::UnsuppOpcode),
    };
    let mut options = Vec::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let [code, _, l0, l1, ref tail @ ..] = *rest else {
            return refuse(ResultCode::MalformedOption);
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let padded = len.div_ceil(4) * 4;
        let Some(data) = tail.get(..len) else {
            return refuse(ResultCode::MalformedOption);
        };
        options.push(PcpOption {
            code,
            data: data.to_vec(),
        });
        rest = tail.get(padded..).unwrap_or_default();
    }
    Ok(Request {
        lifetime,
        client_address,
        body,
        options,
    })
}

pub fn encode_request(request: &Request) -> Vec<u8> {
    let opcode = match request.body {
        Body::Announce => OP_ANNOUNCE,
        Body::Map(_) => OP_MAP,
    };
    let mut out = vec![VERSION, opcode, 0, 0];
    out.extend_from_slice(&request.lifetime.to_be_bytes());
    out.extend_from_slice(&request.client_address);
    if let Body::Map(map) = &request.body {
        encode_map(&mut out, map);
    }
    for option in &request.options {
        out.push(option.code);
        out.push(0);
        out.extend_from_slice(&(option.data.len() as u16).to_be_bytes());
        out.extend_from_slice(&option.data);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    out
}

fn encode_map(out: &mut Vec<u8>, map: &MapRequest) {
    out.extend_from_slice(&map.nonce);
    out.extend_from_slice(&[map.protocol, 0, 0, 0]);
    out.extend_from_slice(&map.internal_port.to_be_bytes());
    out.extend_from_slice(&map.suggested_external_port.to_be_bytes());
    out.extend_from_slice(&map.suggested_external_address);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub opcode: u8,
    pub result: ResultCode,
    pub lifetime: u32,
    pub epoch: u32,
    /// For MAP: the nonce and protocol echoed, the internal port, and the
    /// assigned external port and address.
    pub map: Option<MapRequest>,
}

pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut out = vec![0; HEADER_LEN];
    out[1] = response.opcode;
    fill_header(&mut out, response.result, response.lifetime, response.epoch);
    if let Some(map) = &response.map {
        encode_map(&mut out, map);
    }
    out
}

pub fn parse_response(bytes: &[u8]) -> Option<Response> {
    if bytes.len() < HEADER_LEN || bytes[0] != VERSION || bytes[1] & RESPONSE_BIT == 0 {
        return None;
    }
    let opcode = bytes[1] & !RESPONSE_BIT;
    let map = match (opcode, bytes.get(HEADER_LEN..HEADER_LEN + MAP_LEN)) {
        (OP_MAP, Some(map)) => Some(MapRequest {
            nonce: map[0..12].try_into().ok()?,
            protocol: map[12],
            internal_port: u16::from_be_bytes([map[16], map[17]]),
            suggested_external_port: u16::from_be_bytes([map[18], map[19]]),
            suggested_external_address: map[20..36].try_into().ok()?,
        }),
        _ => None,
    };
    Some(Response {
        opcode,
        result: ResultCode::from_u8(bytes[3])?,
        lifetime: u32::from_be_bytes(bytes[4..8].try_into().ok()?),
        epoch: u32::from_be_bytes(bytes[8..12].try_into().ok()?),
        map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_request() -> Request {
        Request {
            lifetime: 3600,
            client_address: mapped(Ipv4Addr::new(10, 0, 0, 2)),
            body: Body::Map(MapRequest {
                nonce: *b"0123456789ab",
                protocol: PROTOCOL_UDP,
                internal_port: 60001,
                suggested_external_port: 60001,
                suggested_external_address: [0; 16],
            }),
            options: vec![PcpOption {
                code: OPTION_PREFER_FAILURE,
                data: vec![],
            }],
        }
    }

    #[test]
    fn requests_round_trip() {
        let request = map_request();
        let bytes = encode_request(&request);
        assert_eq!(bytes.len(), HEADER_LEN + MAP_LEN + 4);
        assert_eq!(parse_request(&bytes, 0), Ok(request));
        let announce = Request {
            lifetime: 0,
            client_address: mapped(Ipv4Addr::new(10, 0, 0, 2)),
            body: Body::Announce,
            options: vec![],
        };
        assert_eq!(parse_request(&encode_request(&announce), 0), Ok(announce));
        // An option with data, padded to four bytes.
        let mut third_party = map_request();
        third_party.options = vec![PcpOption {
            code: OPTION_THIRD_PARTY,
            data: mapped(Ipv4Addr::new(10, 0, 0, 3)).to_vec(),
        }];
        assert_eq!(
            parse_request(&encode_request(&third_party), 0),
            Ok(third_party)
        );
    }

    #[test]
    fn responses_round_trip() {
        let Body::Map(map) = map_request().body else {
            unreachable!()
        };
        let response = Response {
            opcode: OP_MAP,
            result: ResultCode::Success,
            lifetime: 120,
            epoch: 7,
            map: Some(map),
        };
        let bytes = encode_response(&response);
        assert_eq!(bytes.len(), HEADER_LEN + MAP_LEN);
        assert_eq!(bytes[1], OP_MAP | RESPONSE_BIT);
        assert_eq!(parse_response(&bytes), Some(response));
    }

    #[test]
    fn malformed_requests_get_the_codes_of_section_8_3() {
        let code = |bytes: &[u8]| match parse_request(bytes, 5) {
            Err(Refused(Some(answer))) => {
                assert_eq!(answer[0], VERSION);
                assert_ne!(answer[1] & RESPONSE_BIT, 0);
                assert_eq!(&answer[8..12], &5u32.to_be_bytes());
                assert_eq!(answer.len() % 4, 0);
                ResultCode::from_u8(answer[3])
            }
            other => panic!("{bytes:?}: {other:?}"),
        };
        let good = encode_request(&map_request());
        assert_eq!(parse_request(&good[..1], 0), Err(Refused(None)));
        let mut answer = good.clone();
        answer[1] |= RESPONSE_BIT;
        assert_eq!(parse_request(&answer, 0), Err(Refused(None)));
        let mut v3 = good.clone();
        v3[0] = 3;
        assert_eq!(code(&v3), Some(ResultCode::UnsuppVersion));
        assert_eq!(code(&good[..22]), Some(ResultCode::MalformedRequest));
        assert_eq!(
            code(&good[..HEADER_LEN + 8]),
            Some(ResultCode::MalformedRequest)
        );
        assert_eq!(
            code(&good[..good.len() - 2]),
            Some(ResultCode::MalformedRequest)
        );
        let mut peer = good.clone();
        peer[1] = OP_PEER;
        assert_eq!(code(&peer), Some(ResultCode::UnsuppOpcode));
        // An option whose length runs past the message.
        let mut long_option = good.clone();
        long_option[HEADER_LEN + MAP_LEN + 3] = 40;
        assert_eq!(code(&long_option), Some(ResultCode::MalformedOption));
        assert_eq!(code(&vec![2; 1104]), Some(ResultCode::MalformedRequest));
    }

    #[test]
    fn addresses_are_ipv4_mapped() {
        let address = Ipv4Addr::new(198, 51, 100, 7);
        assert_eq!(unmapped(mapped(address)), Some(address));
        assert_eq!(unmapped([0; 16]), None);
        assert_eq!(ResultCode::from_u8(12), Some(ResultCode::AddressMismatch));
        assert_eq!(ResultCode::from_u8(14), None);
    }
}
