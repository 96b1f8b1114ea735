//! Verdicts on real protocols, with real clients and servers: what the protocol says is owed,
//! not only which direction moved last. Each case is one of the field cases the direction rule
//! got wrong: a half-closed request (socat), a reply that comes with the server's FIN, idle TLS
//! 1.3 connections (Python's `ssl`, i.e. OpenSSL), an idle gRPC channel (grpcio: HTTP/2
//! control frames), and WebSocket messages that are never answered by design (websockets).
//!
//! grpcio and websockets are the Debian packages (`python3-grpcio`, `python3-websockets`,
//! installed by `cargo xtask test`), so these run under Debian's `/usr/bin/python3`.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use stalltrace_integration::{
    assert_ended_by_responses, require_root, with_role, Daemon, REPORT_WITHIN, STALL_AFTER,
};

const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Long enough past the threshold that a wrong verdict would have been reported.
fn past_threshold() -> Duration {
    STALL_AFTER * 3
}

/// A running script; its stdout stays open (a script that prints more must not die of a
/// broken pipe).
struct Script {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Script {
    /// Runs `code` under Debian's python3 with `args`; waits for its first output line (a port
    /// or "ready") and returns it.
    fn start(code: &str, args: &[&str]) -> (Self, String) {
        let mut child = Command::new(DEBIAN_PYTHON)
            .arg("-c")
            .arg(code)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{DEBIAN_PYTHON}: {e} (cargo xtask test installs it)"));
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the script exited before it was ready");
        let script = Self {
            child,
            _stdout: stdout,
        };
        (script, line.trim().to_string())
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP/2 tests run one at a time. Every daemon observes the whole host, and some assert
/// `kernel_http2_untracked` and `kernel_http2_framing_lost`, which count what a daemon could not follow on *any* HTTP/2
/// connection: a daemon that attached while another test's gRPC channel was opening once
/// counted ~1 400 streams a second on that channel.
fn http2_alone() -> std::sync::MutexGuard<'static, ()> {
    static HTTP2: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HTTP2
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stall events (start or end) touching `port`.
fn stall_events(daemon: &Daemon, port: u16) -> Vec<Value> {
    let mut events = daemon.events_named("stall.start", port);
    events.extend(daemon.events_named("stall.end", port));
    events
}

/// Nothing on `port` is or was flagged, seen after `past_threshold()`.
#[track_caller]
fn assert_never_flagged(daemon: &Daemon, port: u16, what: &str) {
    thread::sleep(past_threshold());
    assert_eq!(daemon.stalls(port), Vec::<Value>::new(), "{what}");
    assert_eq!(stall_events(daemon, port), Vec::<Value>::new(), "{what}");
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
    assert!(
        conns.as_array().is_some_and(|c| !c.is_empty()),
        "{what}: the connections must be tracked, or this test proves nothing: {conns:#}"
    );
}

/// `printf 'QUERY-42\n' | socat -t 20 - TCP:…` against a server that reads to end-of-stream,
/// waits, answers 19 bytes and closes: live stalls on both ends during the wait, ended by the
/// response, socat's close counts the 19 bytes, and no phantom connection appears.
#[test]
fn a_half_closed_request_is_flagged_on_both_ends_and_ends_with_the_response() {
    require_root();
    let daemon = Daemon::start("half-close");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer_after = STALL_AFTER * 4;
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        thread::sleep(answer_after);
        stream.write_all(b"ANSWER-42 is ready\n").unwrap();
        request
    });
    let mut socat = Command::new("socat")
        .args(["-t", "20", "-", &format!("TCP:127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("socat (cargo xtask test installs it)");
    socat
        .stdin
        .take()
        .unwrap()
        .write_all(b"QUERY-42\n")
        .unwrap(); // dropped: socat sends the request, then its FIN

    let client = daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    let server_stall = daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    assert_eq!(client["stall"]["kind"], "awaiting_response", "{client:#}");
    assert_eq!(
        server_stall["stall"]["kind"], "unanswered_request",
        "{server_stall:#}"
    );
    assert_eq!(server.join().unwrap(), b"QUERY-42\n");
    let output = socat.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"ANSWER-42 is ready\n");

    assert_ended_by_responses(&daemon, port, 2, answer_after, REPORT_WITHIN);
    let closes = daemon.wait_for_events("conn.close", port, 2, REPORT_WITHIN);
    let client_close = with_role(&closes, "client");
    assert_eq!(
        client_close["conn"]["bytes_received"], 19,
        "{client_close:#}"
    );
    thread::sleep(STALL_AFTER);
    let opens = daemon.events_named("conn.open", port);
    assert_eq!(opens.len(), 2, "one open per end, no phantom: {opens:#?}");
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
    assert_eq!(conns, serde_json::json!([]), "nothing left behind");
}

/// An HTTP/1.0-style server answers late, then closes at once: the client reads the whole
/// answer and closes. The reply came first: its stall ends `response`, not `closed`.
#[test]
fn a_reply_that_comes_with_the_close_ends_the_stall_as_a_response() {
    require_root();
    let daemon = Daemon::start("reply-close");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 64];
        let _ = stream.read(&mut request).unwrap();
        thread::sleep(STALL_AFTER * 3);
        stream
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
        // Dropped: the FIN follows the answer at once.
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(b"GET /slow HTTP/1.0\r\n\r\n").unwrap();
    daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    server.join().unwrap();
    thread::sleep(Duration::from_millis(200)); // answer and FIN are both queued
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    drop(client);
    let end = daemon
        .wait_for_event("stall.end", port, REPORT_WITHIN, |e| {
            e["conn"]["role"] == "client"
        })
        .expect("the client's stall ends");
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
}

/// A self-signed certificate for the TLS server, made with the openssl CLI.
fn certificate(dir: &std::path::Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

/// A TLS server: answers each request line after the delay in seconds it names. Like
/// OpenSSL's servers, it reads each record's header first, then its body; it sends the
/// number of TLS 1.3 session tickets given (none: nothing follows the handshake).
const TLS_SERVER: &str = r#"
import socket, ssl, sys, threading, time
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
context.num_tickets = int(sys.argv[3])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
def serve(conn):
    with context.wrap_socket(conn, server_side=True) as tls:
        while True:
            line = tls.recv(100)
            if not line:
                return
            time.sleep(float(line))
            tls.sendall(b"done\n")
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// A TLS client: handshakes (TLS 1.3 unless told 1.2), sends the given requests (each names
/// the server's delay; `pause=S` sleeps S seconds instead), then idles.
const TLS_CLIENT: &str = r#"
import socket, ssl, sys, time
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
if sys.argv[2] == "1.2":
    context.maximum_version = ssl.TLSVersion.TLSv1_2
tls = context.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
print(tls.version(), flush=True)
for delay in sys.argv[3:]:
    if delay.startswith("pause="):
        time.sleep(float(delay[6:]))
        continue
    tls.sendall(delay.encode() + b"\n")
    assert tls.recv(100) == b"done\n"
print("idle", flush=True)
time.sleep(60)
"#;

/// A pre-warmed TLS 1.3 pool connection: handshake done, nothing sent; the server's session
/// tickets sit unread in the client's receive queue. Idle, on both ends; likewise after a
/// completed request, and for TLS 1.2.
#[test]
fn idle_tls_connections_are_never_flagged() {
    require_root();
    let daemon = Daemon::start_with("tls-idle", &["--libssl"]);
    assert!(
        libssl_hooked(&daemon),
        "the uprobes must not flag idle connections either"
    );
    let (cert, key) = certificate(daemon.dir());
    let (_server, port) = Script::start(TLS_SERVER, &[&cert, &key, "2"]);
    let (_fresh, version) = Script::start(TLS_CLIENT, &[&port, "1.3"]);
    assert_eq!(version, "TLSv1.3");
    let (_used, _) = Script::start(TLS_CLIENT, &[&port, "1.3", "0", "0.1"]);
    let (_old, version) = Script::start(TLS_CLIENT, &[&port, "1.2", "0"]);
    assert_eq!(version, "TLSv1.2");
    let (_no_tickets_server, bare_port) = Script::start(TLS_SERVER, &[&cert, &key, "0"]);
    let (_bare, version) = Script::start(TLS_CLIENT, &[&bare_port, "1.3"]);
    assert_eq!(version, "TLSv1.3");
    assert_never_flagged(&daemon, port.parse().unwrap(), "idle TLS connections");
    assert_never_flagged(
        &daemon,
        bare_port.parse().unwrap(),
        "an idle TLS 1.3 connection without session tickets",
    );
}

/// A request on a TLS 1.3 connection answered late: the server is flagged, and the stall
/// ends with the response and its true duration.
#[test]
fn a_late_tls_reply_is_flagged_on_the_server() {
    require_root();
    let daemon = Daemon::start("tls-late");
    let (cert, key) = certificate(daemon.dir());
    let (_server, port) = Script::start(TLS_SERVER, &[&cert, &key, "2"]);
    let port_number: u16 = port.parse().unwrap();
    let delay = STALL_AFTER.as_secs_f64() * 4.0;
    let (_client, _) = Script::start(TLS_CLIENT, &[&port, "1.3", "0", &delay.to_string()]);
    let stall = daemon.wait_for_stall(port_number, "server", REPORT_WITHIN);
    assert_eq!(stall["stall"]["kind"], "unanswered_request", "{stall:#}");
    let end = daemon
        .wait_for_event("stall.end", port_number, REPORT_WITHIN * 2, |e| {
            e["conn"]["role"] == "server"
        })
        .expect("the server's stall ends");
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap() as f64;
    assert!(duration + 300.0 >= delay * 1000.0, "{end:#}");
}

/// An HTTPS server (Python's `http.server` over `ssl`, TLS 1.3 with two session tickets):
/// `GET /slow/N` is answered after N seconds.
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys, time
class Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(float(self.path.rsplit("/", 1)[1]))
        body = b"done\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Whether the daemon follows TLS through libssl, as `status -o json` says.
fn libssl_hooked(daemon: &Daemon) -> bool {
    let status = daemon.cli_json(&["status", "-o", "json"]);
    status["features"]["tls_libssl"]["enabled"]
        .as_bool()
        .unwrap_or_else(|| panic!("status has no features.tls_libssl: {status:#}"))
}

/// Both ends of `port` are flagged, and the client's stall ends with the response after
/// `delay` (its true duration). Returns the server's stall.
#[track_caller]
fn assert_late_reply_flagged_on_both_ends(
    daemon: &Daemon,
    port: u16,
    delay: Duration,
    what: &str,
) -> Value {
    let client = daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    assert_eq!(
        client["stall"]["kind"], "awaiting_response",
        "{what}: {client:#}"
    );
    let server = daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    assert_eq!(
        server["stall"]["kind"], "unanswered_request",
        "{what}: {server:#}"
    );
    let end = daemon
        .wait_for_event("stall.end", port, delay + REPORT_WITHIN, |e| {
            e["conn"]["role"] == "client"
        })
        .unwrap_or_else(|| panic!("{what}: the client's stall ends"));
    assert_eq!(end["stall"]["resolution"], "response", "{what}: {end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    let expected = delay.as_millis() as u64;
    assert!(
        duration + 300 >= expected && duration <= expected + 1000,
        "{what}: the stall lasted the reply's delay ({expected} ms): {end:#}"
    );
    server
}

/// The first request on a fresh TLS 1.3 connection, answered after 6 s. The client reads the
/// server's session tickets (encrypted records whose header says application_data, like a
/// reply's) in its first `SSL_read` after the request: with libssl hooked, the reply counts
/// only when `SSL_read` returns plaintext, so the client is flagged too, and its stall ends
/// with the response. Python's `ssl` (`SSL_read_ex`, a blocking socket: the tickets and the
/// reply in one call) and curl (`SSL_read`, non-blocking: a call that reads only the tickets
/// returns WANT_READ).
#[test]
fn a_late_first_tls_reply_is_flagged_on_both_ends() {
    require_root();
    let daemon = Daemon::start_with("tls-first-late", &["--libssl"]);
    assert!(libssl_hooked(&daemon), "{}", daemon.stderr());
    let (cert, key) = certificate(daemon.dir());
    let delay = Duration::from_secs(6);
    let (_server, port) = Script::start(TLS_SERVER, &[&cert, &key, "2"]);
    let seconds = delay.as_secs().to_string();
    let (_client, version) = Script::start(TLS_CLIENT, &[&port, "1.3", &seconds]);
    assert_eq!(version, "TLSv1.3");
    let server =
        assert_late_reply_flagged_on_both_ends(&daemon, port.parse().unwrap(), delay, "python ssl");
    assert_eq!(
        server["stall"]["request"]["signature"], "(unrecognized)",
        "the server's request is named from the plaintext SSL_read returned: {server:#}"
    );
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port]);
    let mut plaintext: Vec<_> = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["conn"]["role"].clone(), c["network"]["protocol"].clone()))
        .collect();
    plaintext.sort_by_key(|(role, _)| role.to_string());
    assert_eq!(
        plaintext,
        [
            (
                json!("client"),
                json!({"name": "tls", "plaintext": "libssl"})
            ),
            (
                json!("server"),
                json!({"name": "tls", "plaintext": "libssl"})
            )
        ],
        "{conns:#}"
    );

