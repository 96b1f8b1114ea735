//! The event loop's side of diagnosis: which stalls are open, what the worker last found about
//! each, and the diagnosis composed from it (cause, confidence, request, thread, blame chain).
//! Everything here is bookkeeping and lookups; the I/O is the worker's.
//!
//! Cost: a thread is first sampled when its request has been quiet for half the threshold (so
//! that the stall's first report has a CPU-share window). An open stall is looked at again
//! after 1 s, then less and less often as it ages (at its age, so 1, 2, 4, 8… s after onset,
//! at most every 30 s), and refresh looks are rationed to [`REFRESHES_PER_SEC`]: thousands of
//! open stalls cost a few percent of a core, not a core. First looks are never rationed.
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use stalltrace_common::Capture;
use stalltrace_core::{
    diagnosis::{self, Cause, Diagnosis, RequestReport, TcpSignals, ThreadReport, ThreadVerdict},
    protocols::{self, Privacy},
    tracker::{
        model::{Endpoints, Role, StallKind},
        Conn, Tracker,
    },
};
use tokio::sync::mpsc::Receiver;

use super::{
    blame::{blame_chain, is_event_loop, Links, Request},
    worker::{Finding, Job, Subject, Worker},
};

/// Refresh looks asked for per second at most (~50 µs of I/O each, on the worker).
const REFRESHES_PER_SEC: u64 = 200;
/// Open stalls whose diagnosis is kept (and refreshed) at most (~1 KiB each); later ones are
/// reported with what is known at their start, and counted.
const MAX_OPEN: usize = 32_768;
/// Threads sampled ahead of their stall at most: the worker keeps as many samples.
const MAX_PRESAMPLED: usize = super::worker::MAX_SAMPLES;
const SEC: u64 = 1_000_000_000;
/// The first refresh of a stall comes this soon after its onset.
const FIRST_REFRESH_NS: u64 = SEC;
/// Refreshes of an old stall come at least this often.
const MAX_REFRESH_NS: u64 = 30 * SEC;

/// What the worker's last look at a stall found.
#[derive(Clone, Default)]
struct Facts {
    thread: Option<ThreadReport>,
    fd_peer: Option<Endpoints>,
    tcp: Option<TcpSignals>,
    not_accepted: bool,
    executable_path: Option<String>,
    cgroup_path: Option<String>,
}

struct Open {
    diagnosis: Diagnosis,
    facts: Option<Facts>,
    request: Option<RequestReport>,
    retransmits_at_start: Option<u32>,
    /// When the stall was reported.
    since_ns: u64,
    next_look_ns: u64,
    /// A look was asked for and has not come back.
    in_flight: bool,
}

/// A diagnosis to report.
pub(crate) enum Outcome {
    /// The first full diagnosis of a new stall: for its `stall.start`.
    Onset(u64, Diagnosis),
    /// An open stall's diagnosis changed materially: a `stall.update`.
    Changed(u64, Diagnosis),
}

pub(crate) struct Diagnoser {
    stall_after_ns: u64,
    capture_raw: bool,
    privacy: Privacy,
    worker: Worker,
    /// Presamples and open stalls not kept: their tables were full.
    dropped: u64,
    open: HashMap<u64, Open>,
    /// Connections whose thread was sampled ahead of a likely stall.
    presampled: HashSet<u64>,
    /// When the daemon last lost events: stalls on connections older than that are partial.
    last_loss_ns: Option<u64>,
    /// Bumped whenever a stall opens or ends, or its thread starts or stops waiting in an event
    /// loop: the cached `links` are of that generation.
    generation: u64,
    /// The links between event loops' stalled requests, as of a generation.
    links: (u64, Links),
    /// Refresh looks that may be asked for now (a token bucket of one second's worth).
    refresh_tokens: u64,
    tokens_at_ns: u64,
}

