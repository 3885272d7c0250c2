//! What runs on the far side of the two ssh connections, and how their
//! output is read: the command line that starts mosh-server on the host
//! (and reports `SSH_CONNECTION`), the `forwarder` verbs run on the
//! bastion, and the documents both print.

use std::net::IpAddr;

use anyhow::{Context, bail};
use serde::Deserialize;

use forwarder_api::{ErrorInfo, SessionInfo};

/// Asks the host for the address its sshd was reached on. The user's login
/// shell may not be POSIX, so `sh` runs the test, as the stock `mosh`
/// wrapper does (`--experimental-remote-ip=remote`).
const REPORT_SSH_CONNECTION: &str =
    r#"[ -n "$SSH_CONNECTION" ] && printf "\nMOSH SSH_CONNECTION %s\n" "$SSH_CONNECTION""#;

/// The remote command of step 1: report `SSH_CONNECTION`, then run
/// `server` (a command, unquoted, like mosh's `--server`) with its
/// arguments quoted for the remote shell.
pub fn host_command(server: &str, server_args: &[String]) -> String {
    format!(
        "sh -c {} ; {server} {}",
        shell_words::quote(REPORT_SSH_CONNECTION),
        shell_words::join(server_args)
    )
}

/// What the host printed: mosh-server's port and key, the address the ssh
/// connection arrived on, and every other line (mosh-server's banner, the
/// shell's complaints), kept for error messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostReport {
    pub connect: Option<(u16, String)>,
    /// The host's own address of the ssh connection: where the bastion
    /// (or, without a bastion, this machine) reached it.
    pub ssh_local_addr: Option<String>,
    pub other_lines: Vec<String>,
}

impl HostReport {
    /// Takes one line of the host's output; true once `MOSH CONNECT` came,
    /// after which nothing more is needed.
    pub fn take_line(&mut self, line: &str) -> anyhow::Result<bool> {
        let line = line.trim_matches(|c| c == '\r' || c == '\n');
        if let Some(rest) = line.trim().strip_prefix("MOSH SSH_CONNECTION ") {
            // client-address client-port server-address server-port
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [_, _, local, _] = words[..] else {
                bail!("the host printed a malformed SSH_CONNECTION: {line:?}");
            };
            self.ssh_local_addr = Some(local.to_string());
        } else if let Some(rest) = line.trim().strip_prefix("MOSH CONNECT ") {
            self.connect = Some(parse_connect(rest).with_context(|| {
                format!("mosh-server printed a malformed `MOSH CONNECT` line: {line:?}")
            })?);
            return Ok(true);
        } else if !line.trim().is_empty() {
            self.other_lines.push(line.to_string());
        }
        Ok(false)
    }
}

/// `PORT KEY`, the key being mosh's 22 base64 characters.
fn parse_connect(rest: &str) -> Option<(u16, String)> {
    let mut words = rest.split_whitespace();
    let port: u16 = words.next()?.parse().ok().filter(|&p| p != 0)?;
    let key = words.next()?;
    let is_key = key.len() == 22
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
    (is_key && words.next().is_none()).then(|| (port, key.to_string()))
}

/// An address the relay can forward to, from `SSH_CONNECTION`: IPv4, IPv6
/// (not link-local: it needs an interface the bastion's sessions do not
/// carry), or IPv4 written as IPv6 (`::ffff:a.b.c.d`, what a dual-stack
/// sshd reports), which is IPv4.
pub fn backend_ip(address: &str) -> Option<IpAddr> {
    match address.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => Some(v4.into()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(v4.into()),
            None if v6.is_unicast_link_local() => None,
            None => Some(v6.into()),
        },
    }
}

