//! `forwarder add --from-file FILE|-`: many sessions from one process over
//! one control connection, as `add_many` requests of up to
//! [`CHUNK`] sessions each, sent while earlier replies are read back.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use forwarder_api::{AddResult, MAX_BATCH_SESSIONS, MAX_REQUEST_BYTES, NewSession, Reply, Request};
use serde::Serialize;

use super::client::{Connection, Failure};

/// Sessions per `add_many` request: each is one hold of the relay lock
/// and one store commit (one disk flush, a few milliseconds). 500 keeps a
/// hold near 20 ms, so the slow path's sockets do not overflow meanwhile,
/// while the flush is shared by enough adds to pass 10,000 a second.
pub const CHUNK: usize = 500;
const _: () = assert!(CHUNK <= MAX_BATCH_SESSIONS);

/// Largest file `--from-file` reads.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// One line's outcome, as `add --from-file --json` prints it.
#[derive(Debug, Serialize)]
pub struct LineResult {
    /// The line of the file (from 1).
    pub line: usize,
    #[serde(flatten)]
    pub result: AddResult,
}

/// Parses the sessions of a `--from-file` file. One per line, either
/// `BACKEND [port=PORT] [idle_timeout=DURATION]` or a JSON object with the
/// fields of `add` (`{"backend": ..., "port": ..., "idle_timeout_secs":
/// ..., "key": ...}`); blank lines and lines starting with `#` are skipped.
/// A line that does not parse refuses the whole file, naming the line,
/// before anything is sent.
pub fn parse(text: &str) -> anyhow::Result<Vec<(usize, NewSession)>> {
    let mut sessions = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let session = if line.starts_with('{') {
            serde_json::from_str::<NewSession>(line).with_context(|| {
                format!(
                    "line {number}: not a session object: give {{\"backend\": \"IP:PORT\"}} with optional \
                     \"port\", \"idle_timeout_secs\" and \"key\""
                )
            })?
        } else {
            plain(line).with_context(|| format!("line {number}"))?
        };
        if session.idle_timeout_secs == Some(0) {
            bail!(
                "line {number}: an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h"
            );
        }
        if let Some(key) = &session.key {
            crate::mosh::MoshKey::parse(key).with_context(|| format!("line {number}"))?;
        }
        sessions.push((number, session));
    }
    Ok(sessions)
}

/// `BACKEND [port=PORT] [idle_timeout=DURATION]`.
fn plain(line: &str) -> anyhow::Result<NewSession> {
    let mut fields = line.split_whitespace();
    let backend = fields.next().context("no backend")?.to_string();
    let mut session = NewSession {
        backend,
        port: None,
        idle_timeout_secs: None,
        key: None,
    };
    for field in fields {
        match field.split_once('=') {
            Some(("port", port)) => {
                session.port = Some(
                    port.parse()
                        .with_context(|| format!("port={port} is not a port number (1-65535)"))?,
                );
            }
            Some(("idle_timeout", text)) => {
                let timeout = humantime::parse_duration(text).with_context(|| {
                    format!("idle_timeout={text} is not a duration such as 7d or 12h")
                })?;
                session.idle_timeout_secs = Some(timeout.as_secs());
            }
            _ => bail!(
                "{field:?} is not understood: a line is BACKEND [port=PORT] [idle_timeout=DURATION], or a \
                 JSON object (keys only there, as \"key\")"
            ),
        }
    }
    Ok(session)
}

/// Reads `path` (`-`: standard input).
pub fn read(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_FILE_BYTES)
            .read_to_string(&mut text)
            .context("reading sessions from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_FILE_BYTES).read_to_string(&mut text))
            .with_context(|| {
                format!(
                    "reading sessions from {} (give a file of one session per line, or - for standard input)",
                    path.display()
                )
            })?;
    }
    Ok(text)
}

