//! Blame chains through an event-loop proxy: the proxy's thread waits in epoll on everything
//! at once, so there is no fd to follow from its stalled inbound request to the upstream
//! request it waits on. The chain must still reach the silent upstream, and healthy requests
//! through the same proxy must never be blamed.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{
    daemon_dir, free_port, require_root, start_haproxy, start_nginx, Daemon, Terminated,
    REPORT_WITHIN,
};

/// A one-thread asyncio HTTP proxy: `/slow…` goes to the first upstream, the rest to the
/// second; one upstream connection per request.
const PROXY: &str = r#"
import asyncio, sys
slow, fast = int(sys.argv[1]), int(sys.argv[2])

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            port = slow if head.split(b" ")[1].startswith(b"/slow") else fast
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            up_writer.write(head)
            await up_writer.drain()
            reply = await up_reader.read(65536)
            up_writer.close()
            writer.write(reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

/// An upstream that reads each request and never answers.
fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut request = [0u8; 512];
            let _ = conn.read(&mut request);
            held.push(conn);
        }
    });
    addr
}

/// An upstream that answers each request at once.
fn fast_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut request = [0u8; 512];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    addr
}

fn get(proxy: SocketAddr, path: &str) -> TcpStream {
    let mut conn = TcpStream::connect(proxy).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n").as_bytes())
        .unwrap();
    conn
}

#[test]
fn an_asyncio_proxy_stall_is_blamed_on_its_upstream_never_on_healthy_requests() {
    require_root();
    let daemon = Daemon::start("blame-asyncio");
    let (slow, fast) = (silent_upstream(), fast_upstream());
    let (_proxy, proxy) = asyncio_proxy(slow, fast);
    check_chain(&daemon, proxy, slow, fast);
}

#[test]
fn an_nginx_stall_is_blamed_on_its_upstream_with_and_without_keepalive() {
    require_root();
    let daemon = Daemon::start("blame-nginx");
    for keepalive in [true, false] {
        let (slow, fast) = (silent_upstream(), fast_upstream());
        let (_nginx, proxy) = nginx(&daemon, slow, fast, keepalive);
        check_chain(&daemon, proxy, slow, fast);
    }
}

/// client → nginx → an asyncio app → a database that never answers: the client's stall is
/// chained hop by hop to the database's side, through two event loops.
#[test]
fn a_chain_crosses_every_hop_to_the_root() {
    require_root();
    let daemon = Daemon::start("blame-hops");
    let (database, fast) = (silent_upstream(), fast_upstream());
    let (_app, app) = asyncio_proxy(database, fast);
    let (_nginx, edge) = nginx(&daemon, app, fast, true);
    let client = get(edge, "/slow/checkout");
    let local = client.local_addr().unwrap();
    let reaches_the_database = |e: &Value| {
        e["conn"]["role"] == "client"
            && e["network"]["local"]["port"] == local.port()
            && e["stall"]["blame"]
                .as_array()
                .and_then(|b| b.last())
                .is_some_and(|root| root["local"] == database.to_string())
    };
    let found = daemon
        .wait_for_event(
            "stall.start",
            local.port(),
            REPORT_WITHIN,
            reaches_the_database,
        )
        .or_else(|| {
            daemon.wait_for_event(
                "stall.update",
                local.port(),
                REPORT_WITHIN,
                reaches_the_database,
            )
        })
        .unwrap_or_else(|| {
            panic!(
                "no chain from the client to the database: {:#?}",
                daemon.events_named("stall.start", local.port())
            )
        });
    let blame = found["stall"]["blame"].as_array().unwrap();
    let hops: Vec<(&str, &str)> = blame
        .iter()
        .skip(1)
        .map(|l| {
            (
                l["evidence"].as_str().unwrap(),
                l["local"].as_str().unwrap(),
            )
        })
        .collect();
    let (edge, app, database) = (edge.to_string(), app.to_string(), database.to_string());
    // client → (peer) nginx's inbound → (timing+signature) nginx → app → (peer) the app's
    // inbound → (timing+signature) the app → database → (peer) the database's side.
    assert_eq!(blame.len(), 6, "{blame:#?}");
    assert_eq!(hops[0], ("peer", edge.as_str()), "{blame:#?}");
    assert_eq!(hops[1].0, "timing+signature", "{blame:#?}");
    assert_eq!(blame[2]["peer"], app, "{blame:#?}");
    assert_eq!(hops[2], ("peer", app.as_str()), "{blame:#?}");
    assert_eq!(hops[3].0, "timing+signature", "{blame:#?}");
    assert_eq!(blame[4]["peer"], database, "{blame:#?}");
    assert_eq!(hops[4], ("peer", database.as_str()), "{blame:#?}");
    assert!(
        blame.iter().all(|l| l["stall"].is_string()),
        "every link is stalled: {blame:#?}"
    );
}