    let (_https, https_port) = Script::start(HTTPS_SERVER, &[&cert, &key]);
    let url = format!("https://127.0.0.1:{https_port}/slow/{seconds}");
    let mut curl = Command::new("curl")
        .args(["-sk", "--tlsv1.3", "-o", "/dev/null", &url])
        .spawn()
        .expect("curl (cargo xtask test installs it)");
    let server =
        assert_late_reply_flagged_on_both_ends(&daemon, https_port.parse().unwrap(), delay, "curl");
    assert_eq!(
        (
            &server["stall"]["request"]["protocol"],
            &server["stall"]["request"]["signature"]
        ),
        (&json!("http"), &json!("GET /slow/{id}")),
        "{server:#}"
    );
    assert!(curl.wait().unwrap().success());
}

/// A pre-warmed TLS 1.3 pool connection (the server's session tickets queued unread) whose
/// first request is answered late: the tickets, read after the request, were queued before it
/// and cannot answer it, so the client is flagged without libssl too — as it is for any TLS
/// library — and its stall ends with the response.
#[test]
fn a_late_first_reply_on_a_prewarmed_tls_connection_is_flagged_without_libssl() {
    require_root();
    let daemon = Daemon::start("tls-pool-late");
    assert!(!libssl_hooked(&daemon));
    let (cert, key) = certificate(daemon.dir());
    let delay = Duration::from_secs(6);
    let (_server, port) = Script::start(TLS_SERVER, &[&cert, &key, "2"]);
    let seconds = delay.as_secs().to_string();
    let (_client, version) = Script::start(TLS_CLIENT, &[&port, "1.3", "pause=0.5", &seconds]);
    assert_eq!(version, "TLSv1.3");
    assert_late_reply_flagged_on_both_ends(&daemon, port.parse().unwrap(), delay, "pool");
}

