//! Gateway mode (`forwarder run --gateway LAN`): hosts on the LAN ask the
//! router for port mappings with NAT-PMP (RFC 6886), PCP (RFC 6887) or UPnP
//! IGD, on the LAN side only. Each mapping is an ordinary relay session,
//! WAN address:port → LAN host:port, forwarded in XDP, stored, and removed
//! when its lease ends. One table of leases ([`Gateway`]) serves the three
//! protocols, so they share the permission rules, secure mode, lifetime
//! bounds and per-host quotas, and refusals are the same decisions spoken
//! in each protocol's own codes.
//!
//! The parts: `natpmp` and `pcp` (wire formats), `upnp` (SSDP, the device
//! description and SOAP), `rules` (miniupnpd's permission lines), `leases`
//! (the lease store), `service` (the sockets and the tasks' bodies that the
//! daemon starts), `client` (the LAN host's side, for `forwarder
//! mosh-server --gateway`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::control::server::StartReader;
use crate::datapath::xdp;
use crate::ports::PortRange;
use crate::sessions::SharedRelay;

pub mod client;
pub mod leases;
pub mod natpmp;
pub mod pcp;
pub mod rules;
pub mod service;
pub mod upnp;

use leases::{Lease, LeaseStore, Protocol};
use rules::{Rule, Verdict};

/// What `--gateway` and its companions configure.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The LAN interfaces served (each also one of `--iface`).
    pub interfaces: Vec<String>,
    /// Permission rules; empty: hosts of each LAN interface's subnet may map
    /// external ports within the session port range.
    pub rules: Vec<Rule>,
    /// A host may map only to itself.
    pub secure_mode: bool,
    pub min_lifetime: Duration,
    pub max_lifetime: Duration,
    pub max_mappings_per_host: usize,
    /// The UPnP IGD's HTTP port (description and SOAP) on each LAN address.
    pub upnp_http_port: u16,
}

