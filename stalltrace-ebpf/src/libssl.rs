//! TLS through libssl: uprobes on `SSL_read` and `SSL_read_ex` of the system's libssl
//! (attached by file, so every process that maps it runs them), so that a TLS client's reply
//! is counted when libssl hands it the plaintext, not when it receives records. A TLS 1.3
//! client's first `SSL_read` after its request receives the server's NewSessionTickets, whose
//! record headers say application_data like any reply's: counted as the reply, they hid a
//! stalled first request (issue 7, case 4b).
//!
//! The entry marks the thread as inside `SSL_read`; a receive on a TLS client connection made
//! by that thread meanwhile (`transfer.rs`, through [`inside_ssl_read`]) is counted without a
//! turn and its socket kept; the return, if `SSL_read` returned application data, takes the
//! reply turn on that socket ([`plaintext_received`]). Costs nothing on connections that are
//! not TLS clients (a byte compare in the transfer path); on one, a map lookup per receive.
//! Memory BIOs (asyncio, Node) do their socket I/O outside `SSL_read`: their connections keep
//! the record rule.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use stalltrace_common::{conn_flags, transfer::plaintext_received};

use crate::{
    maps::{stall_after_ns, CONNS, LIBSSL_TRACED},
    transfer::report,
};

/// Threads inside an `SSL_read`/`SSL_read_ex` call (key: `bpf_get_current_pid_tgid`), with the
/// socket whose receives the call deferred (0: none yet). LRU: a thread that died inside the
/// call leaves an entry that the next ones evict; a thread's next call overwrites it.
#[map]
static SSL_READS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

#[uprobe]
pub(crate) fn stalltrace_ssl_read(_ctx: ProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let _ = SSL_READS.insert(thread, 0, 0);
    0
}

#[uretprobe]
pub(crate) fn stalltrace_ssl_read_return(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(held) = SSL_READS.get_ptr(thread) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let sock = unsafe { *held };
    let _ = SSL_READS.remove(thread);
    // `SSL_read` returns the plaintext bytes read, `SSL_read_ex` 1 when it read some; both
    // return 0 or less when the call read none (only tickets or handshake, WANT_READ, close).
    if sock == 0 || ctx.ret::<i32>() <= 0 {
        return 0;
    }
    let Some(conn) = CONNS.get_ptr_mut(sock) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    let now = unsafe { bpf_ktime_get_ns() };
    let (quiet_ended, turn) = plaintext_received(conn, now, stall_after_ns());
    report(sock, conn, false, quiet_ended, turn, None, now);
    0
}

/// Whether the current thread is inside `SSL_read` on `sock` (libssl hooked, and the call's
/// receives so far were on `sock` or none): if so, the call's return takes the turn of this
/// receive, and the connection is marked as seen through libssl.
#[inline(always)]
pub(crate) fn inside_ssl_read(sock: u64, flags: &mut u8) -> bool {
    if LIBSSL_TRACED.load() == 0 {
        return false;
    }
    let Some(held) = SSL_READS.get_ptr_mut(bpf_get_current_pid_tgid()) else {
        return false;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let held = unsafe { &mut *held };
    if *held == 0 {
        *held = sock;
    }
    if *held != sock {
        return false;
    }
    *flags |= conn_flags::TLS_LIBSSL;
    true
}