/// Without `--libssl` (its uprobes cost every process using OpenSSL), nothing is attached to
/// libssl, status says so and why, and the start-up line says where TLS replies are judged
/// from — without a warning: it is the default.
#[test]
fn libssl_hooks_are_off_unless_asked_for() {
    require_root();
    let daemon = Daemon::start("tls-no-libssl");
    assert!(!libssl_hooked(&daemon));
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        status["features"]["tls_libssl"]["reason"], "not asked for: --libssl turns it on",
        "{status:#}"
    );
    assert!(
        !status["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["hook"].as_str().unwrap().contains("libssl")),
        "{status:#}"
    );
    let mentions: Vec<_> = daemon
        .stderr()
        .lines()
        .filter(|line| line.contains("libssl"))
        .map(str::to_owned)
        .collect();
    assert_eq!(mentions.len(), 1, "the start-up line only: {mentions:#?}");
    assert!(
        mentions[0].contains("from TLS records (libssl not hooked)"),
        "{mentions:#?}"
    );
}

/// A gRPC server (grpcio) with a unary method that sleeps the seconds its request names, and
/// a client-streaming one that reads every message, then sleeps the seconds the last one
/// names; it accepts the clients' keepalive pings every second.
const GRPC_SERVER: &str = r#"
import grpc, sys, time
from concurrent import futures
def sleep(request, context):
    time.sleep(float(request))
    return request
def collect(requests, context):
    for last in requests:
        pass
    time.sleep(float(last))
    return last
