//! The real XDP program run through `BPF_PROG_TEST_RUN` on crafted frames:
//! for each one the verdict, the reason counter and the output bytes.
//!
//! Frames are built with etherparse and forwarded frames are checked with
//! etherparse's own checksum code, never with the project's helpers.
//!
//! Forwarding cases need `bpf_fib_lookup`, which consults the network
//! namespace of the ingress device. Each such test builds its own namespace
//! holding a veth pair (both ends inside), enters it from a dedicated thread
//! and passes the veth's ifindex as `xdp_md.ingress_ifindex` in `ctx_in`
//! (the kernel then runs the program as if the frame arrived there). Without
//! `ctx_in` the program sees the loopback device of the caller's namespace.
//!
//! Not covered: `truncated_eth`, because the kernel refuses test runs with
//! fewer than 14 bytes of data (EINVAL) before the program ever runs.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN), `ip` and `ethtool`.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use etherparse::{Ipv4Header, PacketBuilder, UdpHeader};
use forwarder::datapath::xdp::{EBPF_OBJECT, PROGRAM_NAME};
use forwarder_common::{
    BackendKey, ClientKey, FlowCounter, REASON_COUNT, Reason, RelayConfig, Rewrite, SlowpathBucket,
    flow::Endpoints, reason::ReasonCounter,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const SESSION_PORT: u16 = 60_001;
const FLOW_PORT: u16 = 61_001;
const CONFIG: RelayConfig = RelayConfig {
    session_port_lo: 60_000,
    session_port_hi: 60_099,
    flow_port_lo: 61_000,
    flow_port_hi: 61_999,
};

// Addresses of the namespace topology (and reused by the pure parse tests).
const CLIENT: [u8; 4] = [10, 0, 1, 2];
const CLIENT_PORT: u16 = 40_000;
const RELAY_FRONT: [u8; 4] = [10, 0, 1, 1];
const RELAY_BACK: [u8; 4] = [10, 0, 2, 1];
const BACKEND: [u8; 4] = [10, 0, 2, 2];
const BACKEND_PORT: u16 = 60_002;
/// A second backend on the client's link: forwarding to it leaves by the
/// ingress interface (XDP_TX).
const NEAR_BACKEND: [u8; 4] = [10, 0, 1, 3];
/// On the backend link but without a neighbour entry.
const UNRESOLVED_BACKEND: [u8; 4] = [10, 0, 2, 9];
/// No route at all in the namespace (TEST-NET-1).
const UNROUTABLE_BACKEND: [u8; 4] = [192, 0, 2, 1];

const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
const NEAR_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 3];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];

const PAYLOAD: &[u8] = b"\x80\x00\x00\x00\x00\x00\x00\x01mosh datagram payload, ocb";

/// One loaded copy of the program with its own (unpinned) maps.
struct Relay {
    ebpf: Ebpf,
}

/// What one test run returned.
struct Run {
    retval: u32,
    out: Vec<u8>,
}

impl Relay {
    fn load() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .expect("loading the embedded eBPF object (maps)");
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program missing from the object")
            .try_into()
            .expect("program is not XDP");
        if let Err(error) = program.load() {
            panic!("the verifier rejected the program: {error:#?}");
        }
        let mut config: Array<_, RelayConfig> =
            Array::try_from(ebpf.map_mut("CONFIG").expect("CONFIG map")).unwrap();
        config.set(0, CONFIG, 0).unwrap();
        Self { ebpf }
    }

    fn add_client_flow(&mut self, key: ClientKey, rewrite: Rewrite) {
        let mut map: HashMap<_, ClientKey, Rewrite> =
            HashMap::try_from(self.ebpf.map_mut("CLIENT_FLOWS").expect("CLIENT_FLOWS map"))
                .unwrap();
        map.insert(key, rewrite, 0).unwrap();
    }

    fn add_backend_flow(&mut self, key: BackendKey, rewrite: Rewrite) {
        let mut map: HashMap<_, BackendKey, Rewrite> = HashMap::try_from(
            self.ebpf
                .map_mut("BACKEND_FLOWS")
                .expect("BACKEND_FLOWS map"),
        )
        .unwrap();
        map.insert(key, rewrite, 0).unwrap();
    }

    /// Must run in the namespace that owns `ifindex`: the kernel resolves it there.
    fn add_egress(&mut self, ifindex: u32) {
        let mut map =
            DevMapHash::try_from(self.ebpf.map_mut("EGRESS").expect("EGRESS map")).unwrap();
        map.insert(ifindex, ifindex, None, 0).unwrap();
    }

    fn client_flow(&self, key: &ClientKey) -> Rewrite {
        let map: HashMap<_, ClientKey, Rewrite> =
            HashMap::try_from(self.ebpf.map("CLIENT_FLOWS").unwrap()).unwrap();
        map.get(key, 0).unwrap()
    }

    /// Runs the program once; `ingress` sets `xdp_md.ingress_ifindex`.
    fn run(&self, frame: &[u8], ingress: Option<u32>) -> Run {
        let program: &Xdp = self.ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
        let ctx = ingress.map(|ifindex| xdp_md(frame.len(), ifindex));
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx.as_deref(),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN failed");
        out.truncate(result.data_size_out as usize);
        Run {
            retval: result.return_value,
            out,
        }
    }

    /// Packets and bytes under `reason`, summed over CPUs.
    fn reason_count(&self, reason: Reason) -> (u64, u64) {
        let map: PerCpuArray<_, ReasonCounter> =
            PerCpuArray::try_from(self.ebpf.map("REASON_COUNTERS").unwrap()).unwrap();
        map.get(&(reason as u32), 0)
            .unwrap()
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    fn total_packets(&self) -> u64 {
        (0..REASON_COUNT)
            .map(|index| self.reason_count(Reason::ALL[index as usize]).0)
            .sum()
    }

    fn flow_count(&self, slot: u32) -> (u64, u64) {
        let map: PerCpuArray<_, FlowCounter> =
            PerCpuArray::try_from(self.ebpf.map("FLOW_COUNTERS").unwrap()).unwrap();
        map.get(&slot, 0)
            .unwrap()
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    /// Runs `frame` and checks it ends with `reason` (counted once, with the
    /// frame's length, and under no other reason) and the verdict `retval`;
    /// a passed or dropped frame must come out untouched.
    fn expect(&self, frame: &[u8], ingress: Option<u32>, reason: Reason, retval: u32) -> Run {
        let total_before = self.total_packets();
        let (packets_before, bytes_before) = self.reason_count(reason);
        let run = self.run(frame, ingress);
        assert_eq!(
            run.retval,
            retval,
            "verdict for {} (reason counters: {})",
            reason.name(),
            self.counters()
        );
        assert_eq!(
            self.reason_count(reason),
            (packets_before + 1, bytes_before + frame.len() as u64),
            "expected reason {}, counters: {}",
            reason.name(),
            self.counters()
        );
        assert_eq!(
            self.total_packets(),
            total_before + 1,
            "exactly one reason counted per packet"
        );
        if retval == XDP_PASS || retval == XDP_DROP {
            assert_eq!(
                run.out,
                frame,
                "{}: packet must be untouched",
                reason.name()
            );
        }
        run
    }

    fn counters(&self) -> String {
        Reason::ALL
            .iter()
            .filter_map(|reason| {
                let (packets, _) = self.reason_count(*reason);
                (packets > 0).then(|| format!("{}={packets}", reason.name()))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `struct xdp_md` for `ctx_in`: data at 0, data_end at the frame's end, no
/// metadata, the given ingress device, queue 0, no egress.
fn xdp_md(len: usize, ingress_ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|word: &u32| word.to_ne_bytes())
        .collect()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load XDP programs and create network namespaces: run them as root \
         (sudo -E cargo test -p forwarder --test xdp_program)"
    );
}

/// An Ethernet/IPv4/UDP frame with valid checksums, TTL 64.
fn udp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

const IP: usize = 14;
const UDP: usize = 34;

/// Applies `edit` to the IPv4 header and recomputes its checksum with etherparse.
fn edit_ip(frame: &mut [u8], edit: impl FnOnce(&mut Ipv4Header)) {
    let (mut header, _) = Ipv4Header::from_slice(&frame[IP..]).unwrap();
    edit(&mut header);
    header.header_checksum = header.calc_header_checksum();
    let bytes = header.to_bytes();
    frame[IP..IP + bytes.len()].copy_from_slice(&bytes);
}

/// Sets raw header bytes and refreshes the IPv4 checksum (for values
/// etherparse refuses to represent, such as an inconsistent total length).
fn poke(frame: &mut [u8], offset: usize, bytes: &[u8]) {
    frame[offset..offset + bytes.len()].copy_from_slice(bytes);
    frame[IP + 10..IP + 12].fill(0);
    let sum = !fold(&frame[IP..IP + usize::from(frame[IP] & 0x0f) * 4]);
    frame[IP + 10..IP + 12].copy_from_slice(&sum.to_be_bytes());
}

fn fold(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn endpoints(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Endpoints {
    Endpoints {
        saddr: src.0,
        daddr: dst.0,
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
    }
}

fn client_key(client: ([u8; 4], u16), relay: ([u8; 4], u16)) -> ClientKey {
    ClientKey {
        relay_addr: relay.0,
        client_addr: client.0,
        relay_port: relay.1.to_be_bytes(),
        client_port: client.1.to_be_bytes(),
    }
}

fn backend_key(relay: ([u8; 4], u16)) -> BackendKey {
    BackendKey {
        relay_addr: relay.0,
        relay_port: relay.1.to_be_bytes(),
        _pad: [0; 2],
    }
}

/// Installs the client half `client → relay:P` rewritten to `relay_back:Q → backend`.
fn install_client_flow(relay: &mut Relay, backend: ([u8; 4], u16), slot: u32) -> ClientKey {
    let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
    let to_addr = if backend.0 == NEAR_BACKEND {
        RELAY_FRONT
    } else {
        RELAY_BACK
    };
    let to = endpoints((to_addr, FLOW_PORT), backend);
    let key = client_key((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
    relay.add_client_flow(key, Rewrite::new(from, to, slot));
    key
}

/// Installs the backend half `backend → relay_back:Q` rewritten to
/// `relay:P → client`, accepted only from `backend` (and `ifindex` if set).
fn install_backend_flow(relay: &mut Relay, allowed_ifindex: u32, slot: u32) {
    let from = endpoints((BACKEND, BACKEND_PORT), (RELAY_BACK, FLOW_PORT));
    let to = endpoints((RELAY_FRONT, SESSION_PORT), (CLIENT, CLIENT_PORT));
    let mut rewrite = Rewrite::new(from, to, slot);
    rewrite.allowed_saddr = BACKEND;
    rewrite.allowed_sport = BACKEND_PORT.to_be_bytes();
    rewrite.allowed_ifindex = allowed_ifindex;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
}

fn client_packet() -> Vec<u8> {
    udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), PAYLOAD)
}

fn backend_packet() -> Vec<u8> {
    udp_frame((BACKEND, BACKEND_PORT), (RELAY_BACK, FLOW_PORT), PAYLOAD)
}

// ---------------------------------------------------------------------------
// Not ours: passes untouched.

#[test]
fn arp_passes_as_not_ipv4() {
    let relay = Relay::load();
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[0x08, 0x06]);
    // Request: Ethernet/IPv4, who has 10.0.1.1 tell 10.0.1.2.
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&CLIENT);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&RELAY_FRONT);
    relay.expect(&frame, None, Reason::PassNotIpv4, XDP_PASS);
}

#[test]
fn ipv6_passes_as_not_ipv4() {
    let relay = Relay::load();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(CLIENT_PORT, SESSION_PORT);
    let mut frame = Vec::new();
    builder.write(&mut frame, PAYLOAD).unwrap();
    relay.expect(&frame, None, Reason::PassNotIpv4, XDP_PASS);
}

#[test]
fn vlan_tagged_passes_as_not_ipv4() {
    let relay = Relay::load();
    let plain = client_packet();
    let mut frame = plain[..12].to_vec();
    frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    frame.extend_from_slice(&plain[12..]);
    relay.expect(&frame, None, Reason::PassNotIpv4, XDP_PASS);
}

#[test]
fn tcp_passes_as_not_udp() {
    let relay = Relay::load();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, RELAY_FRONT, 64)
        .tcp(CLIENT_PORT, SESSION_PORT, 1, 1024);
    let mut frame = Vec::new();
    builder.write(&mut frame, PAYLOAD).unwrap();
    relay.expect(&frame, None, Reason::PassNotUdp, XDP_PASS);
}

#[test]
fn udp_to_other_port_passes_as_not_relay_port() {
    let relay = Relay::load();
    for port in [53, 59_999, 60_100, 60_999, 62_000] {
        let frame = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, port), PAYLOAD);
        relay.expect(&frame, None, Reason::PassNotRelayPort, XDP_PASS);
    }
}

