//! The LAN host's side (`forwarder mosh-server --gateway`): ask the router
//! for a UDP mapping with NAT-PMP, or with PCP when the gateway speaks only
//! that, resending on RFC 6886's schedule (250 ms, doubling) until a deadline.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{natpmp, pcp};

/// What the gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub external_address: Ipv4Addr,
    pub external_port: u16,
    pub internal_port: u16,
    pub lifetime: u32,
    /// "NAT-PMP" or "PCP".
    pub protocol: &'static str,
}

/// The default route's gateway, where NAT-PMP and PCP servers listen.
pub fn default_gateway() -> anyhow::Result<Ipv4Addr> {
    let output = std::process::Command::new("ip")
        .args(["-j", "-4", "route", "show", "default"])
        .output()
        .context("running `ip route` (is iproute2 installed?)")?;
    let routes: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing `ip -j route` output")?;
    routes
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|route| route["gateway"].as_str()?.parse().ok())
        .context(
            "this host has no default gateway: give the router's LAN address with --gateway ADDR",
        )
}

/// Sends `request` until an answer `accept` takes arrives, or `deadline`.
fn exchange<T>(
    socket: &UdpSocket,
    request: &[u8],
    deadline: Instant,
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut pause = Duration::from_millis(250);
    let mut buf = [0u8; 1100];
    while Instant::now() < deadline {
        let _ = socket.send(request);
        let resend_at = (Instant::now() + pause).min(deadline);
        pause *= 2;
        while let Some(left) = resend_at
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if socket.set_read_timeout(Some(left)).is_err() {
                return None;
            }
            // Timeouts, and ICMP port-unreachable from a gateway without the service.
            let Ok(len) = socket.recv(&mut buf) else {
                continue;
            };
            if let Some(answer) = accept(&buf[..len]) {
                return Some(answer);
            }
        }
    }
    None
}

fn connected(gateway: Ipv4Addr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
    socket
        .connect((gateway, natpmp::SERVER_PORT))
        .with_context(|| format!("no route to the gateway {gateway}"))?;
    Ok(socket)
}

/// Maps UDP `internal_port` of this host (lifetime 0 deletes), trying
/// NAT-PMP first and PCP second.
pub fn map(
    gateway: Ipv4Addr,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
    timeout: Duration,
) -> anyhow::Result<Mapping> {
    let socket = connected(gateway)?;
    // Half the time for NAT-PMP, so PCP gets its turn.
    let halfway = Instant::now() + timeout / 2;
    let public = exchange(
        &socket,
        &natpmp::encode_request(&natpmp::Request::PublicAddress),
        halfway,
        |bytes| match natpmp::parse_response(bytes)? {
            natpmp::Response::PublicAddress {
                result, address, ..
            } => Some(Ok((result, address))),
            // A PCP-only server answers version 0 with UNSUPP_VERSION.
            natpmp::Response::Bare { result, .. } => Some(Err(result)),
            natpmp::Response::Map { .. } => None,
        },
    );
    match public {
        Some(Ok((natpmp::ResultCode::Success, address))) => {
            map_natpmp(&socket, address, internal_port, suggested_external_port, lifetime, halfway + timeout / 2)
        }
        Some(Ok((result, _))) | Some(Err(result)) if result != natpmp::ResultCode::UnsupportedVersion => {
            bail!("the gateway {gateway} refused NAT-PMP's address request ({result:?})")
        }
        _ => map_pcp(&socket, internal_port, suggested_external_port, lifetime, Instant::now() + timeout / 2)
            .with_context(|| {
                format!(
                    "the gateway {gateway} answered neither NAT-PMP nor PCP on UDP {}: is it a forwarder \
                     router with --gateway on this side (or another NAT-PMP/PCP gateway)?",
                    natpmp::SERVER_PORT
                )
            }),
    }
}

fn map_natpmp(
    socket: &UdpSocket,
    external_address: Ipv4Addr,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
    deadline: Instant,
) -> anyhow::Result<Mapping> {
    let request = natpmp::encode_request(&natpmp::Request::Map {
        opcode: natpmp::OP_MAP_UDP,
        internal_port,
        suggested_external_port,
        lifetime,
    });
    let answer = exchange(
        socket,
        &request,
        deadline,
        |bytes| match natpmp::parse_response(bytes)? {
            natpmp::Response::Map {
                opcode: natpmp::OP_MAP_UDP,
                result,
                internal_port: answered,
                external_port,
                lifetime,
                ..
            } if answered == internal_port => Some((result, external_port, lifetime)),
            _ => None,
        },
    )
    .context("the gateway answered NAT-PMP's address request but not the mapping request")?;
    match answer {
        (natpmp::ResultCode::Success, external_port, lifetime) => Ok(Mapping {
            external_address,
            external_port,
            internal_port,
            lifetime,
            protocol: "NAT-PMP",
        }),
        (result, ..) => bail!(
            "the gateway refused to map UDP port {internal_port} ({result:?}); its log says why \
             (permission rules, secure mode, quota, or no free port)"
        ),
    }
}

fn map_pcp(
    socket: &UdpSocket,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime: u32,
    deadline: Instant,
) -> anyhow::Result<Mapping> {
    let SocketAddr::V4(local) = socket.local_addr()? else {
        bail!("the socket towards the gateway is not IPv4");
    };
    let nonce: [u8; 12] = rand::random();
    let request = pcp::encode_request(&pcp::Request {
        lifetime,
        client_address: pcp::mapped(*local.ip()),
        body: pcp::Body::Map(pcp::MapRequest {
            nonce,
            protocol: pcp::PROTOCOL_UDP,
            internal_port,
            suggested_external_port,
            suggested_external_address: [0; 16],
        }),
        options: Vec::new(),
    });
    let response = exchange(socket, &request, deadline, |bytes| {
        let response = pcp::parse_response(bytes)?;
        (response.map.as_ref()?.nonce == nonce).then_some(response)
    })
    .context("no PCP answer")?;
    let map = response.map.expect("checked above");
    if response.result != pcp::ResultCode::Success {
        bail!(
            "the gateway refused to map UDP port {internal_port} ({:?}); its log says why",
            response.result
        );
    }
    Ok(Mapping {
        external_address: pcp::unmapped(map.suggested_external_address)
            .context("the gateway's PCP answer holds no IPv4 external address")?,
        external_port: map.suggested_external_port,
        internal_port,
        lifetime: response.lifetime,
        protocol: "PCP",
    })
}

/// A UDP port free on this host: the kernel's pick, or `preferred` if free.
pub fn free_local_port(preferred: u16) -> anyhow::Result<u16> {
    if preferred != 0
        && UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, preferred)).is_ok()
    {
        return Ok(preferred);
    }
    Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .context("binding a local UDP port for mosh-server")?
        .local_addr()?
        .port())
}
