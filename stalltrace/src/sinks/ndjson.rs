//! The NDJSON event stream: one JSON object per line to stdout or an events file (appended,
//! never truncated), and to every `watch` client. Lines for stdout or the file go through the
//! writer thread (`writer.rs`): when its queue is full they are dropped and counted
//! (`output_blocked`), never waited for.
use std::{io::Write, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::sync::broadcast;

use stalltrace_core::{
    api::schema::{event_json, EVENT_SCHEMA},
    loss::LossReport,
    timefmt::Clock,
    tracker::{model::Endpoints, ConnRef, Event},
};

use crate::{
    config::Annotation,
    sinks::writer::{FileOptions, Writer},
    sources::cgroups::Names,
};

/// Lines buffered per `watch` client before the slowest starts losing them (counted).
const WATCH_BUFFER: usize = 8192;
/// Bytes of event lines queued for a slow stdout or events file before lines are dropped.
pub const DEFAULT_EVENTS_BUFFER: usize = 4 << 20;
/// Lines are handed to the writer thread in chunks of about this size (and at every flush).
const CHUNK: usize = 64 * 1024;
/// Room past [`CHUNK`] in a fresh chunk for the line that fills it (most are below 1 KiB).
const LINE_ROOM: usize = 4 * 1024;

/// An event line as sent to `watch` clients, with what their filters select on.
#[derive(Debug)]
pub struct WatchLine {
    pub line: String,
    pub pid: u32,
    pub comm: String,
    /// `None` for events not about one connection (`loss`).
    pub endpoints: Option<Endpoints>,
    /// The owner's cgroup id (0: none known) and its path, if resolved.
    pub cgroup_id: u64,
    pub cgroup_path: Option<Arc<str>>,
    /// The connection's Unix path (`--path`), if it is a Unix connection.
    pub path: Option<String>,
}

pub struct EventSink {
    writer: Writer,
    /// Lines accepted for the writer, not handed over yet.
    pending: Vec<u8>,
    /// Lines were dropped for a full queue and their `loss` event is not written yet: until
    /// it is, every line is dropped, so that the report follows the gap in the stream.
    blocked: bool,
    /// Lines dropped because the output did not keep up.
    output_blocked: u64,
    destination: String,
    clock: Clock,
    watchers: broadcast::Sender<Arc<WatchLine>>,
    /// Resolves owners' cgroup ids to paths (`None`: events carry the id alone).
    cgroups: Option<Names>,
}

#[derive(Serialize)]
struct LossEventJson<'a> {
    time: String,
    event: &'static str,
    schema: u32,
    loss: &'a LossReport,
}

impl EventSink {
    /// Events go to the file described by `file` (created if missing, appended to) or, without
    /// one, to stdout; at most `buffer` bytes wait for a slow output.
    pub fn open(file: Option<FileOptions>, buffer: usize) -> Result<Self> {
        Ok(match file {
            Some(options) => {
                let destination = options.path.display().to_string();
                Self::with_writer(Writer::to_file(options, buffer)?, destination)
            }
            None => {
                use std::os::fd::AsFd as _;
                // Our own descriptor: written without std's stdout lock and line buffering.
                let stdout = std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating stdout to write events to it")?;
                Self::with_writer(
                    Writer::to_stream(Box::new(std::fs::File::from(stdout)), buffer),
                    "stdout".to_owned(),
                )
            }
        })
    }

    /// A sink writing to `out`, described as `destination` in messages.
    pub fn new(out: Box<dyn Write + Send>, destination: String) -> Self {
        Self::to_stream(out, destination, DEFAULT_EVENTS_BUFFER)
    }

    /// A sink writing to `out`, with at most `buffer` bytes waiting for it.
    pub fn to_stream(out: Box<dyn Write + Send>, destination: String, buffer: usize) -> Self {
        Self::with_writer(Writer::to_stream(out, buffer), destination)
    }

    fn with_writer(writer: Writer, destination: String) -> Self {
        let (watchers, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            writer,
            pending: Vec::with_capacity(CHUNK),
            blocked: false,
            output_blocked: 0,
            destination,
            clock: Clock::calibrate(),
            watchers,
            cgroups: None,
        }
    }

    /// Adds `cgroup.path` and `container.id` to events from now on, resolved by `names`.
    pub(crate) fn resolve_cgroups(&mut self, names: Names) {
        self.cgroups = Some(names);
    }

