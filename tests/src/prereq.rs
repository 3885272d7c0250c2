//! Loud checks for what the integration tests need, naming the fix.

use anyhow::{Result, bail};

/// Programs the testbed runs, and the Debian package that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("tmux", "tmux"),
    ("mosh-server", "mosh"),
    ("mosh-client", "mosh"),
    ("mosh", "mosh"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("tcpdump", "tcpdump"),
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("natpmpc", "natpmpc"),
    ("upnpc", "miniupnpc"),
    ("useradd", "passwd"),
    ("groupadd", "passwd"),
    ("runuser", "util-linux"),
];

/// The group `forwarder run` gives its control socket unless told
/// otherwise (the package creates it; the daemon refuses to start without it).
pub const SOCKET_GROUP: &str = "forwarder";

/// Fails unless we are root, every tool in [`TOOLS`] is on PATH and the
/// daemon's default socket group exists.
pub fn require() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the forwarder integration tests need root (network namespaces, XDP): \
             run them as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| which::which(tool).is_err())
        .map(|(tool, pkg)| format!("{tool} not found: apt-get install {pkg}"))
        .collect();
    if !matches!(nix::unistd::Group::from_name(SOCKET_GROUP), Ok(Some(_))) {
        bail!(
            "the group {SOCKET_GROUP:?} does not exist: `forwarder run` gives its control socket to it \
             (the package creates it): run `addgroup --system {SOCKET_GROUP}`, or `cargo xtask prereq`"
        );
    }
    if !missing.is_empty() {
        bail!(
            "missing test prerequisites:\n  {}\nor run `cargo xtask prereq`, which installs all of them",
            missing.join("\n  ")
        );
    }
    Ok(())
}
