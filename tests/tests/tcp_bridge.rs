//! mosh over TCP through the relay (`run --tcp-port`, `forwarder mosh
//! --tcp`): a client namespace whose network drops every UDP datagram
//! still gets a shell through the bastion, keeps typing on a lossy link,
//! moves to UDP when UDP comes back and to TCP when it goes again; the
//! bridge keeps datagram sizes; hostile streams get nothing while a real
//! session keeps working.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::cmd::SHORT;
use forwarder_testbed::relay::unwrap_document;
use forwarder_testbed::scenario::{roundtrip, wait_for_shell};
use forwarder_testbed::sshd::{SshUser, Sshd};
use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::udp::UdpEcho;
use forwarder_testbed::users::{TestGroup, UserCli};
use forwarder_testbed::{MoshClient, Netns, Relay, SessionInfo, Topology, prereq};

/// The relay's TCP port for mosh (443 in production; any port here).
const TCP_PORT: u16 = 443;
/// The hello's format (forwarder/src/tcpwire.rs).
const MAGIC: &[u8; 4] = b"FWDT";

/// Field order is drop order: the daemon, the sshds, the namespaces, the users.
struct Bed {
    relay: Relay,
    _host_sshd: Sshd,
    _bastion_sshd: Sshd,
    topo: Topology,
    user: SshUser,
    _group: TestGroup,
    /// forwarder where the test user may run it.
    cli: UserCli,
}

impl Bed {
    fn build() -> Result<Self> {
        prereq::require()?;
        let group = TestGroup::new()?;
        let user = SshUser::create(&[&group])?;
        let cli = UserCli::new()?;
        let topo = Topology::client_relay_server()?;
        let bastion_sshd = Sshd::start(&topo.relay, RELAY_CLIENT_IP, 22)?;
        let host_sshd = Sshd::start(&topo.server, SERVER_IP, 22)?;
        for sshd in [&bastion_sshd, &host_sshd] {
            sshd.authorize(user.name(), &user.public_key()?)?;
        }
        user.trust(&[&bastion_sshd, &host_sshd])?;
        let tcp_port = TCP_PORT.to_string();
        let allow = format!("{SERVER_IP}/32");
        let relay = Relay::start(
            &topo.relay,
            &topo.relay_ifaces(),
            &[
                "--socket-group",
                &group.name,
                "--user-allow",
                &allow,
                "--tcp-port",
                &tcp_port,
            ],
        )?;
        Ok(Self {
            relay,
            _host_sshd: host_sshd,
            _bastion_sshd: bastion_sshd,
            topo,
            user,
            _group: group,
            cli,
        })
    }

    fn start_mosh(&self, rest: &str) -> Result<MoshClient> {
        self.start_mosh_after("", rest)
    }

    /// `forwarder mosh REST` in tmux as the user, after the shell words `before`.
    fn start_mosh_after(&self, before: &str, rest: &str) -> Result<MoshClient> {
        let bin = self.cli.bin();
        let words = format!(
            "env LANG=C.UTF-8 LC_ALL=C.UTF-8 {bin} mosh --relay-command {bin} --relay-instance {instance} {rest}",
            bin = bin.display(),
            instance = self.relay.instance()
        );
        // One shell as the user for both commands (no single quotes in them).
        let line = if before.is_empty() {
            self.user.shell_line(&words)
        } else {
            self.user.shell_line(&format!("sh -c '{before}{words}'"))
        };
        MoshClient::start_in_tmux(&self.topo.client, &line)
    }

    /// The flow mosh-server answers now: over the TCP bridge (its client is
    /// the bridge's loopback socket on the relay) or over UDP (the client's
    /// own address).
    fn wait_current(&self, over_tcp: bool, what: &str) -> Result<()> {
        let prefix = if over_tcp {
            "127.0.0.1:".to_string()
        } else {
            format!("{CLIENT_IP}:")
        };
        self.relay
            .wait_until(what, Duration::from_secs(30), |sessions| {
                sessions
                    .iter()
                    .flat_map(|s| &s.flows)
                    .any(|f| f.server_current && f.client.starts_with(&prefix))
                    .then_some(())
            })
    }

    fn tcp_stat(&self, name: &str) -> Result<u64> {
        let stats = self.relay.stats()?;
        stats["tcp"][name]
            .as_u64()
            .with_context(|| format!("stats has no tcp.{name}: {stats}"))
    }
}

/// Drops every UDP datagram into and out of `ns` but loopback's.
fn block_udp(ns: &Netns) -> Result<()> {
    ns.run(
        "nft",
        &["add table inet no_udp; \
           add chain inet no_udp out { type filter hook output priority 0; }; \
           add rule inet no_udp out oifname != \"lo\" meta l4proto udp drop; \
           add chain inet no_udp in { type filter hook input priority 0; }; \
           add rule inet no_udp in iifname != \"lo\" meta l4proto udp drop"],
    )?;
    Ok(())
}

