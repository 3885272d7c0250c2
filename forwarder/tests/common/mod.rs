//! What the XDP test binaries share: the real XDP program run through
//! `BPF_PROG_TEST_RUN` on crafted frames, and for each frame the verdict,
//! the reason counter and the output bytes.
//!
//! Frames are built with etherparse and forwarded frames are checked with
//! etherparse's own checksum code, never with the project's helpers.
//!
//! Forwarding cases need `bpf_fib_lookup`, which consults the network
//! namespace of the ingress device: see [`namespace`]. Without `ctx_in` the
//! program sees the loopback device of the caller's namespace, which is
//! enough for every frame that never reaches a route lookup.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN), `ip` and `ethtool`.

#![expect(
    dead_code,
    reason = "each XDP test binary uses only part of the shared fixture"
)]

pub mod namespace;
pub mod table;

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::Xdp,
};
use etherparse::{Ipv4Header, PacketBuilder};
use forwarder::datapath::slots::SlotTable;
use forwarder::datapath::xdp::{EBPF_OBJECT, PROGRAM_NAME};
use forwarder_common::{
    BackendKey, BackendRewrite, ClientKey, REASON_COUNT, Reason, RelayConfig, Rewrite,
    SlowpathBucket,
    clock::{JIFFIES_CLOCK_GLOBAL, JiffiesClock},
    config::{RELAY_CONFIG_GLOBAL, map_names},
    flow::{EgressIface, Endpoints, IFACE_ANY, IFACE_NONE},
    portslot::{
        BackendSlot, ClientSlot, backend_slot_entries, backend_slot_pair, client_slot_entries,
        client_slot_pair,
    },
    reason::ReasonCounter,
};

pub mod six;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const SESSION_PORT: u16 = 60_001;
pub const FLOW_PORT: u16 = 61_001;
pub const CONFIG: RelayConfig = RelayConfig {
    session_port_lo: 60_000,
    session_port_hi: 60_099,
    flow_port_lo: 61_000,
    flow_port_hi: 61_999,
    shared_port: SHARED_PORT,
    _pad: 0,
};
/// The shared port, outside both ranges (as 443 would be).
pub const SHARED_PORT: u16 = 443;

// Addresses of the namespace topology (and reused by the tests that need no
// namespace).
pub const CLIENT: [u8; 4] = [10, 0, 1, 2];
pub const CLIENT_PORT: u16 = 40_000;
pub const RELAY_FRONT: [u8; 4] = [10, 0, 1, 1];
pub const RELAY_BACK: [u8; 4] = [10, 0, 2, 1];
pub const BACKEND: [u8; 4] = [10, 0, 2, 2];
pub const BACKEND_PORT: u16 = 60_002;
/// A second backend on the client's link: forwarding to it leaves by the
/// ingress interface (XDP_TX).
pub const NEAR_BACKEND: [u8; 4] = [10, 0, 1, 3];
/// On the backend link but without a neighbour entry.
pub const UNRESOLVED_BACKEND: [u8; 4] = [10, 0, 2, 9];
/// No route at all in the namespace (TEST-NET-1).
pub const UNROUTABLE_BACKEND: [u8; 4] = [192, 0, 2, 1];

// IPv6 addresses of the same topology (see namespace.rs).
pub const CLIENT6: [u8; 16] = v6(1, 2);
pub const RELAY_FRONT6: [u8; 16] = v6(1, 1);
pub const RELAY_BACK6: [u8; 16] = v6(2, 1);
pub const BACKEND6: [u8; 16] = v6(2, 2);
pub const NEAR_BACKEND6: [u8; 16] = v6(1, 3);

/// `fd00:NET::HOST`.
const fn v6(net: u8, host: u8) -> [u8; 16] {
    [0xfd, 0, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, host]
}

pub const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
pub const NEAR_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 3];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 2];

