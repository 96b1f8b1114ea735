//! The fit of the kernel programs' coarse clock (`stalltrace_common::clock`): samples of
//! `(jiffies, ktime)` from test runs of `stalltrace_clock_sample`, taken over ~100 ms while
//! the daemon starts, before anything is attached.
use std::time::{Duration, Instant};

use aya::{
    maps::{Array, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _},
    Ebpf,
};
use stalltrace_common::clock::{self, ClockSample, Fit, FitError};

/// The program that takes one sample per test run.
const PROGRAM: &str = "stalltrace_clock_sample";
/// How long samples are taken: ten ticks at `HZ=100`.
const SPAN: Duration = Duration::from_millis(100);
const EVERY: Duration = Duration::from_millis(1);
/// Subtracted from the fitted offset, for the few hundred ns between a sample's two reads.
const MARGIN_NS: u64 = 100_000;

/// The coarse clock's tick and offset, or why the programs keep `bpf_ktime_get_ns` (a
/// sentence for the log).
pub(crate) fn fit(ebpf: &mut Ebpf) -> Result<Fit, String> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| format!("the eBPF object has no program {PROGRAM}"))?
        .try_into()
        .map_err(|err| format!("{PROGRAM}: {err}"))?;
    program
        .load()
        .map_err(|err| format!("loading {PROGRAM}: {err}"))?;
    let samples: Array<&MapData, ClockSample> = ebpf
        .map("CLOCK_SAMPLE")
        .ok_or("the eBPF object has no map CLOCK_SAMPLE")?
        .try_into()
        .map_err(|err| format!("CLOCK_SAMPLE: {err}"))?;
    let program: &RawTracePoint = ebpf
        .program(PROGRAM)
        .ok_or("unreachable")?
        .try_into()
        .map_err(|err| format!("{PROGRAM}: {err}"))?;
    let started = Instant::now();
    let mut taken = Vec::with_capacity(128);
    while started.elapsed() < SPAN || taken.len() < 2 {
        program
            .test_run(RawTracePointRunOptions::new())
            .map_err(|err| format!("test run of {PROGRAM}: {err}"))?;
        taken.push(
            samples
                .get(&0, 0)
                .map_err(|err| format!("reading CLOCK_SAMPLE: {err}"))?,
        );
        std::thread::sleep(EVERY);
    }
    clock::fit(&taken, MARGIN_NS).map_err(|err| match err {
        FitError::TooShort => "too few ticks in the samples".to_owned(),
        FitError::NotMonotonic => "the kernel's clocks went backwards while sampled".to_owned(),
        FitError::UnknownRate { hz_milli } => format!(
            "the kernel ticks {}.{:03} times a second, not at a rate of kernel/Kconfig.hz",
            hz_milli / 1000,
            hz_milli % 1000
        ),
    })
}