fn unblock_udp(ns: &Netns) -> Result<()> {
    ns.run("nft", &["delete table inet no_udp"])?;
    Ok(())
}

/// Drops `percent`% of the TCP segments to and from the relay's TCP port
/// at random, both ways (this kernel has no netem): TCP retransmits them.
fn lossy_tcp(ns: &Netns, percent: u32) -> Result<()> {
    ns.run(
        "nft",
        &[&format!(
            "add table inet lossy; \
             add chain inet lossy out {{ type filter hook output priority 0; }}; \
             add rule inet lossy out tcp dport {TCP_PORT} numgen random mod 100 < {percent} drop; \
             add chain inet lossy in {{ type filter hook input priority 0; }}; \
             add rule inet lossy in tcp sport {TCP_PORT} numgen random mod 100 < {percent} drop"
        )],
    )?;
    Ok(())
}

/// `forwarder add --json` as root: the session with its TCP token.
fn add_with_token(relay: &Relay, backend: SocketAddr) -> Result<(SessionInfo, String)> {
    let out = relay.verb(&["add", "--backend", &backend.to_string(), "--json"])?;
    let document: serde_json::Value = serde_json::from_str(&out)?;
    let session: SessionInfo = serde_json::from_value(unwrap_document(document)?)?;
    let tcp = session.tcp.clone().context("add --json reports no tcp")?;
    assert_eq!(tcp.port, TCP_PORT, "{session:?}");
    let token = tcp.token.context("add --json reports no token")?;
    Ok((session, token))
}

fn hello(id: &str, token_hex: &str) -> Vec<u8> {
    let mut hello = MAGIC.to_vec();
    hello.push(1);
    hello.push(id.len() as u8);
    hello.extend_from_slice(id.as_bytes());
    for i in 0..token_hex.len() / 2 {
        hello.push(u8::from_str_radix(&token_hex[2 * i..2 * i + 2], 16).unwrap());
    }
    hello
}

/// A stream to the relay's TCP port from inside `ns`.
fn dial(ns: &Netns) -> Result<TcpStream> {
    let stream = ns.within(|| {
        TcpStream::connect((RELAY_CLIENT_IP, TCP_PORT)).context("connecting the TCP port")
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

fn send_frame(stream: &mut TcpStream, datagram: &[u8]) -> Result<()> {
    let mut frame = (datagram.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(datagram);
    stream.write_all(&frame)?;
    Ok(())
}

fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    let mut datagram = vec![0u8; usize::from(u16::from_be_bytes(head))];
    stream.read_exact(&mut datagram)?;
    Ok(datagram)
}

/// The relay sends nothing and closes the stream (a FIN, or a reset when
/// what we sent was left unread): returns how long it was held.
fn refused_silently(mut stream: TcpStream, what: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Ok(started.elapsed()),
        // Closed with our bytes unread: the kernel resets instead of a FIN.
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(started.elapsed()),
        Ok(n) => bail!("{what}: the relay answered {n} bytes: {:?}", &buf[..n]),
        Err(error) => bail!("{what}: the relay neither answered nor closed the stream: {error}"),
    }
}

#[test]
fn forwarder_mosh_over_tcp_gives_a_shell_through_loss_and_moves_between_udp_and_tcp() {
    let bed = Bed::build().unwrap();
    block_udp(&bed.topo.client).unwrap();
    let client = bed
        .start_mosh(&format!("--tcp --via {RELAY_CLIENT_IP} {SERVER_IP}"))
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "tcp").unwrap();
    bed.wait_current(true, "mosh-server to answer the TCP stream's flow")
        .unwrap();
    assert!(bed.tcp_stat("streams_authenticated").unwrap() >= 1);
    let session = bed.relay.sessions().unwrap().remove(0);
    let tcp = session.tcp.clone().expect("list reports the TCP port");
    assert_eq!(tcp.port, TCP_PORT);
    assert!(tcp.token.is_none(), "list never shows the token: {tcp:?}");
    let human = bed.relay.verb(&["list"]).unwrap();
    assert!(!human.contains("token"), "{human}");

    // Typing goes on over a lossy link: TCP retransmits what was dropped.
    lossy_tcp(&bed.topo.client, 3).unwrap();
    for round in 0..5 {
        roundtrip(&client, &format!("lossy{round}")).unwrap();
    }
    bed.topo
        .client
        .run("nft", &["delete table inet lossy"])
        .unwrap();

    // Hostile streams while the session works: a wrong token, a hello
    // never finished, a stream from nobody; none gets a byte back.
    let mut wrong = dial(&bed.topo.client).unwrap();
    wrong
        .write_all(&hello(&session.id, &"00".repeat(32)))
        .unwrap();
    let mut unfinished = dial(&bed.topo.client).unwrap();
    unfinished.write_all(&MAGIC[..3]).unwrap();
    let held = refused_silently(wrong, "a wrong token").unwrap();
    refused_silently(unfinished, "an unfinished hello").unwrap();
    eprintln!("a wrong token's stream was held {held:?} and closed");
    assert!(bed.tcp_stat("refused_bad_hello").unwrap() >= 1);
    assert!(bed.tcp_stat("refused_hello_timeout").unwrap() >= 1);
    roundtrip(&client, "after-hostile").unwrap();

    // UDP comes back: the bridge's probe gets an answer, mosh-server
    // follows the UDP flow, mosh-client's local socket stays.
    unblock_udp(&bed.topo.client).unwrap();
    bed.wait_current(false, "mosh-server to answer the UDP flow once UDP is back")
        .unwrap();
    roundtrip(&client, "udp-again").unwrap();

    // UDP goes again: no answer for a few seconds, and the bridge moves to TCP.
    block_udp(&bed.topo.client).unwrap();
    // mosh-client sends when it has something to say: keep typing.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        client.type_line("true").unwrap();
        if bed
            .wait_current(true, "mosh-server to answer TCP once UDP is gone")
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "never fell back to TCP");
    }
    roundtrip(&client, "tcp-again").unwrap();
    client.type_line("exit").unwrap();
    bed.relay
        .wait_until("the session to be removed", SHORT, |sessions| {
            sessions.is_empty().then_some(())
        })
        .unwrap();

    // Without --tcp, a network that drops UDP from the start falls back by itself.
    let fallback = bed
        .start_mosh(&format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))
        .unwrap();
    wait_for_shell(&fallback).unwrap();
    roundtrip(&fallback, "fell-back").unwrap();
    bed.wait_current(true, "the automatic fallback to answer over TCP")
        .unwrap();
    fallback.type_line("exit").unwrap();
}

