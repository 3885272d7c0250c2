//! `cargo xtask demo`: a real mosh session through forwarder, end to end, with
//! the operator's view (`forwarder list`, `forwarder stats`) at the end.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use forwarder_testbed::cmd::{self, SHORT};
use forwarder_testbed::scenario::MoshThroughRelay;
use forwarder_testbed::topology::{
    CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, RELAY_SERVER_IP, SERVER_IP,
};

use crate::{build_forwarder, prereq};

pub fn run() -> Result<()> {
    prereq::ensure()?;
    let bin = build_forwarder()?;
    println!("\n== forwarder demo ({})", bin.display());
    println!(
        "   client {CLIENT_IP}  --  {RELAY_CLIENT_IP} [{RELAY_CLIENT_IF}] relay [{RELAY_SERVER_IF}] {RELAY_SERVER_IP}  --  {SERVER_IP} server"
    );
    println!("   (three network namespaces joined by veth pairs; all removed at the end)\n");

    // On failure here the daemon's guard prints its log itself.
    let mut m = MoshThroughRelay::start(&[]).context("setting up mosh through the relay")?;
    m.relay.quiet();
    let result = show(&m);
    if result.is_err() {
        eprintln!("----- forwarder daemon log -----\n{}", m.relay.log());
    }
    result?;
    drop(m);
    println!("\n== cleaned up: daemon stopped, namespaces removed");
    Ok(())
}

fn show(m: &MoshThroughRelay) -> Result<()> {
    let instance = m.relay.instance();
    println!(
        "== namespaces: {}, {}, {}",
        m.topo.client.name(),
        m.topo.relay.name(),
        m.topo.server.name()
    );
    println!(
        "== relay: `forwarder run --instance {instance} --iface {RELAY_CLIENT_IF} --iface {RELAY_SERVER_IF} --xdp-mode auto` (pid {})",
        m.relay.pid()
    );
    println!(
        "== session {}: clients connect to {RELAY_CLIENT_IP}:{}, forwarded to mosh-server at {}",
        m.session.id, m.session.port, m.session.backend
    );
    println!(
        "== mosh-client {RELAY_CLIENT_IP} {} is connected (running in tmux in the client namespace)",
        m.session.port
    );

    println!("\n== typing `echo demo-$((6*7))-ok` into mosh-client; its screen:");
    let screen = m.roundtrip("demo")?;
    let lines: Vec<&str> = screen.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .unwrap_or(0);
    for line in &lines[..=last] {
        println!("   | {line}");
    }

    // Steady-state packets should be forwarded by XDP; give the counters a
    // moment (mosh sends at least every 3 s) so the listing shows it.
    let fast = m
        .relay
        .wait_until("fast-path packets", Duration::from_secs(15), |s| {
            s.iter()
                .flat_map(|s| &s.flows)
                .map(|f| f.fast_path_packets)
                .find(|&n| n > 0)
        });
    if let Err(e) = &fast {
        eprintln!("note: no packet went through the XDP fast path yet: {e:#}");
    }

    for verb in ["list", "stats"] {
        println!("\n== forwarder {verb} --instance {instance}");
        let out = cmd::run(m.relay.cli().args([verb, "--instance", instance]), SHORT)?;
        if !out.success() {
            bail!(
                "`forwarder {verb}` failed ({}): {}",
                out.status,
                out.stderr.trim()
            );
        }
        print!("{}", out.stdout);
    }
    fast.map(|_| ())
        .context("the session worked, but only through the daemon's slow path")?;
    Ok(())
}
