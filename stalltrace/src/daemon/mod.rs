//! `stalltrace daemon`: loads the programs, then one loop owns all state and runs, in turn,
//! the ring buffer drain, the stall sweep (with the diagnosis of new and open stalls), the scan
//! for unread requests, loss reports and API queries.
mod queries;
mod resync;
mod stall_diagnosis;
mod timelines;
mod unread;
mod why_samples;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use stalltrace_common::{Capture, ConnEvent, Offsets};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use stalltrace_core::{
    loss::{LossCounters, LossReport},
    timefmt::monotonic_ns,
    tracker::{Event, Tracker},
    why::Why,
};

use crate::{
    diagnosis::Diagnoser,
    heap,
    probes::{KernelMaps, ProbeConfig, Probes},
    sinks::{
        api_server::{Answer, ApiServer, Query},
        ndjson::EventSink,
    },
    sources::{btf, procfs, tracefs},
};

pub struct DaemonConfig {
    pub stall_after: Duration,
    pub events_file: Option<PathBuf>,
    pub socket: PathBuf,
    pub max_conns: u32,
    pub ring_buffer_bytes: u32,
    pub bpf_stats: bool,
    /// Request bytes captured at each request start (0: off).
    pub capture_bytes: u32,
    /// Include captured bytes (hex) in stall reports, not only their signature.
    pub capture_raw: bool,
    /// What request signatures may reveal (previews, templated paths).
    pub privacy: stalltrace_core::protocols::Privacy,
}

/// How often the ring buffer is drained when the kernel does not wake the daemon (it does
/// when the buffer is a quarter full).
const DRAIN_EVERY: Duration = Duration::from_millis(50);
const LOSS_REPORT_EVERY: Duration = Duration::from_secs(1);
/// Kernel entries read per sweep at most (one syscall each, ~1 µs): bounds a sweep to ~20 ms
/// after a burst of new connections.
const SWEEP_BUDGET: usize = 20_000;
const RECALIBRATE_EVERY: Duration = Duration::from_secs(10);

/// Sweeps often enough that a stall is reported well within a second of crossing the
/// threshold, and at least five times per threshold.
pub fn sweep_interval(stall_after: Duration) -> Duration {
    (stall_after / 5).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

pub async fn run(config: DaemonConfig) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "stalltrace daemon loads eBPF programs and needs root (CAP_BPF, CAP_PERFMON and \
             CAP_SYS_ADMIN); run it as root, e.g. `sudo stalltrace daemon`"
        );
    }
    if config.stall_after.is_zero() {
        bail!("--stall-after must be greater than zero");
    }
    let tracefs_root = tracefs::ensure_mounted()?;
    let offsets = kernel_offsets();
    let listening = procfs::listening_ports(&procfs::tcp_sockets());
    // Bind first: a second daemon must fail before it loads anything.
    let api = ApiServer::bind(&config.socket)?;
    let stall_after_ns = config.stall_after.as_nanos() as u64;
    let probe_config = ProbeConfig {
        stall_after_ns,
        max_conns: config.max_conns,
        ring_buffer_bytes: config.ring_buffer_bytes,
        offsets,
        bpf_stats: config.bpf_stats,
        capture_bytes: config.capture_bytes,
    };
    let mut probes = Probes::load(&tracefs_root, &probe_config, &listening)?;
    let mut sink = EventSink::open(config.events_file.as_deref())?;
    let mut tracker = Tracker::new(stall_after_ns);
    tracker.set_sweep_budget(SWEEP_BUDGET);

    // Adopt after attaching: a connection that closes in between is reported by the kernel.
    let mut out = Vec::new();
    let adoptions = procfs::adoptions(&procfs::tcp_sockets());
    let adopted = adoptions.len();
    for adoption in adoptions {
        tracker.adopt(adoption, monotonic_ns(), &mut out);
    }
    sink.write_events(&out);
    sink.flush();
    // Start-up (BTF, /proc, program loading) leaves freed heap behind.
    heap::release_free_memory();
    // Everything that needs root at start-up is done: keep only what run time needs. Before
    // any thread starts (capabilities are per thread).
    let privileges = crate::privileges::drop_to_runtime().context("dropping privileges")?;

    let (queries_tx, queries) = mpsc::channel(64);
    let watch_dropped = Arc::new(AtomicU64::new(0));
    let socket = api.spawn(queries_tx, sink.watchers(), watch_dropped.clone());
    log::info!(
        "privileges dropped: keeping {} only; no_new_privs set",
        privileges.capabilities.join(", ")
    );
    log::info!(
        "stalltrace {} running: {} hooks attached, {} connections adopted, stall threshold {:?}; \
         events to {}; API on {}",
        env!("CARGO_PKG_VERSION"),
        probes.attached_count(),
        adopted,
        config.stall_after,
        sink.destination(),
        socket.display(),
    );

    let ring = probes
        .maps
        .events
        .take()
        .expect("ring buffer map taken once");
    // SAFETY: the ring buffer map owns its fd and keeps it open for as long as the AsyncFd.
    let ring = unsafe { AsyncFd::register(ring) }.context("polling the ring buffer")?;
    let mut daemon = Daemon {
        diagnoser: Diagnoser::new(stall_after_ns, config.capture_raw, config.privacy),
        symbolizer: crate::sources::symbols::Symbolizer::default(),
        why: Why::new(),
        timelines: timelines::Timelines::default(),
        next_refresh_ns: 0,
        next_unread_scan_ns: 0,
        tracker,
        sink,
        started: Instant::now(),
        offsets,
        config,
        epoch: 1,
        watch_dropped,
        malformed: 0,
        reported_loss: LossCounters::default(),
        resync: resync::ResyncPolicy::default(),
        sweeps: 0,
        sweep_busy: Duration::ZERO,
        sweep_max: Duration::ZERO,
        out,
        privileges,
        streams: std::collections::VecDeque::new(),
        unsampled: std::collections::HashSet::new(),
        stack_threads_unsampled: 0,
    };
    let result = daemon.main_loop(&mut probes, ring, queries).await;
    daemon.sink.flush();
    if let Err(err) = std::fs::remove_file(&socket) {
        log::warn!("removing {}: {err}", socket.display());
    }
    log::info!("stopped; programs detached");
    result
}