#[test]
fn truncated_ip_header_passes() {
    let relay = Relay::load();
    let frame = client_packet();
    relay.expect(&frame[..IP + 19], None, Reason::PassTruncatedIp, XDP_PASS);

    let mut short_ihl = client_packet();
    poke(&mut short_ihl, IP, &[0x44]);
    relay.expect(&short_ihl, None, Reason::PassTruncatedIp, XDP_PASS);

    let mut not_v4 = client_packet();
    poke(&mut not_v4, IP, &[0x65]);
    relay.expect(&not_v4, None, Reason::PassTruncatedIp, XDP_PASS);
}

#[test]
fn truncated_udp_header_passes() {
    let relay = Relay::load();
    let frame = client_packet();
    relay.expect(&frame[..UDP + 7], None, Reason::PassTruncatedUdp, XDP_PASS);
}

// ---------------------------------------------------------------------------
// Addressed to a relay port.

#[test]
fn relay_ports_without_flow_pass_as_no_flow() {
    let relay = Relay::load();
    relay.expect(&client_packet(), None, Reason::PassNoFlow, XDP_PASS);
    relay.expect(&backend_packet(), None, Reason::PassNoFlow, XDP_PASS);
}

#[test]
fn other_client_endpoint_of_a_session_is_no_flow() {
    let mut relay = Relay::load();
    install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 0);
    let roamed = udp_frame(
        (CLIENT, CLIENT_PORT + 1),
        (RELAY_FRONT, SESSION_PORT),
        PAYLOAD,
    );
    relay.expect(&roamed, None, Reason::PassNoFlow, XDP_PASS);
}

#[test]
fn ip_options_pass() {
    let mut relay = Relay::load();
    install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 0);
    let mut frame = client_packet();
    edit_ip(&mut frame, |header| {
        // Four NOPs: one option word.
        header.options = [1u8, 1, 1, 1][..].try_into().unwrap();
        header.total_len += 4;
    });
    frame.splice(UDP..UDP, [1, 1, 1, 1]);
    edit_ip(&mut frame, |_| {});
    relay.expect(&frame, None, Reason::PassIpOptions, XDP_PASS);
}

#[test]
fn fragments_pass() {
    let mut relay = Relay::load();
    install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 0);
    let mut first = client_packet();
    edit_ip(&mut first, |header| {
        header.dont_fragment = false;
        header.more_fragments = true;
    });
    relay.expect(&first, None, Reason::PassFragment, XDP_PASS);

    let mut later = client_packet();
    edit_ip(&mut later, |header| {
        header.dont_fragment = false;
        header.fragment_offset = 185.try_into().unwrap();
    });
    relay.expect(&later, None, Reason::PassFragment, XDP_PASS);
}

#[test]
fn ttl_one_passes_as_ttl_expiring() {
    let mut relay = Relay::load();
    install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 0);
    for ttl in [1, 0] {
        let mut frame = client_packet();
        edit_ip(&mut frame, |header| header.time_to_live = ttl);
        relay.expect(&frame, None, Reason::PassTtlExpiring, XDP_PASS);
    }
}

#[test]
fn total_length_beyond_frame_is_malformed() {
    let relay = Relay::load();
    let mut frame = client_packet();
    let too_long = (frame.len() - IP + 1) as u16;
    poke(&mut frame, IP + 2, &too_long.to_be_bytes());
    relay.expect(&frame, None, Reason::DropMalformed, XDP_DROP);

    let mut too_short = client_packet();
    poke(&mut too_short, IP + 2, &27u16.to_be_bytes());
    relay.expect(&too_short, None, Reason::DropMalformed, XDP_DROP);
}

