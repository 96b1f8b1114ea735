//! Harness for the root integration tests: starts the real `stalltrace daemon` (real eBPF
//! programs) with its own socket and events file, drives real TCP traffic, and reads the
//! results through the CLI and the event stream.
//!
//! Every daemon sees all traffic on the host, so tests select their own connections by port.
//! The binary comes from `STALLTRACE_BIN` (set by `cargo xtask test`), else target/debug.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The stall threshold the tests run the daemon with.
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// The capabilities the daemon keeps after start-up (docs/design.md, "Least privilege"), as
/// `status -o json` lists them (`privileges.capabilities`, sorted).
pub const RUNTIME_CAPABILITIES: [&str; 4] = [
    "CAP_CHECKPOINT_RESTORE",
    "CAP_DAC_READ_SEARCH",
    "CAP_PERFMON",
    "CAP_SYS_PTRACE",
];

/// How long a daemon may take to answer after it was started: the kernel verifies its programs
/// first, which takes about a second natively, up to ~20 s on the kernel matrix's emulated
/// x86-64 CPUs (Linux 6.1's verifier is the slowest with the message classifier) and ~2 min on
/// its emulated arm64 ones. A daemon that exits at start fails at once.
pub const START_WITHIN: Duration = Duration::from_secs(240);

/// A stall must be reported no later than threshold + 1 s; allow for a loaded CI machine.
pub const REPORT_WITHIN: Duration = Duration::from_secs(4);

/// A request its server never reads moves no data: a paced sock_diag scan finds it, resting
/// 50 times as long as its last dump took (1–30 s). After a burst of connections on the
/// kernel matrix's emulated CPUs a dump takes a few hundred ms, and the next one comes
/// seconds later.
pub const UNREAD_WITHIN: Duration = Duration::from_secs(20);

/// Fails the test, loudly, unless it can load eBPF programs: a root test that cannot run must
/// never pass. (These tests are outside the workspace's default members: plain `cargo test`
/// runs the unit tests only; `cargo xtask test` runs both, as root.)
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this integration test loads eBPF programs and needs root: run `cargo xtask test` as \
         root (plain `cargo test` runs the unit tests only)"
    );
}

/// The value of field `name` of a `/proc/PID/status` text (`CapEff`, `NoNewPrivs`…).
pub fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
        .trim()
}

pub fn binary() -> PathBuf {
    std::env::var_os("STALLTRACE_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/stalltrace"),
        PathBuf::from,
    )
}

pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    pub socket: PathBuf,
    pub events: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the test threshold and waits until it answers.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        let daemon = Self::spawn(name, extra);
        daemon.wait_until_answering();
        daemon
    }

    /// Starts a daemon with the test threshold and returns at once, before it answers.
    pub fn spawn(name: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("stalltrace-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let events = dir.join("events.ndjson");
        let stall_after = format!("{}ms", STALL_AFTER.as_millis());
        let child = Command::new(binary())
            .arg("daemon")
            .args(["--stall-after", &stall_after])
            .arg("--socket")
            .arg(&socket)
            .arg("--events-file")
            .arg(&events)
            .args(extra)
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
        Self {
            child: Some(child),
            dir,
            socket,
            events,
        }
    }

    /// Starts a daemon that writes its events to stdout, a pipe returned to the caller (who may
    /// leave it unread), and waits until it answers.
    pub fn start_to_stdout(name: &str, extra: &[&str]) -> (Self, std::process::ChildStdout) {
        let dir = std::env::temp_dir().join(format!("stalltrace-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let stall_after = format!("{}ms", STALL_AFTER.as_millis());
        let mut child = Command::new(binary())
            .arg("daemon")
            .args(["--stall-after", &stall_after])
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
        let stdout = child.stdout.take().unwrap();
        let daemon = Self {
            child: Some(child),
            events: dir.join("no-events-file"),
            dir,
            socket,
        };
        daemon.wait_until_answering();
        (daemon, stdout)
    }

    fn wait_until_answering(&self) {
        let deadline = Instant::now() + START_WITHIN;
        while !self.cli(&["status"]).status.success() {
            assert!(self.running(), "daemon exited at start:\n{}", self.stderr());
            assert!(
                Instant::now() < deadline,
                "daemon not answering:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's directory (socket, events file, stderr.log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// The daemon process has not exited.
    pub fn running(&self) -> bool {
        let pid = self.child.as_ref().unwrap().id();
        // Not reaped (so `stop` still gets its status): an exited child is a zombie.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Runs `stalltrace <args> --socket <this daemon's socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "stalltrace {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stalltrace {args:?} printed non-JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Open stalls touching `port`, from `stalltrace stalls -o json`.
    pub fn stalls(&self, port: u16) -> Vec<Value> {
        let value = self.cli_json(&["stalls", "-o", "json", "--port", &port.to_string()]);
        value
            .as_array()
            .expect("stalls -o json is an array")
            .clone()
    }

    /// Waits until `stalls` on `port` returns `count` items.
    pub fn wait_for_stalls(&self, port: u16, count: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let stalls = self.stalls(port);
            if stalls.len() >= count || Instant::now() > deadline {
                return stalls;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every event written so far: whole lines only (a read can catch the daemon's writer
    /// mid-write; the rest of that line is there at the next read).
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("bad NDJSON line ({e}): {line}"))
            })
            .collect()
    }

    /// Events named `name` touching `port`.
    pub fn events_named(&self, name: &str, port: u16) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name && touches(e, port))
            .collect()
    }

    /// Waits for at least `count` events named `name` touching `port`.
    pub fn wait_for_events(
        &self,
        name: &str,
        port: u16,
        count: usize,
        within: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let events = self.events_named(name, port);
            if events.len() >= count || Instant::now() > deadline {
                return events;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for an open stall on `port` whose connection has `role`, with the first look at
    /// it in (its cause, thread and TCP signals known: `stall.diagnosis_pending` absent);
    /// fails the test, with the stalls seen and the daemon's log, if none comes `within`.
    pub fn wait_for_stall(&self, port: u16, role: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let stalls = self.stalls(port);
            if let Some(stall) = stalls
                .iter()
                .find(|s| s["conn"]["role"] == role && s["stall"]["diagnosis_pending"].is_null())
            {
                return stall.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {role} stall on port {port}: {stalls:#?}\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the first event named `name` touching `port` that passes `test`.
    pub fn wait_for_event(
        &self,
        name: &str,
        port: u16,
        within: Duration,
        test: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        self.wait_for_any_event(name, within, |e| touches(e, port) && test(e))
    }

    /// Waits for the first event named `name` that passes `test` (any connection: Unix ones
    /// have no port).
    pub fn wait_for_any_event(
        &self,
        name: &str,
        within: Duration,
        test: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .events()
                .into_iter()
                .find(|e| e["event"] == name && test(e));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    /// SIGTERM, then the exit status; the daemon's files stay readable until it is dropped.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "daemon files kept in {}:\n{}",
                self.dir.display(),
                self.stderr()
            );
        }
    }
}

/// The daemon's `status -o json` on `socket`, once it answers.
pub fn status_at(socket: &Path) -> Option<Value> {
    let out = Command::new(binary())
        .args(["status", "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status -o json is JSON"))
}

/// The event or item involves a connection with `port` at either end.
pub fn touches(value: &Value, port: u16) -> bool {
    let network = &value["network"];
    network["local"]["port"] == port || network["peer"]["port"] == port
}

/// Waits (10 s at most) until something accepts connections on `addr`: a server started as a
/// child process.
pub fn wait_until_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A helper process (a server, a proxy) stopped with SIGTERM when dropped: nginx's master
/// then takes its workers down with it.
pub struct Terminated(pub Child);

impl Drop for Terminated {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A loopback address with a port nobody listens on now.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A directory for `name`'s files next to the daemon's.
pub fn daemon_dir(daemon: &Daemon, name: &str) -> PathBuf {
    let dir = daemon.events.parent().unwrap().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts nginx (one worker, its files in `dir`) listening on `listen`, with `http` added to
/// its `http` block (upstreams, a `server`), and waits until it accepts.
pub fn start_nginx(dir: &Path, listen: SocketAddr, http: &str) -> Terminated {
    let temp = dir.display();
    let config = format!(
        "daemon off; worker_processes 1; pid {temp}/nginx.pid; error_log {temp}/error.log;
         events {{ worker_connections 256; }}
         http {{
           access_log off;
           client_body_temp_path {temp}; proxy_temp_path {temp};
           fastcgi_temp_path {temp}; uwsgi_temp_path {temp}; scgi_temp_path {temp};
           {http}
         }}"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let nginx = Terminated(
        Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .spawn()
            .expect("nginx is installed by cargo xtask test"),
    );
    wait_until_listening(listen);
    nginx
}

/// Starts haproxy in the foreground with `config` (its log in `dir`), listening on `listen`,
/// and waits until it accepts.
pub fn start_haproxy(dir: &Path, listen: SocketAddr, config: &str) -> Terminated {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let haproxy = Terminated(
        Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy is installed by cargo xtask test"),
    );
    wait_until_listening(listen);
    haproxy
}

/// The item with `role` ("client"/"server").
pub fn with_role<'a>(items: &'a [Value], role: &str) -> &'a Value {
    items
        .iter()
        .find(|item| item["conn"]["role"] == role)
        .unwrap_or_else(|| panic!("no {role} item in {items:#?}"))
}

/// A server that accepts one connection, reads one request, and answers only when told to.
pub struct SilentServer {
    pub addr: SocketAddr,
    control: mpsc::Sender<Told>,
    /// How long the request went unanswered, bracketed by the server.
    held: mpsc::Receiver<Held>,
    /// The serving thread's id (the one that read the request).
    pub thread_id: mpsc::Receiver<i32>,
}

impl SilentServer {
    pub fn bind(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (control, commands) = mpsc::channel::<Told>();
        let (held_tx, held) = mpsc::channel();
        let (tid_tx, thread_id) = mpsc::channel();
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let mut request = [0u8; 256];
            let (n, read) = Span::time(|| conn.read(&mut request).unwrap());
            assert!(n > 0);
            match commands.recv() {
                Ok(Told::Reply(reply)) => {
                    let ((), write) = Span::time(|| conn.write_all(&reply).unwrap());
                    held_tx.send(Held { read, write }).unwrap();
                    // Keep the connection open until the client closes it.
                    let _ = conn.read(&mut request);
                }
                Ok(Told::ShutdownWrite) => {
                    conn.shutdown(std::net::Shutdown::Write).unwrap();
                    let _ = conn.read(&mut request);
                }
                Ok(Told::Close) | Err(_) => drop(conn),
            }
        });
        Self {
            addr,
            control,
            held,
            thread_id,
        }
    }

    /// Replies now; returns when the request was read and the reply written.
    pub fn reply(&self, bytes: &[u8]) -> Held {
        self.control.send(Told::Reply(bytes.to_vec())).unwrap();
        self.held.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    pub fn close(&self) {
        self.control.send(Told::Close).unwrap();
    }

    /// Sends its FIN without answering (`shutdown(SHUT_WR)`), and keeps the connection open
    /// until the client closes it.
    pub fn shutdown_write(&self) {
        self.control.send(Told::ShutdownWrite).unwrap();
    }
}

/// What a [`SilentServer`] does with the request it holds.
enum Told {
    Reply(Vec<u8>),
    Close,
    ShutdownWrite,
}

/// When a [`SilentServer`]'s thread called and returned from the read() that took the request
/// and the write() of its reply. The kernel's times of the request's last byte and the reply's
/// first fall within those calls. Under emulation a thread can lose the CPU for tens of ms
/// between a call and its clock read, so a duration is known as a range, not a point.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub read: Span,
    pub write: Span,
}

/// When a call was made and when it returned.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub called: Instant,
    pub returned: Instant,
}

impl Span {
    /// Times `call`.
    pub fn time<T>(call: impl FnOnce() -> T) -> (T, Span) {
        let called = Instant::now();
        let value = call();
        let returned = Instant::now();
        (value, Span { called, returned })
    }

    /// The least and the most time between a moment within this call and one within `later`.
    pub fn until(self, later: Span) -> (Duration, Duration) {
        (
            later.called.saturating_duration_since(self.returned),
            later.returned - self.called,
        )
    }
}

/// Connects to `addr` and sends a request (as [`send_request`]); also returns when.
pub fn send_timed_request(addr: SocketAddr) -> (TcpStream, Span) {
    Span::time(|| send_request(addr))
}

/// Has `server` answer the request `client` sent (`sent`: [`send_timed_request`]), reads the
/// answer, and waits for both ends' `stall.end`: each must say `response` with the true
/// duration — the daemon's, from kernel timestamps of the request's last byte and the reply's
/// first — within what the calls on that end bracket, give or take a tick of the coarse clock
/// and the truncation to ms. On the host the bracket is about 1 ms wide. Returns the two events.
pub fn reply_and_check_true_durations(
    daemon: &Daemon,
    server: &SilentServer,
    client: &mut TcpStream,
    sent: Span,
) -> Vec<Value> {
    let held = server.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let mut reply = [0u8; 64];
    let (read, received) = Span::time(|| client.read(&mut reply).unwrap());
    assert!(read > 0);
    let ends = daemon.wait_for_events("stall.end", server.addr.port(), 2, REPORT_WITHIN);
    assert_eq!(ends.len(), 2, "{ends:#?}");
    // A coarse-clock tick (up to 10 ms at HZ=100) and the truncation to whole ms.
    const SLACK: Duration = Duration::from_millis(11);
    for end in &ends {
        assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
        // The reply reaches the client between the server's write() and the client's read().
        let (asked, answered) = match end["conn"]["role"].as_str() {
            Some("server") => (held.read, held.write),
            _ => (
                sent,
                Span {
                    called: held.write.called,
                    returned: received.returned,
                },
            ),
        };
        let (at_least, at_most) = asked.until(answered);
        let duration = Duration::from_millis(end["stall"]["duration_ms"].as_u64().unwrap());
        assert!(
            at_least.saturating_sub(SLACK) <= duration && duration <= at_most + SLACK,
            "daemon {duration:?}, the calls between {at_least:?} and {at_most:?}: {end:#}"
        );
    }
    ends
}

/// Waits for `count` stall ends touching `port` (within `within`): each one ended by a
/// `response`, having lasted at least `lasted` (less 300 ms of scheduling slack). Returns them.
#[track_caller]
pub fn assert_ended_by_responses(
    daemon: &Daemon,
    port: u16,
    count: usize,
    lasted: Duration,
    within: Duration,
) -> Vec<Value> {
    let ends = daemon.wait_for_events("stall.end", port, count, within);
    assert_eq!(ends.len(), count, "{ends:#?}\n{}", daemon.stderr());
    for end in &ends {
        assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration + 300 >= lasted.as_millis() as u64,
            "true duration: {end:#}"
        );
    }
    ends
}

/// Connects to `addr` and sends a request; the stream stays open.
pub fn send_request(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    stream
}

/// The request bytes the daemon captures on the running kernel: reading them needs
/// `bpf_task_pt_regs` (Linux 5.15).
pub fn expected_capture_bytes() -> u64 {
    if kernel_version() >= (5, 15) {
        64
    } else {
        0
    }
}

/// Whether the daemon loads the per-protocol verdict extras (HTTP/1.x response framing,
/// HTTP/2 streams, the TLS client rules) on this kernel: with capture, from Linux 6.5.
pub fn expected_verdict_extras() -> bool {
    expected_capture_bytes() > 0 && kernel_version() >= (6, 5)
}

/// Whether the daemon follows HTTP/2 streams: the verdict extras, on the tracepoint rung, the
/// only one whose programs hold the frame walk (the rung is the one `STALLTRACE_HOOKS` forces,
/// if any: the kernel matrix runs the tests on each).
pub fn expected_http2_streams() -> bool {
    expected_verdict_extras()
        && matches!(
            std::env::var("STALLTRACE_HOOKS").as_deref(),
            Err(_) | Ok("" | "auto" | "tracepoint")
        )
}

/// This kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// This process's id, as the daemon reports it.
pub fn pid() -> u64 {
    u64::from(std::process::id())
}

/// A server that answers every request at once with the same bytes (a healthy keep-alive
/// server).
pub fn echo_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

/// A server on 127.0.0.1 answering each connection's request once (a short HTTP/1.1
/// response), then closing it; its address.
pub fn short_lived_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 256];
            if conn.read(&mut buf).unwrap_or(0) > 0 {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        }
    });
    addr
}

/// One request/reply on a new connection to a new echo server on 127.0.0.1; returns the
/// server's port.
pub fn exchange() -> u16 {
    let echo = echo_server("127.0.0.1");
    let mut conn = TcpStream::connect(echo).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    echo.port()
}

/// A listener with a zero-length accept queue that never accepts: after one connection fills
/// the queue, the kernel drops further SYNs and their connect() hangs.
pub struct FullListener {
    fd: std::os::fd::OwnedFd,
    pub addr: SocketAddr,
}

impl FullListener {
    pub fn bind() -> Self {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        // SAFETY: plain socket syscalls on a fresh fd we own; sockaddr_in is fully initialized.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            use std::os::fd::AsRawFd as _;
            assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0);
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut bound_len = len;
            libc::getsockname(fd.as_raw_fd(), (&raw mut bound).cast(), &mut bound_len);
            let port = u16::from_be(bound.sin_port);
            Self {
                fd,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            }
        }
    }

    pub fn close(self) {
        drop(self.fd);
    }
}
