//! The forwarder daemon under test, run in the relay namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use wait_timeout::ChildExt;

use crate::cmd::{self, SHORT};
use crate::netns::{Netns, random_tag};

/// How long the daemon may take to load its eBPF object, attach and open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon gets to detach XDP after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root, from this crate's location in it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// `$FORWARDER_BIN`, else `<target>/release/forwarder`; fails with the fix if absent.
pub fn forwarder_bin() -> Result<PathBuf> {
    let bin = match std::env::var_os("FORWARDER_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("release").join("forwarder")
        }
    };
    if !bin.is_file() {
        bail!(
            "forwarder binary not found at {}: run `cargo build --release -p forwarder` \
             (or `cargo xtask test`, which builds it and sets FORWARDER_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A session as `forwarder add --json` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    pub id: String,
    pub port: u16,
    pub backend: String,
}

/// What `forwarder list --json` and `show --json` report: the control
/// API's own types, so the tests read exactly what the daemon writes.
pub use forwarder_api::{FlowInfo, NatInfo, SessionInfo, StatsInfo};

/// The payload of a `--json` document of schema version 1.
pub fn unwrap_document(document: Value) -> Result<Value> {
    let Value::Object(mut fields) = document else {
        bail!("not a JSON object")
    };
    let version = fields.remove("schema_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(forwarder_api::JSON_SCHEMA_VERSION)) {
        bail!(
            "schema_version {version:?}, expected {}",
            forwarder_api::JSON_SCHEMA_VERSION
        );
    }
    let mut values = fields.into_iter();
    match (values.next(), values.next()) {
        (Some((_, value)), None) => Ok(value),
        _ => bail!("expected exactly one payload beside schema_version"),
    }
}

/// A running `forwarder run`, stopped on drop. Its stderr goes to a file that is
/// printed on drop (the test harness shows it only for failing tests) unless
/// [`Relay::quiet`] was called.
///
/// The daemon keeps its data plane pinned when it stops, so dropping the
/// guard also runs `forwarder detach --purge` for its (unique) instance.
#[derive(Debug)]
pub struct Relay {
    child: Child,
    bin: PathBuf,
    instance: String,
    log_path: PathBuf,
    /// The daemon's command line (nsenter ... forwarder run ...), for restarts.
    command: Vec<String>,
    state_dir: PathBuf,
    _dir: tempfile::TempDir,
    print_log_on_drop: bool,
}

impl Relay {
    /// Starts the daemon in `ns` on `ifaces` with `--xdp-mode auto` and
    /// `--datapath xdp` (unless `extra_args` names them) and a unique instance
    /// name, and waits until its control socket answers.
    pub fn start(ns: &Netns, ifaces: &[&str], extra_args: &[&str]) -> Result<Self> {
        let bin = forwarder_bin()?;
        let instance = format!("t{}-{}", std::process::id(), random_tag());
        let dir = tempfile::Builder::new().prefix("fwd-relay-").tempdir()?;
        let log_path = dir.path().join("forwarder.log");
        let state_dir = dir.path().join("state");

        let mut cmd = ns.nsenter(bin.to_str().context("binary path is not UTF-8")?);
        cmd.arg("run").args(["--instance", &instance]);
        if !extra_args.contains(&"--state-dir") && !extra_args.contains(&"--config") {
            cmd.arg("--state-dir").arg(&state_dir);
        }
        for iface in ifaces {
            cmd.args(["--iface", iface]);
        }
        if !extra_args.contains(&"--xdp-mode") {
            cmd.args(["--xdp-mode", "auto"]);
        }
        // `--datapath auto` would carry every packet through the daemon when
        // XDP fails to load, and a test of the XDP relay would still pass.
        if !extra_args.contains(&"--datapath") && !extra_args.contains(&"--config") {
            cmd.args(["--datapath", "xdp"]);
        }
        cmd.args(extra_args);
        let command: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        Self::launch(bin, instance, log_path, command, state_dir, dir)
    }

    /// Runs the daemon as `command` (a full command line whose `forwarder
    /// run` uses `instance`), e.g. one taken from a systemd unit.
    pub fn start_command(
        command: Vec<String>,
        instance: &str,
        state_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let bin = forwarder_bin()?;
        let dir = tempfile::Builder::new().prefix("fwd-relay-").tempdir()?;
        let log_path = dir.path().join("forwarder.log");
        let state_dir = state_dir.unwrap_or_else(|| dir.path().join("state"));
        Self::launch(bin, instance.to_string(), log_path, command, state_dir, dir)
    }

    fn launch(
        bin: PathBuf,
        instance: String,
        log_path: PathBuf,
        command: Vec<String>,
        state_dir: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Self> {
        let child = Self::spawn(&command, &log_path)?;
        let mut relay = Self {
            child,
            bin,
            instance,
            log_path,
            command,
            state_dir,
            _dir: dir,
            print_log_on_drop: true,
        };
        relay.wait_ready().with_context(|| {
            format!(
                "`{}` did not become ready; its log:\n{}",
                relay.command.join(" "),
                relay.log()
            )
        })?;
        Ok(relay)
    }

    fn spawn(command: &[String], log_path: &Path) -> Result<Child> {
        let log = File::options().create(true).append(true).open(log_path)?;
        let (program, args) = command.split_first().context("empty daemon command")?;
        Command::new(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting `{}`", command.join(" ")))
    }

    /// Kills the daemon with SIGKILL (no cleanup at all) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM, as systemd does.
    pub fn terminate(&mut self) -> Result<()> {
        self.stop()
    }

    /// Starts the daemon again with the same command line (after
    /// [`Relay::kill9`] or [`Relay::terminate`]) and waits until it answers.
    /// Returns how long that took.
    pub fn restart(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.child = Self::spawn(&self.command, &self.log_path)?;
        self.wait_ready().with_context(|| {
            format!(
                "the restarted daemon did not become ready; its log:\n{}",
                self.log()
            )
        })?;
        Ok(started.elapsed())
    }

    /// The daemon's command line, e.g. to start it again with other options.
    pub fn command(&self) -> &[String] {
        &self.command
    }

    /// The session store's folder.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited with {status} before it was ready");
            }
            let out = cmd::run(
                self.cli()
                    .args(["list", "--instance", &self.instance, "--json"]),
                SHORT,
            )?;
            if out.success() {
                return Ok(());
            }
            last = out.stderr;
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "not ready within {READY_TIMEOUT:?}; last `forwarder list` said: {}",
            last.trim()
        )
    }

    /// Don't print the daemon's log on drop (for the demo, which prints it only on failure).
    pub fn quiet(&mut self) {
        self.print_log_on_drop = false;
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// `forwarder --instance X` from the root namespace: the verbs only need the Unix socket.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("FORWARDER_INSTANCE", &self.instance);
        cmd
    }

    /// Runs a CLI verb with `--instance`; returns stdout or an error carrying its stderr.
    pub fn verb(&self, args: &[&str]) -> Result<String> {
        let (verb, rest) = args.split_first().context("no verb")?;
        cmd::run_ok(
            self.cli()
                .arg(verb)
                .args(["--instance", &self.instance])
                .args(rest),
            SHORT,
        )
    }

    /// Runs a verb with `--json` and returns what its document carries: the
    /// CLI prints `{"schema_version": 1, "<what>": ...}`.
    fn verb_json(&self, args: &[&str]) -> Result<Value> {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = self.verb(&with_json)?;
        let document: Value = serde_json::from_str(&out).with_context(|| {
            format!("`forwarder {}` printed invalid JSON: {out}", args.join(" "))
        })?;
        unwrap_document(document)
            .with_context(|| format!("`forwarder {} --json` printed: {out}", args.join(" ")))
    }

    /// `forwarder add --backend BACKEND [extra...] --json`.
    pub fn add(&self, backend: SocketAddr, extra: &[&str]) -> Result<Session> {
        let backend = backend.to_string();
        let mut args = vec!["add", "--backend", backend.as_str()];
        args.extend_from_slice(extra);
        let value = self.verb_json(&args)?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("unexpected `forwarder add --json` output: {value}"))
    }

    /// `forwarder remove ID`.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.verb(&["remove", id])?;
        Ok(())
    }

    /// `forwarder list --json` as raw JSON.
    pub fn list(&self) -> Result<Value> {
        self.verb_json(&["list"])
    }

    /// `forwarder list --json`, typed.
    pub fn sessions(&self) -> Result<Vec<SessionInfo>> {
        let value = self.list()?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("unexpected `forwarder list --json` output: {value}"))
    }

    /// The listed session with this id, if any.
    pub fn session(&self, id: &str) -> Result<Option<SessionInfo>> {
        Ok(self.sessions()?.into_iter().find(|s| s.id == id))
    }

    /// `forwarder stats --json`.
    pub fn stats(&self) -> Result<Value> {
        self.verb_json(&["stats"])
    }

    /// Polls `check` on the session list until it returns `Some`, at most `timeout`.
    /// The error shows the last list seen, which is what one needs to debug it.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[SessionInfo]) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let sessions = self.sessions()?;
            if let Some(found) = check(&sessions) {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "timed out after {timeout:?} waiting for {what}; last list: {}",
                    serde_json::to_string_pretty(&self.list()?)?
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        // nsenter execs the daemon without forking when only joining a net
        // namespace, so this pid is the daemon itself.
        kill(pid, Signal::SIGTERM)?;
        if self.child.wait_timeout(STOP_TIMEOUT)?.is_none() {
            eprintln!(
                "forwarder instance {} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it",
                self.instance
            );
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "warning: stopping forwarder instance {}: {e:#}",
                self.instance
            );
        }
        let state_dir = self.state_dir.to_string_lossy().into_owned();
        if let Err(e) = self.verb(&["detach", "--purge", "--state-dir", &state_dir]) {
            eprintln!(
                "warning: detaching forwarder instance {}: {e:#}",
                self.instance
            );
        }
        if self.print_log_on_drop || std::thread::panicking() {
            eprintln!(
                "----- forwarder daemon log (instance {}) -----\n{}----- end of daemon log -----",
                self.instance,
                self.log()
            );
        }
    }
}
