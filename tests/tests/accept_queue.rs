//! A server that never accepts: the client's request waits in the listener's accept queue,
//! which no transfer reveals. One stall, named after the process that owns the listener, with
//! a cause that says the connection was never accepted — and it must not flap.
use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{pid, require_root, Daemon, REPORT_WITHIN};

#[test]
fn a_connection_never_accepted_is_one_steady_stall_of_the_listeners_process() {
    require_root();
    let daemon = Daemon::start("accept-queue");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .write_all(b"GET /queued HTTP/1.1\r\n\r\n\r\n")
        .unwrap();

    // Found by the periodic scan for unread requests: one scan interval on top.
    let server = daemon.wait_for_stall(port, "server", REPORT_WITHIN + Duration::from_secs(2));
    assert_eq!(server["stall"]["kind"], "unanswered_request", "{server:#}");
    assert_eq!(
        server["process"]["pid"],
        pid(),
        "the listener's owner: {server:#}"
    );
    let cause = |value: &serde_json::Value| value["stall"]["cause"].clone();
    let deadline = Instant::now() + Duration::from_secs(3);
    let server = loop {
        let server = daemon
            .stalls(port)
            .into_iter()
            .find(|s| s["conn"]["role"] == "server")
            .expect("still stalled");
        if cause(&server) == "not_accepted" || Instant::now() > deadline {
            break server;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(cause(&server), "not_accepted", "{server:#}");

    // Nothing moves: the stall stays open, started once, never ended.
    thread::sleep(Duration::from_secs(3));
    let server_events = |name: &str| {
        daemon
            .events_named(name, port)
            .into_iter()
            .filter(|e| e["conn"]["role"] == "server")
            .count()
    };
    assert_eq!(server_events("stall.start"), 1, "{:#?}", daemon.events());
    assert_eq!(server_events("stall.end"), 0, "{:#?}", daemon.events());
    drop(listener);
}
