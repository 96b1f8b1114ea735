//! Lost kernel events, end to end: a one-page ring buffer overflows under a burst of
//! connections; what was lost is counted, lowers the confidence of stalls, and is recovered
//! from the kernel's connection map once the burst is over.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{
    pid, require_root, send_request, Daemon, SilentServer, REPORT_WITHIN,
};

const TINY_RING: [&str; 2] = ["--ring-buffer-size", "4KiB"];

/// Opens `count` connections to a fresh listener at once, then makes one exchange on each; all
/// stay open. Returns the listener's port and both ends of every connection.
fn burst_of_connections(count: usize) -> (u16, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let accepted: Vec<TcpStream> = (0..count).map(|_| listener.accept().unwrap().0).collect();
        for mut conn in &accepted {
            let mut request = [0u8; 5];
            conn.read_exact(&mut request).unwrap();
            conn.write_all(b"pong\n").unwrap();
        }
        accepted
    });
    let mut clients: Vec<TcpStream> = (0..count)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    for client in &mut clients {
        client.write_all(b"ping\n").unwrap();
    }
    for client in &mut clients {
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
    }
    clients.extend(server.join().unwrap());
    (port, clients)
}

#[test]
fn connections_whose_opening_was_lost_are_recovered() {
    require_root();
    let daemon = Daemon::start_with("recover", &TINY_RING);
    const COUNT: usize = 400;
    let (port, _streams) = burst_of_connections(COUNT);
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert!(
        status["lost"]["kernel_ringbuf_full"].as_u64().unwrap() > 0,
        "the burst must overflow the ring for this test to mean anything: {status:#}"
    );
    // The loss stops with the burst; the resynchronization follows within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let conns = loop {
        let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
        let conns = conns.as_array().unwrap().clone();
        if conns.len() >= 2 * COUNT {
            break conns;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} connections listed\n{}",
            conns.len(),
            2 * COUNT,
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(conns.len(), 2 * COUNT);
    for role in ["client", "server"] {
        let with_role: Vec<_> = conns.iter().filter(|c| c["conn"]["role"] == role).collect();
        assert_eq!(with_role.len(), COUNT, "{role}");
    }
    for conn in &conns {
        assert_eq!(conn["process"]["pid"], pid(), "{conn:#}");
        assert_eq!(conn["conn"]["exchanges"], 1, "{conn:#}");
        assert_eq!(conn["conn"]["state"], "idle", "{conn:#}");
    }
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert!(
        status["connections"]["recovered"].as_u64().unwrap() > 0,
        "{status:#}"
    );
    // The walk ran on the walker thread, in batches, and the loop reconciled what it read.
    let resync = &status["resync"];
    assert!(resync["count"].as_u64().unwrap() >= 1, "{status:#}");
    assert_eq!(resync["running"], false, "{status:#}");
    let last = &resync["last"];
    assert!(last["entries"].as_u64().unwrap() > 0, "{status:#}");
    assert_eq!(
        last["batches"], true,
        "Linux 5.6+ reads the map in batches: {status:#}"
    );
    assert_eq!(last["failed"], 0, "{status:#}");
    // The loop reports its longest turn, and what it was doing.
    let turns = &status["loop"];
    assert!(turns["turns"].as_u64().unwrap() > 0, "{status:#}");
    assert!(turns["max_blocked_us"].as_u64().unwrap() > 0, "{status:#}");
    assert!(turns["max_blocked_in"].is_string(), "{status:#}");
    let opens = daemon.events_named("conn.open", port).len();
    assert_eq!(
        opens,
        2 * COUNT,
        "every recovered connection is reported once"
    );
}

/// A connection adopted at start-up and idle since has no kernel entry: only its close record
/// says it ended. When that record is lost, the resynchronization's /proc read finds its
/// socket gone and closes it, rather than listing it for ever.
#[test]
fn an_adopted_connection_whose_close_was_lost_is_closed() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let daemon = Daemon::start_with("adopted-lost-close", &TINY_RING);
    let listed = |daemon: &Daemon| {
        let conns = daemon.cli_json(&["conns", "-o", "json", "--port", &port.to_string()]);
        conns.as_array().unwrap().len()
    };
    assert_eq!(listed(&daemon), 2, "both ends adopted");
    // The daemon stopped, a burst fills its ring; then the adopted connection closes, and its
    // close records find the ring full.
    daemon.signal(libc::SIGSTOP);
    let (_, _burst) = burst_of_connections(300);
    drop((client, server));
    thread::sleep(Duration::from_millis(200));
    daemon.signal(libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(15);
    while listed(&daemon) > 0 {
        assert!(
            Instant::now() < deadline,
            "the adopted connection is still listed 15 s after it closed\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(250));
    }
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert!(
        status["lost"]["kernel_ringbuf_full"].as_u64().unwrap() > 0,
        "the burst must overflow the ring for this test to mean anything: {status:#}"
    );
    assert_eq!(status["resync"]["last"]["adopted_closed"], 2, "{status:#}");
    let closes = daemon.events_named("conn.close", port);
    assert_eq!(closes.len(), 2, "{closes:#?}");
    for close in &closes {
        assert_eq!(close["conn"]["totals_complete"], false, "{close:#}");
    }
}

#[test]
fn lost_events_lower_the_confidence_of_a_stall() {
    require_root();
    // A one-page ring buffer overflows under a burst of connections.
    let daemon = Daemon::start_with("confidence", &TINY_RING);
    let server = SilentServer::bind("127.0.0.1");
    let _client = send_request(server.addr);
    let burst = TcpListener::bind("127.0.0.1:0").unwrap();
    let burst_addr = burst.local_addr().unwrap();
    thread::spawn(move || {
        for conn in burst.incoming() {
            drop(conn)
        }
    });
    for _ in 0..2000 {
        drop(TcpStream::connect(burst_addr));
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    let on_server = loop {
        let stalls = daemon.stalls(server.addr.port());
        let server_side = stalls
            .iter()
            .find(|s| s["conn"]["role"] == "server")
            .cloned();
        if let Some(stall) = server_side.filter(|s| s["stall"]["confidence"] == "partial") {
            break stall;
        }
        assert!(
            Instant::now() < deadline,
            "{stalls:#?}\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(on_server["stall"]["confidence_reason"]
        .as_str()
        .unwrap()
        .contains("lost"));
    let losses = daemon
        .events()
        .into_iter()
        .filter(|e| e["event"] == "loss")
        .count();
    assert!(losses > 0, "the loss itself is reported");
    server.close();
}

/// A `struct sock` address the kernel reuses after a close record was lost is told apart from
/// its predecessor by when the connection opened: that time must be exact, since connections
/// opened back to back share a tick of the coarse state clock (4 ms at 250 Hz).
#[test]
fn connections_opened_back_to_back_have_distinct_open_times() {
    require_root();
    let daemon = Daemon::start("open-times");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    const COUNT: usize = 64;
    let server = thread::spawn(move || {
        for _ in 0..COUNT {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 5];
            conn.read_exact(&mut request).unwrap();
            conn.write_all(b"pong\n").unwrap();
        }
    });
    for _ in 0..COUNT {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(b"ping\n").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
    }
    server.join().unwrap();
    let opens = daemon.wait_for_events("conn.open", port, 2 * COUNT, REPORT_WITHIN);
    let mut times: Vec<&str> = opens
        .iter()
        .filter(|e| e["conn"]["role"] == "server")
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert_eq!(times.len(), COUNT, "{opens:#?}");
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), COUNT, "accepted connections share open times");
}
