//! Per-connection stall timelines for `stalltrace show`.
use std::collections::{HashMap, VecDeque};

use stalltrace_core::tracker::{Detail, Event};

/// The stall history of connections, for `stalltrace show`: bounded to the most recently
/// stalled connections.
#[derive(Default)]
pub(super) struct Timelines {
    entries: HashMap<u64, VecDeque<Event>>,
    order: VecDeque<u64>,
}

const TIMELINE_CONNS: usize = 4096;
const TIMELINE_EVENTS: usize = 32;

impl Timelines {
    pub(super) fn record(&mut self, event: &Event) {
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

    pub(super) fn of(&self, id: u64) -> impl Iterator<Item = &Event> {
        self.entries.get(&id).into_iter().flatten()
    }
}