fn kernel_offsets() -> Offsets {
    let lost = "connections open before the daemon started are not adopted";
    match btf::from_kernel() {
        Ok(kernel_btf) => {
            let (offsets, missing) = btf::resolve_offsets(&kernel_btf);
            if !missing.is_empty() {
                log::warn!("kernel BTF lacks {}: {lost}", missing.join(", "));
            }
            offsets
        }
        Err(err) => {
            log::warn!("{err:#}: {lost}");
            Offsets::unknown()
        }
    }
}

struct Daemon {
    tracker: Tracker,
    diagnoser: Diagnoser,
    symbolizer: crate::sources::symbols::Symbolizer,
    why: Why,
    timelines: timelines::Timelines,
    next_refresh_ns: u64,
    next_unread_scan_ns: u64,
    sink: EventSink,
    started: Instant,
    offsets: Offsets,
    config: DaemonConfig,
    epoch: u32,
    watch_dropped: Arc<AtomicU64>,
    malformed: u64,
    reported_loss: LossCounters,
    resync: resync::ResyncPolicy,
    sweeps: u64,
    sweep_busy: Duration,
    sweep_max: Duration,
    /// Reused output buffer.
    out: Vec<Event>,
    /// What the daemon runs with after start-up.
    privileges: crate::privileges::Privileges,
    /// `conns` answers being streamed, oldest first (served one at a time).
    streams: std::collections::VecDeque<queries::ConnsStream>,
    /// Spinning threads refused stack sampling (the most are sampled), until they stop
    /// spinning; and how many were, in all.
    unsampled: std::collections::HashSet<u32>,
    stack_threads_unsampled: u64,
}

