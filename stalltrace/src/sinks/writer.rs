//! The event writer: stdout or the events file is written by a thread of its own, behind a
//! queue bounded in bytes, so that a consumer that stops reading (a full pipe, a stuck log
//! shipper, a slow disk) never stalls the ring buffer drain, the sweeps or the API.
//!
//! The daemon's loop only ever appends lines to a buffer and hands full buffers over
//! (`try_push`, never blocking); when the queue is full, the caller drops lines and counts them.
//! The thread also keeps the events file healthy like a production log: it reopens it on
//! request (SIGHUP) and when the path no longer names the open file (renamed or deleted by
//! logrotate), rotates it by size when asked to, creates it with a restrictive mode, and counts
//! every line it fails to write.
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// How often the writer checks that the events file's path still names the open file.
const CHECK_PATH_EVERY: Duration = Duration::from_secs(1);

/// Where the events file lives and how it is kept.
#[derive(Clone, Debug)]
pub struct FileOptions {
    pub path: PathBuf,
    /// Permissions given to the file when the daemon creates it (never changed afterwards).
    pub mode: u32,
    /// Rotate when the file would grow past this many bytes (`None`: never).
    pub max_size: Option<u64>,
    /// Rotated files kept: `path.1` (newest) … `path.N`.
    pub keep: u32,
}

impl FileOptions {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            mode: 0o600,
            max_size: None,
            keep: 5,
        }
    }
}

/// The daemon's end of the writer thread.
pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
    /// Bytes the queue may hold.
    capacity: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Signals the thread: work queued, a reopen requested, or closing.
    wake: Condvar,
    /// Signals the daemon: the thread has finished.
    done: Condvar,
    /// Bytes handed over and not yet written (or failed).
    queued: AtomicUsize,
    written: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    reopen: bool,
    closing: bool,
    finished: bool,
}

/// Whole lines.
struct Chunk {
    bytes: Vec<u8>,
}

enum Target {
    Stream(Box<dyn Write + Send>),
    File(LogFile),
}

impl Writer {
    /// Events appended to the file described by `options`, opened (and created) now so that
    /// a bad path fails the start-up.
    pub fn to_file(options: FileOptions, capacity: usize) -> Result<Self> {
        let file = LogFile::open(options)?;
        Ok(Self::spawn(Target::File(file), capacity))
    }

    /// Events written to `out` (stdout, or anything else).
    pub fn to_stream(out: Box<dyn Write + Send>, capacity: usize) -> Self {
        Self::spawn(Target::Stream(out), capacity)
    }

    fn spawn(target: Target, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            queued: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let thread = thread::Builder::new()
            .name("event-writer".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, target)
            })
            .expect("spawning the event writer thread");
        Self {
            shared,
            thread: Some(thread),
            capacity,
        }
    }

    /// Whether `bytes` more can be handed over now, with `pending` bytes already waiting on
    /// the caller's side.
    pub fn has_room(&self, pending: usize, bytes: usize) -> bool {
        self.shared.queued.load(Ordering::Acquire) + pending + bytes <= self.capacity
    }

    /// Hands over whole lines; never blocks on the output (the lock is only held by the thread
    /// to pop a chunk). The caller checked `has_room`.
    pub fn push(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.shared.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        let mut state = self.shared.lock();
        state.chunks.push_back(Chunk { bytes });
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Asks the thread to reopen the events file (SIGHUP); nothing to do for a stream.
    pub fn reopen(&self) {
        self.shared.lock().reopen = true;
        self.shared.wake.notify_one();
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Lines that could not be written (write errors).
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Bytes queued and not written yet.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Writes out what is queued, waiting at most `grace` for a blocked output; returns the
    /// bytes given up on.
    pub fn close(&mut self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_one();
        while !state.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.queued();
            }
            state = self
                .shared
                .done
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(state);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        0
    }
}

