//! `forwarder mosh-server`: a drop-in for mosh-server on a host behind NAT.
//! It opens the path through the relay with the punch handshake from the
//! UDP port mosh-server will use, starts mosh-server on that port, hands the
//! session key to the relay, and prints what the `mosh` wrapper and
//! mosh-client need, pointing at the relay. With `--gateway` it asks a
//! NAT-PMP/PCP gateway for a mapping instead (see `gateway::client`).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::wire::{self as punch, Message, Nonce, Secret};
use crate::mosh::MoshKey;

pub const LONG_HELP: &str = "\
On a mosh server behind NAT (no public address, or only outbound UDP allowed):
open a path through a forwarder relay, start mosh-server, and print
`MOSH IP <relay address>` and `MOSH CONNECT <relay port> <key>`.

It picks a local UDP port, sends the authenticated punch handshake from it to
the relay (`forwarder run --punch-port PORT --punch-secret-file FILE`), starts
`mosh-server new -p PORT ...` on that port, and hands mosh-server's key to the
relay so the relay can verify roaming clients.

Use it with the stock mosh wrapper, which appends mosh-server's arguments
(`new -c COLORS [-s] [-l NAME=VALUE ...] [-- command]`; -s and -i are dropped
because mosh-server must answer from the address the NAT mapping was made
for, and -p is set here):

  mosh --experimental-remote-ip=remote \\
       --server='forwarder mosh-server --relay RELAY:PORT --secret-file FILE' user@host

Only --experimental-remote-ip=remote lets the `MOSH IP` line choose the
address mosh-client connects to. The default (proxy) mode learns an address
from ssh's connection and the local mode resolves the host name itself; both
then die with \"detected attempt to redefine MOSH IP\".

Or by hand: run it, then `MOSH_KEY=<key> mosh-client <relay address> <relay port>`.

On a LAN host behind a router in gateway mode (`forwarder run --gateway LAN`,
or any NAT-PMP or PCP gateway), `--gateway` replaces --relay and
--secret-file: it asks the gateway (the default route's, or --gateway-addr)
for a UDP mapping, starts mosh-server on a port free on both sides (the same
port when it can), prints `MOSH IP <WAN address>` and `MOSH CONNECT <port>
<key>`, and leaves a helper that renews the mapping while mosh-server runs
and deletes it when mosh-server exits:

  mosh --experimental-remote-ip=remote --server='forwarder mosh-server --gateway' user@host";

#[derive(Args, Debug)]
pub struct WrapperArgs {
    /// The relay's punch endpoint: HOST:PORT, IPV4:PORT or [IPV6]:PORT (the relay's
    /// --punch-port). A name with addresses of both families is tried in getaddrinfo's
    /// order, the next when one gives no answer.
    #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
    pub relay: Option<String>,
    /// File holding the relay's shared punch secret.
    #[arg(long, required_unless_present = "gateway", conflicts_with = "gateway")]
    pub secret_file: Option<PathBuf>,
    /// On a LAN host behind a forwarder router in gateway mode (or any NAT-PMP or PCP
    /// gateway): ask the gateway for a UDP mapping first, start mosh-server on a port free on
    /// both, and print the gateway's WAN address and port.
    #[arg(long)]
    pub gateway: bool,
    /// The gateway's LAN address (default: this host's default route's gateway).
    #[arg(long, requires = "gateway")]
    pub gateway_addr: Option<Ipv4Addr>,
    /// Mapping lifetime to ask the gateway for; it may grant less. A helper left
    /// running renews it while mosh-server runs and deletes it when mosh-server exits.
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration, requires = "gateway")]
    pub gateway_lifetime: Duration,
    /// (Internal) run as the renewing helper for this mapped local port.
    #[arg(long, hide = true, requires = "gateway")]
    pub keep_mapping: Option<u16>,
    /// The mosh-server program to start.
    #[arg(long, default_value = "mosh-server")]
    pub mosh_server: String,
    /// Give up if the handshake has not finished within this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// mosh-server's arguments, as the stock mosh wrapper appends them:
    /// `new -c COLORS [-s] [-l NAME=VALUE ...] [-- command]`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub mosh_args: Vec<String>,
}