impl Diagnoser {
    /// Starts the diagnosis worker; its findings arrive on the returned receiver, for
    /// [`Diagnoser::apply`].
    pub(crate) fn new(
        stall_after_ns: u64,
        capture_raw: bool,
        privacy: Privacy,
    ) -> Result<(Self, Receiver<Vec<Finding>>)> {
        let (worker, findings) = Worker::spawn()?;
        let diagnoser = Self {
            stall_after_ns,
            capture_raw,
            privacy,
            worker,
            dropped: 0,
            open: HashMap::new(),
            presampled: HashSet::new(),
            last_loss_ns: None,
            generation: 1,
            links: (0, Links::default()),
            refresh_tokens: REFRESHES_PER_SEC,
            tokens_at_ns: 0,
        };
        Ok((diagnoser, findings))
    }

    pub(crate) fn losses_seen_at(&mut self, now: u64) {
        self.last_loss_ns = Some(now);
    }

    /// Looks the worker's full queue refused (their stalls were reported with less).
    pub(crate) fn jobs_dropped(&self) -> u64 {
        self.worker.dropped()
    }

    /// Diagnoses not done or not kept: looks the worker's full queue refused, and presamples
    /// and open stalls past their tables' bounds.
    pub(crate) fn dropped(&self) -> u64 {
        self.worker.dropped() + self.dropped
    }

    /// Binaries the worker's symbol cache evicted.
    pub(crate) fn symbols_evicted(&self) -> u64 {
        self.worker.symbols_evicted()
    }

    /// Open stalls being diagnosed.
    pub(crate) fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Has the threads behind requests quiet for half the threshold sampled, once each; forgets
    /// the samples of requests answered since.
    pub(crate) fn presample(&mut self, tracker: &Tracker, now: u64) {
        let since = now.saturating_sub(self.stall_after_ns / 2);
        let mut suspects = HashSet::new();
        // More requests about to stall than samples kept: counted once per sweep, not once
        // per request and sweep.
        let mut refused = false;
        for sock in tracker.suspects(since) {
            let Some(conn) = tracker.conn(sock) else {
                continue;
            };
            suspects.insert(conn.id);
            if conn.owner.pid != 0 && !self.presampled.contains(&conn.id) {
                if self.presampled.len() >= MAX_PRESAMPLED {
                    refused = true;
                    continue;
                }
                let job = Job::Presample {
                    id: conn.id,
                    pid: conn.owner.pid,
                    tid: conn.owner.tid,
                };
                if self.worker.submit(job) {
                    self.presampled.insert(conn.id);
                }
            }
        }
        self.dropped += u64::from(refused);
        let answered: Vec<u64> = self
            .presampled
            .iter()
            .filter(|id| !suspects.contains(*id) && !self.open.contains_key(*id))
            .copied()
            .collect();
        for id in answered {
            self.presampled.remove(&id);
            self.worker.submit(Job::Forget { id });
        }
    }

    /// A stall opened on `conn`, whose request's copy is `capture` (the kernel's, when it
    /// is this request's), seen at `now`: asks the worker for a first look and returns what
    /// is known without it (request, confidence), to report if the look cannot be had in
    /// time, and whether a look was asked for (false: the worker's queue or the table of open
    /// stalls is full, or the stall has `ended` already; report it at once). An ended stall
    /// gets no look: the socket and the threads have moved on to what came after it.
    pub(crate) fn begin(
        &mut self,
        conn: &Conn,
        capture: Option<&Capture>,
        ended: bool,
        now: u64,
    ) -> (Diagnosis, bool) {
        let request = self.request_report(conn, capture);
        let mut open = Open {
            diagnosis: Diagnosis::default(),
            facts: None,
            request,
            retransmits_at_start: None,
            since_ns: now,
            next_look_ns: now + FIRST_REFRESH_NS,
            in_flight: false,
        };
        open.diagnosis = self.compose(conn, &open, None);
        if ended {
            return (open.diagnosis, false);
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&conn.id) {
            self.dropped += 1;
            return (open.diagnosis, false);
        }
        open.in_flight = self.worker.submit(Job::Diagnose {
            subject: subject(conn),
            onset: true,
        });
        let result = (open.diagnosis.clone(), open.in_flight);
        self.open.insert(conn.id, open);
        self.generation += 1;
        result
    }

    /// The request of `conn`'s stall as `capture` names it. A pipelined request is not the one
    /// the capture holds (the run's first).
    fn request_report(&self, conn: &Conn, capture: Option<&Capture>) -> Option<RequestReport> {
        let bytes = conn.pipelined_request().or(capture.map(Capture::data))?;
        protocols::recognize_with(bytes, self.privacy).map(|s| RequestReport {
            protocol: s.protocol.to_owned(),
            signature: s.display(),
            raw_hex: self.capture_raw.then(|| diagnosis::hex(bytes)),
        })
    }

