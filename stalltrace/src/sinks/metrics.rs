//! Prometheus metrics (`--metrics-address`): the event loop updates atomic counters and gauges
//! (prometheus-client), a thread of its own serves `GET /metrics` in the Prometheus text
//! format (0.0.4) with hyper. A scrape reads the counters and never waits on the loop, nor the
//! loop on it. At most [`MAX_SCRAPERS`] connections are served at once, each for at most
//! [`SCRAPE_DEADLINE`]: clients that open connections and say nothing cost neither threads nor
//! memory beyond that.
//!
//! Labels are bounded: stall kind, resolution, transport, event type, loss cause. Only
//! `--metrics-labels` adds per-process labels (`comm`, the server's `port`), capped at
//! [`MAX_EXTRA_LABEL_SETS`] distinct sets; beyond it new values are labelled `other`.
use std::{
    collections::HashSet,
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};
use stalltrace_core::{
    loss::LossCounters,
    tracker::{
        model::{Resolution, Role, StallKind},
        ConnRef,
    },
};

use crate::cli::MetricsLabel;

/// Distinct `--metrics-labels` value sets kept per daemon; more are labelled `other`.
pub const MAX_EXTRA_LABEL_SETS: usize = 500;
/// Connections to the metrics endpoint served at once; more are closed at once.
pub const MAX_SCRAPERS: usize = 16;
/// How long one connection may take (request, answer, keep-alive) before it is closed.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);

