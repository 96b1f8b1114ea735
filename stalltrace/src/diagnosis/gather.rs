//! Gathers what explains a stall — the responsible thread (/proc), TCP signals (sock_diag),
//! the captured request, the chain of stalls behind it — and keeps it current while the stall
//! is open. Classification itself is pure (stalltrace_core::diagnosis); this module does
//! the I/O.
//!
//! Cost: nothing while no request is outstanding for long. A thread is first sampled when its
//! request has been quiet for half the threshold, so that the stall's first report already has
//! a CPU-share window; open stalls are refreshed once a second.
use std::collections::HashMap;

use stalltrace_core::{
    diagnosis::{
        self, classify, Confidence, Diagnosis, RequestReport, ThreadReport, ThreadSample,
        ThreadVerdict,
    },
    protocols,
    tracker::{model::Role, Conn, Tracker},
};

use super::blame::{blame_chain, socket_conn};
use crate::{
    probes::KernelMaps,
    sources::{sock_diag, threads},
};

/// How often open stalls are re-diagnosed.
pub(crate) const REFRESH_EVERY_NS: u64 = 1_000_000_000;
/// Threads sampled ahead of their stall at most.
const MAX_PRESAMPLES: usize = 4096;
/// Open stalls whose diagnosis is kept (and refreshed) at most; later ones get a diagnosis in
/// their `stall.start`, not kept.
const MAX_OPEN: usize = 16_384;

struct Open {
    diagnosis: Diagnosis,
    /// The latest thread sample: the start of the next CPU-share window.
    sample: Option<ThreadSample>,
    retransmits_at_start: Option<u32>,
}

pub(crate) struct Diagnoser {
    stall_after_ns: u64,
    capture_raw: bool,
    privacy: protocols::Privacy,
    /// First samples of threads whose request is about to stall, by connection id.
    presamples: HashMap<u64, ThreadSample>,
    open: HashMap<u64, Open>,
    /// When the daemon last lost events: stalls on connections older than that are partial.
    last_loss_ns: Option<u64>,
    /// Presamples and open diagnoses not kept: their tables were full.
    dropped: u64,
}

impl Diagnoser {
    pub(crate) fn new(stall_after_ns: u64, capture_raw: bool, privacy: protocols::Privacy) -> Self {
        Self {
            stall_after_ns,
            capture_raw,
            privacy,
            presamples: HashMap::new(),
            open: HashMap::new(),
            last_loss_ns: None,
            dropped: 0,
        }
    }

