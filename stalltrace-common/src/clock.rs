//! The clock of per-connection state: jiffies scaled to `CLOCK_MONOTONIC` nanoseconds.
//!
//! Every transfer stamps its connection with the time (`last_send_ns`, `last_recv_ns`, …), and
//! `bpf_ktime_get_ns` costs ~50 ns a call on some virtual machines (measured: 40–65 ns on the
//! Firecracker VM of docs/performance.md), a fifth of a transfer program. Stall thresholds are
//! seconds, so state is stamped from `jiffies` instead (one load, the verifier inlines
//! `bpf_jiffies64`): `jiffies × tick_ns + base_ns`, which trails `CLOCK_MONOTONIC` by at most
//! two ticks (8 ms at the common `HZ=250`). Event records keep the precise clock (their
//! timestamps time the sampled exchanges of `stalltrace why`, in µs).
//!
//! The kernel exports neither `HZ` nor the offset: the daemon fits them from
//! [`ClockSample`]s, pairs of `(jiffies, ktime)` read together by a test run of a program
//! ([`Fit`]), before it attaches anything. Until then, or when the fit fails, `tick_ns` is 0
//! and the programs read `bpf_ktime_get_ns`.

/// Added to the stall threshold wherever it is compared with connection state times while the
/// coarse clock is on (ns): those trail the truth by up to one tick, 10 ms at the slowest rate
/// (`HZ=100`), so a difference of two of them can exceed the true one by a tick. With it, a
/// reply that came before the threshold is never a stall; one that came less than a tick after
/// it may go unflagged.
pub const THRESHOLD_SLACK_NS: u64 = 10_000_000;

/// `jiffies_64` and `bpf_ktime_get_ns()` read one after the other by one program run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockSample {
    pub jiffies: u64,
    pub ktime_ns: u64,
}

/// Nanoseconds (on `CLOCK_MONOTONIC`'s scale) at `jiffies`, with the fitted `tick_ns` and
/// `base_ns` (modular: `base_ns` is usually "negative").
#[inline(always)]
pub fn coarse_ns(jiffies: u64, tick_ns: u64, base_ns: u64) -> u64 {
    jiffies.wrapping_mul(tick_ns).wrapping_add(base_ns)
}

/// The tick rates of kernel/Kconfig.hz, the only ones x86-64 and arm64 offer (`CONFIG_HZ`).
/// At least 16 % apart: a fit over ten ticks cannot take one for another.
const HZ_CHOICES: [u64; 4] = [100, 250, 300, 1000];

/// Ticks a fit needs between its first and last sample (100 ms at `HZ=100`).
const MIN_TICKS: u64 = 8;

/// Nanoseconds a jiffy stands for at `hz`, rounded as the kernel's `TICK_NSEC` is.
const fn tick_nsec(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// What the daemon writes into `CONTROL` for the coarse clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    pub tick_ns: u64,
    pub base_ns: u64,
}

/// Why samples gave no fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitError {
    /// Fewer than two samples, or fewer than [`MIN_TICKS`] ticks between them.
    TooShort,
    /// A sample's jiffies or ktime went backwards.
    NotMonotonic,
    /// The measured tick rate is none of the rates Linux can be built with.
    UnknownRate { hz_milli: u64 },
}

