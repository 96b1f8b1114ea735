//! HTTP/2 connections judged per stream (`stalltrace_common::http2`), the kernel modelled as
//! its programs run: classify, follow the frames, record, report a quiet that ends.
use stalltrace_common::{
    conn_flags, direction, http2,
    message::{classify, proto, Head},
    role, tcp_state,
    transfer::{ends_quiet, look, record_transfer},
    ConnEvent, ConnState, EventKind, AF_INET, CAPTURE_MAX,
};

use super::model::{Resolution, Role, StallKind};
use super::{Detail, Event, Tracker};

const MS: u64 = 1_000_000;
const THRESHOLD: u64 = 2_000 * MS;
const SOCK: u64 = 0xffff_8880_0000_2000;

struct Kernel {
    state: ConnState,
    streams: http2::Streams,
    epoch: u32,
}

impl Kernel {
    fn new(role_id: u8) -> Self {
        let mut state = ConnState {
            role: role_id,
            tcp_state: tcp_state::ESTABLISHED,
            family: AF_INET,
            flags: conn_flags::ESTABLISHED,
            tgid: 7,
            tid: 7,
            local_port: 40_000,
            peer_port: 50_051,
            ..Default::default()
        };
        state.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        state.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Self {
            state,
            streams: http2::Streams::EMPTY,
            epoch: 1,
        }
    }

    /// A transfer of `data` at `now`, as `transfer.rs` records it; true when the kernel would
    /// report `QuietEnded`.
    fn transfer(&mut self, dir: u8, now: u64, data: &[u8]) -> bool {
        let mut head = [0u8; CAPTURE_MAX];
        let len = data.len().min(CAPTURE_MAX);
        head[..len].copy_from_slice(&data[..len]);
        let head = Head::new(&head, len, data.len() as u64);
        let mut more = |at: usize| data.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
        // Streams first (the preface starts them before the classifier names the protocol).
        if http2::starts(&self.state, dir, &mut more) {
            http2::start(&mut self.state, &mut self.streams);
        }
        let ended = http2::tracking(&self.state).then(|| {
            let total = data.len() as u64;
            let walk = http2::walk(
                &mut self.state,
                &mut self.streams,
                dir,
                total,
                now,
                THRESHOLD,
                http2::header_from(more),
                http2::bytes8_from(data),
            );
            walk.ended
        });
        let look = look(&self.state, dir);
        let message = classify(&mut self.state, look, &head, more);
        let quiet_ended = match ended.filter(|_| http2::tracking(&self.state)) {
            Some(ended) => ended,
            None => ends_quiet(&self.state, dir, message, now, THRESHOLD),
        };
        record_transfer(&mut self.state, dir, data.len() as u64, now, message);
        quiet_ended
    }

    fn event(&mut self, kind: EventKind, at: u64) -> ConnEvent {
        self.state.notified_epoch = self.epoch;
        super::tests::conn_event(kind, at, SOCK, self.state)
    }
}

fn frame(kind: u8, stream: u32, payload_len: usize) -> Vec<u8> {
    flagged(kind, 0, stream, payload_len)
}

fn flagged(kind: u8, flags: u8, stream: u32, payload_len: usize) -> Vec<u8> {
    let len = payload_len as u32;
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.resize(9 + payload_len, 0);
    bytes
}

fn preface() -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, 12));
    bytes
}

/// A unary call: HEADERS, then a DATA frame that ends the request (`END_STREAM`).
fn call(stream: u32) -> Vec<u8> {
    let mut bytes = frame(1, stream, 60);
    bytes.extend(flagged(0, 1, stream, 10));
    bytes
}

fn response(stream: u32) -> Vec<u8> {
    let mut bytes = frame(1, stream, 14);
    bytes.extend(frame(0, stream, 10));
    bytes.extend(frame(1, stream, 24));
    bytes
}

/// Drives one connection: kernel transfers, the events the kernel would report (each
/// request start, as a busy connection is reported once per epoch) and sweeps every 250 ms.
struct Run {
    tracker: Tracker,
    kernel: Kernel,
    events: Vec<Event>,
    ask: u8,
    reply: u8,
}

impl Run {
    fn new(role_id: u8) -> Self {
        let mut run = Self::new_unstarted(role_id);
        run.send(run.ask, MS, &preface());
        assert!(http2::tracking(&run.kernel.state));
        run.send(run.reply, 2 * MS, &frame(4, 0, 0));
        run
    }

