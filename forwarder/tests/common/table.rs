//! The fixture table (Katran-style): every row names its input frame, the
//! map state it needs, the reason it must end with (which implies the
//! verdict) and the output it must produce. Each test binary keeps the rows
//! of its concern. Each row runs once on a fresh copy of the program inside
//! a [`Namespace`], so route lookups see the same neighbours every time and
//! no row's counters leak into another's.

use etherparse::{Ipv4Header, UdpHeader};
use forwarder_common::Reason;

use super::namespace::{Namespace, Topology};
use super::six::{Shape, assert_checksums};
use super::{
    BACK_MAC, BACKEND, BACKEND_MAC, BACKEND_PORT, CLIENT, CLIENT_MAC, CLIENT_PORT, FLOW_PORT,
    FRONT_MAC, IP, NEAR_BACKEND, NEAR_BACKEND_MAC, RELAY_BACK, RELAY_FRONT, Relay, SESSION_PORT,
    UDP, edit_ip, install_backend_flow, install_client_flow, verdict_retval,
};

/// Map state a fixture needs.
#[derive(Clone, Copy, Default)]
pub struct Maps {
    /// Client half `CLIENT:CLIENT_PORT → RELAY_FRONT:SESSION_PORT` towards this backend.
    pub client_flow_to: Option<[u8; 4]>,
    /// Backend half on `RELAY_BACK:FLOW_PORT`, accepted from BACKEND on `back` only.
    pub backend_flow: bool,
    /// Slow-path buckets: (session port, packets per second), and the global rate.
    pub session_bucket: Option<(u16, u32)>,
    pub global_bucket: Option<u32>,
    /// Both halves of an IPv6 or translated flow (see `six::Shape`), and
    /// whether its backend half hands unknown sources to the daemon.
    pub six: Option<(Shape, bool)>,
}

/// Which interface a frame arrives on.
#[derive(Clone, Copy)]
pub enum Ingress {
    Front,
    Back,
}

/// What must come out.
#[derive(Clone, Copy)]
pub enum Output {
    /// Passed or dropped: the very input bytes.
    Untouched,
    /// Rewritten like a router: (source MAC, destination MAC), new source, new destination.
    Forwarded(([u8; 6], [u8; 6]), ([u8; 4], u16), ([u8; 4], u16)),
    /// Exactly this frame, built from scratch by etherparse (IPv6 and
    /// translated output).
    Built(fn() -> Vec<u8>),
}

struct Fixture {
    name: String,
    frame: Vec<u8>,
    maps: Maps,
    ingress: Ingress,
    reason: Reason,
    output: Output,
}

pub const TO_NEAR_BACKEND: Output = Output::Forwarded(
    (FRONT_MAC, NEAR_BACKEND_MAC),
    (RELAY_FRONT, FLOW_PORT),
    (NEAR_BACKEND, BACKEND_PORT),
);
pub const TO_BACKEND: Output = Output::Forwarded(
    (BACK_MAC, BACKEND_MAC),
    (RELAY_BACK, FLOW_PORT),
    (BACKEND, BACKEND_PORT),
);
pub const TO_CLIENT: Output = Output::Forwarded(
    (FRONT_MAC, CLIENT_MAC),
    (RELAY_FRONT, SESSION_PORT),
    (CLIENT, CLIENT_PORT),
);

pub const NEAR_FLOW: Maps = Maps {
    client_flow_to: Some(NEAR_BACKEND),
    backend_flow: false,
    session_bucket: None,
    global_bucket: None,
    six: None,
};
pub const FAR_FLOW: Maps = Maps {
    client_flow_to: Some(BACKEND),
    ..NEAR_FLOW
};
pub const BACKEND_FLOW: Maps = Maps {
    client_flow_to: None,
    backend_flow: true,
    ..NEAR_FLOW
};
pub const NO_FLOWS: Maps = Maps {
    client_flow_to: None,
    ..NEAR_FLOW
};

impl Relay {
    /// Installs `maps`; must run inside the namespace (the devmap resolves ifindexes there).
    pub fn install(&mut self, maps: Maps, topo: Topology) {
        // First: a backend half names the slot its backend arrives on.
        self.add_egress(topo.front);
        self.add_egress(topo.back);
        if let Some(backend) = maps.client_flow_to {
            install_client_flow(self, (backend, BACKEND_PORT));
        }
        if maps.backend_flow {
            install_backend_flow(self, topo.back);
        }
        if let Some((port, pps)) = maps.session_bucket {
            self.set_session_bucket(port, pps);
        }
        if let Some(pps) = maps.global_bucket {
            self.set_global_bucket(pps);
        }
        if let Some((shape, nat)) = maps.six {
            shape.install(self, topo, nat);
        }
    }
}

