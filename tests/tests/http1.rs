//! HTTP/1.x response framing, with curl as the client: a response that stops short of its
//! `Content-Length`, or before its chunked body's last chunk, is a `response_incomplete` stall
//! on both ends, ended by the rest of the response with its true duration; complete responses
//! on idle keep-alive connections, bodiless responses (`HEAD`, 204) and a server-sent event
//! stream are never flagged.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    assert_ended_by_responses, daemon_dir, free_port, require_root, start_nginx, with_role, Daemon,
    REPORT_WITHIN, STALL_AFTER,
};

/// A response in parts: each is written, then the server sleeps for its pause.
type Parts = Vec<(Vec<u8>, Duration)>;

/// Serves each connection's requests in turn with `respond(path)`'s parts; returns its port.
fn serve(respond: fn(&str) -> Parts) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || serve_connection(stream, respond));
        }
    });
    port
}

fn serve_connection(stream: TcpStream, respond: fn(&str) -> Parts) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the blank line (the requests here have no body).
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
        for (bytes, pause) in respond(&path) {
            if writer.write_all(&bytes).is_err() {
                return;
            }
            thread::sleep(pause);
        }
    }
}

/// Reads from `stream` until what it read ends with `end`.
fn read_until(stream: &mut TcpStream, end: &[u8]) {
    let mut read = Vec::new();
    let mut byte = [0u8; 1];
    while !read.ends_with(end) {
        let n = std::io::Read::read(stream, &mut byte).unwrap();
        assert_eq!(n, 1, "the server closed; read so far: {read:?}");
        read.push(byte[0]);
    }
}

fn curl(args: &[&str]) -> Child {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl (cargo xtask test installs it)")
}

fn finished(child: Child) -> Output {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "curl failed: {output:?}");
    output
}

/// Both ends' `response_incomplete` stalls on `port`, then their ends: `response`, lasting
/// at least `pause` (less scheduling slack).
fn assert_flagged_on_both_ends_until(daemon: &Daemon, port: u16, pause: Duration) -> Vec<Value> {
    let client = daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    let server = daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    for stall in [&client, &server] {
        assert_eq!(stall["stall"]["kind"], "response_incomplete", "{stall:#}");
    }
    assert_eq!(server["stall"]["cause"], "response_stopped", "{server:#}");
    let ends = assert_ended_by_responses(daemon, port, 2, pause, pause + REPORT_WITHIN);
    for end in &ends {
        assert_eq!(end["stall"]["kind"], "response_incomplete", "{end:#}");
    }
    let starts = daemon.events_named("stall.start", port);
    assert_eq!(starts.len(), 2, "one stall per end: {starts:#?}");
    starts
}

const PAUSE: Duration = Duration::from_secs(4);

#[test]
fn a_response_short_of_its_content_length_is_flagged_on_both_ends() {
    require_root();
    let daemon = Daemon::start("http1-length");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        status["features"]["http1_response_framing"], true,
        "{status:#}"
    );
    let port = serve(|_| {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: 10000\r\n\r\n";
        vec![
            ([head.as_slice(), &[b'a'; 100]].concat(), PAUSE),
            (vec![b'a'; 9_900], Duration::ZERO),
        ]
    });
    let client = curl(&[&format!("http://127.0.0.1:{port}/big"), "-o", "/dev/null"]);
    let starts = assert_flagged_on_both_ends_until(&daemon, port, PAUSE);
    let server = with_role(&starts, "server");
    assert_eq!(server["stall"]["owed_bytes"], 9_900, "{server:#}");
    assert_eq!(
        server["stall"]["request"]["signature"], "GET /big",
        "{server:#}"
    );
    finished(client);
}

#[test]
fn a_chunked_response_without_its_last_chunk_is_flagged_on_both_ends() {
    paused_chunked_response_is_flagged(
        "http1-chunked",
        |_| {
            vec![
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
                    PAUSE,
                ),
                (b"6\r\n world\r\n".to_vec(), Duration::ZERO),
                (b"0\r\n\r\n".to_vec(), Duration::ZERO),
            ]
        },
        b"hello world",
    );
}

/// The headers sent, then nothing while the body is worked on: the header block's blank line
/// is no last chunk.
#[test]
fn a_chunked_response_stopped_after_its_headers_is_flagged_on_both_ends() {
    paused_chunked_response_is_flagged(
        "http1-chunked-head",
        |_| {
            vec![
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                    PAUSE,
                ),
                (b"5\r\nhello\r\n0\r\n\r\n".to_vec(), Duration::ZERO),
            ]
        },
        b"hello",
    );
}

