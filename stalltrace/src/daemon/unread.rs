//! Requests nobody reads: a server that never reads a request moves no data, so no kernel
//! program sees it. A paced sock_diag dump of open sockets, on the diagnosis worker,
//! finds them; the loop matches what it found with the tracked connections.
use std::time::Duration;

use stalltrace_core::tracker::model::Role;

use super::Daemon;
use crate::{diagnosis::UnreadRequest, probes::KernelMaps};

/// When the next scan for unread requests is due, and whether one is under way.
#[derive(Default)]
pub(super) struct UnreadScan {
    next_ns: u64,
    in_flight: bool,
}

impl Daemon {
    /// Has the worker scan for unread requests when a scan is due and none is under way.
    pub(super) fn request_unread_scan(&mut self, now: u64) {
        if self.unread.in_flight || now < self.unread.next_ns {
            return;
        }
        self.unread.in_flight = self.diagnoser.scan_unread();
        if !self.unread.in_flight {
            self.unread.next_ns = now + Duration::from_secs(1).as_nanos() as u64;
        }
    }

    /// Opens an `unanswered_request` stall for each server connection whose request has sat
    /// unread for the threshold. A dump costs in proportion to the host's sockets, so the next
    /// scan waits 50 times as long as this one took (1–30 s): under ~2 % of the worker's core.
    pub(super) fn on_unread(
        &mut self,
        found: Option<Vec<UnreadRequest>>,
        took: Duration,
        maps: &KernelMaps,
        now: u64,
    ) {
        self.unread.in_flight = false;
        let pause = match &found {
            Some(_) => (took * 50).clamp(Duration::from_secs(1), Duration::from_secs(30)),
            None => Duration::from_secs(60),
        };
        self.unread.next_ns = now + pause.as_nanos() as u64;
        for request in found.into_iter().flatten() {
            let Some((Some(sock), conn)) = self.tracker.find_by_endpoints(&request.endpoints)
            else {
                continue;
            };
            // A request that was read is the sweep's business.
            if conn.role != Role::Server || conn.stall.is_some() || conn.quiet_since().is_some() {
                continue;
            }
            if conn.owner.pid == 0 {
                // Never read, so never attributed: its process comes from /proc.
                if let Some(owner) = request.owner {
                    self.tracker.set_owner(sock, owner);
                }
            }
            let quiet_since = now.saturating_sub(u64::from(request.waiting_ms) * 1_000_000);
            let state = maps.lookup(sock);
            self.tracker
                .request_unread(sock, state.as_ref(), quiet_since, now, &mut self.out);
        }
    }
}
