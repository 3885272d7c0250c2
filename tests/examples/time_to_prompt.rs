//! Time from the command to the prompt: `forwarder mosh --via` next to
//! `ssh -J`, same topology, same user, same keys. A measurement for
//! docs/BENCHMARKS.md, not a test. As root:
//! `FORWARDER_BIN=$PWD/target/release/forwarder cargo run --release -p forwarder-testbed --example time_to_prompt`

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use forwarder_testbed::MoshClient;
use forwarder_testbed::scenario::MOSH_CONNECT_TIMEOUT;
use forwarder_testbed::topology::{RELAY_CLIENT_IP, SERVER_IP};

#[path = "../tests/support/mosh_bed.rs"]
#[expect(dead_code, reason = "the measurement uses only part of the test bed")]
mod mosh_bed;
use mosh_bed::{Bed, wait_removed};

fn main() -> Result<()> {
    const RUNS: usize = 5;
    let bed = Bed::build(&format!("{SERVER_IP}/32"))?;
    let ssh_line = bed.user.shell_line(&format!(
        "env LANG=C.UTF-8 LC_ALL=C.UTF-8 ssh -tt -J {RELAY_CLIENT_IP} {SERVER_IP}"
    ));
    // Each step's time goes to a log the user may write.
    let steps = bed.user.write_file("steps.log", "")?;
    let mosh_line = bed.user.shell_line(&format!(
        "env RUST_LOG=forwarder::connect=debug {} 2>>{}",
        bed.mosh_words(&format!("--via {RELAY_CLIENT_IP} {SERVER_IP}"))?,
        steps.display()
    ));
    let mut ssh_times = Vec::new();
    let mut mosh_times = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let ssh = MoshClient::start_in_tmux(&bed.topo.client, &ssh_line)?;
        ssh_times.push(until_prompt(&ssh, started)?);
        drop(ssh);

        let started = Instant::now();
        let mosh = MoshClient::start_in_tmux(&bed.topo.client, &mosh_line)?;
        mosh_times.push(until_prompt(&mosh, started)?);
        mosh.type_line("exit")?;
        wait_removed(&bed.relay)?;
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let log = std::fs::read_to_string(&steps)?;
    for step in ["resolve", "bastion login", "mosh-server", "session"] {
        let mut times: Vec<u64> = log
            .lines()
            .filter(|line| line.contains(&format!("step=\"{step}\"")))
            .filter_map(|line| {
                line.split("elapsed_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        times.sort_unstable();
        eprintln!("forwarder mosh, {step:<13} done after (ms, each run): {times:?}");
    }
    eprintln!(
        "time to prompt over {RUNS} runs (median; all):\n  ssh -J bastion host:              {:?}; {ssh_times:?}\n  forwarder mosh --via bastion host: {:?}; {mosh_times:?}",
        median(&mut ssh_times.clone()),
        median(&mut mosh_times.clone()),
    );
    Ok(())
}

/// Polls the pane every 10 ms until the shell's prompt shows.
fn until_prompt(pane: &MoshClient, started: Instant) -> Result<Duration> {
    let deadline = started + MOSH_CONNECT_TIMEOUT;
    while Instant::now() < deadline {
        if pane.screen()?.lines().any(|line| line.starts_with('$')) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "no prompt within {MOSH_CONNECT_TIMEOUT:?}; screen:\n{}",
        pane.screen()?
    )
}
