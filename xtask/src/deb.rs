//! `cargo xtask deb`: a Debian package with the binary, the systemd unit and
//! the example config, built with dpkg-deb (part of every Debian system, so
//! no extra tool to install; cargo-deb would only wrap the same steps).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build_forwarder, run_visible};

/// Files the package installs: (source in the repository, path on the target system, mode).
const PAYLOAD: [(&str, &str, u32); 3] = [
    ("packaging/forwarder.service", "lib/systemd/system/forwarder.service", 0o644),
    ("packaging/forwarder.toml", "etc/forwarder/forwarder.toml", 0o644),
    ("README.md", "usr/share/doc/forwarder/README.md", 0o644),
];

fn architecture() -> Result<String> {
    let out = Command::new("dpkg").arg("--print-architecture").output().context("running dpkg (is this Debian?)")?;
    if !out.status.success() {
        bail!("`dpkg --print-architecture` failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().context("no parent folder")?)?;
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds the release binary and `target/deb/forwarder_<version>_<arch>.deb`; returns its path.
pub fn run() -> Result<PathBuf> {
    let bin = build_forwarder()?;
    let root = forwarder_testbed::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = architecture()?;
    let name = format!("forwarder_{version}_{arch}");
    let out_dir = root.join("target").join("deb");
    let stage = out_dir.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    install(&bin, &stage.join("usr/bin/forwarder"), 0o755)?;
    for (from, to, mode) in PAYLOAD {
        install(&root.join(from), &stage.join(to), mode)?;
    }
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: forwarder\nVersion: {version}\nArchitecture: {arch}\nMaintainer: forwarder developers <forwarder@localhost>\n\
             Section: net\nPriority: optional\nDepends: iproute2\nRecommends: mosh\n\
             Description: XDP-accelerated UDP relay for mosh\n \
             Carries mosh sessions through bastions, gateways and NATs. The data plane is\n \
             pinned under /sys/fs/bpf, so restarting the daemon drops no session.\n"
        ),
    )?;
    // The operator's edits to the config survive upgrades.
    std::fs::write(debian.join("conffiles"), "/etc/forwarder/forwarder.toml\n")?;
    let deb = out_dir.join(format!("{name}.deb"));
    run_visible(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb))?;
    println!("xtask: built {}", deb.display());
    Ok(deb)
}
