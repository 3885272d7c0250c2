//! Conditions under which the kernel loses or slows packets without any
//! counter of ours saying so, checked at start and every few seconds (so
//! interfaces that change while the daemon runs are caught too):
//!
//! - a veth whose peer has neither GRO nor an XDP program: in native mode
//!   every frame XDP redirects or bounces (XDP_TX) into it is dropped by the
//!   veth driver, while our counters say "redirect"/"tx". The peer usually
//!   lives in another network namespace: the check finds it by the veth's
//!   IFLA_LINK / IFLA_LINK_NETNSID (`ip -d link`) among the named
//!   namespaces (`ip netns list`, whose ids are this namespace's view) and
//!   reads its XDP attachment and GRO flag there, so the warning comes
//!   before the first lost packet. A peer in a namespace without a name
//!   cannot be inspected that way; then only what the driver counts is
//!   left: `rx_queue_N_xdp_tx_errors` counts lost XDP_TX frames. (A failed
//!   redirect into a veth is counted nowhere on this kernel: veth_xdp_xmit
//!   returns -ENXIO before its counters, which is why the peer is inspected.)
//! - an interface that is down or has no carrier: redirects into it fail;
//! - IPv4 forwarding disabled on an interface: `bpf_fib_lookup` refuses to
//!   forward, so every packet goes to the daemon's slow path (`fib_failed`).
//!
//! The daemon shells out to iproute2 and ethtool (both prerequisites, the
//! daemon already uses `ip`) rather than carry netlink and ethtool ioctl
//! code for a check that runs every few seconds.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::control::proto::Warning;

/// How often the conditions are checked.
const PERIOD: Duration = Duration::from_secs(2);
/// A drop warning stays this long after the drop counters last grew.
const DROPS_LINGER: Duration = Duration::from_secs(30);

static CURRENT: Mutex<Vec<Warning>> = Mutex::new(Vec::new());

/// The warnings of the last check, for `stats` and metrics.
pub fn current() -> Vec<Warning> {
    CURRENT.lock().expect("health lock").clone()
}

/// Checks forever, logging each warning when it appears and when it clears.
pub async fn watch(interfaces: Vec<String>, mode: String) {
    let native = mode.split('+').any(|m| m == "native");
    let mut checker = Checker::default();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let (found, back) = {
            let interfaces = interfaces.clone();
            match tokio::task::spawn_blocking(move || {
                let found = checker.check(&interfaces, native);
                (found, checker)
            })
            .await
            {
                Ok(result) => result,
                Err(_) => return,
            }
        };
        checker = back;
        publish(found);
    }
}

fn publish(found: Vec<Warning>) {
    let mut current = CURRENT.lock().expect("health lock");
    for warning in found.iter().filter(|w| !current.iter().any(|c| c.kind == w.kind && c.interface == w.interface)) {
        warn!(kind = %warning.kind, interface = %warning.interface, "{}", warning.message);
    }
    for gone in current.iter().filter(|c| !found.iter().any(|w| w.kind == c.kind && w.interface == c.interface)) {
        info!(kind = %gone.kind, interface = %gone.interface, "cleared: {}", gone.message);
    }
    *current = found;
}

#[derive(Default)]
struct Checker {
    /// Per interface: veth drop counters at the last check, and when they last grew.
    drops: BTreeMap<String, (u64, Option<(Instant, u64)>)>,
}

