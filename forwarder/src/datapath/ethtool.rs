//! The two ethtool facts the health check needs, asked of the kernel with
//! the SIOCETHTOOL ioctl instead of by running `ethtool`: a veth peer's GRO
//! flag and a veth's driver statistics. The check runs every two seconds for
//! every veth; spawning `ethtool` (and `nsenter` for a peer in another
//! namespace) each time cost a fork and exec per interface per tick, and a
//! child between fork and exec holds the daemon's descriptors (see the
//! daemon's control-socket takeover).
//!
//! The ioctl works on the namespace of the socket it is issued on, so the
//! caller runs [`gro_enabled`] inside the peer's namespace.
//!
//! `below-ethtool` (0.9) was tried first and rejected: in a release build it
//! returned garbage statistic names and values (its variable-length buffers
//! are not zeroed the way the kernel's copy expects).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// `SIOCETHTOOL` from <linux/sockios.h>.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// Commands from <linux/ethtool.h>.
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// The string set of `ethtool -S`.
const ETH_SS_STATS: u32 = 1;
/// Every statistic's name takes this many bytes, NUL padded.
const ETH_GSTRING_LEN: usize = 32;

/// `struct ifreq` with the `ifr_data` member of its union (the union is 24
/// bytes on 64-bit, 16 on 32-bit; the tail pads to the larger).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    pad: [u8; 16],
}

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ethtool_sset_info` with room for the one count asked for.
#[repr(C)]
struct EthtoolSsetInfo {
    cmd: u32,
    reserved: u32,
    sset_mask: u64,
    data: [u32; 1],
}

/// An AF_INET datagram socket: any socket of the namespace carries the ioctl.
fn control_socket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// Issues one ethtool command on `interface`; `command` points at a buffer
/// that starts with the command word and is as large as the command writes.
fn ethtool(socket: &OwnedFd, interface: &str, command: *mut c_void) -> io::Result<()> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{interface:?} is not an interface name"),
        ));
    }
    let mut request = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: command,
        pad: [0; 16],
    };
    request.name[..name.len()].copy_from_slice(name);
    // SAFETY: `request` is a valid ifreq whose data pointer the caller sized
    // for the command it holds; the kernel writes only within that buffer
    // (or, for GSTRINGS/GSTATS, within the count it reported before, which
    // the callers allocate with headroom for).
    let result = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut request as *mut IfreqData,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `interface` (in the calling thread's namespace) has GRO on: the
/// flag `ethtool -k` prints as generic-receive-offload.
pub fn gro_enabled(interface: &str) -> io::Result<bool> {
    let socket = control_socket()?;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    ethtool(&socket, interface, (&mut value as *mut EthtoolValue).cast())?;
    Ok(value.data != 0)
}

/// The driver statistics of `interface` as `ethtool -S` prints them: each
/// counter's name and value.
pub fn driver_stats(interface: &str) -> io::Result<Vec<(String, u64)>> {
    let socket = control_socket()?;
    let mut info = EthtoolSsetInfo {
        cmd: ETHTOOL_GSSET_INFO,
        reserved: 0,
        sset_mask: 1 << ETH_SS_STATS,
        data: [0],
    };
    ethtool(
        &socket,
        interface,
        (&mut info as *mut EthtoolSsetInfo).cast(),
    )?;
    if info.sset_mask & (1 << ETH_SS_STATS) == 0 {
        return Ok(Vec::new());
    }
    let count = info.data[0] as usize;
    // The kernel fills GSTRINGS and GSTATS with the count it has at that
    // moment, whatever length we pass: a driver whose queue count changed
    // since GSSET_INFO writes more. The headroom covers any realistic change;
    // a mismatch between the two answers discards the reading.
    let capacity = count * 2 + 64;

    // u64 words keep the buffers aligned for the 8-byte statistics.
    let strings_header_words = 2; // cmd, string_set, len: 12 bytes, rounded up
    let mut strings = vec![0u64; strings_header_words + capacity * ETH_GSTRING_LEN / 8];
    let header = strings.as_mut_ptr().cast::<u32>();
    // SAFETY: the buffer holds at least three u32s at its aligned start.
    unsafe {
        header.write(ETHTOOL_GSTRINGS);
        header.add(1).write(ETH_SS_STATS);
        header.add(2).write(count as u32);
    }
    ethtool(&socket, interface, strings.as_mut_ptr().cast())?;
    // SAFETY: as above; the kernel wrote the count it filled in here.
    let named = unsafe { header.add(2).read() } as usize;

    let mut stats = vec![0u64; 1 + capacity];
    let header = stats.as_mut_ptr().cast::<u32>();
    // SAFETY: the buffer holds at least two u32s at its aligned start.
    unsafe {
        header.write(ETHTOOL_GSTATS);
        header.add(1).write(count as u32);
    }
    ethtool(&socket, interface, stats.as_mut_ptr().cast())?;
    // SAFETY: as above.
    let valued = unsafe { header.add(1).read() } as usize;

    if named != valued || named > capacity {
        return Err(io::Error::other(format!(
            "{interface}'s driver reported {named} statistic names but {valued} values (it changed \
             between the two requests); the next check reads them again"
        )));
    }
    // SAFETY: `strings` is a plain byte buffer of header + capacity names;
    // viewing its words as bytes is always valid.
    let bytes =
        unsafe { std::slice::from_raw_parts(strings.as_ptr().cast::<u8>(), strings.len() * 8) };
    let names = &bytes[12..12 + named * ETH_GSTRING_LEN];
    Ok(names
        .chunks_exact(ETH_GSTRING_LEN)
        .zip(&stats[1..1 + valued])
        .map(|(name, value)| {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            (String::from_utf8_lossy(&name[..end]).into_owned(), *value)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_kernels_ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfreqData>(), 40);
        assert_eq!(std::mem::size_of::<EthtoolSsetInfo>(), 24);
    }

    #[test]
    fn names_that_are_not_interfaces_are_refused_before_the_kernel() {
        let socket = control_socket().expect("a datagram socket");
        let mut value = EthtoolValue {
            cmd: ETHTOOL_GGRO,
            data: 0,
        };
        for bad in ["", "a-name-longer-than-ifnamsiz", "nul\0inside"] {
            let error = ethtool(&socket, bad, (&mut value as *mut EthtoolValue).cast())
                .expect_err("refused");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn loopback_answers_both_requests() {
        // lo exists in every namespace; it has GRO off or on depending on the
        // kernel, and no driver statistics: an empty set, not an error.
        gro_enabled("lo").expect("GGRO on lo");
        assert_eq!(driver_stats("lo").expect("GSSET_INFO on lo"), Vec::new());
        let missing = gro_enabled("no-such-if0").expect_err("no such interface");
        assert_eq!(missing.raw_os_error(), Some(libc::ENODEV), "{missing}");
    }
}
