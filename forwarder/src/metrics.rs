//! Prometheus metrics on an opt-in address (`--metrics ADDR`).
//!
//! Every scrape renders the same numbers `forwarder stats` shows, read from
//! the pinned maps at that moment, through prometheus-client's text encoder.
//! The HTTP side is one GET per connection, so a tiny responder on the
//! daemon's tokio runtime serves it instead of a web framework.

use std::time::Duration;

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use forwarder_api::StatsInfo;
use crate::sessions::SharedRelay;

type Labels = Vec<(String, String)>;

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

fn counter_family(registry: &mut Registry, name: &str, help: &str, values: &[(Labels, u64)]) {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(labels).inc_by(*value);
    }
    registry.register(name, help, family);
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str, values: &[(Labels, i64)]) {
    let family = Family::<Labels, Gauge>::default();
    for (labels, value) in values {
        family.get_or_create(labels).set(*value);
    }
    registry.register(name, help, family);
}

/// The text exposition of `stats`.
pub fn render(stats: &StatsInfo) -> String {
    let mut registry = Registry::default();
    let instance = || label("instance", &stats.instance);
    let with = |key: &str, value: &str| {
        let mut labels = instance();
        labels.push((key.to_string(), value.to_string()));
        labels
    };
    let verdicts: Vec<_> = stats.verdicts.iter().map(|(v, n)| (with("verdict", v), *n)).collect();
    counter_family(&mut registry, "forwarder_xdp_packets", "Packets seen by the XDP program, by verdict", &verdicts);
    let reasons: Vec<_> = stats.reasons.iter().map(|(r, c)| (with("reason", r), c.packets)).collect();
    counter_family(&mut registry, "forwarder_xdp_reason_packets", "Packets seen by the XDP program, by reason", &reasons);
    let bytes: Vec<_> = stats.reasons.iter().map(|(r, c)| (with("reason", r), c.bytes)).collect();
    counter_family(&mut registry, "forwarder_xdp_reason_bytes", "Bytes seen by the XDP program, by reason", &bytes);

    let s = &stats.slow_path;
    counter_family(
        &mut registry,
        "forwarder_slow_path_packets",
        "Packets the daemon forwarded itself (first packets, lookup misses)",
        &[(with("direction", "to_server"), s.forwarded_to_server), (with("direction", "to_client"), s.forwarded_to_client)],
    );
    counter_family(
        &mut registry,
        "forwarder_slow_path_dropped",
        "Packets the daemon dropped, by reason",
        &[
            (with("reason", "not_from_server"), s.dropped_not_from_server),
            (with("reason", "server_wrong_path"), s.dropped_server_wrong_path),
            (with("reason", "client_is_backend"), s.dropped_client_is_backend),
            (with("reason", "unverified_client"), s.dropped_unverified_client),
            (with("reason", "unverified_server"), s.dropped_unverified_server),
            (with("reason", "no_session"), s.dropped_no_session),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_flows_refused",
        "New flows refused, by limit",
        &[(with("limit", "flows"), s.refused_flow_limit), (with("limit", "rate"), s.refused_rate_limit)],
    );
    counter_family(
        &mut registry,
        "forwarder_nat_moves",
        "Punched sessions that followed a verified new endpoint, by side",
        &[(with("side", "client"), s.nat_client_moves), (with("side", "server"), s.nat_server_moves)],
    );
    counter_family(&mut registry, "forwarder_flows_created", "Flows learned", &[(instance(), s.flows_created)]);
    counter_family(&mut registry, "forwarder_flows_expired", "Flows expired idle", &[(instance(), s.flows_expired)]);
    counter_family(&mut registry, "forwarder_sessions_expired", "Sessions expired idle", &[(instance(), s.sessions_expired)]);
    // Punch handshakes for NAT'd backends are not implemented yet: the series
    // exist so dashboards and alerts can be built now.
    counter_family(
        &mut registry,
        "forwarder_handshakes",
        "Punch handshakes, by outcome",
        &[(with("outcome", "accepted"), 0), (with("outcome", "refused"), 0)],
    );

    let c = &stats.capacity;
    gauge_family(&mut registry, "forwarder_sessions", "Sessions", &[(instance(), stats.sessions as i64)]);
    gauge_family(&mut registry, "forwarder_flows", "Flows", &[(instance(), stats.flows as i64)]);
    gauge_family(&mut registry, "forwarder_max_sessions", "Configured session limit", &[(instance(), c.max_sessions as i64)]);
    gauge_family(&mut registry, "forwarder_max_flows", "Flows the kernel maps hold", &[(instance(), i64::from(c.max_flows))]);
    let entries: Vec<_> =
        c.maps.iter().filter_map(|m| Some((with("map", &m.name), m.entries? as i64))).collect();
    gauge_family(&mut registry, "forwarder_map_entries", "Entries in a pinned hash map", &entries);
    let max: Vec<_> = c.maps.iter().map(|m| (with("map", &m.name), i64::from(m.max_entries))).collect();
    gauge_family(&mut registry, "forwarder_map_max_entries", "Capacity of a pinned map", &max);
    let memory: Vec<_> = c.maps.iter().map(|m| (with("map", &m.name), m.memlock_bytes as i64)).collect();
    gauge_family(&mut registry, "forwarder_map_memory_bytes", "Kernel memory of a pinned map", &memory);

    let d = &stats.descriptors;
    gauge_family(&mut registry, "forwarder_open_files", "Descriptors the daemon holds (a socket per session and flow)", &[(instance(), d.open as i64)]);
    gauge_family(&mut registry, "forwarder_open_files_limit", "The daemon's open-file limit (soft RLIMIT_NOFILE)", &[(instance(), i64::try_from(d.limit).unwrap_or(i64::MAX))]);
    gauge_family(&mut registry, "forwarder_open_files_reserve", "Descriptors kept free for the control socket, metrics and restarts", &[(instance(), d.reserve as i64)]);
    counter_family(&mut registry, "forwarder_flows_refused_open_files", "New flows refused at the open-file limit", &[(instance(), d.refused_flows)]);
    let warnings: Vec<_> = stats
        .warnings
        .iter()
        .map(|w| {
            let mut labels = with("kind", &w.kind);
            labels.push(("interface".to_string(), w.interface.clone()));
            (labels, 1)
        })
        .collect();
    gauge_family(&mut registry, "forwarder_warning", "A condition that loses or slows packets silently (see `forwarder stats`), 1 while it holds", &warnings);

    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// Binds the metrics address; fails early, with the fix, when it is taken.
pub async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics address {address}: pick a free address for --metrics"))
}

pub async fn serve(listener: TcpListener, relay: SharedRelay) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let relay = relay.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, relay).await {
                        debug!(%error, "metrics connection");
                    }
                });
            }
            Err(error) => {
                warn!(%error, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, relay: SharedRelay) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    // The request head only: nothing a scraper sends is larger.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(read) => read?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let (status, body) = if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET / ") {
        let stats = relay.lock().expect("relay lock").stats();
        ("200 OK", render(&stats))
    } else {
        ("404 Not Found", "metrics are at GET /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
