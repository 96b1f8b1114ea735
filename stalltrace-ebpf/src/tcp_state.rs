//! Connection lifecycle from `sock/inet_sock_set_state`: active and passive opens, closes,
//! resets and the set of listening ports.
use aya_ebpf::{bindings::BPF_ANY, macros::tracepoint, programs::TracePointContext, EbpfContext};
use stalltrace_common::{
    conn_flags, direction, http2, listen_key, loss,
    message::Message,
    role, tcp_state,
    tracepoint::InetSockSetState,
    transfer::{
        can_complete, counted_reads, is_outstanding, quiet_past_threshold, record_transfer,
        reply_at_peer_fin,
    },
    verdict_flags, ConnState, EventKind, AF_INET6, IPPROTO_TCP,
};

use crate::{
    conn::{emit, guess_role, netns_of, set_netns, set_owner_to_current},
    kernel_read::{consumed_bytes, unread_sequence},
    maps::{
        count_loss, scratch_conn, stall_after_ns, verdict_extras, CONNS, LISTEN_PORTS, OFFSETS,
    },
    words::{copy_addr16, copy_addr4},
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub(crate) fn stalltrace_tcp_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the context of this tracepoint is a InetSockSetState record.
    let args = unsafe { &*(ctx.as_ptr() as *const InetSockSetState) };
    if args.protocol != IPPROTO_TCP {
        return 0;
    }
    let (old, new) = (args.oldstate as u8, args.newstate as u8);
    match new {
        tcp_state::LISTEN => add_listener(listen_key(netns_of(args.skaddr), args.sport)),
        tcp_state::CLOSE if old == tcp_state::LISTEN => {
            remove_listener(listen_key(netns_of(args.skaddr), args.sport))
        }
        // A passive child is cloned from its listener, so it starts "from" LISTEN.
        tcp_state::SYN_RECV => {}
        tcp_state::SYN_SENT => on_connect(args),
        tcp_state::ESTABLISHED if old == tcp_state::SYN_SENT => on_active_established(args),
        tcp_state::ESTABLISHED if old == tcp_state::SYN_RECV => on_passive_established(args),
        _ => on_other_transition(args, old, new),
    }
    0
}

/// `key`: [`listen_key`] of the port in its socket's namespace.
fn add_listener(key: u64) {
    match LISTEN_PORTS.get_ptr_mut(key) {
        // SAFETY: map value pointer; listen/close on one port race only in exotic setups, and a
        // wrong count only affects the role guessed for pre-existing connections.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = LISTEN_PORTS.insert(key, 1u32, BPF_ANY.into());
        }
    }
}

fn remove_listener(key: u64) {
    if let Some(count) = LISTEN_PORTS.get_ptr_mut(key) {
        // SAFETY: as in add_listener.
        unsafe {
            if *count > 1 {
                *count -= 1;
                return;
            }
        }
        let _ = LISTEN_PORTS.remove(key);
    }
}

/// A zeroed scratch entry for a connection that just opened, filled from the tracepoint.
fn new_conn(args: &InetSockSetState, conn_role: u8, now: u64) -> Option<&'static mut ConnState> {
    let conn = scratch_conn(args.skaddr, now)?;
    conn.role = conn_role;
    conn.tcp_state = args.newstate as u8;
    conn.family = args.family;
    fill_endpoints(args, conn);
    set_netns(args.skaddr, conn);
    Some(conn)
}

fn insert(sock: u64, conn: &ConnState) {
    // A stale entry for a reused sock address would have been removed at its CLOSE; replace it.
    if CONNS.insert(sock, conn, BPF_ANY.into()).is_err() {
        count_loss(loss::CONN_INSERT_FAILED);
    }
}

fn fill_endpoints(args: &InetSockSetState, conn: &mut ConnState) {
    conn.local_port = args.sport;
    conn.peer_port = args.dport;
    // SAFETY: fields of the tracepoint record, aligned as the copies require.
    unsafe {
        if args.family == AF_INET6 {
            copy_addr16(&mut conn.local_addr, &args.saddr_v6);
            copy_addr16(&mut conn.peer_addr, &args.daddr_v6);
        } else {
            copy_addr4(&mut conn.local_addr, &args.saddr);
            copy_addr4(&mut conn.peer_addr, &args.daddr);
        }
    }
}