/// curl's request to a server answering with `respond`, a chunked response that pauses for
/// [`PAUSE`]: flagged on both ends until it goes on; curl gets all of `body`.
fn paused_chunked_response_is_flagged(name: &str, respond: fn(&str) -> Parts, body: &[u8]) {
    require_root();
    let daemon = Daemon::start(name);
    let port = serve(respond);
    let client = curl(&[&format!("http://127.0.0.1:{port}/slow")]);
    assert_flagged_on_both_ends_until(&daemon, port, PAUSE);
    assert_eq!(finished(client).stdout, body);
}

/// nginx relays a chunked response that stops before its last chunk: every hop is flagged —
/// the upstream server, nginx's upstream connection, nginx's connection to curl (nginx writes
/// each chunk's `\r\n` in an `iovec` entry of its own) and curl — and the blame chain from
/// curl ends at the upstream server.
#[test]
fn a_chunked_response_relayed_by_nginx_is_flagged_on_every_hop() {
    require_root();
    let daemon = Daemon::start("http1-nginx");
    // Four stalls are awaited one after the other: the pause outlasts all the waits.
    let upstream = serve(|_| {
        vec![
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
                REPORT_WITHIN * 4,
            ),
            (b"0\r\n\r\n".to_vec(), Duration::ZERO),
        ]
    });
    let proxy = free_port();
    let http = format!(
        "upstream up {{ server 127.0.0.1:{upstream}; }}
         server {{ listen {proxy}; location / {{ proxy_pass http://up; proxy_buffering off; }} }}"
    );
    let _nginx = start_nginx(&daemon_dir(&daemon, "nginx"), proxy, &http);
    let client = curl(&[&format!("http://{proxy}/stream")]);
    let proxy_port = proxy.port();
    let curl_end = daemon.wait_for_stall(proxy_port, "client", REPORT_WITHIN);
    let nginx_front = daemon.wait_for_stall(proxy_port, "server", REPORT_WITHIN);
    let nginx_up = daemon.wait_for_stall(upstream, "client", REPORT_WITHIN);
    let server = daemon.wait_for_stall(upstream, "server", REPORT_WITHIN);
    for stall in [&curl_end, &nginx_front, &nginx_up, &server] {
        assert_eq!(stall["stall"]["kind"], "response_incomplete", "{stall:#}");
    }
    assert_eq!(server["stall"]["cause"], "response_stopped", "{server:#}");
    // curl's stall may have been listed before its first look came back, or before the hops
    // behind it stalled: its chain is read again, now that all four are open, until it
    // reaches the upstream server or the time is up.
    let root_name = &server["process"]["executable"]["name"];
    let deadline = Instant::now() + REPORT_WITHIN;
    let curl_end = loop {
        let now = daemon.wait_for_stall(proxy_port, "client", REPORT_WITHIN);
        let root = now["stall"]["blame"]
            .as_array()
            .and_then(|b| b.last().cloned());
        if root.is_some_and(|r| r["executable"] == *root_name) || Instant::now() > deadline {
            break now;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let blame = curl_end["stall"]["blame"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let root = blame
        .last()
        .unwrap_or_else(|| panic!("no blame chain: {curl_end:#}"));
    assert_eq!(
        root["executable"], server["process"]["executable"]["name"],
        "{curl_end:#}"
    );
    assert_eq!(finished(client).stdout, b"hello");
}

/// Complete responses of every framing, each the last on an idle keep-alive connection; and a server-sent
/// event stream that pauses between events past the threshold: nothing is owed, nothing is
/// flagged.
#[test]
fn complete_bodiless_and_streamed_responses_are_never_flagged() {
    require_root();
    let daemon = Daemon::start("http1-complete");
    let port = serve(|path| match path {
        "/length" => vec![(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Duration::ZERO,
        )],
        "/chunked" => vec![
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                Duration::ZERO,
            ),
            (b"5\r\nhello\r\n".to_vec(), Duration::ZERO),
            (b"0\r\n\r\n".to_vec(), Duration::ZERO),
        ],
        // Head, chunk and last chunk in one write: both ends take the tail from the copy of
        // the response's start, not from a second read of the buffer.
        "/whole" => vec![(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            Duration::ZERO,
        )],
        "/empty" => vec![(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), Duration::ZERO)],
        "/events" => {
            let mut parts = vec![(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\n"
                    .to_vec(),
                Duration::ZERO,
            )];
            for tick in 0..3 {
                let event = format!("data: tick {tick}\n\n");
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                parts.push((chunk.into_bytes(), STALL_AFTER * 2));
            }
            parts.push((b"0\r\n\r\n".to_vec(), Duration::ZERO));
            parts
        }
        // HEAD: the length of the body a GET would get, and no body.
        _ => vec![(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n".to_vec(),
            Duration::ZERO,
        )],
    });
    // A keep-alive connection per framing, idle after its response: only a connection's
    // latest response is judged, so each framing must be a connection's last.
    let mut idle = Vec::new();
    for (request, expected) in [
        ("GET /length", "hello"),
        ("GET /chunked", "0\r\n\r\n"),
        ("GET /whole", "0\r\n\r\n"),
        ("GET /empty", "No Content\r\n\r\n"),
        ("HEAD /head", "Content-Length: 10000\r\n\r\n"),
    ] {
        let mut keep_alive = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(keep_alive, "{request} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        read_until(&mut keep_alive, expected.as_bytes());
        idle.push(keep_alive);
    }
    let events = curl(&["--no-buffer", &format!("http://127.0.0.1:{port}/events")]);
    thread::sleep(STALL_AFTER * 7);
    assert_eq!(daemon.stalls(port), Vec::<Value>::new());
    assert_eq!(
        daemon.events_named("stall.start", port),
        Vec::<Value>::new()
    );
    let stream = finished(events);
    assert!(
        String::from_utf8_lossy(&stream.stdout).contains("tick 2"),
        "the stream ran to its end: {stream:?}"
    );
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
    assert!(
        conns.as_array().is_some_and(|c| c.len() >= 2),
        "the connections must be tracked, or this test proves nothing: {conns:#}"
    );
}

/// Pipelining (issue 7 case 3b): `/fast` is answered at once, `/slow` after this pause.
const SLOW_PAUSE: Duration = Duration::from_secs(6);

fn fast_then_slow(path: &str) -> Parts {
    let response = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    match path {
        "/slow" => vec![(Vec::new(), SLOW_PAUSE), (response("slow"), Duration::ZERO)],
        "/chunked" => vec![(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfast\r\n0\r\n\r\n".to_vec(),
            Duration::ZERO,
        )],
        // `/fast`, `/last`: the path is the body.
        _ => vec![(response(path.trim_start_matches('/')), Duration::ZERO)],
    }
}

/// Writes `requests` (each a `GET` of its path, with `headers`) on a new connection to
/// `port` — all in one write, or one write each — then reads until the responses' bytes end
/// with `last`; returns the stream, open.
fn pipeline(port: u16, paths: &[&str], headers: &str, one_write: bool, last: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let requests: Vec<String> = paths
        .iter()
        .map(|path| format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"))
        .collect();
    if one_write {
        stream.write_all(requests.concat().as_bytes()).unwrap();
    } else {
        for request in &requests {
            stream.write_all(request.as_bytes()).unwrap();
        }
    }
    // Read as HTTP clients do, a buffer at a time (byte-sized reads would leave the kernel a
    // one-byte copy of the first response's head).
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    while !read.ends_with(last) {
        let n = std::io::Read::read(&mut stream, &mut buffer).unwrap();
        assert!(n > 0, "the server closed; read so far: {read:?}");
        read.extend_from_slice(&buffer[..n]);
    }
    stream
}

/// Both ends of `port` flagged within the threshold + 1 s of the first response, naming the
/// request owed; ended by its response with the true duration.
fn assert_slow_second_flagged_on_both_ends(daemon: &Daemon, port: u16) {
    let client = daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    let server = daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    assert_eq!(client["stall"]["kind"], "awaiting_response", "{client:#}");
    assert_eq!(server["stall"]["kind"], "unanswered_request", "{server:#}");
    for stall in [&client, &server] {
        assert_eq!(
            stall["stall"]["request"]["signature"], "GET /slow",
            "{stall:#}"
        );
        assert_eq!(stall["stall"]["confidence"], "full", "{stall:#}");
    }
    let ends = assert_ended_by_responses(daemon, port, 2, SLOW_PAUSE, SLOW_PAUSE + REPORT_WITHIN);
    for end in &ends {
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration < (SLOW_PAUSE + REPORT_WITHIN).as_millis() as u64,
            "counted from the first response's end: {end:#}"
        );
    }
    assert_eq!(daemon.events_named("stall.start", port).len(), 2);
}

#[test]
fn a_slow_request_pipelined_behind_a_fast_one_in_one_write_is_flagged_on_both_ends() {
    require_root();
    let daemon = Daemon::start("http1-pipelined");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(status["features"]["http1_pipelining"], true, "{status:#}");
    let port = serve(fast_then_slow);
    // Browser-sized requests: together past the first 512 bytes of the run.
    let cookie = format!("Cookie: session={}\r\n", "c".repeat(300));
    let client = thread::spawn(move || pipeline(port, &["/fast", "/slow"], &cookie, true, b"slow"));
    assert_slow_second_flagged_on_both_ends(&daemon, port);
    client.join().unwrap();
    let status = daemon.cli_json(&["status", "-o", "json"]);
    let connections = &status["connections"];
    assert!(
        connections["http1_pipelined_runs"].as_u64() >= Some(2),
        "both ends counted: {connections:#}"
    );
}

#[test]
fn a_slow_request_pipelined_in_writes_of_their_own_is_flagged_on_both_ends() {
    require_root();
    let daemon = Daemon::start("http1-pipelined-writes");
    let port = serve(fast_then_slow);
    let client = thread::spawn(move || pipeline(port, &["/chunked", "/slow"], "", false, b"slow"));
    assert_slow_second_flagged_on_both_ends(&daemon, port);
    client.join().unwrap();
}

#[test]
fn pipelined_requests_all_answered_at_once_are_never_flagged() {
    require_root();
    let daemon = Daemon::start("http1-pipelined-fast");
    let port = serve(fast_then_slow);
    let paths = ["/fast", "/chunked", "/last"];
    let _idle = pipeline(port, &paths, "", true, b"last");
    let _idle_too = pipeline(port, &paths, "", false, b"last");
    // Header blocks past the kernel's copy: not counted, and said so; never a guess.
    let cookie = format!("Cookie: session={}\r\n", "c".repeat(1_500));
    let _uncounted = pipeline(port, &paths, &cookie, true, b"last");
    thread::sleep(STALL_AFTER * 5);
    assert_eq!(daemon.stalls(port), Vec::<Value>::new());
    assert_eq!(
        daemon.events_named("stall.start", port),
        Vec::<Value>::new()
    );
    let status = daemon.cli_json(&["status", "-o", "json"]);
    let connections = &status["connections"];
    assert!(
        connections["http1_runs_uncounted"].as_u64() >= Some(1),
        "{connections:#}"
    );
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
    assert!(
        conns.as_array().is_some_and(|c| c.len() >= 6),
        "the connections must be tracked, or this test proves nothing: {conns:#}"
    );
}

/// nginx serves pipelined requests in turn: the second one's upstream is slow, so nginx's
/// client waits on it behind the first one's complete response.
#[test]
fn a_pipelined_request_nginx_relays_to_a_slow_upstream_flags_the_client() {
    require_root();
    let daemon = Daemon::start("http1-pipelined-nginx");
    let upstream = serve(fast_then_slow);
    let proxy = free_port();
    let http = format!(
        "upstream up {{ server 127.0.0.1:{upstream}; }}
         server {{ listen {proxy}; location / {{ proxy_pass http://up; }} }}"
    );
    let _nginx = start_nginx(&daemon_dir(&daemon, "nginx"), proxy, &http);
    let proxy_port = proxy.port();
    let client =
        thread::spawn(move || pipeline(proxy_port, &["/fast", "/slow"], "", true, b"slow"));
    let stall = daemon.wait_for_stall(proxy_port, "client", REPORT_WITHIN);
    assert_eq!(stall["stall"]["kind"], "awaiting_response", "{stall:#}");
    assert_eq!(
        stall["stall"]["request"]["signature"], "GET /slow",
        "{stall:#}"
    );
    let end = daemon
        .wait_for_event("stall.end", proxy_port, SLOW_PAUSE + REPORT_WITHIN, |e| {
            e["conn"]["role"] == "client"
        })
        .unwrap_or_else(|| panic!("the client's stall did not end\n{}", daemon.stderr()));
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(
        duration + 300 >= SLOW_PAUSE.as_millis() as u64,
        "true duration: {end:#}"
    );
    client.join().unwrap();
}
