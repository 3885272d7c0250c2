//! Fuzzing: random and mutated frames through the real program, with flows,
//! a devmap and slow-path buckets installed so mutations of valid relay
//! traffic reach every stage. FORWARDER_FUZZ_FRAMES sets the count (soak
//! runs), FORWARDER_FUZZ_SEED replays a run. The shared fixture is in
//! `common/`.

mod common;

use common::namespace::Namespace;
use common::table::{
    Maps, Output, TO_CLIENT, TO_NEAR_BACKEND, assert_checksums_valid, expected_output,
};
use common::{
    BACK_MAC, BACKEND, BACKEND_MAC, BACKEND_PORT, CLIENT, CLIENT_PORT, FLOW_PORT, IP, NEAR_BACKEND,
    RELAY_BACK, RELAY_FRONT, Relay, SESSION_PORT, UDP, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    client_key, endpoints, install_client_flow, udp_frame, verdict_retval,
};
use forwarder_common::{Reason, Rewrite};

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
                six: None,
            },
            topo,
        );
        let far = endpoints((CLIENT, CLIENT_PORT + 1), (RELAY_FRONT, SESSION_PORT));
        let to_far = endpoints((RELAY_BACK, FLOW_PORT + 1), (BACKEND, BACKEND_PORT));
        relay.add_client_flow(
            client_key((CLIENT, CLIENT_PORT + 1), (RELAY_FRONT, SESSION_PORT)),
            Rewrite::new(far, to_far),
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

/// Every payload length below 64 bytes, each with its own bytes: the
/// checksum update must hold for odd and even lengths alike.
#[test]
fn many_payloads_keep_valid_checksums() {
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut relay = Relay::load();
        install_client_flow(&mut relay, (NEAR_BACKEND, BACKEND_PORT));
        for len in 0..64usize {
            let payload: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let input = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, SESSION_PORT), &payload);
            let run = relay.run(&input, Some(topo.front));
            assert_eq!(run.retval, XDP_TX, "payload length {len}");
            assert_eq!(
                run.out,
                expected_output(&input, TO_NEAR_BACKEND),
                "payload length {len}"
            );
            assert_checksums_valid(&run.out);
        }
    });
}

/// The IPv6 header's offset-dependent fields a mutation aims at.
const IP6: usize = 14;
const UDP6: usize = 54;

/// Applies one to four random edits to an IPv6 or IPv4 frame, biased
/// towards what the IPv6 parse branches on, then usually repairs the UDP
/// checksum (etherparse's code) so the edit is what the program sees.
fn mutate6(rng: &mut impl rand::Rng, frame: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let len = frame.len();
        match rng.random_range(0..9) {
            0 | 1 => {
                let at = rng.random_range(0..len.min(UDP6 + 8));
                frame[at] ^= 1 << rng.random_range(0..8);
            }
            2 if len > UDP6 + 8 => {
                let payload = (len - UDP6) as u16;
                let value: u16 = *[0, 7, 8, payload - 1, payload, payload + 1, u16::MAX]
                    .get(rng.random_range(0..7))
                    .unwrap();
                frame[IP6 + 4..IP6 + 6].copy_from_slice(&value.to_be_bytes());
            }
            3 if len > UDP6 + 8 => {
                let udp_len = (len - UDP6) as u16;
                let value: u16 = *[0, 7, 8, udp_len - 1, udp_len, udp_len + 1]
                    .get(rng.random_range(0..6))
                    .unwrap();
                frame[UDP6 + 4..UDP6 + 6].copy_from_slice(&value.to_be_bytes());
            }
            4 if len > UDP6 => {
                let (at, values): (usize, &[u8]) = match rng.random_range(0..3) {
                    0 => (IP6 + 7, &[0, 1, 2, 255]),
                    1 => (IP6 + 6, &[0, 6, 17, 43, 44, 58, 59, 60]),
                    _ => (IP6, &[0x60, 0x6f, 0x40, 0x45, 0x00]),
                };
                frame[at] = values[rng.random_range(0..values.len())];
            }
            5 if len > UDP6 => {
                let kinds = [
                    common::six::HOP_BY_HOP,
                    common::six::DEST_OPTS,
                    common::six::ROUTING,
                    common::six::FRAGMENT,
                ];
                *frame =
                    common::six::with_ext(frame, kinds[rng.random_range(0..4)], common::six::PADN);
            }
            6 => frame.truncate(rng.random_range(14..=len)),
            7 => {
                let extra: usize = rng.random_range(1..64);
                frame.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            _ => {
                let types: [[u8; 2]; 3] = [[0x86, 0xdd], [0x08, 0x00], [0x81, 0x00]];
                frame[12..14].copy_from_slice(&types[rng.random_range(0..3)]);
            }
        }
    }
    if rng.random_bool(0.6) {
        repair_udp6(frame);
    }
}

