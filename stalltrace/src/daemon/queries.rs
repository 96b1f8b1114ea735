//! Answers to API queries: status, conns, stalls, show, why. Read-only views of the daemon's
//! state, serialized in the shapes of docs/api.md.
use serde_json::json;
use stalltrace_common::{conn_flags, message::proto, tcp_state, ConnState};

use stalltrace_core::{
    api::{
        schema::{self as json, ConnItemJson, ProtocolJson, StallJson},
        Command, ErrorCode, Filter, Response,
    },
    timefmt::monotonic_ns,
    tracker::{activity, Conn, Totals},
};

use tokio::sync::mpsc;

use super::{why_samples::UNIX_ENDPOINT, Daemon};

/// Items per chunk of a streamed `conns` answer (~200 KB).
const CHUNK_ITEMS: usize = 512;

/// A `conns` answer being streamed.
pub(super) struct ConnsStream {
    /// The selected connections, by id, when the query came.
    ids: Vec<u64>,
    /// The first id not answered yet.
    next: usize,
    /// Whether an item was sent (the next one follows a comma).
    started: bool,
    pub(super) chunks: mpsc::Sender<String>,
}

/// Chunks made per turn of the loop at most, over all streams (~200 KB each).
const CHUNKS_PER_TURN: usize = 8;
/// Time a turn makes chunks for, after its first: a chunk takes ~4 ms in a release build and
/// ten times that in a debug build on a busy host, where eight made a 500 ms turn.
const CHUNKS_TIME_BUDGET: std::time::Duration = std::time::Duration::from_millis(10);
/// Chunks a stream may be ahead of its client: enough that the daemon making them and the
/// client reading them work side by side (with two, a 200 000-item answer took the CLI
/// twice as long as a client that only reads).
const CHUNKS_AHEAD: usize = 8;

use crate::probes::Probes;

impl Daemon {
    pub(super) fn answer(&self, command: Command, probes: &Probes) -> Response {
        let now = monotonic_ns();
        match command {
            Command::Status => Response::ok(&self.status(probes)),
            Command::Conns { .. } => {
                Response::error(ErrorCode::Internal, "conns answers are streamed")
            }
            Command::Stalls {
                filter,
                older_than_ms,
            } => Response::ok(&self.stalls(&filter, older_than_ms.unwrap_or(0), now)),
            Command::Show { id } => self.show(id, probes, now),
            // Groups are per executable name, across processes: a pid cannot select among
            // them, and a filter accepted must filter.
            Command::Why { filter } if filter.netns.is_some() || filter.selects_cgroup() => {
                Response::error(
                    ErrorCode::BadRequest,
                    "why groups requests by executable name and endpoint across namespaces \
                     and cgroups: filter by comm or port",
                )
            }
            Command::Why { filter } if filter.pid.is_some() => Response::error(
                ErrorCode::BadRequest,
                "why groups requests by executable name across processes, not by process id: \
                 filter by comm or port",
            ),
            Command::Why { filter } => Response::ok(&self.why(&filter)),
            Command::Watch { .. } => {
                Response::error(ErrorCode::BadRequest, "watch is served by the API task")
            }
        }
    }

