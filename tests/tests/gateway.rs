//! Gateway mode: LAN hosts ask the router for mappings with the real
//! clients (Debian's natpmpc and miniupnpc) and with a PCP request built
//! here; stock mosh from the WAN host reaches the LAN server through each
//! mapping, a second LAN host reaches it through the WAN address (hairpin),
//! and the gateway never answers on the WAN side.

use std::net::SocketAddrV4;
use std::time::Duration;

use forwarder_testbed::gateway::*;
use forwarder_testbed::prereq;
use forwarder_testbed::relay::Relay;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::{MoshClient, MoshServer};

fn start() -> (GatewayTopology, Relay) {
    prereq::require().unwrap();
    let topo = GatewayTopology::new().unwrap();
    let relay = Relay::start(&topo.router, &topo.ifaces(), &topo.relay_args(&[])).unwrap();
    (topo, relay)
}

/// natpmpc maps the LAN server's mosh port; stock mosh from the WAN host
/// works through it, forwarded by XDP.
#[test]
fn natpmpc_mapping_carries_mosh() {
    let (topo, relay) = start();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60001).unwrap();
    let mapping = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60001, server.port, 3600).unwrap();
    assert_eq!(mapping.public_ip, Some(ROUTER_WAN_IP), "{mapping:?}");
    assert_eq!(
        mapping.public_port, 60001,
        "the suggested port was free: {mapping:?}"
    );
    assert_eq!(mapping.lifetime, 3600);
    let sessions = relay.sessions().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s.port == mapping.public_port
                && s.backend == format!("{LAN1_IP}:{}", server.port)),
        "no session for the mapping: {sessions:?}"
    );
    let client =
        MoshClient::start(&topo.wan, ROUTER_WAN_IP, mapping.public_port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "natpmp").unwrap();
    relay
        .wait_until(
            "fast-path packets on the mapping",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.port == mapping.public_port)?;
                s.flows
                    .iter()
                    .find(|f| f.fast_path_packets > 0 && f.packets_to_client > 0)
                    .cloned()
            },
        )
        .unwrap();
}

/// Waits until the relay holds (or no longer holds) a session on `port`.
fn wait_session(relay: &Relay, port: u16, present: bool, timeout: Duration) {
    relay
        .wait_until(
            &format!(
                "the session on port {port} to be {}",
                if present { "there" } else { "gone" }
            ),
            timeout,
            |sessions| (sessions.iter().any(|s| s.port == port) == present).then_some(()),
        )
        .unwrap();
}

/// mosh from `ns` to the WAN address and `port` shows the shell and answers.
fn mosh_through(ns: &forwarder_testbed::Netns, port: u16, key: &str, prefix: &str) -> MoshClient {
    let client = MoshClient::start(ns, ROUTER_WAN_IP, port, key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, prefix).unwrap();
    client
}

/// upnpc (discovery, the description, AddPortMapping and
/// GetSpecificPortMappingEntry) maps the server; mosh works through it;
/// `upnpc -l` lists it and `upnpc -d` removes it with its session.
#[test]
fn upnpc_mapping_carries_mosh_and_is_deleted() {
    let (topo, relay) = start();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60002).unwrap();
    let port = server.port.to_string();
    let added = upnpc(
        &topo.lan1,
        &["-a", &LAN1_IP.to_string(), &port, "60123", "UDP", "600"],
    )
    .unwrap();
    assert!(
        added.contains(&format!(
            "external {ROUTER_WAN_IP}:60123 UDP is redirected to internal {LAN1_IP}:{port}"
        )),
        "upnpc -a did not map:\n{added}\n{}",
        relay.log()
    );
    assert!(
        added.contains(&format!("ExternalIPAddress = {ROUTER_WAN_IP}")),
        "{added}"
    );
    assert!(
        added.contains("Found valid IGD"),
        "upnpc did not take the gateway for a connected IGD:\n{added}"
    );
    wait_session(&relay, 60123, true, Duration::from_secs(5));
    let _client = mosh_through(&topo.wan, 60123, &server.key, "upnp");
    let listed = upnpc(&topo.lan1, &["-l"]).unwrap();
    assert!(
        listed.contains("60123->10.77.2.2:") && listed.contains("UDP"),
        "upnpc -l does not list the mapping:\n{listed}"
    );
    let deleted = upnpc(&topo.lan1, &["-d", "60123", "UDP"]).unwrap();
    assert!(
        deleted.contains("UPNP_DeletePortMapping() returned : 0"),
        "{deleted}"
    );
    wait_session(&relay, 60123, false, Duration::from_secs(5));
    // Gone for the IGD too.
    let again = upnpc(&topo.lan1, &["-d", "60123", "UDP"]).unwrap();
    assert!(
        again.contains("714"),
        "a second delete should say NoSuchEntryInArray:\n{again}"
    );
}

