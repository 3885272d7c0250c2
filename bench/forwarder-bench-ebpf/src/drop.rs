//! The floor for refusing junk: a program that drops every frame without
//! looking at it. A flood refused by forwarder is compared with this.

use aya_ebpf::{bindings::xdp_action::XDP_DROP, macros::xdp, programs::XdpContext};

#[xdp]
pub fn forwarder_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}
