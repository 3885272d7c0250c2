//! The daemon side of the control socket: root-only, one request per line.

use std::net::SocketAddrV4;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::cluster::Cluster;
use crate::datapath::socket::RelaySocket;
use crate::datapath::xdp;
use crate::sessions::SharedRelay;
use forwarder_api::parse_backend;
use forwarder_api::{MAX_REQUEST_BYTES, Reply, Request};

/// Starts reading a new session's socket: the daemon's business (it owns
/// every task), handed to the server so it needs nothing above it.
pub type StartReader =
    std::sync::Arc<dyn Fn(SharedRelay, std::sync::Arc<RelaySocket>) + Send + Sync>;

/// Binds the control socket, refusing to take over a live daemon's.
pub fn bind(path: &Path, instance: &str) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("control socket path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "a forwarder daemon for instance {instance:?} is already running ({} answers): stop it first \
                 (`systemctl stop {}` or SIGTERM), or pick another --instance",
                path.display(),
                super::systemd_unit(instance)
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Root-only: the control API can redirect traffic.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// `cluster`: set when sessions are shared through etcd; `add` and
/// `remove` then go through it.
pub async fn serve(
    listener: UnixListener,
    relay: SharedRelay,
    start_reader: StartReader,
    cluster: Option<Cluster>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let relay = relay.clone();
                let start_reader = start_reader.clone();
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    if let Err(error) = handle(stream, relay, &start_reader, cluster.as_ref()).await
                    {
                        debug!(error = format!("{error:#}"), "control connection");
                    }
                });
            }
            Err(error) => {
                warn!(%error, "accepting a control connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    stream: UnixStream,
    relay: SharedRelay,
    start_reader: &StartReader,
    cluster: Option<&Cluster>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let reply =
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Err(_) => Reply::Error("no request within 10 s".into()),
            Ok(Err(error)) => Reply::Error(format!("reading the request: {error}")),
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Reply::Error(format!(
                "request larger than {MAX_REQUEST_BYTES} bytes refused"
            )),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => dispatch(request, &relay, start_reader, cluster).await,
                Err(error) => Reply::Error(format!("malformed request: {error}")),
            },
        };
    let mut text = serde_json::to_string(&reply)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

async fn dispatch(
    request: Request,
    relay: &SharedRelay,
    start_reader: &StartReader,
    cluster: Option<&Cluster>,
) -> Reply {
    match request {
        Request::Add {
            backend,
            port,
            idle_timeout_secs,
        } => match add(
            relay,
            start_reader,
            cluster,
            &backend,
            port,
            idle_timeout_secs,
        )
        .await
        {
            Ok(reply) => reply,
            Err(error) => Reply::Error(format!("{error:#}")),
        },
        Request::Remove { target } if cluster.is_some() => {
            let cluster = cluster.expect("checked by the guard");
            match cluster.remove(relay, &target).await {
                Ok(Some(info)) => Reply::Removed(info),
                Ok(None) => not_found(&target),
                Err(error) => Reply::Error(format!("{error:#}")),
            }
        }
        Request::Remove { target } => {
            let mut relay = relay.lock().expect("relay lock");
            match relay.find_session(&target) {
                Some(port) => match relay.remove_session(port, "removed by operator") {
                    Some(info) => Reply::Removed(info),
                    None => not_found(&target),
                },
                None => not_found(&target),
            }
        }
        Request::Show { target } => {
            let relay = relay.lock().expect("relay lock");
            match relay
                .find_session(&target)
                .and_then(|port| relay.session_info(port, crate::datapath::monotonic_ns()))
            {
                Some(info) => Reply::Session(info),
                None => not_found(&target),
            }
        }
        Request::List {} => Reply::Sessions(relay.lock().expect("relay lock").list()),
        Request::Stats {} => Reply::Stats(Box::new(relay.lock().expect("relay lock").stats())),
    }
}

fn not_found(target: &str) -> Reply {
    Reply::NotFound(format!(
        "no session with id or port {target:?}: see `forwarder list` for the ids"
    ))
}

async fn add(
    relay: &SharedRelay,
    start_reader: &StartReader,
    cluster: Option<&Cluster>,
    backend: &str,
    port: Option<u16>,
    idle_timeout_secs: Option<u64>,
) -> anyhow::Result<Reply> {
    let backend: SocketAddrV4 = parse_backend(backend)?;
    if idle_timeout_secs == Some(0) {
        bail!(
            "an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h"
        );
    }
    // The route lookup runs a command: keep it outside the relay lock.
    let ip = *backend.ip();
    let route = tokio::task::spawn_blocking(move || xdp::route_to(ip)).await??;
    if let Some(cluster) = cluster {
        let idle_timeout = idle_timeout_secs.map(Duration::from_secs);
        let info = cluster
            .add(relay, start_reader, backend, route, port, idle_timeout)
            .await?;
        return Ok(Reply::Session(info));
    }
    let (info, socket) = relay.lock().expect("relay lock").add_session(
        backend,
        route,
        port,
        idle_timeout_secs.map(Duration::from_secs),
    )?;
    start_reader(relay.clone(), socket);
    Ok(Reply::Session(info))
}