/// What the relay granted.
#[derive(Debug)]
pub struct Path {
    pub local_port: u16,
    /// The relay's punch endpoint that answered (its family is the path's).
    pub relay: SocketAddr,
    pub relay_addr: IpAddr,
    pub client_port: u16,
    pub upstream_port: u16,
    pub token: punch::Token,
    pub seen: SocketAddr,
}

/// mosh-server's arguments with `new` removed, `-p` replaced by `port`, and
/// the address-binding options dropped (see [`LONG_HELP`]).
pub fn mosh_server_args(args: &[String], port: u16) -> anyhow::Result<Vec<String>> {
    let mut rest = args;
    if rest.first().is_some_and(|a| a == "new") {
        rest = &rest[1..];
    }
    let mut out = vec!["new".to_string(), "-p".to_string(), port.to_string()];
    let mut words = rest.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--" => {
                out.push(word.clone());
                out.extend(words.by_ref().cloned());
            }
            "-s" => {}
            "-i" | "-p" => {
                words
                    .next()
                    .with_context(|| format!("mosh-server option {word} needs a value"))?;
            }
            w if (w.starts_with("-i") || w.starts_with("-p")) && w.len() > 2 => {}
            _ => out.push(word.clone()),
        }
    }
    Ok(out)
}

pub fn main(args: WrapperArgs) -> anyhow::Result<()> {
    if args.gateway {
        return gateway_main(args);
    }
    let (Some(relay), Some(secret_file)) = (&args.relay, &args.secret_file) else {
        bail!("give --relay HOST:PORT and --secret-file FILE (or --gateway)");
    };
    let started = Instant::now();
    let deadline = started + args.timeout;
    let secret = Secret::read(secret_file)?;
    let relays = resolve(relay)?;
    let (path, relay) = open_any_path(&relays, &secret, deadline)?;
    let mosh_args = mosh_server_args(&args.mosh_args, path.local_port)?;
    let mosh_args = bind_family(mosh_args, relay);
    let (port, key) = start_mosh_server(&args.mosh_server, &mosh_args, path.local_port)?;
    let key_socket = UdpSocket::bind(unspecified(relay, 0)).context("binding a UDP socket")?;
    let message = Message::Key {
        token: path.token,
        client_port: path.client_port,
        key: key.bytes(),
    };
    exchange(
        &key_socket,
        relay,
        &secret,
        &message,
        deadline.max(Instant::now() + Duration::from_secs(5)),
        "the session key",
    )
    .with_context(|| {
        format!("mosh-server runs on port {port}, but the relay never confirmed its key")
    })?;
    eprintln!(
        "forwarder: mosh-server on UDP {port} is reachable through the relay at {} (the relay sees this host as {}); ready after {} ms",
        SocketAddr::new(path.relay_addr, path.client_port),
        path.seen,
        started.elapsed().as_millis()
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(
        connect_lines(
            std::io::stdin().is_terminal(),
            path.relay_addr,
            path.client_port,
            &key.to_base64(),
        )
        .as_bytes(),
    )?;
    stdout.flush()?;
    Ok(())
}

/// `--gateway`: map a port on the gateway (NAT-PMP or PCP), start
/// mosh-server on the mapped local port, print the gateway's WAN address
/// and port, and leave a helper renewing the mapping while mosh-server runs.
fn gateway_main(args: WrapperArgs) -> anyhow::Result<()> {
    use crate::gateway::client;
    let started = Instant::now();
    let gateway = match args.gateway_addr {
        Some(address) => address,
        None => client::default_gateway()?,
    };
    let lifetime = u32::try_from(args.gateway_lifetime.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    if let Some(port) = args.keep_mapping {
        return keep_mapping(gateway, port, lifetime);
    }
    // The same port on both sides when it is free on both; mosh-server's own
    // range starts at 60001.
    let first = client::free_local_port(60001)?;
    let mut mapping = client::map(gateway, first, first, lifetime, args.timeout)?;
    if mapping.external_port != first
        && client::free_local_port(mapping.external_port)? == mapping.external_port
    {
        let external = mapping.external_port;
        client::map(gateway, first, 0, 0, args.timeout)?;
        mapping = client::map(gateway, external, external, lifetime, args.timeout)?;
    }
    let mosh_args = mosh_server_args(&args.mosh_args, mapping.internal_port)?;
    let started_server = start_mosh_server(&args.mosh_server, &mosh_args, mapping.internal_port);
    let (port, key) = match started_server {
        Ok(started) => started,
        Err(error) => {
            let _ = client::map(gateway, mapping.internal_port, 0, 0, args.timeout);
            return Err(error);
        }
    };
    spawn_keeper(gateway, port, &args)?;
    eprintln!(
        "forwarder: mosh-server on UDP {port} is reachable at {}:{} through the gateway {gateway} ({}, lifetime {} s, renewed while it runs); ready after {} ms",
        mapping.external_address,
        mapping.external_port,
        mapping.protocol,
        mapping.lifetime,
        started.elapsed().as_millis()
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(
        connect_lines(
            std::io::stdin().is_terminal(),
            mapping.external_address.into(),
            mapping.external_port,
            &key.to_base64(),
        )
        .as_bytes(),
    )?;
    stdout.flush()?;
    Ok(())
}

/// Starts the renewing helper detached (own session, no terminal, stdio
/// closed), so the stock `mosh` wrapper's ssh sees this program end.
fn spawn_keeper(gateway: Ipv4Addr, port: u16, args: &WrapperArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let program =
        std::env::current_exe().context("finding this program to start the mapping's helper")?;
    Command::new(program)
        .args([
            "mosh-server",
            "--gateway",
            "--gateway-addr",
            &gateway.to_string(),
        ])
        .arg("--gateway-lifetime")
        .arg(humantime::format_duration(args.gateway_lifetime).to_string())
        .args(["--keep-mapping", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the helper that renews the gateway mapping")?;
    Ok(())
}

/// The helper: renews the mapping of `port` at half its lifetime while
/// mosh-server holds the port, deletes it once the port is free (mosh-server
/// exited).
fn keep_mapping(gateway: Ipv4Addr, port: u16, lifetime: u32) -> anyhow::Result<()> {
    use crate::gateway::client;
    let mut granted = lifetime;
    loop {
        let pause = Duration::from_secs(u64::from(granted / 2).clamp(1, 3600));
        let mut waited = Duration::ZERO;
        // Checks every 2 s whether mosh-server still holds its port.
        while waited < pause {
            std::thread::sleep(Duration::from_secs(2));
            waited += Duration::from_secs(2);
            if UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
                let _ = client::map(gateway, port, 0, 0, Duration::from_secs(5));
                return Ok(());
            }
        }
        if let Ok(mapping) = client::map(gateway, port, port, lifetime, Duration::from_secs(10)) {
            granted = mapping.lifetime;
        }
    }
}

/// What goes to stdout, byte for byte what stock mosh-server 1.4.0 prints
/// (`MOSH CONNECT <port> <key>\n`, LF only) with the stock `mosh` wrapper's
/// own `MOSH IP <addr>\n` line before it. Scripts that `read` the line get a
/// 22-letter key, not one ending in CR. Like mosh-server, and for the same
/// reason (typeahead echoed on a pty would share the line), an empty line
/// comes first when stdin is a terminal: mosh-server's `puts("\r\n")`.
/// An IPv6 relay address goes without brackets: the wrapper hands the word
/// to mosh-client as its host, which getaddrinfo takes as a numeric IPv6.
pub fn connect_lines(stdin_is_terminal: bool, relay: IpAddr, port: u16, key: &str) -> String {
    let bodge = if stdin_is_terminal { "\r\n\n" } else { "" };
    format!("{bodge}MOSH IP {relay}\nMOSH CONNECT {port} {key}\n")
}

/// The relay's punch endpoints, in getaddrinfo's order (RFC 6724: the
/// family this host prefers first).
fn resolve(relay: &str) -> anyhow::Result<Vec<SocketAddr>> {
    if !relay.starts_with('[') && relay.matches(':').count() > 1 {
        let (host, port) = relay.rsplit_once(':').expect("has colons");
        bail!(
            "--relay {relay:?} is an IPv6 address without brackets, which cannot be told from its port: write [{host}]:{port}"
        );
    }
    let addresses: Vec<SocketAddr> = relay
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the relay {relay:?}: give HOST:PORT, IPV4:PORT or [IPV6]:PORT, the port being the relay's --punch-port"))?
        .collect();
    let mut unique = Vec::new();
    for address in addresses {
        if !unique.contains(&address) {
            unique.push(address);
        }
    }
    if unique.is_empty() {
        bail!("the relay {relay:?} resolves to no address");
    }
    Ok(unique)
}

/// The unspecified address of `relay`'s family, for a socket that talks to it.
fn unspecified(relay: SocketAddr, port: u16) -> SocketAddr {
    match relay {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    }
}

/// mosh-server binds the first address getaddrinfo gives for "any", which
/// may be the other family than the path's: over IPv6 it is told `-i ::`
/// (a dual-stack socket), so it answers from the port the NAT mapping was
/// made for in the family it was made in.
fn bind_family(mut mosh_args: Vec<String>, relay: SocketAddr) -> Vec<String> {
    if relay.is_ipv6() {
        // After `new`, before the other options (and any `--`).
        mosh_args.splice(1..1, ["-i".to_string(), "::".to_string()]);
    }
    mosh_args
}

/// Punches to each of the relay's endpoints in turn until one answers,
/// from a fresh socket of its family each time; returns the path and the
/// endpoint. The socket is closed: mosh-server must own its port.
fn open_any_path(
    relays: &[SocketAddr],
    secret: &Secret,
    deadline: Instant,
) -> anyhow::Result<(Path, SocketAddr)> {
    let mut failures = Vec::new();
    for (index, relay) in relays.iter().copied().enumerate() {
        // Every endpoint left gets a share of the time left.
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / u32::try_from(relays.len() - index).unwrap_or(1);
        let until = if index + 1 == relays.len() {
            deadline
        } else {
            Instant::now() + share
        };
        let socket = match UdpSocket::bind(unspecified(relay, 0)) {
            Ok(socket) => socket,
            Err(error) => {
                failures.push(format!(
                    "{relay}: binding a local UDP port for mosh-server: {error}"
                ));
                continue;
            }
        };
        match open_path(&socket, relay, secret, until) {
            Ok(path) => return Ok((path, relay)),
            Err(error) if relays.len() == 1 => return Err(error),
            Err(error) => failures.push(format!("{relay}: {error:#}")),
        }
    }
    bail!(
        "no path through the relay at any of its addresses: {}",
        failures.join("; ")
    )
}

/// Allocate from `socket`'s port, then Bind from it to the session's Q.
pub fn open_path(
    socket: &UdpSocket,
    relay: SocketAddr,
    secret: &Secret,
    deadline: Instant,
) -> anyhow::Result<Path> {
    let local_port = socket.local_addr()?.port();
    let Message::Allocated { relay_addr, client_port, upstream_port, token, .. } =
        exchange(socket, relay, secret, &Message::Allocate, deadline, "the punch request").with_context(|| {
            format!("no session from the relay {relay} (is it running with --punch-port {}? may this host send UDP to it?)", relay.port())
        })?
    else {
        unreachable!("exchange checks the answer's kind")
    };
    let upstream = SocketAddr::new(relay.ip(), upstream_port);
    let Message::Bound { seen, .. } = exchange(socket, upstream, secret, &Message::Bind { token }, deadline, "the bind").with_context(|| {
        format!(
            "the relay answered on {relay} but nothing came back from {upstream}: the NAT or a firewall drops \
             the relay's answers from that port (allow UDP to and from the relay's --flow-ports)"
        )
    })?
    else {
        unreachable!("exchange checks the answer's kind")
    };
    Ok(Path {
        local_port,
        relay,
        relay_addr,
        client_port,
        upstream_port,
        token,
        seen,
    })
}

/// Sends `message` to `to` until an authenticated answer to it arrives from
/// there, resending (each time with a fresh nonce) after growing pauses.
fn exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    secret: &Secret,
    message: &Message,
    deadline: Instant,
    what: &str,
) -> anyhow::Result<Message> {
    let mut sent: Vec<Nonce> = Vec::new();
    let mut pause = Duration::from_millis(250);
    let mut buf = [0u8; punch::MAX_MESSAGE + 64];
    let started = Instant::now();
    while Instant::now() < deadline {
        let (bytes, nonce) = punch::seal(secret, message);
        socket
            .send_to(&bytes, to)
            .with_context(|| format!("sending {what} to {to}"))?;
        sent.push(nonce);
        let resend_at = (Instant::now() + pause).min(deadline);
        pause = (pause * 2).min(Duration::from_secs(1));
        while let Some(left) = resend_at
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            socket.set_read_timeout(Some(left))?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(received) => received,
                // Timeouts, and ICMP port-unreachable from a relay without a punch port.
                Err(_) => continue,
            };
            if !same_endpoint(from, to) {
                continue;
            }
            let Ok(envelope) = punch::open(secret, &buf[..len]) else {
                continue;
            };
            match envelope.message {
                Message::Refused { request, reason } if sent.contains(&request) => {
                    bail!("the relay refused {what}: {reason}")
                }
                Message::Allocated { request, .. }
                | Message::Bound { request, .. }
                | Message::KeyAccepted { request }
                    if sent.contains(&request) && answers(message, &envelope.message) =>
                {
                    return Ok(envelope.message);
                }
                _ => {}
            }
        }
    }
    bail!(
        "no answer to {what} from {to} after {} tries in {:.1} s",
        sent.len(),
        started.elapsed().as_secs_f64()
    )
}

/// Whether an answer from `from` comes from `to` (a dual-stack socket
/// reports an IPv4 peer as `::ffff:a.b.c.d`).
fn same_endpoint(from: SocketAddr, to: SocketAddr) -> bool {
    let plain = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    };
    plain(from) == plain(to)
}

