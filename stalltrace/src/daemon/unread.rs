//! Requests nobody reads: a server that never reads a request moves no data, so no kernel
//! program sees it. A paced sock_diag dump of established sockets finds them.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use stalltrace_core::tracker::model::Role;

use super::Daemon;
use crate::sources::{procfs, sock_diag};

impl Daemon {
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
        let mut owners: Option<HashMap<u64, _>> = None;
        for entry in &entries {
            let Some((Some(sock), conn)) = self.tracker.find_by_endpoints(&entry.endpoints) else {
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
