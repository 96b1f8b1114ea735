//! The tracer must never be the stall: a stdout nobody reads (or a `watch` client that stopped
//! reading) costs event lines, counted, never detection or API answers.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    echo_server, require_root, send_request, short_lived_server, touches, Daemon, SilentServer,
    REPORT_WITHIN,
};

/// One API request over the raw socket; the answer and how long it took.
fn timed_request(socket: &Path, request: &str) -> (Value, Duration) {
    let started = Instant::now();
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let took = started.elapsed();
    let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer ({e}): {line}"));
    (value, took)
}

const STATUS: &str = "{\"version\":1,\"command\":\"status\"}\n";

/// `count` short connections to `addr` (request, reply, close), from four threads.
fn short_connections(addr: SocketAddr, count: usize) {
    let workers: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..count / 4 {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream
                        .write_all(b"GET /quick HTTP/1.1\r\nHost: test\r\n\r\n")
                        .unwrap();
                    let mut reply = Vec::new();
                    let _ = stream.read_to_end(&mut reply);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

#[test]
fn a_stdout_nobody_reads_never_blocks_detection_or_the_api() {
    require_root();
    // A small queue so that the test overflows it for sure; the pipe is never read until the
    // end.
    let (daemon, stdout) =
        Daemon::start_to_stdout("blocked-stdout", &["--events-buffer", "512KiB"]);
    // A `watch` client that never reads its stream must not hold anything up either.
    let mut stuck_watch = UnixStream::connect(&daemon.socket).unwrap();
    stuck_watch
        .write_all(b"{\"version\":1,\"command\":\"watch\"}\n")
        .unwrap();

    // The API is asked every 100 ms throughout.
    let done = Arc::new(AtomicBool::new(false));
    let (times_tx, times) = mpsc::channel();
    let prober = thread::spawn({
        let done = done.clone();
        let socket = daemon.socket.clone();
        move || {
            while !done.load(Ordering::Relaxed) {
                let (answer, took) = timed_request(&socket, STATUS);
                assert_eq!(answer["ok"], true, "{answer:#}");
                times_tx.send(took).unwrap();
                thread::sleep(Duration::from_millis(100));
            }
        }
    });

    let quick = short_lived_server();
    let burst = Instant::now();
    short_connections(quick, 3_000);
    let burst = burst.elapsed();

    let server = SilentServer::bind("127.0.0.1");
    let _client = send_request(server.addr);
    let stalls = daemon.wait_for_stalls(server.addr.port(), 2, REPORT_WITHIN);
    assert_eq!(stalls.len(), 2, "the stall was not detected: {stalls:#?}");

    let (status, took) = timed_request(&daemon.socket, STATUS);
    done.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    let times: Vec<Duration> = times.try_iter().chain([took]).collect();
    let slowest = times.iter().max().unwrap();
    eprintln!(
        "3000 connections in {burst:?}; {} API answers, slowest {slowest:?}; lost {}",
        times.len(),
        status["result"]["lost"]
    );
    assert!(
        *slowest < Duration::from_secs(1),
        "the API took {slowest:?} to answer"
    );
    let blocked = status["result"]["lost"]["output_blocked"].as_u64().unwrap();
    assert!(
        blocked > 0,
        "nothing dropped for the blocked stdout: {status:#}"
    );

    // Reading again: a loss event reports the gap.
    let (lines_tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("no loss event reporting output_blocked after reading resumed");
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("torn line ({e}): {line}"));
        if event["event"] == "loss" && event["loss"]["new"]["output_blocked"].as_u64() > Some(0) {
            break event;
        }
    };
    eprintln!("after the gap: {}", report["loss"]["new"]);
    // And events flow again after it.
    let echo = echo_server("127.0.0.1");
    let mut conn = TcpStream::connect(echo).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("no event about a new connection after the gap");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["event"] == "conn.open" && touches(&event, echo.port()) {
            break;
        }
    }
    drop(stuck_watch);
    assert!(daemon.stop().success());
}

#[test]
fn sighup_with_events_on_stdout_is_harmless() {
    require_root();
    let (daemon, stdout) = Daemon::start_to_stdout("sighup-stdout", &[]);
    let (lines_tx, lines) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    for _ in 0..3 {
        daemon.signal(libc::SIGHUP);
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        daemon.running(),
        "SIGHUP killed the daemon:\n{}",
        daemon.stderr()
    );
    // Events still flow (a new connection every second: other tests' bursts may overflow the
    // queue meanwhile, which drops lines until the next loss report).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ports = Vec::new();
    'seen: loop {
        let echo = echo_server("127.0.0.1");
        let mut conn = TcpStream::connect(echo).unwrap();
        conn.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        ports.push(echo.port());
        let next = Instant::now() + Duration::from_secs(1);
        while let Ok(line) = lines.recv_timeout(next.saturating_duration_since(Instant::now())) {
            let event: Value = serde_json::from_str(&line).unwrap();
            if event["event"] == "conn.open" && ports.iter().any(|&p| touches(&event, p)) {
                break 'seen;
            }
        }
        assert!(Instant::now() < deadline, "no event on stdout after SIGHUP");
    }
    assert!(daemon.stop().success());
}
