//! Slow-path rate limits: packets the daemon must see (new flows, route
//! lookup failures) are rate limited per session and relay-wide by token
//! buckets, so a flood of them cannot swamp the daemon. A bucket of one
//! packet a second holds one token. The shared fixture is in `common/`.

mod common;

use aya::maps::Array;
use common::namespace::Namespace;
use common::table::{Maps, NO_FLOWS, Output, Table};
use common::{
    CLIENT, CLIENT_PORT, PAYLOAD, RELAY_FRONT, Relay, SESSION_PORT, UNRESOLVED_BACKEND, XDP_DROP,
    XDP_PASS, client_packet, udp_frame,
};
use forwarder::datapath::{bulk::nonzero_slots, xdp::clear_session_buckets};
use forwarder_common::{Reason, SlowpathBucket};

#[test]
fn fixture_table() {
    use Output::Untouched;
    use Reason::*;

    let mut table = Table::default();
    let session_limited = Maps {
        session_bucket: Some((SESSION_PORT, 1)),
        ..NO_FLOWS
    };
    table.row(
        "new flow within the session's slow-path budget",
        client_packet(),
        session_limited,
        PassNoFlow,
        Untouched,
    );
    let other_session_limited = Maps {
        session_bucket: Some((SESSION_PORT + 1, 1)),
        ..NO_FLOWS
    };
    table.row(
        "another session's bucket does not apply",
        client_packet(),
        other_session_limited,
        PassNoFlow,
        Untouched,
    );
    table.run();
}

/// Fixtures that need state left by an earlier packet: the bucket's one
/// token spent, then the next packet.
#[test]
fn spent_bucket_drops_the_next_packet() {
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
    let ns = Namespace::create();
    ns.enter(|topo| {
        for (name, maps, reason) in sequences {
            println!("sequence: {name}");
            let mut relay = Relay::load();
            relay.install(maps, topo);
            let first = relay.run(&client_packet(), Some(topo.front));
            assert_eq!(first.retval, XDP_PASS, "{name}: the first packet passes");
            relay.expect(&client_packet(), Some(topo.front), reason, XDP_DROP);
            // Not ours stays not ours, whatever the buckets say.
            let other = udp_frame((CLIENT, CLIENT_PORT), (RELAY_FRONT, 53), PAYLOAD);
            relay.expect(&other, Some(topo.front), Reason::PassNotRelayPort, XDP_PASS);
        }
    });
}

/// What a daemon's start does to an adopted bucket map (`limit_slowpath`):
/// the buckets an earlier daemon left are found by one batch read and
/// reset, every other slot stays as it was, the program sees the reset at
/// once, and the bucket each restored session then gets carries the new
/// limit. The slots sit at both ends of the array and on both sides of a
/// batch call's 4,096-slot boundary.
#[test]
fn a_new_limit_reaches_the_slots_in_use_and_no_other() {
    const IN_USE: [u16; 6] = [0, 4095, 4096, SESSION_PORT, SESSION_PORT + 1, u16::MAX];
    let mut relay = Relay::load();
    for port in IN_USE {
        relay.set_session_bucket(port, 1);
    }
    // The earlier daemon's limit: one miss a second, spent by the first.
    relay.expect(&client_packet(), None, Reason::PassNoFlow, XDP_PASS);
    relay.expect(
        &client_packet(),
        None,
        Reason::DropSlowpathSessionLimit,
        XDP_DROP,
    );
    {
        let mut buckets: Array<_, SlowpathBucket> =
            Array::try_from(relay.map_mut("SLOWPATH_SESSION_BUCKETS")).unwrap();
        let in_use: Vec<u32> = IN_USE.iter().copied().map(u32::from).collect();
        assert_eq!(
            set_slots(&buckets),
            in_use,
            "the fixture, read slot by slot"
        );
        assert_eq!(
            nonzero_slots(&buckets).expect("batch lookup of the bucket array"),
            Some(in_use),
            "one batch read finds exactly the slots in use (this kernel has batch lookups for arrays)"
        );
        assert_eq!(clear_session_buckets(&mut buckets).unwrap(), IN_USE.len());
        assert_eq!(
            set_slots(&buckets),
            Vec::<u32>::new(),
            "every slot reset, none written with anything else"
        );
        assert_eq!(nonzero_slots(&buckets).unwrap(), Some(Vec::new()));
    }
    // Reset means unlimited until the session is restored: the spent bucket is gone.
    relay.expect(&client_packet(), None, Reason::PassNoFlow, XDP_PASS);
    // The restored session's bucket under the new limit: two a second,
    // where the old one refused the second miss.
    relay.set_session_bucket(SESSION_PORT, 2);
    relay.expect(&client_packet(), None, Reason::PassNoFlow, XDP_PASS);
    relay.expect(&client_packet(), None, Reason::PassNoFlow, XDP_PASS);
    relay.expect(
        &client_packet(),
        None,
        Reason::DropSlowpathSessionLimit,
        XDP_DROP,
    );
}

/// Slots whose bucket is not all zero, one lookup each.
fn set_slots(buckets: &Array<&mut aya::maps::MapData, SlowpathBucket>) -> Vec<u32> {
    (0..buckets.len())
        .filter(|slot| buckets.get(slot, 0).unwrap() != SlowpathBucket::default())
        .collect()
}