/// A LAN interface the gateway answers on.
#[derive(Clone, Debug)]
pub struct LanInterface {
    pub name: String,
    pub ifindex: u32,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

/// A request for a mapping, whichever protocol carried it.
#[derive(Clone, Debug)]
pub struct Ask {
    pub protocol: Protocol,
    /// The request's source address.
    pub requester: Ipv4Addr,
    pub internal: SocketAddrV4,
    /// 0: any.
    pub suggested_external_port: u16,
    /// Seconds; 0 deletes (NAT-PMP, PCP). UPnP's 0 ("permanent") is turned
    /// into the longest lifetime allowed by its caller.
    pub lifetime: u32,
    pub nonce: Option<[u8; 12]>,
    pub description: String,
    /// Only the suggested port will do (UPnP; PCP's PREFER_FAILURE).
    pub exact_port: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub external_port: u16,
    /// Seconds; 0 for a deletion.
    pub lifetime: u32,
}

/// Why a request was refused; each protocol answers it in its own codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("secure mode: {requester} may map only to itself, not to {internal}")]
    SecureMode {
        requester: Ipv4Addr,
        internal: Ipv4Addr,
    },
    #[error("no permission rule allows it ({0})")]
    NotAllowed(String),
    #[error("{requester} holds its quota of {limit} mappings")]
    Quota { requester: Ipv4Addr, limit: usize },
    #[error("external port {0} is taken")]
    PortTaken(u16),
    #[error("the mapping belongs to another PCP client (the nonce differs)")]
    NonceMismatch,
    #[error("no such mapping")]
    NotFound,
    #[error("{0}")]
    NoResources(String),
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

pub struct Gateway {
    relay: SharedRelay,
    start_reader: StartReader,
    pub options: GatewayOptions,
    pub lan: Vec<LanInterface>,
    /// The address WAN hosts use: the first IPv4 address of the first
    /// relay interface that is not a gateway (LAN) interface.
    pub external_address: Ipv4Addr,
    session_ports: PortRange,
    /// The rules in force (the configured ones, or the default).
    pub rules: Vec<Rule>,
    epoch_start: u64,
    /// External port → lease.
    table: Mutex<BTreeMap<u16, Lease>>,
    store: LeaseStore,
    started: SystemTime,
}

impl Gateway {
    /// Reads the leases stored by an earlier run and keeps those whose
    /// session the relay restored; the others are forgotten (their session
    /// is gone) or ended (expired while the daemon was down).
    pub fn new(
        relay: SharedRelay,
        start_reader: StartReader,
        options: GatewayOptions,
        lan: Vec<LanInterface>,
        external_address: Ipv4Addr,
        session_ports: PortRange,
        store: LeaseStore,
    ) -> anyhow::Result<Self> {
        let now = unix_now();
        let epoch_start = store.epoch_start(now)?;
        let rules = if options.rules.is_empty() {
            lan.iter()
                .map(|lan| Rule::allow_subnet(session_ports, lan.address, lan.prefix_len))
                .collect()
        } else {
            options.rules.clone()
        };
        let mut table = BTreeMap::new();
        {
            let mut relay = relay.lock().expect("relay lock");
            for lease in store.leases()? {
                let live =
                    relay
                        .session_backend(lease.external_port)
                        .is_some_and(|(id, backend)| {
                            id == lease.session_id && backend == lease.internal.into()
                        });
                if !live {
                    info!(external_port = lease.external_port, internal = %lease.internal, "gateway lease forgotten: its session is gone");
                    let _ = store.delete(lease.external_port);
                } else if lease.expires_at <= now {
                    relay.remove_session(
                        lease.external_port,
                        "gateway mapping expired while the daemon was down",
                    );
                    let _ = store.delete(lease.external_port);
                } else {
                    table.insert(lease.external_port, lease);
                }
            }
        }
        info!(
            interfaces = ?options.interfaces,
            %external_address,
            secure_mode = options.secure_mode,
            rules = ?rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            mappings_restored = table.len(),
            epoch = now - epoch_start,
            "gateway mode: NAT-PMP and PCP on UDP 5351, UPnP IGD (SSDP 1900, HTTP {}) on the LAN side",
            options.upnp_http_port
        );
        Ok(Self {
            relay,
            start_reader,
            options,
            lan,
            external_address,
            session_ports,
            rules,
            epoch_start,
            table: Mutex::new(table),
            store,
            started: SystemTime::now(),
        })
    }

    /// Seconds since the epoch began (NAT-PMP's and PCP's "epoch time").
    pub fn epoch(&self) -> u32 {
        u32::try_from(unix_now().saturating_sub(self.epoch_start)).unwrap_or(u32::MAX)
    }

    pub fn uptime(&self) -> u64 {
        self.started.elapsed().map_or(0, |d| d.as_secs())
    }

    fn clamp_lifetime(&self, requested: u32) -> u32 {
        let min = u32::try_from(self.options.min_lifetime.as_secs()).unwrap_or(u32::MAX);
        let max = u32::try_from(self.options.max_lifetime.as_secs()).unwrap_or(u32::MAX);
        requested.clamp(min.min(max), max)
    }

    /// The longest lifetime allowed (UPnP's "permanent" becomes this).
    pub fn max_lifetime(&self) -> u32 {
        u32::try_from(self.options.max_lifetime.as_secs()).unwrap_or(u32::MAX)
    }

    fn allowed(&self, external_port: u16, internal: SocketAddrV4) -> bool {
        self.session_ports.contains(external_port)
            && rules::check(&self.rules, external_port, *internal.ip(), internal.port())
                == Verdict::Allow
    }

    /// Creates or renews a mapping (or deletes it: lifetime 0). Logs the
    /// outcome either way.
    pub async fn map(&self, ask: Ask) -> Result<Granted, Refusal> {
        let outcome = self.decide(&ask).await;
        match &outcome {
            Ok(granted) => info!(
                protocol = %ask.protocol,
                requester = %ask.requester,
                internal = %ask.internal,
                external = %SocketAddrV4::new(self.external_address, granted.external_port),
                lifetime = granted.lifetime,
                "gateway mapping granted"
            ),
            Err(refusal) => warn!(
                protocol = %ask.protocol,
                requester = %ask.requester,
                internal = %ask.internal,
                suggested_external_port = ask.suggested_external_port,
                "gateway mapping refused: {refusal}"
            ),
        }
        outcome
    }

