use std::net::{IpAddr, Ipv4Addr};

use stalltrace_common::{
    conn_flags, direction,
    message::{classify, Head, Message},
    role, tcp_state,
    transfer::{look, record_transfer},
    verdict_flags, ConnEvent, ConnState, EventHeader, EventKind, AF_INET, CAPTURE_MAX,
};

use super::model::{Comm, Endpoints, Owner, Resolution, Role, StallKind};
use super::{activity::AdoptedExchange, Adoption, Detail, Event, Reconciled, Tracker};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const THRESHOLD: u64 = 5 * SEC;
const SOCK: u64 = 0xffff_8880_0000_1000;

/// A kernel connection entry the tests evolve step by step, like the kernel programs do.
#[derive(Clone)]
struct Kernel {
    state: ConnState,
    epoch: u32,
}

impl Kernel {
    fn new(role_id: u8, open_ns: u64) -> Self {
        let mut state = ConnState {
            open_ns,
            state_ns: open_ns,
            role: role_id,
            tcp_state: tcp_state::ESTABLISHED,
            family: AF_INET,
            flags: conn_flags::ESTABLISHED,
            tgid: 4242,
            tid: 4243,
            local_port: if role_id == role::SERVER {
                8080
            } else {
                40_000
            },
            peer_port: if role_id == role::SERVER {
                40_000
            } else {
                8080
            },
            comm: *b"worker\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        state.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        state.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Self { state, epoch: 1 }
    }

    /// A transfer whose bytes were not captured, recorded by the kernel programs' own
    /// accounting.
    fn transfer(&mut self, dir: u8, at: u64) {
        let bytes = if dir == direction::IN { 10 } else { 20 };
        record_transfer(&mut self.state, dir, bytes, at, Message::Data);
    }

    /// A transfer of `data`, whose first bytes are read and classified as the kernel programs
    /// do with capture on.
    fn transfer_bytes(&mut self, dir: u8, at: u64, data: &[u8]) {
        let mut head = [0u8; CAPTURE_MAX];
        let len = data.len().min(CAPTURE_MAX);
        head[..len].copy_from_slice(&data[..len]);
        let head = Head::new(&head, len, data.len() as u64);
        let look = look(&self.state, dir);
        // Frame headers past the capture come from the buffer, as the kernel reads them.
        let more = |at: usize| data.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
        let message = classify(&mut self.state, look, &head, more);
        record_transfer(&mut self.state, dir, data.len() as u64, at, message);
    }

    fn set_state(&mut self, new_state: u8, at: u64) {
        self.state.tcp_state = new_state;
        self.state.state_ns = at;
    }

    fn event(&mut self, kind: EventKind, at: u64) -> ConnEvent {
        self.state.notified_epoch = self.epoch;
        conn_event(kind, at, SOCK, self.state)
    }
}

/// The record the kernel emits for `sock` in `state`: a `kind` event at `at`.
pub(super) fn conn_event(kind: EventKind, at: u64, sock: u64, state: ConnState) -> ConnEvent {
    ConnEvent {
        header: EventHeader {
            kind: kind as u32,
            _pad: 0,
            ts_ns: at,
            sock,
        },
        conn: state,
    }
}

fn tracker() -> Tracker {
    Tracker::new(THRESHOLD)
}

fn feed(tracker: &mut Tracker, event: ConnEvent) -> Vec<Event> {
    let mut out = Vec::new();
    tracker.on_event(&event, &mut out);
    out
}

/// A whole resynchronization with `snapshot`, in one chunk.
fn reconcile(
    tracker: &mut Tracker,
    snapshot: impl IntoIterator<Item = (u64, ConnState)>,
    now: u64,
    out: &mut Vec<Event>,
) -> Reconciled {
    tracker.begin_resync();
    tracker.resync_entries(snapshot, now, out);
    tracker.finish_resync()
}

fn sweep(tracker: &mut Tracker, kernel: &mut Kernel, now: u64) -> Vec<Event> {
    kernel.epoch += 1;
    let mut out = Vec::new();
    let state = kernel.state;
    tracker.sweep(
        now,
        kernel.epoch,
        |sock| (sock == SOCK).then_some(state),
        &mut out,
    );
    out
}

/// `events` is exactly one stall start, of this kind.
#[track_caller]
fn assert_started(events: &[Event], kind: StallKind) {
    assert!(
        matches!(details(events)[..], [Detail::StallStart { kind: k, .. }] if *k == kind),
        "{events:?}"
    );
}

/// `events` is exactly one stall end, of this kind, duration and resolution.
#[track_caller]
fn assert_ended(events: &[Event], kind: StallKind, duration_ms: u64, resolution: Resolution) {
    assert_eq!(
        details(events),
        [&Detail::StallEnd {
            kind,
            duration_ms,
            resolution,
            retries: 0,
            http2_stream: None,
            http2_late_streams: 0,
            http2_reset_by: None,
        }]
    );
}

fn details(events: &[Event]) -> Vec<&Detail> {
    events.iter().map(|e| &e.detail).collect()
}

/// An accepted server connection that received a request at 1 s.
fn server_with_request() -> (Tracker, Kernel) {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 0);
    let opened = feed(&mut t, k.event(EventKind::Discovered, 0));
    assert_eq!(details(&opened), [&Detail::Open { adopted: false }]);
    k.transfer(direction::IN, SEC);
    (t, k)
}

#[test]
fn a_stall_is_over_in_a_snapshot_where_the_reply_moved_and_counts_follow_the_kernel() {
    let (mut t, mut k) = server_with_request();
    assert!(t.stall_over_in(SOCK, Some(&k.state)), "no stall open");
    assert_started(
        &sweep(&mut t, &mut k, SEC + THRESHOLD),
        StallKind::UnansweredRequest,
    );
    // More of the request is not an answer.
    k.transfer(direction::IN, SEC + THRESHOLD + MS);
    assert!(!t.stall_over_in(SOCK, Some(&k.state)));
    // The reply went out (its record not handled yet).
    let before = t.conn(SOCK).unwrap().counted.writes();
    k.transfer(direction::OUT, SEC + THRESHOLD + 2 * MS);
    assert!(t.stall_over_in(SOCK, Some(&k.state)));
    t.refresh_counts(SOCK, &k.state);
    assert_ne!(
        t.conn(SOCK).unwrap().counted.writes(),
        before,
        "counts taken"
    );
    // Another connection at the same address is not this one.
    let other = Kernel::new(role::SERVER, 7 * SEC);
    assert!(t.stall_over_in(SOCK, Some(&other.state)));
}

/// A look at a stalled socket the kernel map no longer holds was taken after it closed (its
/// `Closed` record not handled yet): it tells of the close, not of the stall.
#[test]
fn a_stall_is_over_when_the_kernel_map_dropped_its_socket() {
    let (mut t, mut k) = server_with_request();
    assert_started(
        &sweep(&mut t, &mut k, SEC + THRESHOLD),
        StallKind::UnansweredRequest,
    );
    assert!(!t.stall_over_in(SOCK, Some(&k.state)), "still stalled");
    assert!(t.stall_over_in(SOCK, None));
}

#[test]
fn a_stall_is_never_said_to_begin_before_its_connection_opened() {
    // The open time is precise; the request's, on the coarse state clock, may trail it.
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 2 * SEC);
    feed(&mut t, k.event(EventKind::Established, 2 * SEC));
    k.transfer(direction::OUT, 2 * SEC - 3 * MS);
    assert_started(
        &sweep(&mut t, &mut k, 2 * SEC + THRESHOLD),
        StallKind::AwaitingResponse,
    );
    assert_eq!(t.conn(SOCK).unwrap().stall_since_ns(), Some(2 * SEC));
}

#[test]
fn stopping_ends_open_stalls_as_daemon_stopped() {
    let (mut t, mut k) = server_with_request();
    assert_started(
        &sweep(&mut t, &mut k, SEC + THRESHOLD),
        StallKind::UnansweredRequest,
    );
    let mut out = Vec::new();
    t.stop(SEC + THRESHOLD + SEC, &mut out);
    assert!(
        matches!(
            details(&out)[..],
            [Detail::StallEnd {
                resolution: Resolution::DaemonStopped,
                duration_ms: 6_000,
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(t.stalls().is_empty());
}

#[test]
fn server_request_without_reply_stalls_at_the_threshold() {
    let (mut t, mut k) = server_with_request();
    assert!(sweep(&mut t, &mut k, SEC + THRESHOLD - MS).is_empty());
    let events = sweep(&mut t, &mut k, SEC + THRESHOLD);
    assert_eq!(
        details(&events),
        [&Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            quiet_ms: 5_000,
            diagnosis: None,
            http2_stream: None,
        }]
    );
    let conn = &events[0].conn;
    assert_eq!(conn.role, Role::Server);
    assert_eq!(conn.owner.pid, 4242);
    assert_eq!(conn.owner.tid, 4243);
    assert_eq!(conn.owner.comm.as_str(), "worker");
    assert_eq!(conn.endpoints.local_port, 8080);
    assert_eq!(conn.endpoints.local, IpAddr::V4(Ipv4Addr::LOCALHOST));
    // Reported once, not at every sweep.
    assert!(sweep(&mut t, &mut k, SEC + THRESHOLD + SEC).is_empty());
    assert_eq!(t.stalls().len(), 1);
}

#[test]
fn client_request_without_reply_awaits_response() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    k.transfer(direction::OUT, 2 * SEC);
    let events = sweep(&mut t, &mut k, 2 * SEC + THRESHOLD + 100 * MS);
    assert_eq!(
        details(&events),
        [&Detail::StallStart {
            kind: StallKind::AwaitingResponse,
            quiet_ms: 5_100,
            diagnosis: None,
            http2_stream: None,
        }]
    );
}

#[test]
fn keep_alive_connection_idle_for_long_is_never_a_stall() {
    for role_id in [role::SERVER, role::CLIENT] {
        let mut t = tracker();
        let mut k = Kernel::new(role_id, 0);
        feed(&mut t, k.event(EventKind::Discovered, 0));
        let (request, reply) = if role_id == role::SERVER {
            (direction::IN, direction::OUT)
        } else {
            (direction::OUT, direction::IN)
        };
        k.transfer(request, SEC);
        k.transfer(reply, SEC + 2 * MS);
        for step in 1..=40 {
            let now = SEC + step * THRESHOLD / 10;
            assert!(
                sweep(&mut t, &mut k, now).is_empty(),
                "role {role_id} at {now}"
            );
        }
        assert!(t.stalls().is_empty());
        // Idle and reported two epochs ago: no longer re-read at every sweep.
        assert_eq!(t.watched(), 0);
    }
}

#[test]
fn slow_upload_is_not_quiet() {
    let (mut t, mut k) = server_with_request();
    for step in 1..=10 {
        let at = SEC + step * SEC;
        k.transfer(direction::IN, at);
        assert!(sweep(&mut t, &mut k, at + 10 * MS).is_empty());
    }
}

#[test]
fn reply_after_a_stall_ends_it_with_the_true_duration() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD + 200 * MS);
    let reply_at = SEC + 7_300 * MS;
    k.transfer(direction::OUT, reply_at);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, reply_at));
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        7_300,
        Resolution::Response,
    );
    assert_eq!(events[0].at_ns, reply_at);
    assert!(t.stalls().is_empty());
}

