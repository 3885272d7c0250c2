//! Per-packet cost of the XDP programs through `BPF_PROG_TEST_RUN`, which
//! times `repeat` runs inside the kernel: nothing of the scheduler, the
//! senders or the other tenants of a shared host is in the figure, only
//! the program and the caches it touches.
//!
//! Forwarding cases need a packet that is still a relay packet after its
//! rewrite, since the kernel reruns the program on the rewritten frame:
//! two flows rewrite into each other (a client half at a session port
//! whose rewrite lands on the backend half of the other, and back), so
//! every run forwards. The TTL falls by one per run, so a call repeats at
//! most 250 times, starting at 255. Refusal cases leave the frame alone.
//!
//! Round-robin cases chain N flows in a ring instead: the backend half of
//! flow i rewrites onto the client half of flow i+1, so one call visits 125
//! flows one after the other, and a case's call is as many test runs as it
//! takes to visit the whole ring (each starting where the last stopped), so
//! the flow map entries of N flows (rewrite, counters and cached route in
//! one value) compete for the caches. Each flow is visited again within one
//! round of calls, well within the route cache's second, as on a relay
//! whose N flows are all active; one round of calls before the measured
//! ones warms them. The process stays on one CPU.
//!
//! Calls of the cases take turns, so each timed call follows another
//! case's: the same call, untimed, comes first. Without it the first case
//! of a round and the first of the bench's programs (the XDP_TX case and
//! the redirect ceiling) carried the round's cold start, 5–8 ns a run, and
//! the first ring in a load 20–40 ns. The ceiling has a twin that ends
//! with XDP_TX, for the XDP_TX cases.
//!
//! Runs in a network namespace of its own (`unshare`), gone with the
//! process: a veth pair with both ends inside, static neighbours, so
//! `bpf_fib_lookup` finds routes as on a relay.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use aya::maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, TestRun as _, TestRunOptions};
use forwarder::datapath::egress::EgressTable;
use forwarder::datapath::slots::SlotTable;
use forwarder::datapath::xdp::{EBPF_OBJECT, PROGRAM_NAME};
use forwarder_bench_common::CeilingConfig;
use forwarder_common::clock::{JIFFIES_CLOCK_GLOBAL, JiffiesClock};
use forwarder_common::config::map_names;
use forwarder_common::flow::{Endpoints, IFACE_ANY};
use forwarder_common::portslot::{
    BackendSlot, ClientSlot, backend_slot_entries, backend_slot_pair, client_slot_entries,
    client_slot_pair,
};
use forwarder_common::reason::ReasonCounter;
use forwarder_common::{
    BackendKey, BackendRewrite, ClientKey, FlowCounter, Reason, RelayConfig, Rewrite,
    SlowpathBucket,
};
use forwarder_common::{
    BackendKey6, ClientKey6, Rewrite6,
    flow6::{Endpoints46, WireAddr, port_bit},
};
use serde_json::{Value, json};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// The session range holds a port per ring flow (from
/// [`RING_SESSION_PORT`]), as the daemon gives each session its own.
const RELAY: RelayConfig = RelayConfig {
    session_port_lo: 42_000,
    session_port_hi: 60_099,
    flow_port_lo: 20_000,
    flow_port_hi: 39_999,
    shared_port: 0,
    _pad: 0,
};
const CLIENT_PORT: u16 = 40_000;
const SESSION_PORT: u16 = 60_001;
const FLOW_PORT: u16 = 20_001;
const SERVER_PORT: u16 = 60_002;
/// Runs per call when the frame is rewritten each run (TTL starts at 255).
const FORWARD_REPEAT: u32 = 250;
/// Runs per call when the frame stays as it is.
const REFUSE_REPEAT: u32 = 10_000;

/// Where every ring's client and flow ports start. Each ring is in a load
/// of its own, so rings may share ports; client ports stay below the flow
/// range (20,000-39,999), flow ports inside it.
const RING_CLIENT_PORT: u16 = 1_024;
const RING_FLOW_PORT: u16 = 21_000;
/// Flow i's client half is at session port `RING_SESSION_PORT + i`.
const RING_SESSION_PORT: u16 = 42_000;
/// The most flows a ring can have within those ports.
pub const MAX_RING_FLOWS: u16 = 18_000;
/// The round-robin sizes issue 16 names: 1,000 and 15,000 flows.
pub const DEFAULT_RINGS: [u16; 2] = [1_000, 15_000];
/// Flows one call visits: two halves per flow, one half per run.
const RING_STEP: usize = FORWARD_REPEAT as usize / 2;
/// Flow map sizes for the rings, both pairs: more than the compiled default.
const BENCH_MAX_FLOWS: u32 = 65_536;

/// Addresses of one forwarding case: the client and the server, each a
/// static neighbour on the interface the case's packets leave from.
struct Pair {
    client: [u8; 4],
    server: [u8; 4],
    /// The one-flow case's session and backend-facing ports: a port of its
    /// own each, so each half is alone on its port, as on a relay.
    session_port: u16,
    flow_port: u16,
}

/// Both neighbours on the ingress interface: every packet leaves by XDP_TX.
const TX_PAIR: Pair = Pair {
    client: [10, 0, 1, 2],
    server: [10, 0, 1, 3],
    session_port: SESSION_PORT,
    flow_port: FLOW_PORT,
};
/// Both neighbours behind the other interface: every packet is redirected.
const REDIRECT_PAIR: Pair = Pair {
    client: [10, 0, 2, 2],
    server: [10, 0, 2, 3],
    session_port: SESSION_PORT + 4,
    flow_port: FLOW_PORT + 4,
};

/// IPv6 neighbours, like the IPv4 pairs: on the ingress link, and behind the other.
struct Pair6 {
    client: [u8; 16],
    server: [u8; 16],
}

const fn v6(net: u8, host: u8) -> [u8; 16] {
    [0xfd, 0, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, host]
}