/// Starts the asyncio proxy in front of `slow` and `fast`.
fn asyncio_proxy(slow: SocketAddr, fast: SocketAddr) -> (Terminated, SocketAddr) {
    let mut child = Command::new("python3")
        .args([
            "-c",
            PROXY,
            &slow.port().to_string(),
            &fast.port().to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the asyncio proxy");
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let addr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    (Terminated(child), addr)
}

/// Starts nginx in front of `slow` (paths under /slow/) and `fast`, with a pool of
/// keep-alive connections to them or a new connection per request.
fn nginx(
    daemon: &Daemon,
    slow: SocketAddr,
    fast: SocketAddr,
    keepalive: bool,
) -> (Terminated, SocketAddr) {
    let proxy = free_port();
    let dir = daemon_dir(daemon, &format!("nginx-{}", proxy.port()));
    let pool = if keepalive { "keepalive 4;" } else { "" };
    let reuse = if keepalive {
        "proxy_http_version 1.1; proxy_set_header Connection \"\";"
    } else {
        ""
    };
    let http = format!(
        "upstream slow {{ server {slow}; {pool} }}
         upstream fast {{ server {fast}; {pool} }}
         server {{
           listen {proxy};
           location /slow/ {{ proxy_pass http://slow; proxy_read_timeout 60s; {reuse} }}
           location / {{ proxy_pass http://fast; {reuse} }}
         }}"
    );
    let nginx = start_nginx(&dir, proxy, &http);
    (nginx, proxy)
}

#[test]
fn an_haproxy_stall_is_blamed_on_its_upstream() {
    require_root();
    let daemon = Daemon::start("blame-haproxy");
    let (slow, fast) = (silent_upstream(), fast_upstream());
    let proxy = free_port();
    let dir = daemon_dir(&daemon, "haproxy");
    let config = format!(
        "global
           nbthread 2
         defaults
           mode http
           timeout connect 5s
           timeout client 60s
           timeout server 60s
         frontend shop
           bind {proxy}
           use_backend slow if {{ path_beg /slow/ }}
           default_backend fast
         backend slow
           server slow {slow}
         backend fast
           server fast {fast}
"
    );
    let _haproxy = start_haproxy(&dir, proxy, &config);
    check_chain(&daemon, proxy, slow, fast);
}

/// Healthy requests through `proxy` to `fast` around one request to `slow`, which never
/// answers: the proxy's inbound stall must chain to the silent upstream, and no chain may
/// name a healthy request's connection.
fn check_chain(daemon: &Daemon, proxy: SocketAddr, slow: SocketAddr, fast: SocketAddr) {
    let healthy = thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(3);
        let mut answered = 0;
        while Instant::now() < until {
            let mut conn = get(proxy, "/cart");
            let mut reply = [0u8; 64];
            if conn.read(&mut reply).unwrap_or(0) > 0 {
                answered += 1;
            }
            thread::sleep(Duration::from_millis(10));
        }
        answered
    });
    thread::sleep(Duration::from_millis(300));
    let _stuck = get(proxy, "/slow/checkout");
    let answered = healthy.join().unwrap();
    assert!(answered > 20, "healthy traffic flowed: {answered} answers");

    let chained = |e: &Value| {
        e["conn"]["role"] == "server"
            && e["stall"]["blame"].as_array().is_some_and(|b| b.len() >= 3)
    };
    let found = daemon
        .wait_for_event("stall.start", proxy.port(), REPORT_WITHIN, chained)
        .or_else(|| daemon.wait_for_event("stall.update", proxy.port(), REPORT_WITHIN, chained))
        .unwrap_or_else(|| {
            panic!(
                "no chain from the proxy: {:#?}\n{}",
                daemon.events_named("stall.start", proxy.port()),
                daemon.stderr()
            )
        });
    let blame = found["stall"]["blame"].as_array().unwrap();
    // The proxy's inbound connection…
    assert_eq!(blame[0]["local"], proxy.to_string(), "{blame:#?}");
    // …waits on its outbound connection to the silent upstream, found by timing and the
    // request's signature (there is no fd to follow: the proxy waits in epoll)…
    assert_eq!(blame[1]["role"], "client", "{blame:#?}");
    assert_eq!(blame[1]["peer"], slow.to_string(), "{blame:#?}");
    assert_eq!(blame[1]["evidence"], "timing+signature", "{blame:#?}");
    assert_eq!(blame[1]["stall"], "awaiting_response", "{blame:#?}");
    // …whose other end is the upstream's server side, which never answered.
    assert_eq!(blame[2]["local"], slow.to_string(), "{blame:#?}");
    assert_eq!(blame[2]["evidence"], "peer", "{blame:#?}");
    assert_eq!(blame.len(), 3, "{blame:#?}");

    // No chain anywhere ever names a healthy request's connection.
    for event in daemon.events() {
        for link in event["stall"]["blame"].as_array().into_iter().flatten() {
            for end in ["local", "peer"] {
                assert_ne!(
                    link[end],
                    fast.to_string(),
                    "healthy request blamed: {event:#}"
                );
            }
        }
    }
}