/// The receive's program and the state change's (the server's FIN came with the response)
/// can both report one end of quiet: one stall, ended once.
#[test]
fn a_quiet_end_reported_twice_is_one_stall() {
    let (mut t, mut k) = server_with_request();
    let reply_at = SEC + THRESHOLD + 50 * MS;
    k.transfer(direction::OUT, reply_at);
    let first = feed(&mut t, k.event(EventKind::QuietEnded, reply_at));
    assert_eq!(first.len(), 2, "{first:?}");
    let again = feed(&mut t, k.event(EventKind::QuietEnded, reply_at + MS));
    assert!(again.is_empty(), "{again:?}");
    // The next request's quiet is a stall of its own.
    k.transfer(direction::IN, 10 * SEC);
    let next_reply = 10 * SEC + THRESHOLD + 50 * MS;
    k.transfer(direction::OUT, next_reply);
    let next = feed(&mut t, k.event(EventKind::QuietEnded, next_reply));
    assert_started(&next[..1], StallKind::UnansweredRequest);
}

#[test]
fn a_stall_that_ended_between_sweeps_is_still_reported() {
    let (mut t, mut k) = server_with_request();
    let reply_at = SEC + THRESHOLD + 50 * MS;
    k.transfer(direction::OUT, reply_at);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, reply_at));
    assert_eq!(
        details(&events),
        [
            &Detail::StallStart {
                kind: StallKind::UnansweredRequest,
                quiet_ms: 5_000,
                diagnosis: None,
                http2_stream: None,
            },
            &Detail::StallEnd {
                kind: StallKind::UnansweredRequest,
                duration_ms: 5_050,
                resolution: Resolution::Response,
                retries: 0,
                http2_stream: None,
                http2_late_streams: 0,
                http2_reset_by: None,
            }
        ]
    );
    assert_eq!(events[0].at_ns, SEC + THRESHOLD);
}

#[test]
fn a_sweep_also_ends_a_stall_whose_end_event_was_lost() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    k.transfer(direction::OUT, 9 * SEC);
    let events = sweep(&mut t, &mut k, 9 * SEC + 100 * MS);
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        8_000,
        Resolution::Response,
    );
}

#[test]
fn close_while_stalled_ends_the_stall_as_closed() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    let close_at = 10 * SEC;
    k.set_state(tcp_state::CLOSE, close_at);
    let events = feed(&mut t, k.event(EventKind::Closed, close_at));
    let [end, close] = &events[..] else {
        panic!("expected stall.end and conn.close, got {events:?}");
    };
    assert_eq!(
        end.detail,
        Detail::StallEnd {
            kind: StallKind::UnansweredRequest,
            duration_ms: 9_000,
            resolution: Resolution::Closed,
            retries: 0,
            http2_stream: None,
            http2_late_streams: 0,
            http2_reset_by: None,
        }
    );
    let Detail::Close(summary) = &close.detail else {
        panic!("expected conn.close, got {close:?}");
    };
    assert!(summary.closed_while_stalled);
    assert_eq!(summary.how, Resolution::Closed);
    assert_eq!(summary.totals.bytes_received, 10);
    assert_eq!(summary.totals.requests, 1);
    assert_eq!(summary.totals.exchanges, 0);
    assert!(summary.complete);
    assert_eq!(summary.duration_ms, 10_000);
    assert_eq!(t.len(), 0);
}

#[test]
fn a_peer_half_close_leaves_the_server_owing_until_it_answers() {
    // `printf 'QUERY\n' | socat -t 20 - TCP:…`: the request, then the client's FIN.
    let (mut t, mut k) = server_with_request();
    k.set_state(tcp_state::CLOSE_WAIT, SEC + MS);
    let events = sweep(&mut t, &mut k, SEC + THRESHOLD);
    assert_started(&events, StallKind::UnansweredRequest);
    assert!(sweep(&mut t, &mut k, 7 * SEC).is_empty(), "still owed");
    k.transfer(direction::OUT, 7 * SEC);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, 7 * SEC));
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        6_000,
        Resolution::Response,
    );
}

#[test]
fn closing_without_an_answer_ends_the_stall_closed() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    k.set_state(tcp_state::CLOSE_WAIT, 7 * SEC);
    assert!(sweep(&mut t, &mut k, 8 * SEC).is_empty());
    k.set_state(tcp_state::LAST_ACK, 8 * SEC);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, 8 * SEC));
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        7_000,
        Resolution::Closed,
    );
    k.set_state(tcp_state::CLOSE, 9 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 9 * SEC));
    let [Event {
        detail: Detail::Close(summary),
        ..
    }] = &events[..]
    else {
        panic!("expected only conn.close, got {events:?}");
    };
    assert!(summary.closed_while_stalled);
}

#[test]
fn a_reply_that_came_with_the_fin_ends_the_stall_as_a_response() {
    // The client reads the whole answer and closes at once: the reply was first.
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    k.transfer(direction::OUT, SEC);
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    // The answer came with the FIN: the kernel finds it unread in the receive queue.
    k.state.verdict_flags |= verdict_flags::REPLY_UNREAD_AT_PEER_FIN;
    k.set_state(tcp_state::CLOSE_WAIT, 8 * SEC);
    assert!(
        sweep(&mut t, &mut k, 8 * SEC + MS).is_empty(),
        "the reply is there to read"
    );
    k.transfer(direction::IN, 8 * SEC + 2 * MS);
    k.set_state(tcp_state::CLOSE, 8 * SEC + 2 * MS);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, 8 * SEC + 2 * MS));
    assert_ended(
        &events,
        StallKind::AwaitingResponse,
        7_002,
        Resolution::Response,
    );
}

#[test]
fn a_client_whose_server_closed_without_answering_stalls_no_more() {
    // The server read the request and exited: its FIN, nothing unread behind it.
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    k.transfer(direction::OUT, SEC);
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    k.set_state(tcp_state::CLOSE_WAIT, 5 * SEC);
    let events = feed(&mut t, k.event(EventKind::QuietEnded, 5 * SEC));
    assert_ended(
        &events,
        StallKind::AwaitingResponse,
        4_000,
        Resolution::Closed,
    );
    assert!(
        sweep(&mut t, &mut k, 9 * SEC).is_empty(),
        "nothing can answer: no new stall while the client keeps the socket"
    );
}

#[test]
fn a_client_the_peer_closed_on_before_the_threshold_is_never_flagged() {
    // A Unix client: no kernel event at the peer's close, the sweep notices it.
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    k.transfer(direction::OUT, SEC);
    assert!(sweep(&mut t, &mut k, SEC + THRESHOLD / 2).is_empty());
    k.set_state(tcp_state::CLOSE_WAIT, SEC + THRESHOLD / 2);
    assert!(sweep(&mut t, &mut k, 9 * SEC).is_empty());
}

#[test]
fn reset_while_stalled_is_reported_as_reset() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    k.state.flags |= conn_flags::PEER_RESET;
    k.set_state(tcp_state::CLOSE, 7 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 7 * SEC));
    assert!(matches!(
        events[0].detail,
        Detail::StallEnd {
            resolution: Resolution::Reset,
            ..
        }
    ));
    assert!(matches!(&events[1].detail, Detail::Close(s) if s.how == Resolution::Reset));
}

#[test]
fn reset_after_an_unswept_stall_reports_it() {
    let (mut t, mut k) = server_with_request();
    let reset_at = SEC + THRESHOLD + 10 * MS;
    k.state.flags |= conn_flags::ABORTED;
    k.set_state(tcp_state::CLOSE, reset_at);
    // The kernel reports the end of a quiet stretch before the close itself.
    let mut events = feed(&mut t, k.event(EventKind::QuietEnded, reset_at));
    events.extend(feed(&mut t, k.event(EventKind::Closed, reset_at)));
    assert_eq!(
        details(&events)[..2],
        [
            &Detail::StallStart {
                kind: StallKind::UnansweredRequest,
                quiet_ms: 5_000,
                diagnosis: None,
                http2_stream: None,
            },
            &Detail::StallEnd {
                kind: StallKind::UnansweredRequest,
                duration_ms: 5_010,
                resolution: Resolution::Reset,
                retries: 0,
                http2_stream: None,
                http2_late_streams: 0,
                http2_reset_by: None,
            }
        ]
    );
    assert!(matches!(&events[2].detail, Detail::Close(s) if s.closed_while_stalled));
    assert_eq!(events.len(), 3);
}

#[test]
fn connect_that_times_out_between_sweeps_is_reported() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, SEC);
    k.state.tcp_state = tcp_state::SYN_SENT;
    k.state.flags = 0;
    feed(&mut t, k.event(EventKind::ConnectStarted, SEC));
    k.set_state(tcp_state::CLOSE, SEC + THRESHOLD + 100 * MS);
    let events = feed(
        &mut t,
        k.event(EventKind::Closed, SEC + THRESHOLD + 100 * MS),
    );
    assert_eq!(
        details(&events)[1..3],
        [
            &Detail::StallStart {
                kind: StallKind::ConnectPending,
                quiet_ms: 5_000,
                diagnosis: None,
                http2_stream: None,
            },
            &Detail::StallEnd {
                kind: StallKind::ConnectPending,
                duration_ms: 5_100,
                resolution: Resolution::Closed,
                retries: 0,
                http2_stream: None,
                http2_late_streams: 0,
                http2_reset_by: None,
            }
        ]
    );
}

#[test]
fn quick_close_is_not_a_stall() {
    let (mut t, mut k) = server_with_request();
    k.set_state(tcp_state::CLOSE, 2 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 2 * SEC));
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0].detail, Detail::Close(s) if !s.closed_while_stalled));
}

#[test]
fn connect_that_hangs_is_connect_pending_until_established() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, SEC);
    k.state.tcp_state = tcp_state::SYN_SENT;
    k.state.flags = 0;
    k.state.local_port = 0;
    assert!(feed(&mut t, k.event(EventKind::ConnectStarted, SEC)).is_empty());
    assert!(sweep(&mut t, &mut k, SEC + THRESHOLD - MS).is_empty());
    k.state.local_port = 40_000; // learnt from a SYN retransmit
    let events = sweep(&mut t, &mut k, SEC + THRESHOLD);
    assert_eq!(
        details(&events),
        [
            &Detail::Open { adopted: false },
            &Detail::StallStart {
                kind: StallKind::ConnectPending,
                quiet_ms: 5_000,
                diagnosis: None,
                http2_stream: None,
            }
        ]
    );
    assert_eq!(events[1].conn.endpoints.local_port, 40_000);
    k.set_state(tcp_state::ESTABLISHED, 8 * SEC);
    let events = feed(&mut t, k.event(EventKind::Established, 8 * SEC));
    assert_ended(
        &events,
        StallKind::ConnectPending,
        7_000,
        Resolution::Response,
    );
}

