//! Every filter flag filters: `conns`, `stalls`, `why` and `watch` with `--pid`, `--comm` and
//! `--port`, against two servers and two clients in their own processes with their own names,
//! one selected and the other excluded. And `why` samples completed requests on both ends.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{binary, require_root, touches, Daemon, REPORT_WITHIN};

/// Requests each client makes on new connections before its hanging one.
const REQUESTS: usize = 8;

/// A `stalltrace-peer` process; killed when dropped.
struct Peer {
    child: Child,
    _stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    name: String,
}

impl Peer {
    fn spawn(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stalltrace-peer"))
            .arg(name)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            _stdin: stdin,
            lines,
            name: name.to_owned(),
        }
    }

    fn line(&mut self) -> String {
        self.lines.next().expect("peer output").unwrap()
    }

    /// A server; returns it with its port.
    fn server(name: &str) -> (Self, u16) {
        let mut peer = Self::spawn(name, &["server"]);
        let port = peer.line().parse().unwrap();
        (peer, port)
    }

    /// A client that has made its requests to `port` and sent one that hangs.
    fn client(name: &str, port: u16) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let mut peer = Self::spawn(name, &["client", &addr, &REQUESTS.to_string()]);
        assert_eq!(peer.line(), "ready");
        peer
    }

    fn pid(&self) -> u64 {
        u64::from(self.child.id())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names unique to this test run (comm holds 15 characters).
fn name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

fn array(value: Value) -> Vec<Value> {
    value.as_array().expect("a JSON array").clone()
}

fn pid_of(item: &Value) -> u64 {
    item["process"]["pid"].as_u64().unwrap_or(0)
}

fn comm_of(item: &Value) -> &str {
    item["process"]["executable"]["name"].as_str().unwrap_or("")
}

/// A `watch` with `filter`, its output going to a file read at the end.
struct Watch {
    child: Child,
    out: std::path::PathBuf,
}

impl Watch {
    fn start(daemon: &Daemon, filter: &[&str]) -> Self {
        let out = std::env::temp_dir().join(format!(
            "stalltrace-it-watch-{}-{}",
            filter.join("-"),
            std::process::id()
        ));
        let child = Command::new(binary())
            .arg("watch")
            .args(filter)
            .arg("--socket")
            .arg(&daemon.socket)
            .stdout(std::fs::File::create(&out).unwrap())
            .spawn()
            .unwrap();
        Self { child, out }
    }

    /// Stops the watch; its events, without `loss` lines (which always pass).
    fn events(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap();
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|event| event["event"] != "loss")
            .collect()
    }
}