const TX_PAIR6: Pair6 = Pair6 {
    client: v6(1, 2),
    server: v6(1, 3),
};
const REDIRECT_PAIR6: Pair6 = Pair6 {
    client: v6(2, 2),
    server: v6(2, 3),
};
/// Ports of the translated bounce: its IPv4 half must not meet the IPv4
/// flows' entries at FLOW_PORT.
const TRANSLATED_SESSION_PORT: u16 = SESSION_PORT + 2;
const TRANSLATED_FLOW_PORT: u16 = FLOW_PORT + 2;

/// One measured case: a program of a loaded object run on one frame.
struct Case {
    name: String,
    target: usize,
    program: &'static str,
    /// Each call runs every frame once and records their mean: a
    /// round-robin case's frames start at every 125th flow, so one call
    /// visits the whole ring.
    frames: Vec<Vec<u8>>,
    repeat: u32,
    /// Interface the frames come in on.
    ingress: u32,
    action: u32,
    /// What every run of a forwarder case must end with.
    check: Check,
}

/// How a case proves each run did what its name says.
enum Check {
    /// Not a forwarder object.
    None,
    /// Counted under this reason.
    Reason(Reason),
    /// Forwarded and counted on these flow halves (forwarded packets are
    /// counted on their flow, whether or not under a reason too).
    Forwarded(Vec<Half>),
}

/// A flow half the bench installed, by the map that holds it.
#[derive(Clone, Copy)]
enum Half {
    Client(ClientKey),
    Backend(BackendKey),
    Client6(ClientKey6),
    Backend6(BackendKey6),
    Backend4To6(BackendKey),
}

