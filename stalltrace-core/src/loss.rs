//! Loss accounting: everything the daemon failed to observe or deliver is counted by cause and
//! surfaced in `status` and in periodic `loss` events. Nothing is dropped silently.
use serde::{Deserialize, Serialize};

/// Every userspace table is bounded; what a full table turns away or evicts is counted here
/// too (the last causes), next to what the kernel and the event output lost.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct LossCounters {
    /// Kernel events dropped because the ring buffer was full.
    pub kernel_ringbuf_full: u64,
    /// Connections the kernel could not start tracking (map insert failed).
    pub kernel_conn_insert_failed: u64,
    /// Connections whose kernel state was evicted from the full connection map.
    pub conn_evicted: u64,
    /// Connections whose close was never observed.
    pub close_unseen: u64,
    /// Ring buffer records that could not be decoded.
    pub malformed_records: u64,
    /// Events not written to the events file or stdout (write errors).
    pub events_write_failed: u64,
    /// Event lines dropped for `watch` clients that read too slowly.
    pub watch_dropped: u64,
    /// Event lines dropped because stdout or the events file did not keep up.
    pub output_blocked: u64,
    /// Requests and stalls counted in an `(other signatures)` group of `why` because its
    /// group table was full.
    pub why_groups_evicted: u64,
    /// Request samples `why` did not take because too many were awaiting their completion.
    pub why_samples_dropped: u64,
    /// Binaries evicted from the symbol cache (re-read when needed again).
    pub symbol_cache_evicted: u64,
    /// Spinning threads whose stack was not sampled because the most threads were sampled.
    pub stack_threads_unsampled: u64,
    /// Stalls (or threads about to stall) not diagnosed because the most were open.
    pub diagnoses_dropped: u64,
}

/// The causes with something lost, as `cause=count` pairs: for log lines.
impl std::fmt::Display for LossCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        let mut first = true;
        for (cause, count) in value.as_object().into_iter().flatten() {
            if count.as_u64().unwrap_or(0) == 0 {
                continue;
            }
            let separator = if first { "" } else { ", " };
            write!(f, "{separator}{cause}={count}")?;
            first = false;
        }
        Ok(())
    }
}

impl LossCounters {
    pub fn total(&self) -> u64 {
        self.fields().iter().sum()
    }

    /// Losses that may have been any connection's events or state: they make stalls'
    /// diagnoses `partial`. A close never seen is one known connection's (it is closed as
    /// lost), and the bounded tables' and the output's losses lose no kernel state.
    pub fn tracking(&self) -> u64 {
        self.kernel_ringbuf_full
            + self.kernel_conn_insert_failed
            + self.conn_evicted
            + self.malformed_records
    }

    fn fields(&self) -> [u64; 13] {
        [
            self.kernel_ringbuf_full,
            self.kernel_conn_insert_failed,
            self.conn_evicted,
            self.close_unseen,
            self.malformed_records,
            self.events_write_failed,
            self.watch_dropped,
            self.output_blocked,
            self.why_groups_evicted,
            self.why_samples_dropped,
            self.symbol_cache_evicted,
            self.stack_threads_unsampled,
            self.diagnoses_dropped,
        ]
    }

    /// What was lost since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            kernel_ringbuf_full: self
                .kernel_ringbuf_full
                .saturating_sub(earlier.kernel_ringbuf_full),
            kernel_conn_insert_failed: self
                .kernel_conn_insert_failed
                .saturating_sub(earlier.kernel_conn_insert_failed),
            conn_evicted: self.conn_evicted.saturating_sub(earlier.conn_evicted),
            close_unseen: self.close_unseen.saturating_sub(earlier.close_unseen),
            malformed_records: self
                .malformed_records
                .saturating_sub(earlier.malformed_records),
            events_write_failed: self
                .events_write_failed
                .saturating_sub(earlier.events_write_failed),
            watch_dropped: self.watch_dropped.saturating_sub(earlier.watch_dropped),
            output_blocked: self.output_blocked.saturating_sub(earlier.output_blocked),
            why_groups_evicted: self
                .why_groups_evicted
                .saturating_sub(earlier.why_groups_evicted),
            why_samples_dropped: self
                .why_samples_dropped
                .saturating_sub(earlier.why_samples_dropped),
            symbol_cache_evicted: self
                .symbol_cache_evicted
                .saturating_sub(earlier.symbol_cache_evicted),
            stack_threads_unsampled: self
                .stack_threads_unsampled
                .saturating_sub(earlier.stack_threads_unsampled),
            diagnoses_dropped: self
                .diagnoses_dropped
                .saturating_sub(earlier.diagnoses_dropped),
        }
    }
}

/// The body of a `loss` event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossReport {
    /// Lost since the previous `loss` event.
    pub new: LossCounters,
    /// Lost since the daemon started.
    pub total: LossCounters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_and_totals() {
        let earlier = LossCounters {
            kernel_ringbuf_full: 5,
            watch_dropped: 1,
            ..Default::default()
        };
        let now = LossCounters {
            kernel_ringbuf_full: 8,
            watch_dropped: 1,
            close_unseen: 2,
            ..Default::default()
        };
        let delta = now.since(&earlier);
        assert_eq!(delta.kernel_ringbuf_full, 3);
        assert_eq!(delta.watch_dropped, 0);
        assert_eq!(delta.close_unseen, 2);
        assert_eq!(delta.total(), 5);
        assert_eq!(now.total(), 11);
        // The closes never seen are two known connections', not anyone's state.
        assert_eq!(now.tracking(), 8);
        let evicted = LossCounters {
            symbol_cache_evicted: 4,
            ..now
        };
        assert_eq!(evicted.since(&now).symbol_cache_evicted, 4);
        assert_eq!(evicted.since(&now).tracking(), 0);
        // Older daemons' answers lack the new causes.
        let old: LossCounters = serde_json::from_str(r#"{"kernel_ringbuf_full":1}"#).unwrap();
        assert_eq!(old.total(), 1);
    }

    #[test]
    fn log_lines_name_only_what_was_lost() {
        let lost = LossCounters {
            close_unseen: 4,
            output_blocked: 2,
            ..Default::default()
        };
        assert_eq!(lost.to_string(), "close_unseen=4, output_blocked=2");
        assert_eq!(lost.tracking(), 0, "neither makes other stalls partial");
    }
}