#[test]
fn quick_connect_opens_at_establishment() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, SEC);
    k.state.tcp_state = tcp_state::SYN_SENT;
    feed(&mut t, k.event(EventKind::ConnectStarted, SEC));
    k.set_state(tcp_state::ESTABLISHED, SEC + MS);
    let events = feed(&mut t, k.event(EventKind::Established, SEC + MS));
    assert_eq!(details(&events), [&Detail::Open { adopted: false }]);
    assert_eq!(events[0].at_ns, SEC + MS);
}

#[test]
fn refused_connect_is_opened_then_closed_as_reset() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, SEC);
    k.state.tcp_state = tcp_state::SYN_SENT;
    k.state.flags = 0;
    feed(&mut t, k.event(EventKind::ConnectStarted, SEC));
    k.state.flags |= conn_flags::PEER_RESET;
    k.set_state(tcp_state::CLOSE, SEC + MS);
    let events = feed(&mut t, k.event(EventKind::Closed, SEC + MS));
    assert!(matches!(events[0].detail, Detail::Open { .. }));
    assert!(matches!(&events[1].detail, Detail::Close(s) if s.how == Resolution::Reset));
}

#[test]
fn reused_sock_address_starts_a_new_connection() {
    // The kernel key (sock address) is reused like an fd number; a lost close must not merge
    // two connections.
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    let first_id = t.stalls()[0].0.id;
    let mut next = Kernel::new(role::CLIENT, 20 * SEC);
    next.state.tcp_state = tcp_state::SYN_SENT;
    let events = feed(&mut t, next.event(EventKind::ConnectStarted, 20 * SEC));
    let ids: Vec<u64> = events.iter().map(|e| e.conn.id).collect();
    assert_eq!(ids, [first_id, first_id]);
    assert!(matches!(
        events[0].detail,
        Detail::StallEnd {
            resolution: Resolution::Closed,
            ..
        }
    ));
    assert!(matches!(&events[1].detail, Detail::Close(s) if !s.complete));
    assert_eq!(t.stats().lost_closes, 1);
    next.set_state(tcp_state::ESTABLISHED, 20 * SEC + MS);
    let events = feed(&mut t, next.event(EventKind::Established, 20 * SEC + MS));
    assert_eq!(events.len(), 1);
    assert_ne!(events[0].conn.id, first_id);
    assert_eq!(events[0].conn.role, Role::Client);
}

#[test]
fn passive_connections_with_a_new_kernel_entry_are_new_connections() {
    let (mut t, _) = server_with_request();
    let first_id = t.conns().next().unwrap().1.id;
    let mut next = Kernel::new(role::SERVER, 30 * SEC);
    next.state.peer_port = 40_001;
    let events = feed(&mut t, next.event(EventKind::Discovered, 30 * SEC));
    assert!(matches!(&events[0].detail, Detail::Close(_)));
    assert_eq!(events[0].conn.id, first_id);
    assert!(matches!(events[1].detail, Detail::Open { .. }));
    assert_ne!(events[1].conn.id, first_id);
}

#[test]
fn adopted_connection_keeps_its_id_when_the_kernel_discovers_it() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    let endpoints = Endpoints::from_kernel(&k.state);
    let mut out = Vec::new();
    t.adopt(
        Adoption {
            endpoints,
            role: Role::Server,
            owner: Owner {
                pid: 4242,
                tid: 4242,
                comm: Comm::new("worker"),
                cgroup_id: 0,
            },
        },
        SEC,
        &mut out,
    );
    assert_eq!(details(&out), [&Detail::Open { adopted: true }]);
    let id = out[0].conn.id;
    // First traffic after start-up: the kernel builds an entry from the socket.
    k.state.flags |= conn_flags::DISCOVERED;
    k.transfer(direction::IN, 50 * SEC);
    assert!(feed(&mut t, k.event(EventKind::Discovered, 50 * SEC)).is_empty());
    let events = sweep(&mut t, &mut k, 50 * SEC + THRESHOLD);
    assert_eq!(events[0].conn.id, id);
    assert!(matches!(
        events[0].detail,
        Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            ..
        }
    ));
    assert_eq!(t.stats().evictions, 0);
}

/// A server adopted at 10 s whose socket says it read a request at 4 s and answered nothing.
fn adopted_hung_server(t: &mut Tracker, k: &Kernel, since: u64) -> u64 {
    let endpoints = Endpoints::from_kernel(&k.state);
    let mut out = Vec::new();
    let adoption = Adoption {
        endpoints,
        role: Role::Server,
        owner: Owner::default(),
    };
    t.adopt(adoption, 10 * SEC, &mut out);
    let id = out[0].conn.id;
    assert_eq!(t.adopted_exchange(id), None, "nothing said yet");
    let exchange = AdoptedExchange::Outstanding { since };
    t.set_adopted_exchange(&endpoints, exchange);
    assert_eq!(t.adopted_exchange(id), Some(exchange));
    id
}

#[test]
fn an_adopted_connection_whose_socket_is_gone_is_closed_as_a_close_never_seen() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    let stalled = adopted_hung_server(&mut t, &k, 4 * SEC);
    assert_eq!(sweep(&mut t, &mut k, 10 * SEC).len(), 1, "its stall opens");
    let mut idle = Kernel::new(role::CLIENT, 50 * SEC);
    idle.state.local_port = 40_100;
    let mut out = Vec::new();
    let idle_endpoints = Endpoints::from_kernel(&idle.state);
    t.adopt(
        Adoption {
            endpoints: idle_endpoints,
            role: Role::Client,
            owner: Owner::default(),
        },
        10 * SEC,
        &mut out,
    );
    let mut adopted = t.adopted_endpoints();
    adopted.sort_by_key(|e| e.local_port);
    assert_eq!(adopted, [Endpoints::from_kernel(&k.state), idle_endpoints]);
    // Both sockets found gone; one of them listed twice (passed over the second time).
    out.clear();
    let gone = [adopted[0], adopted[0], adopted[1]];
    assert_eq!(t.retire_adopted(gone, 30 * SEC, &mut out), 2);
    let stall_end = out.iter().find(|e| e.conn.id == stalled).unwrap();
    assert!(
        matches!(
            &stall_end.detail,
            Detail::StallEnd {
                resolution: Resolution::Closed,
                ..
            }
        ),
        "{out:?}"
    );
    let closes: Vec<_> = out
        .iter()
        .filter_map(|e| match &e.detail {
            Detail::Close(summary) => Some(summary),
            _ => None,
        })
        .collect();
    assert_eq!(closes.len(), 2, "{out:?}");
    assert!(closes
        .iter()
        .all(|c| !c.complete && c.how == Resolution::Closed));
    assert_eq!((t.len(), t.stalled(), t.stats().lost_closes), (0, 0, 2));
    assert_eq!(t.adopted_exchange(stalled), None);
    assert!(t.adopted_endpoints().is_empty());
}

#[test]
fn a_request_hung_before_the_daemon_started_is_flagged_at_once() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    let id = adopted_hung_server(&mut t, &k, 4 * SEC);
    let out = sweep(&mut t, &mut k, 10 * SEC);
    assert_eq!(
        details(&out),
        [&Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            quiet_ms: 6_000,
            http2_stream: None,
            diagnosis: None
        }]
    );
    assert_eq!(out[0].conn.id, id);
    assert_eq!(t.stalled(), 1);
    // The answer, at last: the kernel's first sight of the connection ends the stall.
    k.state.flags |= conn_flags::DISCOVERED;
    k.transfer(direction::OUT, 12 * SEC);
    feed(&mut t, k.event(EventKind::Discovered, 12 * SEC));
    assert_eq!(
        t.adopted_exchange(id),
        None,
        "the kernel's view judges it now"
    );
    assert_eq!(t.stalled(), 1, "still listed while the kernel takes over");
    let events = sweep(&mut t, &mut k, 12 * SEC + MS);
    assert_eq!(events[0].conn.id, id);
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        8_000,
        Resolution::Response,
    );
    assert_eq!(t.stalled(), 0);
}

#[test]
fn an_adopted_request_answered_then_closed_at_once_ends_with_the_response() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    adopted_hung_server(&mut t, &k, 4 * SEC);
    sweep(&mut t, &mut k, 10 * SEC);
    // The reply is the kernel's first sight of it, its close follows before any sweep.
    k.state.flags |= conn_flags::DISCOVERED;
    k.transfer(direction::OUT, 12 * SEC);
    feed(&mut t, k.event(EventKind::Discovered, 12 * SEC));
    k.set_state(tcp_state::FIN_WAIT1, 12 * SEC + MS);
    let events = sweep(&mut t, &mut k, 12 * SEC + 2 * MS);
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        8_000,
        Resolution::Response,
    );
}

#[test]
fn an_adopted_request_answered_then_closed_before_a_sweep_ends_with_the_response() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    adopted_hung_server(&mut t, &k, 4 * SEC);
    sweep(&mut t, &mut k, 10 * SEC);
    k.state.flags |= conn_flags::DISCOVERED;
    k.transfer(direction::OUT, 12 * SEC);
    feed(&mut t, k.event(EventKind::Discovered, 12 * SEC));
    k.set_state(tcp_state::CLOSE, 12 * SEC + MS);
    let events = feed(&mut t, k.event(EventKind::Closed, 12 * SEC + MS));
    assert_eq!(
        events[0].detail,
        Detail::StallEnd {
            kind: StallKind::UnansweredRequest,
            duration_ms: 8_000,
            resolution: Resolution::Response,
            retries: 0,
            http2_stream: None,
            http2_late_streams: 0,
            http2_reset_by: None,
        }
    );
}