    async fn decide(&self, ask: &Ask) -> Result<Granted, Refusal> {
        if self.options.secure_mode && *ask.internal.ip() != ask.requester {
            return Err(Refusal::SecureMode {
                requester: ask.requester,
                internal: *ask.internal.ip(),
            });
        }
        if ask.lifetime == 0 {
            return self.delete(ask);
        }
        let lifetime = self.clamp_lifetime(ask.lifetime);
        if let Some(granted) = self.renew(ask, lifetime)? {
            return Ok(granted);
        }
        // The route lookup runs a command: outside every lock.
        let ip = *ask.internal.ip();
        let route = tokio::task::spawn_blocking(move || xdp::route_to(ip.into()))
            .await
            .map_err(|error| Refusal::NoResources(error.to_string()))?
            .map_err(|error| Refusal::NoResources(format!("{error:#}")))?;
        let mut table = self.table.lock().expect("gateway lock");
        let held = table
            .values()
            .filter(|lease| lease.requester == ask.requester)
            .count();
        if held >= self.options.max_mappings_per_host {
            return Err(Refusal::Quota {
                requester: ask.requester,
                limit: self.options.max_mappings_per_host,
            });
        }
        let suggested = ask.suggested_external_port;
        let candidates: Vec<u16> = if ask.exact_port {
            if !self.allowed(suggested, ask.internal) {
                return Err(Refusal::NotAllowed(format!(
                    "external port {suggested} for {}; the relay maps ports {}",
                    ask.internal, self.session_ports
                )));
            }
            vec![suggested]
        } else {
            // The suggested port first, then the range upwards from it, so a
            // host asking for the same port again gets it when it is free.
            let range = self.session_ports;
            let start = if range.contains(suggested) {
                suggested
            } else {
                range.lo
            };
            (start..=range.hi)
                .chain(range.lo..start)
                .filter(|&port| self.allowed(port, ask.internal))
                .collect()
        };
        if candidates.is_empty() {
            return Err(Refusal::NotAllowed(format!(
                "no external port in {} for {}",
                self.session_ports, ask.internal
            )));
        }
        let idle_timeout = self.options.max_lifetime.saturating_mul(2);
        let mut relay = self.relay.lock().expect("relay lock");
        let mut last_error = None;
        // Ports held by sessions are skipped without a bind; a few that some
        // other program holds are tried before giving up.
        let mut bind_failures = 0;
        for port in candidates {
            if table.contains_key(&port) || relay.session_backend(port).is_some() {
                if ask.exact_port {
                    return Err(Refusal::PortTaken(port));
                }
                continue;
            }
            match relay.add_session(ask.internal.into(), route, Some(port), Some(idle_timeout)) {
                Ok((info, socket)) => {
                    (self.start_reader)(self.relay.clone(), socket);
                    let lease = Lease {
                        protocol: ask.protocol,
                        external_port: port,
                        internal: ask.internal,
                        requester: ask.requester,
                        session_id: info.id,
                        expires_at: unix_now() + u64::from(lifetime),
                        nonce: ask.nonce,
                        description: ask.description.clone(),
                    };
                    if let Err(error) = self.store.put(&lease) {
                        relay.remove_session(port, "the gateway could not store the mapping");
                        return Err(Refusal::NoResources(format!("{error:#}")));
                    }
                    table.insert(port, lease);
                    return Ok(Granted {
                        external_port: port,
                        lifetime,
                    });
                }
                Err(error) => {
                    let text = format!("{error:#}");
                    // Another session forwards there already (made with
                    // `forwarder add`), or the relay is full: no other
                    // port changes that.
                    if !text.contains("in use") || ask.exact_port {
                        return Err(if text.contains("in use") {
                            Refusal::PortTaken(port)
                        } else {
                            Refusal::NoResources(text)
                        });
                    }
                    last_error = Some(text);
                    bind_failures += 1;
                    if bind_failures >= 32 {
                        break;
                    }
                }
            }
        }
        Err(Refusal::NoResources(last_error.unwrap_or_else(|| {
            format!(
                "every allowed external port in {} is mapped",
                self.session_ports
            )
        })))
    }