/// Recomputes the UDP checksum of a plain (no extension header) IPv6 frame
/// whose lengths hold, with etherparse's checksum code.
fn repair_udp6(frame: &mut [u8]) {
    if frame.len() < UDP6 + 8 || frame[12..14] != [0x86, 0xdd] || frame[IP6 + 6] != 17 {
        return;
    }
    let udp_len = usize::from(u16::from_be_bytes([frame[UDP6 + 4], frame[UDP6 + 5]]));
    if udp_len < 8 || UDP6 + udp_len > frame.len() {
        return;
    }
    frame[UDP6 + 6..UDP6 + 8].fill(0);
    let sum = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&frame[IP6 + 8..IP6 + 40])
        .add_slice(&(udp_len as u32).to_be_bytes())
        .add_slice(&[0, 0, 0, 17])
        .add_slice(&frame[UDP6..UDP6 + udp_len])
        .to_ones_complement_with_no_zero();
    frame[UDP6 + 6..UDP6 + 8].copy_from_slice(&sum.to_be_bytes());
}

/// What a forwarded frame's headers say, read by etherparse: (source,
/// destination, hop limit or TTL, UDP payload, whether its UDP checksum verifies).
fn parsed(frame: &[u8]) -> Option<(common::six::Ep, common::six::Ep, u8, Vec<u8>, bool)> {
    use common::six::Ep;
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let Some(TransportHeader::Udp(udp)) = headers.transport else {
        return None;
    };
    let payload = headers
        .payload
        .slice()
        .get(..usize::from(udp.length).checked_sub(8)?)?
        .to_vec();
    match headers.net? {
        NetHeaders::Ipv4(ip, _) => {
            let ok =
                udp.checksum != 0 && udp.calc_checksum_ipv4(&ip, &payload).ok()? == udp.checksum;
            Some((
                Ep::V4(ip.source, udp.source_port),
                Ep::V4(ip.destination, udp.destination_port),
                ip.time_to_live,
                payload,
                ok,
            ))
        }
        NetHeaders::Ipv6(ip, _) => {
            let ok =
                udp.checksum != 0 && udp.calc_checksum_ipv6(&ip, &payload).ok()? == udp.checksum;
            Some((
                Ep::V6(ip.source, udp.source_port),
                Ep::V6(ip.destination, udp.destination_port),
                ip.hop_limit,
                payload,
                ok,
            ))
        }
    }
}