    /// Presamples and diagnoses not kept because their tables were full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(crate) fn losses_seen_at(&mut self, now: u64) {
        self.last_loss_ns = Some(now);
    }

    /// Samples the threads behind requests quiet for half the threshold.
    pub(crate) fn presample(&mut self, tracker: &Tracker, now: u64) {
        let since = now.saturating_sub(self.stall_after_ns / 2);
        let suspects = tracker.suspects(since);
        self.presamples.retain(|id, _| {
            suspects
                .iter()
                .any(|s| tracker.conn(*s).is_some_and(|c| c.id == *id))
        });
        for sock in suspects {
            let Some(conn) = tracker.conn(sock) else {
                continue;
            };
            if conn.owner.pid != 0 && !self.presamples.contains_key(&conn.id) {
                if self.presamples.len() >= MAX_PRESAMPLES {
                    self.dropped += 1;
                    continue;
                }
                if let Some(sample) = threads::sample(conn.owner.pid, conn.owner.tid) {
                    self.presamples.insert(conn.id, sample);
                }
            }
        }
    }

    /// Diagnoses the stall that just opened on connection `id`.
    pub(crate) fn open(&mut self, id: u64, tracker: &Tracker, maps: &KernelMaps) -> Diagnosis {
        let first = self.presamples.remove(&id);
        let (diagnosis, sample) = self.diagnose(id, tracker, maps, first);
        let retransmits_at_start = diagnosis.tcp.map(|t| t.total_retransmits);
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&id) {
            self.dropped += 1;
            return diagnosis;
        }
        self.open.insert(
            id,
            Open {
                diagnosis: diagnosis.clone(),
                sample,
                retransmits_at_start,
            },
        );
        diagnosis
    }

    /// Re-diagnoses every open stall; returns those whose diagnosis changed materially.
    pub(crate) fn refresh(
        &mut self,
        tracker: &Tracker,
        maps: &KernelMaps,
    ) -> Vec<(u64, Diagnosis)> {
        let ids: Vec<u64> = self.open.keys().copied().collect();
        let mut changed = Vec::new();
        for id in ids {
            let first = self.open.get_mut(&id).and_then(|open| open.sample.take());
            let (mut diagnosis, sample) = self.diagnose(id, tracker, maps, first);
            let Some(open) = self.open.get_mut(&id) else {
                continue;
            };
            if let (Some(now), Some(start)) = (diagnosis.tcp, open.retransmits_at_start) {
                diagnosis.retransmits = Some(now.total_retransmits.saturating_sub(start));
            }
            // A stack found earlier stays until the thread stops spinning.
            keep_stack(&open.diagnosis, &mut diagnosis);
            open.sample = sample;
            if diagnosis.differs_materially(&open.diagnosis) {
                changed.push((id, diagnosis.clone()));
            }
            open.diagnosis = diagnosis;
        }
        changed
    }

    /// Records a user stack for the spinning thread of stall `id`.
    pub(crate) fn set_stack(&mut self, id: u64, stack: Vec<String>) -> Option<Diagnosis> {
        let open = self.open.get_mut(&id)?;
        let Some(ThreadReport {
            verdict: ThreadVerdict::Spinning { stack: current, .. },
            ..
        }) = open.diagnosis.thread.as_mut()
        else {
            return None;
        };
        if *current == stack || stack.is_empty() {
            return None;
        }
        *current = stack;
        Some(open.diagnosis.clone())
    }

    /// Threads currently spinning behind open stalls: (stall id, pid, tid).
    pub(crate) fn spinning(&self, tracker: &Tracker) -> Vec<(u64, u32, u32)> {
        self.open
            .iter()
            .filter(|(_, open)| {
                matches!(
                    open.diagnosis.thread,
                    Some(ThreadReport {
                        verdict: ThreadVerdict::Spinning { .. },
                        ..
                    })
                )
            })
            .filter_map(|(id, open)| {
                let tid = open.diagnosis.thread.as_ref()?.id;
                let (_, conn) = tracker.find_by_id(*id)?;
                Some((*id, conn.owner.pid, tid))
            })
            .collect()
    }

    pub(crate) fn current(&self, id: u64) -> Option<&Diagnosis> {
        self.open.get(&id).map(|open| &open.diagnosis)
    }

    /// The stall on `id` ended (or its connection closed).
    pub(crate) fn close(&mut self, id: u64) {
        self.open.remove(&id);
        self.presamples.remove(&id);
    }

    fn diagnose(
        &self,
        id: u64,
        tracker: &Tracker,
        maps: &KernelMaps,
        first: Option<ThreadSample>,
    ) -> (Diagnosis, Option<ThreadSample>) {
        let mut diagnosis = Diagnosis {
            confidence: Confidence::Full,
            ..Diagnosis::default()
        };
        let Some((sock, conn)) = tracker.find_by_id(id) else {
            return (diagnosis, None);
        };
        (diagnosis.confidence, diagnosis.confidence_reason) =
            diagnosis::confidence(conn.opened_ns, self.last_loss_ns);
        let (thread, sample) = thread_report(conn, tracker, first);
        if let Some(signals) = sock_diag::query(&conn.endpoints).ok().flatten() {
            if let Some(signals) = signals.signals {
                diagnosis.cause =
                    Some(diagnosis::tcp_cause(conn.role == Role::Server, &signals).to_owned());
                diagnosis.tcp = Some(signals);
            }
        }
        if let Some(capture) = sock.and_then(|sock| maps.capture(sock)) {
            diagnosis.request =
                protocols::recognize_with(capture.data(), self.privacy).map(|s| RequestReport {
                    protocol: s.protocol.to_owned(),
                    signature: s.display(),
                    raw_hex: self.capture_raw.then(|| diagnosis::hex(capture.data())),
                });
        }
        diagnosis.blame = blame_chain(conn, thread.as_ref().map(|t| &t.verdict), tracker);
        diagnosis.thread = thread;
        (diagnosis, sample)
    }
}

fn keep_stack(previous: &Diagnosis, next: &mut Diagnosis) {
    let (
        Some(ThreadReport {
            verdict: ThreadVerdict::Spinning { stack: old, .. },
            id: old_id,
        }),
        Some(ThreadReport {
            verdict: ThreadVerdict::Spinning { stack: new, .. },
            id: new_id,
        }),
    ) = (previous.thread.as_ref(), next.thread.as_mut())
    else {
        return;
    };
    if new.is_empty() && old_id == new_id {
        *new = old.clone();
    }
}

/// The verdict on the thread behind `conn`, and the sample that ends its window.
pub(super) fn thread_report(
    conn: &Conn,
    tracker: &Tracker,
    first: Option<ThreadSample>,
) -> (Option<ThreadReport>, Option<ThreadSample>) {
    let (pid, tid) = (conn.owner.pid, conn.owner.tid);
    if pid == 0 {
        return (None, None);
    }
    let last = threads::sample(pid, tid);
    let first = first.or_else(|| last.clone());
    let Some(first) = first else {
        return (
            Some(ThreadReport {
                id: tid,
                verdict: ThreadVerdict::Gone,
            }),
            None,
        );
    };
    let mut verdict = classify(&first, last.as_ref());
    if let ThreadVerdict::Blocked {
        fd: Some(fd),
        fd_target,
        fd_conn,
        ..
    } = &mut verdict
    {
        if let Some(target) = threads::fd_target(pid, *fd) {
            *fd_conn = socket_conn(&target, tracker);
            *fd_target = Some(target.describe());
            if *fd_conn == Some(conn.id) {
                // Waiting on the stalled connection itself: the answer is its peer's.
                *fd_conn = None;
                *fd_target = Some("this connection".into());
            }
        }
    }
    (Some(ThreadReport { id: tid, verdict }), last)
}
