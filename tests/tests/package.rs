//! The .deb as an operator gets it: `cargo xtask deb` builds it from the
//! binary under test, `dpkg -i` installs it on this machine, the installed
//! binary, man pages, completions and units work, the shipped config refuses
//! to attach anywhere until interfaces are set, and `dpkg --purge` leaves
//! nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_testbed::cmd::{self, Output, SHORT};
use forwarder_testbed::{forwarder_bin, prereq, workspace_root};

/// Building xtask (it links the forwarder library for the man pages) may take minutes.
const BUILD: Duration = Duration::from_secs(1800);
const PACKAGE: &str = "forwarder";
const CONFIG: &str = "/etc/forwarder/forwarder.toml";

/// Tools this test runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("dpkg", "dpkg"),
    ("dpkg-deb", "dpkg"),
    ("dpkg-query", "dpkg"),
    ("systemd-analyze", "systemd"),
    ("addgroup", "adduser"),
    ("zcat", "gzip"),
    ("man", "man-db"),
    ("bash", "bash"),
];

fn require_tools() {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| which::which(tool).is_err())
        .map(|(tool, package)| format!("{tool} not found: apt-get install {package}"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing for the package test:\n  {}\n(`cargo xtask prereq` installs them)",
        missing.join("\n  ")
    );
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
}

/// `dpkg ARGS`, retried while another apt or dpkg holds the lock (other
/// builds on a shared machine install packages too).
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cmd::run(Command::new("dpkg").args(args), Duration::from_secs(120)).unwrap();
        let locked = out.stderr.contains("lock");
        if out.success() || !locked || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Purges the package when dropped, so a failing test does not leave it installed.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() || Path::new(CONFIG).exists() {
            let out = dpkg(&["--purge", PACKAGE]);
            if !out.success() {
                eprintln!("warning: `dpkg --purge {PACKAGE}` failed: {}{}", out.stdout, out.stderr);
            }
        }
    }
}

/// `cargo xtask deb` with the binary under test; returns the .deb.
fn build_deb(bin: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--package", "xtask", "--", "deb"])
        .env("FORWARDER_BIN", bin);
    let out = cmd::run(&mut build, BUILD).unwrap();
    assert!(out.success(), "`cargo xtask deb` failed ({}):\n{}{}", out.status, out.stdout, out.stderr);
    let deb = out
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("xtask: built ")?.split(' ').next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("`cargo xtask deb` did not say what it built:\n{}", out.stdout));
    assert!(deb.is_file(), "{} missing", deb.display());
    deb
}

fn run_ok(program: &str, args: &[&str]) -> String {
    cmd::run_ok(Command::new(program).args(args), SHORT).unwrap()
}

/// Paths of the regular files and links in the package, from `dpkg -c`.
fn payload(deb: &Path) -> Vec<String> {
    let listing = run_ok("dpkg-deb", &["-c", deb.to_str().unwrap()]);
    eprintln!("dpkg -c {}:\n{listing}", deb.display());
    listing
        .lines()
        .filter(|line| !line.starts_with('d'))
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(|path| path.trim_start_matches('.').to_string())
        .collect()
}

/// The "Overall exposure level" `systemd-analyze security` gives `unit`.
fn exposure(unit: &Path) -> f64 {
    let out = cmd::run(
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(unit),
        SHORT,
    )
    .unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    text.lines()
        .find_map(|line| line.split("Overall exposure level for ").nth(1)?.split(": ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level from systemd-analyze security {}:\n{text}", unit.display()))
}

