//! `cargo xtask test`: what CI runs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{build_forwarder, cargo, prereq, run_visible};

/// `cargo fmt --check`, then clippy with warnings as errors over the host
/// crates and over the eBPF crates for their own target.
pub fn lint() -> Result<()> {
    run_visible(cargo().args(["fmt", "--all", "--check"]))
        .context("the code is not formatted: run `cargo fmt --all`")?;
    run_visible(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--workspace",
        "--exclude",
        "forwarder-ebpf",
        "--exclude",
        "forwarder-bench-ebpf",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found warnings in the host crates")?;
    // The eBPF crates only build for the BPF target, with nightly's core.
    run_visible(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--release",
                "-p",
                "forwarder-ebpf",
                "-p",
                "forwarder-bench-ebpf",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )
    .context("clippy found warnings in the eBPF crates")
}

pub fn run(extra: &[String]) -> Result<()> {
    prereq::ensure()?;
    lint()?;
    let bin = build_forwarder()?;
    // The eBPF crates only build for the BPF target; the build.rs of
    // forwarder and forwarder-bench compile them.
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "forwarder-ebpf",
        "--exclude",
        "forwarder-bench-ebpf",
        "--release",
        // Every test binary runs, so one run shows every failure.
        "--no-fail-fast",
    ])
    .args(extra)
    .env("FORWARDER_BIN", &bin)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let what = forwarder_testbed::cmd::describe(&cmd);
    println!("xtask: $ {what}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;

    // Echo cargo's report while totalling it: its last line is the doc-tests'
    // "0 passed", which reads as if nothing ran. CI wants the real total last.
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        totals.add(&line);
        writeln!(out, "{line}")?;
    }
    let status = child.wait()?;
    drop(out);
    // The bench is not a test (no timing is judged), but a tiny run of it
    // keeps its topologies and tools from rotting; a failure fails CI.
    let bench = if status.success() {
        println!("xtask: bench smoke run (every relay kind once, tiny load)");
        let result = crate::bench::run(&crate::bench::Plan::smoke());
        match &result {
            Ok(_) => totals.passed += 1,
            Err(error) => {
                eprintln!("xtask: bench smoke run failed: {error:#}");
                totals.failed += 1;
            }
        }
        result.map(drop)
    } else {
        Ok(())
    };
    println!(
        "\nsummary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    bench.context("the bench smoke run failed")
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn totals_cargo_test_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 0 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.23s");
        t.add("test foo ... ok");
        assert_eq!((t.passed, t.failed, t.ignored), (16, 1, 2));
    }
}
