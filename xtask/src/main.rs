//! Developer and CI tasks: `cargo xtask prereq | demo | test | bench | deb | modules`.
//!
//! Everything runs as root: the tasks install packages, create network
//! namespaces and attach XDP programs.

mod bench;
mod deb;
mod demo;
mod gateway_compare;
mod modules;
mod prereq;
mod test;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "forwarder developer and CI tasks"
)]
enum Task {
    /// Install what building and testing need (idempotent; only what is missing).
    Prereq,
    /// Build forwarder and run a real mosh session through it in network namespaces.
    Demo,
    /// Measure forwarder against nftables, socat, a raw XDP ceiling and the direct path.
    Bench {
        /// A tiny run of every relay and code path (what CI runs to keep the bench working).
        #[arg(long)]
        smoke: bool,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only these relays (direct, ceiling, xdp_native, xdp_generic, userspace, nftables,
        /// socat) and, if named, the `admission`, `progcost`, `scale`, `control` (adds and flows
        /// learned per second), `idle` (an idle daemon's CPU with many flows), `cores` and
        /// `latency` (native against generic XDP) runs: for an A/B of one change.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Sender core counts for forwarder XDP against nftables (e.g. 1,2,4,8,12); counts
        /// above this machine's cores are skipped with the reason.
        #[arg(long, value_delimiter = ',')]
        cores: Vec<usize>,
        /// Flow capacity of the scale run's daemon; its table-full step fills 99 % of it
        /// (e.g. 1000000 for the million-flow row).
        #[arg(long)]
        max_flows: Option<u32>,
    },
    /// Prereq, release build, then every test in the workspace (as CI runs it).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter, or `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build target/deb/forwarder_<version>_<arch>.deb (binary, systemd units, example config,
    /// man pages, completions) from $FORWARDER_BIN, else from its own release build.
    Deb,
    /// Print the module graph of the forwarder crate and fail on an import cycle.
    Modules,
    /// rustfmt and clippy (warnings are errors) over every crate, the eBPF ones for their target.
    Lint,
    /// Gateway mode against miniupnpd on the same topology (natpmpc, upnpc, mosh through
    /// each mapping, hairpin, the WAN side, secure mode), printed side by side.
    GatewayCompare,
}

fn main() -> ExitCode {
    let result = match Task::parse() {
        Task::Prereq => prereq::ensure(),
        Task::Demo => demo::run(),
        Task::Bench {
            smoke,
            json,
            only,
            cores,
            max_flows,
        } => run_bench(smoke, json, &only, &cores, max_flows),
        Task::Test { args } => test::run(&args),
        Task::Deb => deb::run().map(drop),
        Task::Modules => modules::run(),
        Task::Lint => test::lint(),
        Task::GatewayCompare => gateway_compare::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(
    smoke: bool,
    json: Option<PathBuf>,
    only: &[String],
    cores: &[usize],
    max_flows: Option<u32>,
) -> Result<()> {
    prereq::ensure()?;
    build_forwarder()?;
    let mut plan = if smoke {
        bench::Plan::smoke()
    } else {
        bench::Plan::full()
    };
    plan.only = only.to_vec();
    if !cores.is_empty() {
        plan.cores = cores.to_vec();
    }
    if let Some(max_flows) = max_flows {
        plan.max_flows = max_flows;
        plan.fill_flows = max_flows as usize / 100 * 99;
    }
    let results = bench::run(&plan)?;
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("xtask: results written to {}", path.display());
    }
    Ok(())
}

/// The cargo that runs us (so the same toolchain builds everything).
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(forwarder_testbed::workspace_root());
    cmd
}

/// Runs a long command (install, build, test) with its output shown live.
/// No time limit: CI bounds the whole run, and a slow build is not an error.
fn run_visible(cmd: &mut Command) -> Result<()> {
    let what = forwarder_testbed::cmd::describe(cmd);
    println!("xtask: $ {what}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// `cargo build --release -p forwarder`; returns the binary's path.
fn build_forwarder() -> Result<PathBuf> {
    run_visible(cargo().args(["build", "--release", "-p", "forwarder"]))?;
    forwarder_testbed::forwarder_bin()
}
