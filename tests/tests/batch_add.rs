//! Many sessions in one request: `forwarder add --from-file` and the
//! control API's `add_many` against a real daemon. Every line gets its own
//! result (added, or why not and how to fix it); the lines that fail leave
//! the others added; the sessions added are durable (a restart restores
//! them); a non-root caller's batch is held to the backend policy and its
//! quota item by item; one connection carries several requests in order.

use std::net::SocketAddrV4;
use std::os::unix::fs::PermissionsExt;

use forwarder_testbed::topology::SERVER_IP;
use forwarder_testbed::users::{TestGroup, TestUser, UserCli};
use forwarder_testbed::{Relay, Topology, prereq};
use serde_json::Value;

fn backend(port: u16) -> String {
    SocketAddrV4::new(SERVER_IP, port).to_string()
}

/// A file of sessions anyone may read (the non-root CLI reads it too).
fn sessions_file(dir: &tempfile::TempDir, lines: &[String]) -> String {
    let path = dir.path().join("sessions.txt");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.to_str().unwrap().to_string()
}

/// One line's outcome: the session added, or the error message.
type LineOutcome = (u64, Result<Value, String>);

/// The per-line results of `add --from-file --json`, by line number.
fn results(stdout: &str) -> (Value, Vec<LineOutcome>) {
    let document: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("{e}: not one JSON document: {stdout}"));
    assert_eq!(document["schema_version"], 1, "{document}");
    let lines = document["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {document}"))
        .iter()
        .map(|result| {
            let line = result["line"].as_u64().unwrap();
            match result["error"].as_str() {
                Some(message) => (line, Err(message.to_string())),
                None => (line, Ok(result["session"].clone())),
            }
        })
        .collect();
    (document, lines)
}

#[test]
fn a_file_of_sessions_is_added_line_by_line_and_survives_a_restart() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let existing = relay
        .add(
            std::net::SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 60_001)),
            &[],
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = sessions_file(
        &dir,
        &[
            "# one session per line".into(),
            backend(60_010),
            format!("{} port=60100 idle_timeout=2h", backend(60_011)),
            // Already forwarded by `existing`.
            backend(60_001),
            // Outside the daemon's --ports (60000-60999).
            format!("{} port=59000", backend(60_012)),
            // No route from the relay.
            "192.0.2.1:60001".into(),
            format!(
                "{{\"backend\": \"{}\", \"key\": \"6xoXFHJqYUQUE2f4Q202jg\"}}",
                backend(60_013)
            ),
        ],
    );
    let out = relay
        .try_verb(&["add", "--from-file", &file, "--json"])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "some lines failed, so the command fails: {}{}",
        out.stdout,
        out.stderr
    );
    let (document, lines) = results(&out.stdout);
    assert_eq!(
        (document["added"].as_u64(), document["failed"].as_u64()),
        (Some(3), Some(3))
    );
    let numbers: Vec<u64> = lines.iter().map(|(line, _)| *line).collect();
    assert_eq!(
        numbers,
        [2, 3, 4, 5, 6, 7],
        "one result per session line, in order"
    );
    let error = |line: u64| -> String {
        lines
            .iter()
            .find(|(n, _)| *n == line)
            .and_then(|(_, result)| result.clone().err())
            .unwrap_or_else(|| panic!("line {line} did not fail: {lines:?}"))
    };
    assert!(
        error(4).contains(&format!("already forwards to {}", backend(60_001))),
        "{}",
        error(4)
    );
    assert!(error(4).contains(&existing.id), "{}", error(4));
    assert!(
        error(5).contains("outside the relay's range 60000-60999"),
        "{}",
        error(5)
    );
    assert!(
        error(6).contains("no route to backend 192.0.2.1"),
        "{}",
        error(6)
    );
    let added = |line: u64| -> Value {
        lines
            .iter()
            .find(|(n, _)| *n == line)
            .and_then(|(_, result)| result.clone().ok())
            .unwrap_or_else(|| panic!("line {line} was not added: {lines:?}"))
    };
    assert_eq!(added(3)["port"], 60_100);
    assert_eq!(added(3)["idle_timeout_secs"], 7_200);
    assert_eq!(added(7)["has_key"], true);
    assert!(
        !out.stdout.contains("6xoXFHJqYUQUE2f4Q202jg"),
        "the key is never shown"
    );

    // Text output: every line reported, the failure summed up on stderr.
    let again = sessions_file(&dir, &[backend(60_020), backend(60_010)]);
    let out = relay.try_verb(&["add", "--from-file", &again]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.contains("line 1: session "), "{}", out.stdout);
    assert!(out.stdout.contains("line 2: not added: "), "{}", out.stdout);
    assert!(
        out.stdout.contains("added 1 of 2 sessions"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("1 of 2 sessions were not added"),
        "{}",
        out.stderr
    );

    // A malformed line refuses the whole file before anything is sent.
    let before = relay.state().unwrap();
    let typo = sessions_file(
        &dir,
        &[backend(60_030), format!("{} prot=5", backend(60_031))],
    );
    let out = relay.try_verb(&["add", "--from-file", &typo]).unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);
    assert_eq!(
        relay.state().unwrap(),
        before,
        "nothing of a refused file is added"
    );

    // Durable: the restarted daemon has every session the batches added.
    relay.restart().unwrap();
    let after = relay.state().unwrap();
    assert_eq!(after, before, "a restart restores what the batches added");
    assert_eq!(after.len(), 5, "{after:?}");
}

