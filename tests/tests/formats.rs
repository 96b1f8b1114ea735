//! The CLI's output for people and scripts: `-o yaml`, `watch -o table`, exit status 2 from
//! `stalls --fail-if-any`, colour and width only on a terminal (a real pty, from `script`).
use std::{
    io::{BufRead as _, BufReader},
    net::{TcpListener, TcpStream},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{
    binary, pid, require_root, send_request, Daemon, SilentServer, REPORT_WITHIN,
};

/// Runs `stalltrace <args>` on a pseudo-terminal `columns` wide (util-linux `script`), with
/// `env` set; what it printed, escape sequences included.
fn on_terminal(daemon: &Daemon, args: &str, columns: u16, env: &[(&str, &str)]) -> String {
    let command = format!(
        "stty cols {columns} rows 50; {} {args} --socket {}",
        binary().display(),
        daemon.socket.display()
    );
    let out: Output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .output()
        .expect("running script (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn scripts_get_yaml_and_an_exit_status_people_get_colour_that_fits() {
    require_root();
    let daemon = Daemon::start("formats");
    let server = SilentServer::bind("127.0.0.1");
    let _client = send_request(server.addr);
    let port = server.addr.port().to_string();
    assert_eq!(
        daemon
            .wait_for_stalls(server.addr.port(), 2, REPORT_WITHIN)
            .len(),
        2
    );

    // --fail-if-any: 2 with stalls listed (and printed), 0 without.
    let out = daemon.cli(&["stalls", "--fail-if-any", "--port", &port]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 open stalls"), "{text}");
    let out = daemon.cli(&["stalls", "--fail-if-any", "--port", "1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no open stalls\n");

    // YAML: the JSON answer's shape.
    let out = daemon.cli(&["stalls", "-o", "yaml", "--port", &port]);
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.starts_with("- conn:\n"), "{yaml}");
    for line in [
        "kind: unanswered_request",
        "kind: awaiting_response",
        &format!("port: {port}"),
    ] {
        assert!(yaml.contains(line), "{line} missing: {yaml}");
    }
    let status =
        String::from_utf8_lossy(&daemon.cli(&["status", "-o", "yaml"]).stdout).into_owned();
    assert!(status.contains("\nstall_after_ms: 1000\n"), "{status}");

    // Piped: no escape sequences, and the table is as wide as it needs.
    let piped =
        String::from_utf8_lossy(&daemon.cli(&["stalls", "--port", &port]).stdout).into_owned();
    assert!(!piped.contains('\x1b'), "{piped:?}");
    assert!(piped.lines().any(|l| l.len() > 100), "{piped}");
    // On a terminal: a bold header, and lines that fit its 80 columns (cells wrap).
    let tty = on_terminal(&daemon, &format!("stalls --port {port}"), 80, &[]);
    assert!(tty.contains("\x1b[1m"), "{tty:?}");
    for line in tty.lines() {
        let visible = strip_escapes(line);
        assert!(
            visible.chars().count() <= 80,
            "{} columns: {visible:?}",
            visible.chars().count()
        );
    }
    assert!(strip_escapes(&tty).contains("2 open stalls"), "{tty:?}");
    // NO_COLOR: a terminal, but no colour.
    let plain = on_terminal(
        &daemon,
        &format!("stalls --port {port}"),
        200,
        &[("NO_COLOR", "1")],
    );
    assert!(!plain.contains('\x1b'), "{plain:?}");
    assert!(plain.contains("2 open stalls"), "{plain:?}");
}

/// `text` without ANSI escape sequences (CSI … letter).
fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[test]
fn watch_as_a_table_is_one_readable_line_per_event() {
    require_root();
    let daemon = Daemon::start("watch-table");
    let server = SilentServer::bind("127.0.0.1");
    let port = server.addr.port().to_string();
    let mut watch = Command::new(binary())
        .args([
            "watch",
            "-o",
            "table",
            "--pid",
            &pid().to_string(),
            "--socket",
        ])
        .arg(&daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // The watch is subscribed once it shows our probe connections.
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + REPORT_WITHIN;
    loop {
        let _connection = TcpStream::connect(probe.local_addr().unwrap()).unwrap();
        if lines.recv_timeout(Duration::from_millis(300)).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "watch -o table shows nothing");
    }
    while lines.recv_timeout(Duration::from_millis(300)).is_ok() {}
    let _client = send_request(server.addr);
    let mut seen = Vec::new();
    let start = loop {
        let line = lines
            .recv_timeout(REPORT_WITHIN)
            .unwrap_or_else(|_| panic!("no stall.start line; seen {seen:#?}"));
        seen.push(line.clone());
        if line.contains("stall.start")
            && line.contains("unanswered_request")
            && line.contains(&format!("127.0.0.1:{port} ->"))
        {
            break line;
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    // `12:34:56.789  stall.start   conn 7 server <comm>[<pid>] 127.0.0.1:<port> -> …  unanswered_request, quiet 1.0s, …, GET /slow`
    let time = &start[..12];
    assert!(
        time.len() == 12 && time.as_bytes()[2] == b':' && time.as_bytes()[8] == b'.',
        "{start}"
    );
    assert!(
        start.contains(&format!("127.0.0.1:{port} -> 127.0.0.1:")),
        "{start}"
    );
    assert!(start.contains(" server "), "{start}");
    assert!(start.contains("quiet "), "{start}");
    assert!(start.ends_with("GET /slow"), "{start}");
    assert!(!start.contains('\x1b') && !start.contains('{'), "{start}");
    assert!(
        seen.iter()
            .any(|l| l.contains("conn.open") && l.contains(&format!("127.0.0.1:{port}"))),
        "the opening comes first: {seen:#?}"
    );
}

/// A client piped into a reader that went away (`stalltrace status -o json | head -0`) stops
/// as Unix tools do, killed by SIGPIPE, never with a panic message.
#[test]
fn a_client_whose_reader_is_gone_stops_quietly() {
    use std::os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _};
    require_root();
    let daemon = Daemon::start("broken-pipe");
    for format in ["json", "yaml", "table"] {
        let mut ends = [0; 2];
        // SAFETY: a fresh pipe; each end is owned once below.
        assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
        // SAFETY: the read end is closed at once, so the client's first write fails.
        unsafe { libc::close(ends[0]) };
        // SAFETY: the write end, owned by the child's stdout from here.
        let stdout = unsafe { Stdio::from_raw_fd(ends[1]) };
        let out = Command::new(binary())
            .args(["status", "-o", format, "--socket"])
            .arg(&daemon.socket)
            .stdout(stdout)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{format}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{format}: {stderr}"
        );
    }
}