handler = grpc.method_handlers_generic_handler("stalltrace.Test", {
    "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
    "Collect": grpc.stream_unary_rpc_method_handler(collect)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0)])
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// A gRPC client: one channel (connected first; keepalive pings every second, with or
/// without calls: housekeeping in both directions), the given calls in turn, then it idles.
const GRPC_CLIENT: &str = r#"
import grpc, sys, time
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1], options=[
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0)])
grpc.channel_ready_future(channel).result(timeout=10)
call = channel.unary_unary("/stalltrace.Test/Sleep")
for delay in sys.argv[2:]:
    assert call(delay.encode()) == delay.encode()
print("idle", flush=True)
time.sleep(60)
"#;

/// After completed calls, an idle gRPC channel (HTTP/2: the client's last frames are
/// WINDOW_UPDATE and PING ACK, control frames that ask nothing) is never flagged; nor is a
/// channel that connected and never called (grpcio's first write holds more frames than the
/// capture: their headers are read where they lie).
#[test]
fn an_idle_grpc_channel_is_never_flagged() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("grpc-idle");
    let (_server, port) = Script::start(GRPC_SERVER, &[]);
    let (_used, _) = Script::start(GRPC_CLIENT, &[&port, "0", "0.2", "0"]);
    let (_never_called, _) = Script::start(GRPC_CLIENT, &[&port]);
    assert_never_flagged(&daemon, port.parse().unwrap(), "idle gRPC channels");
}

/// A unary gRPC call answered late, with keepalive pings both ways while it waits, is flagged
/// on both ends and ends with the response, with the call's true duration.
#[test]
fn a_late_grpc_call_is_flagged_on_both_ends() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("grpc-late");
    let (_server, port) = Script::start(GRPC_SERVER, &[]);
    let port_number: u16 = port.parse().unwrap();
    let delay = (STALL_AFTER * 4).as_secs_f64().to_string();
    let started = Instant::now();
    let (_client, _) = Script::start(GRPC_CLIENT, &[&port, "0", &delay]);
    // The script printed "idle": the late call completed.
    assert!(started.elapsed() >= STALL_AFTER * 4);
    let delay_ms = (STALL_AFTER * 4).as_millis() as u64;
    for role in ["client", "server"] {
        let end = daemon
            .wait_for_event("stall.end", port_number, REPORT_WITHIN, |e| {
                e["conn"]["role"] == role
            })
            .unwrap_or_else(|| panic!("no {role} stall ended: {}", daemon.stderr()));
        assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
        // Keepalive pings went both ways during the call: they restarted no quiet, and the
        // stall is the call's, not the channel's.
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration + 300 >= delay_ms && duration <= delay_ms + 1_000,
            "{end:#}"
        );
    }
}

/// A gRPC client: one client-streaming call whose messages flow every 0.25 s for argv[2]
/// seconds, the last naming the seconds its server waits before it answers (argv[3]); then
/// the channel idles.
const GRPC_UPLOAD_CLIENT: &str = r#"
import grpc, sys, time
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
print("uploading", flush=True)
def messages():
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        yield b"0"
        time.sleep(0.25)
    yield sys.argv[3].encode()
assert channel.stream_unary("/stalltrace.Test/Collect")(messages()) == sys.argv[3].encode()
print("idle", flush=True)
time.sleep(60)
"#;

/// A client-streaming call owes its server nothing while its messages flow, for however
/// long: an upload of four times the threshold is no stall. Its response is owed from the
/// request's end (`END_STREAM`): a server that waits three times the threshold after the
/// last message is flagged on both ends, stream 1, and the stall's duration is that wait,
/// not the upload's.
#[test]
fn a_client_streaming_call_is_owed_its_response_from_its_last_message() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("grpc-upload");
    let (_server, port) = Script::start(GRPC_SERVER, &[]);
    let port_number: u16 = port.parse().unwrap();
    let (upload, wait) = (STALL_AFTER * 4, STALL_AFTER * 3);
    let (_client, _) = Script::start(
        GRPC_UPLOAD_CLIENT,
        &[
            &port,
            &upload.as_secs_f64().to_string(),
            &wait.as_secs_f64().to_string(),
        ],
    );
    thread::sleep(upload - Duration::from_millis(300));
    assert_eq!(
        stall_events(&daemon, port_number),
        Vec::<Value>::new(),
        "an upload under way is no stall"
    );
    for role in ["client", "server"] {
        let stall = daemon.wait_for_stall(port_number, role, STALL_AFTER + REPORT_WITHIN * 2);
        assert_eq!(stall["stall"]["http2"]["stream"]["id"], 1, "{stall:#}");
    }
    let wait_ms = wait.as_millis() as u64;
    for end in answered_on_both_ends(&daemon, port_number, wait + REPORT_WITHIN) {
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration + 300 >= wait_ms && duration <= wait_ms + 1_000,
            "the server's wait after the last message: {end:#}"
        );
    }
}

/// A gRPC client that starts a call its server answers in argv[2] seconds, cancels it after
/// argv[3] seconds (the call's `RST_STREAM`), then makes a call answered at once on the same
/// channel and idles.
const GRPC_CANCEL_CLIENT: &str = r#"
import grpc, sys, time
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
call = channel.unary_unary("/stalltrace.Test/Sleep")
slow = call.future(sys.argv[2].encode())
print("calling", flush=True)
time.sleep(float(sys.argv[3]))
assert slow.cancel()
assert call(b"0") == b"0"
print("idle", flush=True)
time.sleep(60)
"#;