#[test]
fn udp_length_mismatch_is_malformed() {
    let relay = Relay::load();
    let udp_len = (8 + PAYLOAD.len()) as u16;
    for wrong in [udp_len - 1, udp_len + 1, 7] {
        let mut frame = client_packet();
        frame[UDP + 4..UDP + 6].copy_from_slice(&wrong.to_be_bytes());
        relay.expect(&frame, None, Reason::DropMalformed, XDP_DROP);
    }
}

#[test]
fn ethernet_padding_is_not_malformed() {
    let relay = Relay::load();
    let mut frame = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), b"x");
    frame.resize(60, 0);
    relay.expect(&frame, None, Reason::PassNoFlow, XDP_PASS);
}

#[test]
fn backend_half_from_wrong_source_is_spoofed() {
    let mut relay = Relay::load();
    install_backend_flow(&mut relay, 0, 1);
    let wrong_addr = udp_frame(
        ([10, 0, 2, 66], BACKEND_PORT),
        (RELAY_BACK, FLOW_PORT),
        PAYLOAD,
    );
    relay.expect(&wrong_addr, None, Reason::DropSpoofedServer, XDP_DROP);
    let wrong_port = udp_frame(
        (BACKEND, BACKEND_PORT + 1),
        (RELAY_BACK, FLOW_PORT),
        PAYLOAD,
    );
    relay.expect(&wrong_port, None, Reason::DropSpoofedServer, XDP_DROP);
    let client_as_server = udp_frame((CLIENT, CLIENT_PORT), (RELAY_BACK, FLOW_PORT), PAYLOAD);
    relay.expect(&client_as_server, None, Reason::DropSpoofedServer, XDP_DROP);
}

#[test]
fn backend_half_on_wrong_interface_is_spoofed() {
    let mut relay = Relay::load();
    // Without ctx_in the program sees loopback (ifindex 1) as ingress.
    install_backend_flow(&mut relay, 999, 1);
    relay.expect(&backend_packet(), None, Reason::DropSpoofedServer, XDP_DROP);
}

/// A punched session's backend half: a source mismatch on the allowed
/// interface goes to the daemon (which verifies it with the session key),
/// rate limited by the session's slow-path bucket; on another interface it
/// is still dropped; the real server is still forwarded.
#[test]
fn nat_backend_half_hands_unknown_sources_to_the_daemon() {
    let mut relay = Relay::load();
    let from = endpoints((BACKEND, BACKEND_PORT), (RELAY_BACK, FLOW_PORT));
    let to = endpoints((RELAY_FRONT, SESSION_PORT), (CLIENT, CLIENT_PORT));
    let mut rewrite = Rewrite::new(from, to, 1);
    rewrite.allowed_saddr = BACKEND;
    rewrite.allowed_sport = BACKEND_PORT.to_be_bytes();
    // Without ctx_in the program sees loopback (ifindex 1) as ingress.
    rewrite.allowed_ifindex = 1;
    rewrite.flags = forwarder_common::flow::REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
    {
        let mut map: HashMap<_, u16, SlowpathBucket> = HashMap::try_from(
            relay.ebpf.map_mut("SLOWPATH_SESSION_BUCKETS").expect("SLOWPATH_SESSION_BUCKETS map"),
        )
        .unwrap();
        map.insert(SESSION_PORT, SlowpathBucket::per_second(2), 0).unwrap();
    }
    let moved = udp_frame(([10, 0, 2, 66], BACKEND_PORT + 7), (RELAY_BACK, FLOW_PORT), PAYLOAD);
    let run = relay.expect(&moved, None, Reason::PassNatRebindCandidate, XDP_PASS);
    assert_eq!(run.out, moved, "a rebind candidate reaches the stack untouched");
    relay.expect(&moved, None, Reason::PassNatRebindCandidate, XDP_PASS);
    // The session's bucket (2 per second) is spent: the rest are dropped.
    relay.expect(&moved, None, Reason::DropSlowpathSessionLimit, XDP_DROP);

    // The same flag on another interface does not open the entry.
    rewrite.allowed_ifindex = 999;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
    relay.expect(&moved, None, Reason::DropSpoofedServer, XDP_DROP);
}

#[test]
fn counts_bytes_of_the_whole_frame() {
    let relay = Relay::load();
    let frame = client_packet();
    relay.run(&frame, None);
    relay.run(&frame, None);
    assert_eq!(
        relay.reason_count(Reason::PassNoFlow),
        (2, 2 * frame.len() as u64)
    );
}

// ---------------------------------------------------------------------------
// Forwarding, inside a namespace with a veth pair:
//
//   front (10.0.1.1/24, FRONT_MAC) <== veth ==> back (10.0.2.1/24, BACK_MAC)
//   neighbours: CLIENT and NEAR_BACKEND on front, BACKEND on back.

/// A network namespace with the topology above, deleted on drop (also
/// when the test panics).
struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Self {
        require_root();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "fwd-xdptest-{}-{:08x}",
            std::process::id(),
            nanos ^ rand::random::<u32>()
        );
        ip(&["netns", "add", &name]);
        let namespace = Self { name };
        let ns = namespace.name.as_str();
        let front_mac = mac(FRONT_MAC);
        let back_mac = mac(BACK_MAC);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", ns, "link", "add", "front", "address", &front_mac, "type", "veth", "peer",
            "name", "back", "address", &back_mac,
        ]);
        ip(&["-n", ns, "addr", "add", "10.0.1.1/24", "dev", "front"]);
        ip(&["-n", ns, "addr", "add", "10.0.2.1/24", "dev", "back"]);
        ip(&["-n", ns, "link", "set", "front", "up"]);
        ip(&["-n", ns, "link", "set", "back", "up"]);
        for dev in ["front", "back"] {
            run_checked(
                Command::new("ip").args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]),
            );
        }
        run_checked(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        for (addr, lladdr, dev) in [
            (CLIENT, CLIENT_MAC, "front"),
            (NEAR_BACKEND, NEAR_BACKEND_MAC, "front"),
            (BACKEND, BACKEND_MAC, "back"),
        ] {
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &dotted(addr),
                "lladdr",
                &mac(lladdr),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        namespace
    }

    /// Runs `body` on a fresh thread that has entered the namespace, so
    /// the test harness's own threads never change namespace.
    fn enter<T: Send>(&self, body: impl FnOnce(Topology) -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                body(Topology {
                    front: ifindex("front"),
                    back: ifindex("back"),
                })
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Interface indexes inside the namespace.
#[derive(Clone, Copy)]
struct Topology {
    front: u32,
    back: u32,
}

/// Index of `name` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    let name = CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?} in the namespace");
    index
}

fn ip(args: &[&str]) {
    run_checked(Command::new("ip").args(args));
}

fn run_checked(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e} (install iproute2 and ethtool)"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn dotted(addr: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(addr).to_string()
}

/// The frame a correct router-like rewrite produces from `input`: new MACs,
/// addresses and ports, TTL minus one, checksums recomputed by etherparse
/// (a zero UDP checksum stays zero).
fn expected_forward(
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

/// Independent check of a forwarded frame's checksums with etherparse.
fn assert_checksums_valid(frame: &[u8]) {
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

#[test]
fn same_interface_is_forwarded_with_xdp_tx() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        let key = install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT), 7);
        let mut input = client_packet();
        // mosh's ECT(0) must survive the relay.
        poke(&mut input, IP + 1, &[0x02]);
        let run = relay.expect(&input, Some(topo.front), Reason::TxForwarded, XDP_TX);
        let want = expected_forward(
            &input,
            (FRONT_MAC, NEAR_BACKEND_MAC),
            (RELAY_FRONT, FLOW_PORT),
            (NEAR_BACKEND, BACKEND_PORT),
        );
        assert_eq!(run.out, want);
        assert_eq!(run.out[IP + 1], 0x02, "TOS/ECN kept");
        assert_eq!(run.out[IP + 8], 63, "TTL decremented");
        assert_checksums_valid(&run.out);

        let tot_len = u64::from(u16::from_be_bytes([input[IP + 2], input[IP + 3]]));
        assert_eq!(relay.flow_count(7), (1, tot_len));
        assert!(
            relay.client_flow(&key).last_seen_ns > 0,
            "last_seen refreshed"
        );
        // A second packet within a second leaves last_seen alone.
        let seen = relay.client_flow(&key).last_seen_ns;
        relay.run(&input, Some(topo.front));
        assert_eq!(relay.client_flow(&key).last_seen_ns, seen);
        assert_eq!(relay.flow_count(7), (2, 2 * tot_len));
    });
}