#[test]
fn one_connection_carries_requests_in_order_and_a_batch_too_large_is_refused() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let batch = serde_json::json!({
        "verb": "add_many",
        "sessions": [{"backend": backend(60_040)}, {"backend": "10.77.2.2:0"}],
    });
    let request = format!("{{\"verb\":\"list\"}}\n{batch}\n{{\"verb\":\"list\"}}\n");
    let reply = relay.raw_request(request.as_bytes()).unwrap();
    let replies: Vec<Value> = reply
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(replies.len(), 3, "one reply per request: {reply}");
    assert_eq!(replies[0]["sessions"].as_array().map(Vec::len), Some(0));
    let items = replies[1]["added_many"].as_array().unwrap();
    assert_eq!(items[0]["session"]["backend"], backend(60_040));
    assert!(
        items[1]["error"].as_str().unwrap().contains("port 0"),
        "{}",
        items[1]
    );
    assert_eq!(replies[2]["sessions"].as_array().map(Vec::len), Some(1));

    let sessions: Vec<Value> = (0..1001)
        .map(|n| serde_json::json!({"backend": format!("10.77.2.2:{}", 1000 + n)}))
        .collect();
    let too_many = serde_json::json!({"verb": "add_many", "sessions": sessions});
    let reply = relay
        .raw_request(format!("{too_many}\n").as_bytes())
        .unwrap();
    assert!(
        reply.contains("more than the 1000 one request may") && reply.contains("split"),
        "{reply}"
    );
    assert_eq!(relay.state().unwrap().len(), 1, "nothing of it was added");
}

#[test]
fn a_users_batch_is_held_to_the_policy_and_the_quota_item_by_item() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let group = TestGroup::new().unwrap();
    let alice = TestUser::new(&[&group]).unwrap();
    let bob = TestUser::new(&[&group]).unwrap();
    let cli = UserCli::new().unwrap();
    let allow = format!("{SERVER_IP}/32:60001-60010");
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &[
            "--socket-group",
            &group.name,
            "--user-allow",
            &allow,
            "--user-max-sessions",
            "2",
        ],
    )
    .unwrap();
    let bobs = cli
        .json(&bob, &relay, &["add", "--backend", &backend(60_005)])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = sessions_file(
        &dir,
        &[
            backend(60_001),
            // No allow rule matches.
            backend(22),
            // Bob's backend.
            backend(60_005),
            backend(60_002),
            // Over alice's quota of two.
            backend(60_003),
        ],
    );
    let out = cli
        .run(&alice, &relay, &["add", "--from-file", &file, "--json"])
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let (_, lines) = results(&out.stdout);
    let outcome = |line: u64| lines.iter().find(|(n, _)| *n == line).unwrap().1.clone();
    for line in [1, 4] {
        let session = outcome(line).unwrap_or_else(|e| panic!("line {line}: {e}"));
        assert_eq!(session["owner"]["uid"], alice.uid, "{session}");
    }
    let policy = outcome(2).unwrap_err();
    assert!(policy.contains("no user_allow rule matches"), "{policy}");
    let taken = outcome(3).unwrap_err();
    assert!(taken.contains("another user's session"), "{taken}");
    assert!(
        !taken.contains(bobs["id"].as_str().unwrap()),
        "another user's session is not named: {taken}"
    );
    let quota = outcome(5).unwrap_err();
    assert!(
        quota.contains("the quota of 2") && quota.contains("user_max_sessions"),
        "{quota}"
    );
    // Alice sees her two; bob's is still his.
    let listed = cli.json(&alice, &relay, &["list"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let owners: Vec<u64> = relay
        .sessions()
        .unwrap()
        .iter()
        .map(|s| u64::from(s.owner.uid))
        .collect();
    assert_eq!(
        owners
            .iter()
            .filter(|&&uid| uid == u64::from(bob.uid))
            .count(),
        1
    );
}