/// A PCP MAP request built here: granted with the WAN address, mosh works
/// through it; ANNOUNCE answers with the epoch; a renewal with another
/// nonce, a wrong client address and a third-party request (secure mode)
/// are refused with PCP's own codes; lifetime 0 deletes.
#[test]
fn pcp_map_carries_mosh_and_speaks_its_result_codes() {
    let (topo, relay) = start();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60003).unwrap();
    let gateway = SocketAddrV4::new(ROUTER_LAN_IP, 5351);
    let from = SocketAddrV4::new(LAN1_IP, 0);
    let mut map = PcpMap {
        client: LAN1_IP,
        lifetime: 100_000,
        nonce: *b"pcp-test-nce",
        internal_port: server.port,
        suggested_external_port: 60222,
        third_party: None,
    };
    let answer = parse_pcp_answer(
        &udp_ask(&topo.lan1, from, gateway, &map.encode())
            .unwrap()
            .expect("no PCP answer"),
    )
    .unwrap();
    assert_eq!(answer.result, 0, "{answer:?}\n{}", relay.log());
    assert_eq!(answer.opcode, 1);
    assert_eq!(answer.nonce, map.nonce);
    assert_eq!(answer.external_ip, Some(ROUTER_WAN_IP));
    assert_eq!(answer.external_port, 60222);
    // The default longest lifetime is a day.
    assert_eq!(
        answer.lifetime, 86_400,
        "the lifetime was not clamped: {answer:?}"
    );
    let _client = mosh_through(&topo.wan, 60222, &server.key, "pcp");

    // ANNOUNCE: header only, success, the epoch.
    let mut announce = vec![2, 0, 0, 0, 0, 0, 0, 0];
    announce.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 2, 2]);
    let answer = parse_pcp_answer(
        &udp_ask(&topo.lan1, from, gateway, &announce)
            .unwrap()
            .expect("no ANNOUNCE answer"),
    )
    .unwrap();
    assert_eq!((answer.opcode, answer.result), (0, 0), "{answer:?}");

    let code = |request: &PcpMap, ns: &forwarder_testbed::Netns, bind| {
        parse_pcp_answer(
            &udp_ask(ns, bind, gateway, &request.encode())
                .unwrap()
                .expect("no PCP answer"),
        )
        .unwrap()
        .result
    };
    let stolen = PcpMap {
        nonce: *b"another-nonc",
        ..map.clone()
    };
    assert_eq!(
        code(&stolen, &topo.lan1, from),
        2,
        "NOT_AUTHORIZED for another nonce"
    );
    let lying = PcpMap {
        client: LAN2_IP,
        ..map.clone()
    };
    assert_eq!(code(&lying, &topo.lan1, from), 12, "ADDRESS_MISMATCH");
    let third_party = PcpMap {
        client: LAN2_IP,
        nonce: *b"third-party!",
        third_party: Some(LAN1_IP),
        suggested_external_port: 60223,
        ..map.clone()
    };
    assert_eq!(
        code(&third_party, &topo.lan2, SocketAddrV4::new(LAN2_IP, 0)),
        2,
        "secure mode: NOT_AUTHORIZED for a host mapping another"
    );
    assert!(relay.log().contains("secure mode"), "{}", relay.log());
    let tcp = {
        let mut bytes = map.encode();
        bytes[36] = 6;
        bytes
    };
    let answer =
        parse_pcp_answer(&udp_ask(&topo.lan1, from, gateway, &tcp).unwrap().unwrap()).unwrap();
    assert_eq!(answer.result, 9, "UNSUPP_PROTOCOL for TCP");

    map.lifetime = 0;
    assert_eq!(code(&map, &topo.lan1, from), 0);
    wait_session(&relay, 60222, false, Duration::from_secs(5));
}