pub const PAYLOAD: &[u8] = b"\x80\x00\x00\x00\x00\x00\x00\x01mosh datagram payload, ocb";

/// Offsets of the IPv4 and UDP headers in an untagged frame without IP options.
pub const IP: usize = 14;
pub const UDP: usize = 34;

/// The daemon's measurement of the kernel tick, taken once per test binary.
fn program_clock() -> &'static JiffiesClock {
    static CLOCK: std::sync::OnceLock<JiffiesClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(|| {
        forwarder::datapath::clock::measure().expect("measuring the kernel tick for the XDP clock")
    })
}

/// One loaded copy of the program with its own (unpinned) maps.
pub struct Relay {
    ebpf: Ebpf,
    /// Interfaces numbered by `add_egress`, slot 1 first.
    slots: Vec<u32>,
    /// The IPv4 flow halves, placed in port slots or hash maps by the
    /// daemon's own code, so the tests forward through the tables the
    /// daemon fills.
    client: SlotTable<ClientSlot>,
    backend: SlotTable<BackendSlot>,
}

/// What one test run returned.
pub struct Run {
    pub retval: u32,
    pub out: Vec<u8>,
}

impl Relay {
    pub fn load() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .override_global(RELAY_CONFIG_GLOBAL, &CONFIG, true)
            // The daemon's clock, so the tests run the program as it does.
            .override_global(JIFFIES_CLOCK_GLOBAL, program_clock(), true)
            .map_max_entries(map_names::CLIENT_PORT_SLOTS, client_slot_entries(&CONFIG))
            .map_max_entries(map_names::BACKEND_PORT_SLOTS, backend_slot_entries(&CONFIG))
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
        let mut take = |name: &str| ebpf.take_map(name).unwrap_or_else(|| panic!("{name} map"));
        let client = SlotTable::adopt(
            Array::try_from(take(map_names::CLIENT_PORT_SLOTS)).unwrap(),
            HashMap::try_from(take(map_names::CLIENT_FLOWS)).unwrap(),
            Array::try_from(take(map_names::CLIENT_PORTS_HASHED)).unwrap(),
            client_slot_pair,
            CONFIG,
        )
        .unwrap();
        let backend = SlotTable::adopt(
            Array::try_from(take(map_names::BACKEND_PORT_SLOTS)).unwrap(),
            HashMap::try_from(take(map_names::BACKEND_FLOWS)).unwrap(),
            Array::try_from(take(map_names::BACKEND_PORTS_HASHED)).unwrap(),
            backend_slot_pair,
            CONFIG,
        )
        .unwrap();
        Self {
            ebpf,
            slots: Vec::new(),
            client,
            backend,
        }
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program missing from the object")
            .try_into()
            .expect("program is not XDP")
    }

    /// Installs (or replaces) a client half where the daemon would.
    pub fn add_client_flow(&mut self, key: ClientKey, rewrite: Rewrite) {
        self.client.insert(key, rewrite).unwrap();
    }

    /// Installs (or replaces) a backend half where the daemon would.
    pub fn add_backend_flow(&mut self, key: BackendKey, rewrite: BackendRewrite) {
        self.backend.insert(key, rewrite).unwrap();
    }

    pub fn remove_client_flow(&mut self, key: &ClientKey) {
        self.client.remove(key).unwrap();
    }

    /// What a restarted daemon does with the maps it adopts: new tables
    /// over the same kernel maps, with nothing of the old tables' memory.
    pub fn readopt(&mut self) {
        self.client = self.client_table();
    }

    /// A client table of its own over the same kernel maps, for a thread
    /// that writes halves while this one runs the program.
    pub fn client_table(&self) -> SlotTable<ClientSlot> {
        fn reopen(map: &aya::maps::MapData) -> aya::maps::MapData {
            aya::maps::MapData::from_id(map.info().unwrap().id()).unwrap()
        }
        use aya::maps::{IterableMap as _, Map};
        SlotTable::adopt(
            Array::try_from(Map::Array(reopen(self.client.slots().map()))).unwrap(),
            HashMap::try_from(Map::HashMap(reopen(self.client.hash().map()))).unwrap(),
            Array::try_from(Map::Array(reopen(self.client.bits().map()))).unwrap(),
            client_slot_pair,
            CONFIG,
        )
        .unwrap()
    }

    /// Writes client slot `index` as it is, bypassing the daemon's placement.
    pub fn write_client_slot(&mut self, index: u32, slot: ClientSlot) {
        use aya::maps::{IterableMap as _, Map};
        let data = aya::maps::MapData::from_id(self.client.slots().map().info().unwrap().id());
        let mut array: Array<_, ClientSlot> = Array::try_from(Map::Array(data.unwrap())).unwrap();
        array.set(index, slot, 0).unwrap();
    }

    /// Whether a client slot miss on `port` asks the hash map.
    pub fn client_port_hashed(&self, port: u16) -> bool {
        self.client.port_hashed(port).unwrap()
    }

    /// (halves in port slots, halves in the hash map) of each side.
    pub fn flow_placement(&self) -> ((usize, usize), (usize, usize)) {
        (self.client.counts(), self.backend.counts())
    }

    /// Numbers `ifindex` as the daemon does (the devmap, its MAC and MTU in
    /// `EGRESS_IFACES`, its slot in `EGRESS_SLOTS`) and returns its slot;
    /// again for a numbered one, just its slot. Must run in the namespace
    /// that owns `ifindex`: the kernel resolves it there.
    pub fn add_egress(&mut self, ifindex: u32) -> u8 {
        if let Some(slot) = self.slots.iter().position(|&i| i == ifindex) {
            return slot as u8 + 1;
        }
        let slot = self.slots.len() as u8 + 1;
        let link = forwarder::datapath::netlink::links()
            .expect("listing this namespace's interfaces")
            .into_iter()
            .find(|link| link.index == ifindex)
            .unwrap_or_else(|| panic!("no interface {ifindex} in this namespace"));
        let iface = EgressIface {
            ifindex,
            mtu: link.mtu as u16,
            mac: link.mac.unwrap_or_default(),
        };
        self.set_iface(slot, iface);
        let mut devmap =
            DevMap::try_from(self.ebpf.map_mut(map_names::EGRESS).expect("EGRESS map")).unwrap();
        devmap.set(u32::from(slot), ifindex, None, 0).unwrap();
        let mut slots: HashMap<_, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(map_names::EGRESS_SLOTS)
                .expect("EGRESS_SLOTS map"),
        )
        .unwrap();
        slots.insert(ifindex, slot, 0).unwrap();
        self.slots.push(ifindex);
        slot
    }

    /// Rewrites one `EGRESS_IFACES` slot, as the daemon's refresh does.
    pub fn set_iface(&mut self, slot: u8, iface: EgressIface) {
        let mut ifaces: Array<_, EgressIface> = Array::try_from(
            self.ebpf
                .map_mut(map_names::EGRESS_IFACES)
                .expect("EGRESS_IFACES map"),
        )
        .unwrap();
        ifaces.set(u32::from(slot), iface, 0).unwrap();
    }

    /// What an entry names for `ifindex`, as the daemon computes it:
    /// `IFACE_ANY` for 0, its slot, or `IFACE_NONE` when not numbered.
    pub fn iface_slot(&self, ifindex: u32) -> u8 {
        if ifindex == 0 {
            return IFACE_ANY;
        }
        self.slots
            .iter()
            .position(|&i| i == ifindex)
            .map_or(IFACE_NONE, |slot| slot as u8 + 1)
    }

    /// The slow-path bucket of the session on `port`, refilled at `pps`.
    pub fn set_session_bucket(&mut self, port: u16, pps: u32) {
        let mut map: Array<_, SlowpathBucket> = Array::try_from(
            self.ebpf
                .map_mut("SLOWPATH_SESSION_BUCKETS")
                .expect("SLOWPATH_SESSION_BUCKETS map"),
        )
        .unwrap();
        map.set(u32::from(port), SlowpathBucket::per_second(pps), 0)
            .unwrap();
    }

    /// The relay-wide slow-path bucket, refilled at `pps`.
    pub fn set_global_bucket(&mut self, pps: u32) {
        let mut map: Array<_, SlowpathBucket> = Array::try_from(
            self.ebpf
                .map_mut("SLOWPATH_GLOBAL_BUCKET")
                .expect("SLOWPATH_GLOBAL_BUCKET map"),
        )
        .unwrap();
        map.set(0, SlowpathBucket::per_second(pps), 0).unwrap();
    }

    /// The map named `name`, for the daemon's own functions that take one.
    pub fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("{name} map"))
    }

    /// Inserts `key → value` into the map named `name` (any key and value type).
    pub fn insert<K: aya::Pod, V: aya::Pod>(&mut self, name: &str, key: K, value: V) {
        let mut map: HashMap<_, K, V> = HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("{name} map")),
        )
        .unwrap();
        map.insert(key, value, 0).unwrap();
    }

    /// ORs `bits` into word `index` of the u32 array named `name`.
    pub fn set_array_word(&mut self, name: &str, index: u32, bits: u32) {
        let mut map: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("{name} map")),
        )
        .unwrap();
        let old = map.get(&index, 0).unwrap();
        map.set(index, old | bits, 0).unwrap();
    }

    /// Slot `index` of the u64 array named `name`.
    pub fn array_u64(&self, name: &str, index: u32) -> u64 {
        let map: Array<_, u64> =
            Array::try_from(self.ebpf.map(name).unwrap_or_else(|| panic!("{name} map"))).unwrap();
        map.get(&index, 0).unwrap()
    }

    pub fn client_flow(&self, key: &ClientKey) -> Rewrite {
        self.client.get(key).unwrap()
    }

    pub fn backend_flow(&self, key: &BackendKey) -> BackendRewrite {
        self.backend.get(key).unwrap()
    }

    /// Runs the program once; `ingress` sets `xdp_md.ingress_ifindex`.
    pub fn run(&self, frame: &[u8], ingress: Option<u32>) -> Run {
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
    pub fn reason_count(&self, reason: Reason) -> (u64, u64) {
        let map: PerCpuArray<_, ReasonCounter> =
            PerCpuArray::try_from(self.ebpf.map("REASON_COUNTERS").unwrap()).unwrap();
        map.get(&(reason as u32), 0)
            .unwrap()
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    pub fn total_packets(&self) -> u64 {
        (0..REASON_COUNT)
            .map(|index| self.reason_count(Reason::ALL[index as usize]).0)
            .sum()
    }

    /// Packets and bytes forwarded through the client half `key`.
    pub fn flow_count(&self, key: &ClientKey) -> (u64, u64) {
        let counter = self.client_flow(key).counter();
        (counter.packets, counter.bytes)
    }

    /// Runs `frame` and checks it ends with `reason` (counted once, with the
    /// frame's length, and under no other reason) and the verdict `retval`;
    /// a passed or dropped frame must come out untouched.
    pub fn expect(&self, frame: &[u8], ingress: Option<u32>, reason: Reason, retval: u32) -> Run {
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
            // Bytes as the frame leaves: a translation changes its size.
            (packets_before + 1, bytes_before + run.out.len() as u64),
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

    pub fn counters(&self) -> String {
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

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load XDP programs and create network namespaces: run them as root \
         (sudo -E cargo test -p forwarder --tests)"
    );
}

/// The XDP action a reason's verdict stands for.
pub fn verdict_retval(reason: Reason) -> u32 {
    match reason.verdict() {
        forwarder_common::Verdict::Pass => XDP_PASS,
        forwarder_common::Verdict::Drop => XDP_DROP,
        forwarder_common::Verdict::Tx => XDP_TX,
        forwarder_common::Verdict::Redirect => XDP_REDIRECT,
    }
}

/// An Ethernet/IPv4/UDP frame with valid checksums, TTL 64.
pub fn udp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// Applies `edit` to the IPv4 header and recomputes its checksum with etherparse.
pub fn edit_ip(frame: &mut [u8], edit: impl FnOnce(&mut Ipv4Header)) {
    let (mut header, _) = Ipv4Header::from_slice(&frame[IP..]).unwrap();
    edit(&mut header);
    header.header_checksum = header.calc_header_checksum();
    let bytes = header.to_bytes();
    frame[IP..IP + bytes.len()].copy_from_slice(&bytes);
}

/// Sets raw header bytes and refreshes the IPv4 checksum (for values
/// etherparse refuses to represent, such as an inconsistent total length).
pub fn poke(frame: &mut [u8], offset: usize, bytes: &[u8]) {
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

pub fn endpoints(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Endpoints {
    Endpoints {
        saddr: src.0,
        daddr: dst.0,
        sport: src.1.to_be_bytes(),
        dport: dst.1.to_be_bytes(),
    }
}

pub fn client_key(client: ([u8; 4], u16), relay: ([u8; 4], u16)) -> ClientKey {
    ClientKey {
        relay_addr: relay.0,
        client_addr: client.0,
        relay_port: relay.1.to_be_bytes(),
        client_port: client.1.to_be_bytes(),
    }
}

pub fn backend_key(relay: ([u8; 4], u16)) -> BackendKey {
    BackendKey {
        relay_addr: relay.0,
        relay_port: relay.1.to_be_bytes(),
        _pad: [0; 2],
    }
}

/// Installs the client half `client → relay:P` rewritten to `relay_back:Q → backend`.
pub fn install_client_flow(relay: &mut Relay, backend: ([u8; 4], u16)) -> ClientKey {
    let from = endpoints((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
    let to_addr = if backend.0 == NEAR_BACKEND {
        RELAY_FRONT
    } else {
        RELAY_BACK
    };
    let to = endpoints((to_addr, FLOW_PORT), backend);
    let key = client_key((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT));
    relay.add_client_flow(key, Rewrite::new(from, to));
    key
}

/// The backend half `backend → relay_back:Q` rewritten to `relay:P → client`,
/// accepted only from `backend`, arriving on the interface in slot
/// `allowed_iface` (`IFACE_ANY`: anywhere).
pub fn backend_rewrite(allowed_iface: u8) -> BackendRewrite {
    let from = endpoints((BACKEND, BACKEND_PORT), (RELAY_BACK, FLOW_PORT));
    let to = endpoints((RELAY_FRONT, SESSION_PORT), (CLIENT, CLIENT_PORT));
    BackendRewrite::new(
        Rewrite::new(from, to),
        BACKEND,
        BACKEND_PORT.to_be_bytes(),
        allowed_iface,
    )
}

/// Installs [`backend_rewrite`] on `relay_back:Q`, accepted on
/// `allowed_ifindex` (0: any; not numbered: none).
pub fn install_backend_flow(relay: &mut Relay, allowed_ifindex: u32) {
    let allowed = relay.iface_slot(allowed_ifindex);
    relay.add_backend_flow(
        backend_key((RELAY_BACK, FLOW_PORT)),
        backend_rewrite(allowed),
    );
}

pub fn client_packet() -> Vec<u8> {
    client_with(PAYLOAD)
}

pub fn backend_packet() -> Vec<u8> {
    udp_frame((BACKEND, BACKEND_PORT), (RELAY_BACK, FLOW_PORT), PAYLOAD)
}

/// A client packet to the session port carrying `payload`.
pub fn client_with(payload: &[u8]) -> Vec<u8> {
    udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), payload)
}
