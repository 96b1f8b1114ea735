//! `why` samples completed requests on both ends, against servers and clients in their own
//! processes with their own names.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{can_trace, Daemon, REPORT_WITHIN};

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

#[test]
fn why_counts_completed_requests_of_clients_as_of_servers() {
    if !can_trace("why_counts_completed_requests_of_clients_as_of_servers") {
        return;
    }
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