impl Daemon {
    async fn main_loop(
        &mut self,
        probes: &mut Probes,
        mut ring: AsyncFd<RingBuf<MapData>>,
        mut queries: mpsc::Receiver<Query>,
    ) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        let mut sweep = tokio::time::interval(sweep_interval(self.config.stall_after));
        let mut loss = tokio::time::interval(LOSS_REPORT_EVERY);
        let mut recalibrate = tokio::time::interval(RECALIBRATE_EVERY);
        for timer in [&mut drain, &mut sweep, &mut loss, &mut recalibrate] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            // The `conns` answer being streamed, if any: a chunk is made when its client can
            // take one.
            let next_stream = self.streams.front().map(|s| s.chunks.clone());
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("polling the ring buffer")?;
                    self.drain(guard.get_inner_mut(), &probes.maps);
                    guard.clear_ready();
                }
                _ = drain.tick() => self.drain(ring.get_mut(), &probes.maps),
                _ = sweep.tick() => {
                    self.drain(ring.get_mut(), &probes.maps);
                    self.sweep(probes)?;
                }
                _ = loss.tick() => {
                    self.report_loss(&probes.maps);
                    self.resync_if_due(ring.get_mut(), &probes.maps);
                    self.compact();
                }
                _ = recalibrate.tick() => self.sink.recalibrate(),
                Some(query) = queries.recv() => match query.command {
                    stalltrace_core::api::Command::Conns { filter } => {
                        let chunks = self.stream_conns(&filter);
                        let _ = query.reply.send(Answer::Items(chunks));
                    }
                    command => {
                        let response = self.answer(command, probes);
                        let _ = query.reply.send(Answer::Whole(response));
                    }
                },
                permit = queries::next_permit(&next_stream) => {
                    self.send_conns_chunk(permit, &probes.maps);
                }
            }
        }
        // Deliver what the kernel reported before the signal.
        self.drain(ring.get_mut(), &probes.maps);
        self.report_loss(&probes.maps);
        Ok(())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>, maps: &KernelMaps) {
        self.out.clear();
        while let Some(record) = ring.next() {
            match ConnEvent::from_bytes(&record) {
                Some(event) => {
                    self.tracker.on_event(&event, &mut self.out);
                    self.sample_exchange(&event, Capture::from_record_tail(&record));
                }
                None => self.malformed += 1,
            }
        }
        self.emit(maps);
    }

    fn sweep(&mut self, probes: &mut Probes) -> Result<()> {
        let started = Instant::now();
        self.epoch += 1;
        probes.maps.set_epoch(self.epoch)?;
        let maps = &probes.maps;
        self.out.clear();
        let now = monotonic_ns();
        self.tracker
            .sweep(now, self.epoch, |sock| maps.lookup(sock), &mut self.out);
        if now >= self.next_unread_scan_ns {
            self.scan_unread(now);
        }
        if now >= self.next_refresh_ns {
            self.next_refresh_ns = now + crate::diagnosis::REFRESH_EVERY_NS;
            self.refresh_stalls(maps, now);
            self.update_stacks(probes, now);
        }
        self.emit(&probes.maps);
        // After the new stalls took their thread's first sample in `emit`.
        self.diagnoser.presample(&self.tracker, now);
        let took = started.elapsed();
        self.sweeps += 1;
        self.sweep_busy += took;
        self.sweep_max = self.sweep_max.max(took);
        Ok(())
    }

    /// Gives back buffer space a burst left behind, and the heap it freed.
    fn compact(&mut self) {
        let mut shrunk = self.tracker.compact();
        if self.out.capacity() > 4096 {
            self.out = Vec::with_capacity(1024);
            shrunk = true;
        }
        if shrunk {
            heap::release_free_memory();
        }
    }

    fn emit(&mut self, maps: &KernelMaps) {
        if !self.out.is_empty() {
            self.annotate(maps);
            self.sink.write_events(&self.out);
            self.sink.flush();
        }
    }

    fn loss(&self, maps: &KernelMaps) -> LossCounters {
        let kernel = maps.loss();
        let stats = self.tracker.stats();
        LossCounters {
            kernel_ringbuf_full: kernel.ringbuf_full,
            kernel_conn_insert_failed: kernel.conn_insert_failed,
            conn_evicted: stats.evictions,
            close_unseen: stats.lost_closes,
            malformed_records: self.malformed + stats.unknown_events,
            events_write_failed: self.sink.write_failed(),
            watch_dropped: self.watch_dropped.load(Ordering::Relaxed),
            why_groups_evicted: self.why.losses().0,
            why_samples_dropped: self.why.losses().1,
            symbol_cache_evicted: self.symbolizer.evicted(),
            stack_threads_unsampled: self.stack_threads_unsampled,
            diagnoses_dropped: self.diagnoser.dropped(),
        }
    }

    fn report_loss(&mut self, maps: &KernelMaps) {
        let total = self.loss(maps);
        let new = total.since(&self.reported_loss);
        if new.total() == 0 {
            return;
        }
        log::warn!("lost since last report: {new:?}");
        if new.tracking() > 0 {
            self.diagnoser.losses_seen_at(monotonic_ns());
        }
        self.sink
            .write_loss(&LossReport { new, total }, monotonic_ns());
        self.sink.flush();
        self.reported_loss = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_often_enough_for_the_reporting_bound() {
        assert_eq!(
            sweep_interval(Duration::from_secs(5)),
            Duration::from_millis(250)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(500)),
            Duration::from_millis(100)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(10)),
            Duration::from_millis(20)
        );
    }
}
