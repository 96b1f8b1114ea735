//! What the daemon answers right after it starts, with many connections open before it. One
//! test to a file of its own: its 6 000 sockets and 6 000 stalls load both cores for seconds,
//! which would slow the tests run beside it past their bounds.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{require_root, Daemon, STALL_AFTER, START_WITHIN};

/// Stalls already under way when the daemon starts are listed by its very first answer. With
/// 3 000 connections adopted, the first `stalls` came back empty (4 runs out of 4) up to
/// 2026-12-01: the loop could read the query before its first sweep judged them.
#[test]
fn the_first_answer_lists_the_stalls_adopted_at_start() {
    require_root();
    const HELD: usize = 3_000;
    // Both ends of each connection are in this process.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur as usize > 2 * HELD + 100,
        "needs {} file descriptors, the hard limit is {}",
        2 * HELD + 100,
        limit.rlim_cur
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"GET /held HTTP/1.1\r\n\r\n").unwrap();
        // The server reads the request and never answers.
        let mut request = [0u8; 64];
        assert!(server.read(&mut request).unwrap() > 0);
        held.push((client, server));
    }
    thread::sleep(STALL_AFTER + Duration::from_millis(500));

    let daemon = Daemon::spawn("first-answer-adopted", &[]);
    let deadline = Instant::now() + START_WITHIN;
    while !daemon.socket.exists() {
        assert!(daemon.running(), "daemon exited:\n{}", daemon.stderr());
        assert!(Instant::now() < deadline, "no socket:\n{}", daemon.stderr());
        thread::sleep(Duration::from_millis(5));
    }
    let first = daemon.cli_json(&["stalls", "-o", "json", "--port", &port.to_string()]);
    let first = first.as_array().unwrap();
    assert_eq!(
        first.len(),
        2 * HELD,
        "the first answer lists every adopted stall: {} of {}",
        first.len(),
        2 * HELD
    );
    let servers = first
        .iter()
        .filter(|item| item["conn"]["role"] == "server")
        .count();
    assert_eq!(servers, HELD, "one server end per connection");
    drop(held);
}