/// Fits `tick_ns` and `base_ns` to samples taken over some tens of milliseconds, so that the
/// coarse time of every sample is at or before its ktime (it may trail, never lead: a jiffy
/// is counted once its tick has passed). `margin_ns` is subtracted on top, for the sampling's
/// own jitter.
pub fn fit(samples: &[ClockSample], margin_ns: u64) -> Result<Fit, FitError> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Err(FitError::TooShort);
    };
    if samples
        .windows(2)
        .any(|w| w[1].jiffies < w[0].jiffies || w[1].ktime_ns < w[0].ktime_ns)
    {
        return Err(FitError::NotMonotonic);
    }
    let elapsed_ns = last.ktime_ns - first.ktime_ns;
    let ticks = last.jiffies - first.jiffies;
    if ticks < MIN_TICKS {
        return Err(FitError::TooShort);
    }
    // The rate is known within ±1 tick over the span: take the nearest rate Linux offers and
    // demand it be within that error (and 1 % for the sampling's jitter).
    let hz_milli = ticks * 1_000_000_000_000 / elapsed_ns.max(1);
    let hz = *HZ_CHOICES
        .iter()
        .min_by_key(|&&hz| (hz * 1000).abs_diff(hz_milli))
        .expect("non-empty");
    let tolerance = hz_milli / ticks + hz * 10;
    if (hz * 1000).abs_diff(hz_milli) > tolerance {
        return Err(FitError::UnknownRate { hz_milli });
    }
    let tick_ns = tick_nsec(hz);
    // Each sample says the tick boundary of its jiffy lies at or before its ktime: the
    // earliest such offset bounds them all.
    let base_ns = samples
        .iter()
        .map(|s| s.ktime_ns.wrapping_sub(s.jiffies.wrapping_mul(tick_ns)))
        .min_by_key(|&base| base.wrapping_sub(first.ktime_ns) as i64)
        .expect("non-empty")
        .wrapping_sub(margin_ns);
    Ok(Fit { tick_ns, base_ns })
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    /// `count` samples 1 ms apart (with some jitter) of a kernel at `hz` whose jiffies count
    /// tick boundaries from `boundary_ns`, starting at `start_jiffies`.
    fn samples(hz: u64, start_jiffies: u64, boundary_ns: u64, count: u64) -> Vec<ClockSample> {
        let tick = tick_nsec(hz);
        (0..count)
            .map(|i| {
                let ktime_ns = boundary_ns + 30_000 + i * 1_000_000 + (i * 7919 % 13) * 1000;
                let jiffies = start_jiffies + (ktime_ns - boundary_ns) / tick;
                ClockSample { jiffies, ktime_ns }
            })
            .collect()
    }

    #[test]
    fn finds_the_common_rates_and_never_leads_the_precise_clock() {
        for hz in [100, 250, 300, 1000] {
            // Jiffies start 5 minutes before their wrap, as the kernel's INITIAL_JIFFIES does.
            let start = (1u64 << 32) - 300 * hz + 7777;
            let samples = samples(hz, start, 50_000_000_000, 100);
            let fit = fit(&samples, 0).unwrap();
            assert_eq!(fit.tick_ns, tick_nsec(hz), "HZ={hz}");
            for s in &samples {
                let coarse = coarse_ns(s.jiffies, fit.tick_ns, fit.base_ns);
                assert!(
                    coarse <= s.ktime_ns,
                    "HZ={hz}: leads by {}",
                    coarse - s.ktime_ns
                );
                assert!(
                    s.ktime_ns - coarse < 2 * fit.tick_ns,
                    "HZ={hz}: trails by {}",
                    s.ktime_ns - coarse
                );
            }
        }
    }

    #[test]
    fn a_margin_moves_the_clock_back() {
        let samples = samples(250, 1 << 32, 9_000_000_000, 50);
        let exact = fit(&samples, 0).unwrap();
        let early = fit(&samples, 100_000).unwrap();
        assert_eq!(exact.base_ns - early.base_ns, 100_000);
    }

    #[test]
    fn refuses_what_it_cannot_fit() {
        assert_eq!(fit(&[], 0), Err(FitError::TooShort));
        let short = samples(250, 1000, 1_000_000_000, 20);
        assert_eq!(fit(&short, 0), Err(FitError::TooShort));
        let mut backwards = samples(250, 1000, 1_000_000_000, 100);
        backwards[50].ktime_ns = 0;
        assert_eq!(fit(&backwards, 0), Err(FitError::NotMonotonic));
        // 512 ticks a second (alpha, mips) is not a rate of x86-64 or arm64.
        let odd: Vec<_> = (0..100)
            .map(|i| ClockSample {
                jiffies: 1000 + i * 512 / 1000,
                ktime_ns: 1_000_000_000 + i * 1_000_000,
            })
            .collect();
        assert!(matches!(fit(&odd, 0), Err(FitError::UnknownRate { .. })));
    }
}
