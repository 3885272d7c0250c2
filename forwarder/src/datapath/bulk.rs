//! The flow maps read in bulk (`BPF_MAP_LOOKUP_BATCH`) for the expiry
//! tick: a lookup per flow under the relay lock was most of an idle
//! daemon's CPU with many flows. A pass through them is spread over ticks,
//! a bounded slice each, resumed from the kernel's batch token: a walk of a
//! million entries at once took the CPU the XDP program needed. aya 0.14
//! has no batch call, so it goes through the `bpf` syscall with aya-obj's
//! kernel bindings for the layout.

use std::hash::Hash;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd};
use bytemuck::Pod;
use forwarder_common::flow::stamp_ns;
use forwarder_common::portslot::{BackendSlot, ClientSlot, PortSlot};
use forwarder_common::{
    BackendKey, BackendKey6, BackendRewrite, ClientKey, ClientKey6, Rewrite, Rewrite6,
};

use super::flows::{BackendHalf, ClientHalf, FlowEntries};

/// The keys are ones the daemon installed itself, so hash flooding is no
/// concern here, and foldhash is several times faster than std's SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Entries asked for per call: large enough that a call per map is the
/// rule, and that no hash bucket ever holds more (the kernel answers
/// ENOSPC then, and the buffer grows).
const CHUNK: usize = 4096;

/// One `BPF_MAP_LOOKUP_BATCH` call's answer: `got` entries in the
/// buffers, and where the next call resumes (None: the map's end).
struct Batch {
    got: usize,
    next: Option<u32>,
}

/// One batch call from `from` (None: the map's start) into `keys` and
/// `values`, as many entries as they hold; grown when one hash bucket
/// holds more (the kernel answers ENOSPC then). Hash maps and arrays both
/// resume from a u32 token (a bucket index, the last array index). An
/// error keeps the kernel's errno, so callers can tell a kernel without
/// the command from a failure.
fn lookup_batch<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    from: Option<u32>,
    keys: &mut Vec<K>,
    values: &mut Vec<V>,
) -> io::Result<Batch> {
    // The hash map's batch token is a bucket index (u32).
    let mut in_batch = from.unwrap_or(0);
    let mut out_batch = 0u32;
    loop {
        let chunk = keys.len().min(values.len());
        // SAFETY: all-zero is a valid bpf_attr (a plain C union of integers).
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // Plain integers into the `batch` member; the buffers live until the
        // syscall returns, each `chunk` elements of the map's key and value size.
        attr.batch.in_batch = match from {
            None => 0,
            Some(_) => std::ptr::from_mut(&mut in_batch) as u64,
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
            keys.resize(chunk.max(1) * 2, K::zeroed());
            values.resize(chunk.max(1) * 2, V::zeroed());
            continue;
        }
        if let Some(error) = error
            && error.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(error);
        }
        // SAFETY: reading back the integer the kernel wrote.
        let got = unsafe { attr.batch.count } as usize;
        // ENOENT: the walk reached the end (with the last entries, if any).
        let next = (rc >= 0).then_some(out_batch);
        return Ok(Batch { got, next });
    }
}

/// Descriptors of the six flow maps and the two slot arrays of its own,
/// so the tick reads them without holding the relay (and its datapath)
/// locked.
pub struct FlowMapsReader {
    pub(super) client: OwnedFd,
    pub(super) backend: OwnedFd,
    /// The IPv4 halves' port slots, read when `client` / `backend` are:
    /// only around the slots live when the reader was made (ascending), so
    /// a relay with a few flows does not copy the whole arrays each pass.
    pub(super) client_slots: OwnedFd,
    pub(super) backend_slots: OwnedFd,
    pub(super) client_live: Vec<u32>,
    pub(super) backend_live: Vec<u32>,
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

impl MapsUsed {
    /// Whether map `index` is used, in the order a pass reads them: client,
    /// backend, client6, backend6, client_4to6, backend_4to6, then the
    /// client and backend slots (the IPv4 halves not in the hash maps).
    fn get(self, index: usize) -> bool {
        [
            self.client,
            self.backend,
            self.client6,
            self.backend6,
            self.client_4to6,
            self.backend_4to6,
            self.client,
            self.backend,
        ]
        .get(index)
        .copied()
        .unwrap_or(false)
    }

