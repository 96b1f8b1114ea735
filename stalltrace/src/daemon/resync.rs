//! Recovery from kernel events lost to a full ring buffer: once the loss stops, the daemon reads
//! the kernel's connection map and reconciles the tracker with it, so that a burst of openings
//! (thousands of connections in a second) leaves no connection unreported for good.
//!
//! Reading the map entry by entry costs two syscalls per entry (315–413 ms for 200 000 entries
//! with both cores busy; batches of 2 048 cut that to one per batch), so a thread of its own
//! walks it ([`Walker`]) and hands the entries over in chunks through a bounded channel; the
//! loop reconciles one chunk per turn
//! (`Tracker::resync_entries`), with the ring buffer, sweeps and API queries served in between.
//! A connection the tracker sees close or replaced meanwhile has its older map entry passed over.
//! Connections adopted at start-up and not seen since are not in the map: the walker then reads
//! /proc for their sockets, and those gone are closed (`Tracker::retire_adopted`).
use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use stalltrace_common::ConnState;
use stalltrace_core::{
    timefmt::monotonic_ns,
    tracker::{model::Endpoints, Reconciled},
};
use tokio::sync::mpsc as async_mpsc;

use super::Daemon;
use crate::{probes::KernelMaps, sources::procfs};

/// The loss must have stopped this long before a resynchronization starts (one during the burst
/// would be outdated at once).
const QUIET_NS: u64 = 250_000_000;
/// Resynchronizations rest at least this long between them (counted from the start of the
/// last), and ten times the CPU time the last walk took (batch reads: 70-95 ms for 200 000
/// entries with both cores busy; entry by entry, before Linux 5.6, 300-400 ms), so that
/// repeated losses cost the walker 10 % of a core at most. A first walk that started in a
/// lull of the burst must not put the one after it off much beyond the burst's end.
const MIN_REST_NS: u64 = 500_000_000;
const REST_PER_WALK: u64 = 10;
/// Kernel entries per batch read (272 bytes each: 560 KB).
const BATCH_ENTRIES: usize = 2048;
/// Kernel entries per chunk: what one turn of the loop reconciles (~0.6 ms, ~3 ms with both
/// cores busy). A turn of 2 048 took 12 ms of CPU in a burst that held both cores, and 100 ms
/// of wall-clock time waiting for them: the loop's turns must stay short in CPU time for the
/// drains and queries between them to come in time.
const CHUNK_ENTRIES: usize = 512;
/// Chunks the walker may be ahead of the loop: it waits for the loop beyond that, so a walk of
/// any size holds ~2 MB.
const CHUNKS_IN_FLIGHT: usize = 16;

/// Decides when to resynchronize, from the kernel's ring-buffer loss counter, checked at every
/// sweep.
#[derive(Default)]
pub(super) struct ResyncPolicy {
    /// The counter as last seen, and when it was first seen at that value.
    seen: u64,
    seen_since_ns: u64,
    /// The counter at the last resynchronization.
    synced: u64,
    /// When the last one started, and how long to rest after it.
    last_ns: Option<u64>,
    rest_ns: u64,
}

impl ResyncPolicy {
    /// True when events were lost since the last resynchronization, none for [`QUIET_NS`],
    /// and the last one has rested long enough.
    pub(super) fn due(&mut self, ringbuf_full: u64, now_ns: u64) -> bool {
        if ringbuf_full != self.seen {
            self.seen = ringbuf_full;
            self.seen_since_ns = now_ns;
            return false;
        }
        let quiet = now_ns.saturating_sub(self.seen_since_ns) >= QUIET_NS;
        let rested = self
            .last_ns
            .is_none_or(|last| now_ns.saturating_sub(last) >= self.rest_ns.max(MIN_REST_NS));
        if !(quiet && rested && ringbuf_full > self.synced) {
            return false;
        }
        self.synced = ringbuf_full;
        self.last_ns = Some(now_ns);
        true
    }

    /// The walk took `walk_cpu_ns` of CPU: the next one waits ten times that.
    pub(super) fn walked(&mut self, walk_cpu_ns: u64) {
        self.rest_ns = walk_cpu_ns.saturating_mul(REST_PER_WALK);
    }
}

/// What the walker sends the loop.
pub(super) enum Walked {
    /// The next entries of the map, as read.
    Entries(Vec<(u64, ConnState)>),
    /// The walk is over; then the adopted connections found gone (their sockets closed).
    Done(Walk, Vec<Endpoints>),
}

/// A walk to do.
struct Request {
    /// Entries to read at most.
    bound: usize,
    /// Connections adopted at start-up that no kernel record has taken over: the kernel map
    /// does not hold them, so after the walk the walker reads /proc for their sockets (a lost
    /// close record would otherwise leave them listed for ever).
    adopted: Vec<Endpoints>,
}