/// `objects`: extra forwarder objects (`LABEL=PATH`) measured beside the
/// embedded one, interleaved call by call so a busy moment of the host
/// weighs on every object alike.
/// `rings`: the flow counts of the round-robin cases; a sweep of them shows
/// where the flows' entries outgrow a cache level.
pub fn run(calls: usize, objects: &[String], rings: &[u16]) -> anyhow::Result<()> {
    ensure!(calls > 0, "--calls must be at least 1");
    for &flows in rings {
        ensure!(
            (2..=MAX_RING_FLOWS).contains(&flows),
            "--rings {flows}: a ring needs 2 to {MAX_RING_FLOWS} flows (its ports must fit below and inside the flow port range)"
        );
    }
    let mut sources = vec![("current".to_string(), EBPF_OBJECT.to_vec())];
    for object in objects {
        let (label, path) = object
            .split_once('=')
            .with_context(|| format!("--object {object:?}: expected LABEL=PATH"))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        sources.push((label.to_string(), bytes));
    }
    stay_on_one_cpu()?;
    private_namespace()?;
    let front = ifindex("front")?;
    let back = ifindex("back")?;

    let mut targets = Vec::new();
    let mut cases = Vec::new();
    let junk = frame([10, 0, 1, 9], 1234, [10, 0, 1, 1], SESSION_PORT, 64, 64);
    for (label, bytes) in &sources {
        let mut relay = load_forwarder(bytes).with_context(|| format!("object {label}"))?;
        relay.number_interfaces(&[front, back])?;
        let target = targets.len();
        for (name, pair, action) in [
            ("forward, XDP_TX", &TX_PAIR, XDP_TX),
            ("forward, redirect", &REDIRECT_PAIR, XDP_REDIRECT),
        ] {
            let halves = relay.add_bouncing_flows(pair)?;
            cases.push(Case {
                name: format!("{label}: {name}"),
                target,
                program: PROGRAM_NAME,
                frames: vec![frame(
                    pair.client,
                    CLIENT_PORT,
                    pair.server,
                    pair.session_port,
                    255,
                    64,
                )],
                repeat: FORWARD_REPEAT,
                ingress: front,
                action,
                check: Check::Forwarded(halves),
            });
        }
        // Round robin over many flows, both ways out, each ring in a load of
        // the object of its own: the one-flow cases keep maps that hold only
        // their own flows, as on a relay with one flow, and a ring's maps
        // hold that ring's flows only. Two rings in one map made the first
        // one inserted 20-40 ns dearer at 15,000 flows: a bucket holding one
        // flow of each lists the newer first, so the older ring's lookups
        // walked past the other ring's element (a cache line) there.
        let mut ring_relays = Vec::new();
        for &flows in rings {
            for (way, pair, action) in [
                ("XDP_TX", &TX_PAIR, XDP_TX),
                ("redirect", &REDIRECT_PAIR, XDP_REDIRECT),
            ] {
                let mut ring_load =
                    load_forwarder(bytes).with_context(|| format!("object {label}"))?;
                ring_load.number_interfaces(&[front, back])?;
                let ring_target = target + 1 + ring_relays.len();
                let ring = Ring::new(flows);
                let halves = ring_load.add_ring(pair, &ring)?;
                let starts = (0..usize::from(flows)).step_by(RING_STEP);
                cases.push(Case {
                    name: format!("{label}: forward, {way}, {flows} flows round robin"),
                    target: ring_target,
                    program: PROGRAM_NAME,
                    frames: starts
                        .map(|start| {
                            let port = RING_CLIENT_PORT + start as u16;
                            let session_port = ring.session_port_of(start as u16);
                            frame(pair.client, port, pair.server, session_port, 255, 64)
                        })
                        .collect(),
                    repeat: FORWARD_REPEAT,
                    ingress: front,
                    action,
                    check: Check::Forwarded(halves),
                });
                ring_relays.push(ring_load.ebpf);
            }
        }
        // IPv6 and translated flows (cost6), where the object has their maps.
        if relay.ebpf.map(map_names::CLIENT_FLOWS6).is_some() {
            for (name, pair, action) in [
                ("forward IPv6, XDP_TX", &TX_PAIR6, XDP_TX),
                ("forward IPv6, redirect", &REDIRECT_PAIR6, XDP_REDIRECT),
            ] {
                let halves = relay.add_bouncing_flows6(pair)?;
                cases.push(Case {
                    name: format!("{label}: {name}"),
                    target,
                    program: PROGRAM_NAME,
                    frames: vec![frame6(
                        pair.client,
                        CLIENT_PORT,
                        pair.server,
                        SESSION_PORT,
                        255,
                        64,
                    )],
                    repeat: FORWARD_REPEAT,
                    ingress: front,
                    action,
                    check: Check::Forwarded(halves),
                });
            }
            for (name, pair, pair6, action) in [
                (
                    "forward translated 6->4->6 (mean of both), XDP_TX",
                    &TX_PAIR,
                    &TX_PAIR6,
                    XDP_TX,
                ),
                (
                    "forward translated 6->4->6 (mean of both), redirect",
                    &REDIRECT_PAIR,
                    &REDIRECT_PAIR6,
                    XDP_REDIRECT,
                ),
            ] {
                let halves = relay.add_bouncing_translated(pair, pair6)?;
                cases.push(Case {
                    name: format!("{label}: {name}"),
                    target,
                    program: PROGRAM_NAME,
                    frames: vec![frame6(
                        pair6.client,
                        CLIENT_PORT,
                        pair6.server,
                        TRANSLATED_SESSION_PORT,
                        255,
                        64,
                    )],
                    repeat: FORWARD_REPEAT,
                    ingress: front,
                    action,
                    check: Check::Forwarded(halves),
                });
            }
        }
        // Refusals: the frames a flood at relay ports is made of.
        relay.set_session_bucket(SESSION_PORT, 1)?;
        relay.set_global_bucket(1)?;
        // Spend the one token each bucket starts with, so every measured run drops.
        test_run(relay.program()?, &junk, front, 1)?;
        let mut malformed = junk.clone();
        // UDP length one byte longer than the IPv4 payload.
        malformed[14 + 20 + 5] = malformed[14 + 20 + 5].wrapping_add(1);
        for (name, frame, reason) in [
            (
                "refuse: no flow, session's slow-path bucket empty",
                junk.clone(),
                Reason::DropSlowpathSessionLimit,
            ),
            (
                "refuse: no flow, no session, relay-wide bucket empty",
                frame([10, 0, 1, 9], 1234, [10, 0, 1, 1], SESSION_PORT + 1, 64, 64),
                Reason::DropSlowpathGlobalLimit,
            ),
            ("refuse: bad lengths", malformed, Reason::DropMalformed),
        ] {
            cases.push(Case {
                name: format!("{label}: {name}"),
                target,
                program: PROGRAM_NAME,
                frames: vec![frame],
                repeat: REFUSE_REPEAT,
                ingress: front,
                action: XDP_DROP,
                check: Check::Reason(reason),
            });
        }
        targets.push(relay.ebpf);
        targets.extend(ring_relays);
    }

    let mut bench_ebpf =
        Ebpf::load(crate::CEILING_OBJECT).context("loading the bench's XDP programs")?;
    let ceiling_frame = setup_ceiling(&mut bench_ebpf, back)?;
    let drop: &mut Xdp = bench_ebpf
        .program_mut("forwarder_drop")
        .context("the bench object has no forwarder_drop: rebuild forwarder-bench")?
        .try_into()?;
    drop.load()?;
    let tx: &mut Xdp = bench_ebpf
        .program_mut("forwarder_ceiling_tx")
        .context("the bench object has no forwarder_ceiling_tx: rebuild forwarder-bench")?
        .try_into()?;
    tx.load()?;
    let bench = targets.len();
    targets.push(bench_ebpf);
    cases.push(Case {
        name: "raw XDP redirect (ceiling)".into(),
        target: bench,
        program: "forwarder_ceiling",
        frames: vec![ceiling_frame.clone()],
        repeat: FORWARD_REPEAT,
        ingress: front,
        action: XDP_REDIRECT,
        check: Check::None,
    });
    let ceiling = cases.len() - 1;
    cases.push(Case {
        name: "raw XDP_TX (ceiling of the XDP_TX cases)".into(),
        target: bench,
        program: "forwarder_ceiling_tx",
        frames: vec![ceiling_frame],
        repeat: FORWARD_REPEAT,
        ingress: front,
        action: XDP_TX,
        check: Check::None,
    });
    let ceiling_tx = cases.len() - 1;
    let floor = cases.len();
    cases.push(Case {
        name: "bare XDP_DROP (floor for refusals)".into(),
        target: bench,
        program: "forwarder_drop",
        frames: vec![junk],
        repeat: REFUSE_REPEAT,
        ingress: front,
        action: XDP_DROP,
        check: Check::None,
    });

    // Every measured program attached natively somewhere: see hold_in_dispatcher.
    let mut held = Vec::new();
    for case in &cases {
        if !held.contains(&(case.target, case.program)) {
            held.push((case.target, case.program));
            let program: &mut Xdp = targets[case.target]
                .program_mut(case.program)
                .with_context(|| format!("no program {}", case.program))?
                .try_into()?;
            hold_in_dispatcher(program, held.len())?;
        }
    }
    let call = |case: &Case| -> anyhow::Result<f64> {
        let program: &Xdp = targets[case.target]
            .program(case.program)
            .with_context(|| format!("no program {}", case.program))?
            .try_into()?;
        // The same runs untimed first: the case before this one ran other
        // code on other data. Without them the first case of a round and
        // the first of the bench's programs pay for fetching their
        // instructions again, and a ring for its flows' pages, which the
        // ring after it in the same maps finds warm: the timed runs see
        // what they would see on a relay doing nothing else.
        for frame in &case.frames {
            test_run(program, frame, case.ingress, case.repeat)?;
        }
        let mut total = 0.0;
        for frame in &case.frames {
            let (retval, duration) = test_run(program, frame, case.ingress, case.repeat)?;
            ensure!(
                retval == case.action,
                "{}: the program returned {retval}, expected {}",
                case.name,
                case.action
            );
            // The kernel reports the mean over the repeats, in whole ns.
            total += duration.as_nanos() as f64;
        }
        Ok(total / case.frames.len() as f64)
    };
    // Warm-up: every flow's route cache and last-seen time filled.
    for case in &cases {
        call(case)?;
    }
    let counted_before = cases
        .iter()
        .map(|case| counted(&targets[case.target], &case.check))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut samples = vec![Vec::with_capacity(calls); cases.len()];
    for _ in 0..calls {
        for (case, samples) in cases.iter().zip(&mut samples) {
            samples.push(call(case)?);
        }
    }
    let mut points = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let counted = counted(&targets[case.target], &case.check)? - counted_before[index];
        let runs = u64::from(case.repeat) * (calls * case.frames.len()) as u64;
        // A 1 pps bucket refills a token or so per second of the run.
        ensure!(
            matches!(case.check, Check::None) || counted + runs / 1000 >= runs,
            "{}: {counted} of {runs} runs counted: the case does not measure what it says",
            case.name,
        );
        // Paired call by call: both ran within the same round of calls.
        let paired = |other: usize, op: fn(f64, f64) -> f64| -> Vec<f64> {
            samples[index]
                .iter()
                .zip(&samples[other])
                .map(|(case, other)| op(*case, *other))
                .collect()
        };
        let net = percentiles(paired(floor, |case, floor| case - floor));
        let to_ceiling = percentiles(paired(ceiling, |case, ceiling| case / ceiling));
        // Like for like: an XDP_TX case against the raw XDP_TX twin, whose
        // exit skips the devmap helper the redirect ceiling calls.
        let like = if case.action == XDP_TX {
            ceiling_tx
        } else {
            ceiling
        };
        let to_like = percentiles(paired(like, |case, ceiling| case / ceiling));
        let to_drop = percentiles(paired(floor, |case, floor| case / floor));
        let ns = percentiles(samples[index].clone());
        let p50 = |value: &Value| value["p50"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "{:<72} {:>6.1} ns  +{:>5.1} over drop  {:>5.2}x ceiling  {:>5.2}x same-exit ceiling  {:>5.2}x drop",
            case.name,
            p50(&ns),
            p50(&net),
            p50(&to_ceiling),
            p50(&to_like),
            p50(&to_drop)
        );
        points.push(json!({
            "case": case.name,
            "runs_per_call": case.repeat,
            "calls": calls,
            "ns": ns,
            "ns_over_bare_drop": net,
            "ratio_to_ceiling": to_ceiling,
            "ratio_to_same_exit_ceiling": to_like,
            "ratio_to_bare_drop": to_drop,
        }));
    }
    // One line, the last: `cargo xtask bench` reads every subcommand's result so.
    println!("{}", serde_json::to_string(&json!({ "points": points }))?);
    Ok(())
}