/// A client adopted after its own half-close (`FIN_WAIT2`), whose reply came with the
/// server's FIN before it read it: the FIN closes its socket, which the kernel never tracked;
/// the close record counts the reply unread as its last receive. Its role there is the
/// kernel's guess (no listener on its port); the tracker judges by its own.
#[test]
fn an_adopted_client_whose_reply_came_with_the_close_ends_with_the_response() {
    let adopted = |role| {
        let mut t = tracker();
        let k = Kernel::new(role::CLIENT, 50 * SEC);
        let endpoints = Endpoints::from_kernel(&k.state);
        let mut out = Vec::new();
        t.adopt(
            Adoption {
                endpoints,
                role,
                owner: Owner::default(),
            },
            10 * SEC,
            &mut out,
        );
        t.set_adopted_exchange(&endpoints, AdoptedExchange::Outstanding { since: 4 * SEC });
        (t, k)
    };
    let closed = |k: &mut Kernel, t: &mut Tracker| {
        k.state.flags = conn_flags::DISCOVERED | conn_flags::ESTABLISHED;
        k.transfer(direction::IN, 12 * SEC);
        k.set_state(tcp_state::CLOSE, 12 * SEC);
        feed(t, k.event(EventKind::Closed, 12 * SEC))
    };
    let (mut t, mut k) = adopted(Role::Client);
    sweep(&mut t, &mut k, 10 * SEC);
    let events = closed(&mut k, &mut t);
    assert_ended(
        &events[..1],
        StallKind::AwaitingResponse,
        8_000,
        Resolution::Response,
    );
    // A server's bytes unread at its close are a request: never its reply.
    let (mut t, mut k) = adopted(Role::Server);
    sweep(&mut t, &mut k, 10 * SEC);
    let events = closed(&mut k, &mut t);
    assert_ended(
        &events[..1],
        StallKind::UnansweredRequest,
        8_000,
        Resolution::Closed,
    );
}

#[test]
fn an_adopted_request_short_of_the_threshold_is_flagged_when_it_gets_there() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    let since = 10 * SEC - THRESHOLD / 2;
    adopted_hung_server(&mut t, &k, since);
    assert!(sweep(&mut t, &mut k, 10 * SEC + THRESHOLD / 4).is_empty());
    let events = sweep(&mut t, &mut k, since + THRESHOLD);
    assert_started(&events, StallKind::UnansweredRequest);
    assert!(sweep(&mut t, &mut k, 20 * SEC).is_empty(), "once");
}

#[test]
fn adopted_connection_that_closes_untouched_is_closed_by_endpoints() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    let mut out = Vec::new();
    let adoption = Adoption {
        endpoints: Endpoints::from_kernel(&k.state),
        role: Role::Client,
        owner: Owner::default(),
    };
    t.adopt(adoption.clone(), SEC, &mut out);
    t.adopt(adoption, SEC, &mut out);
    assert_eq!(out.len(), 1, "adopting twice must not duplicate");
    k.state.flags = conn_flags::DISCOVERED;
    k.set_state(tcp_state::CLOSE, 3 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 3 * SEC));
    assert!(matches!(&events[0].detail, Detail::Close(s) if !s.complete));
    assert_eq!(t.len(), 0);
}

/// A `connect()` made while the daemon started: the kernel reported it at `SYN_SENT`, its local
/// port still 0, and /proc, read before the daemon handled that record, adopted it with its
/// request outstanding. Once the port is known the two records are one, under the id the
/// adoption announced: no stall inferred for the adopted one outlives the connection.
#[test]
fn a_connect_reported_before_its_port_is_one_with_its_adopted_record() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 9 * SEC);
    let endpoints = Endpoints::from_kernel(&k.state);
    let mut out = Vec::new();
    let adoption = Adoption {
        endpoints,
        role: Role::Client,
        owner: Owner::default(),
    };
    t.adopt(adoption, 10 * SEC, &mut out);
    assert_eq!(details(&out), [&Detail::Open { adopted: true }]);
    let id = out[0].conn.id;
    let asked = 9 * SEC + 500 * MS;
    t.set_adopted_exchange(&endpoints, AdoptedExchange::Outstanding { since: asked });
    // The kernel's records, handled after the adoption.
    let port = k.state.local_port;
    k.state.local_port = 0;
    k.state.flags = 0;
    k.set_state(tcp_state::SYN_SENT, 9 * SEC);
    assert!(feed(&mut t, k.event(EventKind::ConnectStarted, 9 * SEC)).is_empty());
    assert_eq!(t.len(), 2, "not known to be one connection yet");
    k.state.local_port = port;
    k.state.flags = conn_flags::ESTABLISHED;
    k.set_state(tcp_state::ESTABLISHED, 9 * SEC + MS);
    let events = feed(&mut t, k.event(EventKind::Established, 9 * SEC + MS));
    assert!(
        events.is_empty(),
        "announced once, by the adoption: {events:?}"
    );
    assert_eq!(t.len(), 1);
    let found = t.find_by_endpoints(&endpoints);
    assert_eq!(found.map(|(sock, c)| (sock, c.id)), Some((Some(SOCK), id)));
    assert_eq!(
        t.adopted_exchange(id),
        None,
        "the kernel's view judges it now"
    );
    // Its request was answered: the inferred one opens no stall past the threshold.
    k.transfer(direction::OUT, asked);
    k.transfer(direction::IN, 10 * SEC + 200 * MS);
    assert!(sweep(&mut t, &mut k, asked + 2 * THRESHOLD).is_empty());
    assert_eq!(t.stalled(), 0);
    k.set_state(tcp_state::CLOSE, 20 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 20 * SEC));
    assert!(
        matches!(&events[..], [e] if e.conn.id == id
            && matches!(&e.detail, Detail::Close(s) if s.complete)),
        "{events:?}"
    );
    assert_eq!(t.len(), 0);
}

#[test]
fn evicted_entry_rediscovered_is_the_same_connection() {
    let (mut t, mut k) = server_with_request();
    let id = t.conns().next().unwrap().1.id;
    // The kernel lost the entry; traffic rebuilt it with a new open time.
    k.state.flags |= conn_flags::DISCOVERED;
    k.state.open_ns = 40 * SEC;
    let events = feed(&mut t, k.event(EventKind::Discovered, 40 * SEC));
    assert!(events.is_empty());
    assert_eq!(t.stats().evictions, 1);
    let (_, conn) = t.conns().next().unwrap();
    assert_eq!(conn.id, id);
    assert!(conn.incomplete);
}

#[test]
fn entry_missing_for_several_sweeps_is_a_lost_close() {
    let (mut t, k) = server_with_request();
    let mut out = Vec::new();
    for epoch in 2..5 {
        assert_eq!(t.len(), 1);
        t.sweep(2 * SEC, epoch, |_| None, &mut out);
    }
    assert_eq!(t.len(), 0);
    assert!(matches!(&out[..], [Event { detail: Detail::Close(s), .. }] if !s.complete));
    assert_eq!(t.stats().lost_closes, 1);
    assert_eq!(k.state.requests, 1);
}

#[test]
fn busy_connection_stays_watched_idle_one_is_dropped() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + 10 * MS);
    assert_eq!(t.watched(), 1, "outstanding request: keep reading it");
    k.transfer(direction::OUT, SEC + 20 * MS);
    sweep(&mut t, &mut k, SEC + 30 * MS);
    assert_eq!(t.watched(), 0, "idle and not reported in the last epoch");
    // Its next request start is reported by the kernel and watched again.
    k.transfer(direction::IN, 2 * SEC);
    feed(&mut t, k.event(EventKind::RequestStarted, 2 * SEC));
    assert_eq!(t.watched(), 1);
}

#[test]
fn stalls_are_listed_oldest_first() {
    let mut t = tracker();
    let mut out = Vec::new();
    for (i, request_at) in [(0u64, 3 * SEC), (1, SEC), (2, 2 * SEC)] {
        let mut k = Kernel::new(role::SERVER, 0);
        k.transfer(direction::IN, request_at);
        let mut event = k.event(EventKind::Discovered, 0);
        event.header.sock = SOCK + i;
        t.on_event(&event, &mut out);
        let state = k.state;
        t.sweep(20 * SEC, 2, |_| Some(state), &mut out);
    }
    let quiet: Vec<u64> = t.stalls().iter().map(|(_, s)| s.quiet_since_ns).collect();
    assert_eq!(quiet, [SEC, 2 * SEC, 3 * SEC]);
}

#[test]
fn unknown_event_kinds_are_counted_not_applied() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 0);
    let mut event = k.event(EventKind::Discovered, 0);
    event.header.kind = 99;
    assert!(feed(&mut t, event).is_empty());
    assert_eq!(t.stats().unknown_events, 1);
    assert_eq!(t.len(), 0);
}

#[test]
fn sweeps_read_at_most_their_budget_round_robin() {
    let mut t = tracker();
    t.set_sweep_budget(2, std::time::Duration::MAX);
    let mut out = Vec::new();
    let mut k = Kernel::new(role::SERVER, 0);
    k.transfer(direction::IN, SEC);
    for i in 0..5 {
        let mut event = k.event(EventKind::Discovered, 0);
        event.header.sock = SOCK + i;
        t.on_event(&event, &mut out);
    }
    out.clear();
    let state = k.state;
    let mut reads = Vec::new();
    // A sweep a second: a stalled connection is due for a re-read at every one.
    for epoch in 2..5 {
        t.sweep(
            SEC + THRESHOLD + u64::from(epoch - 2) * SEC,
            epoch,
            |sock| {
                reads.push(sock - SOCK);
                Some(state)
            },
            &mut out,
        );
    }
    // Two per sweep, in turn, and every stalled connection is found within three sweeps.
    assert_eq!(reads, [0, 1, 2, 3, 4, 0]);
    assert_eq!(t.stalls().len(), 5);
}

#[test]
fn a_closed_and_reused_sock_address_is_watched_once() {
    let (mut t, mut k) = server_with_request();
    k.set_state(tcp_state::CLOSE, 2 * SEC);
    feed(&mut t, k.event(EventKind::Closed, 2 * SEC));
    let mut next = Kernel::new(role::SERVER, 3 * SEC);
    next.transfer(direction::IN, 3 * SEC);
    feed(&mut t, next.event(EventKind::Discovered, 3 * SEC));
    let mut reads = 0;
    let state = next.state;
    let mut out = Vec::new();
    t.sweep(
        3 * SEC,
        2,
        |_| {
            reads += 1;
            Some(state)
        },
        &mut out,
    );
    assert_eq!(reads, 1, "the entry queued before the close is stale");
}

#[test]
fn passive_connection_is_tracked_at_once_and_reported_with_its_owner() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 2 * SEC);
    k.state.tgid = 0;
    k.state.tid = 0;
    assert!(feed(&mut t, k.event(EventKind::Established, 2 * SEC)).is_empty());
    assert_eq!(t.len(), 1, "listed by conns before any traffic");
    k.state.tgid = 4242;
    k.state.tid = 4243;
    k.transfer(direction::IN, 3 * SEC);
    let events = feed(&mut t, k.event(EventKind::Discovered, 3 * SEC));
    assert_eq!(details(&events), [&Detail::Open { adopted: false }]);
    assert_eq!(events[0].at_ns, 2 * SEC, "dated at the handshake");
    assert_eq!(events[0].conn.owner.pid, 4242);
}

