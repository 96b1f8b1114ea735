//! Unix domain sockets (stream and seqpacket): the same lifecycle and verdicts as TCP, named by
//! their path, with both ends' processes from the kernel; idle keep-alive never flagged;
//! blame chains across a Unix socket (nginx → a backend that hangs).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    daemon_dir, free_port, require_root, start_nginx, with_role, Daemon, Terminated, REPORT_WITHIN,
    STALL_AFTER,
};

/// A Unix server in its own process: `hang` reads one request per connection and never
/// answers, `echo` answers every read. argv: path (`@name`: abstract), type, mode.
const SERVER: &str = r#"
import os, socket, sys, threading
path, kind, mode = sys.argv[1], sys.argv[2], sys.argv[3]
kind = socket.SOCK_SEQPACKET if kind == "seqpacket" else socket.SOCK_STREAM
listener = socket.socket(socket.AF_UNIX, kind)
listener.bind("\0" + path[1:] if path.startswith("@") else path)
listener.listen(16)
print("ready", flush=True)
held = []
def serve(conn):
    while True:
        data = conn.recv(4096)
        if not data:
            return
        if mode == "hang":
            held.append(conn)
            return
        conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

fn python_server(path: &str, kind: &str, mode: &str) -> Terminated {
    let (server, ready) = python(SERVER, &[path, kind, mode]);
    assert_eq!(ready, "ready");
    server
}

/// Runs a python3 `script` with `args` and waits for the first line it prints (trimmed).
fn python(script: &str, args: &[&str]) -> (Terminated, String) {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed by cargo xtask test");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Terminated(child), line.trim().to_owned())
}

/// Connects a socket of `kind` to `path` (a filesystem path), from this process.
fn connect(path: &Path, kind: libc::c_int) -> std::os::fd::OwnedFd {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    // SAFETY: plain socket/connect calls on a sockaddr_un we fill within its bounds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
            *slot = *byte as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        let ret = libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            len as libc::socklen_t,
        );
        assert_eq!(ret, 0, "connect: {}", std::io::Error::last_os_error());
        fd
    }
}

fn write_all(fd: &std::os::fd::OwnedFd, bytes: &[u8]) {
    let mut file = std::fs::File::from(fd.try_clone().unwrap());
    file.write_all(bytes).unwrap();
}

/// `stalltrace <command> -o json --path <glob>` items.
fn items(daemon: &Daemon, command: &str, glob: &str) -> Vec<Value> {
    daemon
        .cli_json(&[command, "-o", "json", "--path", glob])
        .as_array()
        .expect("an array")
        .clone()
}