/// How a `forwarder ... --json` run on the bastion ended.
#[derive(Debug, PartialEq)]
pub enum RelayAnswer {
    Session(SessionInfo),
    /// The verb's own `--json` error document.
    Refused(ErrorInfo),
    /// Not a forwarder document at all (an older forwarder, a usage error,
    /// a shell message): its output, for the error message.
    Unreadable(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionDocument {
    schema_version: u32,
    session: SessionInfo,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorDocument {
    schema_version: u32,
    error: ErrorInfo,
}

/// Reads what `forwarder add|show|remove --json` printed on stdout.
pub fn relay_answer(stdout: &str, stderr: &str) -> RelayAnswer {
    let version = forwarder_api::JSON_SCHEMA_VERSION;
    if let Ok(document) = serde_json::from_str::<SessionDocument>(stdout)
        && document.schema_version == version
    {
        return RelayAnswer::Session(document.session);
    }
    if let Ok(document) = serde_json::from_str::<ErrorDocument>(stdout)
        && document.schema_version == version
    {
        return RelayAnswer::Refused(document.error);
    }
    let text = [stdout.trim(), stderr.trim()]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    RelayAnswer::Unreadable(text)
}

/// A `forwarder` command line for the bastion: `relay_command` unquoted
/// (like mosh's `--server`, it may carry its own words), the rest quoted.
pub fn relay_command(relay_command: &str, instance: Option<&str>, verb: &[String]) -> String {
    let mut words: Vec<String> = Vec::new();
    if let Some(instance) = instance {
        words.extend(["--instance".to_string(), instance.to_string()]);
    }
    words.extend(verb.iter().cloned());
    format!("{relay_command} {}", shell_words::join(words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_host_prints_through_a_pty() {
        let mut report = HostReport::default();
        let lines = [
            "\r\n",
            "MOSH SSH_CONNECTION 10.77.2.1 40312 10.77.2.2 22\r\n",
            "\r\n",
            "mosh-server (mosh 1.4.0) [build mosh 1.4.0]\r\n",
            "MOSH CONNECT 60001 4NeCCgvZFe2RnPgrcU1PQw\r\n",
        ];
        let done: Vec<bool> = lines
            .iter()
            .map(|line| report.take_line(line).unwrap())
            .collect();
        assert_eq!(done, [false, false, false, false, true]);
        assert_eq!(
            report.connect,
            Some((60001, "4NeCCgvZFe2RnPgrcU1PQw".to_string()))
        );
        assert_eq!(report.ssh_local_addr.as_deref(), Some("10.77.2.2"));
        assert_eq!(
            report.other_lines,
            ["mosh-server (mosh 1.4.0) [build mosh 1.4.0]"]
        );
    }

    #[test]
    fn refuses_malformed_protocol_lines() {
        let mut report = HostReport::default();
        assert!(report.take_line("MOSH SSH_CONNECTION 1 2 3").is_err());
        for bad in [
            "MOSH CONNECT 0 4NeCCgvZFe2RnPgrcU1PQw",
            "MOSH CONNECT 60001 short",
            "MOSH CONNECT 60001 4NeCCgvZFe2RnPgrcU1PQw extra",
            "MOSH CONNECT x 4NeCCgvZFe2RnPgrcU1PQw",
        ] {
            assert!(report.take_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_command_quotes_every_argument_but_the_server() {
        let args: Vec<String> = ["new", "-l", "LANG=C.UTF-8", "--", "echo", "it's"]
            .map(String::from)
            .to_vec();
        let command = host_command("/opt/mosh/bin/mosh-server", &args);
        assert!(
            command.starts_with("sh -c '[ -n \"$SSH_CONNECTION\" ] && printf"),
            "{command}"
        );
        assert!(
            command
                .ends_with(" ; /opt/mosh/bin/mosh-server new -l 'LANG=C.UTF-8' -- echo 'it'\\''s'"),
            "{command}"
        );
        // The remote shell splits it back into the same words.
        let words = shell_words::split(&command).unwrap();
        assert_eq!(words[..3], ["sh", "-c", REPORT_SSH_CONNECTION]);
        assert_eq!(words[words.len() - 6..], args[..]);
    }

    #[test]
    fn both_families_are_forwardable_and_mapped_ipv6_is_ipv4() {
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        assert_eq!(backend_ip("10.0.0.2"), ip("10.0.0.2"));
        assert_eq!(backend_ip("::ffff:10.0.0.2"), ip("10.0.0.2"));
        assert_eq!(backend_ip("2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(backend_ip("fe80::1"), None);
        assert_eq!(backend_ip("fe80::1%eth0"), None);
        assert_eq!(backend_ip("host"), None);
    }

    #[test]
    fn reads_the_relays_documents() {
        let session = r#"{"schema_version":1,"session":{"id":"s1","port":60000,"backend":"10.0.0.2:60001",
            "relay_addresses":["10.0.0.1"],"idle_timeout_secs":60,"idle_ms":0,"flows":[]}}"#;
        let RelayAnswer::Session(info) = relay_answer(session, "") else {
            panic!("not read as a session")
        };
        assert_eq!((info.id.as_str(), info.port), ("s1", 60000));
        let refused = r#"{"schema_version":1,"error":{"kind":"error","exit_code":1,"message":"too many sessions"}}"#;
        assert_eq!(
            relay_answer(refused, ""),
            RelayAnswer::Refused(ErrorInfo {
                kind: "error".into(),
                exit_code: 1,
                message: "too many sessions".into()
            })
        );
        assert_eq!(
            relay_answer("", "error: unexpected argument '--json'\n"),
            RelayAnswer::Unreadable("error: unexpected argument '--json'".into())
        );
    }

    #[test]
    fn relay_command_keeps_the_program_as_given() {
        let verb: Vec<String> = ["add", "--backend", "10.0.0.2:60001"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            relay_command("sudo -n forwarder", Some("edge"), &verb),
            "sudo -n forwarder --instance edge add --backend 10.0.0.2:60001"
        );
    }
}