    /// The host's existing mapping of the same internal endpoint, renewed.
    fn renew(&self, ask: &Ask, lifetime: u32) -> Result<Option<Granted>, Refusal> {
        let mut table = self.table.lock().expect("gateway lock");
        let Some(lease) = table
            .values_mut()
            .find(|lease| lease.internal == ask.internal)
        else {
            return Ok(None);
        };
        let port = lease.external_port;
        if !self.relay.lock().expect("relay lock").touch_session(port) {
            // Its session went away (`forwarder remove`) before the expiry
            // tick noticed: map afresh.
            table.remove(&port);
            let _ = self.store.delete(port);
            return Ok(None);
        }
        if let (Some(held), Some(asked)) = (lease.nonce, ask.nonce)
            && held != asked
        {
            return Err(Refusal::NonceMismatch);
        }
        if ask.exact_port && lease.external_port != ask.suggested_external_port {
            // UPnP: a second external port for the same internal endpoint
            // would be a second session to the same backend.
            return Err(Refusal::PortTaken(ask.suggested_external_port));
        }
        lease.expires_at = unix_now() + u64::from(lifetime);
        if ask.nonce.is_some() {
            lease.nonce = ask.nonce;
        }
        if !ask.description.is_empty() {
            lease.description.clone_from(&ask.description);
        }
        if let Err(error) = self.store.put(lease) {
            warn!(
                error = format!("{error:#}"),
                "storing a renewed gateway lease"
            );
        }
        Ok(Some(Granted {
            external_port: port,
            lifetime,
        }))
    }

    /// Deletes the mapping of `ask.internal`; NAT-PMP's internal port 0
    /// deletes every mapping of the host made through NAT-PMP.
    fn delete(&self, ask: &Ask) -> Result<Granted, Refusal> {
        let ports: Vec<u16> = {
            let table = self.table.lock().expect("gateway lock");
            let mine = |lease: &&Lease| {
                if ask.internal.port() == 0 {
                    lease.internal.ip() == ask.internal.ip() && lease.protocol == ask.protocol
                } else {
                    lease.internal == ask.internal
                }
            };
            let found: Vec<&Lease> = table.values().filter(mine).collect();
            if let Some(lease) = found.first()
                && let (Some(held), Some(asked)) = (lease.nonce, ask.nonce)
                && held != asked
            {
                return Err(Refusal::NonceMismatch);
            }
            found.iter().map(|lease| lease.external_port).collect()
        };
        for &port in &ports {
            self.end(port, "deleted by its host");
        }
        Ok(Granted {
            external_port: 0,
            lifetime: 0,
        })
    }

    /// UPnP's DeletePortMapping: by external port.
    pub fn delete_external(&self, requester: Ipv4Addr, external_port: u16) -> Result<(), Refusal> {
        let lease = self.lookup(external_port).ok_or(Refusal::NotFound)?;
        if self.options.secure_mode && *lease.internal.ip() != requester {
            let refusal = Refusal::SecureMode {
                requester,
                internal: *lease.internal.ip(),
            };
            warn!(protocol = %Protocol::Upnp, %requester, external_port, "gateway deletion refused: {refusal}");
            return Err(refusal);
        }
        self.end(external_port, "deleted by its host");
        Ok(())
    }

    pub fn lookup(&self, external_port: u16) -> Option<Lease> {
        self.table
            .lock()
            .expect("gateway lock")
            .get(&external_port)
            .cloned()
    }

    /// The `index`th mapping by external port (UPnP's GetGenericPortMappingEntry).
    pub fn nth(&self, index: usize) -> Option<Lease> {
        self.table
            .lock()
            .expect("gateway lock")
            .values()
            .nth(index)
            .cloned()
    }