#[test]
fn other_interface_is_redirected() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 3);
        relay.add_egress(topo.back);
        let input = client_packet();
        let run = relay.expect(
            &input,
            Some(topo.front),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        let want = expected_forward(
            &input,
            (BACK_MAC, BACKEND_MAC),
            (RELAY_BACK, FLOW_PORT),
            (BACKEND, BACKEND_PORT),
        );
        assert_eq!(run.out, want);
        assert_checksums_valid(&run.out);
    });
}

#[test]
fn backend_reply_is_redirected_to_the_client() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_backend_flow(&mut relay, topo.back, 4);
        relay.add_egress(topo.front);
        let input = backend_packet();
        let run = relay.expect(
            &input,
            Some(topo.back),
            Reason::RedirectForwarded,
            XDP_REDIRECT,
        );
        let want = expected_forward(
            &input,
            (FRONT_MAC, CLIENT_MAC),
            (RELAY_FRONT, SESSION_PORT),
            (CLIENT, CLIENT_PORT),
        );
        assert_eq!(run.out, want);
        assert_checksums_valid(&run.out);
    });
}

#[test]
fn forged_server_packet_on_client_side_is_spoofed() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_backend_flow(&mut relay, topo.back, 4);
        relay.add_egress(topo.front);
        // Right source address and port, wrong interface.
        relay.expect(
            &backend_packet(),
            Some(topo.front),
            Reason::DropSpoofedServer,
            XDP_DROP,
        );
    });
}

#[test]
fn zero_udp_checksum_stays_zero() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT), 0);
        let mut input = client_packet();
        input[UDP + 6..UDP + 8].fill(0);
        let run = relay.expect(&input, Some(topo.front), Reason::TxForwarded, XDP_TX);
        assert_eq!(run.out[UDP + 6..UDP + 8], [0, 0]);
        let want = expected_forward(
            &input,
            (FRONT_MAC, NEAR_BACKEND_MAC),
            (RELAY_FRONT, FLOW_PORT),
            (NEAR_BACKEND, BACKEND_PORT),
        );
        assert_eq!(run.out, want);
        assert_checksums_valid(&run.out);
    });
}

#[test]
fn many_payloads_keep_valid_checksums() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT), 0);
        for len in 0..64usize {
            let payload: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let input = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), &payload);
            let run = relay.run(&input, Some(topo.front));
            assert_eq!(run.retval, XDP_TX, "payload length {len}");
            let want = expected_forward(
                &input,
                (FRONT_MAC, NEAR_BACKEND_MAC),
                (RELAY_FRONT, FLOW_PORT),
                (NEAR_BACKEND, BACKEND_PORT),
            );
            assert_eq!(run.out, want, "payload length {len}");
            assert_checksums_valid(&run.out);
        }
    });
}

#[test]
fn computed_zero_udp_checksum_is_sent_as_all_ones() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT), 0);
        // Find a payload whose rewritten datagram sums to zero: RFC 768
        // sends that as 0xffff, since zero means "no checksum".
        let (input, want) = (0..=u16::MAX)
            .find_map(|word| {
                let payload = [PAYLOAD, &word.to_be_bytes()].concat();
                let input = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), &payload);
                let want = expected_forward(
                    &input,
                    (FRONT_MAC, NEAR_BACKEND_MAC),
                    (RELAY_FRONT, FLOW_PORT),
                    (NEAR_BACKEND, BACKEND_PORT),
                );
                (want[UDP + 6..UDP + 8] == [0xff, 0xff]).then_some((input, want))
            })
            .expect("some payload word makes the checksum 0xffff");
        let run = relay.expect(&input, Some(topo.front), Reason::TxForwarded, XDP_TX);
        assert_eq!(run.out, want);
        assert_checksums_valid(&run.out);
    });
}

#[test]
fn egress_not_in_devmap_passes_untouched() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 0);
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassEgressNotAttached,
            XDP_PASS,
        );
    });
}

#[test]
fn missing_neighbour_passes_untouched() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (UNRESOLVED_BACKEND, BACKEND_PORT), 0);
        relay.add_egress(topo.back);
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassFibNoNeigh,
            XDP_PASS,
        );
    });
}

#[test]
fn no_route_passes_untouched() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (UNROUTABLE_BACKEND, BACKEND_PORT), 0);
        relay.add_egress(topo.back);
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassFibFailed,
            XDP_PASS,
        );
    });
}

#[test]
fn forwarding_disabled_passes_untouched() {
    let ns = Namespace::create();
    run_checked(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv4.conf.front.forwarding=0",
    ]));
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT), 0);
        relay.expect(
            &client_packet(),
            Some(topo.front),
            Reason::PassFibFailed,
            XDP_PASS,
        );
    });
}

#[test]
fn attaches_in_native_and_skb_mode() {
    let ns = Namespace::create();
    ns.enter(|_| {
        for mode in [XdpMode::Driver, XdpMode::Skb] {
            let mut relay = Relay::load();
            let program: &mut Xdp = relay
                .ebpf
                .program_mut(PROGRAM_NAME)
                .unwrap()
                .try_into()
                .unwrap();
            let link = program
                .attach("front", mode)
                .unwrap_or_else(|e| panic!("attaching in {mode:?} mode: {e:#?}"));
            program.detach(link).unwrap();
        }
    });
}

// ---------------------------------------------------------------------------
// The fixture table (Katran-style): every row names its input frame, the
// map state it needs, the reason it must end with (which implies the
// verdict) and the output it must produce. Each row runs once on a fresh
// copy of the program inside the namespace above, so route lookups see the
// same neighbours every time and no row's counters leak into another's.

/// Map state a fixture needs.
#[derive(Clone, Copy, Default)]
struct Maps {
    /// Client half `CLIENT:CLIENT_PORT → RELAY_FRONT:SESSION_PORT` towards this backend.
    client_flow_to: Option<[u8; 4]>,
    /// Backend half on `RELAY_BACK:FLOW_PORT`, accepted from BACKEND on `back` only.
    backend_flow: bool,
    /// Slow-path buckets: (session port, packets per second), and the global rate.
    session_bucket: Option<(u16, u32)>,
    global_bucket: Option<u32>,
}

/// Which interface a frame arrives on.
#[derive(Clone, Copy)]
enum Ingress {
    Front,
    Back,
}

/// What must come out.
#[derive(Clone, Copy)]
enum Output {
    /// Passed or dropped: the very input bytes.
    Untouched,
    /// Rewritten like a router: (source MAC, destination MAC), new source, new destination.
    Forwarded(([u8; 6], [u8; 6]), ([u8; 4], u16), ([u8; 4], u16)),
}

struct Fixture {
    name: String,
    frame: Vec<u8>,
    maps: Maps,
    ingress: Ingress,
    reason: Reason,
    output: Output,
}

const TO_NEAR_BACKEND: Output = Output::Forwarded(
    (FRONT_MAC, NEAR_BACKEND_MAC),
    (RELAY_FRONT, FLOW_PORT),
    (NEAR_BACKEND, BACKEND_PORT),
);
const TO_BACKEND: Output = Output::Forwarded(
    (BACK_MAC, BACKEND_MAC),
    (RELAY_BACK, FLOW_PORT),
    (BACKEND, BACKEND_PORT),
);
const TO_CLIENT: Output = Output::Forwarded(
    (FRONT_MAC, CLIENT_MAC),
    (RELAY_FRONT, SESSION_PORT),
    (CLIENT, CLIENT_PORT),
);

const NEAR_FLOW: Maps = Maps {
    client_flow_to: Some(NEAR_BACKEND),
    backend_flow: false,
    session_bucket: None,
    global_bucket: None,
};
const FAR_FLOW: Maps = Maps {
    client_flow_to: Some(BACKEND),
    ..NEAR_FLOW
};
const BACKEND_FLOW: Maps = Maps {
    client_flow_to: None,
    backend_flow: true,
    ..NEAR_FLOW
};
const NO_FLOWS: Maps = Maps {
    client_flow_to: None,
    ..NEAR_FLOW
};

fn verdict_retval(reason: Reason) -> u32 {
    match reason.verdict() {
        forwarder_common::Verdict::Pass => XDP_PASS,
        forwarder_common::Verdict::Drop => XDP_DROP,
        forwarder_common::Verdict::Tx => XDP_TX,
        forwarder_common::Verdict::Redirect => XDP_REDIRECT,
    }
}