fn wait_for_items(daemon: &Daemon, command: &str, glob: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + REPORT_WITHIN;
    loop {
        let found = items(daemon, command, glob);
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The first `stall.start` or `stall.update` on `port` that passes `test`, waited for; fails
/// the test with the stalls seen and the daemon's log if none comes.
fn wait_for_diagnosis(daemon: &Daemon, port: u16, test: impl Fn(&Value) -> bool) -> Value {
    daemon
        .wait_for_event("stall.start", port, REPORT_WITHIN, &test)
        .or_else(|| daemon.wait_for_event("stall.update", port, REPORT_WITHIN, &test))
        .unwrap_or_else(|| {
            panic!(
                "no such diagnosis on port {port}: {:#?}\n{}",
                daemon.events_named("stall.start", port),
                daemon.stderr()
            )
        })
}

/// The first event named `name` on a Unix connection with this inode (either end) that
/// passes `test`, waited for.
fn wait_for_unix_event(
    daemon: &Daemon,
    name: &str,
    inode: &Value,
    test: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + REPORT_WITHIN;
    loop {
        let found = daemon
            .events()
            .into_iter()
            .find(|e| e["event"] == name && e["network"]["local"]["inode"] == *inode && test(e));
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {name} on inode {inode}:\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_unanswered_unix_request_stalls_both_ends_named_by_path_and_pids() {
    require_root();
    let daemon = Daemon::start("unix-stall");
    for (kind, socket_type) in [
        ("stream", libc::SOCK_STREAM),
        ("seqpacket", libc::SOCK_SEQPACKET),
    ] {
        let dir = daemon_dir(&daemon, kind);
        let path = dir.join("app.sock");
        let glob = format!("{}/*.sock", dir.display());
        let watch = Watch::start(&daemon, kind, &glob);
        let server = python_server(path.to_str().unwrap(), kind, "hang");
        let client = connect(&path, socket_type);
        write_all(&client, b"GET /slow/report HTTP/1.1\r\nHost: app\r\n\r\n");
        let stalls = wait_for_items(&daemon, "stalls", &glob, 2);
        assert_eq!(stalls.len(), 2, "{kind}: {stalls:#?}\n{}", daemon.stderr());
        let (waiting, unanswered) = (with_role(&stalls, "client"), with_role(&stalls, "server"));
        assert_eq!(waiting["stall"]["kind"], "awaiting_response");
        assert_eq!(unanswered["stall"]["kind"], "unanswered_request");
        let path = path.to_str().unwrap();
        let ours = std::process::id();
        // Identity: transport, the path on the bound (accepting) end, both processes, and the
        // peers' pids as the kernel recorded them.
        for (item, local, peer, pid, peer_pid) in [
            (waiting, "", path, ours, server.0.id()),
            (unanswered, path, "", server.0.id(), ours),
        ] {
            let network = &item["network"];
            assert_eq!(network["transport"], "unix", "{item:#}");
            assert_eq!(network["local"]["address"], local, "{item:#}");
            assert_eq!(network["peer"]["address"], peer, "{item:#}");
            assert!(network["local"]["port"].is_null(), "{item:#}");
            assert_eq!(item["process"]["pid"], pid, "{item:#}");
            assert_eq!(network["peer"]["pid"], peer_pid, "{item:#}");
            assert_eq!(
                item["stall"]["request"]["signature"], "GET /slow/report",
                "{item:#}"
            );
        }
        // Both ends name each other's inode; the client's stall is blamed on the server's.
        let (client_inode, server_inode) = (
            &waiting["network"]["local"]["inode"],
            &unanswered["network"]["local"]["inode"],
        );
        assert!(client_inode.as_u64().is_some_and(|inode| inode > 0));
        assert_eq!(&waiting["network"]["peer"]["inode"], server_inode);
        assert_eq!(&unanswered["network"]["peer"]["inode"], client_inode);
        // The diagnosis follows the stall by a look of the diagnosis worker (ms, or more on a
        // loaded machine): wait for the blame chain.
        let blamed = |item: &Value| {
            let root = item["stall"]["blame"].as_array().and_then(|b| b.last());
            root.is_some_and(|root| {
                root["conn"] == unanswered["conn"]["id"]
                    && root["evidence"] == "peer"
                    && root["local"] == path
            })
        };
        let deadline = Instant::now() + REPORT_WITHIN;
        loop {
            let stalls = items(&daemon, "stalls", &glob);
            let client = stalls.iter().find(|s| s["conn"]["role"] == "client");
            if client.is_some_and(blamed) {
                break;
            }
            assert!(Instant::now() < deadline, "no blame chain: {stalls:#?}");
            thread::sleep(Duration::from_millis(100));
        }
        // The filters: a path that does not match selects nothing, nor does a port.
        assert!(items(&daemon, "stalls", "/nowhere/*").is_empty());
        let conns = items(&daemon, "conns", &glob);
        assert_eq!(conns.len(), 2, "{conns:#?}");
        assert!(conns.iter().all(|c| c["conn"]["state"] == "stalled"));
        let id = unanswered["conn"]["id"].to_string();
        let show = daemon.cli(&["show", &id]);
        let shown = String::from_utf8_lossy(&show.stdout);
        assert!(show.status.success() && shown.contains(path), "{shown}");
        // `why` groups both ends under the path.
        let why = daemon.cli_json(&["why", "-o", "json", "--path", &glob]);
        let groups = why.as_array().unwrap();
        assert!(
            !groups.is_empty()
                && groups
                    .iter()
                    .all(|g| g["endpoint"] == format!("unix:{path}"))
                && groups.iter().any(|g| g["signature"] == "GET /slow/report"),
            "{groups:#?}"
        );

        // The client gives up: its stall ends `closed`, with its true duration.
        drop(client);
        let end = wait_for_unix_event(&daemon, "stall.end", client_inode, |_| true);
        assert_eq!(end["stall"]["resolution"], "closed", "{end:#}");
        let duration = end["stall"]["duration_ms"].as_u64().unwrap();
        assert!(duration >= STALL_AFTER.as_millis() as u64, "{end:#}");
        let close = wait_for_unix_event(&daemon, "conn.close", client_inode, |_| true);
        assert_eq!(close["conn"]["end"], "closed", "{close:#}");
        assert_eq!(close["conn"]["closed_while_stalled"], true, "{close:#}");
        // The server's stall outlives the client (it still owes the reply), until it exits.
        drop(server);
        let end = wait_for_unix_event(&daemon, "stall.end", server_inode, |_| true);
        assert_eq!(end["stall"]["kind"], "unanswered_request", "{end:#}");
        assert_eq!(end["stall"]["resolution"], "closed", "{end:#}");
        // `watch --path` streamed this connection's events, and only its path's.
        let watched = watch.events();
        for (inode, kind) in [
            (client_inode, "awaiting_response"),
            (server_inode, "unanswered_request"),
        ] {
            assert!(
                watched.iter().any(|e| e["event"] == "stall.start"
                    && e["network"]["local"]["inode"] == *inode
                    && e["stall"]["kind"] == kind),
                "{watched:#?}"
            );
        }
        assert!(
            watched.iter().all(|e| e["network"]["transport"] == "unix"
                && [
                    &e["network"]["local"]["address"],
                    &e["network"]["peer"]["address"]
                ]
                .contains(&&Value::from(path))),
            "{watched:#?}"
        );
    }
}

/// A `watch -o json --path GLOB`, its output going to a file read when stopped.
struct Watch {
    child: Child,
    out: PathBuf,
}

impl Watch {
    fn start(daemon: &Daemon, name: &str, glob: &str) -> Self {
        let out = daemon.events.with_extension(format!("watch-{name}"));
        let child = Command::new(stalltrace_integration::binary())
            .args(["watch", "-o", "json", "--path", glob, "--socket"])
            .arg(&daemon.socket)
            .stdout(std::fs::File::create(&out).unwrap())
            .spawn()
            .unwrap();
        // The watch is registered once the daemon has answered it.
        thread::sleep(Duration::from_millis(500));
        Self { child, out }
    }

    /// Stops the watch; its events, without `loss` lines (which always pass).
    fn events(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|event| event["event"] != "loss")
            .collect()
    }
}

#[test]
fn an_idle_unix_keep_alive_connection_is_never_flagged() {
    require_root();
    let daemon = Daemon::start("unix-idle");
    let name = format!("@stalltrace-idle-{}", std::process::id());
    let _server = python_server(&name, "stream", "echo");
    let mut addr = vec![0u8];
    addr.extend_from_slice(&name.as_bytes()[1..]);
    let client = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&addr[1..]).unwrap();
        UnixStream::connect_addr(&addr).unwrap()
    };
    let mut client = client;
    for _ in 0..3 {
        client.write_all(b"ping\n").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
    }
    let glob = format!("{name}*");
    let conns = wait_for_items(&daemon, "conns", &glob, 2);
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert!(conns.iter().all(|c| c["network"]["transport"] == "unix"));
    let server = with_role(&conns, "server");
    assert_eq!(server["network"]["local"]["address"], name.as_str());
    assert_eq!(server["conn"]["exchanges"], 3, "{server:#}");
    // Idle for three thresholds: never a stall.
    thread::sleep(3 * STALL_AFTER);
    assert!(items(&daemon, "stalls", &glob).is_empty());
    let conns = items(&daemon, "conns", &glob);
    assert!(
        conns.iter().all(|c| c["conn"]["state"] == "idle"),
        "{conns:#?}"
    );
    let inode = &server["network"]["local"]["inode"];
    assert!(!daemon.events().iter().any(|e| e["event"] == "stall.start"
        && (e["network"]["local"]["inode"] == *inode || e["network"]["peer"]["inode"] == *inode)));
}

/// A backend on a Unix socket, behind nginx: `/slow/` requests are read and never answered.
const HTTP_BACKEND: &str = r#"
import os, socket, sys, threading
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
listener.listen(64)
print("ready", flush=True)
held = []
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            return
        head += data
    if b" /slow/" in head:
        held.append(conn)
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.close()
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// client → nginx (TCP) → Unix socket → a backend that hangs: the client's stall chains through
/// nginx's inbound request and its Unix upstream connection to the backend's
/// `unanswered_request`, while healthy requests through the same nginx are never blamed.
#[test]
fn a_blame_chain_crosses_a_unix_socket_from_nginx_to_its_backend() {
    require_root();
    let daemon = Daemon::start("unix-nginx");
    let dir = daemon_dir(&daemon, "nginx");
    let socket = dir.join("backend.sock");
    let (backend, ready) = python(HTTP_BACKEND, &[socket.to_str().unwrap()]);
    assert_eq!(ready, "ready");
    let location = format!(
        "location / {{ proxy_pass http://unix:{}:; proxy_read_timeout 60s; }}",
        socket.display()
    );
    let (_nginx, proxy) = nginx(&dir, &location);
    let healthy = thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(3);
        let mut answered = 0;
        while Instant::now() < until {
            let mut conn = get(proxy, "/cart");
            let mut reply = Vec::new();
            if conn.read_to_end(&mut reply).is_ok() && reply.ends_with(b"ok") {
                answered += 1;
            }
            thread::sleep(Duration::from_millis(10));
        }
        answered
    });
    thread::sleep(Duration::from_millis(300));
    let stuck = get(proxy, "/slow/checkout");
    let local = stuck.local_addr().unwrap();
    assert!(healthy.join().unwrap() > 10, "the healthy path works");
    let path = socket.to_str().unwrap();
    let reaches_the_backend = |e: &Value| {
        e["conn"]["role"] == "client"
            && e["network"]["local"]["port"] == local.port()
            && e["stall"]["blame"]
                .as_array()
                .and_then(|b| b.last())
                .is_some_and(|root| {
                    root["stall"] == "unanswered_request"
                        && root["local"] == path
                        && root["pid"] == backend.0.id()
                })
    };
    let found = wait_for_diagnosis(&daemon, local.port(), reaches_the_backend);
    let blame = found["stall"]["blame"].as_array().unwrap();
    // client → (peer) nginx's inbound → (timing+signature) nginx's Unix upstream connection
    // → (peer) the backend's side.
    assert_eq!(blame.len(), 4, "{blame:#?}");
    assert_eq!(blame[1]["evidence"], "peer", "{blame:#?}");
    assert_eq!(blame[1]["local"], proxy.to_string(), "{blame:#?}");
    assert_eq!(blame[2]["evidence"], "timing+signature", "{blame:#?}");
    assert_eq!(blame[2]["peer"], path, "{blame:#?}");
    assert_eq!(blame[2]["stall"], "awaiting_response", "{blame:#?}");
    assert_eq!(blame[3]["evidence"], "peer", "{blame:#?}");
    // The Unix stalls are listed under the socket's path, and only the stuck request's.
    let stalls = items(&daemon, "stalls", &format!("{}/*", dir.display()));
    assert_eq!(
        stalls.len(),
        2,
        "nginx's upstream and the backend: {stalls:#?}"
    );
    drop(stuck);
}

