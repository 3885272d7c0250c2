//! A throwaway sshd inside a namespace: its own host key, one client key
//! allowed to log in as root, nothing read from the host's ssh configuration.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, SHORT};
use crate::netns::Netns;

/// sshd, stopped on drop.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sshd {
    /// Starts sshd in `ns` listening on `addr:port`, accepting root with the
    /// key at [`Sshd::client_key`].
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fwd-sshd-").tempdir()?;
        let path = |name: &str| dir.path().join(name);
        for key in ["host_key", "client_key"] {
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
                    path(key).to_str().context("temp path")?,
                ],
            )?;
        }
        std::fs::copy(path("client_key.pub"), path("authorized_keys"))?;
        let config = format!(
            "ListenAddress {addr}:{port}\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {authorized}\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n",
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
        let sshd = Self { child, dir };
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
