//! Keeps the diagnosis of every stall: diagnoses new stalls (in their `stall.start`), counts
//! them for `why`, re-diagnoses open ones (a material change is a `stall.update`), and samples
//! the stacks of threads spinning behind them.
use stalltrace_core::{
    diagnosis::Diagnosis,
    tracker::{Detail, Event},
};

use super::{
    why_samples::{why_key, NOT_CAPTURED},
    Daemon,
};
use crate::probes::{KernelMaps, Probes};

/// Frames of a spinning thread's stack reported.
const MAX_FRAMES: usize = 12;
/// Threads whose stacks are sampled at once at most (one perf event each); more
/// spinning threads are reported without a stack, and counted.
pub(super) const MAX_SAMPLED_THREADS: usize = 64;

impl Daemon {
    /// Diagnoses new stalls (in their `stall.start`), counts them for `why`, and keeps the
    /// timelines of stalled connections.
    pub(super) fn annotate(&mut self, maps: &KernelMaps) {
        for event in &mut self.out {
            match &mut event.detail {
                Detail::StallStart { diagnosis, .. } => {
                    let found = self.diagnoser.open(event.conn.id, &self.tracker, maps);
                    if let Some((Some(sock), conn)) = self.tracker.find_by_id(event.conn.id) {
                        let signature = found
                            .request
                            .as_ref()
                            .map_or_else(|| NOT_CAPTURED.to_owned(), |r| r.signature.clone());
                        self.why.stalled(sock, why_key(conn, signature));
                    }
                    *diagnosis = Some(Box::new(found));
                }
                Detail::StallEnd { .. } | Detail::Close(_) => self.diagnoser.close(event.conn.id),
                _ => {}
            }
            self.timelines.record(event);
        }
    }

    /// Re-diagnoses open stalls; a materially changed diagnosis becomes a `stall.update`.
    pub(super) fn refresh_stalls(&mut self, maps: &KernelMaps, now: u64) {
        for (id, diagnosis) in self.diagnoser.refresh(&self.tracker, maps) {
            self.push_update(id, diagnosis, now);
        }
    }

    /// Samples the user stacks of threads spinning behind open stalls (only those), and
    /// reports where they spin once samples are in.
    pub(super) fn update_stacks(&mut self, probes: &mut Probes, now: u64) {
        let spinning = self.diagnoser.spinning(&self.tracker);
        for tid in probes.sampled_threads() {
            if !spinning.iter().any(|(_, _, t)| *t == tid) {
                probes.stop_stacks(tid);
            }
        }
        self.unsampled
            .retain(|tid| spinning.iter().any(|(_, _, t)| t == tid));
        for (id, pid, tid) in spinning {
            let sampled = probes.sampled_threads();
            if !sampled.contains(&tid) && sampled.len() >= MAX_SAMPLED_THREADS {
                if self.unsampled.insert(tid) {
                    self.stack_threads_unsampled += 1;
                }
                continue;
            }
            if !probes.sample_stacks(tid) {
                continue;
            }
            let Some(addresses) = probes.top_stack(tid) else {
                continue;
            };
            let mut frames = self.symbolizer.symbolize(pid, &addresses);
            frames.truncate(MAX_FRAMES);
            if let Some(diagnosis) = self.diagnoser.set_stack(id, frames) {
                self.push_update(id, diagnosis, now);
            }
        }
    }

    pub(super) fn push_update(&mut self, id: u64, diagnosis: Diagnosis, now: u64) {
        let Some((_, conn)) = self.tracker.find_by_id(id) else {
            return;
        };
        let Some(stall) = conn.stall.as_deref() else {
            return;
        };
        self.out.push(Event {
            at_ns: now,
            conn: conn.reference(),
            detail: Detail::StallUpdate {
                kind: stall.kind,
                quiet_ms: now.saturating_sub(stall.quiet_since_ns) / 1_000_000,
                diagnosis: Box::new(diagnosis),
            },
        });
    }
}
