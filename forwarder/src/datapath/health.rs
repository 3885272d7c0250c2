//! Conditions under which the kernel loses or slows packets without any
//! counter of ours saying so, checked at start and every few seconds (so
//! interfaces that change while the daemon runs are caught too):
//!
//! - a veth whose peer has neither GRO nor an XDP program: in native mode
//!   every frame XDP redirects or bounces (XDP_TX) into it is dropped by the
//!   veth driver, while our counters say "redirect"/"tx". The peer usually
//!   lives in another network namespace: the check finds it by the veth's
//!   IFLA_LINK / IFLA_LINK_NETNSID (rtnetlink) among the named namespaces
//!   (/run/netns, each asked for the id this namespace gives it) and reads
//!   its XDP attachment (rtnetlink) and GRO flag (the ioctl behind
//!   `ethtool -k`), both from a thread inside that namespace, so the warning
//!   comes before the first lost packet. A peer in a namespace without a
//!   name cannot be inspected that way; then the veths' own driver counters
//!   (what `ethtool -S` prints) show the loss once packets flow: a redirect into a veth whose
//!   peer has no NAPI fails at enqueue and counts as `rx_queue_N_drops` on
//!   the ingress veth, a later failure leaves a redirect taken on one veth
//!   (`rx_queue_N_xdp_redirect`) missing from the other's
//!   `tx_queue_N_xdp_xmit`, and lost XDP_TX frames count as `xdp_tx_errors`;
//! - an interface that is down or has no carrier: redirects into it fail;
//! - IPv4 forwarding disabled on an interface: `bpf_fib_lookup` refuses to
//!   forward, so every packet goes to the daemon's slow path (`fib_failed`);
//!   likewise IPv6 forwarding on an interface with a global IPv6 address
//!   (off by default on most hosts, and an IPv4-only relay needs none).
//!
//! Links and namespaces come from rtnetlink (`super::netlink`); the GRO flag
//! and the veth driver's statistics from the SIOCETHTOOL ioctl
//! (`super::ethtool`), so the check spawns no process: it runs every few
//! seconds for as long as the daemon does. The counter names are the ones
//! `ethtool -S` prints, which operators read anyway.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use forwarder_api::Warning;

