//! forwarder: an XDP-accelerated UDP relay for mosh. The library holds the
//! daemon, the session table and the data path; `main.rs` is a thin CLI.
//!
//! The rooms, top to bottom; each uses only rooms below it (`cargo xtask
//! modules` prints the graph and fails on a cycle):
//!
//! ```text
//! cli                  the verbs: parse flags and config, call the rooms below
//! daemon               `forwarder run` and `detach`: wiring, and the one place that
//!                      starts the long-lived tasks (control server, metrics, socket
//!                      readers, punch service, expiry, health checks)
//! control              the control socket: `server` (requests against the session
//!                      table), `client` (what the verbs send); messages: forwarder-api
//! metrics              Prometheus exposition of the session table's report
//! tcpbridge            `run --tcp-port`: mosh over TCP, each stream one more flow of its session
//! punch                the punch handshake: `wire` (format, authority), `relay` (the
//!                      relay's service), `server` (`forwarder mosh-server`)
//! gateway              gateway mode: NAT-PMP, PCP and UPnP IGD on the LAN side, each
//!                      mapping a session with a lease (`natpmp` `pcp` `upnp` `rules`
//!                      `leases` `service`, and `client` for `mosh-server --gateway`)
//! cluster              several relays sharing one set of sessions through etcd
//!                      (`run --etcd`): definitions, port transactions, the sync task
//! slowpath             the daemon's share of forwarding: the socket readers
//! sessions             the session and flow table (and its NAT half, restore and
//!                      reports), kept consistent with the maps and the sockets
//! datapath             XDP (load, pins, maps, health) and the relay's UDP sockets
//! connect              `forwarder mosh` on the laptop: ssh, mosh-server, the bastion's
//!                      `forwarder add`, mosh-client, the local TCP bridge; uses no other
//!                      room but the tcpwire leaf (no BPF, no daemon)
//! store config mosh    leaves: the session store, the config file, mosh's
//! ports limits expiry  datagram rules, port pools, token buckets, timeouts,
//! users                and self-service (owners, backend policy, quotas, audit);
//! tcpwire              mosh over TCP's hello, framing and tokens
//! ```
//!
//! Below all of them: `forwarder-api` (control messages and JSON views) and
//! `forwarder-common` (the kernel/user contract).

pub mod cli;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod expiry;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod mosh;
pub mod ports;
pub mod punch;
pub mod sessions;
pub mod slowpath;
pub mod store;
pub mod tcpbridge;
pub mod tcpwire;
pub mod users;
