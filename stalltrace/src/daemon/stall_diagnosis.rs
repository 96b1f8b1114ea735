//! Keeps the diagnosis of every stall without ever waiting for it: a new stall's `stall.start`
//! (and any later event of its connection) is held until the diagnosis worker's first look
//! comes back, at most [`HOLD_AT_MOST_NS`]; open stalls are looked at again as they age (a
//! material change is a `stall.update`); threads spinning behind stalls have their stacks
//! sampled and symbolized. Also counts stalls for `why` and keeps the timelines.
use std::collections::{HashMap, HashSet};

use stalltrace_core::{
    diagnosis::Diagnosis,
    timefmt::monotonic_ns,
    tracker::{Detail, Event},
};

use super::{
    policy,
    why_samples::{why_key, NOT_CAPTURED},
    Daemon,
};
use crate::{
    diagnosis::{Finding, Outcome},
    probes::{KernelMaps, Probes},
};

/// Frames of a spinning thread's stack reported.
const MAX_FRAMES: usize = 12;
/// A `stall.start` waits this long at most for its diagnosis; then it is reported with what
/// is known (the request, the confidence) and the diagnosis follows in a `stall.update`.
pub(super) const HOLD_AT_MOST_NS: u64 = 1_000_000_000;
/// How often spinning threads' stacks are read (their sampling runs at 99 Hz).
pub(super) const STACKS_EVERY_NS: u64 = 1_000_000_000;

/// Events held back until their stall's first diagnosis arrives, by connection id.
#[derive(Default)]
pub(super) struct Held {
    by_conn: HashMap<u64, HeldEvents>,
    /// Starts reported before their diagnosis came (the worker was late or its queue full).
    pub(super) late: u64,
}

impl Held {
    pub(super) fn len(&self) -> usize {
        self.by_conn.len()
    }
}

struct HeldEvents {
    /// The `stall.start` first, then what followed on the same connection.
    events: Vec<Event>,
    deadline_ns: u64,
    /// The start names no request though one was read: the kernel's slot held the next one
    /// by the time the start was written (the sweep began the stall, and the reply and the
    /// next request came before the loop got to it). The end's record carries its copy.
    unnamed: bool,
}
/// Threads whose stacks are sampled at once at most (one perf event each); more
/// spinning threads are reported without a stack, and counted.
pub(super) const MAX_SAMPLED_THREADS: usize = 64;

impl Daemon {
    /// Sends `self.out` on its way: new stalls are handed to the diagnoser and their events
    /// held; the rest is written now.
    pub(super) fn emit(&mut self, maps: &KernelMaps) {
        if self.out.is_empty() {
            // A record's copy whose record started no stall (a one-way Unix end) goes too.
            self.ended_requests.clear();
            return;
        }
        self.starts_in_out = false;
        let now = monotonic_ns();
        let ended = ended_in_batch(&self.out);
        let mut ready = Vec::with_capacity(self.out.len());
        for (mut event, ended) in std::mem::take(&mut self.out).into_iter().zip(ended) {
            let id = event.conn.id;
            if self.held.by_conn.contains_key(&id) {
                if matches!(event.detail, Detail::StallEnd { .. }) {
                    self.name_held_start(id);
                }
                if let Some(held) = self.held.by_conn.get_mut(&id) {
                    held.events.push(event);
                }
                continue;
            }
            if let Detail::StallStart {
                diagnosis,
                quiet_ms,
                ..
            } = &mut event.detail
            {
                let Some((sock, conn)) = self.tracker.find_by_id(id) else {
                    ready.push(event);
                    continue;
                };
                // The copy the record carried, else the kernel's slot; one taken after the
                // stall began is the next request's, and a request never read has none (the
                // slot holds the one before it).
                let unread = conn.stall.as_ref().is_some_and(|stall| stall.unread);
                let capture = sock
                    .and_then(|sock| {
                        self.ended_requests
                            .remove(&sock)
                            .or_else(|| maps.capture(sock))
                    })
                    .filter(|capture| capture.request_ns <= event.at_ns && !unread);
                let (known, asked) = self.diagnoser.begin(conn, capture.as_ref(), ended, now);
                // `why` counts the stalls the rules report; one they ignore or hold (a long
                // poll) is a request that completes late, or is counted when released.
                let request = known.request.as_ref().map(|r| r.signature.as_str());
                let (verdict, _) = self.policy.decide(&event.conn, Some(&known), *quiet_ms);
                if verdict == policy::Verdict::Report {
                    if let Some(sock) = sock {
                        self.why.stalled(
                            sock,
                            why_key(conn, request.unwrap_or(NOT_CAPTURED).to_owned()),
                        );
                    }
                }
                *diagnosis = Some(Box::new(known));
                if asked {
                    let held = HeldEvents {
                        unnamed: capture.is_none() && !unread,
                        events: vec![event],
                        deadline_ns: now + HOLD_AT_MOST_NS,
                    };
                    self.held.by_conn.insert(id, held);
                    continue;
                }
                self.held.late += u64::from(!ended);
            }
            ready.push(event);
        }
        self.out = ready;
        self.ended_requests.clear();
        self.write_out();
    }