use super::{ethtool, netlink};

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
    let xdp = mode != "userspace";
    let mut checker = Checker::default();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let (found, back) = {
            let interfaces = interfaces.clone();
            match tokio::task::spawn_blocking(move || {
                let found = checker.check(&interfaces, xdp, native);
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
    for warning in found.iter().filter(|w| {
        !current
            .iter()
            .any(|c| c.kind == w.kind && c.interface == w.interface)
    }) {
        warn!(kind = %warning.kind, interface = %warning.interface, "{}", warning.message);
    }
    for gone in current.iter().filter(|c| {
        !found
            .iter()
            .any(|w| w.kind == c.kind && w.interface == c.interface)
    }) {
        info!(kind = %gone.kind, interface = %gone.interface, "cleared: {}", gone.message);
    }
    *current = found;
}

#[derive(Default)]
struct Checker {
    /// Per veth: its driver counters at the last check.
    counters: BTreeMap<String, VethCounters>,
    /// Per veth: packets lost into it in the current episode, and when the
    /// loss last grew.
    losing: BTreeMap<String, (u64, Instant)>,
}

/// A veth's driver counters (`ethtool -S`) that account for XDP frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VethCounters {
    /// XDP_TX and redirected frames the driver counted as failed.
    errors: u64,
    /// Redirect verdicts on frames that arrived on this veth.
    rx_redirect: u64,
    /// Frames that arrived on this veth and were dropped by the driver: on
    /// this kernel, a redirect into a veth whose peer has no NAPI fails at
    /// enqueue and lands here, on the ingress veth.
    rx_drops: u64,
    /// Frames redirected into this veth that reached its peer.
    tx_xmit: u64,
}

/// Frames a redirect may be in flight between two counter reads.
const IN_FLIGHT: u64 = 4;

impl Checker {
    fn check(&mut self, interfaces: &[String], xdp: bool, native: bool) -> Vec<Warning> {
        let mut warnings = Vec::new();
        let files = crate::datapath::fds::usage();
        if files.open + files.reserve >= files.limit {
            warnings.push(Warning {
                kind: "open_file_limit".to_string(),
                interface: String::new(),
                message: format!(
                    "the daemon holds {} of its {} open files ({} kept in reserve): new flows are refused; \
                     raise LimitNOFILE in the systemd unit / `ulimit -n` (or --max-open-files)",
                    files.open, files.limit, files.reserve
                ),
            });
        }
        let mut veths = Vec::new();
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
            if !link.up || !link.lower_up {
                let state = if link.up { "up, no carrier" } else { "down" };
                warnings.push(warn(
                    "interface_down",
                    format!(
                        "interface {name} is down or has no carrier ({state}): packets XDP redirects or \
                         sends back out of it are dropped by the kernel; bring it up (`ip link set {name} up`) \
                         and, for a veth, its peer too"
                    ),
                ));
            }
            if xdp && link.xdp_prog.is_none() {
                warnings.push(warn(
                    "xdp_detached",
                    format!(
                        "interface {name} has no XDP program any more (re-created, or detached by hand): its \
                         packets go through the kernel's stack and the daemon's sockets only; restart the \
                         daemon to attach again"
                    ),
                ));
            }
            if xdp && forwarding_disabled(name) {
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
            if xdp && ipv6_forwarding_disabled(name) {
                warnings.push(warn(
                    "ipv6_forwarding_disabled",
                    format!(
                        "IPv6 forwarding is off on {name} (net.ipv6.conf.{name}.forwarding=0), which has a \
                         global IPv6 address: the kernel's IPv6 route lookup refuses to forward, so every \
                         IPv6 packet arriving on it goes to the daemon's slow path (reason fib_failed); \
                         enable it with `sysctl -w net.ipv6.conf.all.forwarding=1` (the host then ignores \
                         router advertisements unless accept_ra=2)"
                    ),
                ));
            }
            let is_veth = link.veth;
            if native
                && is_veth
                && let Some(peer) = veth_peer(&link)
                && !peer.gro
                && !peer.xdp
            {
                let exec = peer
                    .netns
                    .as_ref()
                    .map_or_else(String::new, |ns| format!("ip netns exec {ns} "));
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
            if native
                && is_veth
                && let Some(counters) = veth_counters(name)
            {
                veths.push((name.clone(), counters));
            }
        }
        warnings.extend(self.veth_losses(veths));
        warnings.sort();
        warnings
    }

    /// What the driver counters say was lost into each veth since the last
    /// check: failed XDP_TX/xmit frames, plus redirects that never reached
    /// a peer. A redirect that fails for want of NAPI on the peer is counted
    /// nowhere, but every redirect taken on one veth (`rx_queue_N_xdp_redirect`)
    /// should show up as transmitted on the other (`tx_queue_N_xdp_xmit`):
    /// exact with two interfaces; with more, a shortfall is laid on every
    /// veth that transmitted nothing. Warnings linger [`DROPS_LINGER`].
    fn veth_losses(&mut self, veths: Vec<(String, VethCounters)>) -> Vec<Warning> {
        let now = Instant::now();
        let deltas: Vec<(String, VethCounters)> = veths
            .iter()
            .map(|(name, now_counters)| {
                let before = self.counters.get(name).copied().unwrap_or(*now_counters);
                let delta = VethCounters {
                    errors: now_counters.errors.saturating_sub(before.errors),
                    rx_redirect: now_counters.rx_redirect.saturating_sub(before.rx_redirect),
                    rx_drops: now_counters.rx_drops.saturating_sub(before.rx_drops),
                    tx_xmit: now_counters.tx_xmit.saturating_sub(before.tx_xmit),
                };
                (name.clone(), delta)
            })
            .collect();
        self.counters = veths.into_iter().collect();
        let redirected: u64 = deltas.iter().map(|(_, d)| d.rx_redirect).sum();
        let transmitted: u64 = deltas.iter().map(|(_, d)| d.tx_xmit).sum();
        let dropped: u64 = deltas.iter().map(|(_, d)| d.rx_drops).sum();
        for (index, (name, delta)) in deltas.iter().enumerate() {
            let unsent = if deltas.len() == 2 {
                let other = &deltas[1 - index].1;
                other.rx_redirect.saturating_sub(delta.tx_xmit) + other.rx_drops
            } else if delta.tx_xmit == 0 {
                redirected.saturating_sub(transmitted) + dropped
            } else {
                0
            };
            let lost = delta.errors + if unsent > IN_FLIGHT { unsent } else { 0 };
            if lost > 0 {
                let entry = self.losing.entry(name.clone()).or_insert((0, now));
                *entry = (entry.0 + lost, now);
            }
        }
        self.losing
            .retain(|_, (_, last)| now.duration_since(*last) <= DROPS_LINGER);
        self.losing
            .iter()
            .map(|(name, (lost, _))| Warning {
                kind: "veth_peer_drops".to_string(),
                interface: name.clone(),
                message: format!(
                    "about {lost} packets that XDP forwarded into veth {name} never reached its peer (veth \
                     driver counters: redirects taken vs xdp_xmit done, rx drops on the other veth, \
                     xdp_tx/xmit errors): the peer \
                     most likely has neither GRO nor an XDP program, which native-mode redirects into a veth \
                     need, or is down. Enable GRO on the peer (`ethtool -K <peer> gro on` in its namespace, \
                     then take it down and up) or attach an XDP program to it, or run the relay with \
                     --xdp-mode skb"
                ),
            })
            .collect()
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

/// The peer of the veth `link`, when it can be found: in this namespace,
/// or in a named one whose id matches the link's netnsid.
fn veth_peer(link: &netlink::Link) -> Option<VethPeer> {
    let index = link.peer_index?;
    let (netns, peer, gro) = match link.peer_netnsid {
        None => {
            let peer = netlink::links()
                .ok()?
                .into_iter()
                .find(|l| l.index == index)?;
            let gro = ethtool::gro_enabled(&peer.name).ok()?;
            (None, peer, gro)
        }
        Some(id) => {
            let (name, path) = std::fs::read_dir(NETNS_DIR)
                .ok()?
                .filter_map(Result::ok)
                .map(|entry| {
                    (
                        entry.file_name().to_string_lossy().into_owned(),
                        entry.path(),
                    )
                })
                .find(|(_, path)| netlink::nsid_of(path).ok().flatten() == Some(id))?;
            // The GRO ioctl answers for the namespace of its socket, so both
            // questions are asked from the thread inside the peer's.
            let (peer, gro) = netlink::in_namespace(&path, move || {
                let peer = netlink::links()?
                    .into_iter()
                    .find(|l| l.index == index)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
                let gro = ethtool::gro_enabled(&peer.name)?;
                Ok((peer, gro))
            })
            .ok()?;
            (Some(name), peer, gro)
        }
    };
    Some(VethPeer {
        name: peer.name,
        netns,
        gro,
        xdp: peer.xdp_prog.is_some(),
    })
}

/// Where `ip netns add` binds named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The interface `name` of this namespace, or None when there is none.
fn link_of(name: &str) -> Option<netlink::Link> {
    netlink::link_by_name(name).ok().flatten()
}

fn forwarding_disabled(name: &str) -> bool {
    let read = |path: String| std::fs::read_to_string(path).ok().map(|v| v.trim() == "0");
    read(format!("/proc/sys/net/ipv4/conf/{name}/forwarding")).unwrap_or(false)
}

fn ipv6_forwarding_disabled(name: &str) -> bool {
    let off = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/forwarding"))
        .is_ok_and(|v| v.trim() == "0");
    off && std::fs::read_to_string("/proc/net/if_inet6")
        .is_ok_and(|text| has_global_ipv6(&text, name))
}

/// Whether /proc/net/if_inet6 (address, ifindex, prefix length, scope,
/// flags, name per line) lists a global-scope address on `name`.
fn has_global_ipv6(if_inet6: &str, name: &str) -> bool {
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() == 6 && fields[3] == "00" && fields[5] == name
    })
}

/// A veth's XDP counters, summed over its queues.
fn veth_counters(name: &str) -> Option<VethCounters> {
    let stats = ethtool::driver_stats(name).ok()?;
    Some(sum_veth_counters(
        stats.iter().map(|(key, value)| (key.as_str(), *value)),
    ))
}

fn sum_veth_counters<'a>(stats: impl IntoIterator<Item = (&'a str, u64)>) -> VethCounters {
    let mut counters = VethCounters::default();
    for (key, value) in stats {
        if key.ends_with("xdp_xmit_errors") || key.ends_with("xdp_tx_errors") {
            counters.errors += value;
        } else if key.starts_with("rx_queue_") && key.ends_with("_xdp_redirect") {
            counters.rx_redirect += value;
        } else if key.starts_with("rx_queue_")
            && key.ends_with("_drops")
            && !key.ends_with("_xdp_drops")
        {
            counters.rx_drops += value;
        } else if key.starts_with("tx_queue_") && key.ends_with("_xdp_xmit") {
            counters.tx_xmit += value;
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_veth_counters_that_mean_silent_drops() {
        let stats = [
            ("peer_ifindex", 2),
            ("rx_queue_0_xdp_drops", 7),
            ("rx_queue_0_xdp_tx_errors", 3),
            ("rx_queue_0_xdp_redirect", 9),
            ("rx_queue_1_xdp_redirect", 1),
            ("tx_queue_0_xdp_xmit", 100),
            ("tx_queue_0_xdp_xmit_errors", 40),
            ("tx_queue_1_xdp_xmit_errors", 2),
            ("rx_queue_0_drops", 5),
        ];
        // xdp_drops are the program's own XDP_DROP verdicts, counted by us already.
        assert_eq!(
            sum_veth_counters(stats),
            VethCounters {
                errors: 45,
                rx_redirect: 10,
                rx_drops: 5,
                tx_xmit: 100
            }
        );
    }

    #[test]
    fn redirects_taken_on_one_veth_and_not_sent_on_the_other_are_losses() {
        let mut checker = Checker::default();
        let at = |rx_redirect, tx_xmit| VethCounters {
            errors: 0,
            rx_redirect,
            rx_drops: 0,
            tx_xmit,
        };
        let a = |c| ("a".to_string(), c);
        let b = |c| ("b".to_string(), c);
        assert!(
            checker
                .veth_losses(vec![a(at(0, 0)), b(at(0, 0))])
                .is_empty()
        );
        // a took 100 redirects, b sent 98 of them (in flight): nothing lost.
        assert!(
            checker
                .veth_losses(vec![a(at(100, 0)), b(at(0, 98))])
                .is_empty()
        );
        // Then a takes 50 more, b sends none: lost into b.
        let warnings = checker.veth_losses(vec![a(at(150, 0)), b(at(0, 98))]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].interface, "b");
        assert!(
            warnings[0].message.contains("about 50 packets"),
            "{}",
            warnings[0].message
        );
        // Failed redirects dropped at enqueue show up as rx drops on the ingress veth.
        let mut checker = Checker::default();
        let dropped = |rx_drops| VethCounters {
            rx_drops,
            ..VethCounters::default()
        };
        checker.veth_losses(vec![a(dropped(0)), b(dropped(0))]);
        let warnings = checker.veth_losses(vec![a(dropped(30)), b(dropped(0))]);
        assert_eq!(
            warnings
                .iter()
                .map(|w| w.interface.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn global_ipv6_addresses_are_told_from_link_local_ones() {
        let text = "fe800000000000000000000000000001 02 40 20 80     eth0\n\
                    fd000000000000000000000000000001 03 40 00 80     eth1\n";
        assert!(!has_global_ipv6(text, "eth0"));
        assert!(has_global_ipv6(text, "eth1"));
        assert!(!has_global_ipv6(text, "eth2"));
    }
}
