//! Recovery from kernel events lost to a full ring buffer: once the loss stops, the daemon reads
//! the kernel's connection map and reconciles the tracker with it, so that a burst of openings
//! (thousands of connections in a second) leaves no connection unreported for good.
//!
//! Reading the map costs two syscalls per entry (300–400 ms for 200 000 entries with both
//! cores busy), so a thread of its own walks it ([`Walker`]) and hands the entries over in
//! chunks through a bounded channel; the loop reconciles one chunk per turn
//! (`Tracker::resync_entries`), with the ring buffer, sweeps and API queries served in between.
//! What the tracker hears of meanwhile is newer than the snapshot, and wins over it.
use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use stalltrace_common::ConnState;
use stalltrace_core::{timefmt::monotonic_ns, tracker::Reconciled};
use tokio::sync::mpsc as async_mpsc;

use super::Daemon;
use crate::probes::KernelMaps;

/// Resynchronizations cost one map read per connection: at most one per this many seconds.
const MIN_INTERVAL_NS: u64 = 10_000_000_000;
/// Kernel entries per chunk (272 bytes each: 560 KB): what one turn of the loop reconciles
/// (~2 ms, ~10 ms with both cores busy).
const CHUNK_ENTRIES: usize = 2048;
/// Chunks the walker may be ahead of the loop: it waits for the loop beyond that, so a walk of
/// any size holds ~2 MB.
const CHUNKS_IN_FLIGHT: usize = 4;

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

/// What the walker sends the loop.
pub(super) enum Walked {
    /// The next entries of the map, as read.
    Entries(Vec<(u64, ConnState)>),
    /// The walk is over.
    Done(Walk),
}

/// One walk of the map.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(super) struct Walk {
    /// Entries read.
    pub(super) entries: usize,
    /// Reads that failed (skipped; the first is logged).
    pub(super) failed: usize,
    /// How long the walk took, ms.
    pub(super) walk_ms: u64,
}

/// The loop's handle on the map walker thread.
pub(super) struct Walker {
    /// A walk to do, reading at most this many entries.
    requests: SyncSender<usize>,
}

impl Walker {
    /// Starts the walker on its own handle of the map; what it reads arrives on the returned
    /// receiver.
    pub(super) fn spawn(maps: &KernelMaps) -> Result<(Self, async_mpsc::Receiver<Walked>)> {
        let conns = maps.conns_handle()?;
        let (requests, queue) = mpsc::sync_channel(1);
        let (chunks, receiver) = async_mpsc::channel(CHUNKS_IN_FLIGHT);
        std::thread::Builder::new()
            .name("map-walker".into())
            .spawn(move || run(&conns, &queue, &chunks))
            .context("starting the map walker thread")?;
        Ok((Self { requests }, receiver))
    }

    /// Asks for a walk; false when the walker is busy or gone.
    fn request(&self, bound: usize) -> bool {
        match self.requests.try_send(bound) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Walks the map on request until the loop goes away.
fn run(
    conns: &HashMap<MapData, u64, ConnState>,
    requests: &mpsc::Receiver<usize>,
    chunks: &async_mpsc::Sender<Walked>,
) {
    while let Ok(bound) = requests.recv() {
        let started = Instant::now();
        let mut walk = Walk::default();
        let mut chunk = Vec::with_capacity(CHUNK_ENTRIES);
        for entry in conns.iter().take(bound) {
            match entry {
                Ok(entry) => chunk.push(entry),
                Err(err) => {
                    if walk.failed == 0 {
                        log::warn!("reading the kernel's connection map: {err}");
                    }
                    walk.failed += 1;
                    continue;
                }
            }
            walk.entries += 1;
            if chunk.len() == CHUNK_ENTRIES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_ENTRIES));
                if chunks.blocking_send(Walked::Entries(full)).is_err() {
                    return;
                }
            }
        }
        walk.walk_ms = started.elapsed().as_millis() as u64;
        if !chunk.is_empty() && chunks.blocking_send(Walked::Entries(chunk)).is_err() {
            return;
        }
        if chunks.blocking_send(Walked::Done(walk)).is_err() {
            return;
        }
    }
}

/// The resynchronizations of this run, for `status`.
#[derive(Default)]
pub(super) struct Resyncs {
    /// Started since start-up.
    count: u64,
    /// The one in progress: when it began, and the loss counter then.
    running: Option<(Instant, u64)>,
    last: Option<Last>,
}

/// How the last resynchronization went.
#[derive(Clone, Copy, serde::Serialize)]
struct Last {
    #[serde(flatten)]
    walk: Walk,
    #[serde(flatten)]
    found: Reconciled,
    /// From its start to the last chunk reconciled, ms.
    took_ms: u64,
    /// Ring-buffer records lost in all, when it started.
    lost_before: u64,
}

impl Resyncs {
    /// The `resync` object of `status`.
    pub(super) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "running": self.running.is_some(),
            "last": self.last,
        })
    }
}

impl Daemon {
    /// Once a second: starts a resynchronization when events were lost and the loss stopped.
    pub(super) fn resync_if_due(&mut self, maps: &KernelMaps) {
        if self.resyncs.running.is_some() {
            return;
        }
        let lost = maps.loss().ringbuf_full;
        if !self.resync.due(lost, monotonic_ns()) {
            return;
        }
        let Some(walker) = &self.walker else {
            return;
        };
        // An LRU map iterated while it changes may restart from its first key: bound the walk.
        if !walker.request(2 * self.config.max_conns as usize) {
            return;
        }
        // Nothing reaches the tracker between the request and this: every entry the walker
        // reads is at least as new as the tracker's state when the resync begins.
        self.tracker.begin_resync();
        self.resyncs.count += 1;
        self.resyncs.running = Some((Instant::now(), lost));
    }

    /// A chunk of the map, or the walk's end (`None`: the walker is gone).
    pub(super) fn on_walked(&mut self, walked: Option<Walked>, maps: &KernelMaps) {
        match walked {
            Some(Walked::Entries(entries)) => {
                self.out.clear();
                self.tracker
                    .resync_entries(entries, monotonic_ns(), &mut self.out);
                self.emit(maps);
            }
            Some(Walked::Done(walk)) => self.resync_done(walk),
            None => {
                log::error!(
                    "the map walker thread ended: connections whose events a full ring buffer \
                     loses are no longer recovered"
                );
                self.walker = None;
                self.resync_done(Walk::default());
            }
        }
    }

    fn resync_done(&mut self, walk: Walk) {
        let Some((started, lost)) = self.resyncs.running.take() else {
            return;
        };
        let found = self.tracker.finish_resync();
        let took = started.elapsed();
        log::info!(
            "resynchronized with the kernel after {lost} lost events in total: {} connections \
             recovered, {} to confirm closed, {} newer than the map's entry ({} entries read \
             in {} ms, {} failed; {} ms in all)",
            found.recovered,
            found.vanished,
            found.newer,
            walk.entries,
            walk.walk_ms,
            walk.failed,
            took.as_millis(),
        );
        self.resyncs.last = Some(Last {
            walk,
            found,
            took_ms: took.as_millis() as u64,
            lost_before: lost,
        });
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
