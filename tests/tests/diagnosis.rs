//! "Why is it stalled?" end to end: thread verdicts with stacks, request signatures, blame
//! chains, unread requests and `why`, against the real daemon and real sockets.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{pid, require_root, with_role, Daemon, REPORT_WITHIN};

/// Loops on the CPU until `stop`: arithmetic only, no calls in the hot loop, so that samples
/// land in this function even in a debug build.
#[inline(never)]
fn spin_on_coupon(stop: &AtomicBool) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        let mut i: u32 = 0;
        while i < 1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            i += 1;
        }
        if stop.load(Ordering::Relaxed) {
            return x;
        }
    }
}

#[test]
fn spinning_server_thread_is_named_with_its_stack_and_request() {
    require_root();
    let daemon = Daemon::start("spinning");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = mpsc::channel();
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u64).unwrap();
            let mut request = [0u8; 256];
            let _ = conn.read(&mut request).unwrap();
            spin_on_coupon(&stop);
        })
    };
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .write_all(b"GET /coupon/apply?code=XMAS HTTP/1.1\r\nHost: shop\r\n\r\n")
        .unwrap();
    let server_tid = tid_rx.recv().unwrap();

    let start = daemon
        .wait_for_event("stall.start", port, REPORT_WITHIN, |e| {
            e["conn"]["role"] == "server"
        })
        .unwrap_or_else(|| panic!("no server stall:\n{}", daemon.stderr()));
    let stall = &start["stall"];
    assert_eq!(stall["kind"], "unanswered_request", "{start:#}");
    assert_eq!(
        stall["request"]["signature"], "GET /coupon/apply",
        "{start:#}"
    );
    assert_eq!(stall["request"]["protocol"], "http");
    assert!(
        stall["request"].get("raw_hex").is_none(),
        "raw bytes only with --capture-raw"
    );
    assert_eq!(stall["cause"], "read_no_reply", "{start:#}");
    assert_eq!(stall["thread"]["id"], server_tid, "{start:#}");
    assert_eq!(stall["thread"]["verdict"], "spinning", "{start:#}");
    assert!(
        stall["thread"]["cpu_share"].as_f64().unwrap() >= 0.5,
        "{start:#}"
    );

    // The stack comes from perf sampling started at the stall: in a stall.update.
    let update = daemon
        .wait_for_event("stall.update", port, Duration::from_secs(6), |e| {
            e["stall"]["thread"]["stack"].is_array()
        })
        .unwrap_or_else(|| panic!("no stack reported:\n{}", daemon.stderr()));
    let stack: Vec<&str> = update["stall"]["thread"]["stack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        stack[0].ends_with("spin_on_coupon"),
        "the innermost frame names the loop: {stack:?}"
    );

    // The same through the CLI: stalls (JSON) and show (table).
    let stalls = daemon.stalls(port);
    let on_server = with_role(&stalls, "server");
    assert_eq!(on_server["stall"]["thread"]["verdict"], "spinning");
    let id = on_server["conn"]["id"].as_u64().unwrap().to_string();
    let show = daemon.cli(&["show", &id]);
    let show = String::from_utf8(show.stdout).unwrap();
    assert!(
        show.contains("spinning") && show.contains("spin_on_coupon"),
        "{show}"
    );
    assert!(show.contains("GET /coupon/apply"), "{show}");

    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// An upstream that reads one request and never answers.
fn silent_upstream() -> (SocketAddr, mpsc::Receiver<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (peer_tx, peer_rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        peer_tx.send(peer).unwrap();
        let mut buf = [0u8; 256];
        let _ = conn.read(&mut buf);
        thread::sleep(Duration::from_secs(60));
    });
    (addr, peer_rx)
}

