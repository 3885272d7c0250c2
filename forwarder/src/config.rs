//! The daemon's TOML config file (`forwarder run --config FILE`). Every key
//! matches a `run` flag; a flag given on the command line wins over the file.
//! Unknown keys are refused so a typo does not silently fall back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::datapath::DatapathChoice;
use crate::datapath::xdp::ModeChoice;
use crate::ports::PortRange;
use crate::users::{BackendRule, GroupRules, QuotaOverride};

/// Every default of `forwarder run`, defined once: the flags fall back to
/// these, `--help` shows them (a test checks each help line), and the
/// example config shows the same values (a test checks the file).
pub mod defaults {
    use std::time::Duration;

    use crate::datapath::DatapathChoice;
    use crate::datapath::xdp::ModeChoice;
    use crate::ports::PortRange;

    pub const INSTANCE: &str = "default";
    pub const XDP_MODE: ModeChoice = ModeChoice::Auto;
    pub const DATAPATH: DatapathChoice = DatapathChoice::Auto;
    pub const PORTS: PortRange = PortRange {
        lo: 60000,
        hi: 60999,
    };
    pub const FLOW_PORTS: PortRange = PortRange {
        lo: 61000,
        hi: 61999,
    };
    pub const FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    /// Long enough for a laptop to sleep overnight.
    pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const MAX_FLOWS_PER_SESSION: usize = 32;
    pub const NEW_FLOWS_PER_SEC: u32 = 4;
    /// Unanswered flows a session may hold (see `sessions::DEFAULT_PROBATION_FLOWS`).
    pub const PROBATION_FLOWS_PER_SESSION: usize = 16;
    pub const MAX_SESSIONS: usize = forwarder_common::config::DEFAULT_MAX_SESSIONS as usize;
    pub const MAX_FLOWS: u32 = forwarder_common::MAX_FLOWS;
    /// `--max-flows6` unless given, from `--max-flows`: see
    /// [`forwarder_common::config::DEFAULT_MAX_FLOWS6_CAP`] for why it is capped.
    pub const fn max_flows6(max_flows: u32) -> u32 {
        forwarder_common::config::default_max_flows6(max_flows)
    }
    pub const SLOWPATH_PPS_PER_SESSION: u32 = 1000;
    pub const SLOWPATH_PPS: u32 = 20_000;
    pub const PUNCH_KEEPALIVE: Duration = Duration::from_secs(15);
    /// Members of this group may use the control socket (the package creates it).
    pub const SOCKET_GROUP: &str = "forwarder";
    /// Quotas of every non-root user without an override (0: unlimited).
    pub const USER_MAX_SESSIONS: u32 = 8;
    pub const USER_MAX_FLOWS: u32 = 32;
    pub const USER_NEW_FLOWS_PER_SEC: u32 = 4;
    /// `--tcp-port`: streams open at once, and per session.
    pub const TCP_MAX_STREAMS: usize = 1024;
    pub const TCP_STREAMS_PER_SESSION: usize = 4;
    /// A stream's hello must arrive within this (no flag).
    pub const TCP_HELLO_DEADLINE: Duration = Duration::from_secs(5);
    /// A stream without a frame from its client this long is closed (no
    /// flag): mosh sends at least every 3 s while it runs.
    pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const USER_QUOTA: crate::users::Quota = crate::users::Quota {
        max_sessions: USER_MAX_SESSIONS,
        max_flows: USER_MAX_FLOWS,
        new_flows_per_sec: USER_NEW_FLOWS_PER_SEC,
    };
    /// Gateway mode: lifetime bounds of a mapping (miniupnpd's defaults),
    /// mappings per LAN host, the IGD's HTTP port.
    pub const GATEWAY_MIN_LIFETIME: Duration = Duration::from_secs(120);
    pub const GATEWAY_MAX_LIFETIME: Duration = Duration::from_secs(86400);
    pub const GATEWAY_MAX_MAPPINGS_PER_HOST: usize = 16;
    pub const GATEWAY_UPNP_PORT: u16 = 5000;
    pub const GATEWAY_SECURE_MODE: bool = true;
    /// Where a cluster's keys live in etcd (`--etcd-prefix`).
    pub const ETCD_PREFIX: &str = "/forwarder/";
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    pub instance: Option<String>,
    pub interfaces: Option<Vec<String>>,
    /// "auto", "native" or "skb".
    pub xdp_mode: Option<ModeChoice>,
    /// "auto", "xdp" or "userspace".
    pub datapath: Option<DatapathChoice>,
    /// "LO-HI"
    pub ports: Option<PortRange>,
    pub flow_ports: Option<PortRange>,
    /// Durations as humantime text: "120s", "7d".
    #[serde(default, with = "humantime_serde")]
    pub flow_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub session_idle_timeout: Option<Duration>,
    pub max_sessions: Option<usize>,
    pub max_flows: Option<u32>,
    /// Capacity of each IPv6 and translated flow map (default: the smaller
    /// of max_flows and 65536).
    pub max_flows6: Option<u32>,
    pub max_flows_per_session: Option<usize>,
    /// The daemon's open-file limit (default: as high as the kernel allows).
    pub max_open_files: Option<u64>,
    pub new_flows_per_sec: Option<u32>,
    pub probation_flows_per_session: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// Slow-path rate limits (packets per second, 0: unlimited).
    pub slowpath_pps_per_session: Option<u32>,
    pub slowpath_pps: Option<u32>,
    /// The punch handshake for servers behind NAT (both keys, or neither).
    pub punch_port: Option<u16>,
    pub punch_secret_file: Option<PathBuf>,
    pub public_addr: Option<std::net::IpAddr>,
    #[serde(default, with = "humantime_serde")]
    pub punch_keepalive: Option<Duration>,
    /// The one UDP port every keyed session is reachable on as well (none unless set).
    pub shared_port: Option<u16>,
    /// Self-service: the control socket's group, the backend policy for
    /// non-root callers (CIDR[:PORTS] rules) and their default quotas.
    pub socket_group: Option<String>,
    pub user_allow: Option<Vec<BackendRule>>,
    pub user_deny: Option<Vec<BackendRule>>,
    pub user_max_sessions: Option<u32>,
    pub user_max_flows: Option<u32>,
    pub user_new_flows_per_sec: Option<u32>,
    /// `[user.NAME]`: quota overrides for one user (no flag).
    pub user: Option<BTreeMap<String, QuotaOverride>>,
    /// `[group.NAME]`: quota overrides and extra backend rules for a group's members (no flag).
    pub group: Option<BTreeMap<String, GroupRules>>,
    /// Gateway mode: the LAN interfaces to serve NAT-PMP, PCP and UPnP IGD on.
    pub gateway: Option<Vec<String>>,
    /// miniupnpd-style permission lines, first match decides:
    /// "allow|deny EXTERNAL_PORTS HOST/MASK INTERNAL_PORTS".
    pub gateway_rules: Option<Vec<String>>,
    pub gateway_secure_mode: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub gateway_min_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gateway_max_lifetime: Option<Duration>,
    pub gateway_max_mappings_per_host: Option<usize>,
    pub gateway_upnp_port: Option<u16>,
    /// Share sessions with other relays through etcd: its client URLs.
    pub etcd: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    /// The secret keyed sessions' keys are sealed under in etcd.
    pub etcd_secret_file: Option<PathBuf>,
    /// This relay's name in the cluster (default: HOSTNAME-INSTANCE).
    pub relay_name: Option<String>,
    /// The TCP port for mosh over TCP (none unless set), and its stream limits.
    pub tcp_port: Option<u16>,
    pub tcp_max_streams: Option<usize>,
    pub tcp_streams_per_session: Option<usize>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|error| {
            anyhow::anyhow!("{error}(see /etc/forwarder/forwarder.toml, as installed, for every key and its format)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_packaged_example() {
        let text = include_str!("../../packaging/forwarder.toml");
        let config = FileConfig::parse(text).unwrap();
        // Shipped without interfaces: a fresh install must not attach to a guessed one.
        assert!(config.interfaces.is_none());
        assert!(config.ports.is_some());
        // Off unless the operator opens it.
        assert!(config.shared_port.is_none());
        assert_eq!(
            FileConfig::parse("shared_port = 443").unwrap().shared_port,
            Some(443)
        );
        assert!(config.tcp_port.is_none());
        assert_eq!(
            FileConfig::parse("tcp_port = 443").unwrap().tcp_port,
            Some(443)
        );
        // Left out, so it follows max_flows unless the operator sets it.
        assert!(config.max_flows6.is_none());
        assert_eq!(
            FileConfig::parse("max_flows6 = 1").unwrap().max_flows6,
            Some(1)
        );
    }

    #[test]
    fn refuses_unknown_keys_and_wrong_types() {
        assert!(
            FileConfig::parse("max_flow = 3")
                .unwrap_err()
                .to_string()
                .contains("max_flow")
        );
        assert!(FileConfig::parse("max_flows = \"many\"").is_err());
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
    }

    #[test]
    fn user_and_group_tables_parse_and_refuse_typos() {
        let config = FileConfig::parse(
            "user_allow = [\"10.0.0.0/8:60000-61000\"]\n\
             [user.alice]\nmax_sessions = 2\n\
             [group.ops]\nmax_flows = 64\nuser_allow = [\"172.16.0.0/12:22,60000-60100\"]\n",
        )
        .unwrap();
        assert_eq!(config.user_allow.unwrap().len(), 1);
        assert_eq!(config.user.unwrap()["alice"].max_sessions, Some(2));
        let ops = &config.group.unwrap()["ops"];
        assert_eq!(ops.max_flows, Some(64));
        assert_eq!(
            ops.user_allow[0].to_string(),
            "172.16.0.0/12:22,60000-60100"
        );
        for (text, says) in [
            ("[user.alice]\nmax_session = 2", "max_session"),
            ("user_allow = [\"10.0.0.0/8:x\"]", "not a port"),
            (
                "[group.ops]\nuser_deny = [\"host\"]",
                "not an IPv4 or IPv6 address",
            ),
        ] {
            let error = format!("{:#}", FileConfig::parse(text).unwrap_err());
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