#[test]
fn the_bridge_keeps_datagram_sizes_and_closes_on_an_oversize_frame() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let tcp_port = TCP_PORT.to_string();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--tcp-port", &tcp_port],
    )
    .unwrap();
    let backend = SocketAddr::from((SERVER_IP, 7000));
    let echo = UdpEcho::start(&topo.server, backend).unwrap();
    let (session, token) = add_with_token(&relay, backend).unwrap();
    // Only add --json carries the token: not show, list, stats or human output.
    let human = relay.verb(&["show", &session.id]).unwrap();
    assert!(human.contains(&format!("TCP port {TCP_PORT}")), "{human}");
    let human_add = relay
        .verb(&[
            "add",
            "--backend",
            &SocketAddr::from((SERVER_IP, 7002)).to_string(),
        ])
        .unwrap();
    assert!(human_add.contains("TCP port"), "{human_add}");
    for printed in [
        human,
        relay.verb(&["show", &session.id, "--json"]).unwrap(),
        relay.verb(&["list", "--json"]).unwrap(),
        relay.verb(&["stats", "--json"]).unwrap(),
    ] {
        assert!(!printed.contains(&token), "the token was shown: {printed}");
    }

    let mut stream = dial(&topo.client).unwrap();
    stream.write_all(&hello(&session.id, &token)).unwrap();
    let sizes = [
        1usize, 2, 3, 17, 64, 255, 256, 500, 1000, 1300, 1400, 1472, 2000,
    ];
    // All at once: the relay must split the stream back into these datagrams.
    for (i, &size) in sizes.iter().enumerate() {
        let datagram: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
        send_frame(&mut stream, &datagram).unwrap();
    }
    for (i, &size) in sizes.iter().enumerate() {
        let echoed = read_frame(&mut stream)
            .with_context(|| format!("the echo of datagram {i} ({size} bytes)"))
            .unwrap();
        let expected: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
        assert_eq!(echoed.len(), size, "datagram {i} changed size");
        assert_eq!(echoed, expected, "datagram {i} changed");
    }
    assert!(echo.echoed() >= sizes.len() as u64);
    let shown = relay.session(&session.id).unwrap().unwrap();
    assert!(
        shown
            .flows
            .iter()
            .any(|f| f.client.starts_with("127.0.0.1:")),
        "the stream is a flow of its session: {shown:?}"
    );

    // A length no mosh datagram has: the stream is closed, nothing echoed.
    stream.write_all(&60_000u16.to_be_bytes()).unwrap();
    stream.write_all(&[0u8; 512]).unwrap();
    refused_silently(stream, "an oversize frame").unwrap();
    let stats = relay.stats().unwrap();
    assert!(
        stats["tcp"]["closed_bad_frame"].as_u64() >= Some(1),
        "{stats}"
    );
    assert_eq!(
        stats["tcp"]["datagrams_to_server"].as_u64(),
        Some(sizes.len() as u64),
        "{stats}"
    );

    // The session's limit of streams (4): one more is closed unanswered.
    let mut open = vec![];
    for i in 0..3 {
        let mut extra = dial(&topo.client).unwrap();
        extra.write_all(&hello(&session.id, &token)).unwrap();
        let datagram = format!("extra {i}");
        send_frame(&mut extra, datagram.as_bytes()).unwrap();
        assert_eq!(read_frame(&mut extra).unwrap(), datagram.as_bytes());
        open.push(extra);
    }
    let mut again = dial(&topo.client).unwrap();
    again.write_all(&hello(&session.id, &token)).unwrap();
    send_frame(&mut again, b"fourth").unwrap();
    assert_eq!(read_frame(&mut again).unwrap(), b"fourth");
    let mut fifth = dial(&topo.client).unwrap();
    fifth.write_all(&hello(&session.id, &token)).unwrap();
    send_frame(&mut fifth, b"one too many").unwrap();
    refused_silently(fifth, "a fifth stream").unwrap();
    assert!(relay.stats().unwrap()["tcp"]["refused_stream_limit"].as_u64() >= Some(1));
    drop(open);

    // A token of another session (or none) opens nothing.
    let other = relay.add(SocketAddr::from((SERVER_IP, 7001)), &[]).unwrap();
    let mut stranger = dial(&topo.client).unwrap();
    stranger.write_all(&hello(&other.id, &token)).unwrap();
    refused_silently(stranger, "another session's token").unwrap();
    // The first session still works.
    send_frame(&mut again, b"still there").unwrap();
    assert_eq!(read_frame(&mut again).unwrap(), b"still there");
}

