//! The control API and the CLI around it, against the real daemon.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    binary, require_root, send_request, Daemon, SilentServer, REPORT_WITHIN,
};

/// Sends raw bytes as a request and returns the parsed response line.
fn raw_request(daemon: &Daemon, bytes: &[u8]) -> Value {
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The daemon may answer and close before reading everything we send.
    let _ = stream.write_all(bytes);
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response ({e}): {line:?}"))
}

fn error_code(response: &Value) -> &str {
    assert_eq!(response["ok"], false, "{response:#}");
    assert!(response["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    response["error"]["code"].as_str().unwrap()
}

#[test]
fn malformed_requests_get_errors_and_the_daemon_lives_on() {
    require_root();
    let daemon = Daemon::start("malformed");
    assert_eq!(
        error_code(&raw_request(&daemon, b"garbage\n")),
        "bad_request"
    );
    assert_eq!(
        error_code(&raw_request(&daemon, b"{\"command\":\"status\"}\n")),
        "bad_request"
    );
    assert_eq!(
        error_code(&raw_request(
            &daemon,
            b"{\"version\":1,\"command\":\"reboot\"}\n"
        )),
        "bad_request"
    );
    assert_eq!(
        error_code(&raw_request(
            &daemon,
            b"{\"version\":42,\"command\":\"status\"}\n"
        )),
        "unsupported_version"
    );
    assert_eq!(
        error_code(&raw_request(&daemon, &[0xff, 0xfe, b'\n'])),
        "bad_request"
    );
    let huge = vec![b'x'; 200 * 1024];
    assert_eq!(error_code(&raw_request(&daemon, &huge)), "too_large");

    // A client that connects and says nothing is timed out, not waited for forever.
    let started = Instant::now();
    let silent = raw_request(&daemon, b"");
    assert_eq!(error_code(&silent), "timeout");
    assert!(started.elapsed() < Duration::from_secs(9));

    // Still alive and answering.
    let ok = raw_request(&daemon, b"{\"version\":1,\"command\":\"status\"}\n");
    assert_eq!(ok["ok"], true, "{ok:#}");
    assert_eq!(ok["version"], 1);
    assert!(ok["result"]["uptime_ms"].as_u64().is_some());
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn status_reports_hooks_connections_and_losses() {
    require_root();
    let daemon = Daemon::start("status");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    let hooks: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["hook"].as_str().unwrap())
        .collect();
    for required in [
        "tracepoint/sock/inet_sock_set_state",
        "raw_tracepoint/sock_send_length",
        "raw_tracepoint/sock_recv_length",
    ] {
        assert!(hooks.contains(&required), "{hooks:?}");
    }
    assert_eq!(status["stall_after_ms"], 1000);
    assert!(status["connections"]["tracked"].is_u64());
    assert_eq!(status["lost"]["kernel_ringbuf_full"], 0, "{status:#}");
    assert!(status["lost_total"].is_u64());
    assert_eq!(
        status["features"]["adopt_existing"], true,
        "kernel BTF resolves here"
    );
    // Connection state is timed from jiffies: the fit found one of Kconfig.hz's tick rates.
    let clock = &status["features"]["coarse_clock"];
    assert_eq!(clock["enabled"], true, "{clock}");
    assert!(
        [1_000_000, 3_333_333, 4_000_000, 10_000_000].contains(&clock["tick_ns"].as_u64().unwrap()),
        "{clock}"
    );

    let table = daemon.cli(&["status"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("stall threshold: 1.0s"), "{table}");
    assert!(table.contains("raw_tracepoint/sock_send_length"), "{table}");
}

#[test]
fn watch_streams_events_for_the_selected_port() {
    require_root();
    let daemon = Daemon::start("watch");
    let server = SilentServer::bind("127.0.0.1");
    let port = server.addr.port();
    let mut watch = Command::new(binary())
        .args(["watch", "--port", &port.to_string(), "--socket"])
        .arg(&daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The watch is registered once the daemon has answered; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    let _client = send_request(server.addr);

    let deadline = Instant::now() + REPORT_WITHIN;
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e: &&Value| e["event"] == "stall.start")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "watch saw only {seen:#?}");
        let line = lines.next().expect("watch ended").unwrap();
        let event: Value = serde_json::from_str(&line).unwrap();
        assert!(
            event["network"]["local"]["port"] == port || event["network"]["peer"]["port"] == port,
            "the filter let through {event:#}"
        );
        seen.push(event);
    }
    assert!(seen.iter().any(|e| e["event"] == "conn.open"));
    watch.kill().unwrap();
    watch.wait().unwrap();
    server.close();
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    require_root();
    let daemon = Daemon::start("sigterm");
    let socket = daemon.socket.clone();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A second daemon on the same socket refuses to start and leaves the first one alone.
    let second = Command::new(binary())
        .args(["daemon", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains("already serving"), "{message}");
    assert!(daemon.cli(&["status"]).status.success());

    assert_eq!(daemon.stop().code(), Some(0));
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn cli_without_a_daemon_prints_one_clear_line() {
    let out = Command::new(binary())
        .args(["stalls", "--socket", "/nonexistent/stalltrace.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is `stalltrace daemon` running?"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn daemon_as_non_root_says_what_needs_root() {
    // Run the daemon as `nobody` (root can drop privileges with setuid in pre_exec).
    require_root();
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(binary());
    command.args(["daemon", "--socket", "/tmp/stalltrace-nonroot.sock"]);
    // SAFETY: setuid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let mut stderr = String::new();
    out.stderr.as_slice().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("needs root"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
