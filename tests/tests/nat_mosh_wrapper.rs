//! The stock `mosh` wrapper end to end, for a server behind a NAT: ssh
//! reaches the server's sshd through a TCP port forward, `forwarder
//! mosh-server` opens the UDP path through the relay, and mosh-client,
//! told by `MOSH IP`, connects to the relay.

use forwarder_testbed::nat::{
    NAT_PUBLIC_IP, NAT_SERVER_IP, NAT_SSH_PORT, NatTopology, random_secret,
};
use forwarder_testbed::scenario::{MOSH_CONNECT_TIMEOUT, roundtrip};
use forwarder_testbed::sshd::Sshd;
use forwarder_testbed::{MoshClient, forwarder_bin, prereq};

#[test]
fn stock_mosh_wrapper_reaches_a_server_behind_nat() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let sshd = Sshd::start(&topo.server, NAT_SERVER_IP, 22).unwrap();
    let secret = sshd.dir().join("punch-secret");
    std::fs::write(&secret, random_secret()).unwrap();
    let relay = topo.start_relay(&secret, &[]).unwrap();

    let server_cmd = format!(
        "{} mosh-server --relay {} --secret-file {}",
        forwarder_bin().unwrap().display(),
        topo.punch_endpoint(),
        secret.display()
    );
    let ssh_cmd = format!(
        "ssh -F /dev/null -p {NAT_SSH_PORT} -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        sshd.client_key().display()
    );
    // Shell-quoted for tmux's `sh -c`: none of these contain single quotes.
    let mosh = format!(
        "env LANG=C.UTF-8 LC_ALL=C.UTF-8 mosh --experimental-remote-ip=remote --ssh='{ssh_cmd}' --server='{server_cmd}' root@{NAT_PUBLIC_IP} -- /bin/sh; sleep 60"
    );
    let started = std::time::Instant::now();
    let client = MoshClient::start_in_tmux(&topo.client, &mosh).unwrap();
    client.wait_for_screen("#", MOSH_CONNECT_TIMEOUT).unwrap();
    roundtrip(&client, "wrapped").unwrap();
    // Informational (no timing assertion): ssh + handshake + mosh + one command.
    eprintln!(
        "`mosh` to a command's output on screen: {:?}",
        started.elapsed()
    );

    let sessions = relay.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(
        sessions[0]
            .flows
            .iter()
            .any(|f| f.server_current && f.fast_path_packets > 0),
        "{sessions:?}"
    );
}