/// Median and the 10th and 90th percentiles.
fn percentiles(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    json!({ "p10": at(0.1), "p50": at(0.5), "p90": at(0.9) })
}

/// Packets a forwarder object counted the way `check` names, summed over CPUs.
fn counted(ebpf: &Ebpf, check: &Check) -> anyhow::Result<u64> {
    match check {
        Check::None => Ok(0),
        Check::Reason(reason) => {
            let map: PerCpuArray<_, ReasonCounter> = PerCpuArray::try_from(
                ebpf.map(map_names::REASON_COUNTERS)
                    .context("REASON_COUNTERS")?,
            )?;
            Ok(map
                .get(&(*reason as u32), 0)?
                .iter()
                .map(|counter| counter.packets)
                .sum())
        }
        Check::Forwarded(halves) => {
            let v4 = V4Tables::open(ebpf)?;
            let map = |name: &str| ebpf.map(name).with_context(|| name.to_string());
            let clients: HashMap<_, ClientKey, Rewrite> =
                HashMap::try_from(map(map_names::CLIENT_FLOWS)?)?;
            let backends: HashMap<_, BackendKey, BackendRewrite> =
                HashMap::try_from(map(map_names::BACKEND_FLOWS)?)?;
            let clients6: HashMap<_, ClientKey6, Rewrite6> =
                HashMap::try_from(map(map_names::CLIENT_FLOWS6)?)?;
            let backends6: HashMap<_, BackendKey6, Rewrite6> =
                HashMap::try_from(map(map_names::BACKEND_FLOWS6)?)?;
            let backends_4to6: HashMap<_, BackendKey, Rewrite6> =
                HashMap::try_from(map(map_names::BACKEND_FLOWS_4TO6)?)?;
            let mut sum = 0;
            for half in halves {
                let counter: FlowCounter = match half {
                    Half::Client(key) => match &v4 {
                        Some(tables) => tables.client.get(key)?.counter(),
                        None => clients.get(key, 0)?.counter(),
                    },
                    Half::Backend(key) => match &v4 {
                        Some(tables) => tables.backend.get(key)?.rewrite.counter(),
                        None => backends.get(key, 0)?.rewrite.counter(),
                    },
                    Half::Client6(key) => clients6.get(key, 0)?.counter(),
                    Half::Backend6(key) => backends6.get(key, 0)?.counter(),
                    Half::Backend4To6(key) => backends_4to6.get(key, 0)?.counter(),
                };
                sum += counter.packets;
            }
            Ok(sum)
        }
    }
}