#[test]
fn deb_installs_works_and_purges_without_a_trace() {
    prereq::require().unwrap();
    require_tools();
    assert!(
        !installed(),
        "the {PACKAGE} package is already installed on this machine; this test installs and purges it, \
         which would remove that installation and its stored sessions: `dpkg --purge {PACKAGE}` first"
    );
    let bin = forwarder_bin().unwrap();
    let deb = build_deb(&bin);
    let files = payload(&deb);
    for expected in [
        "/usr/bin/forwarder",
        "/lib/systemd/system/forwarder.service",
        "/lib/systemd/system/forwarder@.service",
        CONFIG,
        "/usr/share/doc/forwarder/copyright",
        "/usr/share/doc/forwarder/changelog.Debian.gz",
        "/usr/share/man/man1/forwarder.1.gz",
        "/usr/share/man/man1/forwarder-run.1.gz",
        "/usr/share/man/man1/forwarder-mosh-server.1.gz",
        "/usr/share/bash-completion/completions/forwarder",
        "/usr/share/zsh/vendor-completions/_forwarder",
        "/usr/share/fish/vendor_completions.d/forwarder.fish",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} not in the package: {files:?}");
    }
    let conffiles = run_ok("dpkg-deb", &["-I", deb.to_str().unwrap(), "conffiles"]);
    assert_eq!(conffiles.trim(), CONFIG);

    let purge = Purge;
    let out = dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(out.success(), "dpkg -i failed: {}{}", out.stdout, out.stderr);
    assert!(installed());
    run_ok("getent", &["group", "forwarder"]);

    // The installed binary is the one under test.
    let version = run_ok("/usr/bin/forwarder", &["--version"]);
    assert_eq!(version, run_ok(bin.to_str().unwrap(), &["--version"]));
    assert!(version.starts_with("forwarder "), "{version}");
    let help = run_ok("/usr/bin/forwarder", &["--help"]);
    for verb in ["run", "add", "remove", "list", "stats", "detach", "mosh-server"] {
        assert!(help.contains(verb), "--help lacks {verb}:\n{help}");
    }
    eprintln!("forwarder --help:\n{help}");

    // Man pages: gzipped roff that man finds.
    for page in ["forwarder", "forwarder-run", "forwarder-add", "forwarder-mosh-server"] {
        let roff = run_ok("zcat", &[&format!("/usr/share/man/man1/{page}.1.gz")]);
        assert!(roff.contains(".TH"), "{page}.1 is not a man page:\n{roff}");
        let found = run_ok("man", &["-w", page]);
        assert_eq!(found.trim(), format!("/usr/share/man/man1/{page}.1.gz"));
    }
    let run_page = run_ok("zcat", &["/usr/share/man/man1/forwarder-run.1.gz"]);
    assert!(run_page.contains("flow\\-idle\\-timeout"), "forwarder-run(1) lacks run's flags:\n{run_page}");

    // Completions: bash's parses and completes the verbs.
    let bash = "/usr/share/bash-completion/completions/forwarder";
    run_ok("bash", &["-n", bash]);
    let words = run_ok(
        "bash",
        &["-c", &format!("source {bash}; COMP_WORDS=(forwarder mo); COMP_CWORD=1; _forwarder forwarder mo forwarder; echo \"${{COMPREPLY[@]}}\"")],
    );
    assert!(words.contains("mosh-server"), "bash completion of `forwarder mo`: {words}");
    for path in ["/usr/share/zsh/vendor-completions/_forwarder", "/usr/share/fish/vendor_completions.d/forwarder.fish"] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("mosh-server"), "{path}:\n{text}");
    }

    // The units: valid, and hardened (exposure 3.0 or lower).
    let dir = tempfile::tempdir().unwrap();
    let instance_unit = dir.path().join("forwarder@relay2.service");
    std::fs::copy("/lib/systemd/system/forwarder@.service", &instance_unit).unwrap();
    for unit in [Path::new("/lib/systemd/system/forwarder.service"), instance_unit.as_path()] {
        let out = cmd::run(Command::new("systemd-analyze").arg("verify").arg(unit), SHORT).unwrap();
        assert!(out.success(), "systemd-analyze verify {}: {}{}", unit.display(), out.stdout, out.stderr);
        let score = exposure(unit);
        eprintln!("systemd-analyze security {}: {score}", unit.display());
        assert!(score <= 3.0, "{} scores {score}; the target is 3.0 or lower", unit.display());
    }

    // The shipped config names no interface: the daemon refuses, naming the file and the key.
    let out = cmd::run(Command::new("/usr/bin/forwarder").args(["run", "--config", CONFIG]), SHORT).unwrap();
    assert!(!out.success(), "forwarder run with the shipped config started:\n{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(CONFIG) && out.stderr.contains("interfaces"),
        "the refusal must name {CONFIG} and the key to set: {}",
        out.stderr
    );

    drop(purge);
    assert!(!installed(), "still installed after dpkg --purge");
    let listed = cmd::run(Command::new("dpkg").args(["-L", PACKAGE]), SHORT).unwrap();
    assert!(!listed.success() || listed.stdout.trim().is_empty(), "dpkg -L after purge: {}", listed.stdout);
    for path in files.iter().map(String::as_str).chain(["/etc/forwarder", "/var/lib/forwarder"]) {
        assert!(!Path::new(path).exists(), "{path} left behind after dpkg --purge");
    }
}
