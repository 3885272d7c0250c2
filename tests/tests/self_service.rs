//! Self-service on a shared bastion: two unprivileged users in the control
//! socket's group each add, list, show and remove their own sessions; one
//! carries a real mosh session; another user's session is refused to them;
//! the quota and the backend policy refuse with the rule named; root sees
//! every session with its owner, also after a restart; a user outside the
//! group is told which group to join; `run` refuses a group that does not exist.

use std::net::{SocketAddr, SocketAddrV4};

use forwarder_testbed::mosh::{MoshClient, MoshServer};
use forwarder_testbed::netns::Netns;
use forwarder_testbed::scenario::{MOSH_SERVER_PORT, roundtrip, wait_for_shell};
use forwarder_testbed::topology::{RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::users::{
    PERMISSION_DENIED, TestGroup, TestUser, UserCli, refused, user_session, user_sessions,
};
use forwarder_testbed::{Relay, Topology, forwarder_bin, prereq};

fn backend(port: u16) -> String {
    SocketAddrV4::new(SERVER_IP, port).to_string()
}

#[test]
fn users_drive_their_own_sessions_within_policy_and_quota() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let group = TestGroup::new().unwrap();
    let alice = TestUser::new(&[&group]).unwrap();
    let bob = TestUser::new(&[&group]).unwrap();
    let outsider = TestUser::new(&[]).unwrap();
    let cli = UserCli::new().unwrap();
    let allow = format!("{}/24:60001-60010", topo_server_net());
    let deny = format!("{SERVER_IP}:60009");
    let mut relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--socket-group",
            &group.name,
            "--user-allow",
            &allow,
            "--user-deny",
            &deny,
            "--user-max-sessions",
            "2",
        ],
    )
    .unwrap();

    // The socket: root's and the group's, nobody else's.
    let meta = std::fs::metadata(relay.socket_path()).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, group.gid().unwrap()));

    // Alice's session carries a real mosh session.
    let server = MoshServer::start(&topo.server, SERVER_IP, MOSH_SERVER_PORT).unwrap();
    let alices = user_session(
        cli.json(&alice, &relay, &["add", "--backend", &backend(server.port)])
            .unwrap(),
    );
    assert_eq!(
        (alices.owner.uid, alices.owner.name.as_str()),
        (alice.uid, alice.name.as_str())
    );
    let client =
        MoshClient::start(&topo.client, RELAY_CLIENT_IP, alices.port, &server.key).unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "alice").unwrap();

    let bobs = user_session(
        cli.json(&bob, &relay, &["add", "--backend", &backend(60002)])
            .unwrap(),
    );
    assert_eq!(bobs.owner.uid, bob.uid);

    // Each sees and shows only its own.
    let listed = user_sessions(cli.json(&alice, &relay, &["list"]).unwrap());
    assert_eq!(
        listed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&alices.id],
        "alice's list: {listed:?}"
    );
    let listed = user_sessions(cli.json(&bob, &relay, &["list"]).unwrap());
    assert_eq!(listed.iter().map(|s| &s.id).collect::<Vec<_>>(), [&bobs.id]);
    let shown = user_session(cli.json(&alice, &relay, &["show", &alices.id]).unwrap());
    assert_eq!(shown.owner, alices.owner);
    assert!(
        shown.flows.iter().any(|f| f.packets_to_client > 0),
        "alice's session carried nothing: {shown:?}"
    );
    let human = cli
        .run(&alice, &relay, &["show", &alices.port.to_string()])
        .unwrap();
    assert!(
        human
            .stdout
            .contains(&format!("owner {} (uid {})", alice.name, alice.uid)),
        "{}",
        human.stdout
    );

    // Another user's session: refused, named as such, and left alone.
    for verb in ["show", "remove"] {
        let out = cli.run(&bob, &relay, &[verb, &alices.id]).unwrap();
        refused(
            &out,
            &format!("bob's `{verb}` of alice's session"),
            &[
                "belongs to another user",
                &format!("may {verb} only its own"),
            ],
        );
        assert_eq!(out.status.code(), Some(PERMISSION_DENIED), "{verb}");
    }
    let out = cli
        .run(&alice, &relay, &["remove", &bobs.port.to_string()])
        .unwrap();
    refused(
        &out,
        "alice's remove of bob's session",
        &["belongs to another user"],
    );
    assert!(relay.session(&alices.id).unwrap().is_some());
    assert!(relay.session(&bobs.id).unwrap().is_some());

    // The backend policy: outside every allow rule, or on a deny rule.
    let out = cli
        .run(&alice, &relay, &["add", "--backend", &backend(22)])
        .unwrap();
    refused(
        &out,
        "a backend no rule allows",
        &["no user_allow rule matches"],
    );
    let out = cli
        .run(&alice, &relay, &["add", "--backend", &backend(60009)])
        .unwrap();
    refused(
        &out,
        "a denied backend",
        &[&format!("deny rule {SERVER_IP}/32:60009"), "user_deny"],
    );
    // The quota: a second session fits, a third does not.
    let second = user_session(
        cli.json(&alice, &relay, &["add", "--backend", &backend(60003)])
            .unwrap(),
    );
    let out = cli
        .run(&alice, &relay, &["add", "--backend", &backend(60004)])
        .unwrap();
    refused(
        &out,
        "a session over the quota",
        &["the quota of 2", "user_max_sessions"],
    );
    // Root is held to neither.
    let roots = relay
        .add(SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 22)), &[])
        .unwrap();

    // `stats` is root's; a user outside the group is told which to join.
    let out = cli.run(&alice, &relay, &["stats"]).unwrap();
    refused(&out, "alice's stats", &["root's"]);
    assert_eq!(out.status.code(), Some(PERMISSION_DENIED));
    let out = cli.run(&outsider, &relay, &["list"]).unwrap();
    refused(
        &out,
        "a user outside the group",
        &["permission denied", &format!("group {:?}", group.name)],
    );
    assert_eq!(out.status.code(), Some(PERMISSION_DENIED));

    // Root sees all, with their owners; and still after a restart.
    let owners = |relay: &Relay| {
        let mut owners: Vec<(String, u32, String)> = relay
            .sessions()
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.owner.uid, s.owner.name))
            .collect();
        owners.sort();
        owners
    };
    let mut expected = vec![
        (alices.id.clone(), alice.uid, alice.name.clone()),
        (second.id.clone(), alice.uid, alice.name.clone()),
        (bobs.id.clone(), bob.uid, bob.name.clone()),
        (roots.id.clone(), 0, "root".to_string()),
    ];
    expected.sort();
    assert_eq!(owners(&relay), expected);
    let human = relay.verb(&["list"]).unwrap();
    assert!(
        human.contains(&format!("owner {} (uid {})", bob.name, bob.uid)),
        "{human}"
    );
    relay.terminate().unwrap();
    relay.restart().unwrap();
    assert_eq!(owners(&relay), expected, "owners after a restart");
    // The restored quota still counts alice's two sessions.
    let out = cli
        .run(&alice, &relay, &["add", "--backend", &backend(60005)])
        .unwrap();
    refused(&out, "over the quota after a restart", &["the quota of 2"]);
    roundtrip(&client, "after-restart").unwrap();

    // Each removes its own; root removes anyone's.
    cli.json(&alice, &relay, &["remove", &alices.id]).unwrap();
    cli.json(&alice, &relay, &["remove", &second.port.to_string()])
        .unwrap();
    relay.remove(&bobs.id).unwrap();
    assert!(user_sessions(cli.json(&alice, &relay, &["list"]).unwrap()).is_empty());
    assert!(user_sessions(cli.json(&bob, &relay, &["list"]).unwrap()).is_empty());
    relay.remove(&roots.id).unwrap();

    // One audit line per change, naming who (and the refusals).
    let log = relay.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forwarder::audit"))
        .collect();
    let lines_with = |needles: &[&str]| {
        audit
            .iter()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    };
    let alice_user = format!("user={}", alice.name);
    let alice_uid = format!("uid={}", alice.uid);
    assert_eq!(
        lines_with(&[
            &alice_user,
            &alice_uid,
            "action=\"add\"",
            "audit: add session"
        ]),
        2,
        "{audit:#?}"
    );
    assert_eq!(
        lines_with(&[&alice_user, "action=\"remove\"", "audit: remove session"]),
        2,
        "{audit:#?}"
    );
    let bob_owner = format!("owner={}", bob.name);
    assert_eq!(
        lines_with(&["user=root", "action=\"remove\"", &bob_owner]),
        1,
        "root's removal of bob's session: {audit:#?}"
    );
    assert!(
        lines_with(&[&format!("user={}", bob.name), "outcome=\"refused\""]) >= 2,
        "bob's refusals: {audit:#?}"
    );
    drop(client);
}

/// The server side's /24, where the allow rule lets users in.
fn topo_server_net() -> String {
    let [a, b, c, _] = SERVER_IP.octets();
    format!("{a}.{b}.{c}.0")
}

#[test]
fn run_refuses_a_socket_group_that_does_not_exist() {
    prereq::require().unwrap();
    let ns = Netns::new("nogroup").unwrap();
    let missing = format!("fwdg-missing-{}", std::process::id());
    let instance = format!("t{}-nogroup", std::process::id());
    let bin = forwarder_bin().unwrap();
    let out = forwarder_testbed::cmd::run(
        ns.nsenter(bin.to_str().unwrap()).args([
            "run",
            "--instance",
            &instance,
            "--iface",
            "lo",
            "--datapath",
            "userspace",
            "--socket-group",
            &missing,
        ]),
        forwarder_testbed::cmd::SHORT,
    )
    .unwrap();
    refused(
        &out,
        "run with a missing socket group",
        &[
            &format!("group {missing:?} does not exist"),
            "addgroup --system",
            "--socket-group",
        ],
    );
    assert!(
        !std::path::Path::new(&format!("/run/forwarder/{instance}.sock")).exists(),
        "a refused start left its socket"
    );
}