/// Pins the process to the CPU it runs on: a move to another CPU would
/// leave its caches cold.
fn stay_on_one_cpu() -> anyhow::Result<()> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    ensure!(
        cpu >= 0,
        "sched_getcpu failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE (the kernel returned it).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    ensure!(
        rc == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A fresh network namespace for this process: a veth pair, the relay's
/// addresses on both ends, static neighbours and forwarding on.
fn private_namespace() -> anyhow::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; called while this
    // process has one thread, so every command below runs in the namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET): run as root");
    }
    let ip = |args: &str| -> anyhow::Result<()> {
        let status = Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .context("running ip (install iproute2)")?;
        ensure!(status.success(), "ip {args} failed");
        Ok(())
    };
    ip("link set lo up")?;
    ip("link add front type veth peer name back")?;
    ip("addr add 10.0.1.1/24 dev front")?;
    ip("addr add 10.0.2.1/24 dev back")?;
    ip("link set front up")?;
    ip("link set back up")?;
    for (pair, dev) in [(&TX_PAIR, "front"), (&REDIRECT_PAIR, "back")] {
        for (addr, mac) in [
            (pair.client, "02:00:00:00:00:02"),
            (pair.server, "02:00:00:00:00:03"),
        ] {
            ip(&format!(
                "neigh replace {} lladdr {mac} nud permanent dev {dev}",
                Ipv4Addr::from(addr)
            ))?;
        }
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("turning forwarding on")?;
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        .context("turning IPv6 forwarding on")?;
    ip("-6 addr add fd00:1::1/64 dev front nodad")?;
    ip("-6 addr add fd00:2::1/64 dev back nodad")?;
    for (pair, dev) in [(&TX_PAIR6, "front"), (&REDIRECT_PAIR6, "back")] {
        for (addr, mac) in [
            (pair.client, "02:00:00:00:00:02"),
            (pair.server, "02:00:00:00:00:03"),
        ] {
            ip(&format!(
                "-6 neigh replace {} lladdr {mac} nud permanent dev {dev}",
                std::net::Ipv6Addr::from(addr)
            ))?;
        }
    }
    Ok(())
}

/// Attaches `program` in native mode to a veth of its own (number `n`),
/// where no packet ever arrives. A test run of more than one repeat puts
/// the program into the kernel's XDP dispatcher for its duration unless it
/// is there already, and that update waits for an RCU grace period (about
/// 16 ms a call here, against a few µs): held there, calls are cheap, and a
/// round-robin ring is visited again well within its route caches' second.
fn hold_in_dispatcher(program: &mut Xdp, n: usize) -> anyhow::Result<()> {
    let name = format!("hold{n}");
    let status = Command::new("ip")
        .args(["link", "add", &name, "type", "veth", "peer", "name"])
        .arg(format!("holdp{n}"))
        .status()
        .context("running ip (install iproute2)")?;
    ensure!(status.success(), "ip link add {name} failed");
    let status = Command::new("ip")
        .args(["link", "set", &name, "up"])
        .status()
        .context("running ip")?;
    ensure!(status.success(), "ip link set {name} up failed");
    program
        .attach(&name, XdpMode::Driver)
        .with_context(|| format!("attaching a measured program natively to {name}"))?;
    Ok(())
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("no interface {name}"))
}

/// A UDP frame with a valid IPv4 header checksum and a zero UDP checksum.
fn frame(
    saddr: [u8; 4],
    sport: u16,
    daddr: [u8; 4],
    dport: u16,
    ttl: u8,
    payload: usize,
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42 + payload);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 1, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let tot_len = (20 + 8 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[8] = ttl;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&saddr);
    ip[16..20].copy_from_slice(&daddr);
    let checksum = forwarder_common::csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.resize(42 + payload, 0x5a);
    frame
}

/// An IPv6 UDP frame with a valid checksum (IPv6 makes it mandatory).
fn frame6(
    saddr: [u8; 16],
    sport: u16,
    daddr: [u8; 16],
    dport: u16,
    hop_limit: u8,
    payload: usize,
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(62 + payload);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 1, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd]);
    let udp_len = (8 + payload) as u16;
    frame.extend_from_slice(&forwarder_common::flow6::ip6_header(
        0, udp_len, hop_limit, saddr, daddr,
    ));
    let mut udp = Vec::with_capacity(8 + payload);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.resize(8 + payload, 0x5a);
    let csum = forwarder_common::csum::sum;
    let pseudo = csum(
        csum(csum(0, &saddr), &daddr),
        &[
            0,
            0,
            udp_len.to_be_bytes()[0],
            udp_len.to_be_bytes()[1],
            0,
            0,
            0,
            17,
        ],
    );
    let check = match !csum(pseudo, &udp) {
        0 => 0xffff,
        check => check,
    };
    udp[6..8].copy_from_slice(&check.to_ne_bytes());
    frame.extend_from_slice(&udp);
    frame
}

fn xdp_md(len: usize, ingress_ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|word: &u32| word.to_ne_bytes())
        .collect()
}

/// A round-robin ring's size and where its ports start.
struct Ring {
    flows: u16,
    client_port: u16,
    flow_port: u16,
    session_port: u16,
    /// Each flow's place among the ring's ports, a permutation of 0..flows.
    places: Vec<u16>,
}

/// The rings' shuffle seed: every run and every object places alike.
const RING_SEED: u64 = 0x5eed_f10e;

impl Ring {
    /// A ring whose flows sit at shuffled places. Shuffled rather than a
    /// stride (i × p mod n): a stride is a constant step between the slots
    /// consecutive packets read, which a prefetcher can follow, and how
    /// well it does depends on the step, so some ring sizes came out
    /// cheaper than smaller ones (step 12 in docs/BENCHMARKS.md).
    fn new(flows: u16) -> Self {
        use rand::{SeedableRng as _, seq::SliceRandom as _};
        let mut places: Vec<u16> = (0..flows).collect();
        places.shuffle(&mut rand::rngs::StdRng::seed_from_u64(RING_SEED));
        Self {
            flows,
            client_port: RING_CLIENT_PORT,
            flow_port: RING_FLOW_PORT,
            session_port: RING_SESSION_PORT,
            places,
        }
    }

