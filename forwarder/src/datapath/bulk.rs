//! Whole flow maps read in one walk each (`BPF_MAP_LOOKUP_BATCH`), for the
//! expiry tick: a lookup per flow under the relay lock was most of an idle
//! daemon's CPU with many flows. aya 0.14 has no batch call, so it goes
//! through the `bpf` syscall with aya-obj's kernel bindings for the layout.

use std::hash::Hash;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd};
use bytemuck::Pod;
use forwarder_common::{BackendKey, BackendKey6, ClientKey, ClientKey6, Rewrite, Rewrite6};

use super::flows::{BackendHalf, ClientHalf, FlowEntries};

/// The keys are ones the daemon installed itself, so hash flooding is no
/// concern here, and foldhash is several times faster than std's SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Entries asked for per call: large enough that a call per map is the
/// rule, and that no hash bucket ever holds more (the kernel answers
/// ENOSPC then, and the buffer grows).
const CHUNK: usize = 4096;

/// Every entry of one hash map, in as few syscalls as the kernel allows.
/// Entries added or removed while it walks may or may not be seen, as with
/// any walk of a live hash map.
pub fn lookup_all<K: Pod, V: Pod>(map: &OwnedFd) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys = vec![K::zeroed(); chunk];
    let mut values = vec![V::zeroed(); chunk];
    // The hash map's batch token is a bucket index (u32); 0 before the first call.
    let mut in_batch = 0u32;
    let mut out_batch = 0u32;
    let mut first = true;
    loop {
        // SAFETY: all-zero is a valid bpf_attr (a plain C union of integers).
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // Plain integers into the `batch` member; the buffers live until the
        // syscall returns, each `chunk` elements of the map's key and value size.
        attr.batch.in_batch = if first {
            0
        } else {
            std::ptr::from_mut(&mut in_batch) as u64
        };
        attr.batch.out_batch = std::ptr::from_mut(&mut out_batch) as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk as u32;
        attr.batch.map_fd = map.as_raw_fd() as u32;
        // SAFETY: the bpf syscall with a fully initialised attribute of the
        // size we pass; the kernel writes only into the buffers named above.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<bpf_attr>() as libc::c_uint,
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        if let Some(error) = &error
            && error.raw_os_error() == Some(libc::ENOSPC)
        {
            // One bucket holds more than `chunk` entries: retry it with room.
            chunk *= 2;
            keys.resize(chunk, K::zeroed());
            values.resize(chunk, V::zeroed());
            continue;
        }
        if let Some(error) = &error
            && error.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(io::Error::new(error.kind(), error.to_string()));
        }
        // SAFETY: reading back the integer the kernel wrote.
        let got = unsafe { attr.batch.count } as usize;
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        // ENOENT: the walk reached the end (with the last entries, if any).
        if error.is_some() {
            return Ok(out);
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Descriptors of the six flow maps of its own, so the tick reads them
/// without holding the relay (and its datapath) locked.
pub struct FlowMapsReader {
    pub(super) client: OwnedFd,
    pub(super) backend: OwnedFd,
    pub(super) client6: OwnedFd,
    pub(super) backend6: OwnedFd,
    pub(super) client_4to6: OwnedFd,
    pub(super) backend_4to6: OwnedFd,
    /// Which maps some flow has a half in; the others are not walked (a
    /// walk visits every bucket, and an IPv4-only relay has four empty maps).
    pub(super) used: MapsUsed,
}

/// Which of the six flow maps the relay's flows have halves in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapsUsed {
    pub client: bool,
    pub backend: bool,
    pub client6: bool,
    pub backend6: bool,
    pub client_4to6: bool,
    pub backend_4to6: bool,
}

impl MapsUsed {
    /// Marks the maps `entries` has its halves in.
    pub fn add(&mut self, entries: &FlowEntries) {
        match &entries.client {
            ClientHalf::V4(..) => self.client = true,
            ClientHalf::V4To6(..) => self.client_4to6 = true,
            ClientHalf::V6(..) => self.client6 = true,
        }
        match &entries.backend {
            BackendHalf::V4(..) => self.backend = true,
            BackendHalf::V4To6(..) => self.backend_4to6 = true,
            BackendHalf::V6(..) => self.backend6 = true,
        }
    }
}

fn seen<K: Pod + Hash + Eq, V: Pod>(
    used: bool,
    map: &OwnedFd,
    last_seen: impl Fn(&V) -> u64,
) -> io::Result<HashMap<K, u64>> {
    if !used {
        return Ok(HashMap::default());
    }
    Ok(lookup_all::<K, V>(map)?
        .into_iter()
        .map(|(key, value)| (key, last_seen(&value)))
        .collect())
}

impl FlowMapsReader {
    /// Every half's last-seen time, one walk per map. `taken_ns` must be
    /// read before the walk starts: flows created from then on are not
    /// judged by it (see [`LastSeenSnapshot::last_seen`]).
    pub fn snapshot(&self, taken_ns: u64) -> io::Result<LastSeenSnapshot> {
        let used = self.used;
        Ok(LastSeenSnapshot {
            taken_ns,
            client: seen::<ClientKey, Rewrite>(used.client, &self.client, |r| r.last_seen_ns)?,
            backend: seen::<BackendKey, Rewrite>(used.backend, &self.backend, |r| r.last_seen_ns)?,
            client6: seen::<ClientKey6, Rewrite6>(used.client6, &self.client6, |r| r.last_seen_ns)?,
            backend6: seen::<BackendKey6, Rewrite6>(used.backend6, &self.backend6, |r| {
                r.last_seen_ns
            })?,
            client_4to6: seen::<ClientKey, Rewrite6>(used.client_4to6, &self.client_4to6, |r| {
                r.last_seen_ns
            })?,
            backend_4to6: seen::<BackendKey, Rewrite6>(
                used.backend_4to6,
                &self.backend_4to6,
                |r| r.last_seen_ns,
            )?,
        })
    }
}