    /// Names the request of the stall on `conn`, begun without one, from a copy learnt since
    /// (`capture`: the one its end's record carried). Returns the report, for its start.
    pub(crate) fn name_request(&mut self, conn: &Conn, capture: &Capture) -> Option<RequestReport> {
        let request = self.request_report(conn, Some(capture))?;
        if let Some(open) = self.open.get_mut(&conn.id) {
            open.request.get_or_insert_with(|| request.clone());
        }
        Some(request)
    }

    /// The stall on connection `id` ended, or its connection closed.
    pub(crate) fn end(&mut self, id: u64) {
        let was_open = self.open.remove(&id).is_some();
        if was_open {
            self.generation += 1;
        }
        if was_open | self.presampled.remove(&id) {
            self.worker.submit(Job::Forget { id });
        }
    }

    /// Asks the worker for fresh looks at the open stalls that are due, as the ration allows.
    pub(crate) fn refresh_due(&mut self, tracker: &Tracker, now: u64) {
        let earned = now.saturating_sub(self.tokens_at_ns) * REFRESHES_PER_SEC / SEC;
        if earned > 0 {
            self.refresh_tokens = (self.refresh_tokens + earned).min(REFRESHES_PER_SEC);
            self.tokens_at_ns = now;
        }
        for (id, open) in &mut self.open {
            if self.refresh_tokens == 0 {
                break;
            }
            if open.in_flight || open.next_look_ns > now {
                continue;
            }
            let Some((_, conn)) = tracker.find_by_id(*id) else {
                continue;
            };
            self.refresh_tokens -= 1;
            let age = now.saturating_sub(open.since_ns);
            open.next_look_ns = now + age.clamp(FIRST_REFRESH_NS, MAX_REFRESH_NS);
            open.in_flight = self.worker.submit(Job::Diagnose {
                subject: subject(conn),
                onset: false,
            });
        }
    }

    /// Has the worker look for requests nobody reads; false when its queue is full.
    pub(crate) fn scan_unread(&mut self) -> bool {
        self.worker.submit(Job::ScanUnread {
            stall_after_ns: self.stall_after_ns,
        })
    }

    /// Has the worker name the functions of a spinning thread's stack.
    pub(crate) fn symbolize(&mut self, id: u64, pid: u32, addresses: Vec<u64>) {
        self.worker.submit(Job::Symbolize { id, pid, addresses });
    }

    /// Takes in what the worker found; returns the diagnoses to report. All findings are
    /// recorded before any diagnosis is composed, so that stalls found together (a proxy and
    /// its upstream) are chained together.
    pub(crate) fn apply(&mut self, findings: Vec<Finding>, tracker: &Tracker) -> Vec<Outcome> {
        let mut looked_at = Vec::new();
        let mut outcomes = Vec::new();
        for finding in findings {
            match finding {
                Finding::Diagnosed {
                    id,
                    onset,
                    thread,
                    fd_peer,
                    tcp,
                    not_accepted,
                    executable_path,
                    cgroup_path,
                } => {
                    if let Some(open) = self.open.get_mut(&id) {
                        let waited = waits_in_event_loop(open);
                        open.in_flight = false;
                        open.facts = Some(Facts {
                            thread,
                            fd_peer,
                            tcp: tcp.map(|tcp| *tcp),
                            not_accepted,
                            executable_path,
                            cgroup_path,
                        });
                        if waits_in_event_loop(open) != waited {
                            self.generation += 1;
                        }
                        looked_at.push((id, onset));
                    }
                }
                Finding::Stack { id, frames } => {
                    if let Some(diagnosis) = self.set_stack(id, frames) {
                        outcomes.push(Outcome::Changed(id, diagnosis));
                    }
                }
                // The daemon takes these before (they open stalls rather than explain them).
                Finding::Unread { .. } => {}
            }
        }
        // The links between event loops' requests change only when stalls open or end, or a
        // thread starts or stops waiting in an event loop: reuse them until then (a refresh of
        // thousands of open stalls would rebuild them at every batch).
        let mut links = std::mem::take(&mut self.links);
        if !looked_at.is_empty() && links.0 != self.generation {
            links = (self.generation, self.links(tracker));
        }
        for (id, onset) in looked_at {
            let Some((_, conn)) = tracker.find_by_id(id) else {
                continue;
            };
            let Some(open) = self.open.get(&id) else {
                continue;
            };
            let mut next = self.compose(conn, open, Some((tracker, &links.1)));
            let open = self.open.get_mut(&id).expect("looked up above");
            if open.retransmits_at_start.is_none() {
                open.retransmits_at_start = next.tcp.map(|t| t.total_retransmits);
            }
            if let (Some(now), Some(start)) = (next.tcp, open.retransmits_at_start) {
                next.retransmits = Some(now.total_retransmits.saturating_sub(start));
            }
            // A stack found earlier stays until the thread stops spinning.
            keep_stack(&open.diagnosis, &mut next);
            let changed = next.differs_materially(&open.diagnosis);
            open.diagnosis = next.clone();
            if onset {
                outcomes.push(Outcome::Onset(id, next));
            } else if changed {
                outcomes.push(Outcome::Changed(id, next));
            }
        }
        self.links = links;
        outcomes
    }

