//! The NDJSON event stream: one JSON object per line to stdout or an events file (appended,
//! never truncated), and to every `watch` client.
use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::sync::broadcast;

use stalltrace_core::{
    api::schema::event_json,
    loss::LossReport,
    timefmt::Clock,
    tracker::{model::Endpoints, ConnRef, Event},
};

/// Lines buffered per `watch` client before the slowest starts losing them (counted).
const WATCH_BUFFER: usize = 8192;

/// An event line as sent to `watch` clients, with what their filters select on.
#[derive(Debug)]
pub struct WatchLine {
    pub line: String,
    pub pid: u32,
    pub comm: String,
    /// `None` for events not about one connection (`loss`).
    pub endpoints: Option<Endpoints>,
}

pub struct EventSink {
    out: BufWriter<Box<dyn Write + Send>>,
    destination: String,
    clock: Clock,
    watchers: broadcast::Sender<Arc<WatchLine>>,
    write_failed: u64,
    written: u64,
    /// Reused encoding buffer.
    line: Vec<u8>,
}

#[derive(Serialize)]
struct LossEventJson<'a> {
    time: String,
    event: &'static str,
    loss: &'a LossReport,
}

impl EventSink {
    /// Events go to `path` (created if missing, appended to) or, without one, to stdout.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let (out, destination): (Box<dyn Write + Send>, String) = match path {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the events file {}", path.display()))?;
                (Box::new(file), path.display().to_string())
            }
            None => (Box::new(std::io::stdout()), "stdout".to_owned()),
        };
        Ok(Self::new(out, destination))
    }

    /// A sink writing to `out`, described as `destination` in messages.
    pub fn new(out: Box<dyn Write + Send>, destination: String) -> Self {
        let (watchers, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            out: BufWriter::with_capacity(64 * 1024, out),
            destination,
            clock: Clock::calibrate(),
            watchers,
            write_failed: 0,
            written: 0,
            line: Vec::with_capacity(1024),
        }
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
        self.write_failed
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write_events(&mut self, events: &[Event]) {
        for event in events {
            let json = event_json(event, self.clock.rfc3339(event.at_ns));
            self.write_line(&json, Some(&event.conn));
        }
    }

    pub fn write_loss(&mut self, report: &LossReport, at_ns: u64) {
        let json = LossEventJson {
            time: self.clock.rfc3339(at_ns),
            event: "loss",
            loss: report,
        };
        self.write_line(&json, None);
    }

    /// Writes one line; `conn` is what `watch` filters select on (`None`: not about one
    /// connection).
    fn write_line(&mut self, json: &impl Serialize, conn: Option<&ConnRef>) {
        self.line.clear();
        serde_json::to_writer(&mut self.line, json).expect("event JSON serializes");
        self.line.push(b'\n');
        if self.out.write_all(&self.line).is_ok() {
            self.written += 1;
        } else {
            self.count_write_failure();
        }
        if self.watchers.receiver_count() > 0 {
            let _ = self.watchers.send(Arc::new(WatchLine {
                line: String::from_utf8_lossy(&self.line).into_owned(),
                pid: conn.map_or(0, |c| c.owner.pid),
                comm: conn
                    .map(|c| c.owner.comm.as_str().into_owned())
                    .unwrap_or_default(),
                endpoints: conn.map(|c| c.endpoints),
            }));
        }
    }

    /// Pushes buffered lines out; called after every batch so shippers see events promptly.
    pub fn flush(&mut self) {
        if self.out.flush().is_err() {
            self.count_write_failure();
        }
    }

    fn count_write_failure(&mut self) {
        if self.write_failed == 0 {
            log::error!(
                "writing events to {} failed; further failures are counted as loss \
                 (events_write_failed)",
                self.destination
            );
        }
        self.write_failed += 1;
    }
}
