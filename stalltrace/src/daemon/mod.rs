//! `stalltrace daemon`: loads the programs, then one loop owns all state and runs, in turn,
//! the ring buffer drain, the stall sweep (with the diagnosis of new and open stalls), the scan
//! for unread requests, loss reports and API queries. Event lines are written by a thread of
//! their own (`sinks/writer.rs`), and the I/O of diagnoses runs on the diagnosis worker
//! (`diagnosis/worker.rs`), so neither a slow output nor /proc or netlink ever holds this loop.
mod policy;
mod queries;
mod resync;
mod stall_diagnosis;
mod timelines;
mod turns;
mod unix;
mod unread;
mod why_samples;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use stalltrace_common::{tcp_state, Capture, ConnEvent, EventKind, Offsets, UnixNames};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use stalltrace_core::{
    loss::{LossCounters, LossReport},
    timefmt::monotonic_ns,
    tracker::{activity, Detail, Event, Tracker},
    why::Why,
};

use crate::{
    cli::MetricsLabel,
    config::Rules,
    diagnosis::{Diagnoser, Finding},
    heap,
    probes::{KernelFunctions, KernelMaps, ProbeConfig, Probes, Rung},
    sinks::{
        api_server::{Answer, ApiServer, Query},
        metrics::Metrics,
        ndjson::EventSink,
        writer::FileOptions,
    },
    sources::{btf, cgroups, netns, procfs, sock_diag, tracefs},
};

pub struct DaemonConfig {
    /// The threshold of stalls no rule sets one for.
    pub stall_after: Duration,
    /// `[[rule]]`s of the configuration file.
    pub rules: Rules,
    /// The configuration file, reloaded on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// `--stall-after` was given on the command line: a reload keeps it over the file's.
    pub stall_after_from_flag: bool,
    /// Where to serve Prometheus metrics.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Opt-in labels of the stall metrics.
    pub metrics_labels: Vec<MetricsLabel>,
    pub events_file: Option<PathBuf>,
    pub socket: PathBuf,
    pub max_conns: u32,
    pub ring_buffer_bytes: u32,
    pub bpf_stats: bool,
    /// Request bytes captured at each request start (0: off).
    pub capture_bytes: u32,
    /// How to hook the data transfers (`--hooks`); `None`: the best rung that attaches.
    pub hooks: Option<Rung>,
    /// Hook libssl's `SSL_read` (`--libssl`).
    pub libssl: bool,
    /// The kernel's BTF from this file instead of /sys/kernel/btf/vmlinux (`--btf`).
    pub btf: Option<PathBuf>,
    /// Include captured bytes (hex) in stall reports, not only their signature.
    pub capture_raw: bool,
    /// Mode of an events file the daemon creates.
    pub events_file_mode: u32,
    /// Rotate the events file past this size.
    pub events_file_max_size: Option<u64>,
    /// Rotated events files kept.
    pub events_file_keep: u32,
    /// Bytes of events queued for a slow output before lines are dropped.
    pub events_buffer: usize,
    /// Group given the API socket.
    pub socket_group: Option<String>,
    /// What request signatures may reveal (previews, templated paths).
    pub privacy: stalltrace_core::protocols::Privacy,
}

/// How long the writer may take to write out queued events at shutdown.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// How long queries wait, from start-up, for the first sweep (which opens the stalls of
/// connections adopted at start) before they are answered anyway.
const FIRST_SWEEP_WAIT: Duration = Duration::from_secs(2);

