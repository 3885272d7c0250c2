//! Several relays behind one address, sharing their sessions through a real
//! etcd (Debian's etcd-server) that runs in the router's namespace.
//!
//! ```text
//!  client                  router                          relay i (0, 1, 2)              server
//!  veth-c 10.77.1.2 ── veth-rt 10.77.1.1                   veth-up 10.78.i+1.2            lo 10.80.0.2 (mosh-server)
//!                          veth-r<i> 10.78.i+1.1 ───────── + VIP 10.77.9.1/32             veth-s<i> 10.79.i+1.2
//!                          lo 10.77.8.1 (etcd :2379)       veth-dn 10.79.i+1.1 ────────── ┘
//!                          VIP via ECMP over every relay
//! ```
//! Every relay carries the shared address (VIP) on its client side; the
//! router splits clients over the relays by a hash of the 5-tuple
//! (fib_multipath_hash_policy=1), as a router running ECMP towards an
//! anycast address does. A relay "dies" by being killed and taken off the
//! router's route (its link down), as when a machine fails and the health
//! check withdraws it.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, SHORT};
use crate::netns::{Netns, veth_pair};
use crate::relay::Relay;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
pub const ROUTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// The one address clients use, whichever relay they land on.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 8, 1);
pub const ETCD_PORT: u16 = 2379;
/// mosh-server's address, reached by every relay over its own link.
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 2);

pub const RELAY_UP_IF: &str = "veth-up";
pub const RELAY_DOWN_IF: &str = "veth-dn";

/// The relays' names in the cluster (`--relay-name`).
pub fn relay_name(index: usize) -> String {
    format!("relay{index}")
}

fn router_if(index: usize) -> String {
    format!("veth-r{index}")
}

fn relay_up_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, index as u8 + 1, 2)
}

fn router_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, index as u8 + 1, 1)
}

/// The namespaces; dropping it removes them.
#[derive(Debug)]
pub struct ClusterTopology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub relays: Vec<Netns>,
}

impl ClusterTopology {
    pub fn build(relays: usize) -> Result<Self> {
        let topo = Self {
            client: Netns::new("client")?,
            router: Netns::new("router")?,
            server: Netns::new("server")?,
            relays: (0..relays)
                .map(|_| Netns::new("relay"))
                .collect::<Result<_>>()?,
        };
        topo.wire().context("building the cluster topology")?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        veth_pair(&self.client, "veth-c", &self.router, "veth-rt")?;
        self.client.add_addr(CLIENT_IP, "veth-c")?;
        self.router.add_addr(ROUTER_CLIENT_IP, "veth-rt")?;
        self.client.default_via(ROUTER_CLIENT_IP)?;
        self.router.sysctl("net.ipv4.ip_forward", "1")?;
        // Split by the 5-tuple, so each mosh-client socket sticks to one relay.
        self.router
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        self.router
            .ip(&["addr", "add", &format!("{ETCD_IP}/32"), "dev", "lo"])?;
        self.server
            .ip(&["addr", "add", &format!("{BACKEND_IP}/32"), "dev", "lo"])?;
        for (index, relay) in self.relays.iter().enumerate() {
            let router_if = router_if(index);
            veth_pair(&self.router, &router_if, relay, RELAY_UP_IF)?;
            self.router.add_addr(router_ip(index), &router_if)?;
            relay.add_addr(relay_up_ip(index), RELAY_UP_IF)?;
            relay.ip(&["addr", "add", &format!("{VIP}/32"), "dev", RELAY_UP_IF])?;
            relay.default_via(router_ip(index))?;
            let server_if = format!("veth-s{index}");
            veth_pair(relay, RELAY_DOWN_IF, &self.server, &server_if)?;
            let down = Ipv4Addr::new(10, 79, index as u8 + 1, 1);
            let server_side = Ipv4Addr::new(10, 79, index as u8 + 1, 2);
            relay.add_addr(down, RELAY_DOWN_IF)?;
            self.server.add_addr(server_side, &server_if)?;
            relay.ip(&[
                "route",
                "add",
                &format!("{BACKEND_IP}/32"),
                "via",
                &server_side.to_string(),
            ])?;
            relay.sysctl("net.ipv4.ip_forward", "1")?;
        }
        let all: Vec<usize> = (0..self.relays.len()).collect();
        self.route_vip_over(&all)
    }