/// A call its client gives up on (cancelled: what a deadline does too) is no response: its
/// stall ends `stream_reset`, reset by the client, on both ends, with the time it waited;
/// the channel's next call flows, unflagged.
#[test]
fn a_cancelled_grpc_call_ends_its_stall_as_reset_by_the_client() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("grpc-cancel");
    let (_server, port) = Script::start(GRPC_SERVER, &[]);
    let port_number: u16 = port.parse().unwrap();
    let waited = STALL_AFTER * 3;
    let (_client, _) = Script::start(
        GRPC_CANCEL_CLIENT,
        &[
            &port,
            &(STALL_AFTER * 10).as_secs_f64().to_string(),
            &waited.as_secs_f64().to_string(),
        ],
    );
    let waited_ms = waited.as_millis() as u64;
    for role in ["client", "server"] {
        let end = daemon
            .wait_for_event("stall.end", port_number, waited + REPORT_WITHIN, |e| {
                e["conn"]["role"] == role
            })
            .unwrap_or_else(|| panic!("no {role} stall ended: {}", daemon.stderr()));
        assert_eq!(end["stall"]["resolution"], "stream_reset", "{end:#}");
        assert_eq!(
            end["stall"]["http2"]["stream"],
            json!({"id": 1, "reset_by": "client"}),
            "{end:#}"
        );
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration + 300 >= waited_ms && duration <= waited_ms + 1_000,
            "{end:#}"
        );
    }
    thread::sleep(past_threshold());
    assert_eq!(daemon.events_named("stall.start", port_number).len(), 2);
    assert_eq!(daemon.stalls(port_number), Vec::<Value>::new());
}

/// A gRPC client whose channel carries one slow call (the seconds of argv[2]) while calls
/// that complete at once follow every argv[4] seconds for argv[3] seconds (issue 7, case 2a);
/// then the channel idles.
const GRPC_MIXED_CLIENT: &str = r#"
import grpc, sys, time
channel = grpc.insecure_channel("127.0.0.1:" + sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
call = channel.unary_unary("/stalltrace.Test/Sleep")
slow = call.future(sys.argv[2].encode())
print("slow", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    assert call(b"0") == b"0"
    time.sleep(float(sys.argv[4]))
assert slow.result() == sys.argv[2].encode()
print("idle", flush=True)
time.sleep(60)
"#;

/// One unary call answered late among calls that complete every 0.5 s on the same channel:
/// HTTP/2 is judged per stream, so that call is flagged on both ends, named by its stream id
/// (the channel's first call: stream 1), within the threshold plus a second, and its stall
/// ends `response` with the call's true duration; the other streams, and the idle channel
/// afterwards, are never flagged.
#[test]
fn a_slow_grpc_call_among_flowing_ones_is_flagged_per_stream() {
    slow_grpc_call_among_flowing_ones("grpc-mixed", "0.5");
}

/// The same with the other calls back to back (thousands a second): grpcio reads each
/// frame's remaining bytes into a buffer of their size, splitting headers between reads, and
/// the framing must survive every split (on the direction rule the slow call would hide
/// behind the others). One call in 32 maps to the slow call's stream slot while it awaits:
/// those take another, and every call is followed.
#[test]
fn a_slow_grpc_call_among_back_to_back_ones_is_flagged_per_stream() {
    slow_grpc_call_among_flowing_ones("grpc-busy", "0");
}

/// One slow call while others follow every `pause` seconds: see the tests above.
fn slow_grpc_call_among_flowing_ones(name: &str, pause: &str) {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start(name);
    let (_server, port) = Script::start(GRPC_SERVER, &[]);
    let port_number: u16 = port.parse().unwrap();
    let slow = STALL_AFTER * 6;
    let (_client, _) = Script::start(
        GRPC_MIXED_CLIENT,
        &[
            &port,
            &slow.as_secs_f64().to_string(),
            &(slow + STALL_AFTER * 2).as_secs_f64().to_string(),
            pause,
        ],
    );
    let sent = Instant::now();
    for role in ["client", "server"] {
        let stall = daemon.wait_for_stall(port_number, role, STALL_AFTER + REPORT_WITHIN);
        assert!(
            sent.elapsed() <= STALL_AFTER + Duration::from_secs(1) + Duration::from_millis(500),
            "{role}: flagged late ({:?}): {stall:#}",
            sent.elapsed()
        );
        assert_eq!(stall["stall"]["http2"]["stream"]["id"], 1, "{stall:#}");
        let expected = if role == "client" {
            "awaiting_response"
        } else {
            "unanswered_request"
        };
        assert_eq!(stall["stall"]["kind"], expected, "{stall:#}");
    }
    let slow_ms = slow.as_millis() as u64;
    for end in answered_on_both_ends(&daemon, port_number, slow + REPORT_WITHIN) {
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(
            duration + 300 >= slow_ms && duration <= slow_ms + 1_000,
            "the call's true duration: {end:#}"
        );
    }
    // The calls that flowed, and the idle channel after them, were never flagged.
    thread::sleep(STALL_AFTER * 2 + past_threshold());
    assert_eq!(daemon.stalls(port_number), Vec::<Value>::new());
    let starts = daemon.events_named("stall.start", port_number);
    assert_eq!(
        starts.len(),
        2,
        "one stall per end, stream 1's: {starts:#?}"
    );
    let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port]);
    let calls = conns
        .as_array()
        .and_then(|c| c.iter().find(|c| c["conn"]["role"] == "client"))
        .and_then(|c| c["conn"]["requests"].as_u64());
    assert!(
        calls.is_some_and(|n| n >= 10),
        "the other calls flowed on the same connection: {conns:#}"
    );
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(status["features"]["http2_streams"], true, "{status:#}");
    assert_eq!(
        status["lost"]["kernel_http2_untracked"], 0,
        "the kernel followed every stream"
    );
    assert_eq!(
        status["lost"]["kernel_http2_framing_lost"], 0,
        "the kernel followed every frame"
    );
}

