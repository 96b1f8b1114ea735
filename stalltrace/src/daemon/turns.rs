//! How long the event loop is kept from everything else. The loop runs one job per turn (a
//! drain, a sweep, an API query, a chunk of a resynchronization…); while a turn runs, nothing
//! else on the thread does: not the ring buffer, not the API task. The longest turn, and what
//! it was doing, is what `status` reports as `loop` (docs/api.md).
use std::time::Duration;

/// Turns this long are logged (debug).
const SLOW_TURN_US: u64 = 100_000;

/// What a turn of the loop did (`loop.max_blocked_in` in `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Job {
    /// A signal: shutdown, or SIGHUP's reopen and reload.
    Signal,
    /// Records read from the ring buffer.
    Drain,
    /// A sweep of the watched connections (with the drain before it).
    Sweep,
    /// The once-a-second work: loss report, metrics, compaction.
    Housekeeping,
    /// Part of a resynchronization: a chunk of the kernel map reconciled, or its end.
    Resync,
    /// An API query answered (all but `conns`).
    Query,
    /// Chunks of streamed `conns` answers made.
    ConnsChunks,
    /// Diagnoses received from the worker.
    Findings,
    /// The event clock recalibrated.
    Recalibrate,
}

/// The longest turn of a stretch, and its job.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(super) struct Longest {
    /// Wall-clock time, µs.
    pub(super) max_blocked_us: u64,
    /// `None` before the first turn.
    pub(super) max_blocked_in: Option<Job>,
    /// CPU time the loop's thread ran during that turn, µs: far below `max_blocked_us` when
    /// the thread waited for a CPU (both cores busy elsewhere), not on its own work.
    pub(super) max_blocked_cpu_us: u64,
}

impl Longest {
    fn record(&mut self, job: Job, took_us: u64, cpu_us: u64) {
        if self.max_blocked_in.is_none() || took_us > self.max_blocked_us {
            self.max_blocked_us = took_us;
            self.max_blocked_in = Some(job);
            self.max_blocked_cpu_us = cpu_us;
        }
    }
}

/// CPU time of the calling thread, µs.
pub(super) fn thread_cpu_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// The loop's turns: how many, and the longest since start and since the last `status`.
#[derive(Default)]
pub(super) struct Turns {
    count: u64,
    since_start: Longest,
    since_status: Longest,
}

impl Turns {
    /// A turn of `job` that took `took` of wall-clock time and `cpu_us` of the thread's CPU.
    pub(super) fn record(&mut self, job: Job, took: Duration, cpu_us: u64) {
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
        self.since_start.record(job, took_us, cpu_us);
        self.since_status.record(job, took_us, cpu_us);
        if took_us >= SLOW_TURN_US {
            log::debug!("the loop was blocked {took_us} µs by {job:?} ({cpu_us} µs on a CPU)");
        }
    }

    /// The `loop` object of `status`.
    pub(super) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "turns": self.count,
            "max_blocked_us": self.since_start.max_blocked_us,
            "max_blocked_in": self.since_start.max_blocked_in,
            "max_blocked_cpu_us": self.since_start.max_blocked_cpu_us,
            "since_last_status": self.since_status,
        })
    }

    /// A `status` was answered: the next one's `since_last_status` starts now.
    pub(super) fn status_taken(&mut self) {
        self.since_status = Longest::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_longest_turn_since_start_and_since_the_last_status() {
        let mut turns = Turns::default();
        assert_eq!(turns.status()["max_blocked_in"], serde_json::Value::Null);
        turns.record(Job::Drain, Duration::from_micros(300), 300);
        turns.record(Job::Sweep, Duration::from_millis(40), 12_000);
        turns.record(Job::Query, Duration::from_millis(2), 2_000);
        let status = turns.status();
        assert_eq!(status["turns"], 3);
        assert_eq!(status["max_blocked_us"], 40_000);
        assert_eq!(status["max_blocked_in"], "sweep");
        assert_eq!(
            status["max_blocked_cpu_us"], 12_000,
            "the CPU time of that turn"
        );
        assert_eq!(status["since_last_status"]["max_blocked_in"], "sweep");
        turns.status_taken();
        turns.record(Job::Resync, Duration::from_millis(5), 5_000);
        let status = turns.status();
        assert_eq!(status["max_blocked_in"], "sweep", "since start: kept");
        assert_eq!(status["since_last_status"]["max_blocked_us"], 5_000);
        assert_eq!(status["since_last_status"]["max_blocked_in"], "resync");
    }
}
