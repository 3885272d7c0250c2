//! The control plane refuses bad input with a clear message and changes
//! nothing: malformed addresses, out-of-range ports, unknown ids, duplicate
//! sessions, oversized or malformed requests, and callers who are not root.

use std::net::{SocketAddr, SocketAddrV4};

use forwarder_testbed::cmd::{self, Output};
use forwarder_testbed::topology::SERVER_IP;
use forwarder_testbed::{Relay, Topology};

/// Runs `attempt`, which yields `Err(message)` when the control plane
/// refused and `Ok(output)` when it accepted; asserts a refusal that
/// mentions every one of `words` (case-insensitive) and left the relay's
/// state as it was.
fn assert_refused(
    relay: &Relay,
    what: &str,
    words: &[&str],
    attempt: impl FnOnce() -> Result<String, String>,
) {
    let before = relay.state().unwrap();
    let message = match attempt() {
        Ok(output) => panic!("{what} was accepted: {output}"),
        Err(message) => message,
    };
    let lower = message.to_lowercase();
    for word in words {
        assert!(
            lower.contains(&word.to_lowercase()),
            "{what}: expected {word:?} in: {message}"
        );
    }
    assert_eq!(relay.state().unwrap(), before, "{what} changed state");
    println!("refused {what}: {message}");
}

/// How a CLI run ended, as [`assert_refused`] wants it.
/// stdout on success; on failure what the user is told: stderr, or under
/// `--json` the error document on stdout.
fn outcome(out: Output) -> Result<String, String> {
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(format!("{}{}", out.stderr.trim(), out.stdout.trim()))
    }
}

/// A CLI verb (as root) must be refused.
fn refused(relay: &Relay, args: &[&str], words: &[&str]) {
    let what = format!("`forwarder {}`", args.join(" "));
    assert_refused(relay, &what, words, || {
        outcome(relay.try_verb(args).unwrap())
    });
}

/// Raw bytes on the control socket must get one JSON error object.
fn refused_raw(relay: &Relay, what: &str, request: &[u8], words: &[&str]) {
    assert_refused(relay, what, words, || {
        let reply = relay.raw_request(request).unwrap();
        let value: serde_json::Value = serde_json::from_str(reply.trim()).unwrap_or_else(|e| {
            panic!("{what}: the reply is not one JSON document ({e}): {reply:?}")
        });
        // A refusal is an `error` reply, or `not_found` for a session that
        // does not exist (the CLI gives it its own exit code).
        match value["error"].as_str().or(value["not_found"].as_str()) {
            Some(message) => Err(message.to_string()),
            None => Ok(value.to_string()),
        }
    });
}

