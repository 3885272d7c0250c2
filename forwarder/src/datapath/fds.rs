//! The daemon's open-file budget. Every session and every flow holds a
//! socket, so the open-file limit is a capacity limit like the map sizes.
//! New flows stop a reserve short of it, so that the control socket,
//! metrics scrapes, the session store and a restart's own files always
//! find a descriptor; and a refusal names the limit instead of blaming the
//! port range.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::resource::{Resource, getrlimit};

/// Descriptors kept free for everything that is not a flow.
pub const RESERVE: u64 = 64;

/// Flows refused because the budget was spent, for `stats` and metrics.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// The soft RLIMIT_NOFILE: what open(2) and socket(2) are held to.
pub fn limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(soft, _)| soft)
}

/// The reserve at `limit`: a quarter of a tiny limit, so the daemon still
/// holds some flows under one.
pub fn reserve_for(limit: u64) -> u64 {
    RESERVE.min(limit / 4)
}

/// A new flow (or socket) would eat into the reserve, or the kernel already
/// refused a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the daemon has reached its open-file limit ({limit}, of which {reserve} are kept for the control \
     socket, metrics and restarts): raise LimitNOFILE in the systemd unit / `ulimit -n` (or \
     --max-open-files), or lower --max-flows"
)]
pub struct AtLimit {
    pub limit: u64,
    pub reserve: u64,
}

/// The whole host ran out of open files (ENFILE), not just the daemon.
fn system_wide() -> AtLimit {
    AtLimit {
        limit: limit(),
        reserve: reserve_for(limit()),
    }
}

/// Whether one more descriptor fits without touching the reserve.
///
/// Linux hands out the lowest free descriptor, so the number a fresh
/// descriptor gets says that every one below it is open: when that number
/// reaches `limit - reserve`, the budget is spent. Descriptors above it
/// exist only while the budget was already full (short-lived control and
/// metrics connections), so this is exact enough and costs one dup/close
/// instead of a walk of /proc/self/fd per new flow. The probe duplicates
/// stderr (no path lookup, on the learning path of every flow), or opens
/// /dev/null where stderr is closed.
pub fn check_headroom() -> Result<(), AtLimit> {
    use std::os::fd::{AsFd, OwnedFd};
    let limit = limit();
    let reserve = reserve_for(limit);
    let probe = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .or_else(|_| std::fs::File::open("/dev/null").map(OwnedFd::from));
    match probe {
        Ok(probe) => {
            let number = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
            if number + reserve >= limit {
                return Err(AtLimit { limit, reserve });
            }
            Ok(())
        }
        Err(error) if is_exhaustion(&error) => Err(AtLimit { limit, reserve }),
        // /dev/null missing says nothing about descriptors: let the bind decide.
        Err(_) => Ok(()),
    }
}

fn is_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether `error` (from binding a socket) was the open-file limit.
pub fn exhausted(error: &anyhow::Error) -> Option<AtLimit> {
    let typed = error
        .chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(is_exhaustion));
    // RelaySocket::bind formats the io::Error into its message.
    let text = format!("{error:#}");
    let by_text = text.contains("os error 24") || text.contains("os error 23");
    (typed || by_text).then(system_wide)
}

/// Counts a refused flow; returns whether to log it. At the limit every
/// new endpoint of every session is refused, so the log gets the first
/// refusal and then one a second (the count is in `stats`).
pub fn count_refusal() -> bool {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let now = super::monotonic_ns();
    let last = LAST_LOGGED_NS.load(Ordering::Relaxed);
    (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
        && LAST_LOGGED_NS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// When a refusal was last logged (CLOCK_MONOTONIC ns; 0: never).
static LAST_LOGGED_NS: AtomicU64 = AtomicU64::new(0);

/// Descriptor use for `stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub open: u64,
    pub limit: u64,
    pub reserve: u64,
    pub refused_flows: u64,
}

pub fn usage() -> Usage {
    // Minus one: the directory handle read_dir itself holds.
    let open = std::fs::read_dir("/proc/self/fd")
        .map_or(0, |entries| entries.count() as u64)
        .saturating_sub(1);
    let limit = limit();
    Usage {
        open,
        limit,
        reserve: reserve_for(limit),
        refused_flows: REFUSED.load(Ordering::Relaxed),
    }
}

/// Sets the open-file limit to `wanted` (soft and hard), as --max-open-files asks.
pub fn set_limit(wanted: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    nix::sys::resource::setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted)
        .with_context(|| format!("setting the open-file limit to {wanted} (--max-open-files): it may not exceed fs.nr_open"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_shrinks_for_tiny_limits_and_headroom_is_there_normally() {
        assert_eq!(reserve_for(100_000), RESERVE);
        assert_eq!(reserve_for(40), 10);
        assert!(check_headroom().is_ok());
        let usage = usage();
        assert!(usage.open >= 3 && usage.open < usage.limit, "{usage:?}");
    }

    #[test]
    fn recognises_the_limit_in_a_bind_error() {
        let error = anyhow::anyhow!("binding UDP port 61000: Too many open files (os error 24)");
        assert!(exhausted(&error).is_some());
        let error =
            anyhow::Error::from(io::Error::from_raw_os_error(libc::ENFILE)).context("binding");
        assert!(exhausted(&error).is_some());
        assert!(
            exhausted(&anyhow::anyhow!(
                "UDP port 61000 is in use by another program"
            ))
            .is_none()
        );
    }
}
