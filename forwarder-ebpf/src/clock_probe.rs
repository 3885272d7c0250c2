//! A program the daemon runs with `BPF_PROG_TEST_RUN`, never attaches: it
//! writes the kernel's jiffies into the frame it is given, so the daemon
//! can watch them change and measure the tick and offset the forwarder
//! program's clock needs (forwarder_common::clock).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, helpers::bpf_jiffies64, macros::xdp, programs::XdpContext,
};

#[xdp]
pub fn clock_probe(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 8 <= end {
        // SAFETY: the 8 bytes at `start` lie inside the frame (checked above),
        // which belongs to this run; bpf_jiffies64 has no preconditions.
        unsafe { core::ptr::write_unaligned(start as *mut u64, bpf_jiffies64()) };
    }
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: nothing here can panic; the verifier would reject a call into
    // this handler, so it is never linked into a path.
    unsafe { core::hint::unreachable_unchecked() }
}
