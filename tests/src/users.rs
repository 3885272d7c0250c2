//! Throwaway unprivileged users and groups on the test machine, for the
//! self-service tests: unique names per run (`fwdt…`, `fwdg…`), created
//! with useradd/groupadd and removed on drop, even when the test fails.
//! Their comment field carries the creating pid, so a later run removes
//! what a killed one left behind.
//!
//! [`UserCli`] runs the CLI as such a user (`setpriv --reuid --regid
//! --init-groups`), from a copy of the binary any user may execute.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, Output, SHORT};
use crate::netns::random_tag;
use crate::relay::Relay;

/// How long to retry a user-database change while another process holds
/// its lock (useradd refuses at once with exit 10 "cannot lock").
const LOCK_RETRY: Duration = Duration::from_secs(20);

fn comment() -> String {
    format!("forwarder-test pid {}", std::process::id())
}

/// Runs a useradd/userdel/groupadd/groupdel command, retrying while the
/// user database is locked by someone else.
fn change_user_database(program: &str, args: &[&str]) -> Result<()> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        let out = cmd::run(Command::new(program).args(args), SHORT)?;
        if out.success() {
            return Ok(());
        }
        let locked = out.stderr.contains("lock");
        if !locked || Instant::now() >= deadline {
            bail!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes `fwdt…` users and `fwdg…` groups whose creating test process is gone.
fn sweep_stale() {
    for (file, program, prefix) in [
        ("/etc/passwd", "userdel", "fwdt"),
        ("/etc/group", "groupdel", "fwdg"),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            let Some(name) = fields.first().filter(|n| n.starts_with(prefix)) else {
                continue;
            };
            let pid = match program {
                "groupdel" => group_creator_pid(name),
                _ => fields
                    .get(4)
                    .and_then(|c| c.strip_prefix("forwarder-test pid "))
                    .and_then(|p| p.parse::<u32>().ok()),
            };
            if let Some(pid) = pid
                && pid != std::process::id()
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                eprintln!("removing stale test account {name} (creator pid {pid} is gone)");
                let _ = change_user_database(program, &[name]);
            }
        }
    }
}

/// Groups have no comment field: their creator's pid is their name's tail (`fwdg<tag>p<pid>`).
fn group_creator_pid(name: &str) -> Option<u32> {
    name.rsplit_once('p')?.1.parse().ok()
}

/// A group, deleted on drop.
#[derive(Debug)]
pub struct TestGroup {
    pub name: String,
}

impl TestGroup {
    pub fn new() -> Result<Self> {
        sweep_stale();
        let name = format!("fwdg{}p{}", random_tag(), std::process::id());
        change_user_database("groupadd", &[&name])?;
        Ok(Self { name })
    }

    pub fn gid(&self) -> Result<u32> {
        let group = nix::unistd::Group::from_name(&self.name)?
            .with_context(|| format!("group {} vanished", self.name))?;
        Ok(group.gid.as_raw())
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if let Err(error) = change_user_database("groupdel", &[&self.name]) {
            eprintln!("warning: removing test group {}: {error:#}", self.name);
        }
    }
}

/// An unprivileged user without a home, in `groups`; deleted on drop
/// (with its private group).
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn new(groups: &[&TestGroup]) -> Result<Self> {
        Self::add(groups, &["--shell", "/usr/sbin/nologin"])
    }

    /// A user who can log in (over ssh, as the sshd helper allows): `home`
    /// as its home folder (made by the caller, removed after the user),
    /// /bin/sh as its shell, and a password field of `*`: no password, but
    /// not locked, since sshd without PAM refuses locked accounts (`!`)
    /// even for key logins.
    pub fn login(groups: &[&TestGroup], home: &std::path::Path) -> Result<Self> {
        let home = home.to_str().context("home path is not UTF-8")?;
        Self::add(
            groups,
            &["--shell", "/bin/sh", "--home-dir", home, "--password", "*"],
        )
    }

    fn add(groups: &[&TestGroup], account: &[&str]) -> Result<Self> {
        sweep_stale();
        let name = format!("fwdt{}", random_tag());
        let comment = comment();
        let mut args = vec!["--no-create-home", "--user-group", "--comment", &comment];
        args.extend_from_slice(account);
        let names = groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if !names.is_empty() {
            args.extend(["--groups", &names]);
        }
        args.push(&name);
        change_user_database("useradd", &args)?;
        // The guard exists before the lookup, so a failed lookup removes the user too.
        let mut user = Self { name, uid: 0 };
        user.uid = nix::unistd::User::from_name(&user.name)?
            .with_context(|| format!("useradd made no user {}", user.name))?
            .uid
            .as_raw();
        Ok(user)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        if let Err(error) = change_user_database("userdel", &[&self.name]) {
            eprintln!("warning: removing test user {}: {error:#}", self.name);
        }
    }
}

/// Runs the CLI as a test user. The binary is copied into a folder every
/// user may enter, since the build tree may sit under a private home.
#[derive(Debug)]
pub struct UserCli {
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl UserCli {
    /// The copy every user may run.
    pub fn bin(&self) -> &std::path::Path {
        &self.bin
    }

    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fwd-usercli-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let bin = dir.path().join("forwarder");
        std::fs::copy(crate::relay::forwarder_bin()?, &bin)
            .context("copying the forwarder binary for the test users")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { bin, _dir: dir })
    }

    /// `forwarder VERB --instance I ARGS...` as `user` (its groups from the
    /// user database, as at a login), from `/`; how it ended, success or not.
    pub fn run(&self, user: &TestUser, relay: &Relay, args: &[&str]) -> Result<Output> {
        let (verb, rest) = args.split_first().context("no verb")?;
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={}", user.name),
                &format!("--regid={}", user.name),
                "--init-groups",
                "--",
            ])
            .arg(&self.bin)
            .arg(verb)
            .args(["--instance", relay.instance()])
            .args(rest)
            .current_dir("/")
            .env_remove("FORWARDER_INSTANCE");
        cmd::run(&mut command, SHORT)
    }

    /// [`UserCli::run`] with `--json`, requiring success: the document's payload.
    pub fn json(&self, user: &TestUser, relay: &Relay, args: &[&str]) -> Result<serde_json::Value> {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = self.run(user, relay, &with_json)?;
        if !out.success() {
            bail!(
                "`forwarder {}` as {} failed ({}): {}{}",
                with_json.join(" "),
                user.name,
                out.status,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        crate::relay::unwrap_document(serde_json::from_str(&out.stdout).with_context(|| {
            format!(
                "`forwarder {}` printed invalid JSON: {}",
                with_json.join(" "),
                out.stdout
            )
        })?)
    }
}

/// The exit code of a CLI call refused for want of permission.
pub const PERMISSION_DENIED: i32 = forwarder_api::ExitStatus::PermissionDenied as i32;

/// Asserts that the CLI call `what` failed and that its output names every
/// `needle`.
pub fn refused(out: &Output, what: &str, needles: &[&str]) {
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.success(), "{what} succeeded: {text}");
    for needle in needles {
        assert!(
            text.contains(needle),
            "{what}: {needle:?} missing in: {text}"
        );
    }
}

/// The session a `--json` call (as [`UserCli::json`] returns it) printed.
pub fn user_session(value: serde_json::Value) -> crate::SessionInfo {
    parsed(value)
}

/// The sessions a `--json` `list` (as [`UserCli::json`] returns it) printed.
pub fn user_sessions(value: serde_json::Value) -> Vec<crate::SessionInfo> {
    parsed(value)
}

fn parsed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}
