//! Running external commands with a time limit and captured output.
//!
//! Output goes to anonymous files rather than pipes: daemonizing programs
//! (mosh-server, tmux) hand their stdout/stderr to a grandchild, and reading a
//! pipe to EOF would then block for as long as that grandchild lives.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wait_timeout::ChildExt;

/// Default limit for short administrative commands (ip, ethtool, sysctl, CLI verbs).
pub const SHORT: Duration = Duration::from_secs(15);

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A command's program and arguments as one readable line, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(line, " {}", arg.to_string_lossy());
    }
    line
}

fn read_back(mut file: File) -> Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs `cmd` to completion, killing it after `timeout`. A non-zero exit is not an error here.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let out = tempfile::tempfile().context("creating a temporary file for stdout")?;
    let err = tempfile::tempfile().context("creating a temporary file for stderr")?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}` (is the program installed? `cargo xtask prereq` installs the test tools)"))?;
    let status = match child.wait_timeout(timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {timeout:?}; stdout: {}; stderr: {}",
                read_back(out)?.trim(),
                read_back(err)?.trim()
            );
        }
    };
    Ok(Output {
        status,
        stdout: read_back(out)?,
        stderr: read_back(err)?,
    })
}

/// Runs `cmd` and requires exit status 0; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = describe(cmd);
    let output = run(cmd, timeout)?;
    if !output.success() {
        bail!(
            "`{what}` failed ({}):\n  stderr: {}\n  stdout: {}",
            output.status,
            output.stderr.trim(),
            output.stdout.trim()
        );
    }
    Ok(output.stdout)
}

/// Shorthand: `run_ok(Command::new(program).args(args), SHORT)`.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    run_ok(Command::new(program).args(args), SHORT)
}