/// Starts nginx on a free loopback port with one `location` block, its files in `dir`.
fn nginx(dir: &Path, location: &str) -> (Terminated, SocketAddr) {
    let proxy = free_port();
    let nginx = start_nginx(
        dir,
        proxy,
        &format!("server {{ listen {proxy}; {location} }}"),
    );
    (nginx, proxy)
}

/// A request that asks the server to close after answering.
fn get(proxy: SocketAddr, path: &str) -> TcpStream {
    let mut conn = TcpStream::connect(proxy).unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    conn
}

/// A thread-per-request TCP server whose handler calls a Unix backend and blocks reading it.
const APP: &str = r#"
import socket, sys, threading
backend = sys.argv[1]
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(16)
print(listener.getsockname()[1], flush=True)
def handle(conn):
    conn.recv(4096)
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(backend)
    upstream.sendall(b"GET /inventory HTTP/1.1\r\n\r\n")
    conn.sendall(upstream.recv(4096))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"#;

/// The thread that read a stalled TCP request is blocked in `recv` on a Unix socket: the chain
/// follows that fd (by its inode) to the Unix connection, then to the backend's stall.
#[test]
fn a_thread_blocked_on_a_unix_socket_is_followed_to_the_backend() {
    require_root();
    let daemon = Daemon::start("unix-fd");
    let dir = daemon_dir(&daemon, "fd");
    let socket = dir.join("inventory.sock");
    let backend = python_server(socket.to_str().unwrap(), "stream", "hang");
    let (_app, port) = python(APP, &[socket.to_str().unwrap()]);
    let port: u16 = port.parse().unwrap();
    let _client = get(SocketAddr::from(([127, 0, 0, 1], port)), "/order");
    let path = socket.to_str().unwrap();
    let reaches_the_backend = |e: &Value| {
        e["conn"]["role"] == "server"
            && e["stall"]["blame"].as_array().is_some_and(|blame| {
                blame.len() == 3
                    && blame[1]["evidence"] == "fd"
                    && blame[1]["peer"] == path
                    && blame[2]["evidence"] == "peer"
                    && blame[2]["local"] == path
                    && blame[2]["pid"] == backend.0.id()
            })
    };
    wait_for_diagnosis(&daemon, port, reaches_the_backend);
}

