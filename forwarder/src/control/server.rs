//! The daemon side of the control socket: root and the socket's group, one
//! request per line. Every caller is known by its uid (SO_PEERCRED): a
//! non-root caller adds sessions within the backend policy and its quotas,
//! and sees, shows and removes only its own; `stats` is root's.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::cluster::{Cluster, NewShared, Removal};
use crate::datapath::socket::RelaySocket;
use crate::datapath::xdp;
use crate::sessions::SharedRelay;
use crate::sessions::batch::BatchItem;
use crate::users::{self, Owner};
use forwarder_api::parse_backend;
use forwarder_api::{AddResult, MAX_BATCH_SESSIONS, MAX_REQUEST_BYTES, Reply, Request};

/// Starts reading a new session's socket: the daemon's business (it owns
/// every task), handed to the server so it needs nothing above it.
pub type StartReader =
    std::sync::Arc<dyn Fn(SharedRelay, std::sync::Arc<RelaySocket>) + Send + Sync>;

/// The group the control socket is given, looked up before anything is bound.
#[derive(Clone, Debug)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

impl SocketGroup {
    /// Looks `name` up; a missing group is refused with the ways on.
    pub fn lookup(name: &str) -> anyhow::Result<Self> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(Self {
                name: group.name,
                gid: group.gid.as_raw(),
            }),
            Ok(None) => bail!(
                "the control socket's group {name:?} does not exist: create it (`addgroup --system {name}`; the \
                 package creates `forwarder`) and add the users who may create sessions (`adduser USER {name}`), \
                 or name another with --socket-group (socket_group in the config; `root` keeps the socket root's)"
            ),
            Err(error) => bail!("looking up the control socket's group {name:?}: {error}"),
        }
    }
}

