//! The embedded XDP object: load it, attach it, and read and write its maps.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, bail};
use aya::maps::{Array, DevMap, HashMap, MapData, MapInfo, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use forwarder_common::clock::JIFFIES_CLOCK_GLOBAL;
use forwarder_common::config::{MAX_INTERFACES, RELAY_CONFIG_GLOBAL, RuntimeSizes, map_names};
use forwarder_common::flow::stamp_ns;
use forwarder_common::reason::ReasonCounter;
use forwarder_common::{
    BackendKey, BackendKey6, ClientKey, ClientKey6, FlowCounter, REASON_COUNT, RelayConfig,
    Rewrite, Rewrite6, SlowpathBucket,
};

use super::bulk::{FlowMapsReader, MapsUsed};
use super::egress::EgressTable;
use super::flows::{BackendHalf, BackendHalfKey, ClientHalf, InstalledClient, InstalledHalves};
use super::portbits::PortBits;
use super::slots::SlotTable;
use forwarder_common::portslot::{
    BackendSlot, ClientSlot, backend_slot_entries, backend_slot_pair, client_slot_entries,
    client_slot_pair,
};
use tracing::{debug, info, warn};

use super::pins::{MapShape, PinDir, layout_id};

/// The compiled XDP program (forwarder-ebpf), embedded by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));

/// Name of the XDP program inside [`EBPF_OBJECT`].
pub const PROGRAM_NAME: &str = "forwarder";

/// How the operator asked to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower on real NICs.
    Skb,
}

/// The loaded program, its attachments and its maps. Dropping it detaches
/// the program from every interface.
pub struct XdpDatapath {
    /// Owns the program and its links; kept alive for as long as we forward.
    _ebpf: Ebpf,
    /// IPv4 halves: each in a slot of its relay port, or in the hash map.
    client_flows: SlotTable<ClientSlot>,
    backend_flows: SlotTable<BackendSlot>,
    client_flows6: HashMap<MapData, ClientKey6, Rewrite6>,
    backend_flows6: HashMap<MapData, BackendKey6, Rewrite6>,
    client_flows_4to6: HashMap<MapData, ClientKey, Rewrite6>,
    backend_flows_4to6: HashMap<MapData, BackendKey, Rewrite6>,
    /// One bit per port some `_4TO6` half is keyed by (see forwarder-common's flow6).
    ports_4to6: PortBits,
    reason_counters: PerCpuArray<MapData, ReasonCounter>,
    /// Newest client nonce XDP forwarded per punched session (forwarder_common::clientseq).
    client_seqs: Array<MapData, u64>,
    slowpath: SlowpathBuckets,
    /// "native", "skb" or a mix, for `stats`.
    pub mode: String,
    /// What the maps were sized to (pinned maps adopted only when they match).
    pub sizes: RuntimeSizes,
    pub pins: PinDir,
    /// The attached interfaces' slots (ifindex → slot), which backend halves name.
    egress_slots: std::collections::BTreeMap<u32, u8>,
    /// The numbering's refresher, until the daemon takes it to run.
    egress: Option<EgressTable>,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("the embedded XDP object has no map {name}: rebuild forwarder"))
}

