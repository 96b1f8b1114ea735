//! The hot path: every send/receive on a socket, from the raw tracepoints
//! `sock_send_length` and `sock_recv_length`. They fire only for sockets (never for files or
//! pipes), after the transfer, with its byte count; as *raw* tracepoints they pass their
//! arguments without building a trace record, which is most of a classic tracepoint's cost.
//! Kernels without them (< 6.3) reach the same path (`on_transfer`) from the TCP send/receive
//! functions instead (`transfer_functions.rs`).
//!
//! Work per call on a tracked connection: one map lookup and a few stores; an event only when a
//! connection's first request starts, a request starts on a connection not yet reported this
//! epoch, or a stall ends. Only TCP, UDP and Unix stream connections are in the map, so a miss
//! is either another kind of socket (checked by reading its family and protocol) or a
//! connection the map does not hold yet (every Unix and UDP one starts so: `unix.rs`,
//! `udp.rs`).
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext, EbpfContext};
use aya_log_ebpf::debug;
use stalltrace_common::{
    conn_flags, direction, http1, http2, loss,
    message::{classify, proto, Head, Message},
    tcp_state,
    transfer::{ends_quiet, is_tls_client, look, record_transfer, Look, Turn},
    transport, verdict_flags, Capture, ConnState, EventKind, AF_INET, AF_INET6, AF_UNIX,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    capture::{bytes_at, capture_request, reply_head},
    conn::{emit, emit_request, guess_role, insert_new, set_netns, set_owner_to_current},
    kernel_read::{consumed_bytes, read_endpoints, socket_family, tcp_state_of},
    libssl,
    maps::{
        count_loss, current_epoch, http1_framed, scratch_conn, stall_after_ns, verdict_extras,
        CONNS, OFFSETS, SPLICE_READS, UDP_TRACED,
    },
    tls_queue, udp, unix,
};

const MSG_PEEK: i32 = 2;