/// The flow maps' last-seen times at one moment.
#[derive(Debug, Default)]
pub struct LastSeenSnapshot {
    taken_ns: u64,
    client: HashMap<ClientKey, u64>,
    backend: HashMap<BackendKey, u64>,
    client6: HashMap<ClientKey6, u64>,
    backend6: HashMap<BackendKey6, u64>,
    client_4to6: HashMap<ClientKey, u64>,
    backend_4to6: HashMap<BackendKey, u64>,
}

impl LastSeenSnapshot {
    /// When the walk started (CLOCK_MONOTONIC ns).
    pub fn taken_ns(&self) -> u64 {
        self.taken_ns
    }

    /// Halves it holds (client and backend, every map).
    pub fn entries(&self) -> usize {
        self.client.len()
            + self.backend.len()
            + self.client6.len()
            + self.backend6.len()
            + self.client_4to6.len()
            + self.backend_4to6.len()
    }

    /// (client half, backend half) last-seen times of a flow created at
    /// `created_ns`, or None when the snapshot cannot speak for it: a flow
    /// created after the walk began may reuse the keys of a flow removed
    /// meanwhile, whose times are not its own. A half the walk did not find
    /// reads 0, as a lookup of it would have.
    pub fn last_seen(&self, entries: &FlowEntries, created_ns: u64) -> Option<(u64, u64)> {
        if created_ns >= self.taken_ns {
            return None;
        }
        let client = match &entries.client {
            ClientHalf::V4(key, _) => self.client.get(key),
            ClientHalf::V4To6(key, _) => self.client_4to6.get(key),
            ClientHalf::V6(key, _) => self.client6.get(key),
        };
        let backend = match &entries.backend {
            BackendHalf::V4(key, _) => self.backend.get(key),
            BackendHalf::V4To6(key, _) => self.backend_4to6.get(key),
            BackendHalf::V6(key, _) => self.backend6.get(key),
        };
        Some((client.copied().unwrap_or(0), backend.copied().unwrap_or(0)))
    }
}

#[cfg(test)]
impl LastSeenSnapshot {
    /// A snapshot taken at `taken_ns` holding `flow`'s halves with these times.
    pub(crate) fn for_test(taken_ns: u64, flow: &FlowEntries, seen: (u64, u64)) -> Self {
        let mut snapshot = Self {
            taken_ns,
            ..Self::default()
        };
        match &flow.client {
            ClientHalf::V4(key, _) => snapshot.client.insert(*key, seen.0),
            ClientHalf::V4To6(key, _) => snapshot.client_4to6.insert(*key, seen.0),
            ClientHalf::V6(key, _) => snapshot.client6.insert(*key, seen.0),
        };
        match &flow.backend {
            BackendHalf::V4(key, _) => snapshot.backend.insert(*key, seen.1),
            BackendHalf::V4To6(key, _) => snapshot.backend_4to6.insert(*key, seen.1),
            BackendHalf::V6(key, _) => snapshot.backend6.insert(*key, seen.1),
        };
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::flows::FlowAddrs;

    fn entries(client: &str, facing: &str, upstream: &str, backend: &str) -> FlowEntries {
        FlowEntries::new(&FlowAddrs {
            client: client.parse().unwrap(),
            facing: facing.parse().unwrap(),
            upstream: upstream.parse().unwrap(),
            backend: backend.parse().unwrap(),
            backend_ifindex: 0,
        })
    }

    #[test]
    fn answers_for_flows_older_than_the_walk_in_every_family() {
        let flows = [
            entries(
                "198.51.100.7:41000",
                "203.0.113.1:60000",
                "10.0.2.1:61000",
                "10.0.2.2:60001",
            ),
            entries(
                "[2001:db8::7]:41000",
                "[2001:db8::1]:60000",
                "[fd00::1]:61000",
                "[fd00::2]:60001",
            ),
            entries(
                "198.51.100.7:41000",
                "203.0.113.1:60000",
                "[fd00::1]:61000",
                "[fd00::2]:60001",
            ),
        ];
        for flow in &flows {
            let snapshot = LastSeenSnapshot::for_test(100, flow, (40, 50));
            assert_eq!(snapshot.last_seen(flow, 99), Some((40, 50)));
            assert_eq!(snapshot.entries(), 2);
        }
        // Another flow's halves are not this one's: absent reads 0, as a lookup would.
        let snapshot = LastSeenSnapshot::for_test(100, &flows[0], (40, 50));
        assert_eq!(snapshot.last_seen(&flows[1], 99), Some((0, 0)));
    }

    #[test]
    fn flows_created_during_the_walk_are_read_live() {
        let flow = entries(
            "198.51.100.7:41000",
            "203.0.113.1:60000",
            "10.0.2.1:61000",
            "10.0.2.2:60001",
        );
        let snapshot = LastSeenSnapshot::for_test(100, &flow, (40, 50));
        // It may have the keys of a flow removed meanwhile: not its times.
        assert_eq!(snapshot.last_seen(&flow, 100), None);
        assert_eq!(snapshot.last_seen(&flow, 150), None);
    }
}