#[test]
fn forwarder_mosh_over_tcp_through_an_ssh_port_forward_where_only_ssh_gets_out() {
    let bed = Bed::build().unwrap();
    block_udp(&bed.topo.client).unwrap();
    // The relay's TCP port is closed to this network too: only ssh (22) gets out.
    bed.topo
        .client
        .run(
            "nft",
            &[&format!(
                "add rule inet no_udp out tcp dport {TCP_PORT} drop"
            )],
        )
        .unwrap();
    let forward = format!(
        "ssh -f -N -o ExitOnForwardFailure=yes -L 4443:127.0.0.1:{TCP_PORT} {RELAY_CLIENT_IP} && "
    );
    let client = bed
        .start_mosh_after(
            &forward,
            &format!("--tcp --tcp-connect 127.0.0.1:4443 --via {RELAY_CLIENT_IP} {SERVER_IP}"),
        )
        .unwrap();
    wait_for_shell(&client).unwrap();
    roundtrip(&client, "forwarded").unwrap();
    bed.wait_current(
        true,
        "mosh-server to answer the stream that came through ssh",
    )
    .unwrap();
    client.type_line("exit").unwrap();
}

#[test]
fn the_relay_bounds_its_streams_in_all() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let tcp_port = TCP_PORT.to_string();
    let relay = Relay::start(
        &topo.relay,
        &topo.relay_ifaces(),
        &["--tcp-port", &tcp_port, "--tcp-max-streams", "2"],
    )
    .unwrap();
    let backend = SocketAddr::from((SERVER_IP, 7000));
    let _echo = UdpEcho::start(&topo.server, backend).unwrap();
    let (session, token) = add_with_token(&relay, backend).unwrap();
    // Two streams that say nothing hold both places ...
    let silent: Vec<TcpStream> = (0..2).map(|_| dial(&topo.client).unwrap()).collect();
    relay
        .wait_until("both silent streams to be open", SHORT, |_| {
            let stats = relay.stats().ok()?;
            (stats["tcp"]["streams_open"].as_u64() == Some(2)).then_some(())
        })
        .unwrap();
    // ... so a third, even with the right hello, is closed unanswered.
    let mut third = dial(&topo.client).unwrap();
    third.write_all(&hello(&session.id, &token)).unwrap();
    refused_silently(third, "a stream over the relay's limit").unwrap();
    assert!(relay.stats().unwrap()["tcp"]["refused_stream_limit"].as_u64() >= Some(1));
    // The hello deadline frees their places; then the session is reachable.
    for stream in silent {
        refused_silently(stream, "a stream without a hello").unwrap();
    }
    relay
        .wait_until("the silent streams to be gone", SHORT, |_| {
            let stats = relay.stats().ok()?;
            (stats["tcp"]["streams_open"].as_u64() == Some(0)).then_some(())
        })
        .unwrap();
    let mut stream = dial(&topo.client).unwrap();
    stream.write_all(&hello(&session.id, &token)).unwrap();
    send_frame(&mut stream, b"room again").unwrap();
    assert_eq!(read_frame(&mut stream).unwrap(), b"room again");
}
