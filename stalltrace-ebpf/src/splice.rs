//! Receives the transfer hooks do not see: `splice(2)` and `sendfile(2)` from a TCP socket
//! (`tcp_splice_read` → `tcp_read_sock`: how haproxy and other proxies forward bodies) and the
//! zero-copy receive of `getsockopt(TCP_ZEROCOPY_RECEIVE)` pass neither `sock_recv_length` nor
//! `tcp_recvmsg`. All of them end in `tcp_rcv_space_adjust`, whose tracepoint fires after the
//! read with `copied_seq` already moved. The bytes are not in hand there, only the socket: so
//! what the application has read by any means (`bytes_received` less what is unread) is set
//! against what the entry counted, and the difference is recorded as one receive, through
//! the same transfer path as every other hook (`on_unread_transfer`: nothing read) (`stalltrace_common::transfer::spliced_bytes`).
//!
//! `tcp_rcv_space_adjust` also runs inside every `recvmsg` (whose bytes `sock_recv_length`
//! counts once it returns): only the syscalls above are looked at, by their number in the
//! task's registers, before any map lookup. Cost on other receives: two helper calls and a
//! compare. Their bytes cannot be read (they went to a pipe): such a receive is data, never
//! housekeeping, and names no request.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use stalltrace_common::{
    direction,
    transfer::{counted_reads, spliced_bytes},
};

use crate::{
    capture::in_unseen_read_syscall,
    kernel_read::consumed_bytes,
    maps::{CONNS, OFFSETS, SPLICE_READS},
    transfer::on_unread_transfer,
};

// TP_PROTO(struct sock *sk)
const ARG_SOCK: usize = 0;

#[raw_tracepoint(tracepoint = "tcp_rcv_space_adjust")]
pub(crate) fn stalltrace_splice_recv(ctx: RawTracePointContext) -> i32 {
    if SPLICE_READS.load() == 0 || !in_unseen_read_syscall() {
        return 0;
    }
    let sock = ctx.arg::<u64>(ARG_SOCK);
    // A connection the map does not hold is found at its next send or receive.
    let Some(conn) = CONNS.get_ptr(sock) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &*conn };
    // Unknown: what was counted, so nothing unseen.
    let consumed = consumed_bytes(sock, &OFFSETS.load(), counted_reads(conn));
    let bytes = spliced_bytes(conn, consumed);
    if bytes > 0 {
        // Below 2^31 (`spliced_bytes`): a positive i32.
        on_unread_transfer(&ctx, sock, direction::IN, bytes as i32);
    }
    0
}