    /// Names the request of connection `id`'s held start, if it is [`HeldEvents::unnamed`],
    /// from the copy its ending record carried (`ended_requests`).
    fn name_held_start(&mut self, id: u64) {
        let Some((Some(sock), conn)) = self.tracker.find_by_id(id) else {
            return;
        };
        let (Some(held), Some(capture)) = (
            self.held.by_conn.get_mut(&id),
            self.ended_requests.get(&sock),
        ) else {
            return;
        };
        let Some(Event {
            at_ns,
            detail:
                Detail::StallStart {
                    diagnosis: Some(diagnosis),
                    ..
                },
            ..
        }) = held.events.first_mut().filter(|_| held.unnamed)
        else {
            return;
        };
        if capture.request_ns <= *at_ns {
            diagnosis.request = self.diagnoser.name_request(conn, capture);
            held.unnamed = false;
        }
    }

    /// Whether `self.out` holds a stall start of the connection at kernel key `sock`; scans
    /// only when some stall started since the last emit (`starts_in_out`), which is rare.
    pub(super) fn starts_pending(&self, sock: u64) -> bool {
        if !self.starts_in_out {
            return false;
        }
        let Some(conn) = self.tracker.conn(sock) else {
            return false;
        };
        self.out.iter().any(|event| {
            event.conn.id == conn.id && matches!(event.detail, Detail::StallStart { .. })
        })
    }

    /// Counts in `why` the stalls in `self.out` the rules held until now.
    pub(super) fn count_released_stalls(&mut self) {
        for event in &self.out {
            let Detail::StallStart { diagnosis, .. } = &event.detail else {
                continue;
            };
            let Some((Some(sock), conn)) = self.tracker.find_by_id(event.conn.id) else {
                continue;
            };
            let signature = diagnosis
                .as_ref()
                .and_then(|d| d.request.as_ref())
                .map_or(NOT_CAPTURED, |r| r.signature.as_str());
            self.why.stalled(sock, why_key(conn, signature.to_owned()));
        }
    }