/// Sends every session over one connection: a thread writes the requests
/// while this one reads the replies, so neither side ever waits on a full
/// socket buffer. Returns each line's result, in file order.
pub fn add_all(
    instance: &str,
    sessions: Vec<(usize, NewSession)>,
) -> anyhow::Result<Vec<LineResult>> {
    let mut connection = Connection::open(instance)?;
    let mut writer = connection.try_clone()?;
    let mut lines: Vec<Vec<usize>> = Vec::new();
    let mut chunks = Vec::new();
    let mut current: Vec<NewSession> = Vec::new();
    let mut numbers = Vec::new();
    let mut bytes = 0;
    for (line, session) in sessions {
        let size = serde_json::to_string(&session)?.len() + 1;
        // Under the daemon's line limit with room for the envelope.
        if !current.is_empty() && (current.len() == CHUNK || bytes + size > MAX_REQUEST_BYTES / 2) {
            chunks.push(Request::AddMany {
                sessions: std::mem::take(&mut current),
            });
            lines.push(std::mem::take(&mut numbers));
            bytes = 0;
        }
        bytes += size;
        current.push(session);
        numbers.push(line);
    }
    if !current.is_empty() {
        chunks.push(Request::AddMany { sessions: current });
        lines.push(numbers);
    }
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> anyhow::Result<()> {
            for request in &chunks {
                writer.send(request)?;
            }
            Ok(())
        });
        let mut results = Vec::new();
        for numbers in &lines {
            let reply = connection.receive_within(Duration::from_secs(120))?;
            let Reply::AddedMany(outcomes) = reply else {
                bail!(
                    "the daemon answered `add_many` with something else: is it the same version as this CLI?"
                );
            };
            if outcomes.len() != numbers.len() {
                bail!(
                    "the daemon answered {} results for {} sessions: is it the same version as this CLI?",
                    outcomes.len(),
                    numbers.len()
                );
            }
            results.extend(
                numbers
                    .iter()
                    .zip(outcomes)
                    .map(|(&line, result)| LineResult { line, result }),
            );
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the request writer panicked"))??;
        Ok(results)
    })
}

/// Prints the results and says whether every line was added: a failed
/// line makes the command fail (after every line was reported).
pub fn report(results: &[LineResult], json: bool) -> anyhow::Result<()> {
    let failed = results
        .iter()
        .filter(|r| matches!(r.result, AddResult::Error(_)))
        .count();
    if json {
        let document = serde_json::json!({
            "schema_version": forwarder_api::JSON_SCHEMA_VERSION,
            "results": results,
            "added": results.len() - failed,
            "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        for result in results {
            match &result.result {
                AddResult::Session(session) => println!(
                    "line {}: session {} forwards port {} to {}",
                    result.line, session.id, session.port, session.backend
                ),
                AddResult::Error(message) => {
                    println!("line {}: not added: {message}", result.line);
                }
            }
        }
        println!(
            "added {} of {} sessions",
            results.len() - failed,
            results.len()
        );
    }
    if failed > 0 {
        return Err(anyhow::Error::new(Failure::Reported).context(format!(
            "{failed} of {} sessions were not added: each failed line says why above; fix those lines and \
             run them again (the others exist now)",
            results.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_in_both_forms_and_a_bad_line_refuses_the_file() {
        let text = "# sessions\n10.0.0.2:60001\n\n10.0.0.3:60001 port=60010 idle_timeout=12h\n\
                    {\"backend\": \"10.0.0.4:60001\", \"key\": \"6xoXFHJqYUQUE2f4Q202jg\"}\n";
        let sessions = parse(text).unwrap();
        let lines: Vec<usize> = sessions.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [2, 4, 5]);
        assert_eq!(sessions[1].1.port, Some(60010));
        assert_eq!(sessions[1].1.idle_timeout_secs, Some(12 * 3600));
        assert!(sessions[2].1.key.is_some());
        for (bad, says) in [
            ("10.0.0.2:1\n10.0.0.3:1 prot=5\n", "line 2"),
            ("10.0.0.2:1 port=70000\n", "not a port number"),
            (
                "{\"backend\": \"10.0.0.2:1\", \"prot\": 5}\n",
                "line 1: not a session object",
            ),
            ("10.0.0.2:1 idle_timeout=0s\n", "idle timeout of 0"),
            (
                "{\"backend\": \"10.0.0.2:1\", \"key\": \"short\"}\n",
                "line 1",
            ),
        ] {
            let error = format!("{:#}", parse(bad).unwrap_err());
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }
}
