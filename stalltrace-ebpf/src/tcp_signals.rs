//! TCP signals that explain a quiet connection: retransmissions and resets received.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext, EbpfContext};
use stalltrace_common::{
    conn_flags,
    tracepoint::{TcpReceiveReset, TcpRetransmitSkb},
};

use crate::maps::CONNS;

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub(crate) fn stalltrace_retransmit(ctx: TracePointContext) -> u32 {
    // SAFETY: the context of this tracepoint starts with a TcpRetransmitSkb record.
    let args = unsafe { &*(ctx.as_ptr() as *const TcpRetransmitSkb) };
    if let Some(conn) = CONNS.get_ptr_mut(args.skaddr) {
        // SAFETY: map value pointer, valid for the duration of the program.
        let conn = unsafe { &mut *conn };
        conn.retransmits += 1;
        // A SYN retransmit is the first sight of the port a pending connect() got.
        if conn.local_port == 0 {
            conn.local_port = args.sport;
        }
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn stalltrace_reset(ctx: TracePointContext) -> u32 {
    // SAFETY: the context of this tracepoint starts with a TcpReceiveReset record.
    let args = unsafe { &*(ctx.as_ptr() as *const TcpReceiveReset) };
    if let Some(conn) = CONNS.get_ptr_mut(args.skaddr) {
        // SAFETY: map value pointer, valid for the duration of the program.
        unsafe { (*conn).flags |= conn_flags::PEER_RESET };
    }
    0
}