/// A second LAN host reaches the LAN server at WAN_ADDRESS:PORT (hairpin),
/// in XDP, with replies from WAN_ADDRESS:PORT (mosh-client accepts nothing else).
#[test]
fn hairpin_from_the_lan_through_the_wan_address() {
    let (topo, relay) = start();
    let _switch_port = topo.xdp_on_switch_port().unwrap();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60004).unwrap();
    let mapping = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60004, server.port, 600).unwrap();
    let _client = mosh_through(&topo.lan2, mapping.public_port, &server.key, "hairpin");
    let flow = relay
        .wait_until(
            "a fast-path hairpin flow",
            Duration::from_secs(20),
            |sessions| {
                let s = sessions.iter().find(|s| s.port == mapping.public_port)?;
                s.flows
                    .iter()
                    .find(|f| {
                        f.client.starts_with(&format!("{LAN2_IP}:"))
                            && f.fast_path_packets > 0
                            && f.packets_to_client > 0
                    })
                    .cloned()
            },
        )
        .unwrap();
    assert_eq!(flow.relay_addr, ROUTER_WAN_IP.to_string(), "{flow:?}");

    // Replies come from WAN_ADDRESS:PORT, byte for byte what was sent back.
    let echo = topo
        .lan1
        .udp_bind("10.77.2.2:60005".parse().unwrap())
        .unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mapped = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60005, 60005, 600).unwrap();
    let wan_endpoint = SocketAddrV4::new(ROUTER_WAN_IP, mapped.public_port);
    let sender = topo.lan2.udp_bind("10.77.2.3:0".parse().unwrap()).unwrap();
    sender
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 64];
    for round in 0..3u8 {
        let datagram = [b'h', b'p', round];
        sender.send_to(&datagram, wan_endpoint).unwrap();
        let (len, from) = echo.recv_from(&mut buf).expect("the server got nothing");
        assert_eq!(&buf[..len], &datagram);
        assert_eq!(
            from.ip().to_string(),
            ROUTER_LAN_IP.to_string(),
            "the server sees the relay's LAN side"
        );
        echo.send_to(&buf[..len], from).unwrap();
        let (len, from) = sender
            .recv_from(&mut buf)
            .expect("no reply through the hairpin");
        assert_eq!(&buf[..len], &datagram);
        assert_eq!(
            from,
            std::net::SocketAddr::V4(wan_endpoint),
            "the reply's source"
        );
    }
}

/// Nothing answers gateway requests on the WAN side: NAT-PMP to either of
/// the router's addresses, SSDP, the IGD's HTTP port.
#[test]
fn requests_from_the_wan_side_are_unanswered() {
    let (topo, relay) = start();
    topo.wan
        .ip(&[
            "route",
            "add",
            "10.77.2.0/24",
            "via",
            &ROUTER_WAN_IP.to_string(),
        ])
        .unwrap();
    let from = SocketAddrV4::new(WAN_HOST_IP, 0);
    for address in [ROUTER_WAN_IP, ROUTER_LAN_IP] {
        for request in [
            &[0u8, 0][..],
            &[0, 1, 0, 0, 0xea, 0x60, 0xea, 0x60, 0, 0, 0x0e, 0x10],
        ] {
            let answer =
                udp_ask(&topo.wan, from, SocketAddrV4::new(address, 5351), request).unwrap();
            assert_eq!(
                answer, None,
                "NAT-PMP answered from the WAN side at {address}"
            );
        }
        let search = b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: ssdp:all\r\n\r\n";
        let answer = udp_ask(&topo.wan, from, SocketAddrV4::new(address, 1900), search).unwrap();
        assert_eq!(answer, None, "SSDP answered from the WAN side at {address}");
        let http = topo
            .wan
            .http_get(&format!("{address}:5000"), "/rootDesc.xml");
        assert!(
            http.is_err(),
            "the IGD description was served to the WAN side: {http:?}"
        );
    }
    // The same requests from the LAN are answered (the test above is not vacuous).
    let answer = udp_ask(
        &topo.lan1,
        SocketAddrV4::new(LAN1_IP, 0),
        SocketAddrV4::new(ROUTER_LAN_IP, 5351),
        &[0, 0],
    )
    .unwrap();
    assert!(answer.is_some_and(|a| a.len() == 12 && a[8..12] == ROUTER_WAN_IP.octets()));
    assert!(
        topo.lan1
            .http_get(&format!("{ROUTER_LAN_IP}:5000"), "/rootDesc.xml")
            .unwrap()
            .contains("WANIPConnection")
    );
    assert!(relay.sessions().unwrap().is_empty());
}