/// Raw h2c frames, for tests that must choose how frames fall into reads and writes:
/// `frame(type, flags, stream, payload)`, a call (`HEADERS`, `END_STREAM`) and its answer
/// (`HEADERS`, `DATA`), and each end's preface and SETTINGS exchange (`accept`, `connect`).
/// Run with [`h2_script`].
const H2_FRAMES: &str = r#"
import socket, sys, time
def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data
def accept():
    """Prints the port, accepts a client, reads its preface and SETTINGS, answers SETTINGS."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    read_exactly(conn, 24 + 9)
    conn.sendall(frame(4, 0, 0) + frame(4, 1, 0))
    return conn
def connect():
    """Connects to argv[1], sends the preface and SETTINGS, reads the server's."""
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
    read_exactly(conn, 18)
    return conn
call = lambda stream: frame(1, 5, stream, b"\x82\x86\x84")
answer = lambda stream: frame(1, 4, stream, b"\x88") + frame(0, 1, stream, b"ok")
BURST = 20
"#;

/// Runs `code` after [`H2_FRAMES`]' definitions (see [`Script::start`]).
fn h2_script(code: &str, args: &[&str]) -> (Script, String) {
    Script::start(&format!("{H2_FRAMES}{code}"), args)
}

/// An h2c server that reads the client's preface and SETTINGS, then its burst of `BURST`
/// calls (one HEADERS frame each, streams 1, 3, …), answers all but stream 1 in one write
/// (HEADERS and DATA each: 38 frames), stream 1 `argv[1]` seconds later, and keeps the
/// connection open.
const H2_BURST_SERVER: &str = r#"
conn = accept()
read_exactly(conn, BURST * 12)
conn.sendall(b"".join(answer(1 + 2 * i) for i in range(1, BURST)))
time.sleep(float(sys.argv[1]))
conn.sendall(answer(1))
time.sleep(3600)
"#;

/// An h2c client that sends its preface and SETTINGS, then `BURST` calls in one write, and
/// reads whatever comes 7 bytes at a time (most frame headers split between two reads), the
/// connection kept open.
const H2_BURST_CLIENT: &str = r#"
conn = connect()
conn.sendall(b"".join(call(1 + 2 * i) for i in range(BURST)))
print("sent", flush=True)
while conn.recv(7):
    pass
"#;

/// Many concurrent streams answered in one write (a server with 20 calls in flight on one
/// connection; nginx with 8 already wrote more frames at once than the walk once took), read
/// by a client a few bytes at a time (a reader with a fixed buffer splits frame headers
/// between reads): every frame is followed, so the one slow call among them is flagged on
/// both ends, named by its stream, and ends with its response.
#[test]
fn a_slow_call_in_a_burst_of_concurrent_http2_calls_is_flagged_per_stream() {
    slow_call_in_a_burst("h2-burst", H2_BURST_CLIENT);
}

/// An h2c client that sends its preface and SETTINGS, then `BURST` calls in one `sendmsg` of
/// 7-byte `iovec` entries (as grpcio packs its frames into small slices: most frame headers
/// straddle two entries, dozens of entries in), and reads whatever comes.
const H2_SLICED_CLIENT: &str = r#"
conn = connect()
calls = b"".join(call(1 + 2 * i) for i in range(BURST))
slices = [calls[at:at + 7] for at in range(0, len(calls), 7)]
assert conn.sendmsg(slices) == len(calls)
print("sent", flush=True)
while conn.recv(4096):
    pass
"#;

/// The burst of calls written as a vectored call of small slices: a frame header split
/// between two `iovec` entries past the eighth was not read (a grpcio client with four calls
/// or more in one write fell back to the direction rule, and its end of a slow call was never
/// flagged).
#[test]
fn a_slow_call_among_calls_written_in_small_slices_is_flagged_per_stream() {
    slow_call_in_a_burst("h2-sliced", H2_SLICED_CLIENT);
}

/// `client` sends `BURST` calls to [`H2_BURST_SERVER`], which answers all but the first at
/// once and that one four thresholds later: flagged on both ends as stream 1, every frame
/// followed.
fn slow_call_in_a_burst(name: &str, client: &str) {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start(name);
    let slow = STALL_AFTER * 4;
    let (_server, port) = h2_script(H2_BURST_SERVER, &[&slow.as_secs_f64().to_string()]);
    let port_number: u16 = port.parse().unwrap();
    let (_client, _) = h2_script(client, &[&port]);
    for role in ["client", "server"] {
        let stall = daemon.wait_for_stall(port_number, role, STALL_AFTER + REPORT_WITHIN);
        assert_eq!(
            stall["stall"]["http2"]["stream"]["id"], 1,
            "{role}: {stall:#}"
        );
    }
    answered_on_both_ends(&daemon, port_number, slow + REPORT_WITHIN);
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        (
            &status["lost"]["kernel_http2_framing_lost"],
            &status["lost"]["kernel_http2_untracked"]
        ),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "the kernel followed every frame and every stream: {status:#}"
    );
    assert_eq!(daemon.events_named("stall.start", port_number).len(), 2);
}

/// An h2c server that reads what its client sends until the END_STREAM of stream argv[1],
/// waits argv[2] seconds and answers that stream, the connection kept open.
const H2_ANSWER_AT_END_SERVER: &str = r#"
conn = accept()
stream = int(sys.argv[1])
while True:
    header = read_exactly(conn, 9)
    read_exactly(conn, int.from_bytes(header[:3], "big"))
    if header[4] & 1 and int.from_bytes(header[5:], "big") == stream:
        break
time.sleep(float(sys.argv[2]))
conn.sendall(answer(stream))
time.sleep(3600)
"#;