    /// Records a user stack for the spinning thread of stall `id`; the new diagnosis if it
    /// changed.
    fn set_stack(&mut self, id: u64, stack: Vec<String>) -> Option<Diagnosis> {
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
            .filter_map(|(id, open)| match &open.diagnosis.thread {
                Some(ThreadReport {
                    id: tid,
                    verdict: ThreadVerdict::Spinning { .. },
                }) => Some((*id, *tid)),
                _ => None,
            })
            .filter_map(|(id, tid)| {
                let (_, conn) = tracker.find_by_id(id)?;
                Some((id, conn.owner.pid, tid))
            })
            .collect()
    }

    pub(crate) fn current(&self, id: u64) -> Option<&Diagnosis> {
        self.open.get(&id).map(|open| &open.diagnosis)
    }

    /// The first look at the open stall on connection `id` was asked for and has not come
    /// back: [`Diagnoser::current`] holds only what was known without it (the request, the
    /// confidence), not the cause, thread or TCP signals.
    pub(crate) fn first_look_pending(&self, id: u64) -> bool {
        self.open
            .get(&id)
            .is_some_and(|open| open.in_flight && open.facts.is_none())
    }

    /// The links from event loops' stalled inbound requests to the stalled outbound requests
    /// they wait on, from the open stalls.
    fn links(&self, tracker: &Tracker) -> Links {
        let mut inbound: HashMap<u32, Vec<Request>> = HashMap::new();
        let mut outbound: HashMap<u32, Vec<Request>> = HashMap::new();
        for (id, open) in &self.open {
            let Some((_, conn)) = tracker.find_by_id(*id) else {
                continue;
            };
            let Some(stall) = conn.stall.as_deref() else {
                continue;
            };
            let request = Request {
                conn: conn.id,
                at_ns: stall.request_ns,
                signature: open.request.as_ref().map(|r| r.signature.clone()),
            };
            let side = match conn.role {
                Role::Client => &mut outbound,
                Role::Server if waits_in_event_loop(open) => &mut inbound,
                Role::Server => continue,
            };
            side.entry(conn.owner.pid).or_default().push(request);
        }
        Links::assign(inbound, outbound)
    }