    /// The path of cgroup `id`, if resolved (never waits: see [`Names::path`]).
    pub(crate) fn cgroup_path(&self, id: u64) -> Option<Arc<str>> {
        self.cgroups.as_ref()?.path(id)
    }

    /// Lookups of cgroup ids turned away by a full table or queue.
    pub(crate) fn cgroups_dropped(&self) -> u64 {
        self.cgroups.as_ref().map_or(0, Names::dropped)
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Re-measures the monotonic → wall-clock offset (NTP may have adjusted the wall clock).
    pub fn recalibrate(&mut self) {
        self.clock = Clock::calibrate();
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchLine>> {
        self.watchers.subscribe()
    }

    pub fn watchers(&self) -> broadcast::Sender<Arc<WatchLine>> {
        self.watchers.clone()
    }

    /// Lines that could not be written (counted as loss).
    pub fn write_failed(&self) -> u64 {
        self.writer.failed()
    }

    /// Lines dropped because the output did not keep up (counted as loss).
    pub fn output_blocked(&self) -> u64 {
        self.output_blocked
    }

    pub fn written(&self) -> u64 {
        self.writer.written()
    }

    /// Reopens the events file (SIGHUP), on the writer thread.
    pub fn reopen(&self) {
        self.writer.reopen();
    }

    /// Hands over what is pending and waits at most `grace` for the writer to finish.
    pub fn close(&mut self, grace: Duration) {
        self.flush();
        let abandoned = self.writer.close(grace);
        if abandoned > 0 {
            log::warn!(
                "{abandoned} bytes of events not written: {} did not take them within {grace:?}",
                self.destination
            );
        }
    }

    pub fn write_events(&mut self, events: &[Event]) {
        for event in events {
            self.write_event(event, None);
        }
    }

    /// Writes `event`, with what the rule that matched its stall adds (`stall.severity`,
    /// `stall.rule`).
    pub fn write_event(&mut self, event: &Event, annotation: Option<&Annotation>) {
        let mut json = event_json(event, self.clock.rfc3339(event.at_ns));
        if let (Some(annotation), Some(stall)) = (annotation, json.item.stall.as_mut()) {
            stall.severity = annotation.severity.map(|s| s.as_str().into());
            stall.rule = annotation.rule.clone().map(Into::into);
        }
        let cgroup_path = self.cgroup_path(event.conn.owner.cgroup_id);
        if let Some(path) = &cgroup_path {
            json.item.set_cgroup_path(path);
        }
        let start = self.encode(&json);
        self.write_encoded(start, Some((&event.conn, cgroup_path)));
    }

    /// Writes a `loss` event; `false` when the output has no room for it yet (nothing was
    /// written anywhere: report the same losses again later).
    pub fn write_loss(&mut self, report: &LossReport, at_ns: u64) -> bool {
        let json = LossEventJson {
            time: self.clock.rfc3339(at_ns),
            event: "loss",
            schema: EVENT_SCHEMA,
            loss: report,
        };
        let start = self.encode(&json);
        if !self.writer.has_room(start, self.pending.len() - start) {
            self.pending.truncate(start);
            return false;
        }
        // The report of a gap goes first after it.
        self.blocked = false;
        self.send(start, None);
        true
    }

    /// Writes the line encoded at `start` of the pending bytes; `conn` is what `watch` filters
    /// select on, with its cgroup's path (`None`: not about one connection).
    fn write_encoded(&mut self, start: usize, conn: Option<(&ConnRef, Option<Arc<str>>)>) {
        if !self.blocked && !self.writer.has_room(start, self.pending.len() - start) {
            self.blocked = true;
            log::debug!(
                "{} is not keeping up: dropping event lines",
                self.destination
            );
        }
        if self.blocked {
            self.output_blocked += 1;
        }
        self.send(start, conn);
    }

    /// Encodes `json` as a line after the pending ones (not copied again on its way to the
    /// writer); returns where it starts.
    fn encode(&mut self, json: &impl Serialize) -> usize {
        let start = self.pending.len();
        serde_json::to_writer(&mut self.pending, json).expect("event JSON serializes");
        self.pending.push(b'\n');
        start
    }

    /// The line encoded at `start` to `watch` clients, and kept for the output unless it is
    /// blocked.
    fn send(&mut self, start: usize, conn: Option<(&ConnRef, Option<Arc<str>>)>) {
        if self.watchers.receiver_count() > 0 {
            let _ = self.watchers.send(Arc::new(WatchLine {
                line: String::from_utf8_lossy(&self.pending[start..]).into_owned(),
                pid: conn.as_ref().map_or(0, |(c, _)| c.owner.pid),
                comm: conn
                    .as_ref()
                    .map(|(c, _)| c.owner.comm.as_str().into_owned())
                    .unwrap_or_default(),
                endpoints: conn.as_ref().map(|(c, _)| c.endpoints),
                cgroup_id: conn.as_ref().map_or(0, |(c, _)| c.owner.cgroup_id),
                path: conn
                    .as_ref()
                    .and_then(|(c, _)| c.unix.as_ref())
                    .map(|u| u.path().to_owned()),
                cgroup_path: conn.and_then(|(_, path)| path),
            }));
        }
        if self.blocked {
            self.pending.truncate(start);
        } else if self.pending.len() >= CHUNK {
            self.flush();
        }
    }

    /// Hands the pending lines to the writer thread, which writes them out promptly; never
    /// blocks.
    pub fn flush(&mut self) {
        if !self.pending.is_empty() {
            let mut chunk =
                std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK + LINE_ROOM));
            // Queued chunks hold no spare capacity (the queue's bound counts their lengths);
            // shrinking a heap block this size is done in place, without a copy.
            chunk.shrink_to_fit();
            self.writer.push(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Condvar, Mutex},
        time::Instant,
    };

    use super::*;
    use stalltrace_core::{
        loss::LossCounters,
        tracker::{
            model::{Comm, Owner, Role, Transport},
            Detail,
        },
    };

    /// An output that takes nothing until opened, then keeps what it is given.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.seen.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn open_event(id: u64) -> Event {
        Event {
            at_ns: 0,
            conn: ConnRef {
                id,
                role: Role::Client,
                owner: Owner {
                    pid: 1,
                    tid: 1,
                    comm: Comm::new("t"),
                    cgroup_id: 0,
                },
                endpoints: Endpoints {
                    transport: Transport::Tcp,
                    local: "127.0.0.1".parse().unwrap(),
                    local_port: 1,
                    peer: "127.0.0.1".parse().unwrap(),
                    peer_port: 2,
                    netns: 0,
                },
                unix: None,
            },
            detail: Detail::Open { adopted: false },
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_and_reports_the_gap_right_after_it() {
        let gate = Gate::default();
        let mut sink = EventSink::to_stream(Box::new(gate.clone()), "test".into(), 2000);
        let started = Instant::now();
        for id in 0..50 {
            sink.write_events(&[open_event(id)]);
            sink.flush();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the sink waited"
        );
        let dropped = sink.output_blocked();
        assert!(dropped > 0 && dropped < 50, "{dropped} dropped");
        let accepted = 50 - dropped;

        // The consumer catches up; lines are still dropped until the gap is reported.
        *gate.open.0.lock().unwrap() = true;
        gate.open.1.notify_all();
        while sink.written() < accepted {
            std::thread::sleep(Duration::from_millis(5));
        }
        sink.write_events(&[open_event(100)]);
        assert_eq!(sink.output_blocked(), dropped + 1);
        let total = LossCounters {
            output_blocked: sink.output_blocked(),
            ..LossCounters::default()
        };
        assert!(sink.write_loss(&LossReport { new: total, total }, 0));
        sink.write_events(&[open_event(101)]);
        sink.close(Duration::from_secs(5));

        let text = String::from_utf8(gate.seen.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, accepted + 2);
        let ids: Vec<u64> = lines[..accepted as usize]
            .iter()
            .map(|line| line["conn"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ids,
            (0..accepted).collect::<Vec<_>>(),
            "the lines before the gap, in order"
        );
        let report = &lines[accepted as usize];
        assert_eq!(report["event"], "loss");
        assert!(
            lines.iter().all(|line| line["schema"] == EVENT_SCHEMA),
            "every event carries the schema version"
        );
        assert_eq!(report["loss"]["new"]["output_blocked"], dropped + 1);
        assert_eq!(lines[accepted as usize + 1]["conn"]["id"], 101);
    }
}
