//! A throwaway sshd inside a namespace: its own host key, one client key
//! allowed to log in as root, keys of per-test users ([`SshUser`]) on
//! request, nothing read from the host's ssh configuration.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, SHORT};
use crate::netns::Netns;
use crate::users::{TestGroup, TestUser};

/// sshd, stopped on drop.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    addr: Ipv4Addr,
    port: u16,
}

/// Makes an ed25519 key pair at `path` (and `path`.pub), no passphrase.
fn keygen(path: &Path) -> Result<()> {
    cmd::sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "forwarder-test",
            "-f",
            path.to_str().context("temp path")?,
        ],
    )?;
    Ok(())
}

impl Sshd {
    /// Starts sshd in `ns` listening on `addr:port`, accepting root with the
    /// key at [`Sshd::client_key`].
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16) -> Result<Self> {
        Self::start_with(ns, addr, port, "")
    }

    /// [`Sshd::start`] with `extra` appended to its sshd_config (e.g.
    /// `SetEnv PATH=/nowhere` for a host without mosh-server).
    pub fn start_with(ns: &Netns, addr: Ipv4Addr, port: u16, extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fwd-sshd-").tempdir()?;
        // sshd reads a user's authorized keys as that user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let path = |name: &str| dir.path().join(name);
        for key in ["host_key", "client_key"] {
            keygen(&path(key))?;
        }
        std::fs::create_dir(path("authorized_keys"))?;
        std::fs::set_permissions(
            path("authorized_keys"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        std::fs::copy(path("client_key.pub"), path("authorized_keys/root"))?;
        let config = format!(
            "ListenAddress {addr}:{port}\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {authorized}/%u\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             {extra}\n",
            host_key = path("host_key").display(),
            pid = path("sshd.pid").display(),
            authorized = path("authorized_keys").display(),
        );
        std::fs::write(path("sshd_config"), config)?;
        // sshd insists on its privilege-separation directory.
        std::fs::create_dir_all("/run/sshd")?;
        let sshd =
            which::which("sshd").context("sshd not found: apt-get install openssh-server")?;
        let log = std::fs::File::create(path("sshd.log"))?;
        let child = ns
            .exec(sshd.to_str().context("sshd path")?)
            .args(["-D", "-e", "-f"])
            .arg(path("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sshd")?;
        let sshd = Self {
            child,
            dir,
            addr,
            port,
        };
        sshd.wait_listening(ns, SocketAddr::from((addr, port)))?;
        Ok(sshd)
    }

    fn wait_listening(&self, ns: &Netns, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + SHORT;
        loop {
            let connected = ns.within(move || {
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })?;
            if connected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sshd did not listen on {addr} within {SHORT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The private key root logs in with.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Lets `user` log in with `public_key` (an `ssh-ed25519 AAAA...` line).
    pub fn authorize(&self, user: &str, public_key: &str) -> Result<()> {
        use std::io::Write;
        let path = self.dir.path().join("authorized_keys").join(user);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(file, "{}", public_key.trim())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    }

    /// Its `known_hosts` line, under the name ssh looks it up by (the
    /// address, `[address]:port` off port 22).
    pub fn known_hosts_line(&self) -> Result<String> {
        let key = std::fs::read_to_string(self.dir.path().join("host_key.pub"))?;
        let mut words = key.split_whitespace();
        let (kind, blob) = (
            words.next().context("empty host key")?,
            words.next().context("host key without its key")?,
        );
        let name = if self.port == 22 {
            self.addr.to_string()
        } else {
            format!("[{}]:{}", self.addr, self.port)
        };
        Ok(format!("{name} {kind} {blob}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- sshd log -----\n{}----- end of sshd log -----",
                self.log()
            );
        }
    }
}

/// A [`TestUser`] who logs in over ssh: a home in a temporary folder, an
/// ed25519 key at ~/.ssh/id_ed25519 (where ssh looks by default), hosts it
/// trusts in ~/.ssh/known_hosts. Drop order: the user, then its home.
#[derive(Debug)]
pub struct SshUser {
    pub user: TestUser,
    home: tempfile::TempDir,
}

impl SshUser {
    /// A fresh user, a member of `groups`.
    pub fn create(groups: &[&TestGroup]) -> Result<Self> {
        let home = tempfile::Builder::new().prefix("fwd-home-").tempdir()?;
        let user = TestUser::login(groups, home.path())?;
        let ssh_user = Self { user, home };
        ssh_user.chown(ssh_user.home.path())?;
        std::fs::create_dir(ssh_user.ssh_dir())?;
        ssh_user.chown(&ssh_user.ssh_dir())?;
        keygen(&ssh_user.identity())?;
        ssh_user.chown(&ssh_user.identity())?;
        ssh_user.chown(&ssh_user.ssh_dir().join("id_ed25519.pub"))?;
        Ok(ssh_user)
    }

    pub fn name(&self) -> &str {
        &self.user.name
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    fn ssh_dir(&self) -> PathBuf {
        self.home.path().join(".ssh")
    }

    /// The private key.
    pub fn identity(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }

    pub fn public_key(&self) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.ssh_dir().join("id_ed25519.pub"),
        )?)
    }

    fn chown(&self, path: &Path) -> Result<()> {
        let uid = nix::unistd::Uid::from_raw(self.user.uid);
        let gid = nix::unistd::User::from_uid(uid)?
            .with_context(|| format!("user {} vanished", self.user.name))?
            .gid;
        nix::unistd::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {} to {}", path.display(), self.user.name))
    }

    /// Writes `contents` to `relative` under the home, owned by the user,
    /// not writable by others (ssh refuses a config others may write).
    pub fn write_file(&self, relative: &str, contents: &str) -> Result<PathBuf> {
        let path = self.home.path().join(relative);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        self.chown(&path)?;
        Ok(path)
    }

    /// Makes ssh trust each sshd's host key (~/.ssh/known_hosts).
    pub fn trust(&self, sshds: &[&Sshd]) -> Result<()> {
        let mut lines = String::new();
        for sshd in sshds {
            lines.push_str(&sshd.known_hosts_line()?);
            lines.push('\n');
        }
        self.write_file(".ssh/known_hosts", &lines)?;
        Ok(())
    }

    /// `runuser -u USER -- WORDS...` as one shell line (for tmux): the
    /// user's own environment (HOME, USER, SHELL) and groups, no root left.
    pub fn shell_line(&self, words: &str) -> String {
        format!("runuser -u {} -- {words}", self.user.name)
    }

    /// `program` as the user inside `ns`.
    pub fn command(&self, ns: &Netns, program: &str) -> Command {
        let mut command = ns.exec("runuser");
        command.args(["-u", &self.user.name, "--", program]);
        command
    }
}