impl Relay {
    /// Installs `maps`; must run inside the namespace (the devmap resolves ifindexes there).
    fn install(&mut self, maps: Maps, topo: Topology) {
        if let Some(backend) = maps.client_flow_to {
            install_client_flow(self, (backend, BACKEND_PORT), 0);
        }
        if maps.backend_flow {
            install_backend_flow(self, topo.back, 1);
        }
        self.add_egress(topo.front);
        self.add_egress(topo.back);
        if let Some((port, pps)) = maps.session_bucket {
            let mut map: HashMap<_, u16, SlowpathBucket> = HashMap::try_from(
                self.ebpf
                    .map_mut("SLOWPATH_SESSION_BUCKETS")
                    .expect("SLOWPATH_SESSION_BUCKETS map"),
            )
            .unwrap();
            map.insert(port, SlowpathBucket::per_second(pps), 0)
                .unwrap();
        }
        if let Some(pps) = maps.global_bucket {
            let mut map: Array<_, SlowpathBucket> = Array::try_from(
                self.ebpf
                    .map_mut("SLOWPATH_GLOBAL_BUCKET")
                    .expect("SLOWPATH_GLOBAL_BUCKET map"),
            )
            .unwrap();
            map.set(0, SlowpathBucket::per_second(pps), 0).unwrap();
        }
    }
}

/// A client packet to the session port carrying `payload`.
fn client_with(payload: &[u8]) -> Vec<u8> {
    udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), payload)
}

/// Searches a client packet whose header checksum or UDP checksum, once
/// the near-backend rewrite is applied, comes out as `want` at `offset`.
fn client_packet_rewritten_to(offset: usize, want: [u8; 2]) -> Vec<u8> {
    (0..=u16::MAX)
        .find_map(|word| {
            let mut input = client_with(&[PAYLOAD, &word.to_be_bytes()].concat());
            // Vary the IPv4 id as well, so the header checksum moves too.
            edit_ip(&mut input, |header| header.identification = word);
            let Output::Forwarded(macs, src, dst) = TO_NEAR_BACKEND else {
                unreachable!()
            };
            let out = expected_forward(&input, macs, src, dst);
            (out[offset..offset + 2] == want).then_some(input)
        })
        .unwrap_or_else(|| panic!("no 16-bit word makes offset {offset} come out as {want:?}"))
}