/// client → nginx → FastCGI over a Unix socket → php-fpm, whose script hangs: the client's
/// stall chains to the php-fpm worker's `unanswered_request` (the FastCGI request has no
/// signature to match nginx's inbound one: the event-loop link is by timing alone).
#[test]
fn a_php_fpm_worker_that_hangs_is_the_root_of_the_nginx_chain() {
    require_root();
    let daemon = Daemon::start("unix-php");
    let dir = daemon_dir(&daemon, "php");
    let socket = dir.join("php-fpm.sock");
    let temp = dir.display();
    std::fs::write(dir.join("slow.php"), "<?php sleep(3600);\n").unwrap();
    std::fs::write(
        dir.join("php-fpm.conf"),
        format!(
            "[global]\npid = {temp}/php-fpm.pid\nerror_log = {temp}/php-fpm.log\n\
             daemonize = no\n\
             [app]\nuser = nobody\ngroup = nogroup\nlisten = {socket}\nlisten.mode = 0666\n\
             pm = static\npm.max_children = 2\n",
            socket = socket.display()
        ),
    )
    .unwrap();
    let php_fpm = std::fs::read_dir("/usr/sbin")
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("php-fpm"))
        })
        .expect("php-fpm is installed by cargo xtask test (php8.2-fpm)");
    let _php = Terminated(
        Command::new(php_fpm)
            .args(["--nodaemonize", "--fpm-config"])
            .arg(dir.join("php-fpm.conf"))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "php-fpm does not listen on {temp}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let location = format!(
        "location ~ \\.php$ {{ include /etc/nginx/fastcgi_params; \
         fastcgi_param SCRIPT_FILENAME {temp}$fastcgi_script_name; \
         fastcgi_pass unix:{}; fastcgi_read_timeout 60s; }}",
        socket.display()
    );
    let (_nginx, proxy) = nginx(&dir, &location);
    let stuck = get(proxy, "/slow.php");
    let local = stuck.local_addr().unwrap();
    let path = socket.to_str().unwrap();
    let reaches_php = |e: &Value| {
        e["conn"]["role"] == "client"
            && e["network"]["local"]["port"] == local.port()
            && e["stall"]["blame"]
                .as_array()
                .and_then(|b| b.last())
                .is_some_and(|root| {
                    root["stall"] == "unanswered_request"
                        && root["local"] == path
                        && root["executable"]
                            .as_str()
                            .is_some_and(|name| name.starts_with("php-fpm"))
                })
    };
    let found = wait_for_diagnosis(&daemon, local.port(), reaches_php);
    let blame = found["stall"]["blame"].as_array().unwrap();
    assert_eq!(blame.len(), 4, "{blame:#?}");
    assert_eq!(blame[2]["evidence"], "timing", "{blame:#?}");
    assert_eq!(blame[2]["peer"], path, "{blame:#?}");
    assert_eq!(blame[3]["evidence"], "peer", "{blame:#?}");
    // The php-fpm worker's own stall, found by its path.
    let stalls = items(&daemon, "stalls", &format!("{}/*", dir.display()));
    let worker = with_role(&stalls, "server");
    assert_eq!(worker["stall"]["kind"], "unanswered_request", "{worker:#}");
    assert_eq!(worker["network"]["local"]["address"], path, "{worker:#}");
    drop(stuck);
}