    /// The router sends the shared address to these relays (ECMP over
    /// several, a plain route for one).
    pub fn route_vip_over(&self, relays: &[usize]) -> Result<()> {
        if relays.is_empty() {
            bail!("the shared address needs at least one relay");
        }
        let vip = format!("{VIP}/32");
        let mut args: Vec<String> = vec!["route".into(), "replace".into(), vip];
        for &index in relays {
            args.extend([
                "nexthop".into(),
                "via".into(),
                relay_up_ip(index).to_string(),
                "dev".into(),
                router_if(index),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.router.ip(&refs).map(drop)
    }

    /// Takes relay `index` off the network as a machine failure does: its
    /// link goes down and the router's route keeps only `survivors`.
    pub fn cut_relay(&self, index: usize, survivors: &[usize]) -> Result<()> {
        self.router
            .ip(&["link", "set", &router_if(index), "down"])?;
        self.route_vip_over(survivors)
    }

    /// Brings relay `index` back onto the network and into the route over `relays`.
    pub fn restore_relay(&self, index: usize, relays: &[usize]) -> Result<()> {
        self.router.ip(&["link", "set", &router_if(index), "up"])?;
        self.route_vip_over(relays)
    }

    /// The URL relays reach etcd at.
    pub fn etcd_url(&self) -> String {
        format!("http://{ETCD_IP}:{ETCD_PORT}")
    }

    /// Starts relay `index` in the cluster, with `extra` flags.
    pub fn start_relay(&self, index: usize, extra: &[&str]) -> Result<Relay> {
        let url = self.etcd_url();
        let name = relay_name(index);
        let mut args = vec!["--etcd", url.as_str(), "--relay-name", name.as_str()];
        args.extend_from_slice(extra);
        Relay::start(&self.relays[index], &[RELAY_UP_IF, RELAY_DOWN_IF], &args)
    }
}

/// A single-member etcd (Debian's etcd-server) in a namespace, with its
/// data in a temporary folder; killed and removed on drop. Stopping and
/// starting it again keeps its data, as an etcd outage does.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    command: Vec<String>,
    /// etcdctl's TLS flags, when etcd serves HTTPS.
    etcdctl_tls: Vec<String>,
    url: String,
    ns_name: String,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

/// How long etcd may take to answer after a start.
const ETCD_READY: Duration = Duration::from_secs(30);

impl Etcd {
    /// Plain HTTP on `ip:port`.
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<Self> {
        Self::start_with(ns, ip, port, None)
    }

    /// HTTPS on `ip:port` with a server certificate from `pki`, and client
    /// certificates required (`--client-cert-auth`).
    pub fn start_tls(ns: &Netns, ip: Ipv4Addr, port: u16, pki: &Pki) -> Result<Self> {
        Self::start_with(ns, ip, port, Some(pki))
    }

    fn start_with(ns: &Netns, ip: Ipv4Addr, port: u16, tls: Option<&Pki>) -> Result<Self> {
        for (tool, package) in [("etcd", "etcd-server"), ("etcdctl", "etcd-client")] {
            if which::which(tool).is_err() {
                bail!(
                    "{tool} not found: apt-get install {package} (or `cargo xtask prereq`, which installs it)"
                );
            }
        }
        let dir = tempfile::Builder::new().prefix("fwd-etcd-").tempdir()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{ip}:{port}");
        let peer = format!("http://127.0.0.1:{}", port + 1);
        let data = dir.path().join("data");
        let mut command = vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            ns.name().into(),
            "etcd".into(),
            "--name".into(),
            "fwd".into(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            url.clone(),
            "--advertise-client-urls".into(),
            url.clone(),
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("fwd={peer}"),
        ];
        let mut etcdctl_tls = Vec::new();
        if let Some(pki) = tls {
            let path = |p: &PathBuf| p.to_string_lossy().into_owned();
            command.extend([
                "--cert-file".into(),
                path(&pki.server_cert),
                "--key-file".into(),
                path(&pki.server_key),
                "--trusted-ca-file".into(),
                path(&pki.ca),
                "--client-cert-auth".into(),
            ]);
            etcdctl_tls = vec![
                "--cacert".into(),
                path(&pki.ca),
                "--cert".into(),
                path(&pki.client_cert),
                "--key".into(),
                path(&pki.client_key),
            ];
        }
        let mut etcd = Self {
            child: None,
            command,
            etcdctl_tls,
            url,
            ns_name: ns.name().to_string(),
            log_path: dir.path().join("etcd.log"),
            dir,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops etcd (SIGKILL: an outage, not a goodbye); its data stays.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts etcd again on the same data and waits until it answers.
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("etcd is running already");
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let (program, args) = self.command.split_first().context("empty etcd command")?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting `{}`", self.command.join(" ")))?;
        self.child = Some(child);
        let deadline = Instant::now() + ETCD_READY;
        loop {
            let out = cmd::run(&mut self.etcdctl(&["endpoint", "health"]), SHORT)?;
            if out.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd did not answer within {ETCD_READY:?}: {}\nits log:\n{}",
                    out.stderr.trim(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn etcdctl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns_name, "etcdctl"])
            .args(["--endpoints", &self.url, "--command-timeout", "3s"])
            .args(&self.etcdctl_tls)
            .args(args)
            .env("ETCDCTL_API", "3");
        command
    }

    /// Every key under `prefix` with its value, as etcd holds them.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = cmd::run_ok(&mut self.etcdctl(&["get", "--prefix", prefix]), SHORT)?;
        let lines: Vec<&str> = out.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0].to_string(), pair[1].to_string()))
            .collect())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A throwaway certificate authority (openssl) with a server certificate
/// for etcd at `ETCD_IP` and a client certificate for the relays; removed
/// on drop.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    pub fn create(server_ip: Ipv4Addr) -> Result<Self> {
        if which::which("openssl").is_err() {
            bail!("openssl not found: apt-get install openssl (or `cargo xtask prereq`)");
        }
        let dir = tempfile::Builder::new().prefix("fwd-pki-").tempdir()?;
        let at = |name: &str| dir.path().join(name);
        let text = |p: PathBuf| p.to_string_lossy().into_owned();
        let openssl = |args: &[String]| -> Result<()> {
            cmd::run_ok(Command::new("openssl").args(args), SHORT).map(drop)
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca_args: Vec<String> = vec!["req".into(), "-x509".into()];
        ca_args.extend(new_key.map(String::from));
        ca_args
            .extend(["-days", "2", "-subj", "/CN=forwarder test CA", "-keyout"].map(String::from));
        ca_args.extend([text(at("ca.key")), "-out".into(), text(at("ca.pem"))]);
        openssl(&ca_args)?;
        for (name, extensions) in [
            (
                "server",
                format!("subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n"),
            ),
            ("client", "extendedKeyUsage=clientAuth\n".to_string()),
        ] {
            let mut csr: Vec<String> = vec!["req".into()];
            csr.extend(new_key.map(String::from));
            csr.extend([
                "-subj".into(),
                format!("/CN={name}"),
                "-keyout".into(),
                text(at(&format!("{name}.key"))),
                "-out".into(),
                text(at(&format!("{name}.csr"))),
            ]);
            openssl(&csr)?;
            std::fs::write(at(&format!("{name}.ext")), extensions)?;
            openssl(&[
                "x509".into(),
                "-req".into(),
                "-days".into(),
                "2".into(),
                "-in".into(),
                text(at(&format!("{name}.csr"))),
                "-CA".into(),
                text(at("ca.pem")),
                "-CAkey".into(),
                text(at("ca.key")),
                "-CAcreateserial".into(),
                "-extfile".into(),
                text(at(&format!("{name}.ext"))),
                "-out".into(),
                text(at(&format!("{name}.pem"))),
            ])?;
        }
        Ok(Self {
            ca: at("ca.pem"),
            server_cert: at("server.pem"),
            server_key: at("server.key"),
            client_cert: at("client.pem"),
            client_key: at("client.key"),
            _dir: dir,
        })
    }
}

/// A cluster secret for `--etcd-secret-file`: 32 random bytes (hex), mode
/// 0600, in a temporary folder removed on drop.
#[derive(Debug)]
pub struct ClusterSecret {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ClusterSecret {
    pub fn create() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("fwd-secret-").tempdir()?;
        let path = dir.path().join("cluster.secret");
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, hex + "\n")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self { path, _dir: dir })
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }
}

/// A mosh key's 16 bytes, decoded by coreutils' base64 (mosh prints it
/// unpadded).
pub fn mosh_key_bytes(key: &str) -> Result<Vec<u8>> {
    use std::io::Write;
    let padded = format!("{key}{}", "=".repeat((4 - key.len() % 4) % 4));
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running base64 -d")?;
    child
        .stdin
        .take()
        .context("base64's stdin")?
        .write_all(padded.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() || out.stdout.len() != 16 {
        bail!("{key:?} is not a mosh key (base64 of 16 bytes)");
    }
    Ok(out.stdout)
}