/// How often the ring buffer is drained when the kernel does not wake the daemon (it does
/// when the buffer is a quarter full).
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Ring buffer records handled per turn of the loop: a burst is drained in several turns, with
/// API queries (and the API task, which shares the thread) served in between.
const DRAIN_BUDGET: usize = 512;
const LOSS_REPORT_EVERY: Duration = Duration::from_secs(1);
/// Kernel entries read per sweep at most (one syscall each, ~1 µs): bounds a sweep to ~20 ms
/// after a burst of new connections.
const SWEEP_BUDGET: usize = 20_000;
/// Time a sweep reads kernel entries for at most: with both cores busy (the burst's
/// connecting processes), a read takes ten times longer and 20 000 of them took 279 ms.
const SWEEP_TIME_BUDGET: Duration = Duration::from_millis(30);
const RECALIBRATE_EVERY: Duration = Duration::from_secs(10);
/// How often streamed `conns` answers other than the oldest get their next chunks.
const STREAM_EVERY: Duration = Duration::from_millis(5);

/// Sweeps often enough that a stall is reported well within a second of crossing the
/// threshold, and at least five times per threshold.
pub fn sweep_interval(stall_after: Duration) -> Duration {
    (stall_after / 5).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

/// What the sockets of the adopted connections say of their exchanges (one sock_diag dump of
/// open sockets per network namespace, at start-up): without it a request that hung
/// before the daemon started would pass for idle until its next transfer.
fn infer_adopted_exchanges(tracker: &mut Tracker) {
    let entries = match sock_diag::dump_open(|_| true) {
        Ok(entries) => entries,
        Err(err) => {
            log::warn!(
                "sock_diag: {err}: the exchanges of connections open before the daemon started \
                 are unknown until their next transfer"
            );
            return;
        }
    };
    let now = monotonic_ns();
    for entry in entries {
        let Some((None, conn)) = tracker.find_by_endpoints(&entry.endpoints) else {
            continue;
        };
        let exchange = match entry.signals {
            Some(signals) => activity::infer_adopted(
                conn.role,
                &activity::SocketHistory {
                    recv_queue: entry.recv_queue,
                    peer_closed: entry.state == tcp_state::CLOSE_WAIT,
                    closed_here: matches!(entry.state, tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2),
                    last_data_recv_ms: signals.last_data_recv_ms,
                    last_data_sent_ms: signals.last_data_sent_ms,
                    data_segs_in: entry.data_segs.map(|(data_in, _)| data_in),
                    data_segs_out: entry.data_segs.map(|(_, data_out)| data_out),
                },
                now,
            ),
            None => activity::AdoptedExchange::Unknown,
        };
        tracker.set_adopted_exchange(&entry.endpoints, exchange);
    }
}

pub async fn run(mut config: DaemonConfig) -> Result<()> {
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
    // First: SIGHUP's default action would kill the daemon (e.g. when logrotate signals it).
    let sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let tracefs_root = tracefs::ensure_mounted()?;
    let (offsets, functions) = kernel_layout(config.btf.as_deref())?;
    netns::set_known(offsets.can_read_netns());
    let listening: Vec<(u32, u16)> = procfs::listeners(&procfs::tcp_sockets())
        .into_iter()
        .collect();
    // Bind first: a second daemon must fail before it loads anything.
    let api = ApiServer::bind(&config.socket, config.socket_group.as_deref())?;
    let metrics_listener = config
        .metrics_address
        .map(crate::sinks::metrics::bind)
        .transpose()?;
    // The kernel reports the end of a quiet stretch past one threshold: the smallest of all.
    // Stalls held to a larger one are reported when they reach it (`policy.rs`).
    let kernel_threshold = config
        .rules
        .min_stall_after()
        .map_or(config.stall_after, |lowest| lowest.min(config.stall_after));
    if kernel_threshold < config.stall_after {
        log::info!(
            "a rule sets stall_after {kernel_threshold:?}: the kernel and the sweeps run at that \
             threshold; other stalls are reported at {:?}",
            config.stall_after
        );
    }
    let stall_after_ns = kernel_threshold.as_nanos() as u64;
    let probe_config = ProbeConfig {
        stall_after_ns,
        max_conns: config.max_conns,
        ring_buffer_bytes: config.ring_buffer_bytes,
        offsets,
        bpf_stats: config.bpf_stats,
        capture_bytes: config.capture_bytes,
        hooks: config.hooks,
        libssl: config.libssl,
        functions,
    };
    let mut probes = Probes::load(&tracefs_root, &probe_config, &listening)?;
    // Everything that needs root at start-up is done: keep only what run time needs. Before
    // any thread starts (capabilities are per thread): the events writer and the diagnosis
    // worker run with the reduced set, and the events file is opened (and later reopened)
    // with it.
    if let Err(err) = netns::Broker::start() {
        log::warn!(
            "{err:#}: sock_diag sees the daemon's network namespace only (TCP signals and \
             unread requests of other namespaces are left out)"
        );
    }
    let privileges = crate::privileges::drop_to_runtime().context("dropping privileges")?;
    let file = config.events_file.clone().map(|path| FileOptions {
        path,
        mode: config.events_file_mode,
        max_size: config.events_file_max_size,
        keep: config.events_file_keep,
    });
    let mut sink = EventSink::open(file, config.events_buffer)?;
    sink.resolve_cgroups(cgroups::Names::spawn()?);
    let metrics = Metrics::new(&config.metrics_labels, config.ring_buffer_bytes);
    metrics.configured(config.stall_after, config.rules.rules.len());
    let metrics_on = metrics_listener
        .map(|listener| metrics.serve(listener))
        .transpose()?
        .map_or_else(String::new, |address| {
            format!("; metrics on http://{address}/metrics")
        });
    // Judged against state times as the kernel judges them (its threshold has the same slack).
    let slack_ns = crate::probes::threshold_slack_ns(probes.maps.clock.is_ok());
    let mut tracker = Tracker::new(stall_after_ns + slack_ns);
    tracker.set_sweep_budget(SWEEP_BUDGET, SWEEP_TIME_BUDGET);

    // Adopt after attaching: a connection that closes in between is reported by the kernel.
    let mut out = Vec::new();
    let adoptions = procfs::adoptions(&procfs::tcp_sockets());
    let adopted = adoptions.len();
    tracker.set_preexisting_unix(procfs::connected_unix_inodes());
    for adoption in adoptions {
        tracker.adopt(adoption, monotonic_ns(), &mut out);
    }
    infer_adopted_exchanges(&mut tracker);
    sink.write_events(&out);
    sink.flush();
    // Start-up (BTF, /proc, program loading) leaves freed heap behind, and the object read.
    heap::release_free_memory();
    crate::probes::release_object();

    let (queries_tx, queries) = mpsc::channel(64);
    let watch_dropped = Arc::new(AtomicU64::new(0));
    let socket = api.spawn(queries_tx, sink.watchers(), watch_dropped.clone());
    log::info!(
        "privileges dropped: keeping {} only; no_new_privs set",
        privileges.capabilities.join(", ")
    );
    log::info!(
        "stalltrace {} running: {} hooks attached (data transfers by {}{}), {} connections \
         adopted, stall threshold {:?}, TLS replies {}; events to {}; API on {}{metrics_on}",
        env!("CARGO_PKG_VERSION"),
        probes.attached_count(),
        probes.transfers.rung.name(),
        if probes.transfers.forced {
            ", forced by --hooks".to_owned()
        } else if probes.transfers.passed_over.is_empty() {
            String::new()
        } else {
            format!(" after {}", probes.transfers.passed_over.join("; "))
        },
        adopted,
        kernel_threshold,
        match &probes.libssl {
            Ok(path) => format!("from libssl's plaintext ({})", path.display()),
            Err(_) => "from TLS records (libssl not hooked)".to_owned(),
        },
        sink.destination(),
        socket.display(),
    );
    if let Err(why) = &probes.unix {
        log::warn!("{why}");
    }

    let ring = probes
        .maps
        .events
        .take()
        .expect("ring buffer map taken once");
    // SAFETY: the ring buffer map owns its fd and keeps it open for as long as the AsyncFd.
    let ring = unsafe { AsyncFd::register(ring) }.context("polling the ring buffer")?;
    let (diagnoser, findings) = Diagnoser::new(stall_after_ns, config.capture_raw, config.privacy)?;
    let (walker, walked) = resync::Walker::spawn(&probes.maps)?;
    let policy = policy::Policy::new(
        std::mem::take(&mut config.rules),
        config.stall_after.as_nanos() as u64,
        stall_after_ns,
    );
    let mut daemon = Daemon {
        policy,
        metrics,
        ring_cycle_bytes: 0,
        ring_fill: 0.0,
        kernel_threshold,
        diagnoser,
        held: stall_diagnosis::Held::default(),
        ended_requests: HashMap::new(),
        starts_in_out: false,
        why: Why::new(),
        timelines: timelines::Timelines::default(),
        next_stacks_ns: 0,
        unread: unread::UnreadScan::default(),
        tracker,
        sink,
        started: Instant::now(),
        offsets,
        config,
        epoch: 1,
        watch_dropped,
        malformed: 0,
        reported_loss: LossCounters::default(),
        logged_loss: LossCounters::default(),
        resync: resync::ResyncPolicy::default(),
        walker: Some(walker),
        resyncs: resync::Resyncs::default(),
        sweeps: 0,
        sweep_busy: Duration::ZERO,
        sweep_max: Duration::ZERO,
        turns: turns::Turns::default(),
        out,
        privileges,
        streams: std::collections::VecDeque::new(),
        unsampled: std::collections::HashSet::new(),
        stack_threads_unsampled: 0,
    };
    // The programs are attached, the API answers and the diagnosis worker runs: a systemd unit
    // of Type=notify is started now (units ordered after it may rely on the tracer). Without
    // NOTIFY_SOCKET this does nothing.
    notify_service_manager(
        sd_notify::NotifyState::Ready,
        &format!(
            "tracing {} hooks; stall threshold {:?}",
            probes.attached_count(),
            daemon.config.stall_after
        ),
    );
    let result = daemon
        .main_loop(&mut probes, ring, queries, findings, walked, sighup)
        .await;
    notify_service_manager(sd_notify::NotifyState::Stopping, "stopping");
    daemon.sink.close(OUTPUT_GRACE);
    if let Err(err) = std::fs::remove_file(&socket) {
        log::warn!("removing {}: {err}", socket.display());
    }
    log::info!("stopped; programs detached");
    result
}

/// Tells systemd (`$NOTIFY_SOCKET`) the daemon's state with a one-line status for `systemctl
/// status`. A failure is logged, never fatal: the daemon traces all the same, and systemd
/// reports the unit's start as timed out.
fn notify_service_manager(state: sd_notify::NotifyState<'_>, status: &str) {
    if let Err(err) = sd_notify::notify(&[state, sd_notify::NotifyState::Status(status)]) {
        log::warn!("notifying the service manager (NOTIFY_SOCKET): {err}");
    }
}

/// What the programs need to know about the running kernel: member offsets and the shape of
/// its TCP functions, from its BTF. Without BTF, adoption is lost (said once) and the
/// functions' shape comes from the kernel version.
fn kernel_layout(btf_file: Option<&std::path::Path>) -> Result<(Offsets, KernelFunctions)> {
    let lost = "connections open before the daemon started are not adopted, and a reply that \
                arrives with the peer's close may end its stall as `closed`";
    let from_release = || {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        KernelFunctions::from_release(release.trim())
    };
    // A file the user named must be usable: failing to read it is an error, not a warning.
    let kernel_btf = match btf_file {
        Some(path) => Ok(btf::from_file(path)?),
        None => btf::from_kernel(),
    };
    Ok(match kernel_btf {
        Ok(kernel_btf) => {
            let (offsets, missing) = btf::resolve_offsets(&kernel_btf);
            let (netns, other): (Vec<&str>, Vec<&str>) = missing
                .iter()
                .partition(|member| matches!(**member, "sock.skc_net" | "net.ns.inum"));
            if !other.is_empty() {
                log::warn!("kernel BTF lacks {}: {lost}", other.join(", "));
            }
            if !netns.is_empty() {
                log::warn!(
                    "kernel BTF lacks {}: connections are not told apart by network namespace",
                    netns.join(", ")
                );
            }
            let functions = KernelFunctions::from_btf(&kernel_btf).unwrap_or_else(from_release);
            (offsets, functions)
        }
        Err(err) => {
            log::warn!("{err:#}: {lost}; the fentry hooks are unavailable");
            (Offsets::unknown(), from_release())
        }
    })
}

/// What woke the loop for a turn.
enum Wake<'ring> {
    Hangup,
    Readable(std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'ring, RingBuf<MapData>>>),
    /// The drain's interval, or records left from the last turn.
    Drain,
    Sweep,
    /// The once-a-second work.
    Second,
    Recalibrate,
    Query(Query),
    Streams,
    Findings(Vec<Finding>),
    /// From the map walker (`None`: it is gone).
    Walked(Option<resync::Walked>),
}

struct Daemon {
    tracker: Tracker,
    /// The rules of `--config`, applied to stalls before they are reported.
    policy: policy::Policy,
    metrics: Metrics,
    /// Ring buffer bytes read since the last drain that emptied it.
    ring_cycle_bytes: u64,
    /// The largest share of the ring buffer found filled at a drain since the last report.
    ring_fill: f64,
    /// The threshold the kernel and the tracker run with (the smallest of all).
    kernel_threshold: Duration,
    diagnoser: Diagnoser,
    held: stall_diagnosis::Held,
    /// The request copies `QuietEnded` records carried, by kernel key, until the drain that
    /// read them hands their stalls to the diagnoser (at most one drain's records).
    ended_requests: HashMap<u64, Capture>,
    /// Whether a record handled since the last emit started a stall (see `starts_pending`).
    starts_in_out: bool,
    why: Why,
    timelines: timelines::Timelines,
    next_stacks_ns: u64,
    unread: unread::UnreadScan,
    sink: EventSink,
    started: Instant,
    offsets: Offsets,
    config: DaemonConfig,
    epoch: u32,
    watch_dropped: Arc<AtomicU64>,
    malformed: u64,
    /// Losses as of the last `loss` event written.
    reported_loss: LossCounters,
    /// Losses as of the last log message about them.
    logged_loss: LossCounters,
    resync: resync::ResyncPolicy,
    /// The thread that reads the kernel map for resynchronizations (`None`: it died).
    walker: Option<resync::Walker>,
    resyncs: resync::Resyncs,
    sweeps: u64,
    sweep_busy: Duration,
    sweep_max: Duration,
    /// The loop's turns: the longest, and what it did.
    turns: turns::Turns,
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
        mut findings: mpsc::Receiver<Vec<Finding>>,
        mut walked: mpsc::Receiver<resync::Walked>,
        mut sighup: tokio::signal::unix::Signal,
    ) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        let mut sweep = tokio::time::interval(sweep_interval(self.kernel_threshold));
        let mut loss = tokio::time::interval(LOSS_REPORT_EVERY);
        let mut recalibrate = tokio::time::interval(RECALIBRATE_EVERY);
        let mut streams = tokio::time::interval(STREAM_EVERY);
        for timer in [
            &mut drain,
            &mut sweep,
            &mut loss,
            &mut recalibrate,
            &mut streams,
        ] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // Records left in the ring after a turn's budget, and a sweep put off until they are
        // handled (it would take their connections' closes for lost).
        let mut backlog = false;
        let mut sweep_due = false;
        loop {
            // The oldest `conns` stream gets its next chunks as soon as its client has room.
            let head_stream = self.streams.front().map(|stream| stream.chunks.clone());
            let woken = tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => Wake::Hangup,
                guard = ring.readable_mut() => Wake::Readable(guard),
                _ = drain.tick() => Wake::Drain,
                // Every turn ends with a yield: a backlog is drained on the next one.
                _ = std::future::ready(()), if backlog => Wake::Drain,
                _ = sweep.tick() => Wake::Sweep,
                _ = loss.tick() => Wake::Second,
                _ = recalibrate.tick() => Wake::Recalibrate,
                // Adopted connections quiet for longer than the threshold are stalls from the
                // start, opened by the first sweep: queries wait for it, so that the first
                // `stalls` lists them (with 3 000 adopted, it was answered empty). A ring
                // backlog puts sweeps off: they wait 2 s at most.
                Some(query) = queries.recv(),
                    if self.sweeps > 0 || self.started.elapsed() > FIRST_SWEEP_WAIT =>
                    Wake::Query(query),
                // While `conns` answers stream, chunks are made for the clients that have room:
                // the oldest as soon as it has, the others in turn.
                _ = async { head_stream.as_ref().expect("guarded").reserve().await },
                    if head_stream.is_some() => Wake::Streams,
                _ = streams.tick(), if !self.streams.is_empty() => Wake::Streams,
                Some(batch) = findings.recv() => Wake::Findings(batch),
                chunk = walked.recv(), if self.walker.is_some() => Wake::Walked(chunk),
            };
            // The turn starts: until it ends, nothing else on this thread runs.
            let started = Instant::now();
            let cpu_started = turns::thread_cpu_us();
            let mut job = match woken {
                Wake::Hangup => {
                    if self.config.events_file.is_some() {
                        self.sink.reopen();
                    } else if self.config.config_path.is_none() {
                        log::info!("SIGHUP: events go to stdout, nothing to reopen");
                    }
                    self.reload_config();
                    turns::Job::Signal
                }
                Wake::Readable(guard) => {
                    let mut guard = guard.context("polling the ring buffer")?;
                    backlog = self.drain_some(guard.get_inner_mut(), &probes.maps);
                    guard.clear_ready();
                    turns::Job::Drain
                }
                Wake::Drain => {
                    backlog = self.drain_some(ring.get_mut(), &probes.maps);
                    turns::Job::Drain
                }
                Wake::Sweep => {
                    backlog = self.drain_some(ring.get_mut(), &probes.maps);
                    sweep_due = true;
                    self.resync_if_due(&probes.maps);
                    turns::Job::Drain
                }
                Wake::Second => {
                    self.report_loss(&probes.maps);
                    let lost = self.loss(&probes.maps);
                    self.metrics.update(
                        self.tracker.len(),
                        &lost,
                        std::mem::take(&mut self.ring_fill),
                    );
                    self.metrics.oldest(&self.policy.oldest(monotonic_ns()));
                    self.compact();
                    turns::Job::Housekeeping
                }
                Wake::Recalibrate => {
                    self.sink.recalibrate();
                    turns::Job::Recalibrate
                }
                // Its client gave up (timed out) while the query waited: save the work.
                Wake::Query(query) if query.reply.is_closed() => turns::Job::Query,
                Wake::Query(query) => {
                    match query.command {
                        stalltrace_core::api::Command::Conns { filter } => {
                            let chunks = self.stream_conns(&filter);
                            let _ = query.reply.send(Answer::Items(chunks));
                        }
                        command => {
                            let status = matches!(command, stalltrace_core::api::Command::Status);
                            let response = self.answer(command, probes);
                            let _ = query.reply.send(Answer::Whole(response));
                            if status {
                                self.turns.status_taken();
                            }
                        }
                    }
                    turns::Job::Query
                }
                Wake::Streams => {
                    self.pump_conns_streams(probes);
                    turns::Job::ConnsChunks
                }
                Wake::Walked(chunk) => {
                    self.on_walked(chunk, &probes.maps);
                    turns::Job::Resync
                }
                Wake::Findings(mut batch) => {
                    // Stalls found together are chained together: take what else is waiting.
                    while let Ok(mut more) = findings.try_recv() {
                        batch.append(&mut more);
                    }
                    self.on_findings(batch, &probes.maps, monotonic_ns());
                    turns::Job::Findings
                }
            };
            if !backlog && std::mem::take(&mut sweep_due) {
                self.sweep(probes)?;
                job = turns::Job::Sweep;
            }
            let took = started.elapsed();
            let cpu_us = turns::thread_cpu_us().saturating_sub(cpu_started);
            self.turns.record(job, took, cpu_us);
            self.metrics.loop_turn(took);
            // The API task shares this thread and runs only when this one waits. A branch
            // above that is always ready (a backlog, clients with room for chunks) would keep
            // it from waiting for up to tokio's budget of 128 turns: 64 `conns` answers made
            // that way kept a `status` from being answered for 3.9 s.
            tokio::task::yield_now().await;
        }
        // Deliver what the kernel reported before the signal, then end the open stalls (after
        // their held starts: `emit` queues an end behind its start).
        self.drain(ring.get_mut(), &probes.maps);
        let now = monotonic_ns();
        self.out.clear();
        self.tracker.stop(now, &mut self.out);
        self.emit(&probes.maps);
        self.release_held(now, true);
        self.report_loss(&probes.maps);
        Ok(())
    }

    /// Handles everything in the ring buffer.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, maps: &KernelMaps) {
        while self.drain_some(ring, maps) {}
    }

    /// Handles at most `DRAIN_BUDGET` records; whether more are left.
    fn drain_some(&mut self, ring: &mut RingBuf<MapData>, maps: &KernelMaps) -> bool {
        self.out.clear();
        let mut handled = 0;
        while handled < DRAIN_BUDGET {
            let Some(record) = ring.next() else {
                break;
            };
            handled += 1;
            // Each record takes an 8-byte header and is padded to 8 bytes in the ring.
            self.ring_cycle_bytes += (record.len() as u64 + 8 + 7) & !7;
            match ConnEvent::from_bytes(&record) {
                Some(event) if event.kind() == Some(EventKind::UnixDiscovered) => {
                    match UnixNames::from_record_tail(&record) {
                        Some(names) => self.tracker.on_unix_event(&event, &names, &mut self.out),
                        None => self.tracker.on_event(&event, &mut self.out),
                    }
                }
                Some(event) => {
                    // A stall that began and ended in this batch is diagnosed from its
                    // connection, which the close would take away: hand it over first.
                    if event.kind() == Some(EventKind::Closed)
                        && self.starts_pending(event.header.sock)
                    {
                        self.emit(maps);
                    }
                    let mark = self.out.len();
                    self.tracker.on_event(&event, &mut self.out);
                    self.starts_in_out |= self.out[mark..]
                        .iter()
                        .any(|event| matches!(event.detail, Detail::StallStart { .. }));
                    let capture = Capture::from_record_tail(&record);
                    if let Some(capture) =
                        capture.filter(|_| event.kind() == Some(EventKind::QuietEnded))
                    {
                        self.ended_requests.insert(event.header.sock, capture);
                    }
                    self.sample_exchange(&event, capture);
                }
                None => self.malformed += 1,
            }
        }
        self.emit(maps);
        self.metrics.kernel_records(handled as u64);
        let backlog = handled == DRAIN_BUDGET;
        if !backlog {
            // What one drain read is about what the ring held when it began.
            let fill = self.ring_cycle_bytes as f64 / f64::from(self.config.ring_buffer_bytes);
            self.ring_fill = self.ring_fill.max(fill.min(1.0));
            self.ring_cycle_bytes = 0;
        }
        backlog
    }

    fn sweep(&mut self, probes: &mut Probes) -> Result<()> {
        let started = Instant::now();
        self.epoch += 1;
        probes.maps.set_epoch(self.epoch)?;
        self.out.clear();
        let now = monotonic_ns();
        let mut released = Vec::new();
        let lookup = |sock| unix::lookup(probes, sock, now, &mut released);
        let reply_head = |sock| probes.maps.reply_head(sock);
        let request_run = |sock| probes.maps.request_run(sock);
        self.tracker.sweep_with_heads(
            now,
            self.epoch,
            lookup,
            reply_head,
            request_run,
            &mut self.out,
        );
        self.close_released_unix(probes, released, now);
        self.request_unread_scan(now);
        let maps = &probes.maps;
        self.emit(maps);
        self.release_held(now, false);
        self.out = self.policy.release_due(now);
        self.count_released_stalls();
        self.write_out();
        self.diagnoser.refresh_due(&self.tracker, now);
        self.diagnoser.presample(&self.tracker, now);
        if now >= self.next_stacks_ns {
            self.next_stacks_ns = now + stall_diagnosis::STACKS_EVERY_NS;
            self.update_stacks(probes);
        }
        let took = started.elapsed();
        self.metrics.sweep(took);
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

    fn loss(&self, maps: &KernelMaps) -> LossCounters {
        let kernel = maps.loss();
        let stats = self.tracker.stats();
        LossCounters {
            kernel_ringbuf_full: kernel.ringbuf_full,
            kernel_conn_insert_failed: kernel.conn_insert_failed,
            kernel_hook_missed: kernel.hook_missed,
            kernel_http2_untracked: kernel.http2_untracked,
            kernel_http2_framing_lost: kernel.http2_framing_lost,
            conn_evicted: stats.evictions,
            close_unseen: stats.lost_closes,
            malformed_records: self.malformed + stats.unknown_events,
            events_write_failed: self.sink.write_failed(),
            watch_dropped: self.watch_dropped.load(Ordering::Relaxed),
            output_blocked: self.sink.output_blocked(),
            why_groups_evicted: self.why.losses().0,
            why_samples_dropped: self.why.losses().1,
            symbol_cache_evicted: self.diagnoser.symbols_evicted(),
            stack_threads_unsampled: self.stack_threads_unsampled,
            diagnoses_dropped: self.diagnoser.dropped(),
            http1_heads_missed: stats.reply_heads_missed,
        }
    }

    fn report_loss(&mut self, maps: &KernelMaps) {
        let total = self.loss(maps);
        let new = total.since(&self.reported_loss);
        if new.total() == 0 {
            return;
        }
        let unlogged = total.since(&self.logged_loss);
        if unlogged.total() > 0 {
            log::warn!("lost since last report: {unlogged}");
            self.logged_loss = total;
        }
        // Undelivered output and full userspace tables do not make the tracker's state stale.
        if unlogged.tracking() > 0 {
            self.diagnoser.losses_seen_at(monotonic_ns());
        }
        // With the output still full, the same losses are reported again once it has room:
        // the report then follows the gap in the stream.
        if self
            .sink
            .write_loss(&LossReport { new, total }, monotonic_ns())
        {
            self.sink.flush();
            self.metrics.event("loss");
            self.reported_loss = total;
        }
    }

    /// SIGHUP: reads the configuration file again and puts its rules (and `stall_after`,
    /// unless given as a flag) in force for the stalls that start from now on. An invalid
    /// file, or a threshold below the kernel's, keeps what is in force.
    fn reload_config(&mut self) {
        let Some(path) = self.config.config_path.clone() else {
            return;
        };
        let loaded = match crate::config::load(&path) {
            Ok(loaded) => loaded,
            Err(err) => {
                log::error!("SIGHUP: {err:#}; keeping the rules in force");
                return;
            }
        };
        let stall_after = match loaded.file.stall_after {
            Some(file) if !self.config.stall_after_from_flag => file.0,
            _ => self.config.stall_after,
        };
        let count = loaded.rules.rules.len();
        if let Err(err) = self
            .policy
            .replace(loaded.rules, stall_after.as_nanos() as u64)
        {
            log::error!(
                "SIGHUP: {}: {err:#}; keeping the rules in force",
                path.display()
            );
            return;
        }
        self.config.stall_after = stall_after;
        self.metrics.configured(stall_after, count);
        log::info!(
            "SIGHUP: {}: {count} rules in force, stall threshold {stall_after:?} (other keys \
             take effect at restart)",
            path.display()
        );
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