    /// The first used map at `index` or after it.
    fn next_from(self, index: usize) -> Option<usize> {
        (index..FLOW_MAPS).find(|&map| self.get(map))
    }
}

/// The six flow maps and two slot arrays a pass reads, in
/// [`MapsUsed::get`]'s order.
const FLOW_MAPS: usize = 8;

/// Where a pass through the flow maps stands between ticks: the map it
/// reads and the kernel's batch token to resume that map from (None: its
/// start). A hash map's token is a bucket index, so entries removed under
/// it do not invalidate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    map: usize,
    token: Option<u32>,
}

/// What one batch call on the cursor's map answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Entries, and more of the map from this token on.
    More(u32),
    /// The map's last entries (or none): its end.
    End,
    Failed,
}

/// What the pass does after an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Read(Cursor),
    /// Every used map read to its end.
    Complete,
    /// A call failed in mid-pass: what was collected may have gaps, so the
    /// pass starts over rather than judge flows from it.
    Restart,
    /// The very first call failed: batch reads do not work here at all.
    Unsupported,
}

/// Where a pass starts: the first map some flow uses (None: nothing to read).
fn pass_start(used: MapsUsed) -> Option<Cursor> {
    used.next_from(0).map(|map| Cursor { map, token: None })
}

fn step(cursor: Cursor, used: MapsUsed, answer: Answer) -> Step {
    match answer {
        Answer::More(token) => Step::Read(Cursor {
            map: cursor.map,
            token: Some(token),
        }),
        Answer::End => match used.next_from(cursor.map + 1) {
            Some(map) => Step::Read(Cursor { map, token: None }),
            None => Step::Complete,
        },
        Answer::Failed if pass_start(used) == Some(cursor) => Step::Unsupported,
        Answer::Failed => Step::Restart,
    }
}

/// One batch call into `into` (key: the half's last-seen time), at most
/// `room` entries unless one bucket holds more.
fn read_into<K: Pod + Hash + Eq, V: Pod>(
    map: &OwnedFd,
    from: Option<u32>,
    room: usize,
    into: &mut HashMap<K, u64>,
    last_seen: impl Fn(&V) -> u64,
) -> io::Result<Batch> {
    let mut keys = vec![K::zeroed(); room];
    let mut values = vec![V::zeroed(); room];
    let batch = lookup_batch(map.as_fd(), from, &mut keys, &mut values)?;
    into.extend(
        keys[..batch.got]
            .iter()
            .copied()
            .zip(values[..batch.got].iter().map(last_seen)),
    );
    Ok(batch)
}

/// [`read_into`] for a slot array: the live slots' halves, by their keys.
/// An array's batch token is the last index read; each call starts at the
/// next slot of `live` and reads the run of slots around live ones (gaps of
/// at most [`SLOT_GAP`] dead slots), so the pass skips the dead stretches.
fn read_slots_into<S: PortSlot>(
    (array, live): (&OwnedFd, &[u32]),
    from: Option<u32>,
    room: usize,
    into: &mut HashMap<S::Key, u64>,
    last_seen: impl Fn(&S::Value) -> u64,
) -> io::Result<Batch>
where
    S::Key: Hash + Eq,
{
    let next = from.map_or(0, |last| last + 1);
    let Some(run) = slot_run(live, next, room) else {
        return Ok(Batch { got: 0, next: None });
    };
    let mut indexes = vec![0u32; run.len];
    let mut slots = vec![S::zeroed(); run.len];
    // The kernel starts after the token: the slot before the run's first.
    let token = run.first.checked_sub(1);
    let batch = lookup_batch(array.as_fd(), token, &mut indexes, &mut slots)?;
    into.extend(
        slots[..batch.got]
            .iter()
            .filter(|slot| slot.is_live())
            .map(|slot| (slot.key(), last_seen(&slot.value()))),
    );
    let last = run.first + batch.got.saturating_sub(1) as u32;
    let more = batch.got > 0 && live.last().is_some_and(|&end| end > last);
    Ok(Batch {
        got: batch.got,
        next: more.then_some(last),
    })
}

/// Dead slots read through rather than skipped: a batch call costs more
/// than copying this many slots.
const SLOT_GAP: u32 = 64;

