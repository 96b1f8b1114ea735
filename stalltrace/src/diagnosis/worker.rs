//! The diagnosis worker: a thread that does the slow part of diagnosing stalls (/proc,
//! sock_diag, pidfd_getfd, ELF symbol tables) so that the event loop never waits on it. The
//! loop submits jobs without blocking (a full queue drops the job, counted) and reads findings
//! as they come.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
        Arc,
    },
};

use anyhow::{Context as _, Result};
use stalltrace_core::{
    diagnosis::{TcpSignals, ThreadReport, ThreadSample},
    tracker::model::Endpoints,
};
use tokio::sync::mpsc as async_mpsc;

use super::gather::{gather, scan_unread, UnreadRequest};
use crate::sources::{symbols::Symbolizer, threads};

/// Jobs waiting for the worker at most. A mass stall of 20 000 connections submits as many
/// onset jobs at once; beyond this they are dropped (counted) and their stalls reported with
/// what the loop knows.
const QUEUE: usize = 32_768;
/// Thread samples kept at most, ahead of a likely stall and per open stall (~100 bytes each).
/// Past it a window simply starts at the next look.
pub(super) const MAX_SAMPLES: usize = 65_536;

/// A stalled (or about to stall) connection, as the worker needs to see it.
#[derive(Clone, Debug)]
pub(crate) struct Subject {
    pub(crate) id: u64,
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    pub(crate) endpoints: Endpoints,
    /// It is the server side (accepted, or waiting to be).
    pub(crate) server: bool,
}

pub(crate) enum Job {
    /// Take a first sample of the thread behind a request quiet for half the threshold, so
    /// that the stall's first report has a CPU-share window.
    Presample { id: u64, pid: u32, tid: u32 },
    /// Look at a stall: `onset` for a new one (its `stall.start` waits for the answer), else a
    /// refresh of an open one.
    Diagnose { subject: Subject, onset: bool },
    /// Name the functions of a spinning thread's sampled stack.
    Symbolize {
        id: u64,
        pid: u32,
        addresses: Vec<u64>,
    },
    /// The stall ended or the request was answered: drop its samples.
    Forget { id: u64 },
    /// Look for requests that sit unread, quiet for at least `stall_after_ns`.
    ScanUnread { stall_after_ns: u64 },
}

/// Findings sent to the loop in one message at most: the loop wakes once per batch.
const FINDINGS_PER_MESSAGE: usize = 512;

pub(crate) enum Finding {
    Diagnosed {
        id: u64,
        onset: bool,
        thread: Option<ThreadReport>,
        fd_peer: Option<Endpoints>,
        /// Boxed: the largest part of the largest finding.
        tcp: Option<Box<TcpSignals>>,
        not_accepted: bool,
        executable_path: Option<String>,
        cgroup_path: Option<String>,
    },
    Stack {
        id: u64,
        frames: Vec<String>,
    },
    /// What a [`Job::ScanUnread`] found (`None`: the dump failed), and how long it took.
    Unread {
        found: Option<Vec<UnreadRequest>>,
        took: std::time::Duration,
    },
}

/// The loop's handle on the worker thread.
pub(crate) struct Worker {
    jobs: SyncSender<Job>,
    /// Jobs dropped because the queue was full.
    dropped: u64,
    /// Binaries the worker's symbol cache evicted.
    symbols_evicted: Arc<AtomicU64>,
}

impl Worker {
    /// Starts the worker; its findings arrive on the returned receiver, in batches.
    pub(crate) fn spawn() -> Result<(Self, async_mpsc::Receiver<Vec<Finding>>)> {
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        // Batches in flight at most: the worker waits when the loop is this far behind.
        let (findings, receiver) = async_mpsc::channel(64);
        let symbols_evicted = Arc::new(AtomicU64::new(0));
        let state = State {
            symbols_evicted: symbols_evicted.clone(),
            ..State::default()
        };
        std::thread::Builder::new()
            .name("diagnosis".into())
            .spawn(move || run(state, queue, findings))
            .context("starting the diagnosis thread")?;
        let worker = Self {
            jobs,
            dropped: 0,
            symbols_evicted,
        };
        Ok((worker, receiver))
    }

    /// Queues `job` without waiting; false (and counted) when the queue is full.
    pub(crate) fn submit(&mut self, job: Job) -> bool {
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped += 1;
                false
            }
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(crate) fn symbols_evicted(&self) -> u64 {
        self.symbols_evicted.load(Ordering::Relaxed)
    }
}

/// The worker's state: samples that open the next CPU-share window of each stall's thread.
#[derive(Default)]
struct State {
    presamples: HashMap<u64, ThreadSample>,
    windows: HashMap<u64, ThreadSample>,
    symbolizer: Symbolizer,
    symbols_evicted: Arc<AtomicU64>,
}

fn run(mut state: State, jobs: mpsc::Receiver<Job>, findings: async_mpsc::Sender<Vec<Finding>>) {
    let mut batch = Vec::new();
    // Ends when the loop drops its sender (daemon exit) or stops reading findings.
    while let Ok(job) = jobs.recv() {
        if let Some(finding) = state.work(job) {
            batch.push(finding);
        }
        // Keep going while jobs are queued: the loop gets one message for all of them.
        while batch.len() < FINDINGS_PER_MESSAGE {
            let Ok(job) = jobs.try_recv() else {
                break;
            };
            if let Some(finding) = state.work(job) {
                batch.push(finding);
            }
        }
        if !batch.is_empty() && findings.blocking_send(std::mem::take(&mut batch)).is_err() {
            return;
        }
    }
}

impl State {
    /// Does one job; what it found, if the loop needs to know.
    fn work(&mut self, job: Job) -> Option<Finding> {
        let state = self;
        let finding = match job {
            Job::Presample { id, pid, tid } => {
                if state.presamples.len() < MAX_SAMPLES {
                    if let Some(sample) = threads::sample(pid, tid) {
                        state.presamples.insert(id, sample);
                    }
                }
                return None;
            }
            Job::Forget { id } => {
                state.presamples.remove(&id);
                state.windows.remove(&id);
                return None;
            }
            Job::Diagnose { subject, onset } => {
                let first = state
                    .windows
                    .remove(&subject.id)
                    .or_else(|| state.presamples.remove(&subject.id));
                let gathered = gather(&subject, first);
                if let Some(sample) = gathered
                    .sample
                    .filter(|_| state.windows.len() < MAX_SAMPLES)
                {
                    state.windows.insert(subject.id, sample);
                }
                Finding::Diagnosed {
                    id: subject.id,
                    onset,
                    thread: gathered.thread,
                    fd_peer: gathered.fd_peer,
                    tcp: gathered.tcp.map(Box::new),
                    not_accepted: gathered.not_accepted,
                    executable_path: gathered.executable_path,
                    cgroup_path: gathered.cgroup_path,
                }
            }
            Job::Symbolize { id, pid, addresses } => {
                let frames = state.symbolizer.symbolize(pid, &addresses);
                let evicted = state.symbolizer.evicted();
                state.symbols_evicted.store(evicted, Ordering::Relaxed);
                Finding::Stack { id, frames }
            }
            Job::ScanUnread { stall_after_ns } => {
                let started = std::time::Instant::now();
                let found = scan_unread(stall_after_ns)
                    .inspect_err(|err| {
                        log::warn!("sock_diag dump failed ({err}); unread requests go undetected");
                    })
                    .ok();
                Finding::Unread {
                    found,
                    took: started.elapsed(),
                }
            }
        };
        Some(finding)
    }
}
