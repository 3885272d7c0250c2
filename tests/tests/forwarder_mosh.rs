//! `forwarder mosh --via bastion host` end to end, as a user who is not
//! root anywhere: real sshd in the bastion (relay) and the server
//! namespaces, the client namespace able to reach only the bastion, the
//! bastion's forwarder taking the session from the user through its socket
//! group, and the stock mosh-server and mosh-client at the two ends.

use std::time::Duration;

use forwarder_testbed::cmd::SHORT;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::sshd::SshUser;
use forwarder_testbed::topology::{CLIENT_ROAM_IP, RELAY_CLIENT_IP, RELAY_SERVER_IP, SERVER_IP};

#[path = "support/mosh_bed.rs"]
mod mosh_bed;
use mosh_bed::{
    Bed, CLOSED_SSH_PORT, NO_MOSH_SSH_PORT, key_only_in_the_environment, no_ssh_master_left,
    wait_removed,
};

#[test]
fn forwarder_mosh_via_the_bastion_gives_a_shell_that_roams_and_is_the_users() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    let (client, mosh_client) = bed.shell_via_the_bastion("typed").unwrap();
    no_ssh_master_left(&bed.user).unwrap();

    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = &sessions[0];
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), session.port.to_string()],
        "mosh-client goes to the bastion's address and the session's port"
    );
    assert!(session.has_key, "the key went to the bastion: {session:?}");
    assert_eq!(session.owner.name, bed.user.name(), "{session:?}");
    assert_ne!(session.owner.uid, 0, "{session:?}");
    assert!(
        session.backend.starts_with(&format!("{SERVER_IP}:")),
        "the backend is the server as the bastion reaches it: {session:?}"
    );
    assert_eq!(
        session.idle_timeout_secs,
        3 * 24 * 3600,
        "forwarder mosh's default idle timeout: {session:?}"
    );

    // The laptop changes networks: mosh-client's packets come from a new
    // address, the relay makes a new flow, mosh-server follows it.
    bed.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    bed.relay
        .wait_until(
            "a flow from the new address that the server answers",
            SHORT,
            |sessions| {
                sessions
                    .iter()
                    .flat_map(|s| &s.flows)
                    .any(|f| {
                        f.client.starts_with(&format!("{CLIENT_ROAM_IP}:")) && f.server_current
                    })
                    .then_some(())
            },
        )
        .unwrap();

    // The shell ends, mosh-server and mosh-client with it, and the
    // session goes from the bastion.
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_through_ssh_config_aliases() {
    let bed = Bed::build("10.77.2.0/24").unwrap();
    // -F replaces ~/.ssh/config; ssh hands it to the ProxyJump hop too.
    let config = bed
        .user
        .write_file(
            "aliases",
            &format!(
                "Host jump\n    HostName {RELAY_CLIENT_IP}\nHost box\n    HostName {SERVER_IP}\n"
            ),
        )
        .unwrap();
    let client = bed
        .start_mosh(
            &bed.user,
            &format!("--ssh 'ssh -F {}' --via jump box", config.display()),
        )
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "aliased").unwrap();
    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].owner.name, bed.user.name(), "{sessions:?}");
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_uses_the_bastions_shared_port() {
    const SHARED_PORT: u16 = 4443;
    let shared = SHARED_PORT.to_string();
    let bed = Bed::build_with(&format!("{SERVER_IP}/32"), &["--shared-port", &shared]).unwrap();
    let (client, mosh_client) = bed.shell_via_the_bastion("shared").unwrap();
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), shared],
        "mosh-client goes to the shared port"
    );
    let sessions = bed.relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].shared_port, Some(SHARED_PORT), "{sessions:?}");
    assert!(
        sessions[0]
            .flows
            .iter()
            .any(|f| f.server_current && f.relay_port == Some(SHARED_PORT)),
        "the server answers a flow that came in on the shared port: {sessions:?}"
    );
    bed.topo.client_roam_to(CLIENT_ROAM_IP).unwrap();
    roundtrip(&client, "roamed").unwrap();
    client.type_line("exit").unwrap();
    wait_removed(&bed.relay).unwrap();
}