/// `connect()` runs in the caller's context, so the process is known here. The local port may
/// still be 0 (it is chosen right after); `Established` or a retransmit fills it in.
fn on_connect(args: &InetSockSetState) {
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    let Some(conn) = new_conn(args, role::CLIENT, now) else {
        return;
    };
    set_owner_to_current(conn);
    emit(EventKind::ConnectStarted, args.skaddr, conn);
    insert(args.skaddr, conn);
}

/// Runs in softirq context: the current task is unrelated, so the owner comes from the
/// `connect()` seen earlier, or from the first transfer.
fn on_active_established(args: &InetSockSetState) {
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    if let Some(conn) = CONNS.get_ptr_mut(args.skaddr) {
        // SAFETY: map value pointer, valid for the duration of the program.
        let conn = unsafe { &mut *conn };
        fill_endpoints(args, conn);
        conn.tcp_state = tcp_state::ESTABLISHED;
        conn.state_ns = now;
        conn.flags |= conn_flags::ESTABLISHED;
        emit(EventKind::Established, args.skaddr, conn);
    } else {
        // The connect() predates the daemon: track it; the first transfer names the owner.
        if let Some(conn) = new_conn(args, role::CLIENT, now) {
            conn.flags |= conn_flags::ESTABLISHED | conn_flags::DISCOVERED;
            insert(args.skaddr, conn);
        }
    }
}

/// A passive connection completed its handshake and waits in the accept queue. Runs in softirq
/// context: its owner is learnt at its first transfer.
fn on_passive_established(args: &InetSockSetState) {
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    if let Some(conn) = new_conn(args, role::SERVER, now) {
        conn.flags |= conn_flags::ESTABLISHED;
        emit(EventKind::Established, args.skaddr, conn);
        insert(args.skaddr, conn);
    }
}

