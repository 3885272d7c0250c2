//! The gateway's sockets, all on the LAN side: per LAN interface, UDP 5351
//! (NAT-PMP and PCP, told apart by the version byte) at the interface's
//! address, SSDP on 1900 in the multicast group, and the IGD's HTTP port.
//! Every socket is bound to its interface (SO_BINDTODEVICE), so a request
//! arriving from the WAN side, even one addressed to the LAN address, is
//! never read. [`start`] binds them all (a port in use fails the daemon's
//! start, with the cause) and returns the future the daemon runs.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, info, warn};

use super::leases::Protocol;
use super::{
    Ask, Gateway, GatewayOptions, LanInterface, Refusal, SharedGateway, natpmp, pcp, upnp,
};
use crate::control::server::StartReader;
use crate::ports::PortRange;
use crate::sessions::SharedRelay;

/// What [`start`] needs from the daemon.
pub struct Parts {
    pub relay: SharedRelay,
    pub start_reader: StartReader,
    pub options: GatewayOptions,
    pub relay_interfaces: Vec<String>,
    pub session_ports: PortRange,
    pub state_dir: std::path::PathBuf,
    pub instance: String,
}

fn lan_socket(lan: &LanInterface, kind: Type, address: SocketAddrV4) -> anyhow::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, kind, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind_device(Some(lan.name.as_bytes()))
        .with_context(|| format!("binding a gateway socket to {}", lan.name))?;
    socket.bind(&address.into()).with_context(|| {
        format!(
            "binding {address} on {} for the gateway: another program (miniupnpd?) holds it; stop it",
            lan.name
        )
    })?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

struct LanSockets {
    lan: LanInterface,
    control: UdpSocket,
    ssdp: UdpSocket,
    http: TcpListener,
}

fn bind(lan: &LanInterface, http_port: u16) -> anyhow::Result<LanSockets> {
    let control = lan_socket(
        lan,
        Type::DGRAM,
        SocketAddrV4::new(lan.address, natpmp::SERVER_PORT),
    )?;
    control.set_multicast_if_v4(&lan.address)?;
    control.set_multicast_loop_v4(false)?;
    let ssdp = lan_socket(
        lan,
        Type::DGRAM,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, upnp::SSDP_PORT),
    )?;
    ssdp.join_multicast_v4(&upnp::SSDP_ADDRESS, &lan.address)
        .with_context(|| format!("joining the SSDP group on {}", lan.name))?;
    let http = lan_socket(lan, Type::STREAM, SocketAddrV4::new(lan.address, http_port))?;
    http.listen(64)?;
    Ok(LanSockets {
        lan: lan.clone(),
        control: UdpSocket::from_std(control.into())?,
        ssdp: UdpSocket::from_std(ssdp.into())?,
        http: TcpListener::from_std(http.into())?,
    })
}

/// Builds the gateway (restoring its stored leases), binds every socket,
/// and returns the future that serves them and ends leases on time.
pub fn start(
    parts: Parts,
) -> anyhow::Result<(
    SharedGateway,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let (lan, external) = super::interfaces(&parts.relay_interfaces, &parts.options.interfaces)?;
    let http_port = parts.options.upnp_http_port;
    for (port, what) in [
        (http_port, "--gateway-upnp-port"),
        (natpmp::SERVER_PORT, "NAT-PMP/PCP's port"),
        (upnp::SSDP_PORT, "SSDP's port"),
    ] {
        if parts.session_ports.contains(port) {
            anyhow::bail!(
                "{what} {port} lies inside --ports {}: mappings would compete with the gateway's own \
                 port; give --ports a range without it",
                parts.session_ports
            );
        }
    }
    let sockets = lan
        .iter()
        .map(|lan| bind(lan, http_port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = super::leases::LeaseStore::open(&parts.state_dir)?;
    let gateway = Arc::new(Gateway::new(
        parts.relay,
        parts.start_reader,
        parts.options,
        lan,
        external,
        parts.session_ports,
        store,
    )?);
    let uuid = upnp::device_uuid(&parts.instance, external);
    let served = gateway.clone();
    let future = async move {
        let mut tasks = tokio::task::JoinSet::new();
        for sockets in sockets {
            let control = Arc::new(sockets.control);
            tasks.spawn(announce(served.clone(), control.clone()));
            tasks.spawn(serve_control(served.clone(), control));
            let location = format!(
                "http://{}:{http_port}{}",
                sockets.lan.address,
                upnp::DESCRIPTION_PATH
            );
            tasks.spawn(serve_ssdp(sockets.ssdp, uuid.clone(), location));
            tasks.spawn(serve_http(
                served.clone(),
                sockets.http,
                uuid.clone(),
                sockets.lan.address,
                http_port,
            ));
        }
        tasks.spawn(expire_forever(served));
        while tasks.join_next().await.is_some() {}
    };
    Ok((gateway, future))
}

async fn expire_forever(gateway: SharedGateway) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        gateway.expire();
    }
}

