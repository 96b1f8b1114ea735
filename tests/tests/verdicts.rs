//! Verdicts a fresh-eyes tester found wrong, each reproduced with real processes: a client
//! whose server died after reading its request (TCP and Unix) must not be told to keep
//! waiting, while one whose reply arrived with the server's close still waits for its read.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    assert_ended_by_responses, daemon_dir, require_root, Daemon, Terminated, REPORT_WITHIN,
    STALL_AFTER,
};

/// A server in its own process that takes one connection, reads the request, waits `delay`
/// seconds (`reply`, `die`) or for a line on its stdin (`reply-when-told`), answers (`reply…`)
/// or not (`die`), and exits: its socket closes with the process. argv: `tcp` or a Unix path,
/// delay, mode. Prints the TCP port, or `ready`.
const ONE_SHOT_SERVER: &str = r#"
import socket, sys, time
where, delay, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if where == "tcp":
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
else:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(where)
    listener.listen(1)
    print("ready", flush=True)
conn, _ = listener.accept()
conn.recv(4096)
if mode == "reply-when-told":
    sys.stdin.readline()
else:
    time.sleep(delay)
if mode.startswith("reply"):
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
sys.exit(0)
"#;

/// Python scripts run with the `python3` on PATH; those that import Debian's modules
/// (python3-dbus, python3-gi) with Debian's own, not a pyenv shim.
const PYTHON: &str = "python3";
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// A running script: its stdin and stdout are pipes (stdout kept open: a script that prints
/// more must not die of a broken pipe).
struct Script {
    process: Terminated,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Script {
    fn start(python: &str, code: &str, args: &[&str]) -> Self {
        let mut child = Command::new(python)
            .arg("-c")
            .arg(code)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python}: {e} (cargo xtask test installs it)"));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            process: Terminated(child),
            stdout,
        }
    }

    /// The next line the script prints, trimmed; fails if it exited first.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the script exited before printing");
        line.trim().to_owned()
    }

    fn pid(&self) -> u64 {
        u64::from(self.process.0.id())
    }
}

/// Starts [`ONE_SHOT_SERVER`]; returns it and the first line it printed.
fn one_shot_server(where_: &str, delay: Duration, mode: &str) -> (Terminated, String) {
    let delay = delay.as_secs_f64().to_string();
    let mut server = Script::start(PYTHON, ONE_SHOT_SERVER, &[where_, &delay, mode]);
    let ready = server.line();
    (server.process, ready)
}

/// Waits for the server process to exit (it closes its socket as it does).
fn wait_exit(server: &mut Terminated) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not exit");
        thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

/// How long the servers sit on the request before exiting: the client's stall is open by then.
fn server_delay() -> Duration {
    STALL_AFTER * 5 / 2
}

/// Items of `stalltrace <command> -o json` selected by `selector` (`--port N`, `--path GLOB`).
fn items(daemon: &Daemon, command: &str, selector: &[&str]) -> Vec<Value> {
    let mut args = vec![command, "-o", "json"];
    args.extend_from_slice(selector);
    daemon.cli_json(&args).as_array().expect("an array").clone()
}

fn client_of(items: &[Value]) -> Option<&Value> {
    items.iter().find(|item| item["conn"]["role"] == "client")
}

