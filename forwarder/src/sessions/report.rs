//! The reports of the session table: what `forwarder stats` and the
//! metrics show, computed where the numbers live.

use std::collections::BTreeMap;

use forwarder_api::{CapacityInfo, DescriptorInfo, MapFill, PacketsBytes, StatsInfo};
use forwarder_common::config::map_names;
use forwarder_common::{REASON_COUNT, Reason};

use super::Relay;
use crate::datapath::fds;

/// Limits, map fill and the kernel memory a flow costs.
fn capacity(relay: &Relay) -> CapacityInfo {
    let maps: Vec<MapFill> = relay
        .datapath
        .map_usage()
        .into_iter()
        .map(|usage| MapFill {
            name: usage.name,
            entries: usage.entries,
            max_entries: usage.max_entries,
            memlock_bytes: usage.memlock_bytes,
        })
        .collect();
    // All six flow maps and the port slots: the IPv4 ones, and the IPv6
    // and translated ones (their bucket arrays, which follow --max-flows6,
    // and the entries they hold), so what --max-flows6 saves or costs shows
    // here too; the slots follow the port ranges.
    let flow_maps = [
        map_names::CLIENT_FLOWS,
        map_names::BACKEND_FLOWS,
        map_names::CLIENT_PORT_SLOTS,
        map_names::BACKEND_PORT_SLOTS,
        map_names::CLIENT_FLOWS6,
        map_names::BACKEND_FLOWS6,
        map_names::CLIENT_FLOWS_4TO6,
        map_names::BACKEND_FLOWS_4TO6,
    ];
    let per_flow_maps: u64 = maps
        .iter()
        .filter(|m| flow_maps.contains(&m.name.as_str()))
        .map(|m| m.memlock_bytes)
        .sum();
    let sizes = relay.datapath.sizes();
    CapacityInfo {
        max_sessions: relay.limits.max_sessions,
        max_flows: sizes.max_flows,
        max_flows6: sizes.max_flows6,
        max_flows_per_session: relay.limits.max_flows_per_session,
        // Divided by the IPv4 flows of capacity (--max-flows): the relay's
        // main room, which the IPv6 maps' fixed cost is spread over.
        kernel_bytes_per_flow: per_flow_maps / u64::from(sizes.max_flows.max(1)),
        maps,
    }
}

fn descriptors() -> DescriptorInfo {
    let usage = fds::usage();
    DescriptorInfo {
        open: usage.open,
        limit: usage.limit,
        reserve: usage.reserve,
        refused_flows: usage.refused_flows,
    }
}

impl Relay {
    /// Everything `forwarder stats` and the metrics report: XDP verdicts and
    /// reasons, the daemon's slow-path counters, capacity, descriptors and
    /// the data path's health warnings.
    pub fn stats(&self) -> StatsInfo {
        stats(self)
    }
}

fn stats(relay: &Relay) -> StatsInfo {
    let counters = relay.datapath.reason_counters();
    let mut verdicts: BTreeMap<String, u64> = ["pass", "drop", "tx", "redirect"]
        .into_iter()
        .map(|v| (v.to_string(), 0))
        .collect();
    let mut reasons = BTreeMap::new();
    for (reason, counter) in Reason::ALL
        .iter()
        .zip(&counters)
        .take(REASON_COUNT as usize)
    {
        *verdicts
            .entry(reason.verdict().name().to_string())
            .or_default() += counter.packets;
        reasons.insert(
            reason.name().to_string(),
            PacketsBytes {
                packets: counter.packets,
                bytes: counter.bytes,
            },
        );
    }
    StatsInfo {
        instance: relay.instance.clone(),
        datapath: relay.datapath.mode(),
        interfaces: relay.interfaces.clone(),
        sessions: relay.session_count(),
        flows: relay.flow_count(),
        verdicts,
        reasons,
        slow_path: relay.stats.clone(),
        capacity: capacity(relay),
        descriptors: descriptors(),
        warnings: crate::datapath::health::current(),
        cluster: relay.cluster.clone(),
        tcp: relay.tcp_stats(),
    }
}