/// A stall metric's labels: `kind` and `transport`, then the opt-in ones.
pub type StallLabels = Vec<(&'static str, String)>;

/// Seconds: from a request quiet for a threshold's worth to a stall open for an hour.
const STALL_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Seconds: a sweep costs from microseconds to tens of milliseconds (20 000 reads).
const SWEEP_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];
/// Seconds: a turn of the event loop, from microseconds (a drain) to whatever blocked it.
const LOOP_TURN_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The daemon's metrics: handles to atomic counters, updated on the event loop.
pub struct Metrics {
    registry: Arc<Registry>,
    extra: Vec<MetricsLabel>,
    extra_seen: HashSet<(Option<String>, Option<u16>)>,
    open_stalls: Family<StallLabels, Gauge>,
    stall_starts: Family<StallLabels, Counter>,
    stall_ends: Family<StallLabels, Counter>,
    stall_seconds: Family<StallLabels, Histogram>,
    stalls_ignored: Family<StallLabels, Counter>,
    stalls_below_rule: Family<StallLabels, Counter>,
    connections: Gauge,
    kernel_records: Counter,
    /// `events_total` by type, resolved once: counting an event is one atomic add.
    events: [(&'static str, Counter); 6],
    lost: Family<Vec<(&'static str, String)>, Counter>,
    /// Loss counters as of the last update (the metric counts the difference).
    lost_seen: LossCounters,
    sweep_seconds: Histogram,
    loop_turn_seconds: Histogram,
    ring_fill: Gauge<f64, std::sync::atomic::AtomicU64>,
    stall_after: Gauge<f64, std::sync::atomic::AtomicU64>,
    rules: Gauge,
    oldest: Family<Vec<(&'static str, &'static str)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Metrics {
    /// Metrics with `extra` opt-in labels on the stall metrics; `ring_buffer_bytes` and
    /// `stall_after` describe the configuration.
    pub fn new(extra: &[MetricsLabel], ring_buffer_bytes: u32) -> Self {
        let mut registry = Registry::with_prefix("stalltrace");
        let open_stalls = Family::<StallLabels, Gauge>::default();
        registry.register(
            "stalls_open",
            "Stalls open now (reported, not ignored by a rule), by kind",
            open_stalls.clone(),
        );
        let stall_starts = Family::<StallLabels, Counter>::default();
        registry.register(
            "stalls_started",
            "Stalls reported (stall.start events), by kind",
            stall_starts.clone(),
        );
        let stall_ends = Family::<StallLabels, Counter>::default();
        registry.register(
            "stalls_ended",
            "Reported stalls that ended (stall.end events), by kind and resolution",
            stall_ends.clone(),
        );
        let stall_seconds = Family::<StallLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(STALL_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "stall_duration_seconds",
            "Duration of ended stalls, from the start of the quiet stretch to its end",
            stall_seconds.clone(),
        );
        let stalls_ignored = Family::<StallLabels, Counter>::default();
        registry.register(
            "stalls_ignored",
            "Stalls a rule with ignore = true kept out of events and listings",
            stalls_ignored.clone(),
        );
        let stalls_below_rule = Family::<StallLabels, Counter>::default();
        registry.register(
            "stalls_below_rule_threshold",
            "Quiet stretches that ended before the stall_after of their rule (not reported)",
            stalls_below_rule.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections_tracked",
            "TCP connections tracked (both ends of a local connection count)",
            connections.clone(),
        );
        let kernel_records = Counter::default();
        registry.register(
            "kernel_records",
            "Records read from the kernel's ring buffer",
            kernel_records.clone(),
        );
        let events_family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        registry.register("events", "Events emitted, by type", events_family.clone());
        let events = [
            "conn.open",
            "conn.close",
            "stall.start",
            "stall.update",
            "stall.end",
            "loss",
        ]
        .map(|name| {
            (
                name,
                events_family.get_or_create_owned(&vec![("type", name)]),
            )
        });
        let lost = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "lost",
            "Things lost (events, connections, samples), by cause (docs/events.md, loss)",
            lost.clone(),
        );
        let sweep_seconds = Histogram::new(SWEEP_BUCKETS);
        registry.register(
            "sweep_duration_seconds",
            "Time the event loop spent in each sweep of the watched connections",
            sweep_seconds.clone(),
        );
        let loop_turn_seconds = Histogram::new(LOOP_TURN_BUCKETS);
        registry.register(
            "loop_turn_duration_seconds",
            "Time each turn of the event loop kept it from everything else (ring buffer, API)",
            loop_turn_seconds.clone(),
        );
        let ring_fill = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "ring_buffer_fill_ratio",
            "Largest share of the kernel ring buffer found filled at a drain over the last \
             second (1: full, events are being lost)",
            ring_fill.clone(),
        );
        let ring_size: Gauge = Gauge::default();
        ring_size.set(i64::from(ring_buffer_bytes));
        registry.register(
            "ring_buffer_size_bytes",
            "Size of the kernel ring buffer",
            ring_size,
        );
        let stall_after = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "stall_after_seconds",
            "The stall threshold of stalls no rule sets another for",
            stall_after.clone(),
        );
        let oldest = Family::<_, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "oldest_stall_age_seconds",
            "How long the oldest open stall of each kind has been quiet (0: none open)",
            oldest.clone(),
        );
        let rules = Gauge::default();
        registry.register("rules", "Rules loaded from --config", rules.clone());
        registry.register(
            "build",
            "The daemon's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Without opt-in labels every series is known: export them at zero from the start,
        // so that queries and alerts see 0, not nothing, until a stall comes.
        if extra.is_empty() {
            for kind in StallKind::ALL {
                let labels = vec![
                    ("kind", kind.as_str().to_owned()),
                    ("transport", "tcp".to_owned()),
                ];
                open_stalls.get_or_create(&labels).set(0);
                stall_starts.get_or_create(&labels).inc_by(0);
                oldest
                    .get_or_create(&vec![("kind", kind.as_str())])
                    .set(0.0);
            }
        }
        Self {
            registry: Arc::new(registry),
            extra: extra.to_vec(),
            extra_seen: HashSet::new(),
            open_stalls,
            stall_starts,
            stall_ends,
            stall_seconds,
            stalls_ignored,
            stalls_below_rule,
            connections,
            kernel_records,
            events,
            lost,
            lost_seen: LossCounters::default(),
            sweep_seconds,
            loop_turn_seconds,
            ring_fill,
            stall_after,
            rules,
            oldest,
        }
    }

    /// Serves `GET /metrics` on `listener` from a thread of its own (with a runtime of its
    /// own), until the process ends.
    pub fn serve(&self, listener: TcpListener) -> Result<SocketAddr> {
        let address = listener.local_addr()?;
        listener
            .set_nonblocking(true)
            .context("setting the metrics socket non-blocking")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the metrics runtime")?;
        let registry = self.registry.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || runtime.block_on(serve_scrapes(listener, registry)))
            .context("starting the metrics thread")?;
        Ok(address)
    }

