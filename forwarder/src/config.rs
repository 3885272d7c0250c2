//! The daemon's TOML config file (`forwarder run --config FILE`). Every key
//! matches a `run` flag; a flag given on the command line wins over the file.
//! Unknown keys are refused so a typo does not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    pub instance: Option<String>,
    pub interfaces: Option<Vec<String>>,
    /// "auto", "native" or "skb".
    pub xdp_mode: Option<String>,
    /// "auto", "xdp" or "userspace".
    pub datapath: Option<String>,
    /// "LO-HI"
    pub ports: Option<String>,
    pub flow_ports: Option<String>,
    /// Durations as humantime text: "120s", "7d".
    pub flow_idle_timeout: Option<String>,
    pub session_idle_timeout: Option<String>,
    pub max_sessions: Option<usize>,
    pub max_flows: Option<u32>,
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
    pub public_addr: Option<std::net::Ipv4Addr>,
    pub punch_keepalive: Option<String>,
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
}