impl Checker {
    fn check(&mut self, interfaces: &[String], native: bool) -> Vec<Warning> {
        let mut warnings = Vec::new();
        for name in interfaces {
            let warn = |kind: &str, message: String| Warning {
                kind: kind.to_string(),
                interface: name.clone(),
                message,
            };
            let Some(link) = link_of(name) else {
                warnings.push(warn(
                    "interface_missing",
                    format!(
                        "interface {name} is gone from this network namespace: nothing is forwarded on it; \
                         re-create it and restart the daemon so XDP attaches to it again"
                    ),
                ));
                continue;
            };
            let flags: Vec<&str> =
                link["flags"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
            if !flags.contains(&"UP") || !flags.contains(&"LOWER_UP") {
                warnings.push(warn(
                    "interface_down",
                    format!(
                        "interface {name} is down or has no carrier (flags {}): packets XDP redirects or \
                         sends back out of it are dropped by the kernel; bring it up (`ip link set {name} up`) \
                         and, for a veth, its peer too",
                        flags.join(",")
                    ),
                ));
            }
            if forwarding_disabled(name) {
                warnings.push(warn(
                    "forwarding_disabled",
                    format!(
                        "IPv4 forwarding is off on {name} (net.ipv4.conf.{name}.forwarding=0): the kernel's \
                         route lookup refuses to forward, so every packet arriving on it goes to the daemon's \
                         slow path (reason fib_failed) instead of staying in XDP; enable it with \
                         `sysctl -w net.ipv4.ip_forward=1` (or net.ipv4.conf.{name}.forwarding=1)"
                    ),
                ));
            }
            let is_veth = link["linkinfo"]["info_kind"].as_str() == Some("veth");
            if native && is_veth
                && let Some(peer) = veth_peer(&link)
                && !peer.gro
                && !peer.xdp
            {
                let exec = peer.netns.as_ref().map_or_else(String::new, |ns| format!("ip netns exec {ns} "));
                warnings.push(warn(
                    "veth_peer_no_gro",
                    format!(
                        "veth {name}'s peer {} (namespace {}) has neither GRO nor an XDP program: in native \
                         mode the kernel drops every packet XDP redirects or sends back into {name}, while \
                         the counters say forwarded. Enable GRO on the peer (`{exec}ethtool -K {} gro on`, \
                         then take the peer down and up) or attach an XDP program to it, or run the relay \
                         with --xdp-mode skb",
                        peer.name,
                        peer.netns.as_deref().unwrap_or("this one"),
                        peer.name
                    ),
                ));
            }
            if native && is_veth {
                let peer = link["link_index"].as_u64().map_or_else(|| "?".to_string(), |i| i.to_string());
                if let Some(message) = self.veth_drops(name, &peer) {
                    warnings.push(warn("veth_peer_drops", message));
                }
            }
        }
        warnings.sort();
        warnings
    }

    /// A warning while the veth's XDP transmit errors grow (and a while after).
    fn veth_drops(&mut self, name: &str, peer: &str) -> Option<String> {
        let now = Instant::now();
        let total = veth_xmit_errors(name)?;
        let entry = self.drops.entry(name.to_string()).or_insert((total, None));
        if total > entry.0 {
            let first = entry.1.map_or(entry.0, |(_, since)| since);
            entry.1 = Some((now, first));
        }
        entry.0 = total;
        let (last_growth, since) = entry.1?;
        if now.duration_since(last_growth) > DROPS_LINGER {
            entry.1 = None;
            return None;
        }
        Some(format!(
            "the kernel dropped {} packets that XDP had forwarded into veth {name} (driver counters \
             xdp_xmit_errors/xdp_tx_errors): its peer (ifindex {peer}, possibly in another namespace) has \
             neither GRO nor an XDP program, which native-mode redirects into a veth need. Enable GRO on the \
             peer before it comes up (`ethtool -K <peer> gro on`, then `ip link set <peer> down; ip link set \
             <peer> up`) or attach an XDP program to it, or run the relay with --xdp-mode skb",
            total - since
        ))
    }
}

/// What the far end of a veth takes: redirected frames need its NAPI,
/// which GRO or an XDP program turns on.
struct VethPeer {
    name: String,
    /// The named namespace it lives in; None: this one.
    netns: Option<String>,
    gro: bool,
    xdp: bool,
}

/// The peer of the veth `link` (from `ip -j -d link`), when it can be found:
/// in this namespace, or in a named one whose id matches the link's netnsid.
fn veth_peer(link: &serde_json::Value) -> Option<VethPeer> {
    let index = link["link_index"].as_u64()?;
    let netns = match link["link_netnsid"].as_i64() {
        None => None,
        Some(id) => {
            let output = Command::new("ip").args(["-j", "netns", "list"]).output().ok()?;
            let list: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            let name = list.as_array()?.iter().find(|ns| ns["id"].as_i64() == Some(id))?["name"].as_str()?;
            Some(name.to_string())
        }
    };
    let mut ip = Command::new("ip");
    if let Some(ns) = &netns {
        ip.args(["-n", ns]);
    }
    let output = ip.args(["-j", "-d", "link", "show"]).output().ok()?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let peer = links.as_array()?.iter().find(|l| l["ifindex"].as_u64() == Some(index))?;
    let name = peer["ifname"].as_str()?.to_string();
    let xdp = peer.get("xdp").is_some_and(|x| !x.is_null());
    let mut ethtool = match &netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}")).arg("ethtool");
            cmd
        }
        None => Command::new("ethtool"),
    };
    let output = ethtool.args(["-k", &name]).output().ok()?;
    let features = String::from_utf8_lossy(&output.stdout);
    let gro = features.lines().find_map(|l| l.trim().strip_prefix("generic-receive-offload:"))?.trim().starts_with("on");
    Some(VethPeer { name, netns, gro, xdp })
}

/// `ip -j -d link show dev NAME`, or None when there is no such interface.
fn link_of(name: &str) -> Option<serde_json::Value> {
    let output = Command::new("ip").args(["-j", "-d", "link", "show", "dev", name]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let mut links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    Some(links.get_mut(0)?.take())
}

fn forwarding_disabled(name: &str) -> bool {
    let read = |path: String| std::fs::read_to_string(path).ok().map(|v| v.trim() == "0");
    read(format!("/proc/sys/net/ipv4/conf/{name}/forwarding")).unwrap_or(false)
}

/// The sum of a veth's counters of frames XDP handed it that it could not pass on.
fn veth_xmit_errors(name: &str) -> Option<u64> {
    let output = Command::new("ethtool").args(["-S", name]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    Some(parse_xmit_errors(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_xmit_errors(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .filter(|(key, _)| key.ends_with("xdp_xmit_errors") || key.ends_with("xdp_tx_errors"))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_veth_counters_that_mean_silent_drops() {
        let text = "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_xdp_drops: 7\n     rx_queue_0_xdp_tx_errors: 3\n\
                    \x20    tx_queue_0_xdp_xmit: 100\n     tx_queue_0_xdp_xmit_errors: 40\n     tx_queue_1_xdp_xmit_errors: 2\n";
        // xdp_drops are the program's own XDP_DROP verdicts, counted by us already.
        assert_eq!(parse_xmit_errors(text), 45);
    }
}