/// Waits until the client's stall is listed; returns it.
fn wait_for_client_stall(daemon: &Daemon, selector: &[&str]) -> Value {
    let deadline = Instant::now() + server_delay();
    loop {
        if let Some(stall) = client_of(&items(daemon, "stalls", selector)) {
            return stall.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no client stall for {selector:?}:\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The `stall.end` of connection `id`, waited for.
fn wait_for_end(daemon: &Daemon, id: &Value) -> Value {
    daemon
        .wait_for_any_event("stall.end", REPORT_WITHIN, |e| e["conn"]["id"] == *id)
        .unwrap_or_else(|| panic!("no stall.end for connection {id}:\n{}", daemon.stderr()))
}

/// The server died after reading the request: the client's stall ends `closed` at once, with
/// the true duration, and the client is shown as `peer_closed`, not stalled or active.
#[track_caller]
fn assert_ended_by_the_peer(daemon: &Daemon, selector: &[&str], mut server: Terminated) {
    let stall = wait_for_client_stall(daemon, selector);
    assert_eq!(stall["stall"]["kind"], "awaiting_response", "{stall:#}");
    let died = wait_exit(&mut server);
    let end = wait_for_end(daemon, &stall["conn"]["id"]);
    assert!(
        died.elapsed() < REPORT_WITHIN,
        "ended within a sweep or two of the death"
    );
    assert_eq!(end["stall"]["resolution"], "closed", "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    let delay = server_delay().as_millis() as u64;
    assert!(
        duration + 300 >= delay && duration < delay + REPORT_WITHIN.as_millis() as u64,
        "the true duration, to the close: {end:#}"
    );
    thread::sleep(STALL_AFTER * 2);
    assert!(
        client_of(&items(daemon, "stalls", selector)).is_none(),
        "no new stall: nothing can answer"
    );
    let conns = items(daemon, "conns", selector);
    let client = client_of(&conns).unwrap_or_else(|| panic!("the client is live: {conns:#?}"));
    assert_eq!(client["conn"]["state"], "peer_closed", "{client:#}");
    let show = daemon.cli_json(&["show", &client["conn"]["id"].to_string(), "-o", "json"]);
    assert_eq!(show["item"]["conn"]["state"], "peer_closed", "{show:#}");
    assert!(
        show["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["stall"]["resolution"] == "closed")),
        "{show:#}"
    );
}

/// The server answered and died at once; the client has not read yet: the reply is there, so
/// its stall stays open past the server's close, and its read ends it `response`.
#[track_caller]
fn assert_waits_for_the_unread_reply(
    daemon: &Daemon,
    selector: &[&str],
    mut server: Terminated,
    read: impl FnOnce() -> Vec<u8>,
) {
    let stall = wait_for_client_stall(daemon, selector);
    wait_exit(&mut server);
    thread::sleep(STALL_AFTER * 2);
    let open = items(daemon, "stalls", selector);
    assert!(
        client_of(&open).is_some_and(|s| s["conn"]["id"] == stall["conn"]["id"]),
        "the reply waits unread: still awaited: {open:#?}"
    );
    assert_eq!(read(), b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let end = wait_for_end(daemon, &stall["conn"]["id"]);
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
}

#[test]
fn a_tcp_client_whose_server_died_without_answering_is_no_longer_stalled() {
    require_root();
    let daemon = Daemon::start("peer-died-tcp");
    let (server, port) = one_shot_server("tcp", server_delay(), "die");
    let mut client = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    client.write_all(b"GET /report HTTP/1.1\r\n\r\n").unwrap();
    assert_ended_by_the_peer(&daemon, &["--port", &port], server);
    drop(client);
}

#[test]
fn a_tcp_client_whose_reply_came_with_the_close_waits_for_its_read() {
    require_root();
    let daemon = Daemon::start("peer-replied-tcp");
    let (server, port) = one_shot_server("tcp", server_delay(), "reply");
    let mut client = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    client.write_all(b"GET /report HTTP/1.0\r\n\r\n").unwrap();
    assert_waits_for_the_unread_reply(&daemon, &["--port", &port], server, || {
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        reply
    });
}

fn unix_server(daemon: &Daemon, name: &str, mode: &str) -> (Terminated, String, String) {
    let dir = daemon_dir(daemon, name);
    let path = dir.join("app.sock");
    let (server, ready) = one_shot_server(path.to_str().unwrap(), server_delay(), mode);
    assert_eq!(ready, "ready");
    let glob = format!("{}/*.sock", dir.display());
    (server, path.to_str().unwrap().to_owned(), glob)
}

#[test]
fn a_unix_client_whose_server_died_without_answering_is_no_longer_stalled() {
    require_root();
    let daemon = Daemon::start("peer-died-unix");
    let (server, path, glob) = unix_server(&daemon, "died", "die");
    let mut client = UnixStream::connect(Path::new(&path)).unwrap();
    client.write_all(b"GET /report HTTP/1.1\r\n\r\n").unwrap();
    assert_ended_by_the_peer(&daemon, &["--path", &glob], server);
    drop(client);
}

#[test]
fn a_unix_client_whose_reply_came_with_the_close_waits_for_its_read() {
    require_root();
    let daemon = Daemon::start("peer-replied-unix");
    let (server, path, glob) = unix_server(&daemon, "replied", "reply");
    let mut client = UnixStream::connect(Path::new(&path)).unwrap();
    client.write_all(b"GET /report HTTP/1.0\r\n\r\n").unwrap();
    assert_waits_for_the_unread_reply(&daemon, &["--path", &glob], server, || {
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        reply
    });
}

/// A request already hung when the daemon starts (an on-call starting stalltrace mid-incident)
/// is flagged on both ends from the sockets' own history, its stall dated from the request
/// and marked `partial` (inferred, not seen), and ended by the late reply; a keep-alive
/// connection whose exchange completed before is `idle`, and so is one that never carried
/// data — neither flagged.
#[test]
fn a_request_hung_before_the_daemon_started_is_flagged_from_the_sockets_history() {
    require_root();
    let (mut server, port) = one_shot_server("tcp", Duration::ZERO, "reply-when-told");
    let port_number = port.parse::<u16>().unwrap();
    let mut client = TcpStream::connect(("127.0.0.1", port_number)).unwrap();
    let asked = Instant::now();
    client.write_all(b"GET /report HTTP/1.0\r\n\r\n").unwrap();
    // An answered keep-alive exchange, and a connection that never carried data.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = listener.local_addr().unwrap().port();
    let mut idle = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut idle_server, _) = listener.accept().unwrap();
    idle.write_all(b"PING\r\n").unwrap();
    let mut ping = [0u8; 6];
    idle_server.read_exact(&mut ping).unwrap();
    // The kernel dates data in milliseconds: a reply within the same one could not be told
    // to come after the request (`unknown`).
    thread::sleep(Duration::from_millis(50));
    idle_server.write_all(b"+PONG\r\n").unwrap();
    let mut pong = [0u8; 7];
    idle.read_exact(&mut pong).unwrap();
    let silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_silent_server, _) = listener.accept().unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    thread::sleep(Duration::from_millis(300));

    let daemon = Daemon::start("adopted-hung");
    let stalls = daemon.wait_for_stalls(port_number, 2, REPORT_WITHIN);
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", daemon.stderr());
    let started = daemon.wait_for_events("stall.start", port_number, 2, REPORT_WITHIN);
    assert_eq!(started.len(), 2, "{started:#?}");
    for (role, kind) in [
        ("client", "awaiting_response"),
        ("server", "unanswered_request"),
    ] {
        let start = started
            .iter()
            .find(|s| s["conn"]["role"] == role)
            .unwrap_or_else(|| panic!("no {role} stall: {started:#?}"));
        assert_eq!(start["stall"]["kind"], kind, "{start:#}");
        let opened = daemon.events_named("conn.open", port_number);
        assert!(
            opened
                .iter()
                .any(|open| open["conn"]["id"] == start["conn"]["id"]
                    && open["conn"]["adopted"] == true),
            "on the adopted connection: {opened:#?}"
        );
        let quiet = start["stall"]["quiet_ms"].as_u64().unwrap();
        assert!(
            quiet + 300 >= asked.elapsed().as_millis() as u64 - 1_000,
            "dated from the request, before the daemon started: {start:#}"
        );
    }
    let diagnosed = daemon
        .wait_for_event("stall.start", port_number, REPORT_WITHIN, |e| {
            e["stall"]["confidence"] == "partial"
        })
        .or_else(|| {
            daemon.wait_for_event("stall.update", port_number, REPORT_WITHIN, |e| {
                e["stall"]["confidence"] == "partial"
            })
        })
        .unwrap_or_else(|| panic!("inferred stalls are partial: {started:#?}"));
    assert!(
        diagnosed["stall"]["confidence_reason"]
            .as_str()
            .is_some_and(|r| r.contains("inferred")),
        "{diagnosed:#}"
    );
    let conns = items(&daemon, "conns", &["--port", &other_port.to_string()]);
    let state_of = |port: u16| {
        conns
            .iter()
            .find(|c| c["network"]["local"]["port"] == port)
            .map(|c| c["conn"]["state"].clone())
    };
    assert_eq!(
        state_of(idle.local_addr().unwrap().port()),
        Some(Value::from("idle")),
        "{conns:#?}"
    );
    assert_eq!(
        state_of(silent_port),
        Some(Value::from("idle")),
        "nothing asked yet: {conns:#?}"
    );
    assert!(items(&daemon, "stalls", &["--port", &other_port.to_string()]).is_empty());

    // The late answer ends both stalls, with their true durations.
    let answer_after = asked.elapsed();
    let mut tell = server.0.stdin.take().unwrap();
    tell.write_all(b"answer\n").unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_ended_by_responses(&daemon, port_number, 2, answer_after, REPORT_WITHIN);
    drop((idle, idle_server, silent));
}

/// A Unix server that greets first (SMTP-like) and a client that bound its own address
/// (autobind, `bind("")`): both ends are named, and the first bytes go the server's way. The
/// roles must still follow who accepted: the client's command that is never answered is
/// flagged on both ends.
const GREETING_SERVER: &str = r#"
import socket, sys, time
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
conn.sendall(b"220 mail.example ESMTP ready\r\n")
conn.recv(4096)
time.sleep(3600)
"#;

const AUTOBOUND_CLIENT: &str = r#"
import socket, sys, time
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.bind("")
client.connect(sys.argv[1])
client.recv(4096)
client.sendall(b"EHLO client.example\r\n")
print(repr(client.getsockname()), flush=True)
time.sleep(3600)
"#;

#[test]
fn a_unix_server_that_greets_an_autobound_client_keeps_its_role() {
    require_root();
    let daemon = Daemon::start("unix-greeting");
    let dir = daemon_dir(&daemon, "greeting");
    let path = dir.join("smtp.sock");
    let glob = format!("{}/*.sock", dir.display());
    let mut server = Script::start(PYTHON, GREETING_SERVER, &[path.to_str().unwrap()]);
    assert_eq!(server.line(), "ready");
    let mut client = Script::start(PYTHON, AUTOBOUND_CLIENT, &[path.to_str().unwrap()]);
    let name = client.line();
    assert!(name.starts_with("b'\\x00"), "autobound: {name}");
    let deadline = Instant::now() + REPORT_WITHIN;
    let stalls = loop {
        let stalls = items(&daemon, "stalls", &["--path", &glob]);
        if stalls.len() >= 2 || Instant::now() > deadline {
            break stalls;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", daemon.stderr());
    for (role, kind, pid) in [
        ("server", "unanswered_request", server.pid()),
        ("client", "awaiting_response", client.pid()),
    ] {
        let stall = stalls
            .iter()
            .find(|s| s["conn"]["role"] == role)
            .unwrap_or_else(|| panic!("no {role}: {stalls:#?}"));
        assert_eq!(stall["stall"]["kind"], kind, "{stall:#}");
        assert_eq!(stall["process"]["pid"], pid, "{stall:#}");
    }
    let server_end = stalls.iter().find(|s| s["conn"]["role"] == "server");
    assert_eq!(
        server_end.unwrap()["network"]["local"]["address"],
        path.to_str().unwrap()
    );
}

/// A D-Bus service on the bus at argv[1]: `org.example.Slow` answers `Wait(seconds)` after
/// that many seconds.
const DBUS_SERVICE: &str = r#"
import sys, time, dbus, dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
DBusGMainLoop(set_as_default=True)
bus = dbus.bus.BusConnection(sys.argv[1])
class Slow(dbus.service.Object):
    @dbus.service.method("org.example.Slow", in_signature="d", out_signature="s")
    def Wait(self, seconds):
        time.sleep(seconds)
        return "done"
name = dbus.service.BusName("org.example.Slow", bus)
Slow(bus, "/org/example/Slow")
print("ready", flush=True)
GLib.MainLoop().run()
"#;

/// A client that owns a name (the bus answers `RequestName` with the `NameAcquired` signal
/// and the method return in one read), emits a signal on the bus at argv[1], then stays
/// connected.
const DBUS_SIGNALLER: &str = r#"
import sys, time, dbus
bus = dbus.bus.BusConnection(sys.argv[1])
bus.request_name("org.example.Signaller")
message = dbus.lowlevel.SignalMessage("/org/example/Events", "org.example.Events", "Changed")
bus.send_message(message)
bus.flush()
print("sent", flush=True)
time.sleep(3600)
"#;

/// A client that calls `Wait(argv[2])` on the service, prints the answer, then stays.
const DBUS_CALLER: &str = r#"
import sys, time, dbus
bus = dbus.bus.BusConnection(sys.argv[1])
print("connected", flush=True)
slow = bus.get_object("org.example.Slow", "/org/example/Slow")
print(slow.Wait(float(sys.argv[2]), dbus_interface="org.example.Slow", timeout=60), flush=True)
time.sleep(3600)
"#;

/// A private bus: dbus-daemon listening on `dir`/bus.sock, any local user allowed.
fn dbus_daemon(dir: &Path) -> (Terminated, String) {
    let config = dir.join("bus.conf");
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>"#,
            dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-address"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("dbus-daemon (cargo xtask test installs the dbus package)");
    let mut address = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut address)
        .unwrap();
    let address = address.trim().to_owned();
    assert!(address.starts_with("unix:path="), "{address}");
    (Terminated(child), address)
}

/// D-Bus (issue 7 addendum): a client that emits a signal and stays connected owes nothing and
/// is never flagged, nor is the bus's end of it; a method call the service answers after 6 s
/// is flagged and ends `response`.
#[test]
fn dbus_signals_are_one_way_and_a_slow_method_call_is_flagged() {
    require_root();
    let daemon = Daemon::start("dbus");
    let dir = daemon_dir(&daemon, "dbus");
    let glob = format!("{}/bus.sock", dir.display());
    let (_bus, address) = dbus_daemon(&dir);
    let mut service = Script::start(DEBIAN_PYTHON, DBUS_SERVICE, &[&address]);
    assert_eq!(service.line(), "ready");

    let mut signaller = Script::start(DEBIAN_PYTHON, DBUS_SIGNALLER, &[&address]);
    assert_eq!(signaller.line(), "sent");
    let signaller_pid = signaller.pid();
    thread::sleep(STALL_AFTER * 3);
    let flagged: Vec<_> = daemon
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "stall.start"
                && (e["process"]["pid"] == signaller_pid
                    || e["network"]["peer"]["pid"] == signaller_pid)
        })
        .collect();
    assert_eq!(flagged, Vec::<Value>::new(), "a signal asks nothing");
    let conns = items(&daemon, "conns", &["--path", &glob]);
    let signaller_end = conns
        .iter()
        .find(|c| c["process"]["pid"] == signaller_pid)
        .unwrap_or_else(|| panic!("the signaller's connection is tracked: {conns:#?}"));
    assert_eq!(
        signaller_end["network"]["protocol"]["name"], "dbus",
        "recognized, or this proves nothing: {signaller_end:#}"
    );
    assert_eq!(signaller_end["conn"]["state"], "idle", "{signaller_end:#}");

    let answer_after = STALL_AFTER * 6;
    let seconds = answer_after.as_secs_f64().to_string();
    let mut caller = Script::start(DEBIAN_PYTHON, DBUS_CALLER, &[&address, &seconds]);
    assert_eq!(caller.line(), "connected");
    let caller_pid = caller.pid();
    let deadline = Instant::now() + answer_after;
    let stall = loop {
        let stalls = items(&daemon, "stalls", &["--path", &glob]);
        if let Some(stall) = stalls.iter().find(|s| s["process"]["pid"] == caller_pid) {
            break stall.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the slow call is flagged: {stalls:#?}\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stall["stall"]["kind"], "awaiting_response", "{stall:#}");
    let request = &stall["stall"]["request"];
    assert_eq!(request["protocol"], "dbus", "{stall:#}");
    assert!(
        request["signature"]
            .as_str()
            .is_some_and(|s| s.starts_with("dbus call ")),
        "{stall:#}"
    );
    assert_eq!(caller.line(), "done");
    let end = wait_for_end(&daemon, &stall["conn"]["id"]);
    assert_eq!(end["stall"]["resolution"], "response", "{end:#}");
    let duration = end["stall"]["duration_ms"].as_u64().unwrap();
    assert!(
        duration + 300 >= answer_after.as_millis() as u64,
        "true duration: {end:#}"
    );
}

/// One write of a large reply to a peer that does not read blocks in the kernel, and the
/// hooks see a send only when it returns: judged from them alone, the server has sent
/// nothing. The socket has taken part of the reply already, and the diagnosis says so.
#[test]
fn a_reply_blocked_in_one_long_send_makes_the_unanswered_verdict_partial() {
    require_root();
    let daemon = Daemon::start("blocked-send");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut request = [0u8; 21];
    server.read_exact(&mut request).unwrap();
    let sender = thread::spawn(move || server.write_all(&vec![b'x'; 64 << 20]));
    let partial =
        |e: &Value| e["conn"]["role"] == "server" && e["stall"]["confidence"] == "partial";
    let within = STALL_AFTER + REPORT_WITHIN;
    let diagnosed = daemon
        .wait_for_event("stall.start", port, within, partial)
        .or_else(|| daemon.wait_for_event("stall.update", port, within, partial))
        .unwrap_or_else(|| {
            panic!(
                "the server's stall is partial: {:#?}",
                daemon.events_named("stall.start", port)
            )
        });
    assert!(!sender.is_finished(), "the write is still blocked");
    assert_eq!(
        diagnosed["stall"]["kind"], "unanswered_request",
        "{diagnosed:#}"
    );
    let reason = diagnosed["stall"]["confidence_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("send call still blocked"), "{diagnosed:#}");
    drop(client);
    assert!(sender.join().unwrap().is_err(), "the peer closed");
}
