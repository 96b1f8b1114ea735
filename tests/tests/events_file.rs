//! The events file behaves like a production log: restrictive mode, reopened on SIGHUP and
//! when logrotate moves or deletes it, appended to after `copytruncate`, rotated by size, and
//! every line it cannot take counted.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{exchange, require_root, touches, Daemon};

/// Parsed lines of `path` (every line must be whole JSON).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("bad line in {path:?} ({e}): {line:?}"))
        })
        .collect()
}

fn mentions(path: &Path, port: u16) -> bool {
    lines(path).iter().any(|e| touches(e, port))
}

/// Waits until `path` has an event about `port`.
fn wait_for_port(path: &Path, port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if mentions(path, port) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_events_file_is_created_private_unless_told_otherwise() {
    require_root();
    let daemon = Daemon::start("ef-mode");
    assert_eq!(mode(&daemon.events), 0o600);
    drop(daemon);
    let daemon = Daemon::start_with("ef-mode-640", &["--events-file-mode", "640"]);
    assert_eq!(mode(&daemon.events), 0o640);
}

#[test]
fn sighup_reopens_the_events_file_after_a_rename() {
    require_root();
    let daemon = Daemon::start("ef-sighup");
    let before = exchange();
    assert!(wait_for_port(
        &daemon.events,
        before,
        Duration::from_secs(5)
    ));
    // logrotate `create`: rename, then signal.
    let rotated = daemon.events.with_extension("ndjson.1");
    std::fs::rename(&daemon.events, &rotated).unwrap();
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !daemon.events.exists() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reopen the events file"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(daemon.running(), "SIGHUP killed the daemon");
    assert_eq!(mode(&daemon.events), 0o600);
    let after = exchange();
    assert!(wait_for_port(&daemon.events, after, Duration::from_secs(5)));
    assert!(
        !mentions(&rotated, after),
        "still writing to the renamed file"
    );
    assert!(
        daemon.stderr().contains("(SIGHUP)"),
        "no reopen on SIGHUP logged:\n{}",
        daemon.stderr()
    );
    assert!(daemon.stop().success());
}

#[test]
fn a_deleted_events_file_is_recreated_without_a_signal() {
    require_root();
    let daemon = Daemon::start("ef-deleted");
    std::fs::remove_file(&daemon.events).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !daemon.events.exists() {
        assert!(
            Instant::now() < deadline,
            "the deleted events file was not recreated"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&daemon.events), 0o600);
    let port = exchange();
    assert!(wait_for_port(&daemon.events, port, Duration::from_secs(5)));
}

#[test]
fn copytruncate_keeps_appending_from_the_start() {
    require_root();
    let daemon = Daemon::start("ef-copytruncate");
    let before = exchange();
    assert!(wait_for_port(
        &daemon.events,
        before,
        Duration::from_secs(5)
    ));
    // logrotate `copytruncate`: copy, then truncate in place.
    let copy = daemon.events.with_extension("ndjson.1");
    std::fs::copy(&daemon.events, &copy).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&daemon.events)
        .unwrap()
        .set_len(0)
        .unwrap();
    let after = exchange();
    assert!(wait_for_port(&daemon.events, after, Duration::from_secs(5)));
    // Appended at the new end: no hole of zeros where the old content was.
    let bytes = std::fs::read(&daemon.events).unwrap();
    assert_eq!(
        bytes[0], b'{',
        "the file does not start with an event after truncation"
    );
    assert!(!bytes.contains(&0));
    assert!(!mentions(&daemon.events, before));
    assert!(mentions(&copy, before));
}

#[test]
fn the_events_file_rotates_by_size_keeping_n_files() {
    require_root();
    let daemon = Daemon::start_with(
        "ef-rotate",
        &["--events-file-max-size", "4KiB", "--events-file-keep", "2"],
    );
    let numbered = |n: u32| daemon.events.with_extension(format!("ndjson.{n}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ports = Vec::new();
    while !numbered(2).exists() {
        assert!(Instant::now() < deadline, "no second rotation");
        ports.push(exchange());
        thread::sleep(Duration::from_millis(20));
    }
    // A few more rotations.
    for _ in 0..40 {
        ports.push(exchange());
    }
    thread::sleep(Duration::from_millis(500));
    assert!(!numbered(3).exists(), "more than --events-file-keep files");
    for path in [daemon.events.clone(), numbered(1), numbered(2)] {
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= 4096, "{path:?} is {size} bytes");
        assert_eq!(mode(&path), 0o600);
        lines(&path);
    }
    assert!(!lines(&numbered(2)).is_empty());
}

#[test]
fn lines_the_events_file_cannot_take_are_counted() {
    require_root();
    // /dev/full: every write fails with ENOSPC, like a full disk.
    let (daemon, _stdout) = Daemon::start_to_stdout("ef-full", &["--events-file", "/dev/full"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        exchange();
        let status = daemon.cli_json(&["status", "-o", "json"]);
        let failed = status["lost"]["events_write_failed"].as_u64().unwrap();
        if failed >= 4 {
            assert_eq!(status["events"]["written"], 0, "{status:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "write failures not counted: {status:#}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.running());
    assert!(daemon.stop().success());
}
