//! Network namespaces and veth pairs that clean up after themselves.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, SHORT};

/// Every namespace this crate creates starts with this, so stale ones can be found.
pub const PREFIX: &str = "fwd-";

/// A random lowercase hex string, for unique names across runs and parallel tests.
pub fn random_tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop together with
/// every process still running in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `fwd-<role>-<pid>-<random>`. The pid lets a later run tell that
    /// the creator died without cleaning up (see [`sweep_stale`]).
    pub fn new(role: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            if let Err(e) = sweep_stale() {
                eprintln!("warning: sweeping stale namespaces failed: {e:#}");
            }
        });
        assert!(
            !role.contains('-'),
            "role names must not contain '-': the stale sweep parses names from the end"
        );
        let name = format!("{PREFIX}{role}-{}-{}", std::process::id(), random_tag());
        cmd::sh("ip", &["netns", "add", &name])
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name };
        // Loopback is down in a fresh namespace; programs binding 127.0.0.1 would fail oddly.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip netns exec NAME program`: a command to configure and spawn into.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `nsenter --net=/run/netns/NAME -- program`. Unlike `ip netns exec` it
    /// keeps the host's /sys, so bpffs pins made inside stay visible outside.
    pub fn nsenter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args...` inside the namespace; returns stdout, fails on non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        cmd::run_ok(self.exec(program).args(args), SHORT)
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        cmd::run_ok(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            SHORT,
        )
    }

    /// Gives `dev` the address `ip/24`.
    pub fn add_addr(&self, ip: std::net::Ipv4Addr, dev: &str) -> Result<()> {
        self.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])
            .map(drop)
    }

    /// Gives `dev` the address `ip/64`, usable at once: `nodad` skips
    /// duplicate address detection, which would hold the address
    /// "tentative" (unusable as a source) for a second or more.
    pub fn add_addr6(&self, ip: std::net::Ipv6Addr, dev: &str) -> Result<()> {
        self.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            dev,
            "nodad",
        ])
        .map(drop)
    }

    /// Removes every IPv4 address (and with them the IPv4 routes) of `dev`:
    /// the namespace is on an IPv6-only network from now on.
    pub fn drop_ipv4(&self, dev: &str) -> Result<()> {
        self.ip(&["-4", "addr", "flush", "dev", dev]).map(drop)
    }

    /// Routes everything IPv6 off-link through `gateway`.
    pub fn default_via6(&self, gateway: std::net::Ipv6Addr) -> Result<()> {
        self.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])
            .map(drop)
    }

    /// Sets `dev`'s MAC address, for tests that craft frames naming it.
    pub fn set_mac(&self, dev: &str, mac: [u8; 6]) -> Result<()> {
        self.ip(&["link", "set", dev, "address", &mac_string(mac)])
            .map(drop)
    }

    /// A permanent neighbour entry: route lookups resolve `ip` to `mac` on
    /// `dev` without ever sending ARP.
    pub fn add_neigh(&self, ip: std::net::Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
        self.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac_string(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    }

    /// Routes everything off-link through `gateway`.
    pub fn default_via(&self, gateway: std::net::Ipv4Addr) -> Result<()> {
        self.ip(&["route", "add", "default", "via", &gateway.to_string()])
            .map(drop)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = cmd::sh("ip", &["netns", "pids", &self.name])?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// `GET path` from inside the namespace (the daemon's metrics listen on
    /// its loopback): the whole HTTP response, head and body.
    pub fn http_get(&self, address: &str, path: &str) -> Result<String> {
        let target = address.to_string();
        let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
        self.within(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&target)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .with_context(|| format!("GET {path} from {address} in {}", self.name))
    }

    /// Runs `f` on a short-lived thread that has joined this namespace. Sockets
    /// created there stay in this namespace after the thread ends, so the test
    /// process can talk from inside without helper processes.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the namespace")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside namespace panicked"))?
    }

    /// Like [`within`](Self::within), for a closure that borrows from the
    /// caller (a loaded eBPF object, a table of test cases) and may panic: it
    /// runs on a scoped thread, and its panic resumes in the caller, so a
    /// test fails with its own assertion message. The caller's thread never
    /// changes namespace.
    pub fn scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the namespace")?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.within(move || UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}")))
            .with_context(|| format!("in namespace {}", self.name))
    }

    /// Pings `ip` from inside this namespace, a few tries: the first packet may
    /// be spent on neighbour resolution.
    pub fn ping(&self, ip: &str) -> Result<()> {
        let out = cmd::run(
            self.exec("ping")
                .args(["-c", "3", "-i", "0.2", "-W", "2", ip]),
            SHORT,
        )?;
        if !out.success() {
            bail!(
                "ping {ip} from {} failed:\n{}{}",
                self.name,
                out.stdout,
                out.stderr
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("warning: removing namespace {}: {e:#}", self.name);
        }
    }
}

/// Kills what still runs in `name` and deletes it. Daemonized helpers (mosh-server,
/// tmux) would otherwise keep the namespace and its veths alive forever.
fn destroy(name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    for round in 0.. {
        let pids_out = cmd::sh("ip", &["netns", "pids", name]).unwrap_or_default();
        let pids: Vec<i32> = pids_out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        let signal = if round == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cmd::sh("ip", &["netns", "del", name])?;
    Ok(())
}

/// Deletes `fwd-<role>-<pid>-<tag>` namespaces whose creating process is gone
/// (a test run killed by SIGKILL cannot run its Drop guards).
pub fn sweep_stale() -> Result<()> {
    let list = cmd::sh("ip", &["netns", "list"])?;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let mut parts = name.rsplit('-');
        let _tag = parts.next();
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name} (creator pid {pid} is gone)");
            if let Err(e) = destroy(name) {
                eprintln!("warning: {e:#}");
            }
        }
    }
    Ok(())
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// Creates a veth pair with one end in each namespace. It is created inside `a`
/// directly so no end ever appears in the root namespace, and is configured the
/// way XDP tests need: tx checksum offload off (locally generated packets carry
/// partial checksums that a rewrite would corrupt) and GRO on (native XDP
/// redirect into a veth needs it on the receiving side).
///
/// `a` and `b` may be the same namespace: both ends then live in it, like
/// the two legs of a router whose route lookups a test drives.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    assert!(
        a_if.len() <= 15 && b_if.len() <= 15,
        "interface names are at most 15 bytes"
    );
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| format!("creating veth {a_if}@{} <-> {b_if}@{}", a.name(), b.name()))?;
    // Features first, links up after: veth decides whether a device accepts
    // XDP redirects (ndo_xdp_xmit) from its peer's GRO setting when it comes
    // up, so an end brought up before its peer enabled GRO drops every packet
    // redirected into it.
    for (ns, dev) in [(a, a_if), (b, b_if)] {
        ns.run("ethtool", &["-K", dev, "tx", "off", "gro", "on"])?;
    }
    for (ns, dev) in [(a, a_if), (b, b_if)] {
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}
