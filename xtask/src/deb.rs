//! `cargo xtask deb`: a Debian package with the binary, the systemd units,
//! the example config, man pages and shell completions that the packaged
//! binary renders from its own clap definitions (`forwarder generate`; the
//! xtask itself does not link the forwarder library, so it builds before
//! bpf-linker is installed), the copyright file, the changelog and maintainer
//! scripts. Built with dpkg-deb (part of every Debian system, so no extra
//! tool to install; cargo-deb would only wrap the same steps).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run_visible;

/// Files copied from the repository: (source, path on the target system, mode).
const PAYLOAD: [(&str, &str, u32); 4] = [
    (
        "packaging/forwarder.service",
        "lib/systemd/system/forwarder.service",
        0o644,
    ),
    (
        "packaging/forwarder@.service",
        "lib/systemd/system/forwarder@.service",
        0o644,
    ),
    (
        "packaging/forwarder.toml",
        "etc/forwarder/forwarder.toml",
        0o644,
    ),
    ("README.md", "usr/share/doc/forwarder/README.md", 0o644),
];

/// Where Debian's bash-completion, zsh and fish look for completions
/// shipped by packages.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/forwarder"),
    ("zsh", "usr/share/zsh/vendor-completions/_forwarder"),
    ("fish", "usr/share/fish/vendor_completions.d/forwarder.fish"),
];

const MAINTAINER: &str = "forwarder developers <forwarder@localhost>";

/// Creates the `forwarder` system group: the control socket is root's and
/// this group's (its members create their own sessions; the daemon refuses
/// to start without the group it is configured with).
/// Reloads systemd so it sees the units, and neither enables nor starts the
/// service: the shipped config names no interface yet.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent group forwarder >/dev/null; then
        addgroup --system --quiet forwarder
    fi
    if [ -z "$2" ]; then
        echo "forwarder: set interfaces in /etc/forwarder/forwarder.toml, then: systemctl enable --now forwarder" >&2
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

/// On removal (not upgrade: a restart adopts the pinned data plane), stops
/// every instance. The pinned data plane is left alone: removing it drops
/// established sessions, which `forwarder detach` does on purpose.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop forwarder.service 'forwarder@*.service' || true
    fi
    if [ -d /sys/fs/bpf/forwarder ] && [ -n "$(ls -A /sys/fs/bpf/forwarder 2>/dev/null)" ]; then
        echo "forwarder: pinned data planes keep forwarding established flows: to end them, run" >&2
        echo "  forwarder --instance NAME detach   (before removing), or rm -r /sys/fs/bpf/forwarder/NAME" >&2
        echo "  for each of: $(ls /sys/fs/bpf/forwarder | tr '\n' ' ')" >&2
    fi
fi
exit 0
"#;

/// Reloads systemd after the units are gone; on purge, deletes the stored sessions.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/forwarder
fi
exit 0
"#;

/// Machine-readable (DEP-5), with each license's text or its place on Debian.
fn copyright(year: &str) -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: forwarder\n\
         \n\
         Files: *\n\
         Copyright: {year} forwarder developers\n\
         License: MIT or Apache-2.0\n\
         \n\
         License: Apache-2.0\n \
         On Debian systems, the complete text of the Apache License, Version 2.0 can\n \
         be found in /usr/share/common-licenses/Apache-2.0.\n\
         \n\
         License: MIT\n \
         Permission is hereby granted, free of charge, to any person obtaining a copy\n \
         of this software and associated documentation files (the \"Software\"), to deal\n \
         in the Software without restriction, including without limitation the rights\n \
         to use, copy, modify, merge, publish, distribute, sublicense, and/or sell\n \
         copies of the Software, and to permit persons to whom the Software is\n \
         furnished to do so, subject to the following conditions:\n \
         .\n \
         The above copyright notice and this permission notice shall be included in all\n \
         copies or substantial portions of the Software.\n \
         .\n \
         THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR\n \
         IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,\n \
         FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE\n \
         AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER\n \
         LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,\n \
         OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE\n \
         SOFTWARE.\n"
    )
}

fn changelog(version: &str, date: &str) -> String {
    format!(
        "forwarder ({version}) unstable; urgency=medium\n\
         \n  \
         * Built from the forwarder repository with `cargo xtask deb`.\n\
         \n \
         -- {MAINTAINER}  {date}\n"
    )
}

