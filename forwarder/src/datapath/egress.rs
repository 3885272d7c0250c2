//! The interfaces the XDP program sends out of, numbered. A flow entry's
//! cached route names its egress interface by a one-byte slot instead of
//! holding the interface's ifindex, MAC and MTU (10 of the 48 bytes an
//! entry has), and a backend half names the interface its backend must
//! arrive on the same way. Three maps hold the numbering:
//!
//! - `EGRESS` (devmap, slot → ifindex): where `bpf_redirect_map` sends;
//! - `EGRESS_IFACES` (array, slot → ifindex, MAC, MTU): what a cached route
//!   sends with, and what a backend's arrival is checked against;
//! - `EGRESS_SLOTS` (hash, ifindex → slot): asked after a route lookup.
//!
//! A slot keeps its interface across restarts (the pinned table says which
//! it had), and a new interface gets a slot the previous table left empty,
//! never one this start vacates: a route cached before the restart may
//! still name a vacated slot for up to a second, and it must find it empty
//! (and look the route up again), not another interface there.
//!
//! The MAC and MTU are refreshed every [`REFRESH_PERIOD`]. The XDP program
//! caches a route only when its lookup agreed with the slot, so until the
//! refresh a changed interface costs a lookup per packet, not a wrong frame.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{Array, DevMap, HashMap, MapData};
use forwarder_common::flow::{EgressIface, IFACE_ANY, IFACE_NONE, IFACE_SLOTS};
use tracing::{info, warn};

use super::netlink;

/// How often the slots' MAC and MTU are compared with the interfaces'.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(2);

/// The first and last slot an interface may have (0 and 255 mean "any" and
/// "none" in an entry).
const FIRST_SLOT: u8 = 1;
const LAST_SLOT: u8 = IFACE_NONE - 1;
const _: () = assert!(IFACE_SLOTS == 256 && IFACE_ANY == 0);

/// Slots for the interfaces `wanted` (ifindexes): each keeps the slot the
/// adopted table (`adopted`: slot → ifindex) gave it, and a new one gets the
/// lowest slot that table left empty. 254 slots and at most
/// [`forwarder_common::config::MAX_INTERFACES`] (64) interfaces a table, so
/// there is always one.
pub fn assign_slots(wanted: &[u32], adopted: &BTreeMap<u8, u32>) -> BTreeMap<u32, u8> {
    let mut slots: BTreeMap<u32, u8> = adopted
        .iter()
        .filter(|(_, ifindex)| wanted.contains(ifindex))
        .map(|(&slot, &ifindex)| (ifindex, slot))
        .collect();
    let used: BTreeSet<u8> = adopted.keys().copied().collect();
    let mut free = (FIRST_SLOT..=LAST_SLOT).filter(|slot| !used.contains(slot));
    for &ifindex in wanted {
        slots.entry(ifindex).or_insert_with(|| {
            free.next()
                .expect("254 slots hold two tables of at most 64 interfaces")
        });
    }
    slots
}

/// The slot an entry names for `ifindex`: [`IFACE_ANY`] for 0 (no
/// interface known), the interface's slot, or [`IFACE_NONE`] for one the
/// program is not attached to.
pub fn slot_for(slots: &BTreeMap<u32, u8>, ifindex: u32) -> u8 {
    if ifindex == 0 {
        return IFACE_ANY;
    }
    slots.get(&ifindex).copied().unwrap_or(IFACE_NONE)
}

/// What the program needs of `ifindex` now, from the link table.
fn describe(links: &[netlink::Link], ifindex: u32) -> anyhow::Result<EgressIface> {
    let link = links
        .iter()
        .find(|link| link.index == ifindex)
        .with_context(|| format!("interface {ifindex} vanished while the daemon started"))?;
    Ok(EgressIface {
        ifindex,
        // Larger MTUs than 65535 do not exist for IP: the IP length is 16 bits.
        mtu: u16::try_from(link.mtu).unwrap_or(u16::MAX),
        mac: link.mac.unwrap_or_default(),
    })
}

/// The numbering as written, and the array to refresh it in. It holds all
/// three maps: they may be taken from the object before its program is
/// loaded, which needs their descriptors open.
pub struct EgressTable {
    _devmap: DevMap<MapData>,
    _by_ifindex: HashMap<MapData, u32, u8>,
    ifaces: Array<MapData, EgressIface>,
    slots: BTreeMap<u32, u8>,
    written: BTreeMap<u8, EgressIface>,
}