/// An h2c client that sends a unary call on stream 1 whose one DATA frame (5 000 bytes,
/// END_STREAM) goes 500 bytes every argv[2] seconds (a large message on a slow link), then
/// reads whatever comes.
const H2_SLOW_UPLOAD_CLIENT: &str = r#"
conn = connect()
request = frame(1, 4, 1, b"\x83\x86\x84") + frame(0, 1, 1, b"x" * 5000)
conn.sendall(request[:12 + 9 + 500])
for at in range(12 + 9 + 500, len(request), 500):
    time.sleep(float(sys.argv[2]))
    conn.sendall(request[at:at + 500])
print("sent", flush=True)
while conn.recv(4096):
    pass
"#;

/// A request ends with the last byte of its END_STREAM frame, not its header: a unary call
/// whose message trickles in for 2.5 times the threshold, answered at once, is no stall on
/// either end (it was flagged on both, from the frame's header).
#[test]
fn a_request_still_arriving_in_its_last_frame_is_no_stall() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("h2-slow-upload");
    let (_server, port) = h2_script(H2_ANSWER_AT_END_SERVER, &["1", "0.1"]);
    let pause = STALL_AFTER / 4;
    let (_client, _) = h2_script(
        H2_SLOW_UPLOAD_CLIENT,
        &[&port, &pause.as_secs_f64().to_string()],
    );
    assert_never_flagged(&daemon, port.parse().unwrap(), "a request still arriving");
}

/// An h2c client that opens argv[2] streams whose requests never end (uploads under way),
/// then a GET on the next stream, and reads whatever comes.
const H2_UPLOADS_THEN_GET_CLIENT: &str = r#"
conn = connect()
uploads = int(sys.argv[2])
for i in range(uploads):
    conn.sendall(frame(1, 4, 1 + 2 * i, b"\x83\x86\x84") + frame(0, 0, 1 + 2 * i, b"x" * 10))
conn.sendall(call(1 + 2 * uploads))
print("sent", flush=True)
while conn.recv(4096):
    pass
"#;

/// Uploads under way owe nothing but hold their streams' slots: with 40 of them on one
/// connection (more than the 32 slots), a GET after them that its server answers late is
/// still flagged on both ends, named by its stream (it was not followed at all).
#[test]
fn a_late_call_behind_many_uploads_under_way_is_flagged() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("h2-uploads-then-get");
    let uploads = 40;
    let get = 1 + 2 * uploads;
    let slow = STALL_AFTER * 3;
    let (_server, port) = h2_script(
        H2_ANSWER_AT_END_SERVER,
        &[&get.to_string(), &slow.as_secs_f64().to_string()],
    );
    let port_number: u16 = port.parse().unwrap();
    let (_client, _) = h2_script(H2_UPLOADS_THEN_GET_CLIENT, &[&port, &uploads.to_string()]);
    for role in ["client", "server"] {
        let stall = daemon.wait_for_stall(port_number, role, STALL_AFTER + REPORT_WITHIN);
        assert_eq!(
            stall["stall"]["http2"]["stream"]["id"], get,
            "{role}: {stall:#}"
        );
    }
    for role in ["client", "server"] {
        let end = daemon
            .wait_for_event("stall.end", port_number, slow + REPORT_WITHIN, |e| {
                e["conn"]["role"] == role
            })
            .unwrap_or_else(|| panic!("no {role} stall ended: {}", daemon.stderr()));
        assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    }
}

/// An h2c server that reads calls on streams 1 and 3, answers stream 3 `argv[1]` seconds
/// later and stream 1 `argv[2]` seconds after the calls, the connection kept open.
const H2_TWO_SLOW_SERVER: &str = r#"
conn = accept()
read_exactly(conn, 2 * 12)
time.sleep(float(sys.argv[1]))
conn.sendall(answer(3))
time.sleep(float(sys.argv[2]) - float(sys.argv[1]))
conn.sendall(answer(1))
time.sleep(3600)
"#;

/// An h2c client that makes calls on streams 1 and 3 in one write and reads whatever comes.
const H2_TWO_CALLS_CLIENT: &str = r#"
conn = connect()
conn.sendall(call(1) + call(3))
print("sent", flush=True)
while conn.recv(4096):
    pass
"#;

/// Two slow calls on one connection, the younger answered first, while the older's stall is
/// open: a connection reports one stall at a time, so the younger is counted on the older's
/// `stall.end` (`stall.http2.other_late_streams`), on both ends, not lost (it appeared in no
/// event before).
#[test]
fn a_slow_call_answered_behind_an_open_stall_is_counted_on_its_end() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("h2-two-slow");
    let (first, second) = (STALL_AFTER * 2, STALL_AFTER * 4);
    let (_server, port) = h2_script(
        H2_TWO_SLOW_SERVER,
        &[
            &first.as_secs_f64().to_string(),
            &second.as_secs_f64().to_string(),
        ],
    );
    let port_number: u16 = port.parse().unwrap();
    let (_client, _) = h2_script(H2_TWO_CALLS_CLIENT, &[&port]);
    for end in answered_on_both_ends(&daemon, port_number, second + REPORT_WITHIN) {
        assert_eq!(end["stall"]["http2"]["other_late_streams"], 1, "{end:#}");
    }
    let starts = daemon.events_named("stall.start", port_number);
    assert_eq!(starts.len(), 2, "stream 1's stall on each end: {starts:#?}");
}

/// An h2c server that answers stream 1, then stops reading (a thread busy elsewhere), the
/// connection kept open.
const H2_DEAF_SERVER: &str = r#"
conn = accept()
read_exactly(conn, 9 + 3)
conn.sendall(answer(1))
time.sleep(3600)
"#;