/// IPv6 and translated flows: random and mutated frames for each shape;
/// whatever is forwarded must be one of the shape's two rewrites, with the
/// payload intact, the hop count one lower and (when the input's verified)
/// a UDP checksum that verifies, as etherparse reads them.
#[test]
fn fuzz_ipv6_and_translated_flows() {
    use common::six::{Shape, frame as frame_of};
    use rand::{Rng as _, SeedableRng as _};

    let frames: u64 = std::env::var("FORWARDER_FUZZ_FRAMES")
        .map(|value| {
            value
                .parse()
                .expect("FORWARDER_FUZZ_FRAMES must be a number")
        })
        .unwrap_or(300_000);
    let seed: u64 = std::env::var("FORWARDER_FUZZ_SEED")
        .map(|value| value.parse().expect("FORWARDER_FUZZ_SEED must be a number"))
        .unwrap_or_else(|_| rand::random());
    println!("fuzzing {frames} IPv6/translated frames per shape, FORWARDER_FUZZ_SEED={seed}");
    let ns = Namespace::create();
    ns.enter(|topo| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for shape in [Shape::Six, Shape::SixToFour, Shape::FourToSix] {
            let mut relay = Relay::load();
            relay.add_egress(topo.front);
            relay.add_egress(topo.back);
            relay.set_session_bucket(SESSION_PORT, 2_000);
            relay.set_global_bucket(5_000);
            shape.install(&mut relay, topo, false);
            let ((client, facing), (upstream, backend)) = (shape.client(), shape.backend());
            // (input source, input destination, arrives on back) -> (output source, destination).
            let rewrites = [
                ((client, facing, false), (upstream, backend)),
                ((backend, upstream, true), (facing, client)),
            ];
            let mut seeds = Vec::new();
            for len in [0usize, 1, 23, 100, 1252, 1400] {
                let mut payload = vec![0u8; len];
                rng.fill(&mut payload[..]);
                for ((src, dst, back), _) in rewrites {
                    seeds.push((frame_of(src, dst, &payload), back));
                }
            }
            let mut forwarded = 0u64;
            let mut unmodelled = 0u64;
            for index in 0..frames {
                let (mut frame, mut back) = seeds[rng.random_range(0..seeds.len())].clone();
                if index % 10 != 1 {
                    mutate6(&mut rng, &mut frame);
                }
                if index % 50 == 2 {
                    back = !back;
                }
                let run = relay.run(&frame, Some(if back { topo.back } else { topo.front }));
                match run.retval {
                    XDP_PASS | XDP_DROP => {
                        assert_eq!(
                            run.out, frame,
                            "seed {seed} {shape:?}: passed or dropped frames are untouched"
                        );
                        continue;
                    }
                    XDP_TX | XDP_REDIRECT => forwarded += 1,
                    other => panic!(
                        "seed {seed} {shape:?}: XDP action {other} for {:02x?}",
                        &frame[..frame.len().min(64)]
                    ),
                }
                let context = || {
                    format!(
                        "seed {seed} {shape:?}: input {:02x?} output {:02x?}",
                        &frame[..frame.len().min(80)],
                        &run.out[..run.out.len().min(80)]
                    )
                };
                // etherparse refuses some extension header orders RFC 8200
                // only recommends against (two destination options in a
                // row); the program walks them like the kernel does. Such a
                // frame keeps its length and its extension headers.
                let Some((src, dst, hops, payload, input_ok)) = parsed(&frame) else {
                    assert_eq!(run.out.len(), frame.len(), "length: {}", context());
                    assert_eq!(
                        run.out[UDP6..UDP6 + 8],
                        frame[UDP6..UDP6 + 8],
                        "extension headers: {}",
                        context()
                    );
                    unmodelled += 1;
                    continue;
                };
                let (out_src, out_dst, out_hops, out_payload, output_ok) = parsed(&run.out)
                    .unwrap_or_else(|| {
                        panic!(
                            "forwarded into a frame etherparse cannot read: {}",
                            context()
                        )
                    });
                let (_, (want_src, want_dst)) = rewrites
                    .iter()
                    .find(|((s, d, from_back), _)| *s == src && *d == dst && (!from_back || back))
                    .unwrap_or_else(|| {
                        panic!("forwarded a frame that matches no half: {}", context())
                    });
                assert_eq!(
                    (out_src, out_dst),
                    (*want_src, *want_dst),
                    "addresses: {}",
                    context()
                );
                assert_eq!(out_hops, hops - 1, "hop count: {}", context());
                assert_eq!(out_payload, payload, "payload: {}", context());
                if input_ok {
                    assert!(output_ok, "UDP checksum: {}", context());
                }
            }
            println!(
                "{shape:?}: {forwarded} of {frames} forwarded ({unmodelled} with extension headers etherparse refuses); reasons: {}",
                relay.counters()
            );
            assert!(
                forwarded > 0,
                "the mutations must keep reaching the forwarding path"
            );
        }
    });
}
