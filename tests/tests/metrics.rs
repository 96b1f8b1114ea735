//! Prometheus metrics end to end: the daemon serves `/metrics`, a real Prometheus (Debian's
//! `prometheus`, installed by `cargo xtask test`) scrapes it with the shipped alerting rules
//! loaded, and its HTTP API must show a stall this test makes, then its end.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{require_root, send_request, Daemon, SilentServer, REPORT_WITHIN};

/// A port nobody listens on now (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 request: (status, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

/// `text` for a URL's query string.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of its own (storage in `dir`), scraping `target` every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Self {
        let alerts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: stalltrace\n    static_configs:\n      \
                 - targets: ['{target}']\n",
                alerts.display()
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting prometheus ({e}): it is Debian's `prometheus` package, which \
                     `cargo xtask test` installs"
                )
            });
        let prometheus = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http(addr, "GET", "/-/ready"), Ok((200, _, _))) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// `GET /api/v1/{path}`, which must succeed: its `data`.
    fn api(&self, path: &str) -> Value {
        let (status, _, body) = http(self.addr, "GET", &format!("/api/v1/{path}")).unwrap();
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {status} with non-JSON ({e}): {body}"));
        assert_eq!(answer["status"], "success", "{answer}");
        answer["data"].clone()
    }

    /// The value of an instant query's single series (None: no series).
    fn value(&self, query: &str) -> Option<f64> {
        let data = self.api(&format!("query?query={}", percent_encode(query)));
        let result = data["result"].as_array()?;
        assert!(result.len() <= 1, "{query}: several series {result:?}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query`'s value satisfies `good`; fails with what was seen.
    fn wait_for(&self, query: &str, good: impl Fn(f64) -> bool, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.value(query);
            if let Some(v) = value.filter(|v| good(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {query} is {value:?} after {within:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_sees_a_stall_open_then_end() {
    require_root();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let daemon = Daemon::start_with(
        "metrics",
        &[
            "--metrics-address",
            &metrics.to_string(),
            "--metrics-labels",
            "port",
        ],
    );

    // The endpoint itself: the Prometheus text format, and nothing else served.
    let (status, head, body) = http(metrics, "GET", "/metrics").unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        "# TYPE stalltrace_connections_tracked gauge",
        "# TYPE stalltrace_sweep_duration_seconds histogram",
        "stalltrace_build_info{version=\"",
        "stalltrace_stall_after_seconds 1",
        "stalltrace_lost_total{cause=\"kernel_ringbuf_full\"}",
    ] {
        assert!(body.contains(line), "{line} missing from:\n{body}");
    }
    assert_eq!(http(metrics, "GET", "/nothing").unwrap().0, 404);
    assert_eq!(http(metrics, "POST", "/metrics").unwrap().0, 405);

    let prometheus = Prometheus::start(daemon.dir(), metrics);
    prometheus.wait_for(
        "up{job=\"stalltrace\"}",
        |v| v == 1.0,
        Duration::from_secs(30),
    );
    // The shipped alerting rules loaded in a real Prometheus.
    let groups = prometheus.api("rules");
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "stalltrace" && g["rules"].as_array().unwrap().len() >= 5),
        "{groups}"
    );

    // A stall on a port of our own: the `port` label tells it from any other on the host.
    let server = SilentServer::bind("127.0.0.1");
    let client = send_request(server.addr);
    let port = server.addr.port();
    assert_eq!(
        daemon.wait_for_stalls(port, 2, REPORT_WITHIN).len(),
        2,
        "{}",
        daemon.stderr()
    );
    let open = format!("stalltrace_stalls_open{{kind=\"unanswered_request\",port=\"{port}\"}}");
    prometheus.wait_for(&open, |v| v == 1.0, Duration::from_secs(30));
    let client_open =
        format!("stalltrace_stalls_open{{kind=\"awaiting_response\",port=\"{port}\"}}");
    prometheus.wait_for(&client_open, |v| v == 1.0, Duration::from_secs(30));
    prometheus.wait_for(
        "max(stalltrace_oldest_stall_age_seconds{kind=\"unanswered_request\"})",
        |v| v >= 1.0,
        Duration::from_secs(30),
    );

    // Its end: the gauge drops, the end is counted by resolution, the duration observed.
    let held = server.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    // The client reads the answer: its stall ends too.
    let mut client = client;
    let mut answer = [0u8; 64];
    assert!(client.read(&mut answer).unwrap() > 0);
    prometheus.wait_for(&open, |v| v == 0.0, Duration::from_secs(30));
    let ended = format!(
        "stalltrace_stalls_ended_total{{kind=\"unanswered_request\",resolution=\"response\",port=\"{port}\"}}"
    );
    prometheus.wait_for(&ended, |v| v == 1.0, Duration::from_secs(30));
    let seconds = prometheus.wait_for(
        &format!(
            "stalltrace_stall_duration_seconds_sum{{kind=\"unanswered_request\",port=\"{port}\"}}"
        ),
        |v| v > 0.0,
        Duration::from_secs(30),
    );
    // The duration is the quiet stretch: about as long as the server held the request.
    let (at_least, at_most) = held.read.until(held.write);
    assert!(
        at_least.as_secs_f64() - 0.5 < seconds && seconds < at_most.as_secs_f64() + 0.5,
        "stall of {seconds} s, request held {held:?}"
    );
    prometheus.wait_for(&client_open, |v| v == 0.0, Duration::from_secs(30));
    prometheus.wait_for(
        "stalltrace_events_total{type=\"stall.end\"}",
        |v| v >= 2.0,
        Duration::from_secs(30),
    );
    drop(client);
}

#[test]
fn the_metrics_address_must_be_free() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!(
        "stalltrace-it-metrics-taken-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(stalltrace_integration::binary())
        .args(["daemon", "--metrics-address", &address, "--socket"])
        .arg(dir.join("api.sock"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("binding --metrics-address {address}")),
        "{stderr}"
    );
}

#[test]
fn clients_that_say_nothing_hold_no_thread_and_not_for_long() {
    require_root();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let daemon = Daemon::start_with("metrics-idle", &["--metrics-address", &metrics.to_string()]);
    let pid = daemon.cli_json(&["status", "-o", "json"])["pid"]
        .as_u64()
        .unwrap();
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let before = threads();
    // Far more silent connections than the endpoint serves at once (16).
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(threads(), before, "a thread per connection?");
    // They are closed within the 5 s allowed for a request's headers; scrapes work again.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !matches!(http(metrics, "GET", "/metrics"), Ok((200, _, _))) {
        assert!(
            Instant::now() < deadline,
            "no scrape answered with silent clients around"
        );
        thread::sleep(Duration::from_millis(250));
    }
    drop(idle);
    assert!(daemon.running());
}