    /// Writes `self.out` to the sinks as the rules decide (`policy.rs`), recording timelines
    /// and closing the books of stalls that ended or are ignored.
    pub(super) fn write_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        for event in &self.out {
            if matches!(event.detail, Detail::StallEnd { .. } | Detail::Close(_)) {
                self.diagnoser.end(event.conn.id);
            }
        }
        let events = std::mem::take(&mut self.out);
        let reported = self.policy.filter(events, &mut self.metrics);
        for id in self.policy.stop_diagnosing.drain(..) {
            self.diagnoser.end(id);
        }
        for (event, annotation) in &reported {
            self.timelines.record(event);
            self.sink.write_event(event, annotation.as_ref());
        }
        if !reported.is_empty() {
            self.sink.flush();
        }
    }

    /// Takes in what the diagnosis worker found: unread requests open stalls, first diagnoses
    /// release their held events, changed ones become `stall.update`s.
    pub(super) fn on_findings(&mut self, findings: Vec<Finding>, maps: &KernelMaps, now: u64) {
        self.out.clear();
        let (scans, findings): (Vec<_>, Vec<_>) = findings
            .into_iter()
            .partition(|f| matches!(f, Finding::Unread { .. }));
        for scan in scans {
            if let Finding::Unread { found, took } = scan {
                self.on_unread(found, took, maps, now);
            }
        }
        self.emit(maps);
        // The looks read the sockets after the records the tracker has. Its byte counts are
        // brought up to the kernel's (a record still in flight is not "unseen"), and a stall
        // found over meanwhile (answered, or its socket closed) keeps what was known at its
        // start: the look told of what came after it.
        let mut over = HashSet::new();
        for finding in &findings {
            if let Finding::Diagnosed { id, .. } = finding {
                let Some((Some(sock), _)) = self.tracker.find_by_id(*id) else {
                    continue;
                };
                let state = maps.lookup(sock);
                if let Some(state) = &state {
                    self.tracker.refresh_counts(sock, state);
                }
                if self.tracker.stall_over_in(sock, state.as_ref()) {
                    over.insert(*id);
                }
            }
        }
        for outcome in self.diagnoser.apply(findings, &self.tracker) {
            match outcome {
                Outcome::Onset(id, found) => {
                    let Some(mut held) = self.held.by_conn.remove(&id) else {
                        // Reported already (held too long): the diagnosis follows.
                        if !over.contains(&id) {
                            self.push_update(id, found, now);
                        }
                        continue;
                    };
                    if let Some(Event {
                        detail: Detail::StallStart { diagnosis, .. },
                        ..
                    }) = held.events.first_mut().filter(|_| !over.contains(&id))
                    {
                        *diagnosis = Some(Box::new(found));
                    }
                    self.out.append(&mut held.events);
                }
                Outcome::Changed(id, found) if !over.contains(&id) => {
                    self.push_update(id, found, now)
                }
                Outcome::Changed(..) => {}
            }
        }
        self.write_out();
    }

    /// Reports the held stalls whose diagnosis is overdue (`all`: every one, at shutdown),
    /// with what is known.
    pub(super) fn release_held(&mut self, now: u64, all: bool) {
        let overdue: Vec<u64> = self
            .held
            .by_conn
            .iter()
            .filter(|(_, held)| all || held.deadline_ns <= now)
            .map(|(id, _)| *id)
            .collect();
        self.out.clear();
        for id in overdue {
            if let Some(mut held) = self.held.by_conn.remove(&id) {
                self.held.late += 1;
                self.out.append(&mut held.events);
            }
        }
        self.write_out();
    }

    /// Samples the user stacks of threads spinning behind open stalls (only those), and has
    /// the worker name their functions.
    pub(super) fn update_stacks(&mut self, probes: &mut Probes) {
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
            let Some(mut addresses) = probes.top_stack(tid) else {
                continue;
            };
            addresses.truncate(MAX_FRAMES);
            self.diagnoser.symbolize(id, pid, addresses);
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
                http2_stream: stall.http2_stream,
            },
        });
    }
}

/// For each event of `events`, whether it is a stall start whose end follows in `events` (the
/// kernel reported a quiet stretch past the threshold only when it ended, between sweeps).
fn ended_in_batch(events: &[Event]) -> Vec<bool> {
    let mut ending = HashSet::new();
    let mut ended = vec![false; events.len()];
    for (i, event) in events.iter().enumerate().rev() {
        match event.detail {
            Detail::StallEnd { .. } => {
                ending.insert(event.conn.id);
            }
            Detail::StallStart { .. } => ended[i] = ending.remove(&event.conn.id),
            _ => {}
        }
    }
    ended
}