/// The slots one call reads: from the first live slot at or after `next`,
/// on while the live ones are at most [`SLOT_GAP`] apart, `room` at most.
#[derive(Debug, PartialEq, Eq)]
struct SlotRun {
    first: u32,
    len: usize,
}

fn slot_run(live: &[u32], next: u32, room: usize) -> Option<SlotRun> {
    let start = live.partition_point(|&index| index < next);
    let first = *live.get(start)?;
    let mut end = first;
    for &index in &live[start + 1..] {
        if index - end > SLOT_GAP || (index - first) as usize >= room.max(1) {
            break;
        }
        end = index;
    }
    Some(SlotRun {
        first,
        len: (end - first + 1) as usize,
    })
}

/// What one tick's slice of a pass came to.
#[derive(Debug)]
pub enum Slice {
    /// The pass goes on next tick.
    Partial,
    /// Every used map has been read: [`FlowMapsPass::finish`].
    Complete,
    /// A call failed in mid-pass; drop this pass and start a fresh one.
    Restart(io::Error),
}

/// What a complete pass took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassTotals {
    /// Ticks (slices) it was read in.
    pub ticks: u32,
    /// Entries the kernel handed over, every map.
    pub entries: usize,
    /// Time spent reading, all slices.
    pub read: std::time::Duration,
}

/// A walk through the flow maps spread over ticks, a bounded slice each,
/// so a million entries do not take a core's second at once. The maps
/// are read to their ends before any flow is judged from what was seen.
pub struct FlowMapsPass {
    /// Descriptors and used maps as they were when the pass began.
    reader: FlowMapsReader,
    /// None: complete.
    cursor: Option<Cursor>,
    seen: LastSeenSnapshot,
    totals: PassTotals,
}

impl FlowMapsPass {
    /// A pass over `reader`'s maps. `taken_ns` must be read before the
    /// reader was made: flows created from then on are not judged by this
    /// pass (see [`LastSeenSnapshot::last_seen`]), and every older flow's
    /// maps are among the reader's used ones.
    pub fn start(reader: FlowMapsReader, taken_ns: u64) -> Self {
        let cursor = pass_start(reader.used);
        Self {
            reader,
            cursor,
            seen: LastSeenSnapshot {
                taken_ns,
                ..LastSeenSnapshot::default()
            },
            totals: PassTotals::default(),
        }
    }

    /// Entries read so far.
    pub fn entries(&self) -> usize {
        self.totals.entries
    }

    /// Reads on from where the last slice stopped, about `budget` entries
    /// (whole buckets, so a few more). Err: the pass's first call failed,
    /// batch reads do not work on this kernel (before 5.6).
    pub fn read_slice(&mut self, budget: usize) -> io::Result<Slice> {
        let started = std::time::Instant::now();
        self.totals.ticks += 1;
        let mut read = 0;
        let result = loop {
            let Some(cursor) = self.cursor else {
                break Ok(Slice::Complete);
            };
            if read >= budget {
                break Ok(Slice::Partial);
            }
            let room = CHUNK.min(budget - read);
            let (answer, error) = match self.read_batch(cursor, room) {
                Ok(batch) => {
                    // At least one per call, so the slice ends whatever the kernel answers.
                    read += batch.got.max(1);
                    self.totals.entries += batch.got;
                    (batch.next.map_or(Answer::End, Answer::More), None)
                }
                Err(error) => (Answer::Failed, Some(error)),
            };
            let failure = || error.unwrap_or_else(|| io::Error::other("batch read failed"));
            match step(cursor, self.reader.used, answer) {
                Step::Read(next) => self.cursor = Some(next),
                Step::Complete => self.cursor = None,
                Step::Restart => break Ok(Slice::Restart(failure())),
                Step::Unsupported => break Err(failure()),
            }
        };
        self.totals.read += started.elapsed();
        result
    }