    /// The labels of a stall of `kind` on `conn`, with the opt-in ones.
    pub fn stall_labels(&mut self, kind: StallKind, conn: &ConnRef) -> StallLabels {
        let mut labels = vec![
            ("kind", kind.as_str().to_owned()),
            ("transport", conn.endpoints.transport.as_str().to_owned()),
        ];
        if self.extra.is_empty() {
            return labels;
        }
        let comm = self
            .extra
            .contains(&MetricsLabel::Comm)
            .then(|| conn.owner.comm.as_str().into_owned());
        let service_port = match conn.role {
            Role::Server => conn.endpoints.local_port,
            Role::Client => conn.endpoints.peer_port,
        };
        let port = self
            .extra
            .contains(&MetricsLabel::Port)
            .then_some(service_port);
        let key = (comm, port);
        let known = self.extra_seen.contains(&key);
        if !known && self.extra_seen.len() < MAX_EXTRA_LABEL_SETS {
            self.extra_seen.insert(key.clone());
        }
        let bounded = known || self.extra_seen.contains(&key);
        if let Some(comm) = key.0 {
            labels.push(("comm", if bounded { comm } else { "other".into() }));
        }
        if let Some(port) = key.1 {
            labels.push((
                "port",
                if bounded {
                    port.to_string()
                } else {
                    "other".into()
                },
            ));
        }
        labels
    }

    pub fn stall_started(&self, labels: &StallLabels) {
        self.stall_starts.get_or_create(labels).inc();
        self.open_stalls.get_or_create(labels).inc();
    }

    /// A reported stall ended after `duration_ms`.
    pub fn stall_ended(&self, labels: &StallLabels, resolution: Resolution, duration_ms: u64) {
        self.open_stalls.get_or_create(labels).dec();
        let mut with_resolution = labels.clone();
        with_resolution.push(("resolution", resolution.as_str().to_owned()));
        self.stall_ends.get_or_create(&with_resolution).inc();
        self.stall_seconds
            .get_or_create(labels)
            .observe(duration_ms as f64 / 1000.0);
    }

    pub fn stall_ignored(&self, labels: &StallLabels) {
        self.stalls_ignored.get_or_create(labels).inc();
    }

    pub fn stall_below_rule(&self, labels: &StallLabels) {
        self.stalls_below_rule.get_or_create(labels).inc();
    }

    /// An event of type `name` was emitted (one of docs/events.md's).
    pub fn event(&self, name: &str) {
        if let Some((_, counter)) = self.events.iter().find(|(n, _)| *n == name) {
            counter.inc();
        }
    }

    pub fn kernel_records(&self, n: u64) {
        self.kernel_records.inc_by(n);
    }

    pub fn sweep(&self, took: Duration) {
        self.sweep_seconds.observe(took.as_secs_f64());
    }

    pub fn loop_turn(&self, took: Duration) {
        self.loop_turn_seconds.observe(took.as_secs_f64());
    }

    /// Once a second: connections tracked, losses by cause, the ring buffer's fill.
    pub fn update(&mut self, tracked: usize, loss: &LossCounters, ring_fill: f64) {
        self.connections.set(tracked as i64);
        self.ring_fill.set(ring_fill);
        let new = loss.since(&self.lost_seen);
        self.lost_seen = *loss;
        if let Ok(serde_json::Value::Object(causes)) = serde_json::to_value(new) {
            for (cause, count) in causes {
                let count = count.as_u64().unwrap_or(0);
                // Every cause is exported, at zero too: `rate()` needs the series to exist.
                self.lost
                    .get_or_create(&vec![("cause", cause)])
                    .inc_by(count);
            }
        }
    }

    /// How long the oldest open stall of each kind has been quiet (s).
    pub fn oldest(&self, ages: &[(StallKind, f64)]) {
        for (kind, age) in ages {
            self.oldest
                .get_or_create(&vec![("kind", kind.as_str())])
                .set(*age);
        }
    }

    /// The configuration that may change on reload.
    pub fn configured(&self, stall_after: Duration, rules: usize) {
        self.stall_after.set(stall_after.as_secs_f64());
        self.rules.set(rules as i64);
    }