    /// Flow i's place among the ring's ports.
    fn scatter(&self, i: u16) -> u16 {
        self.places[usize::from(i)]
    }

    fn session_port_of(&self, i: u16) -> u16 {
        self.session_port + self.scatter(i)
    }
}

/// forwarder's own program, configured the way the daemon configures it.
struct Relay {
    ebpf: Ebpf,
    /// The daemon's numbering of the interfaces, holding its maps.
    egress: Option<EgressTable>,
    /// The IPv4 halves placed as the daemon places them (port slots, then
    /// the hash maps); None for an object from before the port slots.
    v4: Option<V4Tables>,
}

/// Both sides' slot tables over an object's own maps.
struct V4Tables {
    client: SlotTable<ClientSlot>,
    backend: SlotTable<BackendSlot>,
}

impl V4Tables {
    /// Opens the object's slot arrays and IPv4 hash maps a second time (the
    /// object keeps its own descriptors, which the cases' checks read).
    fn open(ebpf: &Ebpf) -> anyhow::Result<Option<Self>> {
        let reopen = |name: &str| -> anyhow::Result<Option<Map>> {
            let Some(map) = ebpf.map(name) else {
                return Ok(None);
            };
            let (Map::Array(data) | Map::HashMap(data)) = map else {
                anyhow::bail!("{name} is neither an array nor a hash map");
            };
            let again = MapData::from_id(data.info()?.id())?;
            Ok(Some(match map {
                Map::Array(_) => Map::Array(again),
                _ => Map::HashMap(again),
            }))
        };
        let Some(client_slots) = reopen(map_names::CLIENT_PORT_SLOTS)? else {
            return Ok(None);
        };
        let backend_slots = reopen(map_names::BACKEND_PORT_SLOTS)?.context("BACKEND_PORT_SLOTS")?;
        let client_flows = reopen(map_names::CLIENT_FLOWS)?.context("CLIENT_FLOWS")?;
        let backend_flows = reopen(map_names::BACKEND_FLOWS)?.context("BACKEND_FLOWS")?;
        let client_bits = reopen(map_names::CLIENT_PORTS_HASHED)?.context("CLIENT_PORTS_HASHED")?;
        let backend_bits =
            reopen(map_names::BACKEND_PORTS_HASHED)?.context("BACKEND_PORTS_HASHED")?;
        Ok(Some(Self {
            client: SlotTable::adopt(
                Array::try_from(client_slots)?,
                HashMap::try_from(client_flows)?,
                Array::try_from(client_bits)?,
                client_slot_pair,
                RELAY,
            )?,
            backend: SlotTable::adopt(
                Array::try_from(backend_slots)?,
                HashMap::try_from(backend_flows)?,
                Array::try_from(backend_bits)?,
                backend_slot_pair,
                RELAY,
            )?,
        }))
    }
}

fn load_forwarder(object: &[u8]) -> anyhow::Result<Relay> {
    let mut loader = EbpfLoader::new();
    // The relay's ports, as the daemon sets them; objects older than the
    // read-only global read them from a one-slot map, filled likewise.
    loader.override_global(forwarder_common::config::RELAY_CONFIG_GLOBAL, &RELAY, false);
    // The daemon's clock, measured once; objects older than it read the
    // coarse clock.
    static CLOCK: std::sync::OnceLock<JiffiesClock> = std::sync::OnceLock::new();
    let clock = CLOCK.get_or_init(forwarder::datapath::clock::program_clock);
    loader.override_global(JIFFIES_CLOCK_GLOBAL, clock, false);
    // Room for the round-robin rings, as `--max-flows` gives the daemon.
    for name in [map_names::CLIENT_FLOWS, map_names::BACKEND_FLOWS] {
        loader.map_max_entries(name, BENCH_MAX_FLOWS);
    }
    // The slot arrays as the daemon sizes them (older objects have none).
    loader.map_max_entries(map_names::CLIENT_PORT_SLOTS, client_slot_entries(&RELAY));
    loader.map_max_entries(map_names::BACKEND_PORT_SLOTS, backend_slot_entries(&RELAY));
    let mut ebpf = loader
        .load(object)
        .context("loading forwarder's XDP object")?;
    if let Some(map) = ebpf.map_mut("CONFIG") {
        let mut config: Array<_, RelayConfig> = Array::try_from(map)?;
        config.set(0, RELAY, 0)?;
    }
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("no forwarder program")?
        .try_into()?;
    program
        .load()
        .context("the verifier refused forwarder's program")?;
    let v4 = V4Tables::open(&ebpf)?;
    Ok(Relay {
        ebpf,
        egress: None,
        v4,
    })
}

impl Relay {
    /// Numbers the interfaces with the daemon's own code (the devmap, their
    /// MACs and MTUs, the slot by ifindex), so cached routes behave as in
    /// the daemon. Once per load.
    fn number_interfaces(&mut self, ifindexes: &[u32]) -> anyhow::Result<()> {
        let mut take = |name: &str| self.ebpf.take_map(name).with_context(|| name.to_string());
        let table = EgressTable::write(
            DevMap::try_from(take(map_names::EGRESS)?)?,
            Array::try_from(take(map_names::EGRESS_IFACES)?)?,
            HashMap::try_from(take(map_names::EGRESS_SLOTS)?)?,
            ifindexes,
        )?;
        self.egress = Some(table);
        Ok(())
    }

