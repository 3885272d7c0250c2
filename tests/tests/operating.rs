//! What an operator runs: the systemd unit's ExecStart command line with the
//! packaged example config (adapted to the test namespace), flags overriding
//! the file, and the Prometheus endpoint scraped over loopback inside the
//! relay's namespace.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use forwarder_testbed::netns::random_tag;
use forwarder_testbed::topology::{CLIENT_IP, RELAY_CLIENT_IP, SERVER_IP};
use forwarder_testbed::{
    Relay, Topology, UdpEcho, UdpPinger, forwarder_bin, prereq, workspace_root,
};

const PROBE_WAIT: Duration = Duration::from_secs(1);
const METRICS: &str = "127.0.0.1:9464";

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// The ExecStart= line of the packaged unit, split into words.
fn unit_exec_start() -> Vec<String> {
    let unit =
        std::fs::read_to_string(workspace_root().join("packaging/forwarder.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("packaging/forwarder.service has an ExecStart= line");
    line.split_whitespace().map(str::to_string).collect()
}

/// The packaged example config with this test's interfaces, instance, state
/// folder, port range and metrics address; every other key as shipped.
fn test_config(instance: &str, state_dir: &std::path::Path) -> String {
    let example =
        std::fs::read_to_string(workspace_root().join("packaging/forwarder.toml")).unwrap();
    let mut config: toml::Table = toml::from_str(&example).unwrap();
    config.insert("instance".into(), instance.into());
    config.insert(
        "interfaces".into(),
        toml::Value::Array(vec!["veth-rc".into(), "veth-rs".into()]),
    );
    config.insert(
        "state_dir".into(),
        state_dir.to_string_lossy().as_ref().into(),
    );
    config.insert("ports".into(), "60100-60199".into());
    config.insert("metrics".into(), METRICS.into());
    toml::to_string(&config).unwrap()
}

fn scrape(topo: &Topology) -> String {
    topo.relay.http_get(METRICS, "/metrics").unwrap()
}

#[test]
fn unit_command_line_with_example_config_serves_sessions_and_metrics() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    topo.relay.ip(&["link", "set", "lo", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let instance = format!("t{}-{}", std::process::id(), random_tag());
    let state_dir = dir.path().join("state");
    let config_path = dir.path().join("forwarder.toml");
    std::fs::write(&config_path, test_config(&instance, &state_dir)).unwrap();

    let mut exec = unit_exec_start();
    assert_eq!(exec[0], "/usr/bin/forwarder", "the unit runs {exec:?}");
    exec[0] = forwarder_bin().unwrap().to_string_lossy().into_owned();
    for word in exec
        .iter_mut()
        .filter(|w| *w == "/etc/forwarder/forwarder.toml")
    {
        *word = config_path.to_string_lossy().into_owned();
    }
    // A flag on the command line overrides the file's max_sessions.
    exec.extend(["--max-sessions".to_string(), "1".to_string()]);
    let mut command = vec![
        "nsenter".to_string(),
        format!("--net={}", topo.relay.path().display()),
        "--".to_string(),
    ];
    command.extend(exec);
    let relay = Relay::start_command(command, &instance, Some(state_dir.clone())).unwrap();

    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    assert!(
        (60100..=60199).contains(&session.port),
        "the config's port range was ignored: {session:?}"
    );
    let refused = relay.add(v4(SERVER_IP, 7001), &[]).unwrap_err().to_string();
    assert!(
        refused.contains("maximum of 1 sessions"),
        "--max-sessions did not override the file: {refused}"
    );
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, PROBE_WAIT).unwrap());
    for _ in 0..3 {
        assert!(pinger.ping_any(3, PROBE_WAIT).unwrap());
    }
    assert!(
        state_dir.join("sessions.redb").is_file(),
        "the store is not in the configured state_dir"
    );

    let response = scrape(&topo);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let label = format!("relay=\"{instance}\"");
    for expected in [
        format!("forwarder_sessions{{{label}}} 1"),
        format!("forwarder_flows{{{label}}} 1"),
        // The session's client half, alone on its port, is in the port's slot.
        format!("forwarder_map_entries{{{label},map=\"CLIENT_PORT_SLOTS\"}} 1"),
        format!("forwarder_map_entries{{{label},map=\"CLIENT_FLOWS\"}} 0"),
        format!("forwarder_handshakes_total{{{label},outcome=\"accepted\"}} 0"),
        "forwarder_xdp_reason_packets_total".to_string(),
        "forwarder_map_memory_bytes".to_string(),
    ] {
        assert!(
            response.contains(&expected),
            "metrics lack {expected:?}:\n{response}"
        );
    }
    let forwarded: u64 = response
        .lines()
        .filter(|line| {
            line.starts_with("forwarder_xdp_packets_total")
                && (line.contains("\"tx\"") || line.contains("\"redirect\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        forwarded > 0,
        "no forwarded packets in the metrics:\n{response}"
    );
    assert_scrapes_parse(&topo);
}

/// Scrapes the endpoint from inside the relay's namespace as Prometheus
/// would (`kind`: "openmetrics" or "classic" Accept header) and parses the
/// body with the real prometheus_client parser for its content type.
fn parse_scrape(topo: &Topology, kind: &str) -> serde_json::Value {
    let script = workspace_root().join("tests/scripts/scrape_metrics.py");
    let out = topo
        .relay
        .run("/usr/bin/python3", &[script.to_str().unwrap(), &format!("http://{METRICS}/metrics"), kind])
        .unwrap_or_else(|error| panic!("scraping with the {kind} parser: {error:#} (apt-get install python3-prometheus-client)"));
    serde_json::from_str(&out).unwrap()
}

/// Prometheus' own parsers read every sample with its type, whichever
/// exposition the scraper asks for; no series carries the `instance` label
/// Prometheus reserves for its targets.
fn assert_scrapes_parse(topo: &Topology) {
    for (kind, content_type) in [
        ("openmetrics", "application/openmetrics-text"),
        ("classic", "text/plain; version=0.0.4"),
    ] {
        let parsed = parse_scrape(topo, kind);
        assert!(
            parsed["content_type"]
                .as_str()
                .unwrap()
                .starts_with(content_type),
            "{kind}: {parsed}"
        );
        let families = parsed["families"].as_object().unwrap();
        for (family, expected) in [
            ("forwarder_xdp_packets", "counter"),
            ("forwarder_flows_created", "counter"),
            ("forwarder_slow_path_dropped", "counter"),
            ("forwarder_sessions", "gauge"),
            ("forwarder_map_entries", "gauge"),
        ] {
            assert_eq!(
                families.get(family).and_then(|t| t.as_str()),
                Some(expected),
                "{kind}: {family} in {parsed}"
            );
        }
        assert!(
            !families.values().any(|t| t == "unknown"),
            "{kind}: untyped families in {parsed}"
        );
        let labels: Vec<&str> = parsed["labels"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l.as_str())
            .collect();
        assert!(
            labels.contains(&"relay") && !labels.contains(&"instance"),
            "{kind}: labels {labels:?}"
        );
    }
}

/// What a failed `run` could leave behind: pins, the control socket, an
/// XDP program on an interface.
fn assert_nothing_left(topo: &Topology, instance: &str, what: &str) {
    let pins = std::path::Path::new("/sys/fs/bpf/forwarder").join(instance);
    assert!(
        !pins.exists(),
        "{what}: pins left behind in {}",
        pins.display()
    );
    let socket = std::path::Path::new("/run/forwarder").join(format!("{instance}.sock"));
    assert!(
        !socket.exists(),
        "{what}: control socket {} left behind",
        socket.display()
    );
    for iface in topo.relay_ifaces() {
        let link = topo
            .relay
            .ip(&["-d", "link", "show", "dev", iface])
            .unwrap();
        assert!(
            !link.contains("prog/xdp") && !link.contains(" xdp"),
            "{what}: XDP left attached to {iface}:\n{link}"
        );
    }
}

/// Runs `forwarder run` in the relay namespace with `args`; it must fail.
fn failing_run(topo: &Topology, instance: &str, args: &[&str]) -> String {
    let bin = forwarder_bin().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut run = topo.relay.nsenter(bin.to_str().unwrap());
    run.args(["run", "--instance", instance, "--xdp-mode", "native"]);
    if !args.contains(&"--state-dir") {
        run.arg("--state-dir").arg(state.path().join("state"));
    }
    run.args(args);
    // Bounded: a daemon that wrongly starts would otherwise run forever.
    let out = forwarder_testbed::cmd::run(&mut run, Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "`forwarder run {}` started", args.join(" "));
    out.stderr
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    topo.relay.ip(&["link", "set", "lo", "up"]).unwrap();
    let instance = format!("t{}-{}", std::process::id(), random_tag());
    let both = ["--iface", "veth-rc", "--iface", "veth-rs"];

    // The metrics address is taken.
    let taken = topo
        .relay
        .within(|| Ok(std::net::TcpListener::bind(METRICS)?))
        .unwrap();
    let mut args = both.to_vec();
    args.extend(["--metrics", METRICS]);
    let stderr = failing_run(&topo, &instance, &args);
    assert!(
        stderr.contains("binding the metrics address 127.0.0.1:9464"),
        "unclear: {stderr}"
    );
    assert_nothing_left(&topo, &instance, "metrics address in use");
    drop(taken);

    // The second interface does not exist (the first was fine).
    let stderr = failing_run(
        &topo,
        &instance,
        &["--iface", "veth-rc", "--iface", "nosuch0"],
    );
    assert!(
        stderr.contains("interface \"nosuch0\" does not exist"),
        "unclear: {stderr}"
    );
    assert_nothing_left(&topo, &instance, "missing second interface");

    // The store cannot be opened: this fails after XDP is loaded, attached and pinned.
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let mut args = both.to_vec();
    let blocked = blocker.path().join("state").to_string_lossy().into_owned();
    args.extend(["--state-dir", &blocked]);
    let stderr = failing_run(&topo, &instance, &args);
    assert!(stderr.contains("error"), "{stderr}");
    assert_nothing_left(&topo, &instance, "unusable state folder");

    // And after all that, a correct start works and forwards.
    let relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &["--xdp-mode", "native"]).unwrap();
    let echo = UdpEcho::start(&topo.server, v4(SERVER_IP, 7000)).unwrap();
    let session = relay.add(echo.addr, &[]).unwrap();
    let mut pinger = UdpPinger::new(
        &topo.client,
        v4(CLIENT_IP, 0),
        v4(RELAY_CLIENT_IP, session.port),
    )
    .unwrap();
    assert!(pinger.ping_any(10, PROBE_WAIT).unwrap());
}

#[test]
fn detach_removes_a_stale_control_socket() {
    prereq::require().unwrap();
    let topo = Topology::client_relay_server().unwrap();
    let mut relay = Relay::start(&topo.relay, &topo.relay_ifaces(), &[]).unwrap();
    relay.kill9().unwrap();
    let socket = std::path::Path::new("/run/forwarder").join(format!("{}.sock", relay.instance()));
    assert!(
        socket.exists(),
        "SIGKILL should leave the socket file: nothing else to test otherwise"
    );
    let state_dir = relay.state_dir().to_string_lossy().into_owned();
    let out = relay
        .verb(&["detach", "--state-dir", &state_dir, "--json"])
        .unwrap();
    let detached =
        forwarder_testbed::relay::unwrap_document(serde_json::from_str(&out).unwrap()).unwrap();
    assert_eq!(detached["stale_socket_removed"], true, "{detached}");
    assert!(detached["pins_removed"].as_u64().unwrap() > 0, "{detached}");
    assert!(!socket.exists(), "detach left the stale control socket");
    assert_nothing_left(&topo, relay.instance(), "detach");
}