/// An h2c client that makes one call, reads its answer, then sends a PING (as gRPC's and
/// browsers' keepalives do on an idle connection).
const H2_PING_CLIENT: &str = r#"
conn = connect()
conn.sendall(call(1))
read_exactly(conn, 10 + 11)
conn.sendall(frame(6, 0, 0, bytes(8)))
print("pinged", flush=True)
time.sleep(3600)
"#;

/// A PING left unread by an HTTP/2 server with every stream answered is no request: the
/// unread-bytes rule (a request nobody reads) must not flag the idle connection.
#[test]
fn a_control_frame_an_http2_server_leaves_unread_is_never_flagged() {
    require_root();
    let _alone = http2_alone();
    let daemon = Daemon::start("h2-unread-ping");
    let (_server, port) = h2_script(H2_DEAF_SERVER, &[]);
    let (_client, _) = h2_script(H2_PING_CLIENT, &[&port]);
    assert_never_flagged(
        &daemon,
        port.parse().unwrap(),
        "a PING unread on an idle HTTP/2 connection",
    );
}

/// The `stall.end` of the client's and of the server's stall on `port`, within `within`: each
/// ended by the response to HTTP/2 stream 1.
fn answered_on_both_ends(daemon: &Daemon, port: u16, within: Duration) -> [Value; 2] {
    ["client", "server"].map(|role| {
        let end = daemon
            .wait_for_event("stall.end", port, within, |e| e["conn"]["role"] == role)
            .unwrap_or_else(|| panic!("no {role} stall ended: {}", daemon.stderr()));
        assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
        assert_eq!(end["stall"]["http2"]["stream"]["id"], 1, "{end:#}");
        end
    })
}

/// A WebSocket server (websockets) that reads every message and never answers.
const WEBSOCKET_SERVER: &str = r#"
import asyncio, websockets
async def sink(socket):
    async for message in socket:
        pass
async def main():
    async with websockets.serve(sink, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

/// A WebSocket client that sends a message every `interval` seconds.
const WEBSOCKET_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:" + sys.argv[1], ping_interval=None) as ws:
        print("open", flush=True)
        while True:
            await ws.send("tick")
            await asyncio.sleep(float(sys.argv[2]))
asyncio.run(main())
"#;

/// WebSocket messages are one-way by design: after the upgrade, the connection is a stream,
/// judged on neither end, however long each message goes unanswered.
#[test]
fn websocket_messages_that_are_never_answered_are_not_stalls() {
    require_root();
    let daemon = Daemon::start("websocket");
    let (_server, port) = Script::start(WEBSOCKET_SERVER, &[]);
    let interval = (STALL_AFTER * 2).as_secs_f64().to_string();
    let (_client, _) = Script::start(WEBSOCKET_CLIENT, &[&port, &interval]);
    assert_never_flagged(&daemon, port.parse().unwrap(), "one-way WebSocket messages");
}

/// Control: a plain TCP request that is never answered is still flagged once its connection
/// has shown what it is (the protocol rules only remove what the protocol says is not owed).
#[test]
fn an_unrecognized_request_still_falls_back_to_the_direction_rule() {
    require_root();
    let daemon = Daemon::start("fallback");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"\x00\x01binary request").unwrap();
    let mut buffer = [0u8; 64];
    let _ = server.read(&mut buffer).unwrap();
    daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    client.shutdown(Shutdown::Both).unwrap();
}

/// A PostgreSQL server of its own (Debian's `postgresql`), run as the `postgres` user in a
/// scratch directory; stopped on drop.
struct Postgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl Postgres {
    fn bin(name: &str) -> std::path::PathBuf {
        let lib = std::path::Path::new("/usr/lib/postgresql");
        let version = std::fs::read_dir(lib)
            .expect("postgresql is installed (cargo xtask test installs it)")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .max_by_key(|name| name.parse::<u32>().unwrap_or(0))
            .expect("a postgresql version");
        lib.join(version).join("bin").join(name)
    }

    fn as_postgres(program: &std::path::Path) -> Command {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    }

    fn start(dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap()
            .success());
        let data = dir.join("data");
        let initdb = Self::as_postgres(&Self::bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(initdb.success(), "initdb failed");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=replica",
            dir.display()
        );
        let started = Self::as_postgres(&Self::bin("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(dir.join("postgres.log"))
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(started.success(), "pg_ctl start failed");
        Self { dir, port }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Self::as_postgres(&Self::bin("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}

/// A standby's WAL stream from an idle primary (`pg_receivewal`, which speaks the replication
/// protocol like a standby's walreceiver, sending a status update every second that the
/// primary never answers): a stream on both ends, never a stall.
#[test]
fn postgres_streaming_replication_is_not_a_stall() {
    require_root();
    let daemon = Daemon::start("pg-replication");
    let postgres = Postgres::start(daemon.dir().join("pg"));
    let wal = postgres.dir.join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    assert!(Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&wal)
        .status()
        .unwrap()
        .success());
    let mut receiver = Postgres::as_postgres(&Postgres::bin("pg_receivewal"))
        .args(["-h", "127.0.0.1", "-p", &postgres.port.to_string()])
        .args(["-U", "postgres", "--status-interval=1", "--no-loop", "-D"])
        .arg(&wal)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REPORT_WITHIN;
    let streaming = loop {
        let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &postgres.port.to_string()]);
        let streams: Vec<Value> = conns
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["conn"]["state"] == "stream")
            .cloned()
            .collect();
        if streams.len() == 2 || Instant::now() > deadline {
            break streams;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        streaming.len(),
        2,
        "both ends of the replication connection are streams: {streaming:#?}"
    );
    assert_never_flagged(&daemon, postgres.port, "an idle primary's WAL stream");
    let _ = receiver.kill();
    let _ = receiver.wait();
}
