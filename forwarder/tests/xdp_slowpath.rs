//! Slow-path rate limits: packets the daemon must see (new flows, route
//! lookup failures) are rate limited per session and relay-wide by token
//! buckets, so a flood of them cannot swamp the daemon. A bucket of one
//! packet a second holds one token. The shared fixture is in `common/`.

mod common;

use common::namespace::Namespace;
use common::table::{Maps, NO_FLOWS, Output, Table};
use common::{
    CLIENT, CLIENT_PORT, PAYLOAD, RELAY_FRONT, Relay, SESSION_PORT, UNRESOLVED_BACKEND, XDP_DROP,
    XDP_PASS, client_packet, udp_frame,
};
use forwarder_common::Reason;

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