impl Drop for Writer {
    /// Lets the thread write out what is queued and end, without waiting for it.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread: writes chunks in order, reopens and rotates the events file.
fn run(shared: &Shared, mut target: Target) {
    let mut next_check = Instant::now() + CHECK_PATH_EVERY;
    let mut output = Output::default();
    loop {
        let (chunk, reopen, closing) = {
            let mut state = shared.lock();
            while state.chunks.is_empty() && !state.reopen && !state.closing {
                let left = next_check.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = shared
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            (
                state.chunks.pop_front(),
                std::mem::take(&mut state.reopen),
                state.closing,
            )
        };
        if let Target::File(file) = &mut target {
            if reopen {
                log::info!(
                    "reopening the events file {} (SIGHUP)",
                    file.path().display()
                );
                file.reopen();
            } else if Instant::now() >= next_check {
                file.follow_path();
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + CHECK_PATH_EVERY;
            }
        } else {
            next_check = Instant::now() + CHECK_PATH_EVERY;
        }
        match chunk {
            Some(chunk) => {
                let (written, failed) = match &mut target {
                    Target::Stream(out) => output.write_lines(out, &chunk.bytes),
                    Target::File(file) => file.write_lines(&mut output, &chunk.bytes),
                };
                shared.written.fetch_add(written, Ordering::Relaxed);
                shared.failed.fetch_add(failed, Ordering::Relaxed);
                shared.queued.fetch_sub(chunk.bytes.len(), Ordering::AcqRel);
            }
            None if closing => break,
            None => {}
        }
    }
    if let Target::Stream(out) = &mut target {
        let _ = out.flush();
    }
    shared.lock().finished = true;
    shared.done.notify_all();
}

/// Line-level write accounting, shared by both targets.
#[derive(Default)]
struct Output {
    /// The last write failed inside a line: the next one starts with a newline so that the
    /// torn line does not swallow the next one.
    torn: bool,
    failures_logged: bool,
}

impl Output {
    /// Writes whole lines; returns (lines written, lines failed). A line partly written before
    /// an error counts as failed.
    fn write_lines(&mut self, out: &mut dyn Write, bytes: &[u8]) -> (u64, u64) {
        let lines = bytecount(bytes);
        if self.torn {
            if write_fully(out, b"\n").0 != 1 {
                return (0, lines);
            }
            self.torn = false;
        }
        let (done, error) = write_fully(out, bytes);
        let written = if done == bytes.len() {
            lines
        } else {
            bytecount(&bytes[..done])
        };
        if let Some(error) = error {
            self.torn = done > 0 && bytes[done - 1] != b'\n';
            if !self.failures_logged {
                log::error!(
                    "writing events failed ({error}); further failures are counted as loss \
                     (events_write_failed)"
                );
                self.failures_logged = true;
            }
        } else if let Err(error) = out.flush() {
            log::debug!("flushing events: {error}");
        }
        (written, lines - written)
    }
}

/// Writes until done or an error; returns the bytes written and the error.
fn write_fully(out: &mut dyn Write, bytes: &[u8]) -> (usize, Option<io::Error>) {
    let mut done = 0;
    while done < bytes.len() {
        match out.write(&bytes[done..]) {
            Ok(0) => return (done, Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// Lines in `bytes` (SIMD search: chunks are megabytes a second under load).
fn bytecount(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// The events file, as the writer thread keeps it.
struct LogFile {
    options: FileOptions,
    file: File,
    /// Bytes in the file, as far as we know (re-read before rotation decisions).
    size: u64,
    /// The last reopening failed (logged once, retried every second).
    reopen_failing: bool,
}

impl LogFile {
    fn open(options: FileOptions) -> Result<Self> {
        let file = create_or_append(&options.path, options.mode)
            .with_context(|| format!("opening the events file {}", options.path.display()))?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(Self {
            options,
            file,
            size,
            reopen_failing: false,
        })
    }

    fn path(&self) -> &Path {
        &self.options.path
    }

    /// Opens the path anew; on failure keeps writing to the file already open.
    fn reopen(&mut self) {
        match create_or_append(&self.options.path, self.options.mode) {
            Ok(file) => {
                self.size = file.metadata().map_or(0, |m| m.len());
                self.file = file;
                self.reopen_failing = false;
            }
            Err(err) => {
                if !self.reopen_failing {
                    log::error!(
                        "reopening the events file {}: {err}; still writing to the file open \
                         before, retrying every second",
                        self.options.path.display()
                    );
                }
                self.reopen_failing = true;
            }
        }
    }

    /// Reopens when the path no longer names the open file: it was renamed (logrotate
    /// `create`) or deleted. A file truncated in place (`copytruncate`) needs nothing: it is
    /// open for appending.
    fn follow_path(&mut self) {
        let open = self.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        let named = match std::fs::metadata(&self.options.path) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(_) => return,
        };
        if named != open {
            if self.reopen_failing {
                self.reopen();
                return;
            }
            log::info!(
                "the events file {} was {}: reopening it",
                self.options.path.display(),
                if named.is_none() {
                    "moved or deleted"
                } else {
                    "replaced"
                }
            );
            self.reopen();
        }
    }

    /// Writes whole lines, rotating before a line that would take the file past the size
    /// limit (a file always takes at least one line).
    fn write_lines(&mut self, output: &mut Output, mut bytes: &[u8]) -> (u64, u64) {
        let Some(max_size) = self.options.max_size else {
            return output.write_lines(&mut self.file, bytes);
        };
        // Truncation (copytruncate) or another writer may have changed the size.
        if let Ok(m) = self.file.metadata() {
            self.size = m.len();
        }
        let (mut written, mut failed) = (0, 0);
        while !bytes.is_empty() {
            let room = max_size.saturating_sub(self.size) as usize;
            let mut take = fitting_lines(bytes, room);
            if take == 0 {
                if self.size > 0 {
                    self.rotate();
                    continue;
                }
                take = bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |i| i + 1);
            }
            let (w, f) = output.write_lines(&mut self.file, &bytes[..take]);
            self.size += take as u64;
            written += w;
            failed += f;
            bytes = &bytes[take..];
        }
        (written, failed)
    }

    /// `path` becomes `path.1`, `path.1` becomes `path.2`…, `path.keep` is overwritten; then a
    /// new `path` is created.
    fn rotate(&mut self) {
        let path = &self.options.path;
        let numbered = |n: u32| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        for n in (1..self.options.keep).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => log::warn!("rotating {}: {err}", numbered(n).display()),
            }
        }
        if let Err(err) = std::fs::rename(path, numbered(1)) {
            log::error!("rotating the events file {}: {err}", path.display());
            // Do not try again before every line: start counting anew.
            self.size = 0;
            return;
        }
        self.reopen();
        self.size = 0;
    }
}

/// The longest prefix of whole lines of `bytes` within `room` bytes.
fn fitting_lines(bytes: &[u8], room: usize) -> usize {
    let within = &bytes[..room.min(bytes.len())];
    if within.len() == bytes.len() {
        return bytes.len();
    }
    within
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
}

/// Opens `path` for appending; a file created now gets exactly `mode` (whatever the umask).
fn create_or_append(path: &Path, mode: u32) -> io::Result<File> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(file) => {
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            Ok(file)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stalltrace-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("events.ndjson")
    }

    #[test]
    fn whole_lines_fit() {
        assert_eq!(fitting_lines(b"ab\ncd\n", 100), 6);
        assert_eq!(fitting_lines(b"ab\ncd\n", 5), 3);
        assert_eq!(fitting_lines(b"ab\ncd\n", 2), 0);
    }

    #[test]
    fn files_are_created_with_the_mode_and_rotated_by_size() {
        let path = temp_path("rotate");
        let mut options = FileOptions::new(path.clone());
        options.max_size = Some(10);
        options.keep = 2;
        let mut writer = Writer::to_file(options, 1 << 20).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for line in [
            "aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n", "gg\n",
        ] {
            writer.push(line.as_bytes().to_vec());
        }
        assert_eq!(writer.close(Duration::from_secs(5)), 0);
        assert_eq!(writer.written(), 7);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "gg\n");
        assert_eq!(read(&path.with_extension("ndjson.1")), "eeee\nffff\n");
        assert_eq!(read(&path.with_extension("ndjson.2")), "cccc\ndddd\n");
        assert!(!path.with_extension("ndjson.3").exists());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn an_existing_file_keeps_its_mode_and_content() {
        let path = temp_path("existing");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut options = FileOptions::new(path.clone());
        options.mode = 0o640;
        let mut writer = Writer::to_file(options, 1 << 20).unwrap();
        writer.push(b"new\n".to_vec());
        writer.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn failed_lines_are_counted_one_by_one() {
        let mut writer = Writer::to_file(FileOptions::new("/dev/full".into()), 1 << 20).unwrap();
        writer.push(b"one\ntwo\nthree\n".to_vec());
        writer.close(Duration::from_secs(5));
        assert_eq!(writer.failed(), 3);
        assert_eq!(writer.written(), 0);
    }

    /// A writer that accepts `budget` bytes, then blocks until released.
    struct Stuck {
        release: Arc<(Mutex<bool>, Condvar)>,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.release;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            self.seen.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_fills_the_queue_without_blocking_the_caller() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut writer = Writer::to_stream(
            Box::new(Stuck {
                release: release.clone(),
                seen: seen.clone(),
            }),
            100,
        );
        let line = [b'x'; 39].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        let mut accepted = 0;
        let started = Instant::now();
        for _ in 0..10 {
            if writer.has_room(0, line.len()) {
                writer.push(line.clone());
                accepted += 1;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(accepted, 2, "100 bytes hold two 40-byte lines");
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        assert_eq!(writer.close(Duration::from_secs(5)), 0);
        assert_eq!(seen.lock().unwrap().len(), 80);
        assert!(writer.has_room(0, 100));
    }
}