fn fixtures() -> Vec<Fixture> {
    let mut rows = Vec::new();
    let mut row = |name: &str, frame: Vec<u8>, maps: Maps, reason: Reason, output: Output| {
        rows.push(Fixture {
            name: name.to_string(),
            frame,
            maps,
            ingress: Ingress::Front,
            reason,
            output,
        });
    };
    use Output::Untouched;
    use Reason::*;

    // Not ours.
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&RELAY_FRONT);
    row("arp", arp, NEAR_FLOW, PassNotIpv4, Untouched);
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(CLIENT_PORT, SESSION_PORT)
        .write(&mut ipv6, PAYLOAD)
        .unwrap();
    row(
        "ipv6 udp to a session port",
        ipv6,
        NEAR_FLOW,
        PassNotIpv4,
        Untouched,
    );
    for (tpid, name) in [(0x8100u16, "802.1Q"), (0x88a8, "802.1ad")] {
        let plain = client_packet();
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&tpid.to_be_bytes());
        tagged.extend_from_slice(&[0x00, 0x64]);
        tagged.extend_from_slice(&plain[12..]);
        row(
            &format!("{name} tagged flow packet"),
            tagged,
            NEAR_FLOW,
            PassNotIpv4,
            Untouched,
        );
    }
    let mut tcp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, RELAY_FRONT, 64)
        .tcp(CLIENT_PORT, SESSION_PORT, 1, 1024)
        .write(&mut tcp, PAYLOAD)
        .unwrap();
    row(
        "tcp to a session port",
        tcp,
        NEAR_FLOW,
        PassNotUdp,
        Untouched,
    );
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, RELAY_FRONT, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, PAYLOAD)
        .unwrap();
    row("icmp echo", icmp, NEAR_FLOW, PassNotUdp, Untouched);
    for port in [53, 59_999, 60_100, 60_999, 62_000] {
        let frame = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, port), PAYLOAD);
        row(
            &format!("udp to non-relay port {port}"),
            frame,
            NEAR_FLOW,
            PassNotRelayPort,
            Untouched,
        );
    }

    // Headers the fast path leaves to the stack.
    let flow = client_packet();
    row(
        "ipv4 header cut at 19 bytes",
        flow[..IP + 19].to_vec(),
        NEAR_FLOW,
        PassTruncatedIp,
        Untouched,
    );
    let mut ihl4 = client_packet();
    poke(&mut ihl4, IP, &[0x44]);
    row("ipv4 ihl 4", ihl4, NEAR_FLOW, PassTruncatedIp, Untouched);
    let mut version6 = client_packet();
    poke(&mut version6, IP, &[0x65]);
    row(
        "ipv4 header with version 6",
        version6,
        NEAR_FLOW,
        PassTruncatedIp,
        Untouched,
    );
    row(
        "udp header cut at 7 bytes",
        flow[..UDP + 7].to_vec(),
        NEAR_FLOW,
        PassTruncatedUdp,
        Untouched,
    );
    row(
        "udp header only, no ipv4 payload room",
        flow[..UDP].to_vec(),
        NEAR_FLOW,
        PassTruncatedUdp,
        Untouched,
    );
    let mut options = client_packet();
    edit_ip(&mut options, |header| {
        header.options = [1u8, 1, 1, 1][..].try_into().unwrap();
        header.total_len += 4;
    });
    options.splice(UDP..UDP, [1, 1, 1, 1]);
    edit_ip(&mut options, |_| {});
    row(
        "ipv4 options (4 NOPs)",
        options,
        NEAR_FLOW,
        PassIpOptions,
        Untouched,
    );
    let mut first = client_packet();
    edit_ip(&mut first, |header| {
        header.dont_fragment = false;
        header.more_fragments = true;
    });
    row("first fragment", first, NEAR_FLOW, PassFragment, Untouched);
    let mut later = client_packet();
    edit_ip(&mut later, |header| {
        header.dont_fragment = false;
        header.fragment_offset = 185.try_into().unwrap();
    });
    row("later fragment", later, NEAR_FLOW, PassFragment, Untouched);
    let mut last = client_packet();
    edit_ip(&mut last, |header| {
        header.dont_fragment = false;
        header.more_fragments = false;
        header.fragment_offset = 1.try_into().unwrap();
    });
    row("last fragment", last, NEAR_FLOW, PassFragment, Untouched);
    for ttl in [0, 1] {
        let mut frame = client_packet();
        edit_ip(&mut frame, |header| header.time_to_live = ttl);
        row(
            &format!("ttl {ttl}"),
            frame,
            NEAR_FLOW,
            PassTtlExpiring,
            Untouched,
        );
    }
    let mut ttl2 = client_packet();
    edit_ip(&mut ttl2, |header| header.time_to_live = 2);
    row(
        "ttl 2 is forwarded with ttl 1",
        ttl2,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );

    // Inconsistent lengths addressed to a relay port.
    let frame_ip_len = client_packet().len() - IP;
    for (name, tot_len) in [
        ("ipv4 total length one beyond the frame", frame_ip_len + 1),
        ("ipv4 total length 65535", 65_535),
        ("ipv4 total length one short of the frame", frame_ip_len - 1),
        ("ipv4 total length 27 (no room for udp)", 27),
        ("ipv4 total length 0", 0),
    ] {
        let mut frame = client_packet();
        poke(&mut frame, IP + 2, &(tot_len as u16).to_be_bytes());
        row(name, frame, NEAR_FLOW, DropMalformed, Untouched);
    }
    let udp_len = (8 + PAYLOAD.len()) as u16;
    for wrong in [udp_len - 1, udp_len + 1, 8, 7, 0, u16::MAX] {
        let mut frame = client_packet();
        frame[UDP + 4..UDP + 6].copy_from_slice(&wrong.to_be_bytes());
        row(
            &format!("udp length {wrong} instead of {udp_len}"),
            frame,
            NEAR_FLOW,
            DropMalformed,
            Untouched,
        );
    }
    let mut padded = client_with(b"x");
    padded.resize(60, 0);
    row(
        "minimum frame with ethernet padding",
        padded,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    let mut trailer = client_packet();
    trailer.extend_from_slice(&[0xee; 9]);
    row(
        "ipv4 total length shorter than the frame (trailer kept)",
        trailer,
        NEAR_FLOW,
        TxForwarded,
        TO_NEAR_BACKEND,
    );

    // Relay ports without a matching flow: the daemon decides.
    row(
        "unknown client on a session port",
        client_packet(),
        NO_FLOWS,
        PassNoFlow,
        Untouched,
    );
    let roamed = udp_frame(
        (CLIENT, CLIENT_PORT + 1),
        (RELAY_FRONT, SESSION_PORT),
        PAYLOAD,
    );
    row(
        "known client address from another port",
        roamed,
        NEAR_FLOW,
        PassNoFlow,
        Untouched,
    );
    let unallocated = udp_frame(
        (CLIENT, CLIENT_PORT),
        (RELAY_FRONT, SESSION_PORT + 5),
        PAYLOAD,
    );
    row(
        "unallocated session port",
        unallocated,
        NEAR_FLOW,
        PassNoFlow,
        Untouched,
    );
    let wrong_upstream = udp_frame(
        (BACKEND, BACKEND_PORT),
        (RELAY_BACK, FLOW_PORT + 1),
        PAYLOAD,
    );
    rows.push(Fixture {
        name: "backend to an unallocated upstream port".into(),
        frame: wrong_upstream,
        maps: BACKEND_FLOW,
        ingress: Ingress::Back,
        reason: PassNoFlow,
        output: Untouched,
    });
    let mut row =
        |name: &str, frame: Vec<u8>, maps: Maps, ingress, reason: Reason, output: Output| {
            rows.push(Fixture {
                name: name.to_string(),
                frame,
                maps,
                ingress,
                reason,
                output,
            });
        };

    // The backend half and its anti-spoofing rules.
    row(
        "backend reply",
        backend_packet(),
        BACKEND_FLOW,
        Ingress::Back,
        RedirectForwarded,
        TO_CLIENT,
    );
    row(
        "backend reply arriving on the client side",
        backend_packet(),
        BACKEND_FLOW,
        Ingress::Front,
        DropSpoofedServer,
        Untouched,
    );
    let other_server = udp_frame(
        ([10, 0, 2, 66], BACKEND_PORT),
        (RELAY_BACK, FLOW_PORT),
        PAYLOAD,
    );
    row(
        "another host to a flow's upstream port",
        other_server,
        BACKEND_FLOW,
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    let other_port = udp_frame(
        (BACKEND, BACKEND_PORT + 1),
        (RELAY_BACK, FLOW_PORT),
        PAYLOAD,
    );
    row(
        "backend from another port",
        other_port,
        BACKEND_FLOW,
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    let client_as_server = udp_frame((CLIENT, CLIENT_PORT), (RELAY_BACK, FLOW_PORT), PAYLOAD);
    row(
        "client writing to an upstream port",
        client_as_server,
        BACKEND_FLOW,
        Ingress::Front,
        DropSpoofedServer,
        Untouched,
    );

    // Forwarding: payload sizes and checksum corner cases.
    for len in [0usize, 1, 23, 24, 1252, 1472] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 131 + 7) as u8).collect();
        row(
            &format!("payload {len} bytes, same interface"),
            client_with(&payload),
            NEAR_FLOW,
            Ingress::Front,
            TxForwarded,
            TO_NEAR_BACKEND,
        );
        row(
            &format!("payload {len} bytes, other interface"),
            client_with(&payload),
            FAR_FLOW,
            Ingress::Front,
            RedirectForwarded,
            TO_BACKEND,
        );
    }
    let mut ect = client_packet();
    poke(&mut ect, IP + 1, &[0x02]);
    row(
        "ECT(0) kept",
        ect,
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    let mut no_csum = client_packet();
    no_csum[UDP + 6..UDP + 8].fill(0);
    row(
        "zero udp checksum stays zero",
        no_csum,
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    row(
        "udp checksum folding to zero is sent as 0xffff",
        client_packet_rewritten_to(UDP + 6, [0xff, 0xff]),
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    // An input that already carries 0xffff (its sum folded to zero).
    let all_ones_in = (0..=u16::MAX)
        .map(|word| client_with(&[PAYLOAD, &word.to_be_bytes()].concat()))
        .find(|frame| frame[UDP + 6..UDP + 8] == [0xff, 0xff])
        .expect("some payload word gives an input udp checksum of 0xffff");
    row(
        "input udp checksum 0xffff",
        all_ones_in,
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    row(
        "ipv4 header checksum folding to 0x0000",
        client_packet_rewritten_to(IP + 10, [0, 0]),
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );
    // A full computation never yields 0xffff for a header checksum (that
    // needs an all-zero header); an incremental update done by RFC 1141
    // instead of RFC 1624 would produce it where 0x0000 is right, which
    // the row above catches. An input carrying 0x0000 is the other side.
    let zero_ip_csum_in = (0..=u16::MAX)
        .map(|id| {
            let mut frame = client_packet();
            edit_ip(&mut frame, |header| header.identification = id);
            frame
        })
        .find(|frame| frame[IP + 10..IP + 12] == [0, 0])
        .expect("some IPv4 id gives a header checksum of 0x0000");
    row(
        "input ipv4 header checksum 0x0000",
        zero_ip_csum_in,
        NEAR_FLOW,
        Ingress::Front,
        TxForwarded,
        TO_NEAR_BACKEND,
    );

    // Route lookup failures go to the daemon, untouched.
    let unresolved = Maps {
        client_flow_to: Some(UNRESOLVED_BACKEND),
        ..NO_FLOWS
    };
    row(
        "backend without a neighbour entry",
        client_packet(),
        unresolved,
        Ingress::Front,
        PassFibNoNeigh,
        Untouched,
    );
    let unroutable = Maps {
        client_flow_to: Some(UNROUTABLE_BACKEND),
        ..NO_FLOWS
    };
    row(
        "backend without a route",
        client_packet(),
        unroutable,
        Ingress::Front,
        PassFibFailed,
        Untouched,
    );

    // Slow-path rate limits: a bucket of one packet a second holds one token.
    let session_limited = Maps {
        session_bucket: Some((SESSION_PORT, 1)),
        ..NO_FLOWS
    };
    row(
        "new flow within the session's slow-path budget",
        client_packet(),
        session_limited,
        Ingress::Front,
        PassNoFlow,
        Untouched,
    );
    let other_session_limited = Maps {
        session_bucket: Some((SESSION_PORT + 1, 1)),
        ..NO_FLOWS
    };
    row(
        "another session's bucket does not apply",
        client_packet(),
        other_session_limited,
        Ingress::Front,
        PassNoFlow,
        Untouched,
    );
    rows
}

/// Fixtures that need state left by an earlier packet: the bucket's one
/// token spent, then the next packet.
fn run_limit_sequences(topo: Topology) -> usize {
    let sequences: [(&str, Maps, Reason); 3] = [
        (
            "second new flow over the session's slow-path budget",
            Maps {
                session_bucket: Some((SESSION_PORT, 1)),
                ..NO_FLOWS
            },
            Reason::DropSlowpathSessionLimit,
        ),
        (
            "second new flow over the relay-wide slow-path budget",
            Maps {
                global_bucket: Some(1),
                ..NO_FLOWS
            },
            Reason::DropSlowpathGlobalLimit,
        ),
        (
            "second route-lookup failure over the session's budget",
            Maps {
                client_flow_to: Some(UNRESOLVED_BACKEND),
                session_bucket: Some((SESSION_PORT, 1)),
                ..NO_FLOWS
            },
            Reason::DropSlowpathSessionLimit,
        ),
    ];
    for (name, maps, reason) in sequences {
        let mut relay = Relay::load();
        relay.install(maps, topo);
        let first = relay.run(&client_packet(), Some(topo.front));
        assert_eq!(first.retval, XDP_PASS, "{name}: the first packet passes");
        relay.expect(&client_packet(), Some(topo.front), reason, XDP_DROP);
        // Not ours stays not ours, whatever the buckets say.
        let other = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, 53), PAYLOAD);
        relay.expect(&other, Some(topo.front), Reason::PassNotRelayPort, XDP_PASS);
    }
    sequences.len()
}

#[test]
fn fixture_table() {
    let ns = Namespace::create();
    let rows = fixtures();
    let count = ns.enter(|topo| {
        for fixture in &rows {
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
            }
        }
        rows.len() + run_limit_sequences(topo)
    });
    println!("{count} fixtures passed");
}