/// The unsolicited announcements a restarted gateway owes its LAN (RFC 6886
/// 3.2.1, RFC 6887 14.1.3): the public address and a PCP ANNOUNCE to
/// 224.0.0.1:5350, three times a quarter, half and one second apart
/// (clients that kept mappings renew them; the epoch tells them whether
/// they survived).
async fn announce(gateway: SharedGateway, socket: Arc<UdpSocket>) {
    let all_hosts = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), natpmp::CLIENT_PORT);
    let mut pause = Duration::from_millis(250);
    for _ in 0..3 {
        let public = natpmp::encode_response(&natpmp::Response::PublicAddress {
            result: natpmp::ResultCode::Success,
            epoch: gateway.epoch(),
            address: gateway.external_address,
        });
        let announce = pcp::encode_response(&pcp::Response {
            opcode: pcp::OP_ANNOUNCE,
            result: pcp::ResultCode::Success,
            lifetime: 0,
            epoch: gateway.epoch(),
            map: None,
        });
        for datagram in [public, announce] {
            if let Err(error) = socket.send_to(&datagram, all_hosts).await {
                debug!(%error, "gateway announcement");
            }
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

async fn serve_control(gateway: SharedGateway, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                debug!(%error, "gateway socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        // Each request on its own task: a map waits on a route lookup.
        let gateway = gateway.clone();
        let socket = socket.clone();
        let request = buf[..len].to_vec();
        tokio::spawn(async move {
            if let Some(answer) = answer_control(&gateway, from, &request).await
                && let Err(error) = socket.send_to(&answer, from).await
            {
                debug!(%error, %from, "answering a NAT-PMP/PCP request");
            }
        });
    }
}

/// The answer to one datagram on port 5351, if it gets one.
pub async fn answer_control(
    gateway: &Gateway,
    from: SocketAddrV4,
    request: &[u8],
) -> Option<Vec<u8>> {
    match request.first()? {
        &natpmp::VERSION | 1 => answer_natpmp(gateway, from, request).await,
        _ => answer_pcp(gateway, from, request).await,
    }
}

fn natpmp_code(refusal: &Refusal) -> natpmp::ResultCode {
    match refusal {
        Refusal::SecureMode { .. } | Refusal::NotAllowed(_) | Refusal::NonceMismatch => {
            natpmp::ResultCode::NotAuthorized
        }
        Refusal::Quota { .. } | Refusal::PortTaken(_) | Refusal::NoResources(_) => {
            natpmp::ResultCode::OutOfResources
        }
        Refusal::NotFound => natpmp::ResultCode::Success,
    }
}

async fn answer_natpmp(gateway: &Gateway, from: SocketAddrV4, request: &[u8]) -> Option<Vec<u8>> {
    use natpmp::{Malformed, Request as R, Response, ResultCode};
    let epoch = gateway.epoch();
    let response = match natpmp::parse_request(request) {
        Err(Malformed::Ignore) => return None,
        Err(Malformed::UnsupportedVersion) => Response::Bare {
            opcode: 0,
            result: ResultCode::UnsupportedVersion,
            epoch,
        },
        Err(Malformed::UnsupportedOpcode(opcode)) => Response::Bare {
            opcode,
            result: ResultCode::UnsupportedOpcode,
            epoch,
        },
        Ok(R::PublicAddress) => Response::PublicAddress {
            result: ResultCode::Success,
            epoch,
            address: gateway.external_address,
        },
        Ok(R::Map {
            opcode,
            internal_port,
            suggested_external_port,
            lifetime,
        }) => {
            let refused = |result| Response::Map {
                opcode,
                result,
                epoch,
                internal_port,
                external_port: 0,
                lifetime: 0,
            };
            if opcode == natpmp::OP_MAP_TCP {
                // The relay forwards UDP only.
                warn!(protocol = %Protocol::NatPmp, requester = %from.ip(), internal_port, "gateway mapping refused: TCP is not forwarded");
                refused(ResultCode::UnsupportedOpcode)
            } else if internal_port == 0 && lifetime != 0 {
                refused(ResultCode::NotAuthorized)
            } else {
                let ask = Ask {
                    protocol: Protocol::NatPmp,
                    requester: *from.ip(),
                    internal: SocketAddrV4::new(*from.ip(), internal_port),
                    suggested_external_port,
                    lifetime,
                    nonce: None,
                    description: String::new(),
                    exact_port: false,
                };
                match gateway.map(ask).await {
                    Ok(granted) => Response::Map {
                        opcode,
                        result: ResultCode::Success,
                        epoch: gateway.epoch(),
                        internal_port,
                        external_port: granted.external_port,
                        lifetime: granted.lifetime,
                    },
                    Err(refusal) => refused(natpmp_code(&refusal)),
                }
            }
        }
    };
    Some(natpmp::encode_response(&response))
}

fn pcp_code(refusal: &Refusal, exact: bool) -> pcp::ResultCode {
    use pcp::ResultCode as C;
    match refusal {
        Refusal::SecureMode { .. } | Refusal::NonceMismatch => C::NotAuthorized,
        Refusal::NotAllowed(_) if exact => C::CannotProvideExternal,
        Refusal::NotAllowed(_) => C::NotAuthorized,
        Refusal::Quota { .. } => C::UserExQuota,
        Refusal::PortTaken(_) => C::CannotProvideExternal,
        Refusal::NoResources(_) => C::NoResources,
        Refusal::NotFound => C::Success,
    }
}

async fn answer_pcp(gateway: &Gateway, from: SocketAddrV4, bytes: &[u8]) -> Option<Vec<u8>> {
    use pcp::ResultCode as C;
    let epoch = gateway.epoch();
    let request = match pcp::parse_request(bytes, epoch) {
        Ok(request) => request,
        Err(pcp::Refused(answer)) => return answer,
    };
    let refuse = |code: C, why: &str| {
        warn!(protocol = %Protocol::Pcp, requester = %from.ip(), result = ?code, "PCP request refused: {why}");
        Some(pcp::error_answer(bytes, code, epoch))
    };
    // Section 8.1: the client's own idea of its address must be what
    // arrived, or a NAT sits between it and this server.
    if pcp::unmapped(request.client_address) != Some(*from.ip()) {
        return refuse(
            C::AddressMismatch,
            "the client address field is not the datagram's source",
        );
    }
    let mut third_party = None;
    let mut prefer_failure = false;
    for option in &request.options {
        match (option.code, &request.body) {
            (pcp::OPTION_THIRD_PARTY, pcp::Body::Map(_)) => {
                let Some(address) = option
                    .data
                    .get(..16)
                    .and_then(|d| <[u8; 16]>::try_from(d).ok())
                    .and_then(pcp::unmapped)
                else {
                    return refuse(C::MalformedOption, "THIRD_PARTY without an IPv4 address");
                };
                third_party = Some(address);
            }
            (pcp::OPTION_PREFER_FAILURE, pcp::Body::Map(_)) => prefer_failure = true,
            // Optional-to-process options (128-255) are ignored; FILTER and
            // the unknown mandatory ones are not supported.
            (code, _) if code >= 128 => {}
            _ => return refuse(C::UnsuppOption, "an option this server does not support"),
        }
    }
    let map = match request.body {
        pcp::Body::Announce => {
            return Some(pcp::encode_response(&pcp::Response {
                opcode: pcp::OP_ANNOUNCE,
                result: C::Success,
                lifetime: 0,
                epoch,
                map: None,
            }));
        }
        pcp::Body::Map(map) => map,
    };
    let deleting = request.lifetime == 0;
    match map.protocol {
        pcp::PROTOCOL_UDP => {}
        pcp::PROTOCOL_ALL if deleting => {}
        _ => return refuse(C::UnsuppProtocol, "only UDP is forwarded"),
    }
    if map.internal_port == 0 && !deleting {
        return refuse(
            C::MalformedRequest,
            "internal port 0 maps every port, which this gateway does not",
        );
    }
    let internal_ip = third_party.unwrap_or(*from.ip());
    let ask = Ask {
        protocol: Protocol::Pcp,
        requester: *from.ip(),
        internal: SocketAddrV4::new(internal_ip, map.internal_port),
        suggested_external_port: map.suggested_external_port,
        lifetime: request.lifetime,
        nonce: Some(map.nonce),
        description: String::new(),
        exact_port: prefer_failure,
    };
    match gateway.map(ask).await {
        Ok(granted) => Some(pcp::encode_response(&pcp::Response {
            opcode: pcp::OP_MAP,
            result: C::Success,
            lifetime: granted.lifetime,
            epoch: gateway.epoch(),
            map: Some(pcp::MapRequest {
                suggested_external_port: granted.external_port,
                suggested_external_address: if deleting {
                    map.suggested_external_address
                } else {
                    pcp::mapped(gateway.external_address)
                },
                ..map
            }),
        })),
        Err(refusal) => Some(pcp::error_answer(
            bytes,
            pcp_code(&refusal, prefer_failure),
            epoch,
        )),
    }
}

async fn serve_ssdp(socket: UdpSocket, uuid: String, location: String) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                debug!(%error, "SSDP socket");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        for answer in upnp::ssdp_answers(&buf[..len], &uuid, &location) {
            if let Err(error) = socket.send_to(answer.as_bytes(), from).await {
                debug!(%error, %from, "answering an SSDP search");
            }
        }
    }
}