    /// A connection whose first transfer is still to come.
    fn new_unstarted(role_id: u8) -> Self {
        let (ask, reply) = if role_id == role::CLIENT {
            (direction::OUT, direction::IN)
        } else {
            (direction::IN, direction::OUT)
        };
        let mut run = Self {
            tracker: Tracker::new(THRESHOLD),
            kernel: Kernel::new(role_id),
            events: Vec::new(),
            ask,
            reply,
        };
        run.kernel.state.proto = proto::UNKNOWN;
        let open = run.kernel.event(EventKind::Discovered, 0);
        run.tracker.on_event(&open, &mut run.events);
        run
    }

    fn send(&mut self, dir: u8, at: u64, data: &[u8]) {
        let requests = self.kernel.state.requests;
        let quiet_ended = self.kernel.transfer(dir, at, data);
        let kind = if quiet_ended {
            Some(EventKind::QuietEnded)
        } else if self.kernel.state.requests > requests {
            Some(EventKind::RequestStarted)
        } else {
            None
        };
        if let Some(kind) = kind {
            let event = self.kernel.event(kind, at);
            self.tracker.on_event(&event, &mut self.events);
        }
    }

    fn sweep(&mut self, now: u64) {
        self.kernel.epoch += 1;
        let state = self.kernel.state;
        self.tracker.sweep(
            now,
            self.kernel.epoch,
            |sock| (sock == SOCK).then_some(state),
            &mut self.events,
        );
    }

    /// Time advances to `until` (ms) in steps of 50 ms, sweeping every 250 ms; `at(ms)`
    /// returns what moves then.
    fn until(&mut self, from: u64, until: u64, mut at: impl FnMut(u64) -> Vec<(u8, Vec<u8>)>) {
        let mut ms = from;
        while ms <= until {
            for (dir, data) in at(ms) {
                self.send(dir, ms * MS, &data);
            }
            if ms.is_multiple_of(250) {
                self.sweep(ms * MS);
            }
            ms += 50;
        }
    }

    fn stall_events(&self) -> Vec<(u64, &Detail)> {
        self.events
            .iter()
            .filter(|e| !matches!(e.detail, Detail::Open { .. }))
            .map(|e| (e.at_ns / MS, &e.detail))
            .collect()
    }
}

/// Issue 7, case 2a: one unary call answered after 6 s while others complete every 0.5 s on
/// the same channel is a stall of that stream, on both ends, found within the threshold plus
/// a sweep and ended `response` with its true duration; the other streams are never flagged,
/// and the idle channel afterwards is not either.
#[test]
fn a_slow_stream_among_flowing_ones_stalls_on_both_ends() {
    for role_id in [role::CLIENT, role::SERVER] {
        let mut run = Run::new(role_id);
        let (ask, reply) = (run.ask, run.reply);
        let mut next = 3;
        run.until(100, 12_000, |ms| match ms {
            100 => vec![(ask, call(1))],
            6_100 => vec![(reply, response(1))],
            ms if ms % 500 == 0 && ms < 9_000 => {
                next += 2;
                vec![(ask, call(next)), (reply, response(next))]
            }
            _ => vec![],
        });
        let kind = StallKind::for_role(super::model::Role::from_kernel(role_id));
        let events = run.stall_events();
        assert_eq!(
            events,
            [
                (
                    2_250,
                    &Detail::StallStart {
                        kind,
                        quiet_ms: 2_150,
                        http2_stream: Some(1),
                        diagnosis: None
                    }
                ),
                (
                    6_100,
                    &Detail::StallEnd {
                        kind,
                        duration_ms: 6_000,
                        resolution: Resolution::Response,
                        retries: 0,
                        http2_stream: Some(1),
                        http2_late_streams: 0,
                        http2_reset_by: None
                    }
                )
            ],
            "role {role_id}"
        );
        assert!(run.tracker.stalls().is_empty());
        assert!(http2::tracking(&run.kernel.state));
    }
}