    /// Removes a mapping and its session.
    fn end(&self, external_port: u16, why: &str) {
        let lease = self
            .table
            .lock()
            .expect("gateway lock")
            .remove(&external_port);
        let Some(lease) = lease else { return };
        if let Err(error) = self.store.delete(external_port) {
            warn!(
                error = format!("{error:#}"),
                "removing a gateway lease from the store"
            );
        }
        let mut relay = self.relay.lock().expect("relay lock");
        if relay
            .session_backend(external_port)
            .is_some_and(|(id, _)| id == lease.session_id)
        {
            relay.remove_session(external_port, why);
        }
        info!(protocol = %lease.protocol, internal = %lease.internal, external_port, reason = why, "gateway mapping ended");
    }

    /// Ends the mappings whose lifetime is over, and forgets those whose
    /// session went away otherwise (idle, or `forwarder remove`).
    pub fn expire(&self) {
        let now = unix_now();
        let (expired, gone): (Vec<u16>, Vec<u16>) = {
            let table = self.table.lock().expect("gateway lock");
            let relay = self.relay.lock().expect("relay lock");
            let expired = table
                .values()
                .filter(|lease| lease.expires_at <= now)
                .map(|lease| lease.external_port)
                .collect();
            let gone = table
                .values()
                .filter(|lease| {
                    relay
                        .session_backend(lease.external_port)
                        .is_none_or(|(id, _)| id != lease.session_id)
                })
                .map(|lease| lease.external_port)
                .collect();
            (expired, gone)
        };
        for port in expired {
            self.end(port, "its lifetime ended");
        }
        for port in gone {
            self.end(port, "its session was removed");
        }
    }

    /// Seconds left on a lease.
    pub fn remaining(lease: &Lease) -> u32 {
        u32::try_from(lease.expires_at.saturating_sub(unix_now())).unwrap_or(u32::MAX)
    }

    /// The LAN interface a request came in on, by index.
    pub fn lan_by_index(&self, ifindex: u32) -> Option<&LanInterface> {
        self.lan.iter().find(|lan| lan.ifindex == ifindex)
    }
}

/// The LAN interfaces' addresses and the external address, from the
/// interfaces' own configuration. Errors name what is missing.
pub fn interfaces(
    relay_interfaces: &[String],
    gateway_interfaces: &[String],
) -> anyhow::Result<(Vec<LanInterface>, Ipv4Addr)> {
    use anyhow::{Context, bail};
    let addresses: Vec<(String, Ipv4Addr, u8)> = nix::ifaddrs::getifaddrs()
        .context("listing the interfaces' addresses")?
        .filter_map(|a| {
            let address = a.address?.as_sockaddr_in()?.ip();
            let prefix_len = a
                .netmask
                .and_then(|mask| {
                    mask.as_sockaddr_in()
                        .map(|m| u32::from(m.ip()).leading_ones() as u8)
                })
                .unwrap_or(32);
            Some((a.interface_name, address, prefix_len))
        })
        .collect();
    let mut lan = Vec::new();
    for name in gateway_interfaces {
        if !relay_interfaces.contains(name) {
            bail!(
                "--gateway {name} is not one of the relay's interfaces: add --iface {name} too \
                 (the XDP program must see the LAN side to forward the mappings)"
            );
        }
        let Some((_, address, prefix_len)) = addresses.iter().find(|(n, ..)| n == name) else {
            bail!(
                "--gateway {name} has no IPv4 address: give the LAN interface one (`ip addr add ... dev {name}`)"
            );
        };
        let ifindex = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("--gateway {name}: no such interface"))?;
        lan.push(LanInterface {
            name: name.clone(),
            ifindex,
            address: *address,
            prefix_len: *prefix_len,
        });
    }
    let external = relay_interfaces
        .iter()
        .filter(|name| !gateway_interfaces.contains(name))
        .find_map(|name| {
            addresses
                .iter()
                .find(|(n, ..)| n == name)
                .map(|(_, address, _)| *address)
        })
        .context(
            "gateway mode needs a WAN side: pass the WAN interface with --iface too, \
             and give it an IPv4 address (mappings are made on its address)",
        )?;
    Ok((lan, external))
}

pub type SharedGateway = Arc<Gateway>;
