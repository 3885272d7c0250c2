//! Measures the kernel's tick for the XDP program's clock
//! (forwarder_common::clock): runs the embedded probe program, which reads
//! jiffies, between reads of CLOCK_MONOTONIC until the changes of jiffies
//! it saw agree with one kernel tick (`JiffiesClock::calibrate`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aya::programs::Xdp;
use aya::{EbpfLoader, TestRun as _, TestRunOptions};
use forwarder_common::clock::{JiffiesClock, JiffiesEdge};
use tracing::{debug, info, warn};

use super::monotonic_ns;

/// The probe program (forwarder-ebpf's clock_probe.rs), embedded by build.rs.
static CLOCK_PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clock-probe"));

/// Name of the XDP program inside [`CLOCK_PROBE_OBJECT`].
const PROBE_PROGRAM: &str = "clock_probe";

/// The longest the measurement may take. It usually ends once 20 ms of
/// changes agree (20-35 ms at HZ 250 here); a busy host widens or delays
/// some of them, which only asks for more.
const MEASURE_FOR: Duration = Duration::from_secs(1);

/// The tick and offset for the program's jiffies clock, or
/// [`JiffiesClock::UNMEASURED`] (the program then reads the coarse clock,
/// which costs more per packet and is otherwise the same) where the probe
/// cannot run or the tick is not found in time.
pub fn program_clock() -> JiffiesClock {
    match measure() {
        Ok(clock) => {
            info!(
                tick_ns = clock.tick_ns,
                "XDP clock: jiffies at HZ {}",
                1_000_000_000 / clock.tick_ns
            );
            clock
        }
        Err(error) => {
            warn!(
                "XDP clock: {error:#}; the program reads bpf_ktime_get_coarse_ns instead (the same \
                 times, 13-17 ns more per forwarded packet)"
            );
            JiffiesClock::UNMEASURED
        }
    }
}

/// The loaded probe program.
pub struct JiffiesProbe {
    ebpf: aya::Ebpf,
}

/// One read of jiffies, between two reads of CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug)]
pub struct JiffiesRead {
    pub before_ns: u64,
    pub jiffies: u64,
    pub after_ns: u64,
}

impl JiffiesProbe {
    pub fn load() -> anyhow::Result<Self> {
        if CLOCK_PROBE_OBJECT.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP and holds no clock probe");
        }
        let mut ebpf = EbpfLoader::new()
            .load(CLOCK_PROBE_OBJECT)
            .context("loading the clock probe")?;
        let probe: &mut Xdp = ebpf
            .program_mut(PROBE_PROGRAM)
            .context("the clock probe object has no program: rebuild forwarder")?
            .try_into()?;
        probe
            .load()
            .context("the verifier refused the clock probe (bpf_jiffies64 needs CAP_BPF)")?;
        Ok(Self { ebpf })
    }

    pub fn read(&self) -> anyhow::Result<JiffiesRead> {
        let probe: &Xdp = self
            .ebpf
            .program(PROBE_PROGRAM)
            .context("the clock probe object has no program: rebuild forwarder")?
            .try_into()?;
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        let before_ns = monotonic_ns();
        probe
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .context("running the clock probe (BPF_PROG_TEST_RUN)")?;
        let after_ns = monotonic_ns();
        let jiffies = u64::from_ne_bytes(out[..8].try_into().expect("8 bytes"));
        Ok(JiffiesRead {
            before_ns,
            jiffies,
            after_ns,
        })
    }
}

/// Watches jiffies change through the probe program.
pub fn measure() -> anyhow::Result<JiffiesClock> {
    let probe = JiffiesProbe::load()?;
    let started = Instant::now();
    let mut edges = Vec::new();
    let mut previous = probe.read()?;
    while started.elapsed() < MEASURE_FOR {
        let read = probe.read()?;
        if read.jiffies != previous.jiffies {
            edges.push(JiffiesEdge {
                jiffies: read.jiffies,
                earliest_ns: previous.before_ns,
                latest_ns: read.after_ns,
            });
            if let Some(clock) = JiffiesClock::calibrate(&edges) {
                debug!(
                    edges = edges.len(),
                    took_us = started.elapsed().as_micros(),
                    "XDP clock measured"
                );
                return Ok(clock);
            }
        }
        previous = read;
    }
    bail!(
        "no kernel tick found in {} ms ({} changes of jiffies seen, the narrowest timed within \
         {} µs)",
        MEASURE_FOR.as_millis(),
        edges.len(),
        edges
            .iter()
            .map(|edge| edge.latest_ns - edge.earliest_ns)
            .min()
            .unwrap_or(0)
            / 1000
    )
}
