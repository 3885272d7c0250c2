//! The backend half and its anti-spoofing rules: a packet to a flow's
//! upstream port is accepted only from the backend's address and port, on
//! the backend's interface; a punched session hands a moved source to the
//! daemon as a NAT rebind candidate instead. The shared fixture is in
//! `common/`.

mod common;

use common::table::{BACKEND_FLOW, Ingress, Output, TO_CLIENT, Table};
use common::{
    BACKEND, BACKEND_PORT, CLIENT, CLIENT_PORT, FLOW_PORT, PAYLOAD, RELAY_BACK, Relay,
    SESSION_PORT, XDP_DROP, XDP_PASS, backend_key, backend_packet, backend_rewrite, udp_frame,
};
use forwarder_common::Reason;

#[test]
fn fixture_table() {
    use Output::Untouched;
    use Reason::*;

    let mut table = Table::default();
    table.row_on(
        "backend reply",
        backend_packet(),
        BACKEND_FLOW,
        Ingress::Back,
        RedirectForwarded,
        TO_CLIENT,
    );
    table.row_on(
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
    table.row_on(
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
    table.row_on(
        "backend from another port",
        other_port,
        BACKEND_FLOW,
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    let client_as_server = udp_frame((CLIENT, CLIENT_PORT), (RELAY_BACK, FLOW_PORT), PAYLOAD);
    table.row_on(
        "client writing to an upstream port",
        client_as_server.clone(),
        BACKEND_FLOW,
        Ingress::Front,
        DropSpoofedServer,
        Untouched,
    );
    // On the backend's own interface only the source check can drop it.
    table.row_on(
        "client address writing to an upstream port from the backend side",
        client_as_server,
        BACKEND_FLOW,
        Ingress::Back,
        DropSpoofedServer,
        Untouched,
    );
    table.run();
}

/// A punched session's backend half: a source mismatch on the allowed
/// interface goes to the daemon (which verifies it with the session key),
/// rate limited by the session's slow-path bucket; on another interface it
/// is still dropped; the real server is still forwarded.
#[test]
fn nat_backend_half_hands_unknown_sources_to_the_daemon() {
    let mut relay = Relay::load();
    // Without ctx_in the program sees loopback (ifindex 1) as ingress.
    let lo = relay.add_egress(1);
    let mut rewrite = backend_rewrite(lo);
    rewrite.rewrite.flags = forwarder_common::flow::REWRITE_UNKNOWN_SOURCE_TO_DAEMON;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
    relay.set_session_bucket(SESSION_PORT, 2);
    let moved = udp_frame(
        ([10, 0, 2, 66], BACKEND_PORT + 7),
        (RELAY_BACK, FLOW_PORT),
        PAYLOAD,
    );
    let run = relay.expect(&moved, None, Reason::PassNatRebindCandidate, XDP_PASS);
    assert_eq!(
        run.out, moved,
        "a rebind candidate reaches the stack untouched"
    );
    relay.expect(&moved, None, Reason::PassNatRebindCandidate, XDP_PASS);
    // The session's bucket (2 per second) is spent: the rest are dropped.
    relay.expect(&moved, None, Reason::DropSlowpathSessionLimit, XDP_DROP);

    // The same flag on another interface does not open the entry: one the
    // program is not attached to, or another numbered one.
    rewrite.allowed.iface = forwarder_common::flow::IFACE_NONE;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
    relay.expect(&moved, None, Reason::DropSpoofedServer, XDP_DROP);
    rewrite.allowed.iface = lo + 1;
    relay.add_backend_flow(backend_key((RELAY_BACK, FLOW_PORT)), rewrite);
    relay.expect(&moved, None, Reason::DropSpoofedServer, XDP_DROP);
}
