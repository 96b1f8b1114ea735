//! UDP sockets, from the same transfer tracepoints as TCP (`transfer.rs` hands them over), and
//! their closes from `cgroup/sock_release` (UDP has no state-change tracepoint).
//!
//! One `CONNS` entry per UDP socket, following one peer (`stalltrace_common::udp`): the one it
//! is connected to, or the first one an unconnected socket sends to (read from the
//! `sendto`/`sendmsg`/`sendmmsg` address in the syscall's registers, as `capture.rs` finds
//! the data). A socket that receives first is a server: counted, never judged. The rule that
//! decides what a datagram does is `stalltrace_common::udp::record_datagram`.
//!
//! Cost per datagram on a tracked socket: the map lookup and the counters; the datagram's
//! first bytes are read only when a judged exchange starts (to name it) and on DNS flows (the
//! query id). One-way senders never reach either.
use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_NOEXIST, macros::cgroup_sock, programs::SockContext};
use stalltrace_common::{
    conn_flags, direction, loss,
    message::proto,
    role, tcp_state,
    transfer::{is_outstanding, quiet_past_threshold, Turn},
    transport,
    udp::{dns_id, flags, judged, looks_like_dns_query, one_to_many, record_datagram},
    ConnState, EventKind,
};

use crate::{
    capture::{capture_request, reply_head, syscall_peer},
    conn::{emit, set_netns, set_owner_to_current},
    kernel_read::{read_endpoints, tcp_state_of},
    maps::{count_loss, scratch_conn, stall_after_ns, CONNS, OFFSETS},
    transfer::report,
    words::zero_words,
};

const DNS_PORT: u16 = 53;
const EEXIST: i32 = -17;

/// One datagram sent (`dir` OUT) or received (IN) on a tracked UDP socket.
#[inline(never)]
pub(crate) fn record(sock: u64, conn: &mut ConnState, dir: u8, bytes: u64, now: u64) {
    let new_owner = set_owner_to_current(conn);
    let mut capture = None;
    let mut id = None;
    let mut from_peer = true;
    if judged(conn) {
        let starts = dir == direction::OUT && conn.last_dir != direction::OUT;
        if starts && conn.udp_flags & flags::CONNECTED == 0 {
            from_peer = sent_to_peer(conn);
        }
        if starts && from_peer {
            capture = capture_request(sock, bytes, now);
            if conn.proto == proto::DNS {
                id = capture
                    .as_ref()
                    .filter(|c| c.len >= 2)
                    .and_then(|c| dns_id(&c.bytes));
            }
        } else if conn.proto == proto::DNS {
            id = reply_head(bytes)
                .filter(|head| head.len >= 2)
                .and_then(|head| dns_id(&head.bytes));
        }
    }
    let quiet_ended = dir == direction::IN && quiet_past_threshold(conn, now, stall_after_ns());
    let turn = record_datagram(conn, dir, bytes, now, from_peer, id);
    // Only an answer ends the quiet (a partial DNS answer does not).
    let quiet_ended = quiet_ended && turn == Turn::ReplyStarted;
    report(sock, conn, new_owner, quiet_ended, turn, capture);
}

/// The datagram an unconnected socket is sending goes to the peer its entry follows.
#[inline(never)]
fn sent_to_peer(conn: &ConnState) -> bool {
    let mut port = 0;
    // Zeroed a word at a time: `[0; 16]` compiles to a byte-by-byte memset call.
    let mut addr = MaybeUninit::<[u64; 2]>::uninit();
    // SAFETY: a local, 8-byte aligned; zeroed, so initialized, before it is read.
    let addr = unsafe {
        zero_words(addr.as_mut_ptr());
        &mut *addr.as_mut_ptr().cast::<[u8; 16]>()
    };
    syscall_peer(conn.family, &mut port, addr) && port == conn.peer_port && *addr == conn.peer_addr
}

/// The first datagram seen on a UDP socket: tracks it from here on.
#[inline(never)]
pub(crate) fn discover(sock: u64, family: u16, dir: u8, bytes: u64, now: u64) {
    let offsets = &OFFSETS.load();
    let Some(conn) = scratch_conn(sock, now) else {
        return;
    };
    conn.family = family;
    conn.transport = transport::UDP;
    // A UDP socket is "established" from its first datagram until it is released.
    conn.tcp_state = tcp_state::ESTABLISHED;
    conn.flags = conn_flags::ESTABLISHED;
    if !read_endpoints(sock, family, offsets, conn) {
        return;
    }
    set_netns(sock, conn);
    // Connected UDP sockets are in TCP_ESTABLISHED (`ip4_datagram_connect`).
    let connected = tcp_state_of(sock, offsets) == Some(tcp_state::ESTABLISHED);
    conn.role = if dir == direction::IN {
        role::SERVER
    } else if connected {
        conn.udp_flags = flags::CONNECTED;
        role::CLIENT
    } else if syscall_peer(family, &mut conn.peer_port, &mut conn.peer_addr) {
        role::CLIENT
    } else {
        // Sent to an address that cannot be read: counted, never judged.
        role::UNKNOWN
    };
    if conn.role == role::CLIENT {
        if one_to_many(family, &conn.peer_addr) {
            conn.udp_flags |= flags::ONE_TO_MANY;
        }
        if conn.peer_port == DNS_PORT || is_dns_query(bytes) {
            conn.proto = proto::DNS;
        }
    } else if conn.local_port == DNS_PORT {
        conn.proto = proto::DNS;
    }
    match CONNS.insert(sock, &*conn, BPF_NOEXIST.into()) {
        Ok(()) => {}
        // Another CPU tracked it first.
        Err(EEXIST) => return,
        Err(_) => {
            count_loss(loss::CONN_INSERT_FAILED);
            return;
        }
    }
    if let Some(conn) = CONNS.get_ptr_mut(sock) {
        // SAFETY: map value pointer, valid for the duration of the program.
        record(sock, unsafe { &mut *conn }, dir, bytes, now);
    }
}

/// The datagram being sent starts with a DNS query header.
#[inline(never)]
fn is_dns_query(bytes: u64) -> bool {
    reply_head(bytes).is_some_and(|head| looks_like_dns_query(&head.bytes))
}

/// An inet socket is released (its last file reference closed): a tracked UDP socket ends,
/// and with it any exchange it was waiting on. Runs for every inet socket's release in the
/// cgroup hierarchy it is attached to (the root): one map lookup for those not tracked.
#[cgroup_sock(sock_release)]
pub(crate) fn stalltrace_sock_release(ctx: SockContext) -> i32 {
    // The context of a cgroup sock program is the `struct sock` itself: its address is the
    // key the transfer hooks use.
    let sock = ctx.sock as u64;
    let Some(conn) = CONNS.get_ptr_mut(sock) else {
        return 1;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    if conn.transport != transport::UDP {
        return 1;
    }
    let Some(now) = crate::clock::state_now() else {
        return 1;
    };
    let quiet_ended = is_outstanding(conn) && quiet_past_threshold(conn, now, stall_after_ns());
    conn.tcp_state = tcp_state::CLOSE;
    conn.state_ns = now;
    if quiet_ended {
        emit(EventKind::QuietEnded, sock, conn);
    }
    emit(EventKind::Closed, sock, conn);
    let _ = CONNS.remove(sock);
    1
}