    /// The diagnosis of `conn` from what is known of it; the blame chain only with a tracker
    /// (and the open stalls' outbound requests).
    fn compose(&self, conn: &Conn, open: &Open, context: Option<(&Tracker, &Links)>) -> Diagnosis {
        let (mut confidence, mut confidence_reason) =
            diagnosis::confidence(conn.opened_ns, self.last_loss_ns);
        // Quiet since before the daemon started: that start was inferred, not seen.
        let inferred = conn
            .stall
            .as_ref()
            .is_some_and(|stall| conn.adopted && stall.quiet_since_ns < conn.opened_ns);
        if inferred && confidence_reason.is_none() {
            confidence = diagnosis::Confidence::Partial;
            confidence_reason = Some(
                "the request predates the daemon: its start is inferred from the socket's \
                 tcp_info (when data last came in and went out), not seen"
                    .into(),
            );
        }
        let mut found = Diagnosis {
            confidence,
            confidence_reason,
            request: open.request.clone(),
            ..Diagnosis::default()
        };
        let Some(facts) = &open.facts else {
            return found;
        };
        found.executable_path = facts.executable_path.clone();
        found.cgroup_path = facts.cgroup_path.clone();
        // Before the handshake completes there is no window and no data: tcp_info's data
        // and window fields mean nothing for a pending connect.
        let kind = conn.stall.as_ref().map(|s| s.kind);
        found.owed_bytes = conn.stall.as_ref().and_then(|s| s.owed_bytes);
        let connecting = kind == Some(StallKind::ConnectPending);
        if let Some(signals) = facts.tcp.filter(|_| !connecting) {
            let server = conn.role == Role::Server;
            let cause = if conn
                .stall
                .as_ref()
                .is_some_and(|s| s.http2_stream.is_some())
            {
                diagnosis::tcp_cause_of_stream(server, &signals)
            } else {
                diagnosis::tcp_cause(server, &signals)
            };
            found.cause = Some(match cause {
                // Bytes waiting inbound are the next request, not this one: what is stuck is
                // the response, and nothing of it waits to go out.
                Cause::RequestUnread | Cause::ReadNoReply
                    if kind == Some(StallKind::ResponseIncomplete) =>
                {
                    Cause::ResponseStopped
                }
                cause => cause,
            });
            if found.confidence_reason.is_none() {
                if let Some(reason) = diagnosis::unseen_bytes_reason(
                    conn.counted.reads(),
                    conn.counted.writes(),
                    &signals,
                ) {
                    found.confidence = diagnosis::Confidence::Partial;
                    found.confidence_reason = Some(reason);
                }
            }
            found.tcp = Some(signals);
        }
        if facts.not_accepted {
            found.cause = Some(Cause::NotAccepted);
        }
        let Some((tracker, links)) = context else {
            found.thread = facts.thread.clone();
            return found;
        };
        found.thread = resolved_thread(conn, facts, tracker);
        if found.cause == Some(Cause::ResponseUnread) {
            // The peer answered: this client is the root, there is nobody to blame behind it.
            return found;
        }
        let verdict = found.thread.as_ref().map(|t| t.verdict.clone());
        found.blame = blame_chain(conn, verdict, tracker, links, |next| {
            let facts = self.open.get(&next.id)?.facts.as_ref()?;
            resolved_thread(next, facts, tracker).map(|t| t.verdict)
        });
        found
    }
}

/// The thread behind this stall waits in an event loop (as last seen).
fn waits_in_event_loop(open: &Open) -> bool {
    matches!(
        open.facts.as_ref().and_then(|f| f.thread.as_ref()),
        Some(ThreadReport {
            verdict: ThreadVerdict::Waiting { syscall },
            ..
        }) if is_event_loop(syscall)
    )
}

fn subject(conn: &Conn) -> Subject {
    Subject {
        id: conn.id,
        pid: conn.owner.pid,
        tid: conn.owner.tid,
        endpoints: conn.endpoints,
        server: conn.role == Role::Server,
    }
}

/// The thread report of `facts` with its blocking fd joined to the tracked connection it is.
fn resolved_thread(conn: &Conn, facts: &Facts, tracker: &Tracker) -> Option<ThreadReport> {
    let mut thread = facts.thread.clone()?;
    if let ThreadVerdict::Blocked {
        fd_conn, fd_target, ..
    } = &mut thread.verdict
    {
        // A Unix socket's fd tells its own inode only (`gather::Gathered::fd_peer`).
        let target = facts.fd_peer.and_then(|e| match e.unix_inodes() {
            Some(inodes) => tracker.find_unix_by_inode(inodes.local),
            None => tracker.find_by_endpoints(&e),
        });
        *fd_conn = target.map(|(_, c)| c.id);
        if *fd_conn == Some(conn.id) {
            // Waiting on the stalled connection itself: the answer is its peer's.
            *fd_conn = None;
            *fd_target = Some("this connection".into());
        }
    }
    Some(thread)
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