#[test]
fn passive_connection_without_data_is_reported_at_its_close_dated_at_its_handshake() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 2 * SEC);
    k.state.tgid = 0;
    k.state.tid = 0;
    assert!(feed(&mut t, k.event(EventKind::Established, 2 * SEC)).is_empty());
    k.set_state(tcp_state::CLOSE, 3 * SEC);
    let events = feed(&mut t, k.event(EventKind::Closed, 3 * SEC));
    assert!(
        matches!(
            details(&events)[..],
            [Detail::Open { adopted: false }, Detail::Close(_)]
        ),
        "{events:?}"
    );
    assert_eq!(events[0].at_ns, 2 * SEC, "dated at the handshake");
    assert_eq!(events[0].conn.owner.pid, 0, "no transfer named its owner");
}

#[test]
fn reconcile_reports_connections_whose_events_were_lost() {
    let mut t = tracker();
    let mut server = Kernel::new(role::SERVER, SEC);
    server.transfer(direction::IN, 2 * SEC);
    let mut unowned = Kernel::new(role::SERVER, SEC);
    unowned.state.tgid = 0;
    let mut out = Vec::new();
    let found = reconcile(
        &mut t,
        [(SOCK, server.state), (SOCK + 64, unowned.state)],
        3 * SEC,
        &mut out,
    );
    assert_eq!(found.recovered, 2);
    assert_eq!(found.vanished, 0);
    assert_eq!(details(&out), [&Detail::Open { adopted: false }]);
    assert_eq!(out[0].at_ns, SEC, "dated at the handshake");
    assert_eq!(
        t.len(),
        2,
        "the unowned one is listed, reported at its first transfer"
    );
    assert_eq!(t.stats().recovered, 2);
    // Recovered connections are watched: the outstanding request stalls on time.
    let events = sweep(&mut t, &mut server, 2 * SEC + THRESHOLD);
    assert!(matches!(
        details(&events)[..],
        [Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            ..
        }]
    ));
    // A second pass finds nothing new.
    let again = reconcile(
        &mut t,
        [(SOCK, server.state), (SOCK + 64, unowned.state)],
        8 * SEC,
        &mut out,
    );
    assert_eq!(again, Default::default());
}

#[test]
fn reconcile_reports_a_tracked_connection_whose_first_transfer_was_lost() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, SEC);
    k.state.tgid = 0;
    assert!(feed(&mut t, k.event(EventKind::Established, SEC)).is_empty());
    // The Discovered event of its first transfer is lost.
    k.state.tgid = 4242;
    k.transfer(direction::IN, 2 * SEC);
    let mut out = Vec::new();
    let found = reconcile(&mut t, [(SOCK, k.state)], 3 * SEC, &mut out);
    assert_eq!(found.recovered, 1);
    assert_eq!(details(&out), [&Detail::Open { adopted: false }]);
    assert_eq!(out[0].conn.owner.pid, 4242);
    assert_eq!(t.len(), 1);
}

#[test]
fn reconcile_closes_connections_the_kernel_forgot_after_a_grace() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    k.transfer(direction::OUT, SEC);
    k.transfer(direction::IN, SEC + MS);
    // Idle for two epochs: no longer watched.
    for epoch in 2..5 {
        sweep(&mut t, &mut k, epoch * SEC);
    }
    assert_eq!(t.watched(), 0);
    let mut out = Vec::new();
    let found = reconcile(&mut t, [], 10 * SEC, &mut out);
    assert_eq!(found.vanished, 1);
    assert!(out.is_empty(), "its close event may still be in flight");
    for epoch in 10..10 + u32::from(super::MISSING_SWEEPS_BEFORE_LOST) {
        t.sweep(20 * SEC, epoch, |_| None, &mut out);
    }
    assert!(matches!(&out[..], [Event { detail: Detail::Close(s), .. }] if !s.complete));
    assert_eq!(t.len(), 0);
}

#[test]
fn a_resync_in_chunks_counts_each_connection_once() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, SEC);
    k.transfer(direction::IN, 2 * SEC);
    let entry = |i: u64| (SOCK + 64 * i, k.state);
    let mut out = Vec::new();
    t.begin_resync();
    assert!(t.resyncing());
    t.resync_entries((0..3).map(entry), 3 * SEC, &mut out);
    // An LRU map walked while it changes may start over: entries come again.
    t.resync_entries((1..5).map(entry), 3 * SEC, &mut out);
    let found = t.finish_resync();
    assert!(!t.resyncing());
    assert_eq!(
        (found.recovered, found.vanished, found.superseded),
        (5, 0, 0)
    );
    assert_eq!(out.len(), 5, "one conn.open each");
    assert_eq!(t.stats().recovered, 5);
    // Outside a resynchronization, entries are ignored.
    t.resync_entries([entry(9)], 3 * SEC, &mut out);
    assert_eq!(t.len(), 5);
}

#[test]
fn a_resync_does_not_bring_back_a_connection_closed_since_its_entry_was_read() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, SEC);
    k.transfer(direction::IN, 2 * SEC);
    feed(&mut t, k.event(EventKind::Discovered, 2 * SEC));
    t.begin_resync();
    // The walk reads the entry; then the connection closes, and its record is handled before
    // the chunk that holds the entry.
    let read = k.state;
    k.set_state(tcp_state::CLOSE, 3 * SEC);
    let closed = feed(&mut t, k.event(EventKind::Closed, 3 * SEC));
    assert!(matches!(details(&closed)[..], [Detail::Close(_)]));
    let mut out = Vec::new();
    t.resync_entries([(SOCK, read)], 4 * SEC, &mut out);
    let found = t.finish_resync();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.len(), 0);
    assert_eq!((found.recovered, found.superseded), (0, 1));
}

/// In a burst of short connections, an address whose connection closed during the walk is
/// often taken again at once: the snapshot's entry there may be the new connection's, whose
/// records the full ring lost. It was passed over with the old one's, and the new connection
/// (a request stuck on it) never tracked.
#[test]
fn a_resync_entry_newer_than_a_close_since_it_began_is_recovered() {
    let mut t = tracker();
    let mut old = Kernel::new(role::SERVER, SEC);
    old.transfer(direction::IN, SEC);
    feed(&mut t, old.event(EventKind::Discovered, SEC));
    t.begin_resync();
    old.set_state(tcp_state::CLOSE, 2 * SEC);
    feed(&mut t, old.event(EventKind::Closed, 2 * SEC));
    assert_eq!(t.len(), 0);
    // The walk read the address's next connection, a client whose records were all lost.
    let mut next = Kernel::new(role::CLIENT, 2 * SEC + MS);
    next.state.flags = conn_flags::ESTABLISHED;
    next.transfer(direction::OUT, 2 * SEC + 2 * MS);
    let mut out = Vec::new();
    t.resync_entries([(SOCK, old.state), (SOCK, next.state)], 3 * SEC, &mut out);
    let found = t.finish_resync();
    assert_eq!((found.recovered, found.superseded), (1, 1));
    assert_eq!(details(&out), [&Detail::Open { adopted: false }]);
    // Watched: its request's stall is found by the sweeps.
    let stalls = sweep(&mut t, &mut next, 2 * SEC + 2 * MS + THRESHOLD);
    assert!(
        matches!(details(&stalls)[..], [Detail::StallStart { .. }]),
        "{stalls:?}"
    );
}

/// A resync reads the kernel's map while the ring still holds records of a burst: a record of
/// an earlier connection at an address, drained after the resync tracked the address's new
/// connection, once closed the new one as stale (a request stuck on it never flagged).
#[test]
fn a_late_record_of_an_earlier_connection_leaves_the_newer_one_alone() {
    let mut t = tracker();
    let mut old = Kernel::new(role::CLIENT, SEC);
    old.state.flags = conn_flags::ESTABLISHED;
    old.transfer(direction::OUT, SEC + MS);
    let late_request = old.event(EventKind::RequestStarted, SEC + MS);
    old.set_state(tcp_state::CLOSE, SEC + 2 * MS);
    let late_close = old.event(EventKind::Closed, SEC + 2 * MS);
    // The address's next connection, whose records were lost, found by a resync.
    let mut next = Kernel::new(role::SERVER, SEC + 3 * MS);
    next.state.flags = conn_flags::ESTABLISHED;
    next.transfer(direction::IN, SEC + 4 * MS);
    t.begin_resync();
    let mut out = Vec::new();
    t.resync_entries([(SOCK, next.state)], 2 * SEC, &mut out);
    assert_eq!(t.finish_resync().recovered, 1);
    let id = t.conn(SOCK).unwrap().id;
    // Then the ring's backlog: the earlier connection's records.
    assert!(feed(&mut t, late_request).is_empty());
    assert!(feed(&mut t, late_close).is_empty());
    assert_eq!(t.conn(SOCK).map(|c| c.id), Some(id));
    assert_eq!(t.stats().lost_closes, 0);
    assert_eq!(t.stats().late_records, 2);
    let stalls = sweep(&mut t, &mut next, SEC + 4 * MS + THRESHOLD);
    assert!(
        matches!(details(&stalls)[..], [Detail::StallStart { .. }]),
        "{stalls:?}"
    );
}

#[test]
fn a_resync_entry_older_than_an_address_reuse_leaves_the_new_connection_alone() {
    let mut t = tracker();
    let old = Kernel::new(role::SERVER, SEC);
    t.begin_resync();
    // Read by the walk; then the old connection closes (its record lost) and a new one gets
    // the same address, reported.
    let read = old.state;
    let mut next = Kernel::new(role::CLIENT, 3 * SEC);
    next.transfer(direction::OUT, 3 * SEC);
    let opened = feed(&mut t, next.event(EventKind::Established, 3 * SEC));
    assert_eq!(details(&opened), [&Detail::Open { adopted: false }]);
    let id = opened[0].conn.id;
    let mut out = Vec::new();
    t.resync_entries([(SOCK, read)], 4 * SEC, &mut out);
    t.finish_resync();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.conn(SOCK).map(|c| c.id), Some(id));
}

#[test]
fn a_resync_does_not_bring_back_a_connection_a_sweep_closed_as_lost_since() {
    let (mut t, mut k) = server_with_request();
    t.begin_resync();
    let read = k.state;
    // The walk read the entry; then it went (its close record lost), and sweeps close it.
    let mut out = Vec::new();
    for _ in 0..super::MISSING_SWEEPS_BEFORE_LOST {
        k.epoch += 1;
        t.sweep(3 * SEC, k.epoch, |_| None, &mut out);
    }
    assert_eq!(t.len(), 0);
    out.clear();
    t.resync_entries([(SOCK, read)], 3 * SEC, &mut out);
    assert_eq!(t.finish_resync().superseded, 1);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.len(), 0);
}

