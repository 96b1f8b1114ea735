//! The control API under abuse: clients that say nothing, clients that stop reading their
//! answer, more clients than slots; and the socket's own safety (group, never deleting what is
//! not a socket).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{binary, require_root, Daemon};

const STATUS: &[u8] = b"{\"version\":1,\"command\":\"status\"}\n";

/// Sends `request` and reads the answer line.
fn ask(socket: &Path, request: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer ({e}): {line:?}"))
}

fn error_code(answer: &Value) -> Option<&str> {
    answer["error"]["code"].as_str()
}

#[test]
fn more_clients_than_slots_get_busy_and_idle_ones_are_timed_out() {
    require_root();
    let daemon = Daemon::start("api-busy");
    // 64 clients that connect and say nothing hold every slot...
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    // ...so the next one is told, at once, that the daemon is busy.
    let started = Instant::now();
    let answer = ask(&daemon.socket, STATUS);
    assert_eq!(error_code(&answer), Some("busy"), "{answer:#}");
    assert_eq!(answer["ok"], false);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The idle ones are answered `timeout` after 5 s, which frees their slots.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let answer = ask(&daemon.socket, STATUS);
        if answer["ok"] == true {
            break;
        }
        assert_eq!(error_code(&answer), Some("busy"), "{answer:#}");
        assert!(Instant::now() < deadline, "slots never freed");
        thread::sleep(Duration::from_millis(200));
    }
    drop(idle);
    assert!(daemon.stop().success());
}

#[test]
fn clients_that_stop_reading_lose_their_slot_after_the_write_timeout() {
    require_root();
    let daemon = Daemon::start("api-unread");
    // Enough connections that a `conns` answer overflows a Unix socket's buffer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = thread::spawn(move || {
        (0..500)
            .map(|_| {
                let (mut conn, _) = listener.accept().unwrap();
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).unwrap();
                conn
            })
            .collect::<Vec<_>>()
    });
    let clients: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.write_all(b"x").unwrap();
            conn
        })
        .collect();
    let servers = accepted.join().unwrap();
    let conns = b"{\"version\":1,\"command\":\"conns\"}\n";
    let conns_size = || {
        let asked = Instant::now();
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        stream.write_all(conns).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        eprintln!(
            "conns answer: {} bytes in {:?}",
            answer.len(),
            asked.elapsed()
        );
        answer.len()
    };
    // The daemon may still be taking in the 1 000 openings (it drains the ring in turns).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut size = conns_size();
    while size <= 300 << 10 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        size = conns_size();
    }
    assert!(size > 300 << 10, "the conns answer is only {size} bytes");

    // 64 clients ask for it and never read.
    let stuck: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut stream = UnixStream::connect(&daemon.socket).unwrap();
            stream.write_all(conns).unwrap();
            stream
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let blocked_at = Instant::now();
    let first = ask(&daemon.socket, STATUS);
    let told = blocked_at.elapsed();
    eprintln!("first answer after {told:?}");
    assert_eq!(error_code(&first), Some("busy"), "{first:#}");
    // Making their answers must not keep the API from telling a client so (it took 3.9 s when
    // the loop's turns never let the API task run).
    assert!(told < Duration::from_secs(1), "busy told after {told:?}");
    // After the 5 s write timeout their slots (and answers) are given up.
    let answered = loop {
        let answer = ask(&daemon.socket, STATUS);
        if answer["ok"] == true {
            break blocked_at.elapsed();
        }
        assert!(
            blocked_at.elapsed() < Duration::from_secs(7),
            "locked out for {:?}",
            blocked_at.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{size}-byte answers unread by 64 clients: served again after {answered:?}");
    // The first stuck client was cut off: its stream ends short of the answer.
    let mut first_stuck = &stuck[0];
    first_stuck
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let _ = first_stuck.read_to_end(&mut got);
    assert!(got.len() < size, "a stuck client got its whole answer");
    drop(stuck);
    drop((clients, servers));
    assert!(daemon.stop().success());
}

/// The gid of an existing group that root is not in by default.
fn some_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            Some((name.to_owned(), gid))
        })
        .find(|(_, gid)| *gid != 0)
        .expect("a group other than root in /etc/group")
}

#[test]
fn the_socket_gets_the_group_asked_for() {
    require_root();
    let (name, gid) = some_group();
    let daemon = Daemon::start_with("api-group", &["--socket-group", &name]);
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.gid(), gid, "socket group");
    assert_eq!(meta.mode() & 0o777, 0o660);
}

/// Runs `stalltrace daemon ARGS` expecting it to fail at start; its stderr.
fn failed_start(args: &[&str]) -> String {
    let mut child = Command::new(binary())
        .arg("daemon")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon started with {args:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn an_unknown_socket_group_is_an_error() {
    require_root();
    let dir = std::env::temp_dir().join(format!("stalltrace-it-nogroup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let stderr = failed_start(&[
        "--socket",
        socket.to_str().unwrap(),
        "--socket-group",
        "no-such-group-stalltrace",
    ]);
    assert!(stderr.contains("no group named"), "{stderr}");
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_never_deleted() {
    require_root();
    let dir = std::env::temp_dir().join(format!("stalltrace-it-notsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("precious.txt");
    std::fs::write(&path, "keep me\n").unwrap();
    let stderr = failed_start(&["--socket", path.to_str().unwrap()]);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me\n");
    let _ = std::fs::remove_dir_all(&dir);
}