/// One walk of the map.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(super) struct Walk {
    /// Entries read.
    pub(super) entries: usize,
    /// Reads that failed (skipped; the first is logged).
    pub(super) failed: usize,
    /// How long the walk took, ms (waits for the loop to take chunks included).
    pub(super) walk_ms: u64,
    /// CPU time the walker spent, µs: what the rest between walks is proportioned to.
    pub(super) walk_cpu_us: u64,
    /// Read in batches (`BPF_MAP_LOOKUP_BATCH`), else entry by entry.
    pub(super) batches: bool,
}

/// The loop's handle on the map walker thread.
pub(super) struct Walker {
    requests: SyncSender<Request>,
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
    fn request(&self, bound: usize, adopted: Vec<Endpoints>) -> bool {
        match self.requests.try_send(Request { bound, adopted }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Walks the map on request until the loop goes away.
fn run(
    conns: &HashMap<MapData, u64, ConnState>,
    requests: &mpsc::Receiver<Request>,
    chunks: &async_mpsc::Sender<Walked>,
) {
    let mut batches = true;
    while let Ok(Request { bound, adopted }) = requests.recv() {
        let started = Instant::now();
        let cpu_started = super::turns::thread_cpu_us();
        let mut walk = Walk {
            batches,
            ..Walk::default()
        };
        let mut send = |chunk: Vec<(u64, ConnState)>| chunks.blocking_send(Walked::Entries(chunk));
        let walked = if batches {
            walk_in_batches(conns, bound, &mut walk, &mut send)
        } else {
            Err(WalkError::Unsupported)
        };
        let walked = match walked {
            Err(WalkError::Unsupported) => {
                // Before Linux 5.6, or a kernel that refuses it: one entry at a time.
                batches = false;
                walk.batches = false;
                walk_by_entry(conns, bound, &mut walk, &mut send)
            }
            other => other,
        };
        let gone = if adopted.is_empty() || walked.is_err() {
            Vec::new()
        } else {
            procfs::gone_connections(&adopted)
        };
        walk.walk_ms = started.elapsed().as_millis() as u64;
        walk.walk_cpu_us = super::turns::thread_cpu_us().saturating_sub(cpu_started);
        if walked.is_err() || chunks.blocking_send(Walked::Done(walk, gone)).is_err() {
            return; // the loop is gone
        }
    }
}

enum WalkError {
    /// Batch reads are not available: walk otherwise.
    Unsupported,
    /// The loop went away.
    Closed,
}

impl<T> From<async_mpsc::error::SendError<T>> for WalkError {
    fn from(_: async_mpsc::error::SendError<T>) -> Self {
        Self::Closed
    }
}

/// `BPF_MAP_LOOKUP_BATCH`'s arguments (`union bpf_attr`, `batch`).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Reads the map `BATCH_ENTRIES` entries per syscall (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6),
/// where entry by entry takes two per entry: 200 000 entries in tens of ms, not 0.6–0.9 s.
fn walk_in_batches(
    conns: &HashMap<MapData, u64, ConnState>,
    bound: usize,
    walk: &mut Walk,
    send: &mut impl FnMut(Vec<(u64, ConnState)>) -> Result<(), async_mpsc::error::SendError<Walked>>,
) -> Result<(), WalkError> {
    use aya::maps::IterableMap as _;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = conns.map().fd().as_fd().as_raw_fd();
    let mut keys = vec![0u64; BATCH_ENTRIES];
    let mut values = vec![ConnState::default(); BATCH_ENTRIES];
    // The kernel's place in the hash table (a bucket index) between calls.
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    while walk.entries < bound {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const in_batch as u64 },
            out_batch: &raw mut out_batch as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ENTRIES as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute points at buffers of `count` keys and values of the map's
        // sizes (u64, ConnState) and at two u32 batch tokens (a hash map's), all alive for the
        // call; the kernel writes nothing else.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let end = ret < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        if ret < 0 && !end {
            let err = std::io::Error::last_os_error();
            if first {
                log::debug!("batch reads of the connection map: {err}; reading entry by entry");
                return Err(WalkError::Unsupported);
            }
            // Mid-walk (a bucket larger than a chunk, ENOSPC, or the map changing under
            // the walk): what was read stands; the rest waits for the next resync.
            log::warn!("reading the kernel's connection map: {err}");
            walk.failed += 1;
            return Ok(());
        }
        first = false;
        let read = (attr.count as usize).min(BATCH_ENTRIES);
        walk.entries += read;
        for (keys, values) in keys[..read]
            .chunks(CHUNK_ENTRIES)
            .zip(values[..read].chunks(CHUNK_ENTRIES))
        {
            send(keys.iter().copied().zip(values.iter().copied()).collect())?;
        }
        if end {
            return Ok(());
        }
        in_batch = out_batch;
    }
    Ok(())
}

/// Reads the map one entry at a time (two syscalls each).
fn walk_by_entry(
    conns: &HashMap<MapData, u64, ConnState>,
    bound: usize,
    walk: &mut Walk,
    send: &mut impl FnMut(Vec<(u64, ConnState)>) -> Result<(), async_mpsc::error::SendError<Walked>>,
) -> Result<(), WalkError> {
    let mut chunk = Vec::with_capacity(CHUNK_ENTRIES);
    // An LRU map iterated while it changes may restart from its first key: `bound` ends it.
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
            send(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(CHUNK_ENTRIES),
            ))?;
        }
    }
    if !chunk.is_empty() {
        send(chunk)?;
    }
    Ok(())
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
    /// Connections adopted at start-up whose sockets were found closed (/proc), their close
    /// record lost: closed as never seen.
    adopted_closed: usize,
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
    /// At every sweep: starts a resynchronization when events were lost and the loss stopped.
    pub(super) fn resync_if_due(&mut self, maps: &KernelMaps) {
        if self.resyncs.running.is_some() {
            return;
        }
        let lost = maps.ringbuf_full();
        if !self.resync.due(lost, monotonic_ns()) {
            return;
        }
        let Some(walker) = &self.walker else {
            return;
        };
        // A map walked while it changes may see entries twice: bound the walk.
        let adopted = self.tracker.adopted_endpoints();
        if !walker.request(2 * self.config.max_conns as usize, adopted) {
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
            Some(Walked::Done(walk, gone)) => {
                self.resync.walked(walk.walk_cpu_us * 1_000);
                self.resync_done(walk, gone, maps);
            }
            None => {
                log::error!(
                    "the map walker thread ended: connections whose events a full ring buffer \
                     loses are no longer recovered"
                );
                self.walker = None;
                self.resync_done(Walk::default(), Vec::new(), maps);
            }
        }
    }

    fn resync_done(&mut self, walk: Walk, gone: Vec<Endpoints>, maps: &KernelMaps) {
        let Some((started, lost)) = self.resyncs.running.take() else {
            return;
        };
        let found = self.tracker.finish_resync();
        self.out.clear();
        let adopted_closed = self
            .tracker
            .retire_adopted(gone, monotonic_ns(), &mut self.out);
        self.emit(maps);
        let took = started.elapsed();
        log::info!(
            "resynchronized with the kernel after {lost} lost events in total: {} connections \
             recovered, {} to confirm closed, {} closed or replaced since read, {adopted_closed} \
             adopted at start-up found closed ({} entries read {} in {} ms, {} µs of CPU, {} \
             failed; {} ms in all)",
            found.recovered,
            found.vanished,
            found.superseded,
            walk.entries,
            if walk.batches {
                "in batches"
            } else {
                "one by one"
            },
            walk.walk_ms,
            walk.walk_cpu_us,
            walk.failed,
            took.as_millis(),
        );
        self.resyncs.last = Some(Last {
            walk,
            found,
            adopted_closed,
            took_ms: took.as_millis() as u64,
            lost_before: lost,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    const MS: u64 = 1_000_000;

    #[test]
    fn waits_for_the_loss_to_stop() {
        let mut policy = ResyncPolicy::default();
        assert!(!policy.due(0, SEC), "nothing lost");
        assert!(!policy.due(500, SEC + 250 * MS), "still losing");
        assert!(!policy.due(900, SEC + 500 * MS), "still losing");
        assert!(!policy.due(900, SEC + 700 * MS), "quiet for 200 ms only");
        assert!(policy.due(900, SEC + 750 * MS), "quiet for 250 ms");
        assert!(!policy.due(900, 5 * SEC), "already resynchronized");
    }

    #[test]
    fn rests_ten_times_the_last_walk_and_at_least_half_a_second() {
        let mut policy = ResyncPolicy::default();
        policy.due(10, 0);
        assert!(policy.due(10, SEC));
        policy.walked(20 * MS);
        policy.due(20, SEC + 100 * MS);
        assert!(
            !policy.due(20, SEC + 400 * MS),
            "too soon: half a second's rest"
        );
        assert!(policy.due(20, SEC + 500 * MS));
        // Entry by entry, a walk of 400 ms: 4 s of rest.
        policy.walked(400 * MS);
        policy.due(30, 2 * SEC);
        assert!(!policy.due(30, 5 * SEC));
        assert!(policy.due(30, 5 * SEC + 500 * MS));
    }
}
