//! Bytes that bypass the transfer hooks: haproxy forwards bodies with `splice(2)` (socket →
//! pipe → socket), and a receive by splice passes neither `sock_recv_length` nor
//! `tcp_recvmsg`. Counted from `tcp/tcp_rcv_space_adjust` (`stalltrace-ebpf/src/splice.rs`),
//! they must leave every verdict as if read by `recv()`: a large response through the proxy
//! flags none of the four sockets (the proxy's backend connection used to be a false
//! `response_incomplete`: its framing saw the head by `recv()`, the body not at all), a
//! backend that stops mid-response is flagged on all four with what is still owed, and a
//! request the proxy receives by splice starts a request.
use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Output},
    thread,
    time::Duration,
};

use serde_json::Value;
use stalltrace_integration::{
    assert_ended_by_responses, daemon_dir, free_port, require_root, start_haproxy, with_role,
    Daemon, Terminated, REPORT_WITHIN, STALL_AFTER,
};

/// The response bodies: far more than haproxy's 16 KiB buffer, so it splices them.
const BODY: usize = 4 << 20;
/// How long the backend stops mid-response, or before answering.
const PAUSE: Duration = Duration::from_secs(4);

/// An HTTP/1.1 backend: reads each request (its head, then its `Content-Length` body), then
/// answers `BODY` bytes: with `pause`, half of them, the pause, then the rest. Keeps
/// connections open (keep-alive). Returns its address.
fn backend(pause: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                while read_request(&mut reader).is_some() {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
                    let first = if pause.is_zero() { BODY } else { BODY / 2 };
                    if writer.write_all(head.as_bytes()).is_err()
                        || writer.write_all(&vec![b'a'; first]).is_err()
                    {
                        return;
                    }
                    thread::sleep(pause);
                    if writer.write_all(&vec![b'a'; BODY - first]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one request's head and body (its length returned); `None` at the end of the stream.
fn read_request(reader: &mut impl BufRead) -> Option<usize> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(length)
}

/// haproxy in `mode` with kernel splicing forced both ways, in front of `server`; returns
/// it (stopped when dropped) and its address.
fn haproxy(daemon: &Daemon, mode: &str, server: SocketAddr) -> (Terminated, SocketAddr) {
    let proxy = free_port();
    let dir = daemon_dir(daemon, "haproxy");
    let config = format!(
        "defaults
           mode {mode}
           timeout connect 5s
           timeout client 60s
           timeout server 60s
           option splice-request
           option splice-response
         listen proxy
           bind {proxy}
           server backend {server}
"
    );
    (start_haproxy(&dir, proxy, &config), proxy)
}

/// haproxy must have been built with splice, or these tests prove nothing.
fn require_haproxy_splice() {
    let output = Command::new("haproxy").arg("-vv").output().unwrap();
    let features = String::from_utf8_lossy(&output.stdout);
    assert!(
        features.contains("+LINUX_SPLICE"),
        "this haproxy cannot splice: {features}"
    );
}

fn curl(args: &[&str]) -> Output {
    let output = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
        ])
        .args(["--write-out", "%{size_download}"])
        .args(args)
        .output()
        .expect("curl (cargo xtask test installs it)");
    assert!(output.status.success(), "curl failed: {output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), BODY.to_string());
    output
}

/// The daemon, checked to count splice reads.
fn start(name: &str) -> Daemon {
    require_root();
    require_haproxy_splice();
    let daemon = Daemon::start(name);
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        status["features"]["splice_reads"]["enabled"], true,
        "{status:#}"
    );
    daemon
}

/// The connections touching `port` (both ends when both are local).
fn conns(daemon: &Daemon, port: u16) -> Vec<Value> {
    daemon
        .cli_json(&["conns", "-o", "json", "--port", &port.to_string()])
        .as_array()
        .expect("conns -o json is an array")
        .clone()
}