#[test]
fn control_plane_refuses_bad_input_and_changes_nothing() {
    let topo = Topology::client_relay_server().unwrap();
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    let backend = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 60_001));
    let session = relay.add(backend, &["--port", "60005"]).unwrap();
    let initial = relay.state().unwrap();
    assert_eq!(initial.len(), 1);

    // Malformed backend addresses.
    for bad in [
        "not-an-address",
        "10.77.2.2",
        "10.77.2.2:",
        "300.1.2.3:60001",
        "",
    ] {
        refused(
            &relay,
            &["add", "--backend", bad],
            &["malformed backend address", "IPV4:PORT"],
        );
    }
    // Well-formed, but not (yet) what a backend can be: each says so.
    refused(
        &relay,
        &["add", "--backend", "[::1]:60001"],
        &["loopback", "forward to itself"],
    );
    refused(
        &relay,
        &["add", "--backend", "server:60001"],
        &["host names", "not supported yet"],
    );
    refused(
        &relay,
        &["add", "--backend", "10.77.2.2:70000"],
        &["port 70000 is out of range"],
    );
    refused(&relay, &["add", "--backend", "10.77.2.2:0"], &["port 0"]);
    for not_unicast in ["0.0.0.0:60001", "255.255.255.255:60001", "224.0.0.1:60001"] {
        refused(
            &relay,
            &["add", "--backend", not_unicast],
            &["not a unicast address"],
        );
    }
    refused(
        &relay,
        &["add", "--backend", "192.0.2.1:60001"],
        &["no route to backend"],
    );

    // Ports out of range: not a u16, or outside the daemon's --ports.
    refused(
        &relay,
        &["add", "--backend", "10.77.2.2:60002", "--port", "70000"],
        &["invalid value", "--port"],
    );
    refused(
        &relay,
        &["add", "--backend", "10.77.2.2:60002", "--port=-1"],
        &["--port"],
    );
    for outside in ["0", "59999", "61000", "65535"] {
        refused(
            &relay,
            &["add", "--backend", "10.77.2.2:60002", "--port", outside],
            &[outside],
        );
    }
    refused(
        &relay,
        &[
            "add",
            "--backend",
            "10.77.2.2:60002",
            "--idle-timeout",
            "0s",
        ],
        &["idle timeout of 0"],
    );
    refused(
        &relay,
        &[
            "add",
            "--backend",
            "10.77.2.2:60002",
            "--idle-timeout",
            "soon",
        ],
        &["--idle-timeout"],
    );

    // Duplicates: the same backend, or a port already in use.
    refused(
        &relay,
        &["add", "--backend", &backend.to_string()],
        &["already forwards", &session.id],
    );
    refused(
        &relay,
        &["add", "--backend", "10.77.2.2:60002", "--port", "60005"],
        &["60005"],
    );

    // Unknown ids and ports.
    for unknown in ["deadbeef", "60006", "65536", "../../etc/passwd", "", "0"] {
        refused(&relay, &["remove", unknown], &["no session"]);
    }

    // Instance names become paths: refused before any socket is touched.
    for (args, instance) in [
        (&["list"][..], "../etc"),
        (&["stats"][..], "a/b"),
        (&["remove", "x"][..], ""),
    ] {
        let what = format!("`forwarder {}` for instance {instance:?}", args.join(" "));
        assert_refused(&relay, &what, &["instance name"], || {
            let mut command = relay.cli();
            command.args(args).args(["--instance", instance]);
            outcome(cmd::run(&mut command, cmd::SHORT).unwrap())
        });
    }

    // Callers without permission: every verb, as nobody.
    let verbs: [&[&str]; 5] = [
        &["list"],
        &["stats"],
        &["add", "--backend", "10.77.2.2:60002"],
        &["remove", &session.id],
        &["list", "--json"],
    ];
    for args in verbs {
        let what = format!("`forwarder {}` as nobody", args.join(" "));
        assert_refused(
            &relay,
            &what,
            &[
                "permission denied",
                "members of group",
                "adduser USER forwarder",
            ],
            || outcome(relay.try_verb_unprivileged(args).unwrap()),
        );
    }
    let meta = std::fs::metadata(relay.socket_path()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660,
        "the control socket is root's and its group's"
    );
    let group = nix::unistd::Group::from_name(forwarder_testbed::prereq::SOCKET_GROUP)
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta)
        ),
        (0, group.gid.as_raw()),
        "the control socket belongs to root:forwarder"
    );

    // Raw requests on the socket.
    refused_raw(&relay, "junk", b"garbage\n", &["malformed request"]);
    refused_raw(&relay, "empty line", b"\n", &["malformed request"]);
    refused_raw(&relay, "nothing at all", b"", &["malformed request"]);
    refused_raw(
        &relay,
        "invalid UTF-8",
        b"{\"verb\":\"list\xff\xfe\"}\n",
        &[],
    );
    refused_raw(&relay, "no verb", b"{}\n", &["malformed request"]);
    refused_raw(
        &relay,
        "unknown verb",
        b"{\"verb\":\"format_disk\"}\n",
        &["malformed request", "unknown variant"],
    );
    refused_raw(
        &relay,
        "unknown field",
        b"{\"verb\":\"list\",\"all\":true}\n",
        &["unknown field"],
    );
    refused_raw(
        &relay,
        "add with an extra field",
        b"{\"verb\":\"add\",\"backend\":\"10.77.2.2:60002\",\"evil\":1}\n",
        &["unknown field"],
    );
    refused_raw(
        &relay,
        "port beyond u16",
        b"{\"verb\":\"add\",\"backend\":\"10.77.2.2:60002\",\"port\":70000}\n",
        &["malformed request"],
    );
    refused_raw(
        &relay,
        "negative port",
        b"{\"verb\":\"add\",\"backend\":\"10.77.2.2:60002\",\"port\":-1}\n",
        &["malformed request"],
    );
    refused_raw(
        &relay,
        "backend not a string",
        b"{\"verb\":\"add\",\"backend\":167641602}\n",
        &["malformed request"],
    );
    refused_raw(
        &relay,
        "zero idle timeout",
        b"{\"verb\":\"add\",\"backend\":\"10.77.2.2:60002\",\"idle_timeout_secs\":0}\n",
        &["idle timeout of 0"],
    );
    refused_raw(
        &relay,
        "remove without target",
        b"{\"verb\":\"remove\"}\n",
        &["missing field"],
    );
    refused_raw(
        &relay,
        "remove unknown",
        b"{\"verb\":\"remove\",\"target\":\"cafe0000\"}\n",
        &["no session"],
    );
    let mut oversized = b"{\"verb\":\"add\",\"backend\":\"".to_vec();
    oversized.extend(std::iter::repeat_n(b'1', 100_000));
    oversized.extend_from_slice(b"\"}\n");
    refused_raw(&relay, "oversized request", &oversized, &["larger than"]);
    let mut endless = vec![b' '; 200_000];
    endless.extend_from_slice(b"{\"verb\":\"list\"}\n");
    refused_raw(&relay, "oversized whitespace", &endless, &["larger than"]);

    // After all that, the daemon still works and holds exactly what it held.
    assert_eq!(relay.state().unwrap(), initial);
    let reply = relay.raw_request(b"{\"verb\":\"list\"}\n").unwrap();
    assert!(
        reply.contains(&session.id),
        "a well-formed raw request still works: {reply}"
    );
    relay.remove(&session.id).unwrap();
    assert!(relay.state().unwrap().is_empty());
}