    /// The text a scrape gets (for tests).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// Accepts scrapes until the process ends.
async fn serve_scrapes(listener: TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            log::error!("metrics: cannot serve: {err}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::debug!("metrics: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = respond(&registry, &request);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(SCRAPE_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// The answer to one HTTP request: the metrics at `/metrics`, a pointer to them at `/`.
fn respond<B>(registry: &Registry, request: &hyper::Request<B>) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut text = String::new();
            match prometheus_text::encode(&mut text, registry) {
                Ok(()) => (StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding metrics: {err}\n"),
                ),
            }
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        ),
        (_, "/") => (
            StatusCode::OK,
            "text/plain",
            "stalltrace: metrics at /metrics (Prometheus text format)\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at /metrics\n".into(),
        ),
    };
    let mut response = hyper::Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds the metrics address (before privileges are dropped: ports below 1024 need root).
pub fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address).with_context(|| {
        format!("binding --metrics-address {address} (in use by another process, or not an address of this host?)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stalltrace_core::tracker::model::{Comm, Endpoints, Owner, Transport};

    fn conn(comm: &str, role: Role, local_port: u16) -> ConnRef {
        ConnRef {
            id: 1,
            role,
            owner: Owner {
                pid: 10,
                tid: 10,
                comm: Comm::new(comm),
                cgroup_id: 0,
            },
            endpoints: Endpoints {
                transport: Transport::Tcp,
                local: "127.0.0.1".parse().unwrap(),
                local_port,
                peer: "127.0.0.1".parse().unwrap(),
                peer_port: 6379,
                netns: 0,
            },
            unix: None,
        }
    }

    #[test]
    fn stalls_are_counted_by_kind_and_resolution() {
        let mut metrics = Metrics::new(&[], 4096);
        let labels = metrics.stall_labels(StallKind::AwaitingResponse, &conn("a", Role::Client, 1));
        metrics.stall_started(&labels);
        metrics.stall_started(&labels);
        metrics.stall_ended(&labels, Resolution::Reset, 2500);
        metrics.update(
            7,
            &LossCounters {
                kernel_ringbuf_full: 3,
                ..LossCounters::default()
            },
            0.25,
        );
        let text = metrics.encode();
        for line in [
            "stalltrace_stalls_open{kind=\"awaiting_response\",transport=\"tcp\"} 1",
            "stalltrace_stalls_started_total{kind=\"awaiting_response\",transport=\"tcp\"} 2",
            "stalltrace_stalls_ended_total{kind=\"awaiting_response\",transport=\"tcp\",resolution=\"reset\"} 1",
            "stalltrace_stall_duration_seconds_bucket{kind=\"awaiting_response\",transport=\"tcp\",le=\"1\"} 0",
            "stalltrace_stall_duration_seconds_bucket{kind=\"awaiting_response\",transport=\"tcp\",le=\"2.5\"} 1",
            "stalltrace_connections_tracked 7",
            "stalltrace_lost_total{cause=\"kernel_ringbuf_full\"} 3",
            "stalltrace_lost_total{cause=\"output_blocked\"} 0",
            "stalltrace_ring_buffer_fill_ratio 0.25",
            "stalltrace_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Counted from the difference: a second update with the same totals adds nothing.
        metrics.update(
            7,
            &LossCounters {
                kernel_ringbuf_full: 3,
                ..LossCounters::default()
            },
            0.0,
        );
        assert!(metrics
            .encode()
            .contains("stalltrace_lost_total{cause=\"kernel_ringbuf_full\"} 3"));
    }

    #[test]
    fn opt_in_labels_are_bounded() {
        let mut metrics = Metrics::new(&[MetricsLabel::Comm, MetricsLabel::Port], 4096);
        let server = metrics.stall_labels(
            StallKind::UnansweredRequest,
            &conn("api", Role::Server, 8080),
        );
        assert!(server.contains(&("comm", "api".into())));
        assert!(server.contains(&("port", "8080".into())));
        // A client is labelled with the port it calls, not its ephemeral one.
        let client =
            metrics.stall_labels(StallKind::AwaitingResponse, &conn("w", Role::Client, 40000));
        assert!(client.contains(&("port", "6379".into())));
        for n in 0..MAX_EXTRA_LABEL_SETS as u16 {
            metrics.stall_labels(StallKind::UnansweredRequest, &conn("x", Role::Server, n));
        }
        let late =
            metrics.stall_labels(StallKind::UnansweredRequest, &conn("late", Role::Server, 9));
        assert!(late.contains(&("comm", "other".into())), "{late:?}");
        // Sets seen before the cap keep their values.
        let again = metrics.stall_labels(
            StallKind::UnansweredRequest,
            &conn("api", Role::Server, 8080),
        );
        assert_eq!(again, server);
    }
}