#[test]
fn large_bodies_through_a_splicing_haproxy_flag_nothing() {
    let daemon = start("splice-quiet");
    let server = backend(Duration::ZERO);
    let (_haproxy, proxy) = haproxy(&daemon, "http", server);
    let url = format!("http://{proxy}/big");
    // A response, then a request whose body goes by splice too; the connections stay open.
    curl(&[&url]);
    let upload = daemon_dir(&daemon, "upload").join("body");
    std::fs::write(&upload, vec![b'q'; 1 << 20]).unwrap();
    curl(&[&url, "--data-binary", &format!("@{}", upload.display())]);
    // The backend keeps its connection to haproxy open: judged idle, not owed anything.
    thread::sleep(STALL_AFTER * 3);
    for port in [proxy.port(), server.port()] {
        let starts = daemon.events_named("stall.start", port);
        assert!(starts.is_empty(), "false stalls: {starts:#?}");
    }
    // haproxy's backend connections (one per client connection) read the responses'
    // bodies by splice: every byte counted.
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").len();
    let backend_side = conns(&daemon, server.port());
    let haproxy_clients: Vec<&Value> = backend_side
        .iter()
        .filter(|c| c["conn"]["role"] == "client")
        .collect();
    assert!(!haproxy_clients.is_empty(), "{backend_side:#?}");
    for conn in &haproxy_clients {
        assert_eq!(conn["process"]["executable"]["name"], "haproxy", "{conn:#}");
        assert_eq!(conn["conn"]["state"], "idle", "{conn:#}");
    }
    let received: u64 = haproxy_clients
        .iter()
        .map(|c| c["conn"]["bytes_received"].as_u64().unwrap())
        .sum();
    assert_eq!(received, 2 * (BODY + head) as u64, "{haproxy_clients:#?}");
    // haproxy's client side read the upload's body by splice (curl has closed it).
    let closes = daemon.wait_for_events("conn.close", proxy.port(), 4, REPORT_WITHIN);
    let uploaded = closes
        .iter()
        .filter(|c| c["conn"]["role"] == "server")
        .filter_map(|c| c["conn"]["bytes_received"].as_u64())
        .max();
    assert!(uploaded > Some(1 << 20), "upload counted: {closes:#?}");
}

#[test]
fn a_backend_stopping_mid_response_behind_a_splicing_haproxy_is_flagged_everywhere() {
    let daemon = start("splice-stopped");
    let server = backend(PAUSE);
    let (_haproxy, proxy) = haproxy(&daemon, "http", server);
    let url = format!("http://{proxy}/big");
    let client = thread::spawn(move || curl(&[&url]));
    // curl and haproxy's client side; haproxy's backend connection and the backend: each
    // end is owed the half of the body the backend has not sent.
    let ports = [proxy.port(), server.port()];
    for port in ports {
        for role in ["client", "server"] {
            let stall = daemon.wait_for_stall(port, role, REPORT_WITHIN);
            assert_eq!(stall["stall"]["kind"], "response_incomplete", "{stall:#}");
            assert_eq!(stall["stall"]["owed_bytes"], BODY / 2, "{stall:#}");
            // The socket's own count of bytes read agrees with what the programs counted.
            assert_eq!(stall["stall"]["confidence"], "full", "{stall:#}");
        }
    }
    for port in ports {
        assert_ended_by_responses(&daemon, port, 2, PAUSE, PAUSE + REPORT_WITHIN);
    }
    client.join().unwrap();
    let starts: Vec<Value> = ports
        .iter()
        .flat_map(|&port| daemon.events_named("stall.start", port))
        .collect();
    assert_eq!(starts.len(), 4, "one stall per end: {starts:#?}");
}

#[test]
fn a_request_a_tcp_proxy_receives_by_splice_starts_a_request() {
    let daemon = start("splice-request");
    // An echo-like backend: answers each message of 3 000 bytes with 100 000 bytes, the
    // second one after PAUSE.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    thread::spawn(move || {
        // Each connection in its own thread: the harness's probe for the proxy's port makes
        // haproxy connect once first.
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                for pause in [Duration::ZERO, PAUSE] {
                    let mut request = [0u8; 3_000];
                    if stream.read_exact(&mut request).is_err() {
                        return;
                    }
                    thread::sleep(pause);
                    if stream.write_all(&[b'r'; 100_000]).is_err() {
                        return;
                    }
                }
                thread::sleep(Duration::from_secs(30));
            });
        }
    });
    let (_haproxy, proxy) = haproxy(&daemon, "tcp", server);
    let mut client = TcpStream::connect(proxy).unwrap();
    let exchange = |client: &mut TcpStream| {
        client.write_all(&[b'q'; 3_000]).unwrap();
        let mut reply = vec![0u8; 100_000];
        client.read_exact(&mut reply).unwrap();
    };
    // haproxy reads the first request into its buffer; once forwarding, it splices: the
    // second request reaches it by splice only.
    exchange(&mut client);
    let second = thread::spawn(move || {
        exchange(&mut client);
        client
    });
    let stall = daemon.wait_for_stall(proxy.port(), "server", REPORT_WITHIN);
    assert_eq!(stall["stall"]["kind"], "unanswered_request", "{stall:#}");
    assert_eq!(
        stall["process"]["executable"]["name"], "haproxy",
        "{stall:#}"
    );
    let _client = second.join().unwrap();
    let ends = daemon.wait_for_events("stall.end", proxy.port(), 2, REPORT_WITHIN);
    let end = with_role(&ends, "server");
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(
        duration + 300 >= PAUSE.as_millis() as u64,
        "true duration: {end:#}"
    );
    let haproxy_server = with_role(&conns(&daemon, proxy.port()), "server").clone();
    assert_eq!(
        haproxy_server["conn"]["bytes_received"], 6_000,
        "{haproxy_server:#}"
    );
    assert_eq!(haproxy_server["conn"]["requests"], 2, "{haproxy_server:#}");
}