    fn read_batch(&mut self, cursor: Cursor, room: usize) -> io::Result<Batch> {
        let (reader, seen, from) = (&self.reader, &mut self.seen, cursor.token);
        // The stamps are 32-bit: read back to nanoseconds against this batch's time.
        let now = super::monotonic_ns();
        match cursor.map {
            0 => {
                read_into::<ClientKey, Rewrite>(&reader.client, from, room, &mut seen.client, |r| {
                    stamp_ns(r.last_seen, now)
                })
            }
            1 => read_into::<BackendKey, BackendRewrite>(
                &reader.backend,
                from,
                room,
                &mut seen.backend,
                |r| stamp_ns(r.rewrite.last_seen, now),
            ),
            2 => read_into::<ClientKey6, Rewrite6>(
                &reader.client6,
                from,
                room,
                &mut seen.client6,
                |r| stamp_ns(r.last_seen, now),
            ),
            3 => read_into::<BackendKey6, Rewrite6>(
                &reader.backend6,
                from,
                room,
                &mut seen.backend6,
                |r| stamp_ns(r.last_seen, now),
            ),
            4 => read_into::<ClientKey, Rewrite6>(
                &reader.client_4to6,
                from,
                room,
                &mut seen.client_4to6,
                |r| stamp_ns(r.last_seen, now),
            ),
            5 => read_into::<BackendKey, Rewrite6>(
                &reader.backend_4to6,
                from,
                room,
                &mut seen.backend_4to6,
                |r| stamp_ns(r.last_seen, now),
            ),
            6 => read_slots_into::<ClientSlot>(
                (&reader.client_slots, &reader.client_live),
                from,
                room,
                &mut seen.client,
                |r| stamp_ns(r.last_seen, now),
            ),
            _ => read_slots_into::<BackendSlot>(
                (&reader.backend_slots, &reader.backend_live),
                from,
                room,
                &mut seen.backend,
                |r| stamp_ns(r.rewrite.last_seen, now),
            ),
        }
    }

    /// What the complete pass saw, and what it took.
    pub fn finish(self) -> (LastSeenSnapshot, PassTotals) {
        (self.seen, self.totals)
    }
}

/// The flow maps' last-seen times, as one pass read them.
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
    /// When the pass started (CLOCK_MONOTONIC ns).
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
    /// created after the pass began may reuse the keys of a flow removed
    /// meanwhile, whose times are not its own; and a half the pass did not
    /// find may have moved (a NAT client's new key put into a bucket the
    /// pass had read, the old one taken from a bucket it had not yet), so
    /// it is looked up, never taken for silence.
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
        Some((*client?, *backend?))
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

/// The kernel's own "operation not supported" (524), which leaks to user
/// space from the bpf syscall for a map type without batch operations;
/// libc names only EOPNOTSUPP (95).
const ENOTSUPP: i32 = 524;