#[test]
fn a_resync_reports_a_connection_heard_of_since_it_began_but_never_reported() {
    // Tracked from its handshake, its owner unknown (a passive open): not reported yet.
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, SEC);
    k.state.tgid = 0;
    assert!(feed(&mut t, k.event(EventKind::Established, SEC)).is_empty());
    t.begin_resync();
    // The walk reads the entry after its first transfer (whose record was lost) told the
    // kernel its owner; a sweep reads it too.
    k.state.tgid = 4242;
    k.transfer(direction::IN, 2 * SEC);
    let read = k.state;
    sweep(&mut t, &mut k, 2 * SEC);
    let mut out = Vec::new();
    t.resync_entries([(SOCK, read)], 3 * SEC, &mut out);
    let found = t.finish_resync();
    assert_eq!(details(&out), [&Detail::Open { adopted: false }]);
    assert_eq!((found.recovered, found.superseded), (1, 0));
}

#[test]
fn a_resync_watches_a_known_connection_whose_lost_records_left_a_request_unseen() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    feed(&mut t, k.event(EventKind::Established, 0));
    for at in 1..=3 {
        assert!(sweep(&mut t, &mut k, at * SEC).is_empty());
    }
    assert!(!t.watched.contains_key(&SOCK), "idle: no longer re-read");
    // Its request goes out; the record is lost to a full ring buffer.
    k.transfer(direction::OUT, 4 * SEC);
    let mut out = Vec::new();
    let found = reconcile(&mut t, [(SOCK, k.state)], 5 * SEC, &mut out);
    assert_eq!(found.recovered, 0, "known already");
    assert!(out.is_empty(), "{out:?}");
    assert!(t.watched.contains_key(&SOCK), "the request makes it busy");
    let stalled = sweep(&mut t, &mut k, 4 * SEC + THRESHOLD);
    assert_started(&stalled, StallKind::AwaitingResponse);
}

#[test]
fn sweeps_stop_reading_when_their_time_is_up() {
    let mut t = tracker();
    t.set_sweep_budget(usize::MAX, std::time::Duration::ZERO);
    let mut out = Vec::new();
    let mut k = Kernel::new(role::SERVER, 0);
    k.transfer(direction::IN, SEC);
    let watched = 3 * super::SWEEP_CLOCK_EVERY;
    for i in 0..watched as u64 {
        let mut event = k.event(EventKind::Discovered, SEC);
        event.header.sock = SOCK + 64 * i;
        t.on_event(&event, &mut out);
    }
    let state = k.state;
    let mut reads = 0;
    t.sweep(
        2 * SEC,
        2,
        |_| {
            reads += 1;
            Some(state)
        },
        &mut out,
    );
    assert_eq!(
        reads,
        super::SWEEP_CLOCK_EVERY,
        "one stretch between looks at the clock"
    );
    // The next sweeps go on where it stopped: all are read in three.
    for epoch in 3..5 {
        t.sweep(
            2 * SEC,
            epoch,
            |_| {
                reads += 1;
                Some(state)
            },
            &mut out,
        );
    }
    assert_eq!(reads, watched);
}

#[test]
fn connections_are_found_by_id_and_endpoints_as_they_change() {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, SEC);
    k.state.tcp_state = tcp_state::SYN_SENT;
    k.state.flags = 0;
    k.state.local_port = 0;
    feed(&mut t, k.event(EventKind::ConnectStarted, SEC));
    let id = t.conns().next().unwrap().1.id;
    assert_eq!(t.find_by_id(id).map(|(sock, _)| sock), Some(Some(SOCK)));
    // connect() picks the local port after the SYN: the endpoint index follows.
    let early = Endpoints::from_kernel(&k.state);
    k.state.local_port = 40_000;
    k.set_state(tcp_state::ESTABLISHED, SEC + MS);
    feed(&mut t, k.event(EventKind::Established, SEC + MS));
    let endpoints = Endpoints::from_kernel(&k.state);
    assert_eq!(t.find_by_endpoints(&endpoints).map(|(_, c)| c.id), Some(id));
    assert!(t.find_by_endpoints(&early).is_none());
    assert_eq!(
        t.find_by_endpoints(&endpoints.reversed())
            .map(|(_, c)| c.id),
        None,
        "the other end is another connection"
    );
    k.set_state(tcp_state::CLOSE, 2 * SEC);
    feed(&mut t, k.event(EventKind::Closed, 2 * SEC));
    assert!(t.find_by_id(id).is_none());
    assert!(t.find_by_endpoints(&endpoints).is_none());
}

#[test]
fn adopted_connections_are_indexed_until_the_kernel_reports_them() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 50 * SEC);
    let endpoints = Endpoints::from_kernel(&k.state);
    let mut out = Vec::new();
    let adoption = Adoption {
        endpoints,
        role: Role::Server,
        owner: Owner::default(),
    };
    t.adopt(adoption.clone(), SEC, &mut out);
    let id = out[0].conn.id;
    assert_eq!(t.find_by_id(id).map(|(sock, _)| sock), Some(None));
    assert_eq!(t.find_by_endpoints(&endpoints).map(|(_, c)| c.id), Some(id));
    out.clear();
    t.adopt(adoption, SEC, &mut out);
    assert!(out.is_empty(), "adopted once");
    k.state.flags |= conn_flags::DISCOVERED;
    k.transfer(direction::IN, 50 * SEC);
    feed(&mut t, k.event(EventKind::Discovered, 50 * SEC));
    assert_eq!(t.find_by_id(id).map(|(sock, _)| sock), Some(Some(SOCK)));
    assert_eq!(t.len(), 1);
}

#[test]
fn the_stall_index_follows_starts_ends_and_closes() {
    let (mut t, mut k) = server_with_request();
    assert_eq!(t.stalled(), 0);
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    assert_eq!(t.stalled(), 1);
    assert_eq!(t.stalls().len(), 1);
    k.transfer(direction::OUT, 7 * SEC);
    feed(&mut t, k.event(EventKind::QuietEnded, 7 * SEC));
    assert_eq!(t.stalled(), 0);
    assert!(t.stalls().is_empty());
    k.transfer(direction::IN, 8 * SEC);
    sweep(&mut t, &mut k, 8 * SEC + THRESHOLD);
    assert_eq!(t.stalled(), 1);
    k.set_state(tcp_state::CLOSE, 20 * SEC);
    feed(&mut t, k.event(EventKind::Closed, 20 * SEC));
    assert_eq!(t.stalled(), 0);
}

#[test]
fn stalled_connections_are_re_read_once_a_second_not_every_sweep() {
    let (mut t, mut k) = server_with_request();
    sweep(&mut t, &mut k, SEC + THRESHOLD);
    assert_eq!(t.stalled(), 1);
    let reads = std::cell::Cell::new(0);
    let state = k.state;
    let mut out = Vec::new();
    for step in 1..=8u32 {
        let now = SEC + THRESHOLD + u64::from(step) * 250 * MS;
        t.sweep(
            now,
            step + 10,
            |_| {
                reads.set(reads.get() + 1);
                Some(state)
            },
            &mut out,
        );
    }
    assert_eq!(reads.get(), 2, "eight sweeps over two seconds");
    // Its end is still found by the next re-read, dated when the reply began.
    k.transfer(direction::OUT, 9 * SEC);
    let events = sweep(&mut t, &mut k, 9 * SEC + 500 * MS);
    assert_ended(
        &events,
        StallKind::UnansweredRequest,
        8_000,
        Resolution::Response,
    );
}

#[test]
fn a_request_nobody_reads_stays_stalled_until_it_is_answered() {
    for earlier_exchange in [false, true] {
        let mut t = tracker();
        let mut k = Kernel::new(role::SERVER, 0);
        if earlier_exchange {
            k.transfer(direction::IN, SEC);
            k.transfer(direction::OUT, SEC + MS);
        }
        feed(&mut t, k.event(EventKind::Discovered, 0));
        // The request arrived at 2 s and sits unread: no transfer, the kernel entry is idle.
        let mut out = Vec::new();
        assert!(t.request_unread(SOCK, Some(&k.state), 2 * SEC, 2 * SEC + THRESHOLD, &mut out));
        for step in 1..=12 {
            let now = 2 * SEC + THRESHOLD + step * 250 * MS;
            assert!(
                sweep(&mut t, &mut k, now).is_empty(),
                "earlier exchange {earlier_exchange}: nothing moved at {now}"
            );
        }
        assert_eq!(t.stalled(), 1);
        // Read at last, still unanswered: still stalled.
        k.transfer(direction::IN, 11 * SEC);
        assert!(sweep(&mut t, &mut k, 12 * SEC).is_empty());
        // Answered: the stall ends then.
        k.transfer(direction::OUT, 13 * SEC);
        let events = sweep(&mut t, &mut k, 14 * SEC);
        assert_ended(
            &events,
            StallKind::UnansweredRequest,
            11_000,
            Resolution::Response,
        );
    }
}

/// Conversations of real clients (see `replay/record.py`): each fixture's connection must get
/// its expected verdict at every pause of a second or more, and at its end.
#[test]
fn recorded_conversations_get_the_right_verdicts() {
    let fixtures = [
        (
            "grpc-channel-idle",
            include_str!("replay/grpc-channel-idle.txt"),
        ),
        (
            "grpc-call-unanswered",
            include_str!("replay/grpc-call-unanswered.txt"),
        ),
        (
            "tls13-pool-idle",
            include_str!("replay/tls13-pool-idle.txt"),
        ),
        (
            "tls13-after-requests-idle",
            include_str!("replay/tls13-after-requests-idle.txt"),
        ),
        (
            "websocket-one-way",
            include_str!("replay/websocket-one-way.txt"),
        ),
        // pg_receivewal streaming from an idle primary: a status update every 2 s, never
        // answered by design.
        (
            "postgres-walreceiver-idle",
            include_str!("replay/postgres-walreceiver-idle.txt"),
        ),
        (
            "openssl-tls13-idle",
            include_str!("replay/openssl-tls13-idle.txt"),
        ),
        // curl reusing its connection: the first request answered after 1.2 s, the second never.
        (
            "curl-keepalive-second-unanswered",
            include_str!("replay/curl-keepalive-second-unanswered.txt"),
        ),
        // socat sends a query and shuts its side down (FIN); the answer comes 6 s later.
        (
            "socat-half-close",
            include_str!("replay/socat-half-close.txt"),
        ),
    ];
    for (name, text) in fixtures {
        let expect = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name}: no `# expect:` line"));
        let expect_at_end = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect at end: "))
            .unwrap_or(expect);
        let mut kernel = Kernel::new(role::CLIENT, 0);
        let mut last_ms = None;
        let mut transfers = 0;
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let fields: Vec<&str> = line.split(' ').collect();
            let ms: u64 = fields[0].parse().unwrap();
            if last_ms.is_some_and(|last| ms >= last + 1_000) {
                assert_eq!(
                    verdict(&kernel.state),
                    expect,
                    "{name}: pause before {line:?}"
                );
            }
            last_ms = Some(ms);
            if let ["state", "FIN_WAIT1"] = fields[1..] {
                kernel.set_state(tcp_state::FIN_WAIT1, SEC + ms * MS);
                continue;
            }
            let [_, dir, len, hex] = fields[..] else {
                panic!("{name}: bad line {line:?}");
            };
            let mut data = hex_bytes(hex);
            data.resize(len.parse().unwrap(), 0);
            let dir = if dir == "out" {
                direction::OUT
            } else {
                direction::IN
            };
            kernel.transfer_bytes(dir, SEC + ms * MS, &data);
            transfers += 1;
        }
        assert!(transfers >= 2, "{name}: an empty recording proves nothing");
        assert_eq!(verdict(&kernel.state), expect_at_end, "{name}: at its end");
    }
}

