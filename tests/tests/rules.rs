//! The rules of `--config` end to end: a long-poll request ignored, a slow endpoint held to its
//! own threshold with a severity, a reload on SIGHUP, invalid files refused with their line.
use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    binary, require_root, send_request, touches, Daemon, SilentServer, REPORT_WITHIN, STALL_AFTER,
};

/// What the slow endpoint's rule allows (the daemon's own threshold is `STALL_AFTER`, 1 s):
/// far enough past the time the daemon takes to find the stalls at its own threshold, even on
/// a loaded machine, to see them held before they are due.
const SLOW_AFTER: Duration = Duration::from_secs(8);

/// Sends a long-poll request (a watch), the kind of request rules are for.
fn long_poll(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /v1/watch/orders?index=42 HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    stream
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn config_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "stalltrace-it-config-{name}-{}",
        std::process::id()
    ))
}

const RULES: &str = r#"
[[rule]]
name = "watches are long polls"
request = "GET /v1/watch/*"
ignore = true

[[rule]]
name = "slow reports"
request = "GET /slow"
stall_after = "8s"
severity = "critical"
"#;

fn status_rules(daemon: &Daemon) -> Value {
    daemon.cli_json(&["status", "-o", "json"])["rules"].clone()
}

#[test]
fn rules_ignore_long_polls_and_hold_slow_endpoints_to_their_threshold() {
    require_root();
    let dir = config_dir("apply");
    let config = write_config(&dir, "stalltrace.toml", RULES);
    let daemon = Daemon::start_with("rules", &["--config", config.to_str().unwrap()]);
    assert_eq!(status_rules(&daemon)["loaded"], 2);

    let watch_server = SilentServer::bind("127.0.0.1");
    let watch = long_poll(watch_server.addr);
    let slow_server = SilentServer::bind("127.0.0.1");
    let started = Instant::now();
    let slow = send_request(slow_server.addr);

    // Found at the daemon's threshold: the watch counted as ignored (both ends), the slow
    // request as held; neither listed.
    let deadline = Instant::now() + STALL_AFTER + REPORT_WITHIN;
    let rules = loop {
        let rules = status_rules(&daemon);
        let found = rules["ignored_open"].as_u64().unwrap() >= 2
            && rules["deferred_open"].as_u64().unwrap() >= 2;
        if found || Instant::now() > deadline {
            break rules;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(daemon.stalls(watch_server.addr.port()), Vec::<Value>::new());
    assert_eq!(daemon.stalls(slow_server.addr.port()), Vec::<Value>::new());
    assert!(started.elapsed() < SLOW_AFTER, "the test ran late");
    assert!(rules["ignored_total"].as_u64().unwrap() >= 2, "{rules}");
    assert!(rules["ignored_open"].as_u64().unwrap() >= 2, "{rules}");
    assert!(rules["deferred_open"].as_u64().unwrap() >= 2, "{rules}");
    let state_of = |port: u16| -> Vec<Value> {
        let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
        conns
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["conn"]["state"].clone())
            .collect()
    };
    assert_eq!(state_of(watch_server.addr.port()), ["ignored", "ignored"]);
    assert_eq!(state_of(slow_server.addr.port()), ["active", "active"]);

    // The slow request is reported once quiet for its rule's 8 s, with the rule's severity.
    let stalls = daemon.wait_for_stalls(slow_server.addr.port(), 2, SLOW_AFTER + REPORT_WITHIN);
    assert_eq!(stalls.len(), 2, "{stalls:?}\n{}", daemon.stderr());
    assert!(started.elapsed() >= SLOW_AFTER);
    for stall in &stalls {
        assert_eq!(stall["stall"]["severity"], "critical", "{stall}");
        assert_eq!(stall["stall"]["rule"], "slow reports", "{stall}");
        assert!(
            stall["stall"]["age_ms"].as_u64().unwrap() >= 8000,
            "{stall}"
        );
    }
    let starts = daemon.wait_for_events(
        "stall.start",
        slow_server.addr.port(),
        2,
        Duration::from_secs(2),
    );
    assert_eq!(starts.len(), 2);
    for start in &starts {
        let quiet = start["stall"]["quiet_ms"].as_u64().unwrap();
        assert!((8000..10_000).contains(&quiet), "{start}");
        assert_eq!(start["stall"]["severity"], "critical", "{start}");
    }
    // Its end carries the severity too.
    slow_server.close();
    let ends = daemon.wait_for_events("stall.end", slow_server.addr.port(), 1, REPORT_WITHIN);
    assert!(!ends.is_empty(), "{}", daemon.stderr());
    assert_eq!(ends[0]["stall"]["severity"], "critical", "{}", ends[0]);

    // The ignored watch never reached the events, nor its end.
    watch_server.close();
    drop(watch);
    thread::sleep(Duration::from_millis(500));
    let port = watch_server.addr.port();
    let about_watch: Vec<Value> = daemon
        .events()
        .into_iter()
        .filter(|e| touches(e, port) && e["event"].as_str().unwrap().starts_with("stall."))
        .collect();
    assert_eq!(about_watch, Vec::<Value>::new());
    assert_eq!(status_rules(&daemon)["ignored_open"], 0);
    // `why` counts the reported stalls, not the long polls.
    let stalls_in_why = |port: u16, signature: &str| -> u64 {
        let rows = daemon.cli_json(&["why", "-o", "json", "--port", &port.to_string()]);
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["signature"] == signature)
            .map(|r| r["stalls"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(stalls_in_why(port, "GET /v1/watch/orders"), 0);
    assert_eq!(stalls_in_why(slow_server.addr.port(), "GET /slow"), 2);
    drop(slow);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_reloads_the_rules_and_keeps_them_when_the_file_is_invalid() {
    require_root();
    let dir = config_dir("reload");
    let config = write_config(&dir, "stalltrace.toml", RULES);
    let daemon = Daemon::start_with("rules-reload", &["--config", config.to_str().unwrap()]);

    // An invalid file: the error is logged with its line, the rules in force stay.
    write_config(
        &dir,
        "stalltrace.toml",
        "[[rule]]\nrequest = \"GET /v1/watch/*\"\nignroe = true\n",
    );
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.stderr().contains("keeping the rules in force") {
        assert!(Instant::now() < deadline, "{}", daemon.stderr());
        thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.stderr().contains("line 3"), "{}", daemon.stderr());
    assert_eq!(status_rules(&daemon)["loaded"], 2);
    assert!(daemon.running());

    // A valid file without the ignore rule: watches that stall from now on are reported.
    write_config(&dir, "stalltrace.toml", "stall_after = \"1s\"\n");
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_rules(&daemon)["loaded"] != 0 {
        assert!(Instant::now() < deadline, "{}", daemon.stderr());
        thread::sleep(Duration::from_millis(50));
    }
    let server = SilentServer::bind("127.0.0.1");
    let _watch = long_poll(server.addr);
    let stalls = daemon.wait_for_stalls(server.addr.port(), 2, REPORT_WITHIN);
    assert_eq!(stalls.len(), 2, "{}", daemon.stderr());
    assert!(stalls.iter().all(|s| s["stall"].get("severity").is_none()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_files_are_refused_at_start_and_by_check_config() {
    let dir = config_dir("invalid");
    let bad = write_config(
        &dir,
        "bad.toml",
        "stall_after = \"2s\"\n\n[[rule]]\npeer = \"10.1.2.3/8\"\nignore = true\n",
    );
    let good = write_config(&dir, "good.toml", RULES);

    let check = |path: &Path| {
        Command::new(binary())
            .arg("check-config")
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&bad);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml: line 4") && stderr.contains("did you mean 10.0.0.0/8"),
        "{stderr}"
    );
    let out = check(&good);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("valid: 0 keys, 2 rules"), "{stdout}");
    assert!(
        stdout.contains(
            "rule \"watches are long polls\" (line 2): request=GET /v1/watch/* -> ignore"
        ),
        "{stdout}"
    );

    // The daemon refuses the file before loading anything (no root needed to see it).
    let out = Command::new(binary())
        .args(["daemon", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid configuration") && stderr.contains("line 4"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// This process's cgroup as docs/config.md says the daemon picks it: the unified path, or on
/// a hybrid host the first deeper v1 one.
fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = |line: &str| line.splitn(3, ':').nth(2).map(str::to_owned);
    let unified = text.lines().find(|l| l.starts_with("0::")).and_then(path);
    let legacy = text
        .lines()
        .filter(|l| !l.starts_with("0::"))
        .filter_map(path)
        .find(|p| p != "/");
    match (unified, legacy) {
        (Some(root), Some(deeper)) if root == "/" => deeper,
        (Some(path), _) => path,
        (None, legacy) => legacy.expect("a cgroup"),
    }
}

/// Rules on the executable's path and the cgroup (`/proc/PID/exe` and `/proc/PID/cgroup`, read
/// by the diagnosis worker's first look before the stall is reported): this test's own binary
/// and cgroup, both ends of its stall.
#[test]
fn exe_and_cgroup_rules_match_the_process() {
    require_root();
    let exe = std::env::current_exe().unwrap();
    let dir = config_dir("exe");
    let text = format!(
        "[[rule]]\nname = \"this test\"\nexe = \"{}\"\ncgroup = \"{}\"\nignore = true\n",
        exe.display(),
        own_cgroup()
    );
    let config = write_config(&dir, "stalltrace.toml", &text);
    let daemon = Daemon::start_with("rules-exe", &["--config", config.to_str().unwrap()]);
    let server = SilentServer::bind("127.0.0.1");
    let _client = send_request(server.addr);
    let port = server.addr.port();
    let deadline = Instant::now() + STALL_AFTER + REPORT_WITHIN;
    let rules = loop {
        let rules = status_rules(&daemon);
        if rules["ignored_open"].as_u64().unwrap() >= 2 || Instant::now() > deadline {
            break rules;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        rules["ignored_open"].as_u64().unwrap() >= 2,
        "{rules}\n{}",
        daemon.stderr()
    );
    assert_eq!(daemon.stalls(port), Vec::<Value>::new());
    assert!(
        !daemon.stderr().contains("not matched"),
        "{}",
        daemon.stderr()
    );
    let _ = std::fs::remove_dir_all(dir);
}
