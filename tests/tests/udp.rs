//! UDP request/response, as a resolver and one-way senders produce it: real clients (glibc's
//! resolver through `getent`, Python sockets, util-linux `logger`) and real servers on
//! 127.0.0.0/8, against the real daemon. Each test uses its own port (and address): every
//! daemon sees every test's traffic.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    thread,
    time::Instant,
};

use serde_json::Value;
use stalltrace_integration::{require_root, touches, Daemon, REPORT_WITHIN, STALL_AFTER};

/// A DNS server on a UDP socket: `silent` reads and never answers; `answer` answers every
/// query after `delay` ms (NXDOMAIN, same id), dropping the first `skip` queries.
const DNS_SERVER: &str = r#"
import socket, sys, time
mode, host, port, delay, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000, int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    query, peer = s.recvfrom(4096)
    if mode == "silent":
        continue
    if skip > 0:
        skip -= 1
        continue
    time.sleep(delay)
    s.sendto(query[:2] + b"\x81\x83" + query[4:6] + b"\0\0\0\0\0\0" + query[12:], peer)
"#;

/// A DNS client: sends a query for `name` (connected socket, or `sendto` when `unconnected`),
/// sends it again (same id) every `retry` ms until `give_up` ms have passed, then closes.
const DNS_CLIENT: &str = r#"
import socket, struct, sys, time
host, port, name, retry, give_up, connected = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) / 1000, float(sys.argv[5]) / 1000, sys.argv[6] == "connected"
q = struct.pack(">HHHHHH", 0x4d2, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
send = (lambda: s.send(q)) if connected else (lambda: s.sendto(q, (host, port)))
if connected:
    s.connect((host, port))
start = time.monotonic()
send()
while time.monotonic() - start < give_up:
    s.settimeout(min(retry, give_up - (time.monotonic() - start)))
    try:
        s.recvfrom(4096)
        print("answered", flush=True)
        break
    except socket.timeout:
        if time.monotonic() - start < give_up:
            send()
s.close()
print("done", flush=True)
"#;

/// A request/response protocol that is not DNS (`sendto`/`recvfrom` on an unconnected
/// socket): `ping` answered with `pong` by the server unless it is `ping-ignored`.
const PING: &str = r#"
import socket, sys, time
role, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if role == "server":
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        if data == b"ping":
            s.sendto(b"pong", peer)
else:
    s.settimeout(float(sys.argv[3]))
    for message in sys.argv[4:]:
        s.sendto(message.encode(), ("127.0.0.1", port))
        try:
            s.recvfrom(4096)
            print("answered", flush=True)
        except socket.timeout:
            print("timeout", flush=True)
    s.close()
"#;

/// A statsd-style sender: `count` datagrams, one every `every` ms, to a port that never
/// answers (a bound socket that only reads), on a connected or an unconnected socket.
const ONE_WAY: &str = r#"
import socket, sys, time
port, count, every, connected = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000, sys.argv[4] == "connected"
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("127.0.0.1", port))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if connected:
    s.connect(("127.0.0.1", port))
for i in range(count):
    line = b"app.requests:%d|c" % i
    s.send(line) if connected else s.sendto(line, ("127.0.0.1", port))
    sink.recv(4096)
    time.sleep(every)
print("done", flush=True)
"#;

fn python(script: &str, args: &[String]) -> Child {
    // Debian's interpreter: the one on PATH may be a pyenv shim.
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("running /usr/bin/python3")
}

/// Starts a server script and waits for its `ready` line.
fn server(script: &str, args: &[String]) -> Child {
    let mut child = python(script, args);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "server did not start");
    child
}