async fn serve_http(
    gateway: SharedGateway,
    listener: TcpListener,
    uuid: String,
    address: Ipv4Addr,
    port: u16,
) {
    let base = format!("http://{address}:{port}/");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting an IGD connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(peer) = peer else { continue };
        let gateway = gateway.clone();
        let uuid = uuid.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                let uuid = uuid.clone();
                let base = base.clone();
                async move {
                    Ok::<_, Infallible>(respond(&gateway, *peer.ip(), request, &uuid, &base).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%error, "IGD connection");
            }
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/xml; charset=\"utf-8\""),
    );
    response
}

async fn respond(
    gateway: &Gateway,
    requester: Ipv4Addr,
    request: Request<hyper::body::Incoming>,
    uuid: &str,
    base: &str,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, upnp::DESCRIPTION_PATH) => {
            reply(StatusCode::OK, upnp::description(uuid, base))
        }
        (&Method::POST, path @ (upnp::WANIP_CONTROL_PATH | upnp::COMMON_CONTROL_PATH)) => {
            let service = if path == upnp::WANIP_CONTROL_PATH {
                upnp::WANIP
            } else {
                upnp::COMMON
            };
            let header = request
                .headers()
                .get("soapaction")
                .and_then(|value| value.to_str().ok())
                .and_then(upnp::soap_action)
                .map(|(service, action)| (service.to_string(), action.to_string()));
            let body = match Limited::new(request.into_body(), upnp::MAX_SOAP_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return reply(StatusCode::PAYLOAD_TOO_LARGE, String::new());
                }
            };
            let action = match upnp::parse_action(&body) {
                Ok(action) => action,
                Err(why) => {
                    debug!(%requester, why, "a SOAP request that does not parse");
                    return reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        upnp::UpnpError::INVALID_ACTION.fault(),
                    );
                }
            };
            if header
                .as_ref()
                .is_some_and(|(s, a)| s != service || *a != action.name)
            {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    upnp::UpnpError::INVALID_ACTION.fault(),
                );
            }
            match upnp::handle(gateway, requester, service, &action).await {
                Ok(values) => reply(
                    StatusCode::OK,
                    upnp::response(service, &action.name, &values),
                ),
                Err(error) => {
                    info!(%requester, action = action.name, code = error.code, "UPnP action refused: {}", error.description);
                    reply(StatusCode::INTERNAL_SERVER_ERROR, error.fault())
                }
            }
        }
        _ => reply(StatusCode::NOT_FOUND, String::new()),
    }
}
