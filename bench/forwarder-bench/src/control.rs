//! Control-plane rates: session adds through the control API on one
//! connection (`adds`), and new flows learned by the daemon (`learn`
//! sends each flow's first datagram, `learn-sink` counts them where the
//! relay delivers them). Each prints one JSON line last.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use forwarder::control::client::Connection;
use forwarder_api::{AddResult, NewSession, Reply, Request};
use serde_json::json;

/// `adds`: `count` sessions towards `backend_ip:base_port..`, on one
/// connection to the daemon of `instance`: `batch` 0 sends single `add`
/// requests pipelined (a thread writes while this one reads the replies),
/// otherwise `add_many` requests of `batch` sessions each, pipelined too.
pub fn adds(
    instance: &str,
    count: usize,
    batch: usize,
    backend_ip: Ipv4Addr,
    base_port: u16,
) -> anyhow::Result<()> {
    let sessions: Vec<NewSession> = (0..count)
        .map(|index| NewSession {
            backend: SocketAddrV4::new(backend_ip, base_port + index as u16).to_string(),
            port: None,
            idle_timeout_secs: None,
            key: None,
        })
        .collect();
    let requests: Vec<Request> = if batch == 0 {
        sessions
            .into_iter()
            .map(|session| Request::Add {
                backend: session.backend,
                port: None,
                idle_timeout_secs: None,
                key: None,
            })
            .collect()
    } else {
        sessions
            .chunks(batch)
            .map(|chunk| Request::AddMany {
                sessions: chunk.to_vec(),
            })
            .collect()
    };
    let mut connection = Connection::open(instance)?;
    let mut writer = connection.try_clone()?;
    let replies = requests.len();
    let started = Instant::now();
    let (added, failed, first_error) = std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> anyhow::Result<()> {
            for request in &requests {
                writer.send(request)?;
            }
            Ok(())
        });
        let mut added = 0usize;
        let mut failed = 0usize;
        let mut first_error = None;
        for _ in 0..replies {
            match connection.receive_within(Duration::from_secs(120)) {
                Ok(Reply::Session(_)) => added += 1,
                Ok(Reply::AddedMany(results)) => {
                    for result in results {
                        match result {
                            AddResult::Session(_) => added += 1,
                            AddResult::Error(message) => {
                                failed += 1;
                                first_error.get_or_insert(message);
                            }
                        }
                    }
                }
                Ok(other) => bail!("unexpected reply {other:?}"),
                Err(error) => {
                    failed += 1;
                    first_error.get_or_insert(format!("{error:#}"));
                }
            }
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the request writer panicked"))??;
        Ok((added, failed, first_error))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "mode": if batch == 0 { "single, pipelined" } else { "add_many" },
            "batch": batch, "added": added, "failed": failed, "first_error": first_error,
            "seconds": seconds, "adds_per_sec": added as f64 / seconds,
        })
    );
    Ok(())
}

/// `learn`: the first datagram of `flows` new flows (source ports
/// `src_port_base..`, one short-lived socket each, so the sender holds one
/// descriptor), paced to `rate` per second by the clock.
pub fn learn(dst: SocketAddrV4, flows: usize, rate: f64, src_port_base: u16) -> anyhow::Result<()> {
    if usize::from(src_port_base) + flows > usize::from(u16::MAX) {
        bail!("--src-port-base {src_port_base} + --flows {flows} runs past port 65535");
    }
    let payload = [0x5au8; 64];
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let started = Instant::now();
    let mut failed = 0usize;
    for index in 0..flows {
        // Ahead of schedule: wait (spinning: sleeps overshoot by far more than the interval).
        let due = interval.mul_f64(index as f64);
        while started.elapsed() < due {
            std::hint::spin_loop();
        }
        let port = src_port_base + index as u16;
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .with_context(|| format!("binding source port {port}"))?;
        if socket.send_to(&payload, dst).is_err() {
            failed += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"flows": flows, "send_failed": failed, "seconds": seconds, "offered_per_sec": flows as f64 / seconds})
    );
    Ok(())
}

/// `learn-sink`: counts datagrams arriving at `bind` until `expect`
/// arrived or nothing came for `idle_ms`; the rate is arrivals between
/// the first and the last, so the start-up of the sender does not count.
pub fn learn_sink(bind: SocketAddrV4, expect: usize, idle_ms: u64) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    // Room for a burst while this process is descheduled.
    nix::sys::socket::setsockopt(
        &socket.as_fd(),
        nix::sys::socket::sockopt::RcvBuf,
        &(8 << 20),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(idle_ms.max(1))))?;
    println!("{}", json!({"listening": bind.to_string()}));
    let mut buf = [0u8; 2048];
    let mut received = 0usize;
    let mut first = None;
    let mut last = Instant::now();
    // The sender starts after this prints: wait for it at most a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while received < expect {
        match socket.recv_from(&mut buf) {
            Ok(_) => {
                received += 1;
                last = Instant::now();
                first.get_or_insert(last);
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if first.is_some() || Instant::now() > deadline {
                    break;
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    let span = first.map_or(0.0, |first| (last - first).as_secs_f64());
    println!(
        "{}",
        json!({
            "received": received, "expected": expect, "first_to_last_seconds": span,
            "learned_per_sec": if span > 0.0 { (received.saturating_sub(1)) as f64 / span } else { 0.0 },
        })
    );
    Ok(())
}