/// A parent asks its child over a `socketpair()` and the child never answers.
const SOCKETPAIR: &str = r#"
import os, socket, sys, time
parent_end, child_end = socket.socketpair()
child = os.fork()
if child == 0:
    parent_end.close()
    child_end.recv(4096)
    time.sleep(3600)
    sys.exit(0)
child_end.close()
print(child, flush=True)
parent_end.sendall(b"GET /job HTTP/1.1\r\n\r\n")
parent_end.recv(4096)
"#;

/// A socketpair has no listener and no name: almost always an event loop's wake-up pair (a
/// byte one way, nothing back, by design), so both ends are listed, named by their processes,
/// and never judged — even this one, where the parent does wait for an answer.
#[test]
fn a_socketpair_is_listed_and_never_judged() {
    require_root();
    let daemon = Daemon::start("unix-pair");
    let (parent, child) = python(SOCKETPAIR, &[]);
    let child: u32 = child.parse().unwrap();
    let conns_of = |pid: u32| {
        let conns = daemon.cli_json(&["conns", "-o", "json", "--pid", &pid.to_string()]);
        conns.as_array().unwrap().clone()
    };
    let deadline = Instant::now() + REPORT_WITHIN;
    while (conns_of(parent.0.id()).is_empty() || conns_of(child).is_empty())
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(STALL_AFTER * 3);
    let (asking, asked) = (conns_of(parent.0.id()), conns_of(child));
    assert_eq!(asking.len(), 1, "{asking:#?}\n{}", daemon.stderr());
    assert_eq!(asked.len(), 1, "{asked:#?}");
    for item in [&asking[0], &asked[0]] {
        assert_eq!(item["conn"]["state"], "stream", "{item:#}");
        let network = &item["network"];
        assert_eq!(network["transport"], "unix", "{item:#}");
        assert_eq!(network["local"]["address"], "", "{item:#}");
        assert_eq!(network["peer"]["address"], "", "{item:#}");
        assert_eq!(network["peer"]["pid"], parent.0.id(), "{item:#}");
    }
    assert_eq!(
        asking[0]["network"]["peer"]["inode"], asked[0]["network"]["local"]["inode"],
        "{asking:#?} {asked:#?}"
    );
    for pid in [parent.0.id(), child] {
        let stalls = daemon.cli_json(&["stalls", "-o", "json", "--pid", &pid.to_string()]);
        assert_eq!(stalls, serde_json::json!([]), "pid {pid}");
    }
    let pids = [u64::from(parent.0.id()), u64::from(child)];
    let flagged: Vec<_> = daemon
        .events()
        .into_iter()
        .filter(|e| e["event"] == "stall.start")
        .filter(|e| {
            e["process"]["pid"]
                .as_u64()
                .is_some_and(|p| pids.contains(&p))
        })
        .collect();
    assert!(flagged.is_empty(), "{flagged:#?}");
    // Stop both: the parent (its guard), then the child it forked.
    drop(parent);
    // SAFETY: signalling the child this test's script forked.
    unsafe { libc::kill(child as i32, libc::SIGKILL) };
}