    /// Client half `client:CLIENT_PORT -> server:SESSION_PORT`, rewritten
    /// to `server:SERVER_PORT -> client:FLOW_PORT`, which is the backend
    /// half (server allowed at `server:SERVER_PORT`) rewritten back to the
    /// first packet.
    fn add_bouncing_flows(&mut self, pair: &Pair) -> anyhow::Result<Vec<Half>> {
        let client_side = Endpoints {
            saddr: pair.client,
            daddr: pair.server,
            sport: CLIENT_PORT.to_be_bytes(),
            dport: pair.session_port.to_be_bytes(),
        };
        let backend_side = Endpoints {
            saddr: pair.server,
            daddr: pair.client,
            sport: SERVER_PORT.to_be_bytes(),
            dport: pair.flow_port.to_be_bytes(),
        };
        let client_rewrite = Rewrite::new(client_side, backend_side);
        let backend_rewrite = BackendRewrite::new(
            Rewrite::new(backend_side, client_side),
            pair.server,
            SERVER_PORT.to_be_bytes(),
            IFACE_ANY,
        );
        let client = ClientKey {
            relay_addr: pair.server,
            client_addr: pair.client,
            relay_port: pair.session_port.to_be_bytes(),
            client_port: CLIENT_PORT.to_be_bytes(),
        };
        self.insert_client(client, client_rewrite)?;
        let backend = BackendKey {
            relay_addr: pair.client,
            relay_port: pair.flow_port.to_be_bytes(),
            _pad: [0; 2],
        };
        self.insert_backend(backend, backend_rewrite)?;
        Ok(vec![Half::Client(client), Half::Backend(backend)])
    }

    /// A ring of flows between the pair's client and server: flow i's
    /// client half (client port `client_port + i`, session port
    /// `session_port + ring.scatter(i)`) rewrites to its backend half (flow
    /// port `flow_port + ring.scatter(i)`), which rewrites onto the client
    /// half of flow i+1; the last one's back onto flow 0's. The shuffled
    /// ports make consecutive packets read slots at no pattern in memory,
    /// as a relay's sessions send in no port order, instead of walking the
    /// slot arrays in an order the cache's prefetcher would serve; likewise
    /// the install order for the hash maps' elements.
    fn add_ring(&mut self, pair: &Pair, ring: &Ring) -> anyhow::Result<Vec<Half>> {
        let client_side = |i: u16| Endpoints {
            saddr: pair.client,
            daddr: pair.server,
            sport: (ring.client_port + i % ring.flows).to_be_bytes(),
            dport: ring.session_port_of(i % ring.flows).to_be_bytes(),
        };
        let backend_side = |i: u16| Endpoints {
            saddr: pair.server,
            daddr: pair.client,
            sport: SERVER_PORT.to_be_bytes(),
            dport: (ring.flow_port + ring.scatter(i)).to_be_bytes(),
        };
        let mut halves = Vec::with_capacity(2 * usize::from(ring.flows));
        // Installed in another order than the ring visits them: a hash
        // map's preallocated elements are handed out in insertion order,
        // and a ring installed in its own order would walk them in memory
        // order, which no relay's traffic does.
        for i in (0..ring.flows).map(|j| ring.scatter(j)) {
            let client_rewrite = Rewrite::new(client_side(i), backend_side(i));
            let backend_rewrite = BackendRewrite::new(
                Rewrite::new(backend_side(i), client_side(i + 1)),
                pair.server,
                SERVER_PORT.to_be_bytes(),
                IFACE_ANY,
            );
            let key = ClientKey {
                relay_addr: pair.server,
                client_addr: pair.client,
                relay_port: client_side(i).dport,
                client_port: client_side(i).sport,
            };
            self.insert_client(key, client_rewrite)?;
            halves.push(Half::Client(key));
            let key = BackendKey {
                relay_addr: pair.client,
                relay_port: backend_side(i).dport,
                _pad: [0; 2],
            };
            self.insert_backend(key, backend_rewrite)?;
            halves.push(Half::Backend(key));
        }
        Ok(halves)
    }

    /// add_bouncing_flows over IPv6: the same two halves in the IPv6 maps.
    fn add_bouncing_flows6(&mut self, pair: &Pair6) -> anyhow::Result<Vec<Half>> {
        let ends = |saddr, daddr, sport: u16, dport: u16| Endpoints46 {
            saddr: WireAddr::V6(saddr),
            daddr: WireAddr::V6(daddr),
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
        };
        let client_side = ends(pair.client, pair.server, CLIENT_PORT, SESSION_PORT);
        let backend_side = ends(pair.server, pair.client, SERVER_PORT, FLOW_PORT);
        let client_rewrite = Rewrite6::new(client_side, backend_side);
        let mut backend_rewrite = Rewrite6::new(backend_side, client_side);
        backend_rewrite.allowed_saddr = pair.server;
        backend_rewrite.allowed_sport = SERVER_PORT.to_be_bytes();
        let client = ClientKey6 {
            relay_addr: pair.server,
            client_addr: pair.client,
            relay_port: SESSION_PORT.to_be_bytes(),
            client_port: CLIENT_PORT.to_be_bytes(),
        };
        self.insert(map_names::CLIENT_FLOWS6, client, client_rewrite)?;
        let backend = BackendKey6 {
            relay_addr: pair.client,
            relay_port: FLOW_PORT.to_be_bytes(),
            _pad: [0; 2],
        };
        self.insert(map_names::BACKEND_FLOWS6, backend, backend_rewrite)?;
        Ok(vec![Half::Client6(client), Half::Backend6(backend)])
    }

