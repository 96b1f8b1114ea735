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
//!
//! On a TLS server connection, a request that starts inside `SSL_read` has its capture (the
//! records) replaced at the return by the plaintext the call read, so that it is named.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use stalltrace_common::{conn_flags, transfer::plaintext_received};

use crate::{
    capture::recapture_request,
    maps::{stall_after_ns, CONNS, LIBSSL_TRACED},
    transfer::report,
};

/// A thread's `SSL_read`/`SSL_read_ex` call in progress.
#[repr(C)]
#[derive(Clone, Copy)]
struct SslRead {
    /// The socket the call's receives were on (0: none yet).
    sock: u64,
    /// The plaintext buffer (`buf`), and where `SSL_read_ex` writes the count (`readbytes`;
    /// 0 for `SSL_read`, which returns it).
    buf: u64,
    readbytes: u64,
    /// Non-zero when `sock` is a TLS client whose receives the call held back; zero when it
    /// is a TLS server whose request started in the call (its capture is then replaced by the
    /// plaintext).
    client: u64,
}

/// Threads inside an `SSL_read`/`SSL_read_ex` call (key: `bpf_get_current_pid_tgid`). LRU: a
/// thread that died inside the call leaves an entry that the next ones evict; a thread's next
/// call overwrites it.
#[map]
static SSL_READS: LruHashMap<u64, SslRead> = LruHashMap::with_max_entries(16384, 0);

// int SSL_read(SSL *ssl, void *buf, int num);
// int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);
const ARG_BUF: usize = 1;
const ARG_READBYTES: usize = 3;

#[uprobe]
pub(crate) fn stalltrace_ssl_read(ctx: ProbeContext) -> u32 {
    enter(ctx.arg::<u64>(ARG_BUF).unwrap_or(0), 0);
    0
}

#[uprobe]
pub(crate) fn stalltrace_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(
        ctx.arg::<u64>(ARG_BUF).unwrap_or(0),
        ctx.arg::<u64>(ARG_READBYTES).unwrap_or(0),
    );
    0
}

#[inline(always)]
fn enter(buf: u64, readbytes: u64) {
    let call = SslRead {
        sock: 0,
        buf,
        readbytes,
        client: 0,
    };
    let _ = SSL_READS.insert(bpf_get_current_pid_tgid(), call, 0);
}

#[uretprobe]
pub(crate) fn stalltrace_ssl_read_return(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(call) = SSL_READS.get_ptr(thread) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let call = unsafe { *call };
    let _ = SSL_READS.remove(thread);
    // `SSL_read` returns the plaintext bytes read, `SSL_read_ex` 1 when it read some; both
    // return 0 or less when the call read none (only tickets or handshake, WANT_READ, close).
    if call.sock == 0 || ctx.ret::<i32>() <= 0 {
        return 0;
    }
    if call.client == 0 {
        let count = if call.readbytes == 0 {
            ctx.ret::<i32>() as u64
        } else {
            // SAFETY: a probe read of user memory: a fault is returned, not taken.
            unsafe { bpf_probe_read_user(call.readbytes as *const u64) }.unwrap_or(0)
        };
        recapture_request(call.sock, call.buf, count);
        return 0;
    }
    let Some(conn) = CONNS.get_ptr_mut(call.sock) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    let Some(now) = crate::clock::state_now() else {
        return 0;
    };
    let (quiet_ended, turn) = plaintext_received(conn, now, stall_after_ns());
    report(call.sock, conn, false, quiet_ended, turn, None);
    0
}

/// The current thread's `SSL_read` call, if libssl is hooked and the thread is inside one
/// whose receives so far were on `sock` or none; it now holds `sock`.
#[inline(always)]
fn call_on(sock: u64) -> Option<&'static mut SslRead> {
    if LIBSSL_TRACED.load() == 0 {
        return None;
    }
    // SAFETY: map value pointer, valid for the duration of the program.
    let call = unsafe { &mut *SSL_READS.get_ptr_mut(bpf_get_current_pid_tgid())? };
    if call.sock == 0 {
        call.sock = sock;
    }
    (call.sock == sock).then_some(call)
}

/// Whether the current thread is inside `SSL_read` on TLS client connection `sock`: if so,
/// the call's return takes the turn of this receive, and the connection is marked as seen
/// through libssl.
#[inline(always)]
pub(crate) fn inside_ssl_read(sock: u64, flags: &mut u8) -> bool {
    let Some(call) = call_on(sock) else {
        return false;
    };
    call.client = 1;
    *flags |= conn_flags::TLS_LIBSSL;
    true
}

/// A request started on TLS server connection `sock` (its records captured): if the thread
/// is inside `SSL_read`, the call's return replaces the capture with the plaintext it read,
/// so that the request is named (`GET /path`) rather than `tls application data`.
#[inline(always)]
pub(crate) fn request_inside_ssl_read(sock: u64, flags: &mut u8) {
    if call_on(sock).is_some() {
        *flags |= conn_flags::TLS_LIBSSL;
    }
}