impl XdpDatapath {
    /// Loads the program with its maps pinned under `pins` (adopting maps
    /// already pinned there), writes the relay's port ranges, and attaches
    /// it to every interface in `interfaces`: an interface whose XDP link is
    /// pinned gets the new program swapped in atomically through that link,
    /// so forwarding never pauses.
    pub fn start(
        interfaces: &[String],
        choice: ModeChoice,
        config: RelayConfig,
        sizes: RuntimeSizes,
        pins: &PinDir,
    ) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this forwarder binary was built with AYA_BUILD_SKIP and holds no XDP program: rebuild without it"
            );
        }
        if interfaces.len() > MAX_INTERFACES as usize {
            return Err(super::Misconfigured(format!(
                "{} interfaces given, but the redirect map holds {MAX_INTERFACES}: attach to fewer (--iface)",
                interfaces.len()
            ))
            .into());
        }
        let names = object_map_names()?;
        // Before anything is loaded or attached: a refused start must leave
        // an adopted data plane exactly as it was.
        check_pinned_sizes(pins, sizes)?;
        check_interfaces_free(interfaces, pins)?;
        let clock = super::clock::program_clock();
        let mut loader = EbpfLoader::new();
        // Read-only: the kernel freezes them, the verifier treats them as constants.
        loader.override_global(RELAY_CONFIG_GLOBAL, &config, true);
        loader.override_global(JIFFIES_CLOCK_GLOBAL, &clock, true);
        for name in &names {
            loader.map_pin_path(name, pins.map_path(name));
        }
        // The slot arrays follow the port ranges (a slot pair per port).
        let slot_entries = [
            (map_names::CLIENT_PORT_SLOTS, client_slot_entries(&config)),
            (map_names::BACKEND_PORT_SLOTS, backend_slot_entries(&config)),
        ];
        for (name, max_entries) in sizes.map_max_entries().into_iter().chain(slot_entries) {
            if !names.iter().any(|n| n == name) {
                bail!("the embedded XDP object has no map {name}: rebuild forwarder");
            }
            loader.map_max_entries(name, max_entries);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|error| {
            anyhow::anyhow!(
                "loading the XDP program failed: {error:#}. The daemon needs root with BPF allowed \
                 (CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN, not in an unprivileged container); \
                 or run with --datapath userspace when it exists"
            )
        })?;

        let mut indices = Vec::new();
        for name in interfaces {
            let index = nix::net::if_::if_nametoindex(name.as_str()).map_err(|_| {
                super::Misconfigured(format!(
                    "interface {name:?} does not exist in this network namespace: check `ip link` \
                     (run the daemon in the namespace that owns it, e.g. with nsenter --net=...)"
                ))
            })?;
            indices.push(index);
        }
        let egress = EgressTable::write(
            DevMap::try_from(take_map(&mut ebpf, map_names::EGRESS)?)?,
            Array::try_from(take_map(&mut ebpf, map_names::EGRESS_IFACES)?)?,
            HashMap::try_from(take_map(&mut ebpf, map_names::EGRESS_SLOTS)?)?,
            &indices,
        )?;

        // The pinned slots are adopted before this program replaces the
        // one running: a live half that these ranges or this slot layout
        // put elsewhere goes to the hash map and its port's bit before its
        // old slot dies, so the old program finds it there, and so does
        // this one from its first packet.
        let client_flows = SlotTable::adopt(
            Array::try_from(take_map(&mut ebpf, map_names::CLIENT_PORT_SLOTS)?)?,
            HashMap::try_from(take_map(&mut ebpf, map_names::CLIENT_FLOWS)?)?,
            Array::try_from(take_map(&mut ebpf, map_names::CLIENT_PORTS_HASHED)?)?,
            client_slot_pair,
            config,
        )
        .context("reading the client halves' port slots")?;
        let backend_flows = SlotTable::adopt(
            Array::try_from(take_map(&mut ebpf, map_names::BACKEND_PORT_SLOTS)?)?,
            HashMap::try_from(take_map(&mut ebpf, map_names::BACKEND_FLOWS)?)?,
            Array::try_from(take_map(&mut ebpf, map_names::BACKEND_PORTS_HASHED)?)?,
            backend_slot_pair,
            config,
        )
        .context("reading the backend halves' port slots")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .context("the embedded XDP object has no program `forwarder`: rebuild forwarder")?
            .try_into()?;
        program.load().map_err(|error| {
            anyhow::anyhow!("the kernel verifier refused the XDP program: {error}")
        })?;
        let mut modes = Vec::new();
        for (name, index) in interfaces.iter().zip(indices) {
            modes.push(attach_pinned(program, name, index, choice, pins)?);
        }
        modes.sort();
        modes.dedup();
        let mode = modes.join("+");

        // The loader either created the maps at these sizes or adopted pins
        // checked above; a mismatch here means someone swapped pins meanwhile.
        check_pinned_sizes(pins, sizes)?;

        let client_flows6 = HashMap::try_from(take_map(&mut ebpf, map_names::CLIENT_FLOWS6)?)?;
        let backend_flows6 = HashMap::try_from(take_map(&mut ebpf, map_names::BACKEND_FLOWS6)?)?;
        let client_flows_4to6 =
            HashMap::try_from(take_map(&mut ebpf, map_names::CLIENT_FLOWS_4TO6)?)?;
        let backend_flows_4to6 =
            HashMap::try_from(take_map(&mut ebpf, map_names::BACKEND_FLOWS_4TO6)?)?;
        // Recounted from the `_4TO6` halves, adopted pinned ones included.
        let translated_ports = (client_flows_4to6.keys().filter_map(Result::ok))
            .map(|k: ClientKey| k.relay_port)
            .chain(
                (backend_flows_4to6.keys().filter_map(Result::ok))
                    .map(|k: BackendKey| k.relay_port),
            )
            .map(u16::from_be_bytes);
        let ports_4to6 = PortBits::rebuild(
            Array::try_from(take_map(&mut ebpf, map_names::PORTS_4TO6)?)?,
            translated_ports,
        )
        .context("writing the translated-port bitmap")?;
        let reason_counters = PerCpuArray::try_from(take_map(&mut ebpf, "REASON_COUNTERS")?)?;
        let client_seqs = Array::try_from(take_map(&mut ebpf, map_names::CLIENT_SEQS)?)?;
        let slowpath = SlowpathBuckets {
            sessions: Array::try_from(take_map(&mut ebpf, "SLOWPATH_SESSION_BUCKETS")?)?,
            limited: std::collections::BTreeSet::new(),
            global: Array::try_from(take_map(&mut ebpf, "SLOWPATH_GLOBAL_BUCKET")?)?,
            per_session: SlowpathBucket::default(),
        };
        let datapath = Self {
            _ebpf: ebpf,
            client_flows,
            backend_flows,
            client_flows6,
            backend_flows6,
            client_flows_4to6,
            backend_flows_4to6,
            ports_4to6,
            reason_counters,
            client_seqs,
            slowpath,
            mode,
            sizes,
            pins: pins.clone(),
            egress_slots: egress.slots().clone(),
            egress: Some(egress),
        };
        Ok(datapath)
    }

    /// The slot a backend half names for the interface `ifindex` (the one
    /// its route leaves through; 0: any).
    pub fn egress_iface(&self, ifindex: u32) -> u8 {
        super::egress::slot_for(&self.egress_slots, ifindex)
    }

    /// The interface numbering's refresher, for the daemon to run (once).
    pub fn take_egress_table(&mut self) -> Option<EgressTable> {
        self.egress.take()
    }

    /// Counts one `_4TO6` half fewer on `port`, clearing its bit with the last.
    fn release_port_4to6(&mut self, port: [u8; 2]) {
        if let Err(error) = self.ports_4to6.release(u16::from_be_bytes(port)) {
            warn!(%error, "clearing a translated port");
        }
    }

    /// Installs both halves of a flow, backend half first so a client packet
    /// never finds a rewrite whose return path is missing. Either both are
    /// in the maps afterwards or neither is.
    /// The halves are written with zero counters: a flow, or a replaced
    /// half, counts from its install.
    pub fn install(&mut self, entries: &FlowEntries) -> anyhow::Result<()> {
        self.insert_backend(&entries.backend)
            .context("inserting the backend half of a flow (is the flow map full?)")?;
        if let Err(error) = self.insert_client(&entries.client) {
            let _ = self.remove_backend(&entries.backend.key());
            return Err(error)
                .context("inserting the client half of a flow (is the flow map full?)");
        }
        Ok(())
    }

    fn insert_backend(&mut self, half: &BackendHalf) -> anyhow::Result<()> {
        match half {
            BackendHalf::V4(key, rewrite) => Ok(self.backend_flows.insert(*key, *rewrite)?),
            BackendHalf::V4To6(key, rewrite) => Ok(self.ports_4to6.put(
                &mut self.backend_flows_4to6,
                u16::from_be_bytes(key.relay_port),
                *key,
                *rewrite,
            )?),
            BackendHalf::V6(key, rewrite) => Ok(self.backend_flows6.insert(key, rewrite, 0)?),
        }
    }

    fn insert_client(&mut self, half: &ClientHalf) -> anyhow::Result<()> {
        match half {
            ClientHalf::V4(key, rewrite) => Ok(self.client_flows.insert(*key, *rewrite)?),
            // The client-facing port's bit, as for the backend half:
            // without it an IPv4 miss never asks this map (and
            // remove_client releases it).
            ClientHalf::V4To6(key, rewrite) => Ok(self.ports_4to6.put(
                &mut self.client_flows_4to6,
                u16::from_be_bytes(key.relay_port),
                *key,
                *rewrite,
            )?),
            ClientHalf::V6(key, rewrite) => Ok(self.client_flows6.insert(key, rewrite, 0)?),
        }
    }

    fn remove_backend(&mut self, key: &BackendHalfKey) -> Result<(), aya::maps::MapError> {
        match key {
            BackendHalfKey::V4(key) => self.backend_flows.remove(key),
            BackendHalfKey::V4To6(key) => {
                let removed = self.backend_flows_4to6.remove(key);
                if removed.is_ok() {
                    self.release_port_4to6(key.relay_port);
                }
                removed
            }
            BackendHalfKey::V6(key) => self.backend_flows6.remove(key),
        }
    }

    fn remove_client(&mut self, half: &ClientHalf) -> Result<(), aya::maps::MapError> {
        match half {
            ClientHalf::V4(key, _) => self.client_flows.remove(key),
            ClientHalf::V4To6(key, _) => {
                let removed = self.client_flows_4to6.remove(key);
                if removed.is_ok() {
                    self.release_port_4to6(key.relay_port);
                }
                removed
            }
            ClientHalf::V6(key, _) => self.client_flows6.remove(key),
        }
    }

    /// Removes both halves, client half first so no packet is rewritten
    /// towards a server whose answers would have nowhere to go.
    pub fn uninstall(&mut self, entries: &FlowEntries) {
        if let Err(error) = self.remove_client(&entries.client) {
            warn!(%error, "removing the client half of a flow");
        }
        if let Err(error) = self.remove_backend(&entries.backend.key()) {
            warn!(%error, "removing the backend half of a flow");
        }
    }

    /// Installs only the backend half of a flow. NAT sessions use it: the
    /// daemon checks every client packet of theirs itself (sessions/nat.rs).
    pub fn install_backend_half(&mut self, entries: &FlowEntries) -> anyhow::Result<()> {
        self.insert_backend(&entries.backend)
            .context("inserting the backend half of a NAT session (is the flow map full?)")
    }

    pub fn uninstall_backend_half(&mut self, entries: &FlowEntries) {
        if let Err(error) = self.remove_backend(&entries.backend.key()) {
            warn!(%error, "removing the backend half of a NAT session");
        }
    }

    /// Removes only the client half: a punched session's client moved, its
    /// backend half is replaced in place.
    pub fn uninstall_client_half(&mut self, entries: &FlowEntries) {
        if let Err(error) = self.remove_client(&entries.client) {
            warn!(%error, "removing the client half of a NAT session");
        }
    }

    /// The newest client-to-server nonce XDP forwarded for the punched
    /// session on `session_port` (0: none yet).
    pub fn recorded_client_seq(&self, session_port: u16) -> anyhow::Result<u64> {
        self.client_seqs
            .get(&u32::from(session_port), 0)
            .context("reading the client sequence numbers XDP recorded")
    }

    /// Forgets what XDP recorded on `session_port`: a new punched session
    /// there must not inherit an earlier one's numbers.
    pub fn reset_client_seq(&mut self, session_port: u16) -> anyhow::Result<()> {
        self.client_seqs
            .set(u32::from(session_port), 0, 0)
            .context("resetting the client sequence number XDP records")
    }

    /// Last-seen timestamps the XDP program wrote: (client half, backend half).
    pub fn last_seen(&self, entries: &FlowEntries) -> (u64, u64) {
        let now = super::monotonic_ns();
        let (client, backend) = self.read_halves(
            entries,
            |r| stamp_ns(r.last_seen, now),
            |r| stamp_ns(r.last_seen, now),
        );
        (client.unwrap_or(0), backend.unwrap_or(0))
    }

    /// What XDP forwarded since the halves were written: (to the server,
    /// through the client half; to the client, through the backend half).
    pub fn flow_counters(&self, entries: &FlowEntries) -> (FlowCounter, FlowCounter) {
        let (client, backend) = self.read_halves(entries, Rewrite::counter, Rewrite6::counter);
        (client.unwrap_or_default(), backend.unwrap_or_default())
    }

    /// [`Self::flow_counters`]' first half alone: one lookup, for the
    /// shared port's admission, which needs only what went to the server.
    pub fn to_server_counter(&self, entries: &FlowEntries) -> FlowCounter {
        self.read_client(entries, Rewrite::counter, Rewrite6::counter)
            .unwrap_or_default()
    }

    /// One field of each of the flow's installed halves, as the kernel holds
    /// them (None: that half is not in its map).
    fn read_halves<T>(
        &self,
        entries: &FlowEntries,
        v4: impl Fn(&Rewrite) -> T,
        v6: impl Fn(&Rewrite6) -> T,
    ) -> (Option<T>, Option<T>) {
        let client = self.read_client(entries, &v4, &v6);
        let backend = match &entries.backend {
            BackendHalf::V4(key, _) => self.backend_flows.get(key).map(|r| v4(&r.rewrite)).ok(),
            BackendHalf::V4To6(key, _) => self.backend_flows_4to6.get(key, 0).map(|r| v6(&r)).ok(),
            BackendHalf::V6(key, _) => self.backend_flows6.get(key, 0).map(|r| v6(&r)).ok(),
        };
        (client, backend)
    }

    /// [`Self::read_halves`] for the client half only.
    fn read_client<T>(
        &self,
        entries: &FlowEntries,
        v4: impl Fn(&Rewrite) -> T,
        v6: impl Fn(&Rewrite6) -> T,
    ) -> Option<T> {
        match &entries.client {
            ClientHalf::V4(key, _) => self.client_flows.get(key).map(|r| v4(&r)).ok(),
            ClientHalf::V4To6(key, _) => self.client_flows_4to6.get(key, 0).map(|r| v6(&r)).ok(),
            ClientHalf::V6(key, _) => self.client_flows6.get(key, 0).map(|r| v6(&r)).ok(),
        }
    }

    /// Descriptors of the flow maps of its own, for reading them in bulk
    /// without this datapath (and the relay lock around it).
    pub fn flow_maps_reader(&self, used: MapsUsed) -> std::io::Result<FlowMapsReader> {
        use aya::maps::IterableMap;
        fn own<K: aya::Pod, V: aya::Pod>(
            map: &impl IterableMap<K, V>,
        ) -> std::io::Result<std::os::fd::OwnedFd> {
            map.map().fd().as_fd().try_clone_to_owned()
        }
        Ok(FlowMapsReader {
            client: own(self.client_flows.hash())?,
            backend: own(self.backend_flows.hash())?,
            client_slots: own(self.client_flows.slots())?,
            backend_slots: own(self.backend_flows.slots())?,
            client_live: self.client_flows.live_slots(),
            backend_live: self.backend_flows.live_slots(),
            client6: own(&self.client_flows6)?,
            backend6: own(&self.backend_flows6)?,
            client_4to6: own(&self.client_flows_4to6)?,
            backend_4to6: own(&self.backend_flows_4to6)?,
            used,
        })
    }

    /// Every flow half in the maps (what the kernel forwards right now).
    pub fn installed(&self) -> InstalledHalves {
        let clients = (self.client_flows.iter())
            .map(|(key, rewrite)| ClientHalf::V4(key, rewrite))
            .chain(
                (self.client_flows6.iter().filter_map(Result::ok))
                    .map(|(key, rewrite)| ClientHalf::V6(key, rewrite)),
            )
            .chain(
                (self.client_flows_4to6.iter().filter_map(Result::ok))
                    .map(|(key, rewrite)| ClientHalf::V4To6(key, rewrite)),
            )
            .collect();
        let backends = (self.backend_flows.iter())
            .map(|(key, rewrite)| BackendHalf::V4(key, rewrite))
            .chain(
                (self.backend_flows6.iter().filter_map(Result::ok))
                    .map(|(key, rewrite)| BackendHalf::V6(key, rewrite)),
            )
            .chain(
                (self.backend_flows_4to6.iter().filter_map(Result::ok))
                    .map(|(key, rewrite)| BackendHalf::V4To6(key, rewrite)),
            )
            .collect();
        InstalledHalves::new(clients, backends)
    }

    /// Removes one client half found in the map without its flow (restart reconciliation).
    pub fn remove_client_half(&mut self, half: &InstalledClient) {
        if let Err(error) = self.remove_client(&half.half) {
            warn!(%error, "removing an orphaned client half");
        }
    }

    /// Removes one backend half found in the map without its flow.
    pub fn remove_backend_half(&mut self, key: &BackendHalfKey) {
        if let Err(error) = self.remove_backend(key) {
            warn!(%error, "removing an orphaned backend half");
        }
    }

    /// Entries and kernel memory of the pinned maps, for `stats`.
    pub fn map_usage(&self) -> Vec<MapUsage> {
        let counted = [
            ("CLIENT_FLOWS", Some(self.client_flows.counts().1)),
            ("BACKEND_FLOWS", Some(self.backend_flows.counts().1)),
            (
                map_names::CLIENT_PORT_SLOTS,
                Some(self.client_flows.counts().0),
            ),
            (
                map_names::BACKEND_PORT_SLOTS,
                Some(self.backend_flows.counts().0),
            ),
            (
                map_names::CLIENT_FLOWS6,
                Some(self.client_flows6.keys().count()),
            ),
            (
                map_names::BACKEND_FLOWS6,
                Some(self.backend_flows6.keys().count()),
            ),
            (
                map_names::CLIENT_FLOWS_4TO6,
                Some(self.client_flows_4to6.keys().count()),
            ),
            (
                map_names::BACKEND_FLOWS_4TO6,
                Some(self.backend_flows_4to6.keys().count()),
            ),
            ("REASON_COUNTERS", None),
            ("EGRESS", None),
            (map_names::EGRESS_IFACES, None),
            (map_names::EGRESS_SLOTS, Some(self.egress_slots.len())),
            (
                "SLOWPATH_SESSION_BUCKETS",
                Some(self.slowpath.limited.len()),
            ),
            ("SLOWPATH_GLOBAL_BUCKET", None),
            (map_names::PORTS_4TO6, None),
            (map_names::CLIENT_PORTS_HASHED, None),
            (map_names::BACKEND_PORTS_HASHED, None),
            (map_names::CLIENT_SEQS, None),
        ];
        counted
            .into_iter()
            .filter_map(|(name, entries)| {
                let path = self.pins.map_path(name);
                let map = MapData::from_pin(&path).ok()?;
                let max_entries = map.info().ok()?.max_entries();
                let fd = map.fd().as_fd().as_raw_fd();
                Some(MapUsage {
                    name: name.to_string(),
                    entries,
                    max_entries,
                    memlock_bytes: memlock_of(fd),
                })
            })
            .collect()
    }

    /// Every reason counter summed over CPUs, indexed by reason.
    pub fn reason_counters(&self) -> Vec<ReasonCounter> {
        (0..REASON_COUNT)
            .map(|index| {
                self.reason_counters
                    .get(&index, 0)
                    .map(|per_cpu| {
                        per_cpu
                            .iter()
                            .fold(ReasonCounter::default(), |sum, c| ReasonCounter {
                                packets: sum.packets + c.packets,
                                bytes: sum.bytes + c.bytes,
                            })
                    })
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The slow-path rate limits in the kernel (forwarder-ebpf's slowpath.rs).
struct SlowpathBuckets {
    /// One slot per port (forwarder_common::slowpath::SESSION_BUCKET_SLOTS).
    sessions: Array<MapData, SlowpathBucket>,
    /// Ports whose slot this daemon set: what `stats` counts as entries.
    limited: std::collections::BTreeSet<u16>,
    global: Array<MapData, SlowpathBucket>,
    /// What each new session's bucket starts as.
    per_session: SlowpathBucket,
}

impl XdpDatapath {
    /// Sets how many packets a second the XDP program may hand to the
    /// daemon per session and in total (0: unlimited).
    /// Buckets an earlier daemon left in the pinned map are dropped: the
    /// sessions restored afterwards get fresh ones with these limits.
    pub fn limit_slowpath(&mut self, per_session_pps: u32, global_pps: u32) -> anyhow::Result<()> {
        clear_session_buckets(&mut self.slowpath.sessions)?;
        self.slowpath.limited.clear();
        self.slowpath.per_session = SlowpathBucket::per_second(per_session_pps);
        self.slowpath
            .global
            .set(0, SlowpathBucket::per_second(global_pps), 0)
            .context("writing the global slow-path bucket")
    }

    /// Gives the session on `port` its own slow-path bucket.
    pub fn add_session_bucket(&mut self, port: u16) -> anyhow::Result<()> {
        if self.slowpath.per_session.is_unlimited() {
            return Ok(());
        }
        self.slowpath
            .sessions
            .set(u32::from(port), self.slowpath.per_session, 0)
            .with_context(|| format!("writing the slow-path bucket of port {port}"))?;
        self.slowpath.limited.insert(port);
        Ok(())
    }

    pub fn remove_session_bucket(&mut self, port: u16) {
        // Never set when the limit is off: nothing to clear then.
        if !self.slowpath.limited.remove(&port) {
            return;
        }
        if let Err(error) =
            self.slowpath
                .sessions
                .set(u32::from(port), SlowpathBucket::default(), 0)
        {
            warn!(%error, port, "clearing a session's slow-path bucket");
        }
    }
}

/// Resets every per-session slow-path bucket that is set (an earlier
/// daemon's sessions, in an adopted pinned map) and returns how many. One
/// batch read finds them (17 syscalls for the 65,536 slots); a kernel
/// without batch lookups for arrays gets a read per slot instead, tens of
/// milliseconds once a start. Public for the XDP tests, which run it on a
/// loaded program's map.
pub fn clear_session_buckets<T: std::borrow::BorrowMut<MapData>>(
    sessions: &mut Array<T, SlowpathBucket>,
) -> anyhow::Result<usize> {
    let stale = match super::bulk::nonzero_slots(sessions)
        .context("reading the slow-path buckets in one batch (BPF_MAP_LOOKUP_BATCH)")?
    {
        Some(stale) => stale,
        None => {
            debug!(
                "the kernel has no batch lookup for arrays: reading the slow-path buckets one by one"
            );
            (0..sessions.len())
                .filter(|port| {
                    sessions
                        .get(port, 0)
                        .is_ok_and(|bucket| bucket != SlowpathBucket::default())
                })
                .collect()
        }
    };
    for &port in &stale {
        sessions
            .set(port, SlowpathBucket::default(), 0)
            .with_context(|| format!("clearing the stale slow-path bucket of port {port}"))?;
    }
    Ok(stale.len())
}

fn attach(
    program: &mut Xdp,
    name: &str,
    index: u32,
    choice: ModeChoice,
) -> anyhow::Result<(String, XdpLinkId)> {
    match choice {
        ModeChoice::Native => {
            let link = program_attach(program, index, XdpMode::Driver).map_err(|error| {
                anyhow::anyhow!(
                    "the driver of {name} refused native XDP ({error}): use --xdp-mode skb (generic) or auto"
                )
            })?;
            info!(interface = name, "XDP attached in native mode");
            Ok(("native".into(), link))
        }
        ModeChoice::Skb => {
            let link = program_attach(program, index, XdpMode::Skb).map_err(|error| {
                anyhow::anyhow!("attaching XDP to {name} in skb mode failed: {error}")
            })?;
            info!(interface = name, "XDP attached in generic (skb) mode");
            Ok(("skb".into(), link))
        }
        ModeChoice::Auto => match program_attach(program, index, XdpMode::Driver) {
            Ok(link) => {
                info!(interface = name, "XDP attached in native mode");
                Ok(("native".into(), link))
            }
            Err(native_error) => {
                warn!(
                    interface = name,
                    %native_error,
                    "the driver refused native XDP; falling back to generic (skb) mode, which is slower"
                );
                let link = program_attach(program, index, XdpMode::Skb).map_err(|error| {
                    anyhow::anyhow!(
                        "attaching XDP to {name} failed in native mode ({native_error}) and in skb mode ({error})"
                    )
                })?;
                Ok(("skb".into(), link))
            }
        },
    }
}

fn program_attach(program: &mut Xdp, index: u32, mode: XdpMode) -> anyhow::Result<XdpLinkId> {
    program.attach_to_if_index(index, mode).map_err(|error| {
        // The top-level error hides the errno that says why; keep the chain.
        anyhow::Error::from(error)
    })
}

/// One pinned map's fill and kernel memory.
#[derive(Clone, Debug)]
pub struct MapUsage {
    pub name: String,
    /// Entries in use (hash maps only; arrays are always full).
    pub entries: Option<usize>,
    pub max_entries: u32,
    /// Kernel memory charged to the map, from /proc/self/fdinfo.
    pub memlock_bytes: u64,
}

fn memlock_of(fd: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("memlock:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Swaps the program into the interface's pinned link when there is one
/// (atomic: no packet sees the interface without a program), else attaches
/// and pins a new link.
fn attach_pinned(
    program: &mut Xdp,
    name: &str,
    index: u32,
    choice: ModeChoice,
    pins: &PinDir,
) -> anyhow::Result<String> {
    if let Some((path, mode)) = pins.find_link(name) {
        let adopted = PinnedLink::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|pinned| Ok(XdpLink::try_from(FdLink::from(pinned))?))
            .and_then(|link| Ok(program.attach_to_link(link)?));
        match adopted {
            Ok(_) => {
                info!(
                    interface = name,
                    mode, "adopted the pinned XDP link; forwarding never stopped"
                );
                return Ok(mode);
            }
            // The interface was deleted and re-created: its old link is defunct.
            Err(error) => {
                warn!(
                    interface = name,
                    error = format!("{error:#}"),
                    "the pinned XDP link is stale; attaching anew"
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("unpinning {}", path.display()))?;
            }
        }
    }
    let (mode, link_id) = attach(program, name, index, choice)?;
    let link = program.take_link(link_id)?;
    let link = FdLink::try_from(link).map_err(|_| {
        anyhow::anyhow!(
            "the kernel attached XDP to {name} through netlink, not as a bpf_link, which cannot be \
             pinned: the relay needs Linux 5.9 or newer to keep forwarding while the daemon restarts"
        )
    })?;
    let path = pins.link_path(name, &mode);
    link.pin(&path)
        .with_context(|| format!("pinning the XDP link of {name} at {}", path.display()))?;
    Ok(mode)
}

/// A map's name, type, key size, value size and creation flags.
type Shape = (String, u32, u32, u32, u32);

/// Names and shapes of the maps in the embedded object.
fn map_shapes() -> anyhow::Result<Vec<Shape>> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .context("parsing the embedded XDP object: rebuild forwarder")?;
    // Sections such as .rodata become maps too: they are the program's own
    // globals, set anew at every load, never pinned or adopted.
    Ok(object
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            (
                name.clone(),
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.map_flags(),
            )
        })
        .collect())
}

fn object_map_names() -> anyhow::Result<Vec<String>> {
    Ok(map_shapes()?.into_iter().map(|(name, ..)| name).collect())
}

/// The fingerprint of the embedded object's maps (see [`super::pins`]).
pub fn layout() -> anyhow::Result<String> {
    let shapes = map_shapes()?;
    let mut shapes: Vec<MapShape<'_>> = shapes
        .iter()
        .map(
            |(name, map_type, key_size, value_size, map_flags)| MapShape {
                name,
                map_type: *map_type,
                key_size: *key_size,
                value_size: *value_size,
                map_flags: *map_flags,
            },
        )
        .collect();
    Ok(layout_id(&mut shapes))
}

/// Pinned maps keep the size they were created with; adopting ones of
/// another size would make `--max-flows` / `--max-flows6` lie, so the daemon
/// refuses and says how to go on.
fn check_pinned_sizes(pins: &PinDir, sizes: RuntimeSizes) -> anyhow::Result<()> {
    // What the pins were created with, per knob: the IPv4 maps', and the
    // IPv6 and translated maps'.
    let (mut pinned_flows, mut pinned_flows6) = (None, None);
    let mut mismatch = false;
    for (name, wanted) in sizes.map_max_entries() {
        let path = pins.map_path(name);
        if !path.exists() {
            continue;
        }
        let got = MapInfo::from_pin(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .max_entries();
        mismatch |= got != wanted;
        match name {
            map_names::CLIENT_FLOWS | map_names::BACKEND_FLOWS => pinned_flows = Some(got),
            map_names::CLIENT_FLOWS6
            | map_names::BACKEND_FLOWS6
            | map_names::CLIENT_FLOWS_4TO6
            | map_names::BACKEND_FLOWS_4TO6 => pinned_flows6 = Some(got),
            _ => {}
        }
    }
    if !mismatch {
        return Ok(());
    }
    let instance = pins
        .instance_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let shown = |n: Option<u32>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    let (flows, flows6) = (shown(pinned_flows), shown(pinned_flows6));
    // --max-sessions sizes no map (the session buckets have a slot per port).
    Err(super::Misconfigured(format!(
        "the data plane pinned for instance {instance:?} ({}) was created with --max-flows {flows}, \
         --max-flows6 {flows6}, but this run asks for --max-flows {}, --max-flows6 {}: pinned maps keep \
         their size. Either start with --max-flows {flows} --max-flows6 {flows6} (established flows keep \
         forwarding), or stop the daemon, run `forwarder detach --instance {instance}` (drops established \
         flows; sessions stay stored) and start again with the new sizes",
        pins.dir.display(),
        sizes.max_flows,
        sizes.max_flows6,
    ))
    .into())
}

/// Refuses, before anything is attached, an interface that already runs
/// an XDP program this instance did not pin: attaching would fail with a
/// bare EBUSY/EEXIST, and falling back to the userspace datapath would hide
/// that another relay (or tool) owns the interface.
fn check_interfaces_free(interfaces: &[String], pins: &PinDir) -> anyhow::Result<()> {
    for name in interfaces {
        let Some(prog_id) = attached_xdp_prog(name)? else {
            continue;
        };
        if let Some((path, _)) = pins.find_link(name)
            && pinned_link_prog(&path) == Some(prog_id)
        {
            continue;
        }
        let owner = match forwarder_owning(prog_id) {
            Some(other) => format!("by forwarder instance {other:?}"),
            None => "by another program, not a forwarder instance on this host".to_string(),
        };
        return Err(super::Misconfigured(format!(
            "interface {name} already has an XDP program attached ({owner}; program id {prog_id}): one \
             interface takes one XDP program. Run one instance per interface (give this instance other \
             --iface), stop and `forwarder detach` the other instance, or remove the other program \
             (`ip link set dev {name} xdp off`)"
        ))
        .into());
    }
    Ok(())
}

/// The id of the XDP program attached to `name` (any mode).
pub fn attached_xdp_prog(name: &str) -> anyhow::Result<Option<u32>> {
    match super::netlink::link_by_name(name)
        .with_context(|| format!("asking the kernel (rtnetlink) about interface {name}"))?
    {
        Some(link) => Ok(link.xdp_prog),
        None => Err(super::Misconfigured(format!(
            "interface {name:?} does not exist in this network namespace: check `ip link` \
             (run the daemon in the namespace that owns it, e.g. with nsenter --net=...)"
        ))
        .into()),
    }
}

fn pinned_link_prog(path: &std::path::Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(path).ok()?);
    Some(link.info().ok()?.program_id())
}

/// The forwarder instance whose pinned link runs program `prog_id`, if any
/// (bpffs is shared across network namespaces, so this finds instances in
/// other namespaces too).
fn forwarder_owning(prog_id: u32) -> Option<String> {
    let root = std::path::Path::new(super::pins::BPFFS).join("forwarder");
    for instance in std::fs::read_dir(root).ok()?.filter_map(Result::ok) {
        for layout in std::fs::read_dir(instance.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            for pin in std::fs::read_dir(layout.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                let is_link = pin.file_name().to_string_lossy().starts_with("link-");
                if is_link && pinned_link_prog(&pin.path()) == Some(prog_id) {
                    return Some(instance.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    None
}

pub use super::flows::{BackendRoute, FlowEntries, route_to};