fn verdict(state: &ConnState) -> &'static str {
    match super::activity::assess(state) {
        super::activity::Activity::Outstanding { .. } => "outstanding",
        _ => "idle",
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A connection whose close was never reported (its kernel entry vanished, e.g. the event was
/// lost) and that nothing re-reads any more is found by the audit and closed as lost, instead
/// of being listed for ever.
#[test]
fn an_idle_connection_whose_entry_vanished_is_closed_as_lost() {
    let (mut t, mut k) = server_with_request();
    k.transfer(direction::OUT, 2 * SEC);
    feed(&mut t, k.event(EventKind::RequestStarted, 2 * SEC));
    // Two sweeps: the reported connection is re-read, found idle and dropped from the watch
    // list... and the audit reads it again at every sweep, as it is the only one.
    sweep(&mut t, &mut k, 3 * SEC);
    sweep(&mut t, &mut k, 4 * SEC);
    assert_eq!(t.len(), 1);
    let mut out = Vec::new();
    for i in 0..u64::from(super::MISSING_SWEEPS_BEFORE_LOST) {
        t.sweep(5 * SEC + i, 10 + i as u32, |_| None, &mut out);
    }
    let [Event {
        detail: Detail::Close(summary),
        ..
    }] = &out[..]
    else {
        panic!("expected one conn.close, got {out:?}");
    };
    assert!(!summary.complete);
    assert_eq!(t.len(), 0);
    assert_eq!(t.stats().lost_closes, 1);
}

/// A UDP DNS client, its entry evolved by the kernel programs' datagram rule: a query resent
/// once, nothing back, the socket released while waiting.
#[test]
fn a_udp_query_stalls_counts_its_retry_and_ends_closed_at_release() {
    use stalltrace_common::{message::proto, transport, udp};
    let mut tracker = tracker();
    let mut kernel = Kernel::new(role::CLIENT, 0);
    kernel.state.transport = transport::UDP;
    kernel.state.proto = proto::DNS;
    kernel.state.peer_port = 53;
    udp::record_datagram(&mut kernel.state, direction::OUT, 40, 0, true, Some(7));
    let opened = feed(&mut tracker, kernel.event(EventKind::Discovered, 0));
    assert!(matches!(
        opened[..],
        [Event {
            detail: Detail::Open { .. },
            ..
        }]
    ));
    assert_eq!(opened[0].conn.endpoints.transport.as_str(), "udp");
    udp::record_datagram(
        &mut kernel.state,
        direction::OUT,
        40,
        3 * SEC,
        true,
        Some(7),
    );
    let started = sweep(&mut tracker, &mut kernel, THRESHOLD + SEC);
    assert!(
        matches!(
            started[..],
            [Event {
                detail: Detail::StallStart {
                    kind: StallKind::AwaitingResponse,
                    quiet_ms: 6_000,
                    ..
                },
                ..
            }]
        ),
        "the wait counts from the first query: {started:?}"
    );
    // Released: the kernel reports the stall's end, then the close.
    kernel.set_state(tcp_state::CLOSE, 8 * SEC);
    let ended = feed(&mut tracker, kernel.event(EventKind::QuietEnded, 8 * SEC));
    assert_eq!(
        ended.iter().map(|e| &e.detail).collect::<Vec<_>>(),
        [&Detail::StallEnd {
            kind: StallKind::AwaitingResponse,
            duration_ms: 8_000,
            resolution: Resolution::Closed,
            retries: 1,
            http2_stream: None,
            http2_late_streams: 0,
            http2_reset_by: None,
        }]
    );
    let closed = feed(&mut tracker, kernel.event(EventKind::Closed, 8 * SEC));
    assert!(matches!(
        closed[..],
        [Event {
            detail: Detail::Close(_),
            ..
        }]
    ));
    assert!(tracker.is_empty());
}

/// A Unix end as `unix.rs` in the kernel reports it: no addresses, inodes, the peer's sock.
fn unix_end(role_id: u8, inode: u64, peer_inode: u64, peer_sock: u64) -> Kernel {
    let mut kernel = Kernel::new(role_id, SEC);
    let state = &mut kernel.state;
    state.transport = stalltrace_common::transport::UNIX;
    state.family = stalltrace_common::AF_UNIX;
    (state.local_port, state.peer_port) = (0, 0);
    (state.local_addr, state.peer_addr) = ([0; 16], [0; 16]);
    (state.inode, state.peer_inode, state.peer_sock) = (inode, peer_inode, peer_sock);
    state.peer_tgid = 77;
    kernel
}

fn unix_names(local: &[u8], peer: &[u8]) -> stalltrace_common::UnixNames {
    let mut names = stalltrace_common::UnixNames {
        local_len: local.len() as u16,
        peer_len: peer.len() as u16,
        _pad: 0,
        local: [0; stalltrace_common::UNIX_PATH_MAX],
        peer: [0; stalltrace_common::UNIX_PATH_MAX],
    };
    names.local[..local.len()].copy_from_slice(local);
    names.peer[..peer.len()].copy_from_slice(peer);
    names
}

#[test]
fn unix_server_stalls_like_tcp_and_names_its_path() {
    let mut tracker = tracker();
    let mut server = unix_end(role::SERVER, 100, 101, 0xffff_8880_0000_2000);
    server.transfer(direction::IN, 2 * SEC);
    let mut out = Vec::new();
    let names = unix_names(b"/run/php/fpm.sock\0", b"");
    let record = server.event(EventKind::UnixDiscovered, 2 * SEC);
    tracker.on_unix_event(&record, &names, &mut out);
    assert!(matches!(out[0].detail, Detail::Open { adopted: false }));
    let unix = out[0].conn.unix.clone().expect("names carried");
    assert_eq!(unix.path(), "/run/php/fpm.sock");
    assert_eq!(unix.peer_pid, 77);
    assert_eq!(out[0].conn.endpoints, Endpoints::unix(100, 101));
    let stalled = sweep(&mut tracker, &mut server, 2 * SEC + THRESHOLD);
    assert!(matches!(
        stalled[0].detail,
        Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            ..
        }
    ));
    assert!(stalled[0].conn.unix.is_some(), "stall events name the path");
    // The daemon finds the socket released: a close with the entry's totals.
    server.set_state(tcp_state::CLOSE, 9 * SEC);
    let closed = feed(&mut tracker, server.event(EventKind::Closed, 9 * SEC));
    assert_ended(
        &closed[..1],
        StallKind::UnansweredRequest,
        7_000,
        Resolution::Closed,
    );
    assert!(matches!(&closed[1].detail, Detail::Close(c) if c.totals.bytes_received == 10));
}

#[test]
fn unix_idle_keep_alive_is_never_a_stall() {
    let mut tracker = tracker();
    let mut client = unix_end(role::CLIENT, 200, 201, 0xffff_8880_0000_2000);
    client.transfer(direction::OUT, 2 * SEC);
    let mut out = Vec::new();
    let record = client.event(EventKind::UnixDiscovered, 2 * SEC);
    tracker.on_unix_event(&record, &unix_names(b"", b"\0app"), &mut out);
    assert_eq!(out[0].conn.unix.as_ref().unwrap().path(), "@app");
    let autobound = unix_names(b"\0f00d1", b"\0app");
    let info = crate::tracker::model::UnixInfo::from_kernel(&client.state, &autobound);
    assert_eq!(
        info.path(),
        "@app",
        "the listener's name, not the client's own"
    );
    client.transfer(direction::IN, 2 * SEC + MS);
    for at in [10, 60, 600] {
        assert!(sweep(&mut tracker, &mut client, at * SEC).is_empty());
    }
}

#[test]
fn unix_ends_complete_each_others_inodes() {
    // The client wrote before the server accepted: its entry has no peer inode.
    let server_sock = 0xffff_8880_0000_2000;
    let mut tracker = tracker();
    let mut client = unix_end(role::CLIENT, 300, 0, server_sock);
    client.transfer(direction::OUT, 2 * SEC);
    feed(
        &mut tracker,
        client.event(EventKind::UnixDiscovered, 2 * SEC),
    );
    let mut server = unix_end(role::SERVER, 301, 300, SOCK);
    server.transfer(direction::IN, 3 * SEC);
    let mut event = server.event(EventKind::UnixDiscovered, 3 * SEC);
    event.header.sock = server_sock;
    feed(&mut tracker, event);
    let (_, found) = tracker
        .find_by_endpoints(&Endpoints::unix(300, 301))
        .expect("the client is found by the complete pair");
    assert_eq!(found.role, Role::Client);
    // The peer lookup the blame chain makes.
    let (sock, found) = tracker
        .find_by_endpoints(&Endpoints::unix(300, 301).reversed())
        .unwrap();
    assert_eq!((sock, found.role), (Some(server_sock), Role::Server));
    // A later snapshot of the client's entry (peer inode still 0) does not undo it.
    sweep(&mut tracker, &mut client, 4 * SEC);
    assert!(tracker
        .find_by_endpoints(&Endpoints::unix(300, 301))
        .is_some());
    // A thread blocked on a Unix socket fd is joined to its end by the fd's inode.
    let (sock, found) = tracker.find_unix_by_inode(301).unwrap();
    assert_eq!((sock, found.role), (Some(server_sock), Role::Server));
    assert!(tracker.find_unix_by_inode(999).is_none());
    client.set_state(tcp_state::CLOSE, 5 * SEC);
    feed(&mut tracker, client.event(EventKind::Closed, 5 * SEC));
    assert!(
        tracker.find_unix_by_inode(300).is_none(),
        "closed ends leave the index"
    );
}

#[test]
fn a_unix_connection_older_than_the_daemon_is_adopted_with_incomplete_totals() {
    let mut tracker = tracker();
    tracker.set_preexisting_unix([500].into());
    let mut old = unix_end(role::SERVER, 500, 501, 0);
    old.transfer(direction::IN, 2 * SEC);
    let opened = feed(&mut tracker, old.event(EventKind::UnixDiscovered, 2 * SEC));
    assert!(matches!(opened[0].detail, Detail::Open { adopted: true }));
    old.set_state(tcp_state::CLOSE, 3 * SEC);
    let closed = feed(&mut tracker, old.event(EventKind::Closed, 3 * SEC));
    assert!(matches!(&closed[0].detail, Detail::Close(c) if !c.complete));
    // A new connection is not.
    let mut new = unix_end(role::SERVER, 502, 503, 0);
    new.transfer(direction::IN, 4 * SEC);
    let opened = feed(&mut tracker, new.event(EventKind::UnixDiscovered, 4 * SEC));
    assert!(matches!(opened[0].detail, Detail::Open { adopted: false }));
}

#[test]
fn journald_stdout_streams_are_never_judged() {
    let mut tracker = tracker();
    // A service writes its logs; journald reads them and never answers.
    let mut service = unix_end(role::CLIENT, 600, 601, 0);
    service.transfer(direction::OUT, 2 * SEC);
    let mut out = Vec::new();
    let record = service.event(EventKind::UnixDiscovered, 2 * SEC);
    let names = unix_names(b"", b"/run/systemd/journal/stdout\0");
    tracker.on_unix_event(&record, &names, &mut out);
    assert!(out[0].conn.unix.as_ref().unwrap().one_way);
    assert!(sweep(&mut tracker, &mut service, 2 * SEC + 3 * THRESHOLD).is_empty());
    // Nor when the kernel reports the end of a quiet stretch on it.
    service.transfer(direction::OUT, 60 * SEC);
    assert!(feed(&mut tracker, service.event(EventKind::QuietEnded, 60 * SEC)).is_empty());
}

fn sweep_http1(
    tracker: &mut Tracker,
    kernel: &mut Kernel,
    head: &stalltrace_common::http1::ReplyHead,
    now: u64,
) -> Vec<Event> {
    sweep_pipelined(tracker, kernel, head, None, now)
}

/// A sweep that finds `head` and `run` in the kernel's HTTP/1.x maps.
fn sweep_pipelined(
    tracker: &mut Tracker,
    kernel: &mut Kernel,
    head: &stalltrace_common::http1::ReplyHead,
    run: Option<&stalltrace_common::http1::RequestRun>,
    now: u64,
) -> Vec<Event> {
    kernel.epoch += 1;
    let mut out = Vec::new();
    let state = kernel.state;
    tracker.sweep_with_heads(
        now,
        kernel.epoch,
        |sock| (sock == SOCK).then_some(state),
        |sock| (sock == SOCK).then_some(*head),
        |sock| run.filter(|_| sock == SOCK).copied(),
        &mut out,
    );
    out
}

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n";

/// A server that got `GET /big` at 1 s and sent the head and 100 bytes of the body at 2 s.
fn server_mid_response() -> (Tracker, Kernel, stalltrace_common::http1::ReplyHead) {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 0);
    k.transfer_bytes(direction::IN, SEC, b"GET /big HTTP/1.1\r\n\r\n");
    feed(&mut t, k.event(EventKind::Discovered, SEC));
    let start = [RESPONSE, &[b'a'; 100]].concat();
    k.transfer_bytes(direction::OUT, 2 * SEC, &start);
    let head = super::framing::test_head(b"GET /big HTTP/1.1", &start, 2 * SEC, 0);
    (t, k, head)
}