/// Binds the control socket, refusing to take over a live daemon's, and
/// gives it to root and `group` (mode 0660).
pub fn bind(path: &Path, instance: &str, group: &SocketGroup) -> anyhow::Result<UnixListener> {
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
    // Root and the group only: the control API makes the relay send traffic.
    // The group first, then the mode: never group-writable for another group.
    if let Err(error) = std::os::unix::fs::chown(path, Some(0), Some(group.gid)) {
        let _ = std::fs::remove_file(path);
        bail!(
            "giving the control socket {} to group {:?}: {error}; the daemon needs CAP_CHOWN or membership \
             of the group (the packaged unit has SupplementaryGroups=forwarder: add the group you name there)",
            path.display(),
            group.name
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
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

/// Serves one connection: one reply line per request line, in order, until
/// the caller closes it (a pipelining caller writes many requests before
/// reading the replies). The first request must come within 10 s, and
/// each later one within 10 s of the previous reply.
async fn handle(
    stream: UnixStream,
    relay: SharedRelay,
    start_reader: &StartReader,
    cluster: Option<&Cluster>,
) -> anyhow::Result<()> {
    let caller = caller(&stream).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut answered = 0u64;
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            (&mut reader)
                .take(MAX_REQUEST_BYTES as u64 + 1)
                .read_line(&mut line),
        )
        .await;
        // After a reply, silence or the end of the stream just ends the connection.
        let (reply, last) = match read {
            Err(_) if answered == 0 => (Reply::Error("no request within 10 s".into()), true),
            Err(_) => return Ok(()),
            // A connection closed after its requests; one that sent nothing
            // at all is told so (an empty request, malformed).
            Ok(Ok(0)) if answered > 0 => return Ok(()),
            Ok(Ok(0)) => (
                Reply::Error(match serde_json::from_str::<Request>(&line) {
                    Ok(_) => "empty request".into(),
                    Err(error) => format!("malformed request: {error}"),
                }),
                true,
            ),
            Ok(Err(error)) => (Reply::Error(format!("reading the request: {error}")), true),
            // The rest of that line is still unread: nothing after it can be parsed.
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => (
                Reply::Error(format!(
                    "request larger than {MAX_REQUEST_BYTES} bytes refused: send fewer sessions per \
                     add_many (at most {MAX_BATCH_SESSIONS})"
                )),
                true,
            ),
            Ok(Ok(_)) => (
                match serde_json::from_str::<Request>(&line) {
                    Ok(request) => dispatch(request, &caller, &relay, start_reader, cluster).await,
                    Err(error) => Reply::Error(format!("malformed request: {error}")),
                },
                false,
            ),
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        answered += 1;
        if last {
            return Ok(());
        }
    }
}

/// Who is on the other end: the uid and gid the kernel recorded when it
/// connected, its name and groups from the user database (off the runtime's
/// threads: NSS may ask a directory server).
async fn caller(stream: &UnixStream) -> anyhow::Result<Owner> {
    let credentials = stream
        .peer_cred()
        .context("reading the caller's credentials (SO_PEERCRED)")?;
    let (uid, gid) = (credentials.uid(), credentials.gid());
    Ok(tokio::task::spawn_blocking(move || Owner::lookup(uid, Some(gid))).await?)
}

async fn dispatch(
    request: Request,
    caller: &Owner,
    relay: &SharedRelay,
    start_reader: &StartReader,
    cluster: Option<&Cluster>,
) -> Reply {
    match request {
        Request::Add {
            backend,
            port,
            idle_timeout_secs,
            key,
        } => match add(
            relay,
            start_reader,
            caller,
            cluster,
            NewSession {
                backend: &backend,
                port,
                idle_timeout_secs,
                key: key.as_deref(),
            },
        )
        .await
        {
            Ok(reply) => reply,
            Err(error) => {
                let reason = format!("{error:#}");
                users::audit_refusal(caller, "add", &backend, &reason);
                Reply::Error(reason)
            }
        },
        Request::AddMany { sessions } if sessions.len() > MAX_BATCH_SESSIONS => {
            Reply::Error(format!(
                "add_many carries {} sessions, more than the {MAX_BATCH_SESSIONS} one request may: split \
                 them into several requests (on the same connection if you like)",
                sessions.len()
            ))
        }
        Request::AddMany { sessions } => {
            Reply::AddedMany(add_many(relay, start_reader, caller, cluster, sessions).await)
        }
        // Shared sessions: etcd's table decides, also for sessions this
        // relay has not programmed, with the same owner checks.
        Request::Remove { target } if cluster.is_some() => {
            let cluster = cluster.expect("checked by the guard");
            match cluster.remove(relay, caller, &target).await {
                Ok(Removal::Removed(info)) => {
                    users::audit_change(caller, "remove", &info);
                    Reply::Removed(*info)
                }
                Ok(Removal::NotFound) => not_found(&target),
                Ok(Removal::Denied(reason)) => {
                    users::audit_refusal(caller, "remove", &target, &reason);
                    Reply::PermissionDenied(reason)
                }
                Err(error) => Reply::Error(format!("{error:#}")),
            }
        }
        Request::Remove { target } => {
            let mut relay = relay.lock().expect("relay lock");
            let port = match owned_session(&relay, caller, &target, "remove") {
                Ok(port) => port,
                Err(refusal) => return *refusal,
            };
            let why = if caller.is_root() {
                "removed by root"
            } else {
                "removed by its owner"
            };
            match relay.remove_session(port, why) {
                Some(info) => {
                    users::audit_change(caller, "remove", &info);
                    Reply::Removed(info)
                }
                None => not_found(&target),
            }
        }
        Request::Show { target } => {
            let relay = relay.lock().expect("relay lock");
            let port = match owned_session(&relay, caller, &target, "show") {
                Ok(port) => port,
                Err(refusal) => return *refusal,
            };
            match relay.session_info(port, crate::datapath::monotonic_ns()) {
                Some(info) => Reply::Session(info),
                None => not_found(&target),
            }
        }
        Request::List {} => {
            let mut sessions = relay.lock().expect("relay lock").list();
            if !caller.is_root() {
                sessions.retain(|session| session.owner.uid == caller.uid);
            }
            Reply::Sessions(sessions)
        }
        Request::Stats {} if !caller.is_root() => Reply::PermissionDenied(format!(
            "`stats` shows the whole relay and is root's; user {} (uid {}) may list, show, add and remove \
             its own sessions",
            caller.name, caller.uid
        )),
        Request::Stats {} => Reply::Stats(Box::new(relay.lock().expect("relay lock").stats())),
    }
}

/// The port of the session `target` names, when `caller` may act on it:
/// root on every session, anyone else on its own. Another user's session
/// is refused as such (its port is no secret: it is bound on the host),
/// and the refusal is audited.
fn owned_session(
    relay: &crate::sessions::Relay,
    caller: &Owner,
    target: &str,
    action: &'static str,
) -> Result<u16, Box<Reply>> {
    let Some(port) = relay.find_session(target) else {
        return Err(Box::new(not_found(target)));
    };
    match relay.owner_of(port) {
        Some(owner) if caller.is_root() || owner.uid == caller.uid => Ok(port),
        Some(_) => {
            let reason = format!(
                "session {target} belongs to another user: user {} (uid {}) may {action} only its own \
                 sessions (`forwarder list` shows them); root may {action} any",
                caller.name, caller.uid
            );
            users::audit_refusal(caller, action, target, &reason);
            Err(Box::new(Reply::PermissionDenied(reason)))
        }
        None => Err(Box::new(not_found(target))),
    }
}

fn not_found(target: &str) -> Reply {
    Reply::NotFound(format!(
        "no session with id or port {target:?}: see `forwarder list` for the ids"
    ))
}

/// What an `add` request asks for.
struct NewSession<'a> {
    backend: &'a str,
    port: Option<u16>,
    idle_timeout_secs: Option<u64>,
    key: Option<&'a str>,
}

async fn add(
    relay: &SharedRelay,
    start_reader: &StartReader,
    caller: &Owner,
    cluster: Option<&Cluster>,
    request: NewSession<'_>,
) -> anyhow::Result<Reply> {
    let NewSession {
        backend,
        port,
        idle_timeout_secs,
        key,
    } = request;
    let backend: SocketAddr = parse_backend(backend)?;
    // Checked before anything is created; the key is never echoed back.
    let key = key.map(crate::mosh::MoshKey::parse).transpose()?;
    if idle_timeout_secs == Some(0) {
        bail!(
            "an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h"
        );
    }
    if let Err(refusal) = relay
        .lock()
        .expect("relay lock")
        .user_policy()
        .check_backend(caller, backend)
    {
        bail!("{refusal}");
    }
    // The route lookup runs a command: keep it outside the relay lock.
    let ip = backend.ip();
    let route = tokio::task::spawn_blocking(move || xdp::route_to(ip)).await??;
    if let Some(cluster) = cluster {
        let request = NewShared {
            backend,
            route,
            port,
            idle_timeout: idle_timeout_secs.map(Duration::from_secs),
            owner: caller.clone(),
            key,
        };
        let info = cluster.add(relay, start_reader, request).await?;
        users::audit_change(caller, "add", &info);
        return Ok(Reply::Session(info));
    }
    let (info, socket) = {
        let mut relay = relay.lock().expect("relay lock");
        let (mut info, socket) = relay.add_session_for(
            caller.clone(),
            backend,
            route,
            port,
            idle_timeout_secs.map(Duration::from_secs),
        )?;
        if let Some(key) = key {
            // A keyed session exists with its key or not at all.
            if let Err(error) = relay.set_session_key(info.port, key) {
                relay.remove_session(info.port, "its key could not be stored");
                return Err(error);
            }
            info = relay
                .session_info(info.port, crate::datapath::monotonic_ns())
                .context("the session just added")?;
        }
        // The token goes to the caller who made the session, and only here.
        info.tcp = relay.tcp_info_with_token(info.port).or(info.tcp);
        (info, socket)
    };
    start_reader(relay.clone(), socket);
    users::audit_change(caller, "add", &info);
    Ok(Reply::Session(info))
}

/// An `add_many` item checked as `add` checks it, before any lock is taken.
fn check_item(
    caller: &Owner,
    policy: &crate::users::UserPolicy,
    item: &forwarder_api::NewSession,
) -> anyhow::Result<(SocketAddr, Option<crate::mosh::MoshKey>)> {
    let backend = parse_backend(&item.backend)?;
    let key = item
        .key
        .as_deref()
        .map(crate::mosh::MoshKey::parse)
        .transpose()?;
    if item.idle_timeout_secs == Some(0) {
        bail!(
            "an idle timeout of 0 would expire the session at once: give a duration such as 7d or 12h"
        );
    }
    if let Err(refusal) = policy.check_backend(caller, backend) {
        bail!("{refusal}");
    }
    Ok((backend, key))
}

/// `add_many`: every item checked as `add` checks it, one route lookup per
/// backend address, then the whole batch under one hold of the relay lock
/// and in one store transaction (`Relay::add_sessions_for`). One result per
/// item, in order; a failed item is audited as a refused `add`.
async fn add_many(
    relay: &SharedRelay,
    start_reader: &StartReader,
    caller: &Owner,
    cluster: Option<&Cluster>,
    items: Vec<forwarder_api::NewSession>,
) -> Vec<AddResult> {
    use std::collections::HashMap;
    let refuse = |item: &forwarder_api::NewSession, error: &anyhow::Error| {
        let reason = format!("{error:#}");
        users::audit_refusal(caller, "add", &item.backend, &reason);
        AddResult::Error(reason)
    };
    // Through etcd each add is a cluster transaction of its own.
    if cluster.is_some() {
        let mut results = Vec::with_capacity(items.len());
        for item in &items {
            let request = NewSession {
                backend: &item.backend,
                port: item.port,
                idle_timeout_secs: item.idle_timeout_secs,
                key: item.key.as_deref(),
            };
            results.push(
                match add(relay, start_reader, caller, cluster, request).await {
                    Ok(Reply::Session(info)) => AddResult::Session(Box::new(info)),
                    Ok(other) => {
                        AddResult::Error(format!("unexpected outcome of an add: {other:?}"))
                    }
                    Err(error) => refuse(item, &error),
                },
            );
        }
        return results;
    }
    let checked: Vec<anyhow::Result<(SocketAddr, Option<crate::mosh::MoshKey>)>> = {
        let relay = relay.lock().expect("relay lock");
        let policy = relay.user_policy();
        items
            .iter()
            .map(|item| check_item(caller, policy, item))
            .collect()
    };
    // Route lookups are netlink round trips: one per address, off the runtime.
    let mut addresses: Vec<std::net::IpAddr> = checked
        .iter()
        .flatten()
        .map(|(backend, _)| backend.ip())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    let routes: HashMap<std::net::IpAddr, Result<xdp::BackendRoute, String>> =
        match tokio::task::spawn_blocking(move || {
            addresses
                .into_iter()
                .map(|ip| (ip, xdp::route_to(ip).map_err(|e| format!("{e:#}"))))
                .collect()
        })
        .await
        {
            Ok(routes) => routes,
            Err(error) => {
                let error = anyhow::anyhow!("looking up the routes to the backends: {error}");
                return items.iter().map(|item| refuse(item, &error)).collect();
            }
        };
    let mut results: Vec<Option<AddResult>> = Vec::with_capacity(items.len());
    let mut batch = Vec::new();
    let mut positions = Vec::new();
    for (index, (item, checked)) in items.iter().zip(checked).enumerate() {
        let prepared = checked.and_then(|(backend, key)| match &routes[&backend.ip()] {
            Ok(route) => Ok(BatchItem {
                backend,
                route: *route,
                port: item.port,
                idle_timeout: item.idle_timeout_secs.map(Duration::from_secs),
                key,
            }),
            Err(error) => Err(anyhow::anyhow!("{error}")),
        });
        match prepared {
            Ok(prepared) => {
                batch.push(prepared);
                positions.push(index);
                results.push(None);
            }
            Err(error) => results.push(Some(refuse(item, &error))),
        }
    }
    let added = relay
        .lock()
        .expect("relay lock")
        .add_sessions_for(caller, batch);
    for (index, outcome) in positions.into_iter().zip(added) {
        results[index] = Some(match outcome {
            Ok((info, socket)) => {
                start_reader(relay.clone(), socket);
                users::audit_change(caller, "add", &info);
                AddResult::Session(Box::new(info))
            }
            Err(error) => refuse(&items[index], &error),
        });
    }
    results
        .into_iter()
        .map(|result| result.expect("every item has its result"))
        .collect()
}
