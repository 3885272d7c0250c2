//! `cargo xtask prereq`: installs what is missing, and says what it installs.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run_visible;

/// Debian packages: the test tools, and LLVM for bpf-linker.
const APT_PACKAGES: &[&str] = &[
    "mosh",
    "iproute2",
    "nftables",
    // `conntrack -F`: the NAT rebind test flushes the NAT box's mappings.
    "conntrack",
    "ethtool",
    "tmux",
    "tcpdump",
    "openssh-server",
    "python3-scapy",
    "python3-prometheus-client",
    "iputils-ping",
    "procps",
    "util-linux",
    "socat",
    // The package test: `systemd-analyze verify/security` on the units,
    // `addgroup` in postinst (the package's Depends), `man -w` on the pages.
    "systemd",
    "adduser",
    "man-db",
    // Gateway mode: the real NAT-PMP and UPnP IGD clients, and miniupnpd
    // (nftables backend) for the side-by-side comparison.
    "natpmpc",
    "miniupnpc",
    "miniupnpd-nftables",
    // The cluster tests run a real etcd (etcd-server), read it with etcdctl
    // (etcd-client); the etcd-client crate's build compiles etcd's .proto
    // files with protoc (protobuf-compiler).
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // The cluster TLS test makes a throwaway CA and certificates.
    "openssl",
    "llvm-22-dev",
    "libpolly-22-dev",
];

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn ensure() -> Result<()> {
    if !is_root() {
        bail!("cargo xtask needs root (apt-get, network namespaces, XDP)");
    }
    apt()?;
    socket_group()?;
    rust_src()?;
    bpf_linker()?;
    forwarder_testbed::prereq::require().context("after installing prerequisites")?;
    println!("xtask: prerequisites are in place");
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

fn apt() -> Result<()> {
    if which::which("dpkg-query").is_err() {
        bail!("dpkg-query not found: prerequisites are installed with apt-get on Debian only");
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("xtask: apt packages present: {}", APT_PACKAGES.join(" "));
        return Ok(());
    }
    println!("xtask: installing apt packages: {}", missing.join(" "));
    run_visible(Command::new("apt-get").args(["update", "-q"]))?;
    run_visible(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The control socket's default group, as the package's postinst creates
/// it: `forwarder run` refuses to start without the group it is given.
fn socket_group() -> Result<()> {
    let group = forwarder_testbed::prereq::SOCKET_GROUP;
    let present = Command::new("getent")
        .args(["group", group])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        println!("xtask: group {group} present");
        return Ok(());
    }
    println!(
        "xtask: creating the system group {group} (the package does too; the control socket's group)"
    );
    run_visible(Command::new("addgroup").args(["--system", "--quiet", group]))
}

fn rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is it installed?)")?;
    let has_nightly = installed.status.success();
    if has_nightly
        && String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src"))
    {
        println!("xtask: nightly rust-src present");
        return Ok(());
    }
    if has_nightly {
        println!("xtask: installing rust-src for the nightly toolchain (the eBPF build needs it)");
        run_visible(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
    } else {
        println!("xtask: installing the nightly toolchain with rust-src (the eBPF build needs it)");
        run_visible(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
    }
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        println!("xtask: bpf-linker present");
        return Ok(());
    }
    println!("xtask: installing bpf-linker (against the system LLVM 22)");
    let path = std::env::var("PATH").unwrap_or_default();
    run_visible(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", format!("{LLVM_BIN}:{path}")),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}
