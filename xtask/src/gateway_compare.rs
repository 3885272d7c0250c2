//! `cargo xtask gateway-compare`: the same pieces against forwarder's
//! gateway mode and against miniupnpd (Debian's, nftables backend) on the
//! same WAN-router-LAN topology, printed side by side as a Markdown table
//! (docs/BENCHMARKS.md records a run). Each piece runs the real client:
//! natpmpc -a, upnpc -a, stock mosh from the WAN host through each
//! mapping, mosh from a second LAN host to the WAN address (hairpin), a
//! NAT-PMP request from the WAN side, and a secure-mode refusal.

use std::net::SocketAddrV4;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_testbed::gateway::*;
use forwarder_testbed::relay::Relay;
use forwarder_testbed::scenario::roundtrip;
use forwarder_testbed::{MoshClient, MoshServer, Netns};

use crate::{build_forwarder, prereq};

/// How long mosh gets to show the shell before the piece counts as failed.
const SHELL_TIMEOUT: Duration = Duration::from_secs(15);

const MINIUPNPD_RULESET: &str = "\
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

/// miniupnpd in the router namespace, in the foreground; killed on drop.
struct Miniupnpd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Miniupnpd {
    fn start(router: &Netns) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fwd-miniupnpd-")
            .tempdir()?;
        let ruleset = dir.path().join("miniupnpd.nft");
        std::fs::write(&ruleset, MINIUPNPD_RULESET)?;
        router.run("nft", &["-f", ruleset.to_str().context("path")?])?;
        let conf = dir.path().join("miniupnpd.conf");
        std::fs::write(
            &conf,
            format!(
                "ext_ifname={WAN_IF}\nlistening_ip={LAN_IF}\nhttp_port=5000\nenable_natpmp=yes\nenable_upnp=yes\n\
                 secure_mode=yes\nsystem_uptime=no\nuuid=dd88b7b1-78d5-44a6-99db-8c50d054acb0\n\
                 upnp_table_name=filter\nupnp_nat_table_name=filter\n\
                 allow 1024-65535 10.77.2.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("miniupnpd.log"))?;
        let child = router
            .exec("/usr/sbin/miniupnpd")
            .arg("-d")
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(dir.path().join("miniupnpd.pid"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting miniupnpd (apt-get install miniupnpd-nftables)")?;
        // It answers once its sockets are bound.
        std::thread::sleep(Duration::from_secs(1));
        Ok(Self { child, _dir: dir })
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Row {
    natpmpc: String,
    mosh_natpmp: String,
    upnpc: String,
    mosh_upnp: String,
    hairpin: String,
    wan_side: String,
    secure: String,
    path: String,
}

fn shell(ns: &Netns, port: u16, key: &str, prefix: &str) -> (String, Option<MoshClient>) {
    let started = Instant::now();
    let client = match MoshClient::start(ns, ROUTER_WAN_IP, port, key) {
        Ok(client) => client,
        Err(error) => return (format!("no: {error:#}"), None),
    };
    if client.wait_for_screen("$", SHELL_TIMEOUT).is_err() {
        return (
            format!("no shell within {} s", SHELL_TIMEOUT.as_secs()),
            None,
        );
    }
    let shown = started.elapsed();
    match roundtrip(&client, prefix) {
        Ok(_) => (
            format!("yes (shell after {} ms)", shown.as_millis()),
            Some(client),
        ),
        Err(_) => ("shell shown, no echo".into(), None),
    }
}

fn pieces(topo: &GatewayTopology) -> Result<(Row, Vec<MoshClient>)> {
    let mut row = Row::default();
    let mut clients = Vec::new();
    let first = MoshServer::start(&topo.lan1, LAN1_IP, 60001)?;
    let started = Instant::now();
    match natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60001, first.port, 3600) {
        Ok(mapping) => {
            row.natpmpc = format!(
                "yes: {}:{} ({} ms)",
                mapping.public_ip.map_or("?".into(), |ip| ip.to_string()),
                mapping.public_port,
                started.elapsed().as_millis()
            );
            let (text, client) = shell(&topo.wan, mapping.public_port, &first.key, "pmp");
            row.mosh_natpmp = text;
            clients.extend(client);
        }
        Err(error) => {
            row.natpmpc = format!("no: {}", first_line(&format!("{error:#}")));
            row.mosh_natpmp = "-".into();
        }
    }
    // Hairpin on a server of its own: mosh-server answers one client per key.
    let third = MoshServer::start(&topo.lan1, LAN1_IP, 60004)?;
    row.hairpin = match natpmpc_map(&topo.lan1, ROUTER_LAN_IP, 60004, third.port, 3600) {
        Ok(mapping) => {
            let (text, client) = shell(&topo.lan2, mapping.public_port, &third.key, "hairpin");
            clients.extend(client);
            text
        }
        Err(error) => format!("no mapping: {}", first_line(&format!("{error:#}"))),
    };
    let second = MoshServer::start(&topo.lan1, LAN1_IP, 60002)?;
    let port = second.port.to_string();
    let started = Instant::now();
    let added = upnpc(
        &topo.lan1,
        &["-a", &LAN1_IP.to_string(), &port, "60002", "UDP", "3600"],
    )?;
    let elapsed = started.elapsed().as_millis();
    if added.contains("is redirected to internal") {
        let valid = if added.contains("Found valid IGD") {
            "valid IGD"
        } else {
            "IGD found, not valid"
        };
        row.upnpc = format!("yes: {ROUTER_WAN_IP}:60002, {valid} ({elapsed} ms)");
        let (text, client) = shell(&topo.wan, 60002, &second.key, "upnp");
        row.mosh_upnp = text;
        clients.extend(client);
    } else {
        row.upnpc = format!("no: {}", added.lines().last().unwrap_or_default().trim());
        row.mosh_upnp = "-".into();
    }
    let wan = udp_ask(
        &topo.wan,
        SocketAddrV4::new(WAN_HOST_IP, 0),
        SocketAddrV4::new(ROUTER_WAN_IP, 5351),
        &[0, 0],
    )?;
    row.wan_side = match wan {
        None => "unanswered".into(),
        Some(answer) => format!("answered ({} bytes)", answer.len()),
    };
    let other = upnpc(
        &topo.lan1,
        &["-a", &LAN2_IP.to_string(), "60003", "60003", "UDP", "600"],
    )?;
    row.secure = match other.lines().find(|line| line.contains("AddPortMapping(")) {
        Some(line) if line.contains("failed") => format!("refused: {}", line.trim()),
        _ if other.contains("is redirected") => "granted (not refused)".into(),
        _ => other.lines().last().unwrap_or_default().trim().to_string(),
    };
    drop((first, second, third));
    Ok((row, clients))
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

pub fn run() -> Result<()> {
    prereq::ensure()?;
    build_forwarder()?;
    if !std::path::Path::new("/usr/sbin/miniupnpd").exists() {
        bail!(
            "miniupnpd is not installed: apt-get install miniupnpd-nftables (cargo xtask prereq)"
        );
    }
    println!("== forwarder --gateway");
    let topo = GatewayTopology::new()?;
    let relay = Relay::start(&topo.router, &topo.ifaces(), &topo.relay_args(&[]))?;
    // See GatewayTopology::xdp_on_switch_port: the veth stand-in for a NIC needs it for XDP_TX.
    let switch_port = topo.xdp_on_switch_port()?;
    let (mut forwarder, clients) = pieces(&topo)?;
    let fast = relay
        .sessions()?
        .iter()
        .flat_map(|s| s.flows.iter())
        .map(|f| f.fast_path_packets)
        .sum::<u64>();
    forwarder.path = format!("XDP ({fast} fast-path packets)");
    drop(clients);
    drop(switch_port);
    drop(relay);
    drop(topo);

    println!("== miniupnpd");
    let topo = GatewayTopology::new()?;
    let miniupnpd = Miniupnpd::start(&topo.router)?;
    let (mut mini, clients) = pieces(&topo)?;
    mini.path = "nftables DNAT + conntrack".into();
    drop(clients);
    drop(miniupnpd);
    drop(topo);

    let version = Command::new("/usr/sbin/miniupnpd")
        .arg("--version")
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    println!(
        "\n| piece | forwarder --gateway | miniupnpd ({}) |",
        version.trim()
    );
    println!("|---|---|---|");
    for (name, a, b) in [
        ("natpmpc -a", &forwarder.natpmpc, &mini.natpmpc),
        (
            "mosh WAN -> NAT-PMP mapping",
            &forwarder.mosh_natpmp,
            &mini.mosh_natpmp,
        ),
        ("upnpc -a", &forwarder.upnpc, &mini.upnpc),
        (
            "mosh WAN -> UPnP mapping",
            &forwarder.mosh_upnp,
            &mini.mosh_upnp,
        ),
        (
            "mosh LAN -> WAN address (hairpin)",
            &forwarder.hairpin,
            &mini.hairpin,
        ),
        (
            "NAT-PMP request from the WAN side",
            &forwarder.wan_side,
            &mini.wan_side,
        ),
        (
            "upnpc -a for another host (secure mode)",
            &forwarder.secure,
            &mini.secure,
        ),
        ("forwarded by", &forwarder.path, &mini.path),
    ] {
        println!("| {name} | {a} | {b} |");
    }
    Ok(())
}