impl EgressTable {
    /// Numbers `interfaces` (ifindexes) in the three maps, adopting the
    /// pinned numbering: kept slots are rewritten in place, vacated ones
    /// emptied, and only then is anything else changed.
    pub fn write(
        mut devmap: DevMap<MapData>,
        mut ifaces: Array<MapData, EgressIface>,
        mut by_ifindex: HashMap<MapData, u32, u8>,
        interfaces: &[u32],
    ) -> anyhow::Result<Self> {
        let mut adopted = BTreeMap::new();
        for slot in FIRST_SLOT..=LAST_SLOT {
            let iface = ifaces
                .get(&u32::from(slot), 0)
                .context("reading the interface slots")?;
            if iface.ifindex != 0 {
                adopted.insert(slot, iface.ifindex);
            }
        }
        let slots = assign_slots(interfaces, &adopted);
        let links = netlink::links().context("listing the interfaces (rtnetlink)")?;
        let mut written = BTreeMap::new();
        for (&ifindex, &slot) in &slots {
            let iface = describe(&links, ifindex)?;
            devmap
                .set(u32::from(slot), ifindex, None, 0)
                .with_context(|| format!("adding interface {ifindex} to the redirect map"))?;
            ifaces
                .set(u32::from(slot), iface, 0)
                .context("writing an interface slot")?;
            by_ifindex
                .insert(ifindex, slot, 0)
                .context("writing an interface's slot number")?;
            written.insert(slot, iface);
        }
        // The devmap keeps a vacated slot's device: no route reaches it,
        // since EGRESS_SLOTS no longer names the slot and a cached route
        // finds it empty below. A later interface there overwrites it.
        for (&slot, &ifindex) in adopted
            .iter()
            .filter(|(slot, _)| !written.contains_key(slot))
        {
            ifaces
                .set(u32::from(slot), EgressIface::default(), 0)
                .context("emptying a vacated interface slot")?;
            if !slots.contains_key(&ifindex) {
                let _ = by_ifindex.remove(&ifindex);
            }
        }
        info!(slots = ?slots, "interfaces numbered for the route cache");
        Ok(Self {
            _devmap: devmap,
            _by_ifindex: by_ifindex,
            ifaces,
            slots,
            written,
        })
    }

    /// Every attached interface's slot (ifindex → slot).
    pub fn slots(&self) -> &BTreeMap<u32, u8> {
        &self.slots
    }

    /// Rewrites the slots whose interface's MAC or MTU changed since they
    /// were written.
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        let links = netlink::links().context("listing the interfaces (rtnetlink)")?;
        for (&slot, written) in self.written.iter_mut() {
            let Ok(now) = describe(&links, written.ifindex) else {
                // Gone: the devmap dropped it, and lookups no longer route there.
                continue;
            };
            if now != *written {
                info!(
                    ifindex = now.ifindex,
                    mtu = now.mtu,
                    "interface MAC or MTU changed: slot rewritten"
                );
                self.ifaces
                    .set(u32::from(slot), now, 0)
                    .context("rewriting an interface slot")?;
                *written = now;
            }
        }
        Ok(())
    }
}

/// Keeps the slots' MAC and MTU current for as long as the daemon runs.
pub async fn watch(mut table: EgressTable) {
    let mut tick = tokio::time::interval(REFRESH_PERIOD);
    loop {
        tick.tick().await;
        table = match tokio::task::spawn_blocking(move || {
            if let Err(error) = table.refresh() {
                warn!(error = %format!("{error:#}"), "refreshing the interface slots");
            }
            table
        })
        .await
        {
            Ok(table) => table,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_stays_with_its_interface_and_a_vacated_one_waits_a_start() {
        let first = assign_slots(&[7, 9], &BTreeMap::new());
        assert_eq!(first, BTreeMap::from([(7, 1), (9, 2)]));
        // Restart: 7 leaves, 12 arrives. 9 keeps 2; 12 may not take 7's 1.
        let adopted = first.iter().map(|(&i, &s)| (s, i)).collect();
        let second = assign_slots(&[9, 12], &adopted);
        assert_eq!(second, BTreeMap::from([(9, 2), (12, 3)]));
        // The next start may: slot 1 was empty in the table it adopts.
        let adopted = second.iter().map(|(&i, &s)| (s, i)).collect();
        assert_eq!(
            assign_slots(&[9, 12, 15], &adopted),
            BTreeMap::from([(9, 2), (12, 3), (15, 1)])
        );
    }

    #[test]
    fn a_full_table_replaced_by_another_still_finds_slots() {
        let old: Vec<u32> = (100..164).collect();
        let adopted = assign_slots(&old, &BTreeMap::new())
            .iter()
            .map(|(&i, &s)| (s, i))
            .collect();
        let new: Vec<u32> = (200..264).collect();
        let slots = assign_slots(&new, &adopted);
        assert_eq!(slots.len(), 64);
        assert!(slots.values().all(|&s| (65..=128).contains(&s)));
    }

    #[test]
    fn entries_name_any_for_no_interface_and_none_for_an_unattached_one() {
        let slots = BTreeMap::from([(7, 1)]);
        assert_eq!(slot_for(&slots, 0), IFACE_ANY);
        assert_eq!(slot_for(&slots, 7), 1);
        assert_eq!(slot_for(&slots, 8), IFACE_NONE);
    }
}