// ---------------------------------------------------------------------------
// Fuzzing: random and mutated frames through the real program, with flows,
// a devmap and slow-path buckets installed so mutations of valid relay
// traffic reach every stage. FORWARDER_FUZZ_FRAMES sets the count (soak
// runs), FORWARDER_FUZZ_SEED replays a run.

/// Whether the one's-complement sum over `words` verifies (etherparse's
/// checksum code: independent of forwarder-common's).
fn ones_complement_ok(parts: &[&[u8]]) -> bool {
    parts
        .iter()
        .fold(etherparse::checksum::Sum16BitWords::new(), |sum, part| {
            sum.add_slice(part)
        })
        .ones_complement()
        == 0
}

fn ip_checksum_ok(frame: &[u8]) -> bool {
    ones_complement_ok(&[&frame[IP..UDP]])
}

/// UDP checksum over the pseudo header and the UDP length's worth of bytes;
/// `None` when the frame carries no checksum (zero).
fn udp_checksum_ok(frame: &[u8]) -> Option<bool> {
    if frame[UDP + 6..UDP + 8] == [0, 0] {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([frame[UDP + 4], frame[UDP + 5]]));
    Some(ones_complement_ok(&[
        &frame[IP + 12..IP + 20],
        &[0, 17],
        &frame[UDP + 4..UDP + 6],
        &frame[UDP..UDP + udp_len],
    ]))
}

/// The fuzz relay's flows, as (source, destination) of the accepted input
/// and the output it must become.
struct FuzzFlow {
    ingress_is_back: bool,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    output: Output,
}

const FUZZ_FLOWS: [FuzzFlow; 3] = [
    FuzzFlow {
        ingress_is_back: false,
        src: (CLIENT, CLIENT_PORT),
        dst: (RELAY_FRONT, SESSION_PORT),
        output: TO_NEAR_BACKEND,
    },
    FuzzFlow {
        ingress_is_back: false,
        src: (CLIENT, CLIENT_PORT + 1),
        dst: (RELAY_FRONT, SESSION_PORT),
        output: Output::Forwarded(
            (BACK_MAC, BACKEND_MAC),
            (RELAY_BACK, FLOW_PORT + 1),
            (BACKEND, BACKEND_PORT),
        ),
    },
    FuzzFlow {
        ingress_is_back: true,
        src: (BACKEND, BACKEND_PORT),
        dst: (RELAY_BACK, FLOW_PORT),
        output: TO_CLIENT,
    },
];

/// A forwarded frame must be the input with exactly the router rewrite
/// applied; its checksums must verify whenever the input's did.
fn check_forwarded(input: &[u8], out: &[u8], ingress_is_back: bool, seed: u64) {
    let head = |frame: &[u8]| frame[..frame.len().min(UDP + 16)].to_vec();
    let context = || {
        format!(
            "seed {seed}, {} bytes, input starts {:02x?}, output starts {:02x?}",
            input.len(),
            head(input),
            head(out)
        )
    };
    assert_eq!(
        out.len(),
        input.len(),
        "forwarding keeps the length: {}",
        context()
    );
    let field = |frame: &[u8], at: usize, len: usize| frame[at..at + len].to_vec();
    let src = (
        <[u8; 4]>::try_from(&input[IP + 12..IP + 16]).unwrap(),
        u16::from_be_bytes([input[UDP], input[UDP + 1]]),
    );
    let dst = (
        <[u8; 4]>::try_from(&input[IP + 16..IP + 20]).unwrap(),
        u16::from_be_bytes([input[UDP + 2], input[UDP + 3]]),
    );
    let flow = FUZZ_FLOWS
        .iter()
        // Only a backend half checks where its packets arrive.
        .find(|flow| {
            flow.src == src && flow.dst == dst && (!flow.ingress_is_back || ingress_is_back)
        })
        .unwrap_or_else(|| panic!("forwarded a frame that matches no flow: {}", context()));
    let Output::Forwarded((smac, dmac), new_src, new_dst) = flow.output else {
        unreachable!()
    };
    let mut want = input.to_vec();
    want[0..6].copy_from_slice(&dmac);
    want[6..12].copy_from_slice(&smac);
    want[IP + 8] = input[IP + 8] - 1;
    want[IP + 12..IP + 16].copy_from_slice(&new_src.0);
    want[IP + 16..IP + 20].copy_from_slice(&new_dst.0);
    want[UDP..UDP + 2].copy_from_slice(&new_src.1.to_be_bytes());
    want[UDP + 2..UDP + 4].copy_from_slice(&new_dst.1.to_be_bytes());
    // Everything but the two checksums is fixed by the model.
    want[IP + 10..IP + 12].copy_from_slice(&out[IP + 10..IP + 12]);
    want[UDP + 6..UDP + 8].copy_from_slice(&out[UDP + 6..UDP + 8]);
    assert_eq!(out, want, "rewrite model: {}", context());
    let tot_len = usize::from(u16::from_be_bytes([out[IP + 2], out[IP + 3]]));
    assert!(
        tot_len >= 28 && IP + tot_len <= out.len() && field(out, IP, 1) == [0x45],
        "well-formed IPv4/UDP: {}",
        context()
    );
    if ip_checksum_ok(input) {
        assert!(ip_checksum_ok(out), "IPv4 checksum: {}", context());
    }
    match udp_checksum_ok(input) {
        None => assert_eq!(
            field(out, UDP + 6, 2),
            [0, 0],
            "zero UDP checksum kept: {}",
            context()
        ),
        Some(input_ok) => {
            assert_ne!(
                field(out, UDP + 6, 2),
                [0, 0],
                "checksum never becomes 'none': {}",
                context()
            );
            if input_ok {
                assert_eq!(
                    udp_checksum_ok(out),
                    Some(true),
                    "UDP checksum: {}",
                    context()
                );
            }
        }
    }
}

/// Seed frames: valid traffic for each flow and its near misses.
fn fuzz_seeds(rng: &mut impl rand::Rng) -> Vec<(Vec<u8>, bool)> {
    let mut seeds = Vec::new();
    for len in [0usize, 1, 23, 24, 100, 1252, 1472] {
        let mut payload = vec![0u8; len];
        rng.fill(&mut payload[..]);
        for flow in &FUZZ_FLOWS {
            seeds.push((
                udp_frame(flow.src, flow.dst, &payload),
                flow.ingress_is_back,
            ));
        }
        seeds.push((
            udp_frame(
                (CLIENT, CLIENT_PORT + 2),
                (RELAY_FRONT, SESSION_PORT),
                &payload,
            ),
            false,
        ));
        seeds.push((
            udp_frame(
                (CLIENT, CLIENT_PORT),
                (RELAY_FRONT, SESSION_PORT + 1),
                &payload,
            ),
            false,
        ));
        seeds.push((
            udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, 53), &payload),
            false,
        ));
    }
    seeds
}