#[test]
fn proxy_stall_blames_the_silent_upstream() {
    require_root();
    let daemon = Daemon::start("blame");
    let (upstream, upstream_peer) = silent_upstream();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let (proxy_side_tx, proxy_side) = mpsc::channel();
    thread::spawn(move || {
        let (mut inbound, _) = proxy.accept().unwrap();
        let mut request = [0u8; 256];
        let n = inbound.read(&mut request).unwrap();
        let mut outbound = TcpStream::connect(upstream).unwrap();
        proxy_side_tx.send(outbound.local_addr().unwrap()).unwrap();
        outbound.write_all(&request[..n]).unwrap();
        let mut reply = [0u8; 256];
        let _ = outbound.read(&mut reply); // blocks: the upstream never answers
        let _ = inbound.write_all(&reply);
    });
    let mut client = TcpStream::connect(proxy_addr).unwrap();
    client.write_all(b"GET /checkout HTTP/1.1\r\n\r\n").unwrap();
    let proxy_to_upstream = proxy_side.recv().unwrap();
    assert_eq!(upstream_peer.recv().unwrap(), proxy_to_upstream);

    // The inbound stall on the proxy (server side of the client's connection).
    let start = daemon
        .wait_for_event("stall.start", proxy_addr.port(), REPORT_WITHIN, |e| {
            e["conn"]["role"] == "server"
                && e["stall"]["blame"].as_array().is_some_and(|b| b.len() >= 3)
        })
        .or_else(|| {
            // The chain may complete in a later update, once every stall is open.
            daemon.wait_for_event("stall.update", proxy_addr.port(), REPORT_WITHIN, |e| {
                e["conn"]["role"] == "server"
                    && e["stall"]["blame"].as_array().is_some_and(|b| b.len() >= 3)
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no blame chain: {:#?}\n{}",
                daemon.events_named("stall.start", proxy_addr.port()),
                daemon.stderr()
            )
        });
    let blame = start["stall"]["blame"].as_array().unwrap();
    // Symptom first: the proxy's inbound connection…
    assert_eq!(blame[0]["conn"], start["conn"]["id"]);
    assert_eq!(blame[0]["local"], proxy_addr.to_string());
    // …waits on the proxy's connection to the upstream (its thread is blocked reading it)…
    assert_eq!(blame[1]["role"], "client", "{blame:#?}");
    assert_eq!(
        blame[1]["local"],
        proxy_to_upstream.to_string(),
        "{blame:#?}"
    );
    assert_eq!(blame[1]["peer"], upstream.to_string(), "{blame:#?}");
    assert!(
        blame[1]["via"].as_str().unwrap().contains("blocked in"),
        "{blame:#?}"
    );
    // …whose peer is the upstream's server side: the root, unanswered.
    assert_eq!(blame[2]["role"], "server", "{blame:#?}");
    assert_eq!(blame[2]["local"], upstream.to_string(), "{blame:#?}");
    assert_eq!(blame[2]["pid"], pid(), "{blame:#?}");
    assert_eq!(blame[2]["via"], "peer", "{blame:#?}");
    assert_eq!(blame.len(), 3, "{blame:#?}");
}

#[test]
fn request_nobody_reads_is_request_unread() {
    request_nobody_reads_is_flagged(false);
}

/// The client sent its request and its FIN (`shutdown(SHUT_WR)`): the server's socket is in
/// `CLOSE_WAIT` and still owes the reply. Up to 2026-12-01 the scan read established sockets
/// only, and this stall was never flagged.
#[test]
fn a_half_closed_request_nobody_reads_is_request_unread() {
    request_nobody_reads_is_flagged(true);
}

fn request_nobody_reads_is_flagged(half_closed: bool) {
    require_root();
    // A name of its own: the two variants may run at once.
    let daemon = Daemon::start(if half_closed {
        "unread-half-closed"
    } else {
        "unread"
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted) = mpsc::channel();
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        accepted_tx.send(()).unwrap();
        thread::sleep(Duration::from_secs(60)); // accepts, never reads
        drop(conn);
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    accepted.recv().unwrap();
    client.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    if half_closed {
        client.shutdown(std::net::Shutdown::Write).unwrap();
    }

    // Found by the periodic sock_diag scan: allow one scan interval on top.
    let on_server = daemon.wait_for_stall(port, "server", REPORT_WITHIN + Duration::from_secs(2));
    assert_eq!(on_server["stall"]["kind"], "unanswered_request");
    assert_eq!(
        on_server["stall"]["cause"], "request_unread",
        "{on_server:#}"
    );
    assert_eq!(on_server["stall"]["tcp"]["recv_queue"], 14, "{on_server:#}");
    assert_eq!(
        on_server["process"]["pid"],
        pid(),
        "the owner comes from /proc: {on_server:#}"
    );
}

/// A keep-alive connection's second request, never read: its stall names no request (the
/// kernel's copy is the first one's, answered long ago), where it once named the first.
#[test]
fn a_request_nobody_reads_after_an_answered_one_is_not_named_after_it() {
    require_root();
    let daemon = Daemon::start("unread-second");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 64];
        let read = conn.read(&mut request).unwrap();
        assert!(request[..read].starts_with(b"GET /answered"));
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
        thread::sleep(Duration::from_secs(60)); // never reads again
        drop(conn);
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .write_all(b"GET /answered HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = [0u8; 64];
    let _ = client.read(&mut response).unwrap();
    client
        .write_all(b"GET /never-read HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let on_server = daemon.wait_for_stall(port, "server", REPORT_WITHIN + Duration::from_secs(2));
    assert_eq!(
        on_server["stall"]["cause"], "request_unread",
        "{on_server:#}"
    );
    let signature = on_server["stall"]["request"]["signature"].to_string();
    assert!(
        !signature.contains("/answered"),
        "named after the request before it: {on_server:#}"
    );
    let on_client = daemon.wait_for_stall(port, "client", REPORT_WITHIN);
    assert!(
        on_client["stall"]["request"]["signature"]
            .to_string()
            .contains("/never-read"),
        "{on_client:#}"
    );
}

/// A small HTTP/1.1 keep-alive server: answers everything at once, except `/coupon/apply`,
/// which it never answers.
fn shop_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    // Skip the headers.
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    if line.contains("/coupon/apply") {
                        thread::sleep(Duration::from_secs(60));
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if writer.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `path` on a keep-alive connection and reads the 2-byte answer.
fn get(conn: &mut TcpStream, path: &str) {
    // One write per request, as HTTP clients do.
    let request = format!("GET {path}?session=42 HTTP/1.1\r\nHost: shop\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut reply = [0u8; 40];
    let mut read = 0;
    while read < 40 {
        read += conn.read(&mut reply[read..]).unwrap();
    }
}

#[test]
fn why_ranks_the_path_that_stalls_first() {
    require_root();
    let daemon = Daemon::start("why");
    let shop = shop_server();
    // Healthy traffic on keep-alive connections for a few sweeps.
    let workers: Vec<_> = ["/cart", "/products", "/cart/items"]
        .into_iter()
        .map(|path| {
            thread::spawn(move || {
                let mut conn = TcpStream::connect(shop).unwrap();
                let until = Instant::now() + Duration::from_millis(2500);
                while Instant::now() < until {
                    get(&mut conn, path);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    // And two requests on the path that hangs.
    let mut stuck: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut conn = TcpStream::connect(shop).unwrap();
            get(&mut conn, "/cart");
            conn.write_all(b"GET /coupon/apply?code=XMAS HTTP/1.1\r\nHost: shop\r\n\r\n")
                .unwrap();
            conn
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let _ = daemon.wait_for_stalls(shop.port(), 4, REPORT_WITHIN);

    let rows = daemon.cli_json(&["why", "-o", "json", "--port", &shop.port().to_string()]);
    let rows = rows.as_array().unwrap();
    let top = &rows[0];
    assert_eq!(top["signature"], "GET /coupon/apply", "{rows:#?}");
    assert!(top["stalls"].as_u64().unwrap() >= 2, "{rows:#?}");
    // Shares are of every stall on the host, and the tests running alongside stall too: compare
    // with this server's stalls only.
    let stalls_here: u64 = rows.iter().filter_map(|r| r["stalls"].as_u64()).sum();
    assert!(
        top["stalls"].as_u64().unwrap() as f64 >= 0.4 * stalls_here as f64,
        "{rows:#?}"
    );
    assert!(top["stall_share"].as_f64().unwrap() > 0.0, "{rows:#?}");
    let healthy = rows
        .iter()
        .find(|r| r["signature"] == "GET /cart" && r["role"] == "server")
        .unwrap_or_else(|| panic!("no GET /cart group: {rows:#?}"));
    assert!(healthy["completed"].as_u64().unwrap() >= 2, "{rows:#?}");
    assert!(healthy["p99_ms"].as_f64().is_some(), "{rows:#?}");
    assert_eq!(healthy["stalls"], 0, "{rows:#?}");

    let table = daemon.cli(&["why", "--port", &shop.port().to_string()]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("GET /coupon/apply accounts for"), "{table}");
    stuck.clear();
}