// TP_PROTO(struct sock *sk, int ret, int flags)
const ARG_SOCK: usize = 0;
const ARG_RET: usize = 1;
const ARG_FLAGS: usize = 2;

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub(crate) fn stalltrace_recv(ctx: RawTracePointContext) -> i32 {
    // Integer arguments arrive widened to u64.
    transfer::<_, true, true>(
        &ctx,
        ctx.arg::<u64>(ARG_SOCK),
        direction::IN,
        ctx.arg::<u64>(ARG_RET) as i32,
        ctx.arg::<u64>(ARG_FLAGS) as i32,
    );
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub(crate) fn stalltrace_send(ctx: RawTracePointContext) -> i32 {
    transfer::<_, true, true>(
        &ctx,
        ctx.arg::<u64>(ARG_SOCK),
        direction::OUT,
        ctx.arg::<u64>(ARG_RET) as i32,
        0,
    );
    0
}

/// One send (`dir` OUT) or receive (IN) on `sock` that returned `ret` (bytes moved, or a
/// negative errno), with the call's `flags` (receives only), from a fallback rung's hook
/// (`transfer_functions.rs`, `syscall_transfers.rs`). Their programs leave HTTP/2 streams to
/// the direction rule: the frame walk's `bpf_loop` callback is a function pointer, which
/// kernels before 5.13 refuse anywhere in a program, even where it never runs; the sock
/// tracepoints (6.3) are on every kernel that loads the walk (6.5).
#[inline(always)]
pub(crate) fn on_transfer<C: EbpfContext>(ctx: &C, sock: u64, dir: u8, ret: i32, flags: i32) {
    transfer::<C, true, false>(ctx, sock, dir, ret, flags);
}

/// Bytes moved on `sock` (below 2^31) through no buffer of the calling process: counted and
/// judged like any transfer, nothing read (`splice.rs`). The per-protocol code that reads the
/// syscall's buffer is left out of the program at compile time: with it, the verifier would
/// walk the HTTP/1.x and HTTP/2 code again in that program, past its 1M-instruction limit.
#[inline(always)]
pub(crate) fn on_unread_transfer<C: EbpfContext>(ctx: &C, sock: u64, dir: u8, bytes: i32) {
    transfer::<C, false, false>(ctx, sock, dir, bytes, 0);
}

/// [`on_transfer`]; `BUFFER`: the syscall's buffer holds the bytes moved; `HTTP2`: the
/// program walks HTTP/2 frames (the sock tracepoints').
#[inline(always)]
fn transfer<C: EbpfContext, const BUFFER: bool, const HTTP2: bool>(
    ctx: &C,
    sock: u64,
    dir: u8,
    ret: i32,
    flags: i32,
) {
    if ret <= 0 {
        return;
    }
    if dir == direction::IN && flags & MSG_PEEK != 0 {
        return;
    }
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    let bytes = ret as u64;
    let conn = match CONNS.get_ptr_mut(sock) {
        // SAFETY: map value pointer, valid for the duration of the program.
        Some(conn) if unix::still_same(sock, unsafe { &*conn }) => conn,
        // SAFETY: as above.
        Some(stale) => match unix::replace(ctx, sock, unsafe { &mut *stale }, dir, now) {
            Some(conn) => conn,
            None => return,
        },
        None => match discover(ctx, sock, dir, bytes, now) {
            Some(conn) => conn,
            None => return,
        },
    };
    // An HTTP/2 connection whose streams are followed is judged per stream. First, so that
    // the verifier walks the frames once, not once per outcome of the classification below;
    // and before any reference to the entry is made, as the walk (a global function) looks
    // it up and writes it itself. Only with the verdict extras (they imply capture: the walk
    // reads the syscall's buffer).
    if BUFFER && HTTP2 && verdict_extras() {
        // SAFETY: map value pointer, valid for the duration of the program; the shared
        // reference ends before the call.
        let state = unsafe { &*conn };
        if state.transport != transport::UDP
            && (http2::tracking(state) || http2::may_start(state, dir))
        {
            crate::http2::stalltrace_http2_transfer(sock, u64::from(dir), ret as u64, now);
        }
    }
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    if conn.transport == transport::UDP {
        // Never true where UDP is not traced; the constant lets the verifier drop the UDP
        // path there (it calls helpers older kernels lack).
        if UDP_TRACED.load() != 0 {
            udp::record(sock, conn, dir, bytes, now);
        }
    } else {
        record::<BUFFER>(sock, conn, dir, bytes, now);
    }
}

#[inline(always)]
fn record<const BUFFER: bool>(sock: u64, conn: &mut ConnState, dir: u8, bytes: u64, now: u64) {
    // Frames that cannot be read (`transfer` walks the others): the framing is lost here.
    if !BUFFER && verdict_extras() && http2::tracking(conn) {
        http2::lose(conn);
        count_loss(loss::HTTP2_FRAMING_LOST);
    }
    let new_owner = set_owner_to_current(conn);
    // Only a run that may start a request, or answer one with housekeeping in between, has
    // its first bytes read: to tell data from protocol housekeeping, and to name requests.
    let (message, capture) = match look(conn, dir) {
        Look::Skip => (Message::Data, None),
        _ if !BUFFER => (Message::Data, None),
        Look::Request => read_message(sock, conn, bytes, now),
        look @ (Look::Continuation | Look::Reply) => {
            (read_housekeeping(sock, conn, look, bytes), None)
        }
    };
    let reply = if !verdict_extras() {
        http1::Reply::Skip
    } else {
        match http1::reply(conn, dir) {
            http1::Reply::Skip => http1::Reply::Skip,
            _ if !http1_framed() => http1::Reply::Skip,
            reply => reply,
        }
    };
    let quiet_ended = if verdict_extras() && http2::tracking(conn) {
        conn.h2_answered_late != 0
    } else {
        ends_quiet(conn, dir, message, now, stall_after_ns())
    };
    let resumed = http1::resumes_after_quiet(conn, reply, now, stall_after_ns());
    let turn = record_transfer(conn, dir, bytes, now, message);
    if reply != http1::Reply::Skip {
        if BUFFER {
            crate::http1::on_reply(sock, conn, reply, bytes, now);
        } else {
            // Nothing of the response can be read: its framing is not judged.
            conn.reply_tail = stalltrace_common::http1::TAIL_UNKNOWN;
        }
    }
    if verdict_extras() {
        let copy = http1::run_copy(conn, dir, turn);
        if copy != http1::RunCopy::Skip && http1_framed() {
            if BUFFER {
                crate::http1::on_request_run(sock, conn, copy, bytes, capture.as_deref());
            } else {
                // A gap in the run's copy: its requests are not counted.
                conn.verdict_flags &= !verdict_flags::REQUEST_RUN_OPEN;
            }
        }
    }
    report(sock, conn, new_owner, quiet_ended, turn, capture);
    if resumed {
        emit(EventKind::ReplyResumed, sock, conn);
    }
}

/// Reports what a transfer did to `conn`, if the daemon must hear of it: a new owner (with the
/// request's bytes when captured), the end of a quiet stretch past the threshold, a sampled
/// exchange's completion, or a request start not yet reported this epoch. Shared by the TCP and
/// UDP paths (`udp.rs`).
#[inline(always)]
pub(crate) fn report(
    sock: u64,
    conn: &mut ConnState,
    new_owner: bool,
    quiet_ended: bool,
    turn: Turn,
    capture: Option<&'static mut Capture>,
) {
    if new_owner {
        // A passive connection's first transfer is usually its first request: sample it.
        match capture {
            Some(capture) => {
                conn.flags |= conn_flags::SAMPLED;
                emit_request(EventKind::Discovered, sock, conn, capture);
            }
            None => emit(EventKind::Discovered, sock, conn),
        }
    } else if quiet_ended {
        conn.flags &= !conn_flags::SAMPLED;
        // With the request's copy: the daemon reads this record after the next request may
        // have replaced the copy in the slot (a stall that ended between two sweeps).
        match crate::capture::held(sock) {
            Some(capture) => emit_request(EventKind::QuietEnded, sock, conn, capture),
            None => emit(EventKind::QuietEnded, sock, conn),
        }
    } else if turn == Turn::ReplyStarted && conn.flags & conn_flags::SAMPLED != 0 {
        conn.flags &= !conn_flags::SAMPLED;
        emit(EventKind::ExchangeCompleted, sock, conn);
    } else if turn == Turn::RequestStarted
        && (conn.requests == 1 || conn.notified_epoch != current_epoch())
    {
        // One request per connection and epoch is reported, with its bytes; its completion
        // follows. These samples feed `stalltrace why`. A connection's first request is
        // reported even in the epoch of its open: a client's open was reported at connect(),
        // and its first request would otherwise never be sampled, unlike a server's (sampled
        // at its first transfer, above). Cost: one more ring record per client connection.
        conn.flags |= conn_flags::SAMPLED;
        match capture {
            Some(capture) => emit_request(EventKind::RequestStarted, sock, conn, capture),
            None => emit(EventKind::RequestStarted, sock, conn),
        }
    }
}

/// Captures the first bytes of a run in the request direction and classifies them. A capture
/// that is not a request is released (its slot no longer names this connection).
#[inline(never)]
fn read_message(
    sock: u64,
    conn: &mut ConnState,
    bytes: u64,
    now: u64,
) -> (Message, Option<&'static mut Capture>) {
    let Some(capture) = capture_request(sock, bytes, now) else {
        return (Message::Data, None);
    };
    let head = Head::new(&capture.bytes, capture.len as usize, bytes);
    let message = classify(conn, Look::Request, &head, bytes_at);
    if message == Message::Data {
        if verdict_extras() && conn.proto == proto::TLS {
            // A TLS client's request remembers what was queued unread; a server's, read
            // inside `SSL_read`, is named from its plaintext at the return (`libssl.rs`).
            if is_tls_client(conn) {
                tls_queue::mark(sock, conn);
            } else {
                libssl::request_inside_ssl_read(sock, &mut conn.flags);
            }
        }
        (message, Some(capture))
    } else {
        capture.sock = 0;
        (message, None)
    }
}

/// Classifies a transfer that continues or may answer an outstanding request, from its first
/// bytes read into this CPU's scratch slot (never reported). A TLS client's receive (its
/// records are encrypted: nothing to read) is housekeeping while it reads bytes queued before
/// the request (`tls_queue.rs`), or inside `SSL_read`, whose return takes the reply turn
/// (`libssl.rs`).
#[inline(never)]
fn read_housekeeping(sock: u64, conn: &mut ConnState, look: Look, bytes: u64) -> Message {
    if verdict_extras() && look == Look::Reply && is_tls_client(conn) {
        let queued = tls_queue::received_before(sock, conn, bytes);
        return if libssl::inside_ssl_read(sock, &mut conn.flags) || queued {
            Message::Control
        } else {
            Message::Data
        };
    }
    match reply_head(bytes) {
        Some(head) => {
            let head = Head::new(&head.bytes, head.len as usize, bytes);
            classify(conn, look, &head, bytes_at)
        }
        None => Message::Data,
    }
}

/// A transfer on a socket the map does not hold. A TCP connection is tracked and reported
/// here, its transfer recorded; a new Unix connection's entry is returned for the caller to
/// record the transfer on (its first bytes are read: it is seen from its first transfer).
#[inline(never)]
fn discover<C: EbpfContext>(
    ctx: &C,
    sock: u64,
    dir: u8,
    bytes: u64,
    now: u64,
) -> Option<*mut ConnState> {
    let offsets = OFFSETS.load();
    let family = match socket_family(sock, &offsets)? {
        (AF_UNIX, _) => return unix::discover(ctx, sock, dir, now),
        (family, IPPROTO_UDP) if family == AF_INET || family == AF_INET6 => {
            if UDP_TRACED.load() != 0 {
                udp::discover(sock, family, dir, bytes, now);
            }
            return None;
        }
        (family, IPPROTO_TCP) if family == AF_INET || family == AF_INET6 => family,
        _ => return None,
    };
    // Data read after the close (it arrived with the peer's FIN) belongs to a connection
    // that already ended: tracking it anew would report a phantom connection.
    if !matches!(
        tcp_state_of(sock, &offsets),
        Some(
            tcp_state::ESTABLISHED
                | tcp_state::CLOSE_WAIT
                | tcp_state::FIN_WAIT1
                | tcp_state::FIN_WAIT2
        )
    ) {
        return None;
    }
    let Some(conn) = scratch_conn(sock, now) else {
        return None;
    };
    conn.family = family;
    conn.tcp_state = tcp_state::ESTABLISHED;
    conn.flags = conn_flags::DISCOVERED | conn_flags::ESTABLISHED;
    if !read_endpoints(sock, family, &offsets, conn) {
        debug!(ctx, "cannot read the endpoints of TCP socket {:x}", sock);
        return None;
    }
    set_netns(sock, conn);
    conn.role = guess_role(conn);
    set_owner_to_current(conn);
    // Its first bytes are not read: the direction rule alone, until its next request.
    record_transfer(conn, dir, bytes, now, Message::Data);
    if SPLICE_READS.load() != 0 {
        // What was read before counting began, so that splices count from here (`splice.rs`).
        // Unknown: a base of 0, as for a connection counted from its handshake.
        let counted = conn.bytes_recv as u32;
        conn.consumed_base = consumed_bytes(sock, &offsets, counted).wrapping_sub(counted);
    }
    if !insert_new(ctx, sock, conn) {
        return None;
    }
    if let Some(conn) = CONNS.get_ptr_mut(sock) {
        // SAFETY: map value pointer, valid for the duration of the program.
        emit(EventKind::Discovered, sock, unsafe { &mut *conn });
    }
    None
}