/// Rows of one concern, run together in one namespace.
#[derive(Default)]
pub struct Table {
    rows: Vec<Fixture>,
}

impl Table {
    /// A row whose frame arrives on the client side (`front`).
    pub fn row(&mut self, name: &str, frame: Vec<u8>, maps: Maps, reason: Reason, output: Output) {
        self.row_on(name, frame, maps, Ingress::Front, reason, output);
    }

    pub fn row_on(
        &mut self,
        name: &str,
        frame: Vec<u8>,
        maps: Maps,
        ingress: Ingress,
        reason: Reason,
        output: Output,
    ) {
        self.rows.push(Fixture {
            name: name.to_string(),
            frame,
            maps,
            ingress,
            reason,
            output,
        });
    }

    /// Runs every row, each on a fresh copy of the program.
    pub fn run(self) {
        let ns = Namespace::create();
        ns.enter(|topo| {
            for fixture in &self.rows {
                let mut relay = Relay::load();
                relay.install(fixture.maps, topo);
                let ingress = match fixture.ingress {
                    Ingress::Front => topo.front,
                    Ingress::Back => topo.back,
                };
                println!("fixture: {}", fixture.name);
                let run = relay.expect(
                    &fixture.frame,
                    Some(ingress),
                    fixture.reason,
                    verdict_retval(fixture.reason),
                );
                match fixture.output {
                    Output::Untouched => assert_eq!(run.out, fixture.frame, "{}", fixture.name),
                    Output::Forwarded(macs, src, dst) => {
                        let want = expected_forward(&fixture.frame, macs, src, dst);
                        assert_eq!(run.out, want, "{}: output bytes", fixture.name);
                        assert_checksums_valid(&run.out);
                    }
                    Output::Built(build) => {
                        assert_eq!(run.out, build(), "{}: output bytes", fixture.name);
                        assert_checksums(&run.out);
                    }
                }
            }
        });
        println!("{} fixtures passed", self.rows.len());
    }
}

/// The frame a correct router-like rewrite produces from `input`: new MACs,
/// addresses and ports, TTL minus one, checksums recomputed by etherparse
/// (a zero UDP checksum stays zero).
pub fn expected_forward(
    input: &[u8],
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
) -> Vec<u8> {
    let mut frame = input.to_vec();
    frame[0..6].copy_from_slice(&macs.1);
    frame[6..12].copy_from_slice(&macs.0);
    edit_ip(&mut frame, |header| {
        header.time_to_live -= 1;
        header.source = src.0;
        header.destination = dst.0;
    });
    let had_udp_checksum = input[UDP + 6..UDP + 8] != [0, 0];
    let (ip_header, _) = Ipv4Header::from_slice(&frame[IP..]).unwrap();
    let (mut udp, payload) = UdpHeader::from_slice(&frame[UDP..]).unwrap();
    udp.source_port = src.1;
    udp.destination_port = dst.1;
    let payload = payload[..usize::from(udp.length) - 8].to_vec();
    udp.checksum = if had_udp_checksum {
        udp.calc_checksum_ipv4(&ip_header, &payload).unwrap()
    } else {
        0
    };
    frame[UDP..UDP + 8].copy_from_slice(&udp.to_bytes());
    frame
}

/// [`expected_forward`] towards `output`, which must be a forwarding one.
pub fn expected_output(input: &[u8], output: Output) -> Vec<u8> {
    let Output::Forwarded(macs, src, dst) = output else {
        unreachable!("an untouched output has no rewrite")
    };
    expected_forward(input, macs, src, dst)
}

/// Independent check of a forwarded frame's checksums with etherparse.
pub fn assert_checksums_valid(frame: &[u8]) {
    let (ip_header, _) = Ipv4Header::from_slice(&frame[IP..]).unwrap();
    assert_eq!(
        ip_header.header_checksum,
        ip_header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (udp, payload) = UdpHeader::from_slice(&frame[UDP..]).unwrap();
    let payload = &payload[..usize::from(udp.length) - 8];
    if udp.checksum != 0 {
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(&ip_header, payload).unwrap(),
            "UDP checksum"
        );
    }
}