/// Closing transitions. An outstanding exchange ends when this side can no longer complete it
/// (`can_complete`: a half-closed connection still can on its open side); reaching CLOSE ends
/// the connection.
fn on_other_transition(args: &InetSockSetState, old: u8, new: u8) {
    let Some(conn) = CONNS.get_ptr_mut(args.skaddr) else {
        match new {
            tcp_state::CLOSE => report_untracked_close(args, old),
            tcp_state::CLOSE_WAIT | tcp_state::FIN_WAIT1 => track_half_closed(args, new),
            _ => {}
        }
        return;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    // An HTTP/2 connection whose streams are followed: its oldest stream awaiting a response.
    // Only with the verdict extras (the walk that follows them): the verifier drops it elsewhere.
    let quiet_ended = if verdict_extras() && http2::tracking(conn) {
        let overdue = http2::quiet_past_threshold(conn, now, stall_after_ns());
        if overdue {
            http2::end_oldest(conn);
        }
        overdue
    } else {
        quiet_past_threshold(conn, now, stall_after_ns())
    };
    if new == tcp_state::CLOSE_WAIT && conn.role != role::SERVER {
        note_reply_at_peer_fin(args.skaddr, conn);
    }
    let exchange_ends = can_complete(conn, old) && !can_complete(conn, new);
    if exchange_ends && conn.role == role::CLIENT && is_outstanding(conn) {
        count_unread_reply(args.skaddr, conn, old, new, now);
    }
    conn.tcp_state = new;
    conn.state_ns = now;
    if new == tcp_state::CLOSE
        && matches!(
            old,
            tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::SYN_RECV
        )
    {
        // Closed without the FIN handshake: a reset sent or received.
        conn.flags |= conn_flags::ABORTED;
    }
    if quiet_ended && exchange_ends {
        emit(EventKind::QuietEnded, args.skaddr, conn);
    }
    if new == tcp_state::CLOSE {
        emit(EventKind::Closed, args.skaddr, conn);
        if verdict_extras() {
            crate::http2::forget(args.skaddr, conn);
        }
        let _ = CONNS.remove(args.skaddr);
    }
}

/// The peer's FIN reached a client: whether a reply came that it has not been seen reading
/// (unread, or being read: `transfer::reply_at_peer_fin`), which alone can still answer its
/// request (`can_complete` in `CLOSE_WAIT`). Without it, the exchange ends with this FIN.
#[inline(never)]
fn note_reply_at_peer_fin(sock: u64, conn: &mut ConnState) {
    let offsets = OFFSETS.load();
    // A queue that cannot be read is taken for a reply (the rule before it could: wait for a
    // read); bytes read that cannot be told are taken for none.
    let reply = match unread_sequence(sock, &offsets) {
        Some(unread) => {
            let consumed = consumed_bytes(sock, &offsets, counted_reads(conn));
            reply_at_peer_fin(conn, unread, consumed)
        }
        None => true,
    };
    if reply {
        conn.verdict_flags |= verdict_flags::REPLY_UNREAD_AT_PEER_FIN;
    }
}

/// A client's reply that arrived (with the peer's FIN) but that the application had not read
/// when the connection closed: the reply came first, and its bytes count. The application
/// may still read them from the closed socket, which no hook then attributes.
#[inline(never)]
fn count_unread_reply(sock: u64, conn: &mut ConnState, old: u8, new: u8, now: u64) {
    let Some(mut unread) = unread_sequence(sock, &OFFSETS.load()) else {
        return;
    };
    // A received FIN takes one sequence number: it is why these transitions happen.
    let fin_received = matches!(old, tcp_state::CLOSE_WAIT | tcp_state::FIN_WAIT2)
        || matches!(
            new,
            tcp_state::CLOSING | tcp_state::TIME_WAIT | tcp_state::CLOSE_WAIT
        );
    if fin_received {
        unread = unread.saturating_sub(1);
    }
    // Bounded: a garbled read must not count gigabytes.
    if unread > 0 && unread < 1 << 30 {
        record_transfer(conn, direction::IN, u64::from(unread), now, Message::Data);
    }
}

/// A first FIN on a connection the map does not hold (open before the daemon started, or
/// evicted): the peer's (`CLOSE_WAIT`) or this side's (`FIN_WAIT1`: its process closed it or
/// shut it down for writing). It is tracked from here, so that the daemon learns of it:
/// - an adopted client awaiting a reply whose server closed has nothing left to wait for
///   unless one sits unread ([`note_reply_at_peer_fin`]);
/// - an adopted server that sent its FIN owes nothing more. Its `CLOSE` may not come for
///   `tcp_fin_timeout` (60 s): an orphan whose peer's ACK came while `close()` still owned
///   the socket waits in `FIN_WAIT2` for its keepalive timer.
///
/// Either stall ends at the next sweep, as a followed connection's does. Runs in softirq
/// context (the peer's FIN) or the closing process's: the owner is the daemon's from /proc.
#[inline(never)]
fn track_half_closed(args: &InetSockSetState, new: u8) {
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    let Some(conn) = new_conn(args, role::UNKNOWN, now) else {
        return;
    };
    conn.flags = conn_flags::DISCOVERED | conn_flags::ESTABLISHED;
    conn.role = guess_role(conn);
    if new == tcp_state::CLOSE_WAIT && conn.role == role::CLIENT {
        note_reply_at_peer_fin(args.skaddr, conn);
    }
    emit(EventKind::Discovered, args.skaddr, conn);
    insert(args.skaddr, conn);
}

/// The close of a connection the map does not hold (open before the daemon started, or
/// evicted): the daemon may know it from /proc and must learn that it ended. A client's
/// reply that came with the peer's FIN and was never read is recorded as its last receive
/// ([`count_unread_reply`]): a client adopted after its own half-close (`FIN_WAIT2`, closed
/// by that FIN) got its reply.
#[inline(never)]
fn report_untracked_close(args: &InetSockSetState, old: u8) {
    let Some(now) = crate::clock::state_now() else {
        return;
    };
    if let Some(conn) = new_conn(args, role::UNKNOWN, now) {
        conn.flags = conn_flags::DISCOVERED | conn_flags::ESTABLISHED;
        if old == tcp_state::FIN_WAIT2 && guess_role(conn) == role::CLIENT {
            conn.role = role::CLIENT;
            count_unread_reply(args.skaddr, conn, old, tcp_state::CLOSE, now);
        }
        emit(EventKind::Closed, args.skaddr, conn);
    }
}