/// A mapping ends at its lifetime (the shortest allowed here is 2 s), and
/// natpmpc's lifetime 0 deletes one at once.
#[test]
fn mappings_expire_at_their_lifetime_and_delete_on_request() {
    prereq::require().unwrap();
    let topo = GatewayTopology::new().unwrap();
    let relay = Relay::start(
        &topo.router,
        &topo.ifaces(),
        &topo.relay_args(&["--gateway-min-lifetime", "2s"]),
    )
    .unwrap();
    let short = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60005, 60005, 3).unwrap();
    assert_eq!(short.lifetime, 3);
    wait_session(&relay, short.public_port, true, Duration::from_secs(2));
    // Clamped up to the shortest lifetime allowed.
    let clamped = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60006, 60006, 1).unwrap();
    assert_eq!(clamped.lifetime, 2);
    wait_session(&relay, short.public_port, false, Duration::from_secs(10));
    wait_session(&relay, clamped.public_port, false, Duration::from_secs(10));
    assert!(
        relay.log().contains("its lifetime ended"),
        "{}",
        relay.log()
    );

    let long = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60007, 60007, 3600).unwrap();
    wait_session(&relay, long.public_port, true, Duration::from_secs(2));
    let deleted = natpmpc(
        &topo.lan1,
        ROUTER_LAN_IP,
        &["-a", "60007", "60007", "udp", "0"],
    )
    .unwrap();
    assert!(
        deleted.contains("liftime 0") || deleted.contains("lifetime 0"),
        "{deleted}"
    );
    wait_session(&relay, long.public_port, false, Duration::from_secs(5));
}

/// The NAT-PMP epoch from a public-address answer.
fn epoch(topo: &GatewayTopology) -> u32 {
    let answer = udp_ask(
        &topo.lan1,
        SocketAddrV4::new(LAN1_IP, 0),
        SocketAddrV4::new(ROUTER_LAN_IP, 5351),
        &[0, 0],
    )
    .unwrap()
    .expect("no NAT-PMP answer");
    u32::from_be_bytes(answer[4..8].try_into().unwrap())
}

/// Mappings survive a restart of the daemon: the session, its lease (it
/// still expires, and renews to the same port) and the NAT-PMP epoch,
/// which keeps counting instead of starting over (clients would take a
/// smaller epoch for a gateway that lost their mappings).
#[test]
fn mappings_and_the_epoch_survive_a_restart() {
    let (topo, mut relay) = start();
    let server = MoshServer::start(&topo.lan1, LAN1_IP, 60008).unwrap();
    let mapping = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60008, server.port, 3600).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = epoch(&topo);
    assert!(before >= 1, "epoch {before}");
    // LAN hosts hear the restarted gateway announce itself (RFC 6886 3.2.1,
    // RFC 6887 14.1.3) on 224.0.0.1:5350.
    let listener = topo.lan2.udp_bind("0.0.0.0:5350".parse().unwrap()).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    relay.terminate().unwrap();
    relay.restart().unwrap();
    let mut heard = Vec::new();
    let mut buf = [0u8; 64];
    while heard.len() < 2 {
        let Ok((len, from)) = listener.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from.ip().to_string(), ROUTER_LAN_IP.to_string());
        heard.push(buf[..len].to_vec());
    }
    assert!(
        heard
            .iter()
            .any(|a| a.len() == 12 && a[..2] == [0, 128] && a[8..12] == ROUTER_WAN_IP.octets()),
        "no NAT-PMP announcement of the public address: {heard:?}"
    );
    assert!(
        heard
            .iter()
            .any(|a| a.len() == 24 && a[..4] == [2, 0x80, 0, 0]),
        "no PCP ANNOUNCE: {heard:?}"
    );
    wait_session(&relay, mapping.public_port, true, Duration::from_secs(5));
    let after = epoch(&topo);
    assert!(
        after >= before,
        "the epoch went back from {before} to {after}: clients would think their mappings were lost"
    );
    assert!(
        relay.log().contains("mappings_restored=1"),
        "{}",
        relay.log()
    );
    let _client = mosh_through(&topo.wan, mapping.public_port, &server.key, "restart");
    // Renewal finds the restored lease: the same external port.
    let renewed = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 0, server.port, 3600).unwrap();
    assert_eq!(renewed.public_port, mapping.public_port);
    assert_eq!(relay.sessions().unwrap().len(), 1);
}

