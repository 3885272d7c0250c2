//! The relay's settings, fixed for the life of a loaded program: read-only
//! globals the daemon sets when it loads the object, so the verifier sees
//! constants and no packet pays a map lookup for them.

use forwarder_common::RelayConfig;

/// Port ranges the relay owns. All zero here (no relay ports); the daemon
/// overrides the value at load time (`forwarder_common::config::RELAY_CONFIG_GLOBAL`).
#[unsafe(no_mangle)]
static RELAY_CONFIG: RelayConfig = RelayConfig {
    session_port_lo: 0,
    session_port_hi: 0,
    flow_port_lo: 0,
    flow_port_hi: 0,
    shared_port: 0,
    _pad: 0,
};

/// The configuration as loaded.
#[inline(always)]
pub fn relay() -> RelayConfig {
    // SAFETY: a plain read of an initialised static. Volatile keeps LLVM from
    // folding in the all-zero value compiled here: the loader rewrites the
    // global's bytes before the program is verified.
    unsafe { core::ptr::read_volatile(&raw const RELAY_CONFIG) }
}