fn architecture() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("running dpkg (is this Debian?)")?;
    if !out.status.success() {
        bail!("`dpkg --print-architecture` failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The changelog's date (RFC 5322) and the copyright year; `SOURCE_DATE_EPOCH`
/// (reproducible builds) wins over the clock.
fn dates() -> Result<(String, String)> {
    let mut date = Command::new("date");
    date.arg("-u");
    if let Ok(epoch) = std::env::var("SOURCE_DATE_EPOCH") {
        date.arg(format!("--date=@{epoch}"));
    }
    let out = date
        .arg("+%a, %d %b %Y %H:%M:%S +0000|%Y")
        .output()
        .context("running date")?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (rfc, year) = text.split_once('|').context("unexpected output of date")?;
    Ok((rfc.to_string(), year.to_string()))
}

fn write_file(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("no parent folder")?)?;
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// gzip -9n: no name and no timestamp in the header, as Debian policy wants
/// for man pages and changelogs (the package is then reproducible).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// forwarder(1) and one page per verb, forwarder-VERB(1), as git and cargo
/// do, rendered by the packaged binary itself (`forwarder generate man`) so
/// they never disagree with its --help.
fn man_pages(bin: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = tempfile::tempdir()?;
    run_visible(
        Command::new(bin)
            .args(["generate", "man", "--dir"])
            .arg(dir.path()),
    )?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .with_context(|| format!("odd man page name {}", path.display()))?
            .to_string();
        pages.push((format!("{name}.gz"), gzip(&std::fs::read(&path)?)?));
    }
    pages.sort();
    if !pages.iter().any(|(page, _)| page == "forwarder.1.gz") {
        bail!("`{} generate man` wrote no forwarder.1", bin.display());
    }
    Ok(pages)
}

fn completion(bin: &Path, shell: &str) -> Result<Vec<u8>> {
    let output = Command::new(bin)
        .args(["generate", "completion", shell])
        .output()
        .with_context(|| format!("running {} generate completion {shell}", bin.display()))?;
    if !output.status.success() || output.stdout.is_empty() {
        bail!(
            "`{} generate completion {shell}` failed: {}",
            bin.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

/// The binary to package: `$FORWARDER_BIN` when set (what `cargo xtask
/// test` and the package test pass), else `cargo build --release -p
/// forwarder` into target/deb/cargo. Its own target folder, because the
/// workspace's features depend on which members a build selects (resolver
/// 2 unifies them: `cargo build --release` and `cargo test` turn on
/// features of nix, bitflags and others for the testbed), so building
/// `-p forwarder` into target/release replaced the binary a workspace build
/// had put there with another one, and the next workspace build swapped it
/// back. The package gets exactly the product's features.
fn binary() -> Result<PathBuf> {
    if std::env::var_os("FORWARDER_BIN").is_some() {
        return forwarder_testbed::forwarder_bin();
    }
    let target = forwarder_testbed::workspace_root().join("target/deb/cargo");
    run_visible(
        crate::cargo()
            .args(["build", "--release", "-p", "forwarder", "--target-dir"])
            .arg(&target),
    )?;
    Ok(target.join("release/forwarder"))
}

/// Builds `target/deb/forwarder_<version>_<arch>.deb`; returns its path.
pub fn run() -> Result<PathBuf> {
    let bin = binary()?;
    let root = forwarder_testbed::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = architecture()?;
    let (date, year) = dates()?;
    let name = format!("forwarder_{version}_{arch}");
    let out_dir = root.join("target").join("deb");
    let stage = out_dir.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let binary = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    write_file(&stage.join("usr/bin/forwarder"), &binary, 0o755)?;
    for (from, to, mode) in PAYLOAD {
        let bytes = std::fs::read(root.join(from)).with_context(|| format!("reading {from}"))?;
        write_file(&stage.join(to), &bytes, mode)?;
    }
    let doc = stage.join("usr/share/doc/forwarder");
    write_file(&doc.join("copyright"), copyright(&year).as_bytes(), 0o644)?;
    write_file(
        &doc.join("changelog.Debian.gz"),
        &gzip(changelog(version, &date).as_bytes())?,
        0o644,
    )?;
    for (page, bytes) in man_pages(&bin)? {
        write_file(&stage.join("usr/share/man/man1").join(page), &bytes, 0o644)?;
    }
    for (shell, path) in COMPLETIONS {
        write_file(&stage.join(path), &completion(&bin, shell)?, 0o644)?;
    }
    let debian = stage.join("DEBIAN");
    let size_kib = du_kib(&stage)?;
    write_file(
        &debian.join("control"),
        format!(
            "Package: forwarder\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
             Installed-Size: {size_kib}\nSection: net\nPriority: optional\nDepends: adduser, iproute2\n\
             Recommends: mosh\n\
             Description: XDP-accelerated UDP relay for mosh\n \
             Carries mosh sessions through bastions, gateways and NATs. The data plane is\n \
             pinned under /sys/fs/bpf, so restarting the daemon drops no session.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    // The operator's edits to the config survive upgrades.
    write_file(
        &debian.join("conffiles"),
        b"/etc/forwarder/forwarder.toml\n",
        0o644,
    )?;
    for (script, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write_file(&debian.join(script), text.as_bytes(), 0o755)?;
    }
    let deb = out_dir.join(format!("{name}.deb"));
    run_visible(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("xtask: built {} from {}", deb.display(), bin.display());
    Ok(deb)
}

/// Installed-Size: the payload's size in KiB, as dpkg-gencontrol counts it.
fn du_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du_kib(&entry.path())?
        } else {
            meta.len().div_ceil(1024)
        };
    }
    Ok(total)
}