    fn status(&self, probes: &Probes) -> serde_json::Value {
        let loss = self.loss(&probes.maps);
        let stats = self.tracker.stats();
        let stalled = self.tracker.stalled();
        let (deferred, ignored_open) = self.policy.counts();
        let sweep_avg_us = self
            .sweep_busy
            .as_micros()
            .checked_div(u128::from(self.sweeps))
            .unwrap_or(0);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "stall_after_ms": self.policy.default_ns() / 1_000_000,
            "kernel_stall_after_ms": self.kernel_threshold.as_millis() as u64,
            "rules": {
                "loaded": self.policy.rules().rules.len(),
                "deferred_open": deferred,
                "ignored_open": ignored_open,
                "ignored_total": self.policy.ignored,
                "ended_below_rule_threshold": self.policy.below_rule,
            },
            "events_to": self.sink.destination(),
            "programs": probes.attached(),
            "hooks": {
                "transfers": probes.transfers,
            },
            "features": {
                "adopt_existing": self.offsets.can_read_sock(),
                "network_namespaces": self.offsets.can_read_netns(),
                "namespace_broker_pid": crate::sources::netns::Broker::pid(),
                "request_capture_bytes": probes.capture_bytes,
                "udp": probes.udp,
                "http1_response_framing": probes.http1_framing,
                // Receives by splice()/sendfile() from TCP sockets counted.
                "splice_reads": match &probes.splice_reads {
                    Ok(()) => json!({"enabled": true}),
                    Err(why) => json!({"enabled": false, "reason": why}),
                },
                // The same kernel copies: requests pipelined before a response are counted too.
                "http1_pipelining": probes.http1_framing,
                // h2c connections judged per stream (the kernel's frame walk).
                "http2_streams": probes.http2_streams,
                // Connection state timed from jiffies (ns per tick), or with bpf_ktime_get_ns.
                "coarse_clock": match &probes.maps.clock {
                    Ok(fit) => json!({"enabled": true, "tick_ns": fit.tick_ns}),
                    Err(why) => json!({"enabled": false, "reason": why}),
                },
                // TLS clients' replies counted when libssl's SSL_read returns plaintext.
                "tls_libssl": match &probes.libssl {
                    Ok(path) => json!({"enabled": true, "library": path}),
                    Err(why) => json!({"enabled": false, "reason": why}),
                },
            },
            "connections": {
                "tracked": self.tracker.len(),
                // Stalls the rules hold back or ignore are not (yet) stalls to the user.
                "stalled": stalled.saturating_sub(deferred + ignored_open),
                "watched": self.tracker.watched(),
                "capacity": self.config.max_conns,
                "recovered": stats.recovered,
                "late_records": stats.late_records,
                "http1_pipelined_runs": stats.http1_pipelined_runs,
                "http1_runs_uncounted": stats.http1_runs_uncounted,
            },
            "events": {
                "kernel": stats.events,
                "written": self.sink.written(),
            },
            "diagnosis": {
                "open": self.diagnoser.open_count(),
                "held": self.held.len(),
                "jobs_dropped": self.diagnoser.jobs_dropped(),
                "reported_before_diagnosis": self.held.late,
            },
            "cgroups": {
                "unresolved_dropped": self.sink.cgroups_dropped(),
            },
            "sweeps": {
                "count": self.sweeps,
                "avg_us": sweep_avg_us as u64,
                "max_us": self.sweep_max.as_micros() as u64,
            },
            "loop": self.turns.status(),
            "resync": self.resyncs.status(),
            "privileges": self.privileges,
            "lost": loss,
            "lost_total": loss.total(),
        })
    }

    /// Starts streaming the `conns` answer: the ids of the selected connections now, their
    /// items made a chunk at a time as the client reads them ([`Self::send_conns_chunk`]).
    /// The daemon holds 8 bytes per connection and `CHUNKS_AHEAD` chunks, not the whole answer (which
    /// is ~400 bytes per connection: 80 MB on a host with 100 000 connections, both ends).
    /// Connections that close while the answer streams are left out.
    pub(super) fn stream_conns(&mut self, filter: &Filter) -> mpsc::Receiver<String> {
        let mut ids: Vec<u64> = self
            .tracker
            .conns()
            .filter(|(_, conn)| self.selected(filter, conn))
            .map(|(_, conn)| conn.id)
            .collect();
        ids.sort_unstable();
        let (chunks, receiver) = mpsc::channel(CHUNKS_AHEAD);
        self.streams.push_back(ConnsStream {
            ids,
            next: 0,
            started: false,
            chunks,
        });
        receiver
    }

    /// Makes the next chunks of the `conns` streams whose clients have room for one, in turn,
    /// so that a client that stops reading holds up no other; drops the streams that are done
    /// or whose client went away (a client that reads nothing for 5 s is dropped by the API
    /// task).
    pub(super) fn pump_conns_streams(&mut self, probes: &Probes) {
        let now = monotonic_ns();
        let started = std::time::Instant::now();
        for _ in 0..CHUNKS_PER_TURN {
            if started.elapsed() >= CHUNKS_TIME_BUDGET {
                return;
            }
            let mut made = false;
            for _ in 0..self.streams.len() {
                let Some(mut stream) = self.streams.pop_front() else {
                    break;
                };
                match stream.chunks.clone().try_reserve_owned() {
                    Ok(permit) => {
                        permit.send(self.conns_chunk(&mut stream, probes, now));
                        made = true;
                        if stream.next < stream.ids.len() {
                            self.streams.push_back(stream);
                        }
                        break;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => self.streams.push_back(stream),
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            if !made {
                return;
            }
        }
    }

    /// The next chunk of `stream`: up to `CHUNK_ITEMS` items, comma-separated.
    fn conns_chunk(&self, stream: &mut ConnsStream, probes: &Probes, now: u64) -> String {
        let mut chunk = Vec::new();
        let end = (stream.next + CHUNK_ITEMS).min(stream.ids.len());
        for &id in &stream.ids[stream.next..end] {
            // Closed since the query: left out.
            let Some((sock, conn)) = self.tracker.find_by_id(id) else {
                continue;
            };
            if stream.started {
                chunk.push(b',');
            }
            stream.started = true;
            let snapshot = sock.and_then(|sock| super::unix::snapshot(probes, sock, now));
            let mut item = conn_item(
                conn,
                snapshot,
                self.tracker.adopted_exchange(conn.id),
                self.policy.shown_as(conn.id),
                now,
            );
            self.add_cgroup_path(&mut item, conn);
            serde_json::to_writer(&mut chunk, &item).expect("items serialize");
        }
        stream.next = end;
        String::from_utf8(chunk).expect("JSON is UTF-8")
    }

    fn stalls(&self, filter: &Filter, older_than_ms: u64, now: u64) -> Vec<ConnItemJson> {
        let clock = self.sink.clock();
        self.tracker
            .stalls()
            .into_iter()
            .filter(|(conn, _)| self.selected(filter, conn) && !self.policy.hides(conn.id))
            .filter_map(|(conn, stall)| {
                let since = conn.stall_since_ns().unwrap_or(stall.quiet_since_ns);
                let age_ms = now.saturating_sub(since) / 1_000_000;
                if age_ms < older_than_ms {
                    return None;
                }
                let mut item = ConnItemJson::new(&conn.reference());
                self.add_cgroup_path(&mut item, conn);
                let annotation = self.policy.annotation(conn.id);
                item.stall = Some(StallJson {
                    kind: stall.kind.as_str().into(),
                    age_ms: Some(age_ms),
                    since: Some(clock.rfc3339(since)),
                    retries: json::udp_retries(&conn.endpoints, conn.retries),
                    http2: json::Http2Json::ended(
                        stall.http2_stream,
                        stall.http2_late_streams,
                        None,
                    ),
                    severity: annotation
                        .and_then(|a| a.severity)
                        .map(|s| s.as_str().into()),
                    rule: annotation.and_then(|a| a.rule.clone()).map(Into::into),
                    diagnosis_pending: self.diagnosis_pending(conn.id),
                    diagnosis: self.diagnoser.current(conn.id).cloned(),
                    ..StallJson::default()
                });
                Some(item)
            })
            .collect()
    }
}

impl Daemon {
    /// `stall.diagnosis_pending` of connection `id`'s open stall.
    fn diagnosis_pending(&self, id: u64) -> Option<bool> {
        self.diagnoser.first_look_pending(id).then_some(true)
    }

    /// One connection: its `conns` item, when it opened, its open stall with the current
    /// diagnosis, and its stall timeline.
    fn show(&self, id: u64, probes: &Probes, now: u64) -> Response {
        let Some((sock, conn)) = self.tracker.find_by_id(id) else {
            return Response::error(
                ErrorCode::NotFound,
                format!("no live connection {id} (closed, or never seen by this daemon)"),
            );
        };
        let clock = self.sink.clock();
        let snapshot = sock.and_then(|sock| super::unix::snapshot(probes, sock, now));
        let mut item = conn_item(
            conn,
            snapshot,
            self.tracker.adopted_exchange(conn.id),
            self.policy.shown_as(id),
            now,
        );
        self.add_cgroup_path(&mut item, conn);
        let since = conn.stall_since_ns().unwrap_or_default();
        item.stall = conn.stall.as_deref().map(|stall| StallJson {
            kind: stall.kind.as_str().into(),
            age_ms: Some(now.saturating_sub(since) / 1_000_000),
            since: Some(clock.rfc3339(since)),
            retries: json::udp_retries(&conn.endpoints, conn.retries),
            http2: json::Http2Json::ended(stall.http2_stream, stall.http2_late_streams, None),
            diagnosis_pending: self.diagnosis_pending(id),
            diagnosis: self.diagnoser.current(id).cloned(),
            ..StallJson::default()
        });
        let timeline: Vec<_> = self
            .timelines
            .of(id)
            .map(|event| json::event_json(event, clock.rfc3339(event.at_ns)))
            .collect();
        Response::ok(&json!({
            "item": item,
            "opened": clock.rfc3339(conn.opened_ns),
            "timeline": timeline,
        }))
    }

    fn why(&self, filter: &Filter) -> Vec<stalltrace_core::why::WhyRow> {
        self.why.report(|key| {
            filter.comm.as_deref().is_none_or(|c| c == key.executable)
                && filter
                    .port
                    .is_none_or(|p| key.endpoint.ends_with(&format!(":{p}")))
                && filter.matches_path(key.endpoint.strip_prefix(UNIX_ENDPOINT))
        })
    }
}

/// A `conns` item: identity, state and the kernel's counters. `ruled`: the state the rules
/// give an open stall they keep out of listings.
fn conn_item(
    conn: &Conn,
    snapshot: Option<ConnState>,
    adopted: Option<activity::AdoptedExchange>,
    ruled: Option<&'static str>,
    now: u64,
) -> ConnItemJson {
    let mut item = ConnItemJson::new(&conn.reference());
    item.conn.adopted = Some(conn.adopted);
    let stream = snapshot.is_some_and(|s| s.flags & conn_flags::STREAM != 0);
    let one_way = conn.unix().is_some_and(|unix| unix.one_way);
    let state = match (&conn.stall, snapshot.as_ref().map(|s| conn.activity(s))) {
        (Some(_), _) => ruled.unwrap_or("stalled"),
        (None, Some(activity::Activity::Idle)) if stream => "stream",
        (None, Some(activity::Activity::Idle | activity::Activity::Outstanding { .. }))
            if one_way =>
        {
            "stream"
        }
        (None, Some(activity::Activity::Outstanding { .. }))
        | (None, Some(activity::Activity::ResponseIncomplete { .. }))
        | (None, Some(activity::Activity::ConnectPending { .. })) => "active",
        // The peer closed (FIN, or its Unix socket released) with nothing left to read.
        (None, Some(activity::Activity::Ending { .. }))
            if snapshot.is_some_and(|s| s.tcp_state == tcp_state::CLOSE_WAIT) =>
        {
            "peer_closed"
        }
        (None, Some(activity::Activity::Ending { .. })) => "closing",
        // Adopted, its traffic not seen yet: what its socket said at start-up, if anything.
        (None, None) if conn.adopted => match adopted {
            Some(activity::AdoptedExchange::Outstanding { .. }) => "active",
            Some(activity::AdoptedExchange::Completed) => "idle",
            _ => "unknown",
        },
        (None, _) => "idle",
    };
    item.conn.state = Some(state.into());
    if let Some(s) = snapshot {
        item.network.protocol = proto::name(s.proto).map(|name| ProtocolJson {
            name: name.into(),
            plaintext: (s.flags & conn_flags::TLS_LIBSSL != 0).then_some("libssl".into()),
        });
        json::add_totals(&mut item.conn, &Totals::from_kernel(&s));
        let ago = |at: u64| (at != 0).then(|| now.saturating_sub(at) / 1_000_000);
        item.conn.last_send_ago_ms = ago(s.last_send_ns);
        item.conn.last_receive_ago_ms = ago(s.last_recv_ns);
    }
    item
}

impl Daemon {
    /// Whether `filter` selects `conn`; its cgroup's path, for `--cgroup PATH` and
    /// `--container`, as resolved so far.
    fn selected(&self, filter: &Filter, conn: &Conn) -> bool {
        filter.matches(conn.owner.pid, &conn.owner.comm.as_str(), &conn.endpoints)
            && filter.matches_path(conn.unix().map(|unix| unix.path()))
            && (!filter.selects_cgroup()
                || filter.matches_cgroup(
                    conn.owner.cgroup_id,
                    self.sink.cgroup_path(conn.owner.cgroup_id).as_deref(),
                ))
    }

    /// `cgroup.path` and `container.id` of an item, when its owner's cgroup is resolved.
    fn add_cgroup_path(&self, item: &mut ConnItemJson, conn: &Conn) {
        if let Some(path) = self.sink.cgroup_path(conn.owner.cgroup_id) {
            item.set_cgroup_path(&path);
        }
    }
}
