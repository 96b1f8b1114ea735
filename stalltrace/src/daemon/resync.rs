//! Recovery from kernel events lost to a full ring buffer: once the loss stops, the daemon reads
//! the kernel's connection map and reconciles the tracker with it, so that a burst of openings
//! (thousands of connections in a second) leaves no connection unreported for good.
use std::time::Instant;

use aya::maps::{MapData, RingBuf};
use stalltrace_core::timefmt::monotonic_ns;

use super::Daemon;
use crate::probes::KernelMaps;

/// Resynchronizations cost one map read per connection: at most one per this many seconds.
const MIN_INTERVAL_NS: u64 = 10_000_000_000;

/// Decides when to resynchronize, from the kernel's ring-buffer loss counter.
#[derive(Default)]
pub(super) struct ResyncPolicy {
    /// The counter at the previous check.
    seen: u64,
    /// The counter at the last resynchronization.
    synced: u64,
    last_ns: Option<u64>,
}

impl ResyncPolicy {
    /// True when events were lost since the last resynchronization and none in the last check
    /// interval (a resynchronization during the burst would be outdated at once).
    pub(super) fn due(&mut self, ringbuf_full: u64, now_ns: u64) -> bool {
        let quiet = ringbuf_full == self.seen;
        self.seen = ringbuf_full;
        let rested = self
            .last_ns
            .is_none_or(|last| now_ns.saturating_sub(last) >= MIN_INTERVAL_NS);
        if !(quiet && rested && ringbuf_full > self.synced) {
            return false;
        }
        self.synced = ringbuf_full;
        self.last_ns = Some(now_ns);
        true
    }
}

impl Daemon {
    pub(super) fn resync_if_due(&mut self, ring: &mut RingBuf<MapData>, maps: &KernelMaps) {
        let lost = maps.loss().ringbuf_full;
        if !self.resync.due(lost, monotonic_ns()) {
            return;
        }
        // Events already delivered first: the snapshot is then newer than the tracker.
        self.drain(ring, maps);
        let started = Instant::now();
        // An LRU map iterated while it changes may restart from its first key: bound the walk.
        let bound = 2 * self.config.max_conns as usize;
        let snapshot = maps.conns.iter().take(bound).filter_map(Result::ok);
        self.out.clear();
        let found = self
            .tracker
            .reconcile(snapshot, monotonic_ns(), &mut self.out);
        self.emit(maps);
        log::info!(
            "resynchronized with the kernel after {lost} lost events in total: {} connections \
             recovered, {} to confirm closed ({} ms)",
            found.recovered,
            found.vanished,
            started.elapsed().as_millis()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn waits_for_the_loss_to_stop() {
        let mut policy = ResyncPolicy::default();
        assert!(!policy.due(0, SEC), "nothing lost");
        assert!(!policy.due(500, 2 * SEC), "still losing");
        assert!(!policy.due(900, 3 * SEC), "still losing");
        assert!(policy.due(900, 4 * SEC), "quiet for one check");
        assert!(!policy.due(900, 5 * SEC), "already resynchronized");
    }

    #[test]
    fn resynchronizes_at_most_every_ten_seconds() {
        let mut policy = ResyncPolicy::default();
        policy.due(10, SEC);
        assert!(policy.due(10, 2 * SEC));
        policy.due(20, 3 * SEC);
        assert!(!policy.due(20, 4 * SEC), "too soon");
        assert!(policy.due(20, 12 * SEC));
    }
}