/// Indexes of the slots of `array` whose value is not all zero, read with
/// `BPF_MAP_LOOKUP_BATCH` (a call per 4,096 slots) instead of a lookup per
/// slot. `None` where the kernel has no batch lookup for arrays (before
/// 5.6: the command is unknown, EINVAL, or the map type lacks it,
/// ENOTSUPP): the caller then reads slot by slot.
pub fn nonzero_slots<T, V>(array: &aya::maps::Array<T, V>) -> io::Result<Option<Vec<u32>>>
where
    T: std::borrow::Borrow<aya::maps::MapData>,
    V: aya::Pod + Pod,
{
    use aya::maps::IterableMap as _;

    let fd = array.map().fd().as_fd();
    let mut slots = Vec::new();
    let mut keys = vec![0u32; CHUNK];
    // Array::try_from checked that the map's value size is V's, so each
    // buffer holds CHUNK of what the kernel writes.
    let mut values = vec![V::zeroed(); CHUNK];
    let mut from = None;
    loop {
        let batch = match lookup_batch(fd, from, &mut keys, &mut values) {
            Ok(batch) => batch,
            Err(error)
                if from.is_none()
                    && matches!(
                        error.raw_os_error(),
                        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                    ) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        slots.extend(
            keys[..batch.got]
                .iter()
                .zip(&values[..batch.got])
                .filter(|(_, value)| bytemuck::bytes_of(*value).iter().any(|byte| *byte != 0))
                .map(|(key, _)| *key),
        );
        match batch.next {
            Some(next) => from = Some(next),
            None => return Ok(Some(slots)),
        }
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
            backend_iface: forwarder_common::flow::IFACE_ANY,
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
        // Another flow's halves are not this one's: a half the pass did not
        // find is looked up, never read as silence.
        let snapshot = LastSeenSnapshot::for_test(100, &flows[0], (40, 50));
        assert_eq!(snapshot.last_seen(&flows[1], 99), None);
    }

    const ONLY_V4: MapsUsed = MapsUsed {
        client: true,
        backend: true,
        client6: false,
        backend6: false,
        client_4to6: false,
        backend_4to6: false,
    };

    fn at(map: usize, token: Option<u32>) -> Cursor {
        Cursor { map, token }
    }

    #[test]
    fn a_pass_reads_each_used_map_to_its_end_and_skips_the_rest() {
        assert_eq!(pass_start(ONLY_V4), Some(at(0, None)));
        // Resumes the map from the kernel's token, then goes to the next used one.
        assert_eq!(
            step(at(0, None), ONLY_V4, Answer::More(512)),
            Step::Read(at(0, Some(512)))
        );
        assert_eq!(
            step(at(0, Some(512)), ONLY_V4, Answer::End),
            Step::Read(at(1, None))
        );
        // The IPv4 halves' slot arrays come last, after the other maps.
        assert_eq!(
            step(at(1, Some(9)), ONLY_V4, Answer::End),
            Step::Read(at(6, None))
        );
        assert_eq!(
            step(at(6, Some(4)), ONLY_V4, Answer::End),
            Step::Read(at(7, None))
        );
        assert_eq!(step(at(7, None), ONLY_V4, Answer::End), Step::Complete);
        // Translated flows only: the four other maps are never visited.
        let translated = MapsUsed {
            client_4to6: true,
            backend_4to6: true,
            ..MapsUsed::default()
        };
        assert_eq!(pass_start(translated), Some(at(4, None)));
        assert_eq!(
            step(at(4, None), translated, Answer::End),
            Step::Read(at(5, None))
        );
        assert_eq!(step(at(5, None), translated, Answer::End), Step::Complete);
        assert_eq!(pass_start(MapsUsed::default()), None);
    }

    #[test]
    fn a_failure_in_mid_pass_restarts_it_and_only_the_first_call_means_unsupported() {
        assert_eq!(
            step(at(0, None), ONLY_V4, Answer::Failed),
            Step::Unsupported
        );
        // Past the first call: gaps in what was read, so start over, never judge from it.
        assert_eq!(
            step(at(0, Some(512)), ONLY_V4, Answer::Failed),
            Step::Restart
        );
        assert_eq!(step(at(1, None), ONLY_V4, Answer::Failed), Step::Restart);
    }

    #[test]
    fn slot_reads_cover_the_live_slots_and_skip_long_dead_stretches() {
        let live = [3, 5, 60, 500, 501, 9_000];
        assert_eq!(
            slot_run(&live, 0, 4096),
            Some(SlotRun { first: 3, len: 58 })
        );
        // Resumed after the run's last slot: the next run starts at 500.
        assert_eq!(
            slot_run(&live, 61, 4096),
            Some(SlotRun { first: 500, len: 2 })
        );
        assert_eq!(
            slot_run(&live, 502, 4096),
            Some(SlotRun {
                first: 9_000,
                len: 1
            })
        );
        assert_eq!(slot_run(&live, 9_001, 4096), None);
        // A run never exceeds the room.
        assert_eq!(slot_run(&live, 0, 3), Some(SlotRun { first: 3, len: 3 }));
        assert_eq!(slot_run(&[], 0, 4096), None);
    }

    #[test]
    fn a_pass_over_no_used_map_completes_at_once() {
        let reader = || -> io::Result<OwnedFd> { Ok(std::fs::File::open("/dev/null")?.into()) };
        let mut pass = FlowMapsPass::start(
            FlowMapsReader {
                client: reader().unwrap(),
                backend: reader().unwrap(),
                client6: reader().unwrap(),
                backend6: reader().unwrap(),
                client_4to6: reader().unwrap(),
                backend_4to6: reader().unwrap(),
                client_slots: reader().unwrap(),
                backend_slots: reader().unwrap(),
                client_live: Vec::new(),
                backend_live: Vec::new(),
                used: MapsUsed::default(),
            },
            100,
        );
        assert!(matches!(pass.read_slice(10), Ok(Slice::Complete)));
        let (seen, totals) = pass.finish();
        assert_eq!((seen.taken_ns(), seen.entries()), (100, 0));
        assert_eq!((totals.ticks, totals.entries), (1, 0));
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