fn args(values: &[&dyn ToString]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// Kills a helper process on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_resolver_waiting_on_a_dead_server_is_named_and_ends_closed_with_its_retries() {
    require_root();
    let daemon = Daemon::start("udp-resolver");
    // A local resolver address that reads queries and never answers, and glibc's resolver
    // pointed at it in a private mount namespace (the host's resolv.conf is untouched).
    let _server = Reaped(server(
        DNS_SERVER,
        &args(&[&"silent", &"127.0.0.53", &53, &0, &0]),
    ));
    let resolv = daemon.dir().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.53\noptions timeout:2 attempts:2\n",
    )
    .unwrap();
    let started = Instant::now();
    let mut getent = Reaped(
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && exec getent ahostsv4 example.invalid",
                resolv.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let stall = daemon.wait_for_stall(53, "client", STALL_AFTER + REPORT_WITHIN);
    assert_eq!(stall["network"]["transport"], "udp");
    assert_eq!(stall["network"]["peer"]["address"], "127.0.0.53");
    assert_eq!(stall["stall"]["kind"], "awaiting_response");
    assert_eq!(stall["process"]["executable"]["name"], "getent");
    assert_eq!(
        stall["stall"]["request"]["signature"], "dns A example.invalid",
        "{stall:#}"
    );
    // What a new user types.
    let table = daemon.cli(&["stalls", "--port", "53"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("dns A example.invalid") && table.contains("127.0.0.53:53"),
        "{table}"
    );
    // The server's side of a UDP socket that only reads is never judged.
    assert!(
        daemon
            .stalls(53)
            .iter()
            .all(|s| s["conn"]["role"] == "client"),
        "{:#?}",
        daemon.stalls(53)
    );

    // glibc gives up after 2 tries of 2 s and closes its socket.
    let status = getent.0.wait().unwrap();
    assert_eq!(status.code(), Some(2), "getent found no answer");
    let waited = started.elapsed();
    let end = daemon
        .wait_for_event("stall.end", 53, REPORT_WITHIN, |e| {
            e["network"]["transport"] == "udp"
        })
        .unwrap_or_else(|| panic!("no stall.end:\n{}", daemon.stderr()));
    assert_eq!(end["stall"]["resolution"], "closed", "{end:#}");
    assert_eq!(end["stall"]["retries"], 1, "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(
        (3_900..=waited.as_millis() as u64).contains(&duration),
        "true duration {duration} ms, getent ran {waited:?}"
    );
    let close = daemon
        .wait_for_event("conn.close", 53, REPORT_WITHIN, |e| {
            e["conn"]["role"] == "client"
        })
        .expect("conn.close");
    assert_eq!(close["conn"]["closed_while_stalled"], true);
    assert_eq!(close["conn"]["sends"], 2);
}

#[test]
fn an_answer_ends_the_stall_with_its_true_duration_and_a_quick_one_is_no_stall() {
    require_root();
    let daemon = Daemon::start("udp-answer");
    let slow = 47_531;
    let quick = 47_532;
    let delay_ms = STALL_AFTER.as_millis() as u64 + 1_200;
    let _slow = Reaped(server(
        DNS_SERVER,
        &args(&[&"answer", &"127.0.0.1", &slow, &delay_ms, &0]),
    ));
    let _quick = Reaped(server(
        DNS_SERVER,
        &args(&[&"answer", &"127.0.0.1", &quick, &0, &0]),
    ));
    // Not port 53: recognized as DNS by its header.
    let mut fast = python(
        DNS_CLIENT,
        &args(&[
            &"127.0.0.1",
            &quick,
            &"fast.example",
            &10_000,
            &10_000,
            &"connected",
        ]),
    );
    let mut slow_client = python(
        DNS_CLIENT,
        &args(&[
            &"127.0.0.1",
            &slow,
            &"slow.example",
            &10_000,
            &10_000,
            &"connected",
        ]),
    );
    let stall = daemon.wait_for_stall(slow, "client", STALL_AFTER + REPORT_WITHIN);
    assert_eq!(stall["stall"]["request"]["signature"], "dns A slow.example");
    assert!(slow_client.wait().unwrap().success());
    assert!(fast.wait().unwrap().success());
    let end = daemon
        .wait_for_event("stall.end", slow, REPORT_WITHIN, |_| true)
        .unwrap_or_else(|| panic!("no stall.end:\n{}", daemon.stderr()));
    assert_eq!(end["stall"]["resolution"], "response");
    assert_eq!(end["stall"]["retries"], 0);
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(
        (delay_ms..delay_ms + 500).contains(&duration),
        "true duration {duration} ms, server delay {delay_ms} ms"
    );
    thread::sleep(STALL_AFTER * 2);
    assert!(
        daemon.events_named("stall.start", quick).is_empty(),
        "a query answered at once stalled"
    );
    let opened = daemon.events_named("conn.open", quick);
    assert!(
        opened.iter().any(|e| e["network"]["transport"] == "udp"),
        "{opened:#?}"
    );
}

#[test]
fn a_retried_query_is_counted_and_its_late_answer_ends_it() {
    require_root();
    let daemon = Daemon::start("udp-retry");
    let port = 47_533;
    // The server drops the first query; the client resends the same id after 1.5 s.
    let _server = Reaped(server(
        DNS_SERVER,
        &args(&[&"answer", &"127.0.0.1", &port, &0, &1]),
    ));
    let retry_ms = STALL_AFTER.as_millis() as u64 + 500;
    let mut client = python(
        DNS_CLIENT,
        &args(&[
            &"127.0.0.1",
            &port,
            &"retry.example",
            &retry_ms,
            &10_000,
            &"unconnected",
        ]),
    );
    daemon.wait_for_stall(port, "client", STALL_AFTER + REPORT_WITHIN);
    assert!(client.wait().unwrap().success());
    let end = daemon
        .wait_for_event("stall.end", port, REPORT_WITHIN, |_| true)
        .unwrap_or_else(|| panic!("no stall.end:\n{}", daemon.stderr()));
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    assert_eq!(end["stall"]["retries"], 1, "{end:#}");
    // Timed from the first query, not the retry.
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(duration >= retry_ms, "{duration} ms < {retry_ms} ms");
}

#[test]
fn a_peer_that_answered_before_is_judged_when_it_stops_and_a_close_ends_it() {
    require_root();
    let daemon = Daemon::start("udp-ping");
    let port = 47_534;
    let _server = Reaped(server(PING, &args(&[&"server", &port])));
    // Answered once (the flow shows request/response), then a request the server ignores;
    // the client gives up and closes its socket.
    let wait = STALL_AFTER.as_secs_f64() + 2.0;
    let mut client = python(
        PING,
        &args(&[&"client", &port, &wait, &"ping", &"ping-ignored"]),
    );
    let stall = daemon.wait_for_stall(port, "client", STALL_AFTER + REPORT_WITHIN);
    assert_eq!(stall["network"]["transport"], "udp");
    assert_eq!(stall["network"]["peer"]["port"], port);
    assert!(stall["stall"].get("retries").is_some(), "{stall:#}");
    assert!(client.wait().unwrap().success());
    let end = daemon
        .wait_for_event("stall.end", port, REPORT_WITHIN, |_| true)
        .unwrap_or_else(|| panic!("no stall.end:\n{}", daemon.stderr()));
    assert_eq!(end["stall"]["resolution"], "closed");
    let close = daemon
        .wait_for_event("conn.close", port, REPORT_WITHIN, |e| {
            e["conn"]["role"] == "client"
        })
        .expect("conn.close");
    // The first exchange showed that the peer answers; the second was judged.
    assert_eq!(close["conn"]["exchanges"], 1);
    assert_eq!(close["conn"]["requests"], 2);
}

#[test]
fn one_way_senders_are_never_flagged() {
    require_root();
    let daemon = Daemon::start("udp-one-way");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(status["features"]["udp"], true, "{status:#}");
    assert!(
        status["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["hook"] == "cgroup/sock_release"),
        "{status:#}"
    );
    let (connected, unconnected, syslog) = (47_535, 47_536, 47_537);
    let every_ms = 50;
    let count = (3 * STALL_AFTER.as_millis() as u64 / every_ms).to_string();
    let mut senders = vec![
        python(
            ONE_WAY,
            &args(&[&connected, &count, &every_ms, &"connected"]),
        ),
        python(
            ONE_WAY,
            &args(&[&unconnected, &count, &every_ms, &"unconnected"]),
        ),
    ];
    // A syslog collector that never answers, and util-linux's logger sending to it.
    let _collector = Reaped(server(
        DNS_SERVER,
        &args(&[&"silent", &"127.0.0.1", &syslog, &0, &0]),
    ));
    for i in 0..5 {
        let status = Command::new("logger")
            .args(["-d", "-n", "127.0.0.1", "-P", &syslog.to_string()])
            .arg(format!("stalltrace one-way test {i}"))
            .status()
            .unwrap();
        assert!(status.success());
    }
    for sender in &mut senders {
        assert!(sender.wait().unwrap().success());
    }
    thread::sleep(STALL_AFTER * 2);
    let events = daemon.events();
    for port in [connected, unconnected, syslog] {
        let seen: Vec<&Value> = events.iter().filter(|e| touches(e, port)).collect();
        assert!(
            seen.iter()
                .any(|e| e["event"] == "conn.open" && e["network"]["transport"] == "udp"),
            "port {port}: the UDP sender was not tracked: {seen:#?}"
        );
        assert!(
            !seen.iter().any(|e| e["event"] == "stall.start"),
            "port {port}: one-way UDP flagged: {seen:#?}"
        );
    }
    let sent = events
        .iter()
        .find(|e| {
            e["event"] == "conn.close" && touches(e, connected) && e["conn"]["role"] == "client"
        })
        .map(|close| {
            (
                close["conn"]["sends"].clone(),
                close["conn"]["requests"].clone(),
            )
        });
    let count: u64 = count.parse().unwrap();
    assert_eq!(sent, Some((count.into(), 0.into())), "sends and requests");
}
