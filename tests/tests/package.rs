//! The .deb as an operator gets it: `cargo xtask deb` builds it from the
//! binary under test, `dpkg -i` installs it on this machine, the installed
//! binary, man pages, completions and units work, the shipped config refuses
//! to attach anywhere until interfaces are set, and `dpkg --purge` leaves
//! nothing behind. And the unit's capability set is enough for the daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_testbed::cmd::{self, Output, SHORT};
use forwarder_testbed::{forwarder_bin, prereq, workspace_root};

/// Building xtask and, through it, the packaged binary may take minutes.
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
                eprintln!(
                    "warning: `dpkg --purge {PACKAGE}` failed: {}{}",
                    out.stdout, out.stderr
                );
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
    assert!(
        out.success(),
        "`cargo xtask deb` failed ({}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let deb = out
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("xtask: built ")?.split(' ').next())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "`cargo xtask deb` did not say what it built:\n{}",
                out.stdout
            )
        });
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
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit),
        SHORT,
    )
    .unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    text.lines()
        .find_map(|line| {
            line.split("Overall exposure level for ")
                .nth(1)?
                .split(": ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "no exposure level from systemd-analyze security {}:\n{text}",
                unit.display()
            )
        })
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
        "/usr/share/man/man1/forwarder-mosh.1.gz",
        "/usr/share/bash-completion/completions/forwarder",
        "/usr/share/zsh/vendor-completions/_forwarder",
        "/usr/share/fish/vendor_completions.d/forwarder.fish",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} not in the package: {files:?}"
        );
    }
    let conffiles = run_ok("dpkg-deb", &["-I", deb.to_str().unwrap(), "conffiles"]);
    assert_eq!(conffiles.trim(), CONFIG);

    let purge = Purge;
    let out = dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(
        out.success(),
        "dpkg -i failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(installed());
    run_ok("getent", &["group", "forwarder"]);

    // The installed binary is the one under test.
    let version = run_ok("/usr/bin/forwarder", &["--version"]);
    assert_eq!(version, run_ok(bin.to_str().unwrap(), &["--version"]));
    assert!(version.starts_with("forwarder "), "{version}");
    let help = run_ok("/usr/bin/forwarder", &["--help"]);
    for verb in [
        "run",
        "add",
        "remove",
        "list",
        "stats",
        "detach",
        "mosh-server",
        "mosh",
    ] {
        assert!(help.contains(verb), "--help lacks {verb}:\n{help}");
    }
    eprintln!("forwarder --help:\n{help}");

    // Man pages: gzipped roff that man finds.
    for page in [
        "forwarder",
        "forwarder-run",
        "forwarder-add",
        "forwarder-mosh-server",
        "forwarder-mosh",
    ] {
        let roff = run_ok("zcat", &[&format!("/usr/share/man/man1/{page}.1.gz")]);
        assert!(roff.contains(".TH"), "{page}.1 is not a man page:\n{roff}");
        let found = run_ok("man", &["-w", page]);
        assert_eq!(found.trim(), format!("/usr/share/man/man1/{page}.1.gz"));
    }
    let run_page = run_ok("zcat", &["/usr/share/man/man1/forwarder-run.1.gz"]);
    assert!(
        run_page.contains("flow\\-idle\\-timeout"),
        "forwarder-run(1) lacks run's flags:\n{run_page}"
    );

    // Completions: bash's parses and completes the verbs.
    let bash = "/usr/share/bash-completion/completions/forwarder";
    run_ok("bash", &["-n", bash]);
    let words = run_ok(
        "bash",
        &[
            "-c",
            &format!(
                "source {bash}; COMP_WORDS=(forwarder mo); COMP_CWORD=1; _forwarder forwarder mo forwarder; echo \"${{COMPREPLY[@]}}\""
            ),
        ],
    );
    assert!(
        words.contains("mosh-server"),
        "bash completion of `forwarder mo`: {words}"
    );
    for path in [
        "/usr/share/zsh/vendor-completions/_forwarder",
        "/usr/share/fish/vendor_completions.d/forwarder.fish",
    ] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("mosh-server"), "{path}:\n{text}");
    }

    // The units: valid, and hardened (exposure 3.0 or lower).
    let dir = tempfile::tempdir().unwrap();
    let instance_unit = dir.path().join("forwarder@relay2.service");
    std::fs::copy("/lib/systemd/system/forwarder@.service", &instance_unit).unwrap();
    for unit in [
        Path::new("/lib/systemd/system/forwarder.service"),
        instance_unit.as_path(),
    ] {
        let out = cmd::run(
            Command::new("systemd-analyze").arg("verify").arg(unit),
            SHORT,
        )
        .unwrap();
        assert!(
            out.success(),
            "systemd-analyze verify {}: {}{}",
            unit.display(),
            out.stdout,
            out.stderr
        );
        let score = exposure(unit);
        eprintln!("systemd-analyze security {}: {score}", unit.display());
        assert!(
            score <= 3.0,
            "{} scores {score}; the target is 3.0 or lower",
            unit.display()
        );
    }

    // The shipped config names no interface: the daemon refuses, naming the file and the key.
    let out = cmd::run(
        Command::new("/usr/bin/forwarder").args(["run", "--config", CONFIG]),
        SHORT,
    )
    .unwrap();
    assert!(
        !out.success(),
        "forwarder run with the shipped config started:\n{}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains(CONFIG) && out.stderr.contains("interfaces"),
        "the refusal must name {CONFIG} and the key to set: {}",
        out.stderr
    );

    drop(purge);
    assert!(!installed(), "still installed after dpkg --purge");
    let listed = cmd::run(Command::new("dpkg").args(["-L", PACKAGE]), SHORT).unwrap();
    assert!(
        !listed.success() || listed.stdout.trim().is_empty(),
        "dpkg -L after purge: {}",
        listed.stdout
    );
    for path in files
        .iter()
        .map(String::as_str)
        .chain(["/etc/forwarder", "/var/lib/forwarder"])
    {
        assert!(
            !Path::new(path).exists(),
            "{path} left behind after dpkg --purge"
        );
    }
}

