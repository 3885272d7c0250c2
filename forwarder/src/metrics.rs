//! Prometheus metrics on an opt-in address (`--metrics ADDR`).
//!
//! Every scrape renders the same numbers `forwarder stats` shows, read from
//! the pinned maps at that moment, through prometheus-client's encoder. The
//! body is OpenMetrics when the scraper asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does by default) and the
//! classic text format otherwise, each under its own content type, so
//! either parser types every sample. HTTP is hyper's (HTTP/1.1 only), on the
//! daemon's tokio runtime.
//!
//! Every series carries `relay="INSTANCE"`: not `instance`, which is the
//! target label Prometheus adds itself (ours would be renamed on scrape).

use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::sessions::SharedRelay;
use forwarder_api::StatsInfo;

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
    let instance = || label("relay", &stats.instance);
    let with = |key: &str, value: &str| {
        let mut labels = instance();
        labels.push((key.to_string(), value.to_string()));
        labels
    };
    let verdicts: Vec<_> = stats
        .verdicts
        .iter()
        .map(|(v, n)| (with("verdict", v), *n))
        .collect();
    counter_family(
        &mut registry,
        "forwarder_xdp_packets",
        "Packets seen by the XDP program, by verdict",
        &verdicts,
    );
    let reasons: Vec<_> = stats
        .reasons
        .iter()
        .map(|(r, c)| (with("reason", r), c.packets))
        .collect();
    counter_family(
        &mut registry,
        "forwarder_xdp_reason_packets",
        "Packets seen by the XDP program, by reason",
        &reasons,
    );
    let bytes: Vec<_> = stats
        .reasons
        .iter()
        .map(|(r, c)| (with("reason", r), c.bytes))
        .collect();
    counter_family(
        &mut registry,
        "forwarder_xdp_reason_bytes",
        "Bytes seen by the XDP program, by reason",
        &bytes,
    );

    let s = &stats.slow_path;
    counter_family(
        &mut registry,
        "forwarder_slow_path_packets",
        "Packets the daemon forwarded itself (first packets, lookup misses)",
        &[
            (with("direction", "to_server"), s.forwarded_to_server),
            (with("direction", "to_client"), s.forwarded_to_client),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_slow_path_dropped",
        "Packets the daemon dropped, by reason",
        &[
            (with("reason", "not_from_server"), s.dropped_not_from_server),
            (
                with("reason", "server_wrong_path"),
                s.dropped_server_wrong_path,
            ),
            (
                with("reason", "client_is_backend"),
                s.dropped_client_is_backend,
            ),
            (
                with("reason", "unverified_client"),
                s.dropped_unverified_client,
            ),
            (
                with("reason", "unverified_server"),
                s.dropped_unverified_server,
            ),
            (with("reason", "no_session"), s.dropped_no_session),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_flows_refused",
        "New flows refused, by limit",
        &[
            (with("limit", "flows"), s.refused_flow_limit),
            (with("limit", "rate"), s.refused_rate_limit),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_nat_moves",
        "Punched sessions that followed a verified new endpoint, by side",
        &[
            (with("side", "client"), s.nat_client_moves),
            (with("side", "server"), s.nat_server_moves),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_shared_port_datagrams",
        "Datagrams from new client endpoints on the shared port, by outcome (admitted: matched to a keyed session by its key)",
        &[
            (with("outcome", "admitted"), s.shared_admitted),
            (with("outcome", "unverified"), s.shared_unverified),
            (with("outcome", "wrong_direction"), s.shared_wrong_direction),
            (with("outcome", "replayed"), s.shared_replayed),
        ],
    );
    counter_family(
        &mut registry,
        "forwarder_flows_created",
        "Flows learned",
        &[(instance(), s.flows_created)],
    );
    counter_family(
        &mut registry,
        "forwarder_flows_expired",
        "Flows expired idle",
        &[(instance(), s.flows_expired)],
    );
    counter_family(
        &mut registry,
        "forwarder_sessions_expired",
        "Sessions expired idle",
        &[(instance(), s.sessions_expired)],
    );
    // Punch handshakes for NAT'd backends are not implemented yet: the series
    // exist so dashboards and alerts can be built now.
    counter_family(
        &mut registry,
        "forwarder_handshakes",
        "Punch handshakes, by outcome",
        &[
            (with("outcome", "accepted"), 0),
            (with("outcome", "refused"), 0),
        ],
    );

    let c = &stats.capacity;
    gauge_family(
        &mut registry,
        "forwarder_sessions",
        "Sessions",
        &[(instance(), stats.sessions as i64)],
    );
    gauge_family(
        &mut registry,
        "forwarder_flows",
        "Flows",
        &[(instance(), stats.flows as i64)],
    );
    gauge_family(
        &mut registry,
        "forwarder_max_sessions",
        "Configured session limit",
        &[(instance(), c.max_sessions as i64)],
    );
    gauge_family(
        &mut registry,
        "forwarder_max_flows",
        "IPv4 flows the kernel maps hold",
        &[(instance(), i64::from(c.max_flows))],
    );
    gauge_family(
        &mut registry,
        "forwarder_max_flows6",
        "IPv6 and translated flows the kernel maps hold",
        &[(instance(), i64::from(c.max_flows6))],
    );
    let entries: Vec<_> = c
        .maps
        .iter()
        .filter_map(|m| Some((with("map", &m.name), m.entries? as i64)))
        .collect();
    gauge_family(
        &mut registry,
        "forwarder_map_entries",
        "Entries in a pinned hash map",
        &entries,
    );
    let max: Vec<_> = c
        .maps
        .iter()
        .map(|m| (with("map", &m.name), i64::from(m.max_entries)))
        .collect();
    gauge_family(
        &mut registry,
        "forwarder_map_max_entries",
        "Capacity of a pinned map",
        &max,
    );
    let memory: Vec<_> = c
        .maps
        .iter()
        .map(|m| (with("map", &m.name), m.memlock_bytes as i64))
        .collect();
    gauge_family(
        &mut registry,
        "forwarder_map_memory_bytes",
        "Kernel memory of a pinned map",
        &memory,
    );

    let d = &stats.descriptors;
    gauge_family(
        &mut registry,
        "forwarder_open_files",
        "Descriptors the daemon holds (a socket per session and flow)",
        &[(instance(), d.open as i64)],
    );
    gauge_family(
        &mut registry,
        "forwarder_open_files_limit",
        "The daemon's open-file limit (soft RLIMIT_NOFILE)",
        &[(instance(), i64::try_from(d.limit).unwrap_or(i64::MAX))],
    );
    gauge_family(
        &mut registry,
        "forwarder_open_files_reserve",
        "Descriptors kept free for the control socket, metrics and restarts",
        &[(instance(), d.reserve as i64)],
    );
    counter_family(
        &mut registry,
        "forwarder_flows_refused_open_files",
        "New flows refused at the open-file limit",
        &[(instance(), d.refused_flows)],
    );
    let warnings: Vec<_> = stats
        .warnings
        .iter()
        .map(|w| {
            let mut labels = with("kind", &w.kind);
            labels.push(("interface".to_string(), w.interface.clone()));
            (labels, 1)
        })
        .collect();
    gauge_family(
        &mut registry,
        "forwarder_warning",
        "A condition that loses or slows packets silently (see `forwarder stats`), 1 while it holds",
        &warnings,
    );
    if let Some(cluster) = &stats.cluster {
        render_cluster(&mut registry, &stats.instance, cluster);
    }

    if let Some(tcp) = &stats.tcp {
        tcp_families(&mut registry, tcp, &with);
    }

    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// A cluster (`run --etcd`): whether etcd answers, and which relay holds
/// what (`holder` is the relay the numbers are about, as it last published).
fn render_cluster(registry: &mut Registry, instance: &str, cluster: &forwarder_api::ClusterInfo) {
    let relay = || {
        let mut labels = label("relay", instance);
        labels.push(("cluster_relay".to_string(), cluster.relay.clone()));
        labels
    };
    gauge_family(
        registry,
        "forwarder_cluster_etcd_connected",
        "1 while etcd answers; 0: forwarding goes on, add and remove are refused",
        &[(relay(), i64::from(cluster.etcd_connected))],
    );
    gauge_family(
        registry,
        "forwarder_cluster_shared_sessions",
        "Sessions etcd holds, as this relay last saw them",
        &[(relay(), cluster.shared_sessions as i64)],
    );
    gauge_family(
        registry,
        "forwarder_cluster_relays",
        "Relays holding a lease in etcd, this one included",
        &[(relay(), cluster.relays.len() as i64)],
    );
    gauge_family(
        registry,
        "forwarder_cluster_refused_sessions",
        "Shared sessions this relay cannot program (`forwarder stats` says why), e.g. a key it cannot open",
        &[(relay(), cluster.refused.len() as i64)],
    );
    let holder = |name: &str| {
        let mut labels = relay();
        labels.push(("holder".to_string(), name.to_string()));
        labels
    };
    let held: Vec<_> = cluster
        .relays
        .iter()
        .map(|r| (holder(&r.relay), r.sessions.len() as i64))
        .collect();
    gauge_family(
        registry,
        "forwarder_cluster_held_sessions",
        "Shared sessions each live relay has programmed",
        &held,
    );
    let flows: Vec<_> = cluster
        .relays
        .iter()
        .map(|r| {
            let flows: u64 = r.sessions.values().map(|s| s.flows).sum();
            (holder(&r.relay), flows as i64)
        })
        .collect();
    gauge_family(
        registry,
        "forwarder_cluster_held_flows",
        "Client flows on each live relay, over all shared sessions",
        &flows,
    );
}

/// The TCP bridge's counters (`run --tcp-port`).
fn tcp_families(
    registry: &mut Registry,
    tcp: &forwarder_api::TcpStats,
    with: &dyn Fn(&str, &str) -> Labels,
) {
    gauge_family(
        registry,
        "forwarder_tcp_streams_open",
        "TCP streams open now on --tcp-port, authenticated or not",
        &[(with("port", &tcp.port.to_string()), tcp.streams_open as i64)],
    );
    counter_family(
        registry,
        "forwarder_tcp_streams",
        "TCP streams by outcome (accepted: every stream; authenticated: its hello named a session with its token)",
        &[
            (with("outcome", "accepted"), tcp.streams_accepted),
            (with("outcome", "authenticated"), tcp.streams_authenticated),
            (with("outcome", "bad_hello"), tcp.refused_bad_hello),
            (with("outcome", "hello_timeout"), tcp.refused_hello_timeout),
            (with("outcome", "stream_limit"), tcp.refused_stream_limit),
            (with("outcome", "bad_frame"), tcp.closed_bad_frame),
            (with("outcome", "idle"), tcp.closed_idle),
        ],
    );
    counter_family(
        registry,
        "forwarder_tcp_datagrams",
        "Datagrams carried by TCP streams, by direction; stale: dropped for a backed-up writer",
        &[
            (with("direction", "to_server"), tcp.datagrams_to_server),
            (with("direction", "to_client"), tcp.datagrams_to_client),
            (with("direction", "stale"), tcp.dropped_stale),
        ],
    );
}

/// Binds the metrics address; fails early, with the fix, when it is taken.
pub async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| {
        format!("binding the metrics address {address}: pick a free address for --metrics")
    })
}

/// Content types of the two expositions.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    accept
        .and_then(|value| value.to_str().ok())
        .is_some_and(|text| {
            text.split(',')
                .any(|part| part.trim().starts_with("application/openmetrics-text"))
        })
}

/// The classic text format of the same registry: prometheus-client writes
/// OpenMetrics, whose counter families are declared without `_total` and
/// which ends in `# EOF`; the classic parser wants the declaration under
/// the sample's own name and no EOF marker.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let declared = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(declared.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn respond(request: &Request<hyper::body::Incoming>, relay: &SharedRelay) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, content_type, body) =
        if request.method() == Method::GET && (path == "/metrics" || path == "/") {
            let stats = relay.lock().expect("relay lock").stats();
            let body = render(&stats);
            if wants_openmetrics(request.headers().get(ACCEPT)) {
                (StatusCode::OK, OPENMETRICS, body)
            } else {
                (StatusCode::OK, CLASSIC_TEXT, classic_text(&body))
            }
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "metrics are at GET /metrics\n".to_string(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub async fn serve(listener: TcpListener, relay: SharedRelay) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let relay = relay.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let response = respond(&request, &relay);
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        // One scrape per connection, closed after the answer
                        // (what simple scrapers that read to EOF expect).
                        .keep_alive(false)
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = connection.await {
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
