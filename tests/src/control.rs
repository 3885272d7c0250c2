//! Driving the daemon's control plane the wrong way: verbs that must fail,
//! raw bytes on the control socket, and callers without permission.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd::{self, Output, SHORT};
use crate::relay::Relay;

/// The uid/gid `nobody`, in no group: a caller with no business on the socket.
const NOBODY: &str = "65534";

impl Relay {
    /// `/run/forwarder/<instance>.sock`, where the daemon listens.
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/forwarder/{}.sock", self.instance()))
    }

    /// Runs a CLI verb (with `--instance`) and returns how it ended, success or not.
    pub fn try_verb(&self, args: &[&str]) -> Result<Output> {
        let (verb, rest) = args.split_first().context("no verb")?;
        cmd::run(
            self.cli()
                .arg(verb)
                .args(["--instance", self.instance()])
                .args(rest),
            SHORT,
        )
    }

    /// Runs a CLI verb as uid/gid 65534 with no supplementary groups
    /// (util-linux `setpriv`), against this daemon.
    pub fn try_verb_unprivileged(&self, args: &[&str]) -> Result<Output> {
        let bin = crate::relay::forwarder_bin()?;
        let mut command = std::process::Command::new("setpriv");
        command
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
            .arg(bin)
            .args(args)
            .args(["--instance", self.instance()]);
        cmd::run(&mut command, SHORT)
    }

    /// Writes `bytes` to the control socket as one connection, half-closes
    /// it and returns everything the daemon answered.
    pub fn raw_request(&self, bytes: &[u8]) -> Result<String> {
        let path = self.socket_path();
        let mut stream = UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_write_timeout(Some(Duration::from_secs(15)))?;
        // The daemon answers an oversized request and closes before reading
        // all of it, which resets the connection: write from another thread
        // while this one reads, so the reply is taken before the reset.
        let mut writer = stream.try_clone()?;
        let bytes = bytes.to_vec();
        let writing = std::thread::spawn(move || {
            let _ = writer.write_all(&bytes);
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
                Err(error) if reply.is_empty() => {
                    return Err(error)
                        .with_context(|| format!("reading the reply on {}", path.display()));
                }
                Err(_) => break,
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        writing
            .join()
            .map_err(|_| anyhow::anyhow!("the request writer panicked"))?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// What must not change when a request is refused: every session's id,
    /// port, backend and flows (counters and idle times left out).
    pub fn state(&self) -> Result<Vec<String>> {
        Ok(self
            .sessions()?
            .into_iter()
            .map(|s| {
                let flows: Vec<String> = s
                    .flows
                    .iter()
                    .map(|f| format!("{}>{}", f.client, f.upstream_port))
                    .collect();
                format!("{} {} {} [{}]", s.id, s.port, s.backend, flows.join(","))
            })
            .collect())
    }
}
