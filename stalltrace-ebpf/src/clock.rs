//! The time of per-connection state: jiffies scaled by the daemon's fit (`stalltrace_common::
//! clock`), a load where `bpf_ktime_get_ns` costs a fifth of a transfer program on some VMs.
//! `stalltrace_clock_sample` gives the daemon the samples of that fit (it loads the programs
//! with `COARSE_CLOCK` 0 when there is none); event records keep the precise clock
//! (`conn::emit_record`).
use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64};
use stalltrace_common::clock::{coarse_ns, ClockSample};

use crate::maps::{CLOCK_SAMPLE, COARSE_CLOCK, CONTROL};

/// Now, for connection state (ns, `CLOCK_MONOTONIC`'s scale; with the coarse clock it trails
/// it by up to a tick: docs/design.md, "Two clocks"). `None` only if the `CONTROL` slot is
/// missing (never).
#[inline(always)]
pub(crate) fn state_now() -> Option<u64> {
    // A constant to the verifier: only one clock's code is verified (the transfer programs
    // are near its limit).
    if COARSE_CLOCK.load() == 0 {
        return Some(precise_now());
    }
    let control = CONTROL.get(0)?;
    // SAFETY: no arguments; the verifier inlines it as a load of `jiffies_64`.
    let jiffies = unsafe { bpf_jiffies64() };
    Some(coarse_ns(
        jiffies,
        control.clock_tick_ns,
        control.clock_base_ns,
    ))
}

/// Now (ns, `CLOCK_MONOTONIC`), to the nanosecond: for event records.
#[inline(always)]
pub(crate) fn precise_now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Never attached: the daemon test-runs it (`BPF_PROG_TEST_RUN`) for a [`ClockSample`] in
/// `CLOCK_SAMPLE`. Jiffies first: the ktime read after it is then at or past that jiffy's tick.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp")]
fn stalltrace_clock_sample(_ctx: *mut core::ffi::c_void) -> u32 {
    let Some(sample) = CLOCK_SAMPLE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: array slot pointer, valid for the program run; the helpers take no arguments.
    unsafe {
        let jiffies = bpf_jiffies64();
        *sample = ClockSample {
            jiffies,
            ktime_ns: bpf_ktime_get_ns(),
        };
    }
    0
}