fn answers(request: &Message, answer: &Message) -> bool {
    matches!(
        (request, answer),
        (Message::Allocate, Message::Allocated { .. })
            | (Message::Bind { .. }, Message::Bound { .. })
            | (Message::Key { .. }, Message::KeyAccepted { .. })
    )
}

/// Runs mosh-server and reads its `MOSH CONNECT <port> <key>`. mosh-server
/// detaches a child that may keep stdout open, so read lines, not to EOF.
fn start_mosh_server(program: &str, args: &[String], port: u16) -> anyhow::Result<(u16, MoshKey)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {program:?} (is mosh installed? --mosh-server names another program)"
            )
        })?;
    let stdout = child.stdout.take().expect("piped");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let connect = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.trim().strip_prefix("MOSH CONNECT ") {
                    break rest.to_string();
                }
                if !line.trim().is_empty() {
                    eprintln!("{}", line.trim_end());
                }
            }
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                bail!(
                    "{program} printed no `MOSH CONNECT` line (exit status {status:?}); its errors are above"
                );
            }
        }
    };
    let _ = child.wait();
    let mut words = connect.split_whitespace();
    let printed_port: u16 = words
        .next()
        .and_then(|p| p.parse().ok())
        .context("malformed MOSH CONNECT port")?;
    if printed_port != port {
        bail!(
            "mosh-server took port {printed_port} instead of {port}: the NAT hole is on {port}; is this mosh-server ignoring -p?"
        );
    }
    let key = MoshKey::parse(words.next().context("MOSH CONNECT without a key")?)?;
    Ok((printed_port, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn passes_the_stock_wrappers_arguments_through() {
        let stock = words("new -c 256 -s -l LANG=C.UTF-8 -l LC_ALL=C -- tmux -s -p x");
        assert_eq!(
            mosh_server_args(&stock, 40000).unwrap(),
            words("new -p 40000 -c 256 -l LANG=C.UTF-8 -l LC_ALL=C -- tmux -s -p x")
        );
        let bound = words("new -i 10.0.0.1 -p 60001 -p60002 -v");
        assert_eq!(mosh_server_args(&bound, 1).unwrap(), words("new -p 1 -v"));
        assert_eq!(mosh_server_args(&[], 7).unwrap(), words("new -p 7"));
        assert!(mosh_server_args(&words("new -i"), 7).is_err());
    }

    #[test]
    fn prints_lf_lines_like_mosh_server() {
        let key = "wkhKAYyunVx3eQM/YhsN/g";
        let relay = Ipv4Addr::new(203, 0, 113, 1).into();
        assert_eq!(
            connect_lines(false, relay, 60001, key),
            "MOSH IP 203.0.113.1\nMOSH CONNECT 60001 wkhKAYyunVx3eQM/YhsN/g\n"
        );
        // mosh's wrapper takes `MOSH IP (\S+)` as mosh-client's host: a bare IPv6.
        assert_eq!(
            connect_lines(false, "2001:db8::1".parse().unwrap(), 60001, key),
            "MOSH IP 2001:db8::1\nMOSH CONNECT 60001 wkhKAYyunVx3eQM/YhsN/g\n"
        );
        assert_eq!(
            connect_lines(true, relay, 60001, key),
            "\r\n\nMOSH IP 203.0.113.1\nMOSH CONNECT 60001 wkhKAYyunVx3eQM/YhsN/g\n"
        );
    }

    #[test]
    fn an_ipv6_path_binds_mosh_server_dual_stack_and_endpoints_compare_across_mapping() {
        let args = words("new -p 40000 -c 8 -- sh");
        let v6: SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
        let v4: SocketAddr = "203.0.113.1:7000".parse().unwrap();
        assert_eq!(
            bind_family(args.clone(), v6),
            words("new -i :: -p 40000 -c 8 -- sh")
        );
        assert_eq!(bind_family(args.clone(), v4), args);
        assert!(same_endpoint(
            "[::ffff:203.0.113.1]:7000".parse().unwrap(),
            v4
        ));
        assert!(!same_endpoint("203.0.113.1:7001".parse().unwrap(), v4));
        assert!(same_endpoint(v6, v6));
        assert_eq!(unspecified(v6, 0).to_string(), "[::]:0");
        assert_eq!(
            resolve("[2001:db8::1]:7000").unwrap(),
            vec![v6],
            "an IPv6 literal in brackets"
        );
        assert!(
            resolve("2001:db8::1:7000").is_err(),
            "a bare IPv6 is no HOST:PORT"
        );
    }

    #[test]
    fn clap_keeps_the_command_separator() {
        use clap::Parser;
        let argv =
            words("forwarder mosh-server --relay r:1 --secret-file f new -c 8 -s -- sh -c x");
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        let crate::cli::Verb::MoshServer(args) = cli.verb else {
            panic!()
        };
        assert_eq!(args.mosh_args, words("new -c 8 -s -- sh -c x"));
    }
}