/// Applies one to four random edits, biased towards the header fields the
/// program branches on, then usually repairs the checksums so the edit is
/// what the program sees rather than a checksum error.
fn mutate(rng: &mut impl rand::Rng, frame: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let len = frame.len();
        match rng.random_range(0..10) {
            0 | 1 => {
                let at = rng.random_range(0..len.min(UDP + 8));
                frame[at] ^= 1 << rng.random_range(0..8);
            }
            2 => {
                let at = rng.random_range(0..len);
                frame[at] = rng.random();
            }
            3 if len > UDP + 8 => {
                let ip_len = (len - IP) as u16;
                let value: u16 = *[0, 19, 20, 27, 28, ip_len - 1, ip_len, ip_len + 1, u16::MAX]
                    .get(rng.random_range(0..9))
                    .unwrap();
                frame[IP + 2..IP + 4].copy_from_slice(&value.to_be_bytes());
            }
            4 if len > UDP + 8 => {
                let udp_len = (len - UDP) as u16;
                let value: u16 = *[0, 7, 8, udp_len - 1, udp_len, udp_len + 1, u16::MAX]
                    .get(rng.random_range(0..7))
                    .unwrap();
                frame[UDP + 4..UDP + 6].copy_from_slice(&value.to_be_bytes());
            }
            5 if len > UDP => {
                let (at, values): (usize, &[u8]) = match rng.random_range(0..4) {
                    0 => (IP + 8, &[0, 1, 2, 255]),
                    1 => (IP, &[0x45, 0x46, 0x4f, 0x44, 0x55, 0x65, 0x00]),
                    2 => (IP + 6, &[0x20, 0x00, 0x40, 0x80, 0x1f, 0x3f]),
                    _ => (IP + 9, &[0, 1, 6, 17, 255]),
                };
                frame[at] = values[rng.random_range(0..values.len())];
            }
            6 => frame.truncate(rng.random_range(14..=len)),
            7 => {
                let extra: usize = rng.random_range(1..64);
                frame.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            8 => {
                let types: [[u8; 2]; 4] = [[0x81, 0x00], [0x86, 0xdd], [0x08, 0x06], [0x08, 0x00]];
                frame[12..14].copy_from_slice(&types[rng.random_range(0..4)]);
            }
            _ => {
                // Another flow's addresses or ports, to cross the keys.
                let flow = &FUZZ_FLOWS[rng.random_range(0..FUZZ_FLOWS.len())];
                if len >= UDP + 4 {
                    frame[UDP..UDP + 2].copy_from_slice(&flow.src.1.to_be_bytes());
                    frame[IP + 12..IP + 16].copy_from_slice(&flow.src.0);
                }
            }
        }
    }
    let header_len = usize::from(frame.get(IP).copied().unwrap_or(0) & 0x0f) * 4;
    if header_len >= 20 && frame.len() >= IP + header_len && rng.random_bool(0.8) {
        frame[IP + 10..IP + 12].fill(0);
        let sum = etherparse::checksum::Sum16BitWords::new()
            .add_slice(&frame[IP..IP + header_len])
            .ones_complement();
        frame[IP + 10..IP + 12].copy_from_slice(&sum.to_be_bytes());
    }
    if frame.len() >= UDP + 8 && rng.random_bool(0.6) {
        let udp_len = usize::from(u16::from_be_bytes([frame[UDP + 4], frame[UDP + 5]]));
        if udp_len >= 8 && UDP + udp_len <= frame.len() && frame[UDP + 6..UDP + 8] != [0, 0] {
            frame[UDP + 6..UDP + 8].fill(0);
            let sum = etherparse::checksum::Sum16BitWords::new()
                .add_slice(&frame[IP + 12..IP + 20])
                .add_slice(&[0, 17])
                .add_slice(&frame[UDP + 4..UDP + 6])
                .add_slice(&frame[UDP..UDP + udp_len])
                .to_ones_complement_with_no_zero();
            frame[UDP + 6..UDP + 8].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

#[test]
fn fuzz_never_aborts_and_forwards_only_well_formed_frames() {
    use rand::{Rng as _, SeedableRng as _};

    let frames: u64 = std::env::var("FORWARDER_FUZZ_FRAMES")
        .map(|value| {
            value
                .parse()
                .expect("FORWARDER_FUZZ_FRAMES must be a number")
        })
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("FORWARDER_FUZZ_SEED")
        .map(|value| value.parse().expect("FORWARDER_FUZZ_SEED must be a number"))
        .unwrap_or_else(|_| rand::random());
    println!("fuzzing {frames} frames, FORWARDER_FUZZ_SEED={seed}");
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        relay.install(
            Maps {
                client_flow_to: Some(NEAR_BACKEND),
                backend_flow: true,
                session_bucket: Some((SESSION_PORT, 2_000)),
                global_bucket: Some(5_000),
            },
            topo,
        );
        let far = endpoints((CLIENT, CLIENT_PORT + 1), (RELAY_FRONT, SESSION_PORT));
        let to_far = endpoints((RELAY_BACK, FLOW_PORT + 1), (BACKEND, BACKEND_PORT));
        relay.add_client_flow(
            client_key((CLIENT, CLIENT_PORT + 1), (RELAY_FRONT, SESSION_PORT)),
            Rewrite::new(far, to_far, 2),
        );

        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let seeds = fuzz_seeds(&mut rng);
        let started = std::time::Instant::now();
        // Packets per XDP action (index = retval) and bytes in total.
        let mut actions = [0u64; 5];
        let mut bytes = 0u64;
        for index in 0..frames {
            let (mut frame, mut ingress_is_back) = if index % 10 == 0 {
                let len = rng.random_range(14..1600);
                let mut junk = vec![0u8; len];
                rng.fill(&mut junk[..]);
                (junk, rng.random_bool(0.5))
            } else {
                seeds[rng.random_range(0..seeds.len())].clone()
            };
            if index % 10 != 1 {
                mutate(&mut rng, &mut frame);
            }
            if index % 50 == 2 {
                ingress_is_back = !ingress_is_back;
            }
            let ingress = if ingress_is_back { topo.back } else { topo.front };
            let run = relay.run(&frame, Some(ingress));
            match run.retval {
                XDP_PASS | XDP_DROP => assert_eq!(
                    run.out, frame,
                    "seed {seed}: a {} frame must be untouched",
                    if run.retval == XDP_PASS { "passed" } else { "dropped" }
                ),
                XDP_TX | XDP_REDIRECT => check_forwarded(&frame, &run.out, ingress_is_back, seed),
                other => panic!("seed {seed}: XDP action {other} for {:02x?}", &frame[..frame.len().min(64)]),
            }
            actions[run.retval as usize] += 1;
            bytes += frame.len() as u64;
        }
        let elapsed = started.elapsed();

        // Every frame counted exactly once, under a reason of its verdict.
        let mut by_verdict = [0u64; 5];
        let mut counted_bytes = 0;
        for reason in Reason::ALL {
            let (packets, reason_bytes) = relay.reason_count(reason);
            by_verdict[verdict_retval(reason) as usize] += packets;
            counted_bytes += reason_bytes;
        }
        assert_eq!(by_verdict, actions, "packets per verdict: counters vs. runs ({})", relay.counters());
        assert_eq!(counted_bytes, bytes, "bytes counted");
        println!(
            "fuzzed {frames} frames in {:.1}s ({:.0}/s): pass {} drop {} tx {} redirect {}; reasons: {}",
            elapsed.as_secs_f64(),
            frames as f64 / elapsed.as_secs_f64(),
            actions[XDP_PASS as usize],
            actions[XDP_DROP as usize],
            actions[XDP_TX as usize],
            actions[XDP_REDIRECT as usize],
            relay.counters()
        );
        assert!(
            actions[XDP_TX as usize] > 0 && actions[XDP_REDIRECT as usize] > 0,
            "the mutations must keep reaching the forwarding path"
        );
    });
}

// ---------------------------------------------------------------------------
// The per-CPU route cache: one `bpf_fib_lookup` per flow direction, CPU and
// second, and never for a packet larger than the cached route's MTU.

/// Keeps the calling thread on one CPU: the route cache is per CPU, and a
/// test-run executes on whichever CPU the caller is on.
fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is a valid CPU number below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

#[test]
fn route_cache_forwards_without_a_lookup_for_a_second() {
    let ns = Namespace::create();
    let name = ns.name.clone();
    ns.enter(|topo| {
        pin_to_current_cpu();
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (BACKEND, BACKEND_PORT), 3);
        relay.add_egress(topo.back);
        let input = client_packet();
        let first = relay.expect(&input, Some(topo.front), Reason::RedirectForwarded, XDP_REDIRECT);

        // Without its neighbour a lookup would now say NO_NEIGH: the cached
        // route still forwards, to the same MACs.
        ip(&["-n", &name, "neigh", "del", &dotted(BACKEND), "dev", "back"]);
        let cached = relay.expect(&input, Some(topo.front), Reason::RedirectForwarded, XDP_REDIRECT);
        assert_eq!(cached.out, first.out);

        // Larger than the egress MTU (1500): never from the cache; the lookup
        // hands it to the stack, which fragments (mosh clears DF).
        let jumbo = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), &[0x5a; 1600]);
        let run = relay.run(&jumbo, Some(topo.front));
        assert_eq!(run.retval, XDP_PASS, "an oversized packet was forwarded from the cache");

        // A second later the cache has aged out and the lookup runs again.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        relay.expect(&input, Some(topo.front), Reason::PassFibNoNeigh, XDP_PASS);
    });
}