#[test]
fn forwarder_mosh_without_via_is_plain_mosh() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    // The bastion's own sshd as the host: the one host the client reaches
    // directly. mosh-server's port lies outside the relay's ranges.
    let client = bed
        .start_mosh(&bed.user, &format!("-p 62001 {RELAY_CLIENT_IP}"))
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "direct").unwrap();
    let mosh_client = key_only_in_the_environment(&bed.user).unwrap();
    assert_eq!(
        mosh_client[1..],
        [RELAY_CLIENT_IP.to_string(), "62001".to_string()],
        "mosh-client goes to mosh-server itself, on the port -p asked for"
    );
    assert!(bed.relay.sessions().unwrap().is_empty());
    client.type_line("exit").unwrap();
}

/// Runs `forwarder mosh REST` as `who`; it must fail and say `says`.
fn fails_saying(bed: &Bed, who: &SshUser, rest: &str, says: &[&str]) {
    let out = bed.run_mosh(who, rest).unwrap();
    assert!(
        !out.success(),
        "`forwarder mosh {rest}` succeeded:\n{}{}",
        out.stdout,
        out.stderr
    );
    for needle in says {
        assert!(
            out.stderr.contains(needle),
            "`forwarder mosh {rest}` did not say {needle:?}:\n{}",
            out.stderr
        );
    }
    eprintln!("forwarder mosh {rest}\n  -> {}", out.stderr.trim());
}

#[test]
fn forwarder_mosh_names_the_step_that_failed_and_the_fix() {
    // Users may add sessions only towards a network the server is not in.
    let bed = Bed::build("10.77.9.0/24").unwrap();
    let via = format!("--via {RELAY_CLIENT_IP}");
    // The relay's other address: it answers, but no sshd listens there.
    fails_saying(
        &bed,
        &bed.user,
        &format!("--via {RELAY_SERVER_IP} {SERVER_IP}"),
        &[
            &format!("ssh to the bastion {RELAY_SERVER_IP} failed"),
            "Connection refused",
            "fix: make `ssh",
        ],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("--ssh 'ssh -p {CLOSED_SSH_PORT}' {via} {SERVER_IP}"),
        &[&format!(
            "ssh to the host {SERVER_IP} through the bastion {RELAY_CLIENT_IP} failed"
        )],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("--ssh 'ssh -p {NO_MOSH_SSH_PORT}' {via} {SERVER_IP}"),
        &[
            &format!("no mosh-server on the host {SERVER_IP}"),
            "--server PATH",
        ],
    );
    fails_saying(
        &bed,
        &bed.user,
        &format!("{via} --relay-command /nonexistent/forwarder {SERVER_IP}"),
        &["no forwarder on the bastion", "--relay-command PATH"],
    );
    fails_saying(
        &bed,
        &bed.outsider,
        &format!("{via} {SERVER_IP}"),
        &[
            "forwarder on the bastion",
            "refused your user there",
            &bed.group.name,
        ],
    );
    // The backend policy: the daemon's own words come through.
    fails_saying(
        &bed,
        &bed.user,
        &format!("{via} {SERVER_IP}"),
        &[
            &format!("the bastion {RELAY_CLIENT_IP} refused the session"),
            "exits by itself within a minute",
        ],
    );
    assert!(bed.relay.sessions().unwrap().is_empty());
}

#[test]
fn forwarder_mosh_says_when_udp_never_reached_the_bastion() {
    let bed = Bed::build(&format!("{SERVER_IP}/32")).unwrap();
    // ssh (TCP) gets through, UDP from the laptop does not.
    bed.topo
        .client
        .run(
            "nft",
            &[&format!(
                "add table inet no_udp; \
                 add chain inet no_udp out {{ type filter hook output priority 0; policy accept; }}; \
                 add rule inet no_udp out ip daddr {RELAY_CLIENT_IP} udp dport 60000-60999 drop"
            )],
        )
        .unwrap();
    let client = bed
        .start_mosh(&bed.user, &format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))
        .unwrap();
    // mosh-client gives up by itself when the server never answered.
    client
        .wait_for_screen("no answer over UDP", Duration::from_secs(90))
        .unwrap();
    let screen = client.screen().unwrap();
    eprintln!("{}", screen.trim());
    assert!(
        screen.contains("received nothing from this machine on UDP port"),
        "{screen}"
    );
    wait_removed(&bed.relay).unwrap();
}