/// Capability numbers (linux/capability.h) of those a unit may name here.
const CAPABILITIES: &[(&str, u32)] = &[
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// The words of `key=` in the packaged default unit (capabilities, groups).
fn unit_setting(key: &str) -> Vec<String> {
    let unit =
        std::fs::read_to_string(workspace_root().join("packaging/forwarder.service")).unwrap();
    unit.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("packaging/forwarder.service has no {key}= line"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The unit runs the daemon as root with only its CapabilityBoundingSet (and
/// the same ambient set). systemd is not PID 1 on the test machines, so
/// setpriv applies that set, and the daemon must still load and attach XDP
/// natively, bind a session port below 1024, forward a flow in the kernel and,
/// restarted, adopt its pins.
#[test]
fn the_units_capabilities_are_enough() {
    use forwarder_testbed::topology::{
        CLIENT_IP, RELAY_CLIENT_IF, RELAY_CLIENT_IP, RELAY_SERVER_IF, SERVER_IP,
    };
    use forwarder_testbed::{Relay, Topology, UdpEcho, UdpPinger};
    use std::net::{SocketAddr, SocketAddrV4};

    prereq::require().unwrap();
    assert!(
        which::which("setpriv").is_ok(),
        "setpriv not found: apt-get install util-linux"
    );
    let bounding = unit_setting("CapabilityBoundingSet");
    assert_eq!(
        bounding,
        unit_setting("AmbientCapabilities"),
        "the unit's bounding and ambient sets differ"
    );
    let mut mask = 0u64;
    let mut setpriv_caps = String::from("-all");
    for cap in &bounding {
        let (_, bit) = CAPABILITIES
            .iter()
            .find(|(name, _)| name == cap)
            .unwrap_or_else(|| panic!("{cap} is not in this test's table: add its number"));
        mask |= 1 << bit;
        setpriv_caps.push_str(&format!(
            ",+{}",
            cap.trim_start_matches("CAP_").to_lowercase()
        ));
    }

    let topo = Topology::client_relay_server().unwrap();
    let instance = format!(
        "t{}-{}",
        std::process::id(),
        forwarder_testbed::netns::random_tag()
    );
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    // The unit's SupplementaryGroups= (the group the control socket is given).
    let groups = unit_setting("SupplementaryGroups").join(",");
    let mut command: Vec<String> = vec![
        "nsenter".into(),
        format!("--net={}", topo.relay.path().display()),
        "--".into(),
        "setpriv".into(),
        format!("--groups={groups}"),
        format!("--inh-caps={setpriv_caps}"),
        format!("--ambient-caps={setpriv_caps}"),
        format!("--bounding-set={setpriv_caps}"),
        "--no-new-privs".into(),
        forwarder_bin().unwrap().to_string_lossy().into_owned(),
    ];
    command.extend(
        [
            "run",
            "--instance",
            &instance,
            "--iface",
            RELAY_CLIENT_IF,
            "--iface",
            RELAY_SERVER_IF,
            "--datapath",
            "xdp",
            "--xdp-mode",
            "native",
            "--ports",
            "400-409",
        ]
        .map(str::to_string),
    );
    command.extend([
        "--state-dir".to_string(),
        state_dir.to_string_lossy().into_owned(),
    ]);
    let mut relay = Relay::start_command(command, &instance, Some(state_dir)).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap();
    assert_eq!(
        effective, mask,
        "the daemon runs with capabilities {effective:#x}, not the unit's {mask:#x}"
    );

    let echo = UdpEcho::start(
        &topo.server,
        SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 7000)),
    )
    .unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    assert!(session.port < 1024, "{session:?}");
    let relay_addr = SocketAddr::V4(SocketAddrV4::new(RELAY_CLIENT_IP, session.port));
    let mut pinger = UdpPinger::new(
        &topo.client,
        SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, 0)),
        relay_addr,
    )
    .unwrap();
    assert!(
        pinger.ping_any(10, Duration::from_secs(1)).unwrap(),
        "nothing came back through the relay"
    );
    for _ in 0..3 {
        assert!(pinger.ping_any(3, Duration::from_secs(1)).unwrap());
    }
    let fast: u64 = relay.sessions().unwrap()[0]
        .flows
        .iter()
        .map(|f| f.fast_path_packets)
        .sum();
    assert!(
        fast > 0,
        "no packet took the XDP fast path: {:?}",
        relay.sessions().unwrap()
    );

    relay.terminate().unwrap();
    relay.restart().unwrap();
    assert!(
        relay.log().contains("adopted the pinned XDP link"),
        "{}",
        relay.log()
    );
    assert_eq!(
        relay.sessions().unwrap().len(),
        1,
        "the session was not restored"
    );
    assert!(
        pinger.ping_any(3, Duration::from_secs(1)).unwrap(),
        "no forwarding after the restart"
    );
}