    /// A translated bounce: an IPv6 client half that leaves as IPv4 towards
    /// an IPv4-in, IPv6-out backend half, which rewrites back to the first
    /// packet, so runs alternate 6->4 and 4->6.
    fn add_bouncing_translated(&mut self, pair: &Pair, pair6: &Pair6) -> anyhow::Result<Vec<Half>> {
        let client_side = Endpoints46 {
            saddr: WireAddr::V6(pair6.client),
            daddr: WireAddr::V6(pair6.server),
            sport: CLIENT_PORT.to_be_bytes(),
            dport: TRANSLATED_SESSION_PORT.to_be_bytes(),
        };
        let backend_side = Endpoints46 {
            saddr: WireAddr::V4(pair.server),
            daddr: WireAddr::V4(pair.client),
            sport: SERVER_PORT.to_be_bytes(),
            dport: TRANSLATED_FLOW_PORT.to_be_bytes(),
        };
        let client_rewrite = Rewrite6::new(client_side, backend_side);
        let mut backend_rewrite = Rewrite6::new(backend_side, client_side);
        backend_rewrite.allowed_saddr = WireAddr::V4(pair.server).padded();
        backend_rewrite.allowed_sport = SERVER_PORT.to_be_bytes();
        let client = ClientKey6 {
            relay_addr: pair6.server,
            client_addr: pair6.client,
            relay_port: TRANSLATED_SESSION_PORT.to_be_bytes(),
            client_port: CLIENT_PORT.to_be_bytes(),
        };
        self.insert(map_names::CLIENT_FLOWS6, client, client_rewrite)?;
        // The daemon marks the port before it inserts a half keyed by it.
        let (word, mask) = port_bit(TRANSLATED_FLOW_PORT);
        let mut ports: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(map_names::PORTS_4TO6)
                .context("PORTS_4TO6")?,
        )?;
        let bits = ports.get(&word, 0)?;
        ports.set(word, bits | mask, 0)?;
        let backend = BackendKey {
            relay_addr: pair.client,
            relay_port: TRANSLATED_FLOW_PORT.to_be_bytes(),
            _pad: [0; 2],
        };
        self.insert(map_names::BACKEND_FLOWS_4TO6, backend, backend_rewrite)?;
        Ok(vec![Half::Client6(client), Half::Backend4To6(backend)])
    }

    /// An IPv4 client half, where the daemon would put it.
    fn insert_client(&mut self, key: ClientKey, rewrite: Rewrite) -> anyhow::Result<()> {
        match &mut self.v4 {
            Some(tables) => Ok(tables.client.insert(key, rewrite)?),
            None => self.insert(map_names::CLIENT_FLOWS, key, rewrite),
        }
    }

    /// An IPv4 backend half, where the daemon would put it.
    fn insert_backend(&mut self, key: BackendKey, value: BackendRewrite) -> anyhow::Result<()> {
        match &mut self.v4 {
            Some(tables) => Ok(tables.backend.insert(key, value)?),
            None => self.insert(map_names::BACKEND_FLOWS, key, value),
        }
    }

    fn insert<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        key: K,
        value: V,
    ) -> anyhow::Result<()> {
        let mut map: HashMap<_, K, V> =
            HashMap::try_from(self.ebpf.map_mut(name).with_context(|| name.to_string())?)?;
        map.insert(key, value, 0)?;
        Ok(())
    }

    fn set_session_bucket(&mut self, port: u16, pps: u32) -> anyhow::Result<()> {
        let bucket = SlowpathBucket::with_burst(pps, 1);
        let map = self
            .ebpf
            .map_mut(map_names::SLOWPATH_SESSION_BUCKETS)
            .context("SLOWPATH_SESSION_BUCKETS")?;
        // An array indexed by port now; a hash keyed by port in older objects.
        if let aya::maps::Map::HashMap(_) = map {
            let mut map: HashMap<_, u16, SlowpathBucket> = HashMap::try_from(map)?;
            map.insert(port, bucket, 0)?;
        } else {
            let mut map: Array<_, SlowpathBucket> = Array::try_from(map)?;
            map.set(u32::from(port), bucket, 0)?;
        }
        Ok(())
    }

    fn set_global_bucket(&mut self, pps: u32) -> anyhow::Result<()> {
        let mut map: Array<_, SlowpathBucket> = Array::try_from(
            self.ebpf
                .map_mut(map_names::SLOWPATH_GLOBAL_BUCKET)
                .context("SLOWPATH_GLOBAL_BUCKET")?,
        )?;
        map.set(0, SlowpathBucket::with_burst(pps, 1), 0)?;
        Ok(())
    }

    fn program(&self) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROGRAM_NAME)
            .context("no forwarder program")?
            .try_into()?)
    }
}

fn test_run(
    program: &Xdp,
    frame: &[u8],
    ingress: u32,
    repeat: u32,
) -> anyhow::Result<(u32, Duration)> {
    let ctx = xdp_md(frame.len(), ingress);
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((result.return_value, result.duration))
}

/// The raw-redirect ceiling: an identity rewrite (TTL only), so every
/// rerun on the rewritten frame does the whole work again.
fn setup_ceiling(ebpf: &mut Ebpf, back: u32) -> anyhow::Result<Vec<u8>> {
    let pair = &REDIRECT_PAIR;
    let same = Endpoints {
        saddr: pair.client,
        daddr: pair.server,
        sport: CLIENT_PORT.to_be_bytes(),
        dport: SESSION_PORT.to_be_bytes(),
    };
    let config = CeilingConfig {
        rewrite: Rewrite::new(same, same),
        smac: [0x02, 0, 0, 0, 2, 1],
        dmac: [0x02, 0, 0, 0, 0, 3],
        port: SESSION_PORT.to_be_bytes(),
        egress_ifindex: back,
        ..CeilingConfig::default()
    };
    let mut map: Array<_, CeilingConfig> =
        Array::try_from(ebpf.map_mut("CEILING").context("no CEILING map")?)?;
    map.set(0, config, 0)?;
    let mut egress = DevMap::try_from(ebpf.map_mut("CEILING_EGRESS").context("CEILING_EGRESS")?)?;
    egress.set(0, back, None, 0)?;
    let program: &mut Xdp = ebpf
        .program_mut("forwarder_ceiling")
        .context("no forwarder_ceiling program")?
        .try_into()?;
    program.load()?;
    Ok(frame(
        pair.client,
        CLIENT_PORT,
        pair.server,
        SESSION_PORT,
        255,
        64,
    ))
}