/// Two overdue streams: the oldest is flagged first; when it is answered, the next one is.
#[test]
fn overdue_streams_are_flagged_one_after_the_other() {
    let mut run = Run::new(role::CLIENT);
    let (ask, reply) = (run.ask, run.reply);
    run.until(100, 8_000, |ms| match ms {
        100 => vec![(ask, call(1))],
        1_000 => vec![(ask, call(3))],
        4_000 => vec![(reply, response(1))],
        7_000 => vec![(reply, response(3))],
        _ => vec![],
    });
    let streams: Vec<_> = run
        .stall_events()
        .into_iter()
        .map(|(at, detail)| match detail {
            Detail::StallStart { http2_stream, .. } => (at, "start", *http2_stream),
            Detail::StallEnd { http2_stream, .. } => (at, "end", *http2_stream),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        streams,
        [
            (2_250, "start", Some(1)),
            (4_000, "end", Some(1)),
            (4_000, "start", Some(3)),
            (7_000, "end", Some(3)),
        ]
    );
}

/// A stream answered late while an older stream's stall is open was a stall of its own,
/// hidden behind that one (a connection reports one at a time): the open stall's end counts
/// it, and it is not lost (found by a fresh-eyes test: streams 1 and 3 slow, 3 answered
/// first, appeared nowhere).
#[test]
fn streams_answered_late_behind_an_open_stall_are_counted_on_its_end() {
    let mut run = Run::new(role::SERVER);
    let (ask, reply) = (run.ask, run.reply);
    run.until(100, 8_000, |ms| match ms {
        100 => vec![(ask, call(1))],
        200 => vec![(ask, call(3)), (ask, call(5))],
        4_000 => vec![(reply, response(3))],
        5_000 => vec![(reply, response(5))],
        6_000 => vec![(reply, response(1))],
        _ => vec![],
    });
    let stalls: Vec<_> = run
        .stall_events()
        .into_iter()
        .map(|(at, detail)| match detail {
            Detail::StallStart { http2_stream, .. } => (at, "start", *http2_stream, 0),
            Detail::StallEnd {
                http2_stream,
                http2_late_streams,
                ..
            } => (at, "end", *http2_stream, *http2_late_streams),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        stalls,
        [(2_250, "start", Some(1), 0), (6_000, "end", Some(1), 2)]
    );
}

/// Overdue streams answered by one read are counted on the stall of the one named (the
/// oldest): a client that reads four late answers at once, where its server wrote them one
/// by one (and reports four stalls), tells of all four too.
#[test]
fn streams_answered_late_by_one_read_are_counted() {
    let mut run = Run::new(role::CLIENT);
    let (ask, reply) = (run.ask, run.reply);
    let answers: Vec<u8> = [1, 3, 5, 7].into_iter().flat_map(response).collect();
    run.until(100, 5_000, |ms| match ms {
        100 => [1, 3, 5, 7].into_iter().map(|id| (ask, call(id))).collect(),
        3_000 => vec![(reply, answers.clone())],
        _ => vec![],
    });
    let ends: Vec<_> = run
        .stall_events()
        .into_iter()
        .filter_map(|(at, detail)| match detail {
            Detail::StallEnd {
                http2_stream,
                http2_late_streams,
                ..
            } => Some((at, *http2_stream, *http2_late_streams)),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [(3_000, Some(1), 3)]);
}

/// The framing lost while a stream's stall is open (bytes that are no frames): the direction
/// rule judges the stall from there, and it ends with the reply that comes, with its true
/// duration (it ended at once, dated by an earlier reply: 0 ms, before its own start).
#[test]
fn a_streams_stall_outlives_the_framing() {
    let mut run = Run::new(role::SERVER);
    let (ask, reply) = (run.ask, run.reply);
    let mut garbage = frame(0xfa, 0, 0);
    garbage[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    run.until(100, 6_000, |ms| match ms {
        100 => vec![(ask, call(1))],
        2_800 => vec![(ask, garbage.clone())],
        5_000 => vec![(reply, response(1))],
        _ => vec![],
    });
    assert_eq!(run.kernel.state.h2_sync, http2::sync::LOST);
    let stalls: Vec<_> = run
        .stall_events()
        .into_iter()
        .map(|(at, detail)| match detail {
            Detail::StallStart { http2_stream, .. } => (at, "start", *http2_stream, 0),
            Detail::StallEnd {
                http2_stream,
                duration_ms,
                ..
            } => (at, "end", *http2_stream, *duration_ms),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        stalls,
        [(2_250, "start", Some(1), 0), (5_000, "end", Some(1), 4_900)]
    );
}

/// Case 2b stays right with streams followed: after calls, PINGs and WINDOW_UPDATEs on an
/// idle channel are never a stall.
#[test]
fn an_idle_channel_is_never_flagged() {
    let mut run = Run::new(role::CLIENT);
    let (ask, reply) = (run.ask, run.reply);
    run.until(100, 10_000, |ms| match ms {
        100 => vec![(ask, call(1)), (reply, response(1))],
        ms if ms % 1_000 == 0 => vec![
            (reply, frame(6, 0, 8)),
            (ask, frame(6, 0, 8)),
            (ask, frame(8, 0, 4)),
        ],
        _ => vec![],
    });
    assert_eq!(run.stall_events(), []);
}

/// A server that stops reading with every stream answered: the PING left in its receive
/// queue is no request (the unread-bytes rule would have said so), whether the streams are
/// followed or the framing was lost. A connection whose preface is still unread may be
/// anything.
#[test]
fn unread_bytes_on_an_http2_connection_are_no_request() {
    let unread = |run: &mut Run| {
        let state = run.kernel.state;
        let mut out = Vec::new();
        let later = 250 * MS + 2 * THRESHOLD;
        let opened = run
            .tracker
            .request_unread(SOCK, Some(&state), 250 * MS, later, &mut out);
        run.events.extend(out);
        opened
    };
    let mut run = Run::new(role::SERVER);
    let (ask, reply) = (run.ask, run.reply);
    run.send(ask, 100 * MS, &call(1));
    run.send(reply, 200 * MS, &response(1));
    run.sweep(250 * MS);
    assert!(!unread(&mut run), "a PING sits unread between streams");
    run.kernel.state.h2_sync = http2::sync::LOST;
    assert!(!unread(&mut run), "the same, the framing lost");
    assert_eq!(run.stall_events(), []);
    let mut unstarted = Run::new_unstarted(role::SERVER);
    assert!(unread(&mut unstarted), "the preface itself unread");
}

/// A client that gives up on an overdue call (its deadline) resets the stream: the stall
/// ends `stream_reset`, by the client, on both ends, and the connection goes on: its next
/// call is judged as before, and its end is no close of a stalled connection.
#[test]
fn a_cancelled_stream_ends_its_stall_reset_by_the_client() {
    for role_id in [role::CLIENT, role::SERVER] {
        let mut run = Run::new(role_id);
        let (ask, reply) = (run.ask, run.reply);
        run.until(100, 6_000, |ms| match ms {
            100 => vec![(ask, call(1))],
            3_100 => vec![(ask, frame(3, 1, 4))],
            3_500 => vec![(ask, call(3))],
            5_000 => vec![(reply, response(3))],
            _ => vec![],
        });
        let ends: Vec<_> = run
            .stall_events()
            .into_iter()
            .filter_map(|(at, detail)| match detail {
                Detail::StallEnd {
                    resolution,
                    http2_stream,
                    http2_reset_by,
                    duration_ms,
                    ..
                } => Some((
                    at,
                    *resolution,
                    *http2_stream,
                    *http2_reset_by,
                    *duration_ms,
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            ends,
            [(
                3_100,
                Resolution::StreamReset,
                Some(1),
                Some(Role::Client),
                3_000
            )],
            "role {role_id}"
        );
        run.kernel.state.tcp_state = tcp_state::CLOSE;
        let close = run.kernel.event(EventKind::Closed, 7_000 * MS);
        run.tracker.on_event(&close, &mut run.events);
        let closed = run.events.iter().find_map(|e| match &e.detail {
            Detail::Close(summary) => Some(summary.closed_while_stalled),
            _ => None,
        });
        assert_eq!(closed, Some(false), "role {role_id}");
    }
}

/// A connection that closes on an overdue stream: its stall ends `closed`, named.
#[test]
fn a_close_ends_a_streams_stall() {
    let mut run = Run::new(role::SERVER);
    let ask = run.ask;
    run.until(100, 3_000, |ms| match ms {
        100 => vec![(ask, call(1))],
        _ => vec![],
    });
    // The client goes away: the kernel names the overdue stream as it reports the close.
    assert!(http2::quiet_past_threshold(
        &run.kernel.state,
        3_100 * MS,
        THRESHOLD
    ));
    http2::end_oldest(&mut run.kernel.state);
    run.kernel.state.tcp_state = tcp_state::CLOSE;
    run.kernel.state.state_ns = 3_100 * MS;
    run.kernel.state.flags |= conn_flags::PEER_RESET;
    let event = run.kernel.event(EventKind::QuietEnded, 3_100 * MS);
    run.tracker.on_event(&event, &mut run.events);
    let last = run.stall_events().last().map(|(at, d)| (*at, (*d).clone()));
    assert_eq!(
        last,
        Some((
            3_100,
            Detail::StallEnd {
                kind: StallKind::UnansweredRequest,
                duration_ms: 3_000,
                resolution: Resolution::Reset,
                retries: 0,
                http2_stream: Some(1),
                http2_late_streams: 0,
                http2_reset_by: None
            }
        ))
    );
}

/// A connection that closes on an overdue stream while its other streams were answered: those
/// answers are not the overdue stream's, so its stall ends `closed` at the close, not
/// `response` at the last answer (the close comes with no `QuietEnded`: by the direction rule
/// nothing was outstanding).
#[test]
fn other_streams_answers_do_not_end_a_streams_stall_at_the_close() {
    let mut run = Run::new(role::SERVER);
    let (ask, reply) = (run.ask, run.reply);
    let mut next = 1;
    run.until(100, 4_000, |ms| match ms {
        100 => vec![(ask, call(1))],
        ms if ms % 500 == 0 => {
            next += 2;
            vec![(ask, call(next)), (reply, response(next))]
        }
        _ => vec![],
    });
    run.kernel.state.tcp_state = tcp_state::CLOSE;
    run.kernel.state.state_ns = 4_100 * MS;
    let event = run.kernel.event(EventKind::Closed, 4_100 * MS);
    run.tracker.on_event(&event, &mut run.events);
    let end = run
        .stall_events()
        .into_iter()
        .find(|(_, d)| matches!(d, Detail::StallEnd { .. }))
        .map(|(at, d)| (at, d.clone()));
    assert_eq!(
        end,
        Some((
            4_100,
            Detail::StallEnd {
                kind: StallKind::UnansweredRequest,
                duration_ms: 4_000,
                resolution: Resolution::Closed,
                retries: 0,
                http2_stream: Some(1),
                http2_late_streams: 0,
                http2_reset_by: None
            }
        ))
    );
}

/// A recorded grpcio client (see `replay/record.py --full`): one call answered after 3 s while
/// calls complete every 0.5 s on the same channel. The kernel's walk follows every frame of
/// the real conversation; stream 1 (the slow call) is flagged and ends with the response.
#[test]
fn a_recorded_grpc_channel_flags_its_slow_call_only() {
    let text = include_str!("replay/grpc-slow-call-among-flowing.txt");
    let mut run = Run::new_unstarted(role::CLIENT);
    let mut next_sweep = 250;
    let mut last = 0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split(' ').collect();
        let [ms, dir, len, hex] = fields[..] else {
            panic!("bad line {line:?}");
        };
        let ms: u64 = ms.parse().unwrap();
        while next_sweep <= ms {
            run.sweep(next_sweep * MS);
            next_sweep += 250;
        }
        let data: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(data.len(), len.parse::<usize>().unwrap(), "{line}");
        let dir = if dir == "out" {
            direction::OUT
        } else {
            direction::IN
        };
        run.send(dir, ms * MS, &data);
        assert_ne!(run.kernel.state.h2_sync, http2::sync::LOST, "{line}");
        last = ms;
    }
    while next_sweep <= last + 3_000 {
        run.sweep(next_sweep * MS);
        next_sweep += 250;
    }
    let stalls: Vec<_> = run
        .stall_events()
        .into_iter()
        .map(|(at, detail)| match detail {
            Detail::StallStart { http2_stream, .. } => ("start", at, *http2_stream, 0),
            Detail::StallEnd {
                http2_stream,
                http2_late_streams: 0,
                http2_reset_by: None,
                duration_ms,
                ..
            } => ("end", at, *http2_stream, *duration_ms),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let [("start", _, Some(1), _), ("end", _, Some(1), duration)] = stalls[..] else {
        panic!("one stall, stream 1's: {stalls:?}");
    };
    assert!((2_900..=3_200).contains(&duration), "{stalls:?}");
    assert_eq!(run.kernel.state.h2_open, 0);
}