/// Secure mode (on by default): a LAN host asking to map another host is
/// refused (UPnP 606), logged, and nothing is created. Rules, quota.
#[test]
fn secure_mode_rules_and_quota_refuse_with_the_protocols_codes() {
    prereq::require().unwrap();
    let topo = GatewayTopology::new().unwrap();
    let relay = Relay::start(
        &topo.router,
        &topo.ifaces(),
        &topo.relay_args(&[
            "--gateway-rule",
            "deny 60100 10.77.2.0/24 1-65535",
            "--gateway-rule",
            "allow 60000-60999 10.77.2.0/24 1024-65535",
            "--gateway-max-mappings-per-host",
            "2",
        ]),
    )
    .unwrap();
    let other = upnpc(
        &topo.lan1,
        &["-a", &LAN2_IP.to_string(), "60009", "60009", "UDP", "600"],
    )
    .unwrap();
    assert!(
        other.contains("606"),
        "upnpc mapping another host was not refused with 606:\n{other}"
    );
    assert!(relay.log().contains("secure mode"), "{}", relay.log());
    // The deny rule: NAT-PMP moves elsewhere (it may), UPnP asks for that port only.
    let denied = upnpc(
        &topo.lan1,
        &["-a", &LAN1_IP.to_string(), "60010", "60100", "UDP", "600"],
    )
    .unwrap();
    assert!(denied.contains("606"), "{denied}");
    let moved = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60100, 60011, 600).unwrap();
    assert_ne!(
        moved.public_port, 60100,
        "the deny rule was not applied: {moved:?}"
    );
    // Internal ports under 1024 match no allow rule.
    let low = natpmpc(
        &topo.lan1,
        ROUTER_LAN_IP,
        &["-a", "60012", "80", "udp", "600"],
    );
    let low = low.expect_err("port 80 was mapped").to_string();
    assert!(
        low.contains("not authorized"),
        "NAT-PMP's Not Authorized expected: {low}"
    );
    // The quota: two mappings per host.
    natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60013, 60013, 600).unwrap();
    let third = natpmpc(
        &topo.lan1,
        ROUTER_LAN_IP,
        &["-a", "60014", "60014", "udp", "600"],
    )
    .expect_err("a third mapping beyond the quota was granted")
    .to_string();
    assert!(
        third.contains("out of resources"),
        "NAT-PMP's Out of resources expected: {third}"
    );
    assert!(relay.log().contains("quota"), "{}", relay.log());
    assert_eq!(relay.sessions().unwrap().len(), 2);
}

/// `forwarder mosh-server --gateway` on the LAN host: asks the gateway,
/// starts mosh-server on a port free on both, prints MOSH IP (the WAN
/// address) and MOSH CONNECT; stock mosh-client from the WAN host works.
#[test]
fn mosh_server_wrapper_maps_through_the_gateway() {
    let (topo, relay) = start();
    let (server, wrapped) = MoshServer::start_wrapped(&topo.lan1, &["--gateway"]).unwrap();
    assert_eq!(wrapped.ip, ROUTER_WAN_IP, "{}", wrapped.stderr);
    let sessions = relay.sessions().unwrap();
    let session = sessions
        .iter()
        .find(|s| s.port == server.port)
        .unwrap_or_else(|| panic!("{sessions:?}"));
    assert_eq!(
        session.backend,
        format!("{LAN1_IP}:{}", server.port),
        "the port is not the same on both sides: {}",
        wrapped.stderr
    );
    let client = mosh_through(&topo.wan, server.port, &server.key, "wrapper");
    // The helper it left renews the mapping while mosh-server runs and
    // deletes it once mosh-server is gone.
    drop(client);
    drop(server);
    wait_session(&relay, session.port, false, Duration::from_secs(15));
    assert!(
        relay.log().contains("deleted by its host"),
        "{}",
        relay.log()
    );
}

/// Mappings never take a port the router uses: one a program on the router
/// holds, or one a session of its own (`forwarder add --port`) has. NAT-PMP
/// moves to a free port; UPnP, which asks for that port only, gets 718.
#[test]
fn mappings_avoid_ports_the_router_and_its_sessions_use() {
    let (topo, relay) = start();
    let _held = topo
        .router
        .udp_bind("0.0.0.0:60030".parse().unwrap())
        .unwrap();
    let own = relay
        .add("10.77.2.3:60031".parse().unwrap(), &["--port", "60031"])
        .unwrap();
    assert_eq!(own.port, 60031);
    let moved = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60030, 60030, 600).unwrap();
    assert!(
        ![60030, 60031].contains(&moved.public_port),
        "a mapping took a port in use: {moved:?}"
    );
    let moved = natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60031, 60033, 600).unwrap();
    assert!(
        ![60030, 60031].contains(&moved.public_port),
        "a mapping took a port in use: {moved:?}"
    );
    for taken in ["60030", "60031"] {
        let refused = upnpc(
            &topo.lan1,
            &["-a", &LAN1_IP.to_string(), "60034", taken, "UDP", "600"],
        )
        .unwrap();
        assert!(refused.contains("718"), "{refused}");
    }
    let sessions = relay.sessions().unwrap();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
}
