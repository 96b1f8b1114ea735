//! Loss accounting: everything the daemon failed to observe or deliver is counted by cause and
//! surfaced in `status` and in periodic `loss` events. Nothing is dropped silently.
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}

impl LossCounters {
    pub fn total(&self) -> u64 {
        self.fields().iter().sum()
    }

    fn fields(&self) -> [u64; 8] {
        [
            self.kernel_ringbuf_full,
            self.kernel_conn_insert_failed,
            self.conn_evicted,
            self.close_unseen,
            self.malformed_records,
            self.events_write_failed,
            self.watch_dropped,
            self.output_blocked,
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
    }
}