#[test]
fn every_filter_of_every_command_selects_one_peer_and_excludes_the_other() {
    require_root();
    let daemon = Daemon::start("filters");
    let (server_a, port_a) = Peer::server(&name("fa"));
    let (server_b, port_b) = Peer::server(&name("fb"));
    let (pid_a, comm_a) = (server_a.pid(), server_a.name.clone());
    let (pid_a_arg, port_a_arg) = (pid_a.to_string(), port_a.to_string());
    let filters: [(&str, &str); 3] = [
        ("--pid", &pid_a_arg),
        ("--comm", &comm_a),
        ("--port", &port_a_arg),
    ];
    let watches: Vec<Watch> = filters
        .iter()
        .map(|(flag, value)| Watch::start(&daemon, &[flag, value]))
        .collect();
    // The watches are registered once the daemon has answered them; give them a moment.
    thread::sleep(Duration::from_millis(300));
    let client_a = Peer::client(&name("ca"), port_a);
    let client_b = Peer::client(&name("cb"), port_b);
    for port in [port_a, port_b] {
        let stalls = daemon.wait_for_stalls(port, 2, REPORT_WITHIN);
        assert_eq!(
            stalls.len(),
            2,
            "both ends of port {port} stall: {stalls:#?}"
        );
    }

    // What selects A, and what A's selection must leave out. By pid and comm: the server A
    // only (its client and B are other processes). By port: both ends of A's connections.
    let selects = |flag: &str, item: &Value| match flag {
        "--pid" => pid_of(item) == pid_a,
        "--comm" => comm_of(item) == comm_a,
        _ => touches(item, port_a),
    };
    for command in ["conns", "stalls"] {
        let all = array(daemon.cli_json(&[command, "-o", "json"]));
        assert!(
            all.iter().any(|i| pid_of(i) == server_b.pid()),
            "unfiltered {command} holds B: {all:#?}"
        );
        for (flag, value) in filters {
            let items = array(daemon.cli_json(&[command, "-o", "json", flag, value]));
            assert!(
                items.iter().any(|i| pid_of(i) == pid_a),
                "{command} {flag} {value} selects server A: {items:#?}"
            );
            for item in &items {
                assert!(
                    selects(flag, item),
                    "{command} {flag} {value} let through {item:#}"
                );
                assert!(
                    !touches(item, port_b),
                    "{command} {flag} {value} let B through: {item:#}"
                );
            }
            if flag == "--port" {
                assert!(
                    items.iter().any(|i| pid_of(i) == client_a.pid()),
                    "{command} --port selects both ends: {items:#?}"
                );
            } else {
                assert!(
                    items.iter().all(|i| pid_of(i) != client_a.pid()),
                    "{command} {flag} leaves A's client out: {items:#?}"
                );
            }
        }
    }

    // The default output, a table (its rows made as the items stream in): A's two ends, not B.
    let table = daemon.cli(&["conns", "--port", &port_a_arg]);
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8(table.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("PEER"),
        "{table}"
    );
    let rows = &lines[1..lines.len() - 1];
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter().all(|row| row.contains(&format!(":{port_a}"))),
        "{table}"
    );
    assert_eq!(lines[lines.len() - 1], "2 connections", "{table}");

    // why: by comm and port. Its groups span processes, so --pid is refused, not ignored.
    let all = array(daemon.cli_json(&["why", "-o", "json"]));
    assert!(
        all.iter()
            .any(|r| r["executable"] == server_b.name.as_str()),
        "unfiltered why holds B: {all:#?}"
    );
    let by_comm = array(daemon.cli_json(&["why", "-o", "json", "--comm", &comm_a]));
    assert!(!by_comm.is_empty(), "why --comm selects A: {all:#?}");
    assert!(
        by_comm.iter().all(|r| r["executable"] == comm_a.as_str()),
        "why --comm {comm_a}: {by_comm:#?}"
    );
    let by_port = array(daemon.cli_json(&["why", "-o", "json", "--port", &port_a_arg]));
    let port_suffix = format!(":{port_a}");
    assert!(
        by_port
            .iter()
            .all(|r| r["endpoint"].as_str().unwrap().ends_with(&port_suffix)),
        "why --port {port_a}: {by_port:#?}"
    );
    for (role, executable) in [("server", &comm_a), ("client", &client_a.name)] {
        assert!(
            by_port
                .iter()
                .any(|r| r["role"] == role && r["executable"] == executable.as_str()),
            "why --port {port_a} has A's {role} group: {by_port:#?}"
        );
    }
    let refused = daemon.cli(&["why", "--pid", &pid_a_arg]);
    assert_eq!(refused.status.code(), Some(2), "why --pid is a usage error");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("not by process id"), "{message}");
    let mut api = UnixStream::connect(&daemon.socket).unwrap();
    api.write_all(
        format!("{{\"version\":1,\"command\":\"why\",\"filter\":{{\"pid\":{pid_a}}}}}\n")
            .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    BufReader::new(&mut api).read_line(&mut answer).unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "bad_request", "{answer:#}");

    // watch: each stream saw A's stalls, and only what its filter selects.
    for ((flag, value), watch) in filters.iter().zip(watches) {
        let events = watch.events();
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "stall.start" && pid_of(e) == pid_a),
            "watch {flag} {value} saw A's stall: {events:#?}"
        );
        for event in &events {
            assert!(
                selects(flag, event),
                "watch {flag} {value} let through {event:#}"
            );
            assert!(
                !touches(event, port_b),
                "watch {flag} {value} let B through {event:#}"
            );
        }
    }
    drop((client_a, client_b, server_a, server_b));
}

#[test]
fn why_counts_completed_requests_of_clients_as_of_servers() {
    require_root();
    let daemon = Daemon::start("why-clients");
    let (server, port) = Peer::server(&name("ws"));
    // Each request on a new connection: a client's first request on a connection is the only
    // one it makes there.
    let client = Peer::client(&name("wc"), port);
    let _ = daemon.wait_for_stalls(port, 2, REPORT_WITHIN);
    let deadline = Instant::now() + REPORT_WITHIN;
    let completed = |rows: &[Value], executable: &str| {
        rows.iter()
            .find(|r| r["executable"] == executable && r["signature"] == "GET /ok")
            .and_then(|r| r["completed"].as_u64())
            .unwrap_or(0)
    };
    loop {
        let rows = array(daemon.cli_json(&["why", "-o", "json", "--port", &port.to_string()]));
        let (client_done, server_done) = (
            completed(&rows, &client.name),
            completed(&rows, &server.name),
        );
        if client_done > 0 && server_done > 0 {
            let client_row = rows
                .iter()
                .find(|r| r["executable"] == client.name.as_str() && r["signature"] == "GET /ok")
                .unwrap();
            assert_eq!(client_row["role"], "client", "{rows:#?}");
            assert!(client_row["p50_ms"].as_f64().is_some(), "{rows:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{REQUESTS} requests on new connections: completed {client_done} for the client, \
             {server_done} for the server: {rows:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