#[test]
fn a_response_short_of_its_length_is_a_stall_until_it_moves_again() {
    let (mut t, mut k, head) = server_mid_response();
    assert_eq!(sweep_http1(&mut t, &mut k, &head, 3 * SEC), []);
    let started = sweep_http1(&mut t, &mut k, &head, 2 * SEC + THRESHOLD);
    assert!(
        matches!(
            details(&started)[..],
            [Detail::StallStart {
                kind: StallKind::ResponseIncomplete,
                quiet_ms: 5_000,
                ..
            }]
        ),
        "{started:?}"
    );
    assert_eq!(
        t.conn(SOCK).unwrap().stall.as_ref().unwrap().owed_bytes,
        Some(9_900)
    );
    k.transfer_bytes(direction::OUT, 9 * SEC, &[b'a'; 9_900]);
    let ended = feed(&mut t, k.event(EventKind::ReplyResumed, 9 * SEC));
    assert_ended(
        &ended,
        StallKind::ResponseIncomplete,
        7_000,
        Resolution::Response,
    );
    assert_eq!(
        sweep_http1(&mut t, &mut k, &head, 20 * SEC),
        [],
        "complete: idle"
    );
}

#[test]
fn a_response_pause_between_two_sweeps_is_reported_when_it_ends() {
    let (mut t, mut k, head) = server_mid_response();
    assert_eq!(sweep_http1(&mut t, &mut k, &head, 3 * SEC), []);
    // Resumed at 7.5 s: past the threshold, before the next sweep saw it.
    k.transfer_bytes(direction::OUT, 7_500 * MS, &[b'a'; 100]);
    let events = feed(&mut t, k.event(EventKind::ReplyResumed, 7_500 * MS));
    assert!(
        matches!(
            details(&events)[..],
            [
                Detail::StallStart {
                    kind: StallKind::ResponseIncomplete,
                    ..
                },
                Detail::StallEnd {
                    kind: StallKind::ResponseIncomplete,
                    duration_ms: 5_500,
                    resolution: Resolution::Response,
                    ..
                }
            ]
        ),
        "{events:?}"
    );
    assert_eq!(
        events[0].at_ns,
        2 * SEC + THRESHOLD,
        "dated when it crossed the threshold"
    );
}

/// A client that sent `GET /big` at 1 s (an HTTP/1.x connection).
fn client_asked_big() -> (Tracker, Kernel) {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    k.transfer_bytes(direction::OUT, SEC, b"GET /big HTTP/1.1\r\n\r\n");
    feed(&mut t, k.event(EventKind::Discovered, SEC));
    (t, k)
}

#[test]
fn a_response_that_came_by_splice_is_not_judged_and_no_head_was_lost() {
    // A TCP-mode proxy's backend connection: the request went by send(), the response
    // arrived by splice (the kernel counted its bytes, could read none: tail unknown).
    let (mut t, mut k) = client_asked_big();
    record_transfer(&mut k.state, direction::IN, 500, 2 * SEC, Message::Data);
    k.state.reply_tail = stalltrace_common::http1::TAIL_UNKNOWN;
    for now in [3 * SEC, 30 * SEC] {
        k.epoch += 1;
        let (state, mut out) = (k.state, Vec::new());
        t.sweep_with_heads(now, k.epoch, |_| Some(state), |_| None, |_| None, &mut out);
        assert_eq!(out, [], "not judged: no framing known");
    }
    assert_eq!(t.stats().reply_heads_missed, 0);
    // A head the kernel did copy, gone by the sweep (evicted): counted.
    let (mut t, mut k) = client_asked_big();
    k.transfer_bytes(direction::IN, 2 * SEC, RESPONSE);
    let (state, mut out) = (k.state, Vec::new());
    t.sweep_with_heads(3 * SEC, 2, |_| Some(state), |_| None, |_| None, &mut out);
    assert_eq!(t.stats().reply_heads_missed, 1);
}

#[test]
fn a_complete_response_leaves_an_idle_keep_alive_connection() {
    let mut t = tracker();
    let mut k = Kernel::new(role::SERVER, 0);
    k.transfer_bytes(direction::IN, SEC, b"GET /small HTTP/1.1\r\n\r\n");
    feed(&mut t, k.event(EventKind::Discovered, SEC));
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    k.transfer_bytes(direction::OUT, 2 * SEC, response);
    let head = super::framing::test_head(b"GET /small HTTP/1.1", response, 2 * SEC, 0);
    for now in [3 * SEC, 10 * SEC, 60 * SEC] {
        assert_eq!(sweep_http1(&mut t, &mut k, &head, now), []);
    }
}

const PIPELINED: &[u8] = b"GET /fast HTTP/1.1\r\n\r\nGET /slow HTTP/1.1\r\n\r\n";
const FAST: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfast";

/// A client that wrote two requests at 1 s and read the first response at 2 s.
fn client_pipelined() -> (
    Tracker,
    Kernel,
    stalltrace_common::http1::ReplyHead,
    stalltrace_common::http1::RequestRun,
) {
    let mut t = tracker();
    let mut k = Kernel::new(role::CLIENT, 0);
    k.transfer_bytes(direction::OUT, SEC, PIPELINED);
    feed(&mut t, k.event(EventKind::RequestStarted, SEC));
    k.transfer_bytes(direction::IN, 2 * SEC, FAST);
    let head = super::framing::test_head(PIPELINED, FAST, 2 * SEC, 0);
    let run = super::pipeline::tests::test_run(PIPELINED, k.state.requests, 0);
    (t, k, head, run)
}

#[test]
fn a_pipelined_request_behind_a_fast_one_is_a_stall_until_its_response_starts() {
    let (mut t, mut k, head, run) = client_pipelined();
    assert_eq!(
        sweep_pipelined(&mut t, &mut k, &head, Some(&run), 3 * SEC),
        []
    );
    let started = sweep_pipelined(&mut t, &mut k, &head, Some(&run), 2 * SEC + THRESHOLD);
    assert!(
        matches!(
            details(&started)[..],
            [Detail::StallStart {
                kind: StallKind::AwaitingResponse,
                quiet_ms: 5_000,
                ..
            }]
        ),
        "quiet since the first response ended: {started:?}"
    );
    let conn = t.conn(SOCK).unwrap();
    assert!(conn.pipelined_request().unwrap().starts_with(b"GET /slow"));
    k.transfer_bytes(direction::IN, 8 * SEC, FAST);
    let ended = feed(&mut t, k.event(EventKind::ReplyResumed, 8 * SEC));
    assert_ended(
        &ended,
        StallKind::AwaitingResponse,
        6_000,
        Resolution::Response,
    );
    assert_eq!(
        sweep_pipelined(&mut t, &mut k, &head, Some(&run), 20 * SEC),
        [],
        "answered: idle"
    );
}

#[test]
fn a_pipelined_stall_whose_response_event_was_lost_ends_at_the_next_sweep() {
    let (mut t, mut k, head, run) = client_pipelined();
    sweep_pipelined(&mut t, &mut k, &head, Some(&run), 3 * SEC);
    sweep_pipelined(&mut t, &mut k, &head, Some(&run), 2 * SEC + THRESHOLD);
    k.transfer_bytes(direction::IN, 8 * SEC, FAST);
    let ended = sweep_pipelined(&mut t, &mut k, &head, Some(&run), 9 * SEC);
    assert_ended(
        &ended,
        StallKind::AwaitingResponse,
        6_000,
        Resolution::Response,
    );
}

#[test]
fn pipelined_requests_all_answered_are_never_a_stall() {
    let (mut t, mut k, _, run) = client_pipelined();
    k.transfer_bytes(direction::IN, 2 * SEC, FAST);
    let both = [FAST, FAST].concat();
    let head = super::framing::test_head(PIPELINED, &both, 2 * SEC, 0);
    for now in [3 * SEC, 10 * SEC, 60 * SEC] {
        assert_eq!(sweep_pipelined(&mut t, &mut k, &head, Some(&run), now), []);
    }
}
