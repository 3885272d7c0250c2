//! What an operator's scripts and logs see: `forwarder mosh-server` prints
//! what stock mosh-server prints, byte for byte but for the values (and its
//! `MOSH IP` line, in the stock `mosh` wrapper's own format), and the
//! daemon's log holds no ANSI escapes when stderr is not a terminal.

use std::process::Command;

use forwarder_testbed::cmd::{self, SHORT};
use forwarder_testbed::nat::{NAT_SERVER_IP, NatTopology, random_secret};
use forwarder_testbed::netns::Netns;
use forwarder_testbed::topology::RELAY_CLIENT_IP;
use forwarder_testbed::{forwarder_bin, prereq};

const LOCALE: &str = "C.UTF-8";

/// Replaces the values of `MOSH CONNECT <port> <key>` and `MOSH IP <addr>`
/// with placeholders after checking their form (the stock `mosh` wrapper's
/// regexes: `\d+`, `[A-Za-z0-9/+]{22}`, `\S+`), keeping every other byte
/// (CR, LF, spaces) as printed.
fn shape(stdout: &str) -> String {
    let mut out = String::new();
    for line in stdout.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let ending = &line[body.len()..];
        if let Some(rest) = body.strip_prefix("MOSH CONNECT ") {
            let words: Vec<&str> = rest.split(' ').collect();
            assert_eq!(words.len(), 2, "MOSH CONNECT line {line:?}");
            assert!(words[0].parse::<u16>().is_ok(), "port in {line:?}");
            assert!(
                words[1].len() == 22
                    && words[1]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '/' || c == '+'),
                "key in {line:?}"
            );
            out.push_str("MOSH CONNECT <port> <key>");
        } else if let Some(rest) = body.strip_prefix("MOSH IP ") {
            assert!(
                rest.parse::<std::net::Ipv4Addr>().is_ok(),
                "address in {line:?}"
            );
            out.push_str("MOSH IP <addr>");
        } else {
            out.push_str(body);
        }
        out.push_str(ending);
    }
    out
}

/// `program args...` in `ns` with the locale mosh needs, stdout captured;
/// with `tty`, under `script` so that stdin and stdout are a terminal, as
/// through `ssh -tt` (stderr then goes to /dev/null, not into the capture).
fn run_in(ns: &Netns, tty: bool, program: &str, args: &[String]) -> String {
    let mut command = if tty {
        let line = std::iter::once(program.to_string())
            .chain(args.iter().cloned())
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = ns.exec("script");
        c.args(["-qec", &format!("{line} 2>/dev/null"), "/dev/null"]);
        c
    } else {
        let mut c = ns.exec(program);
        c.args(args);
        c
    };
    command.env("LANG", LOCALE).env("LC_ALL", LOCALE);
    let out = cmd::run(&mut command, SHORT).unwrap();
    assert!(
        out.success(),
        "`{}` failed ({}):\n  stdout: {:?}\n  stderr: {}",
        cmd::describe(&command),
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

#[test]
fn wrapper_prints_what_stock_mosh_server_prints() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("punch-secret");
    std::fs::write(&secret, random_secret()).unwrap();
    let _relay = topo.start_relay(&secret, &[]).unwrap();
    let bin = forwarder_bin().unwrap();
    let server_args = words(&format!("new -c 8 -l LANG={LOCALE} -- /bin/sh"));
    let stock_args = words(&format!(
        "new -i {NAT_SERVER_IP} -c 8 -l LANG={LOCALE} -- /bin/sh"
    ));
    let wrapper_args = [
        words(&format!(
            "mosh-server --relay {} --secret-file",
            topo.punch_endpoint()
        )),
        vec![secret.display().to_string()],
        server_args,
    ]
    .concat();

    for tty in [false, true] {
        let stock = run_in(&topo.server, tty, "mosh-server", &stock_args);
        let wrapped = run_in(&topo.server, tty, bin.to_str().unwrap(), &wrapper_args);
        eprintln!(
            "tty={tty}\n  stock mosh-server: {stock:?}\n  forwarder mosh-server: {wrapped:?}"
        );
        assert!(
            !shape(&stock).contains("MOSH IP"),
            "stock mosh-server printed {stock:?}"
        );
        // Stock output with the `MOSH IP` line (as the stock wrapper prints
        // it: "MOSH IP %s\n", through the same terminal) before `MOSH CONNECT`.
        let ip_line = if tty {
            "MOSH IP <addr>\r\n"
        } else {
            "MOSH IP <addr>\n"
        };
        let expected = shape(&stock).replacen("MOSH CONNECT", &format!("{ip_line}MOSH CONNECT"), 1);
        assert_eq!(
            shape(&wrapped),
            expected,
            "tty={tty}: stock {stock:?}, wrapper {wrapped:?}"
        );
        if !tty {
            assert!(
                !wrapped.contains('\r'),
                "no CR without a terminal: {wrapped:?}"
            );
            assert!(
                wrapped.contains(&format!("MOSH IP {RELAY_CLIENT_IP}\n")),
                "{wrapped:?}"
            );
            // What the hand-run recipes do: a shell `read` of the line.
            let mut parse = Command::new("sh");
            parse.args([
                "-c",
                r#"printf '%s' "$1" | while read -r w1 w2 port key; do
                     [ "$w1 $w2" = "MOSH CONNECT" ] && printf '%s' "$key"; done"#,
                "sh",
                &wrapped,
            ]);
            let key = cmd::run_ok(&mut parse, SHORT).unwrap();
            assert_eq!(key.len(), 22, "a shell `read` of the key gave {key:?}");
        }
    }
}

#[test]
fn daemon_log_to_a_file_has_no_ansi_escapes() {
    prereq::require().unwrap();
    let topo = NatTopology::build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("punch-secret");
    std::fs::write(&secret, random_secret()).unwrap();
    // Relay::start sends the daemon's stdout and stderr to a log file.
    let relay = topo.start_relay(&secret, &[]).unwrap();
    let log = relay.log();
    assert!(
        log.contains("INFO"),
        "the daemon logged nothing at info level:\n{log}"
    );
    assert!(
        !log.contains("\x1b["),
        "ANSI escapes in a log written to a file:\n{log:?}"
    );
}
