//! What turns "a connection went quiet" into an answer: diagnoses of new and open stalls, the
//! `why` statistics, detection of requests nobody reads, and per-connection timelines for
//! `show`.
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use stalltrace_common::{Capture, ConnEvent, EventKind};

use super::Daemon;
use crate::{
    diagnosis::Diagnosis,
    probes::{KernelMaps, Probes},
    signature,
    sources::{procfs, sock_diag},
    tracker::{model::Role, Conn, Detail, Event},
    why::WhyKey,
};

/// Frames of a spinning thread's stack reported.
const MAX_FRAMES: usize = 12;

/// Signature of a request whose bytes were not captured.
const NOT_CAPTURED: &str = "(not captured)";

impl Daemon {
    /// Feeds sampled exchanges to `why`: a reported request start carries its captured bytes,
    /// its completion follows.
    pub(super) fn sample_exchange(&mut self, event: &ConnEvent, capture: Option<Capture>) {
        let sock = event.header.sock;
        let sampled_start = match event.kind() {
            Some(EventKind::RequestStarted) => true,
            // A passive connection's first transfer, when it started a request.
            Some(EventKind::Discovered) => capture.is_some(),
            Some(EventKind::ExchangeCompleted) => {
                self.why.exchange_completed(sock, event.header.ts_ns);
                false
            }
            Some(EventKind::Closed) => {
                self.why.forget(sock);
                false
            }
            _ => false,
        };
        if !sampled_start {
            return;
        }
        let Some(conn) = self.tracker.conn(sock) else {
            return;
        };
        let signature = capture.and_then(|c| signature::recognize(c.data()));
        let signature = signature.map_or_else(|| NOT_CAPTURED.to_owned(), |s| s.display());
        self.why
            .request_started(sock, why_key(conn, signature), event.header.ts_ns);
    }

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
        for (id, pid, tid) in spinning {
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

    /// Finds requests that sit unread in a server connection's receive queue: the
    /// application never read them, so no transfer was reported. A dump of established
    /// sockets costs in proportion to the host's sockets, so the scan is spaced to stay under
    /// ~2 % of a core.
    pub(super) fn scan_unread(&mut self, now: u64) {
        let started = Instant::now();
        let entries = match sock_diag::dump_established_unread() {
            Ok(entries) => entries,
            Err(err) => {
                log::warn!("sock_diag dump failed ({err}); unread requests go undetected");
                self.next_unread_scan_ns = now + Duration::from_secs(60).as_nanos() as u64;
                return;
            }
        };
        let pause = (started.elapsed() * 50).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.next_unread_scan_ns = now + pause.as_nanos() as u64;
        let mut by_endpoints: Option<HashMap<_, u64>> = None;
        let mut owners: Option<HashMap<u64, _>> = None;
        for entry in &entries {
            let index = by_endpoints.get_or_insert_with(|| {
                self.tracker
                    .conns()
                    .filter_map(|(sock, conn)| Some((conn.endpoints, sock?)))
                    .collect()
            });
            let Some(&sock) = index.get(&entry.endpoints) else {
                continue;
            };
            let Some(conn) = self.tracker.conn(sock) else {
                continue;
            };
            // A request that was read is the sweep's business.
            if conn.role != Role::Server || conn.stall.is_some() || conn.quiet_since.is_some() {
                continue;
            }
            let Some(signals) = sock_diag::query(&entry.endpoints)
                .ok()
                .flatten()
                .and_then(|e| e.signals)
            else {
                continue;
            };
            let quiet_since = now.saturating_sub(u64::from(signals.last_data_recv_ms) * 1_000_000);
            if now.saturating_sub(quiet_since) < self.tracker.stall_after_ns() {
                continue;
            }
            if conn.owner.pid == 0 {
                // Never read, so never attributed: find its process in /proc.
                let owners = owners.get_or_insert_with(procfs::socket_owners);
                if let Some(owner) = owners.get(&entry.inode) {
                    self.tracker.set_owner(sock, *owner);
                }
            }
            self.tracker
                .request_unread(sock, quiet_since, now, &mut self.out);
        }
    }
}

fn why_key(conn: &Conn, signature: String) -> WhyKey {
    let endpoint = match conn.role {
        Role::Server => format!(":{}", conn.endpoints.local_port),
        Role::Client => SocketAddr::new(conn.endpoints.peer, conn.endpoints.peer_port).to_string(),
    };
    let executable = if conn.owner.pid == 0 {
        "-".to_owned()
    } else {
        conn.owner.comm.as_str().into_owned()
    };
    WhyKey {
        executable,
        role: conn.role.as_str().into(),
        endpoint,
        signature,
    }
}

/// The stall history of connections, for `stalltrace show`: bounded to the most recently
/// stalled connections.
#[derive(Default)]
pub struct Timelines {
    entries: HashMap<u64, VecDeque<Event>>,
    order: VecDeque<u64>,
}

const TIMELINE_CONNS: usize = 4096;
const TIMELINE_EVENTS: usize = 32;

impl Timelines {
    fn record(&mut self, event: &Event) {
        let stall_related = matches!(
            event.detail,
            Detail::StallStart { .. } | Detail::StallUpdate { .. } | Detail::StallEnd { .. }
        );
        let id = event.conn.id;
        if !stall_related && !self.entries.contains_key(&id) {
            return;
        }
        if !self.entries.contains_key(&id) {
            if self.order.len() >= TIMELINE_CONNS {
                if let Some(oldest) = self.order.pop_front() {
                    self.entries.remove(&oldest);
                }
            }
            self.order.push_back(id);
        }
        let events = self.entries.entry(id).or_default();
        if events.len() >= TIMELINE_EVENTS {
            events.pop_front();
        }
        events.push_back(event.clone());
    }

    pub fn of(&self, id: u64) -> impl Iterator<Item = &Event> {
        self.entries.get(&id).into_iter().flatten()
    }
}
