//! HTTP/1.x responses (`stalltrace_common::http1`): the start of each response is copied into
//! its connection's `HTTP1_REPLY_HEADS` slot for the daemon to parse, and each transfer of it
//! leaves its last bytes in `ConnState::reply_tail`; the start of each request-direction run
//! (the requests before a response, several when pipelined) goes into its
//! `HTTP1_REQUEST_RUNS` slot. Runs only on connections recognized as HTTP/1.x, for transfers
//! in the reply direction and at request-direction runs' starts, and only with capture on. The
//! syscall's buffer is located once per transfer; a keep-alive connection's slot is rewritten
//! in place.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use stalltrace_common::{
    capture_slot,
    http1::{
        tail_after, Reply, ReplyHead, RequestRun, RunCopy, REPLY_HEAD_MAX, REQUEST_RUN_ROOM,
        TAIL_UNKNOWN,
    },
    role, verdict_flags, Capture, ConnState, CAPTURE_MAX,
};

use crate::{
    capture::{held, Located},
    maps::{HTTP1_REPLY_HEADS, HTTP1_REQUEST_RUNS, REPLY_HEAD_SCRATCH, REQUEST_RUN_SLOTS},
    words::copy_words,
};

/// After `record_transfer` recorded a transfer of `bytes` at `now` that `reply` says belongs
/// to a response.
#[inline(always)]
pub(crate) fn on_reply(sock: u64, conn: &mut ConnState, reply: Reply, bytes: u64, now: u64) {
    let starts = reply == Reply::Starts;
    let offset = match (starts, conn.role) {
        (false, _) => 0,
        (true, role::SERVER) => conn.bytes_sent - bytes,
        (true, _) => conn.bytes_recv - bytes,
    };
    let tail = stalltrace_http1_reply(
        sock,
        u64::from_ne_bytes(conn.reply_tail),
        bytes | if starts { STARTS } else { 0 },
        offset,
        now,
    );
    conn.reply_tail = tail.to_ne_bytes();
}

/// In [`stalltrace_http1_reply`]'s `bytes`: the transfer starts a response.
const STARTS: u64 = 1 << 63;

/// The reply tail (`ConnState::reply_tail`, in memory order) after a transfer of a response
/// that moved `bytes` (below 2^63; [`STARTS`] set when it starts the response, `offset` bytes
/// into the connection's reply direction) at `now`, from the previous `tail`. A response's
/// start is copied into the socket's `HTTP1_REPLY_HEADS` slot first; the tail is then taken
/// from that copy when it holds the transfer's last 8 bytes (a response written or read in
/// one buffer), else read from the user buffer.
/// A global BPF function (scalars in, a scalar out): the verifier checks it once, on its own,
/// not once per path of the transfer programs.
#[unsafe(no_mangle)]
pub(crate) extern "C" fn stalltrace_http1_reply(
    sock: u64,
    tail: u64,
    bytes: u64,
    offset: u64,
    now: u64,
) -> u64 {
    let (starts, bytes) = (bytes & STARTS != 0, bytes & !STARTS);
    let Some(data) = Located::current() else {
        return u64::from_ne_bytes(TAIL_UNKNOWN);
    };
    let held = if starts {
        keep_head(sock, &data, offset, bytes, now)
    } else {
        None
    };
    let tail = tail_after(tail.to_ne_bytes(), starts, bytes, |at| {
        match held.and_then(|head| copied8_at(head, at)) {
            Some(word) => Some(word),
            None => data.bytes8_at(at),
        }
    });
    u64::from_ne_bytes(tail)
}

/// The 8 bytes at `at` of a response's first transfer, if `head`'s copy of it holds them.
/// Read with a helper, not loaded: Linux 6.12's verifier turns the map value pointer plus
/// this (bounded) offset into an unknown scalar and refuses the loads; a kernel read of the
/// map value costs far less than the user read it replaces.
#[inline(always)]
fn copied8_at(head: &ReplyHead, at: u64) -> Option<[u8; 8]> {
    if at > (REPLY_HEAD_MAX - 8) as u64 || at + 8 > u64::from(head.len) {
        return None;
    }
    // SAFETY: a probe read: a fault is returned, not taken (`at + 8` ≤ REPLY_HEAD_MAX, within
    // the array, checked above).
    unsafe { bpf_probe_read_kernel(head.bytes.as_ptr().add(at as usize).cast::<[u8; 8]>()).ok() }
}

/// After `record_transfer` recorded a transfer of `bytes` in the request direction that
/// `copy` says starts or continues the run's copy: copies its first bytes into the socket's
/// `HTTP1_REQUEST_RUNS` slot, after those of the run's earlier transfers. The copy stays open
/// (`REQUEST_RUN_OPEN`) while it has room and holds every byte the run moved: a request
/// started later in the run is then in it. `captured` is the request capture this transfer
/// took, if any: when it holds all of a run's first transfer (most requests fit in 64 bytes),
/// it is copied from there instead of read from the user buffer a second time.
#[inline(never)]
pub(crate) fn on_request_run(
    sock: u64,
    conn: &mut ConnState,
    copy: RunCopy,
    bytes: u64,
    captured: Option<&Capture>,
) {
    conn.verdict_flags &= !verdict_flags::REQUEST_RUN_OPEN;
    let slot = capture_slot(sock, REQUEST_RUN_SLOTS.load());
    let Some(run) = HTTP1_REQUEST_RUNS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: an array slot pointer, valid for the program run. Another CPU writing the same
    // slot at once can only garble the copy: the daemon's parser takes any bytes.
    let run = unsafe { &mut *run };
    if copy == RunCopy::Starts {
        run.sock = sock;
        run.requests = conn.requests;
        run.offset = if conn.role == role::SERVER {
            conn.bytes_recv
        } else {
            conn.bytes_sent
        } - bytes;
        run.len = 0;
    } else if run.sock != sock || run.requests != conn.requests {
        return;
    }
    let copied = match captured {
        Some(capture) if copy == RunCopy::Starts && u64::from(capture.len) == bytes => {
            const { assert!(core::mem::offset_of!(RequestRun, bytes) % 8 == 0) };
            const { assert!(2 * REQUEST_RUN_ROOM >= CAPTURE_MAX) };
            // SAFETY: both arrays are 8-byte aligned (asserted above for the run's; the
            // capture's follows two u64s and two u32s), the run's the larger.
            unsafe {
                copy_words(
                    run.bytes.as_mut_ptr().cast::<[u8; CAPTURE_MAX]>(),
                    &raw const capture.bytes,
                )
            };
            capture.len
        }
        _ => {
            let Some(data) = Located::current() else {
                return;
            };
            if copy == RunCopy::Starts {
                data.copy(&mut run.bytes, bytes)
            } else {
                data.copy_at::<REQUEST_RUN_ROOM, { 2 * REQUEST_RUN_ROOM }>(
                    &mut run.bytes,
                    run.len,
                    bytes,
                )
            }
        }
    };
    run.len += copied;
    if u64::from(copied) == bytes && (run.len as usize) < REQUEST_RUN_ROOM {
        conn.verdict_flags |= verdict_flags::REQUEST_RUN_OPEN;
    }
}

/// Copies the first bytes of the response that starts with this transfer, and those of the
/// request it answers, into the connection's slot: in place when it has one (a keep-alive
/// connection's next response), else through this CPU's scratch entry. Returns the copy
/// (the scratch entry's holds the same bytes as the one inserted).
#[inline(always)]
fn keep_head(
    sock: u64,
    data: &Located,
    offset: u64,
    bytes: u64,
    now: u64,
) -> Option<&'static ReplyHead> {
    let (head, fresh) = match HTTP1_REPLY_HEADS.get_ptr_mut(&sock) {
        Some(head) => (head, false),
        None => (REPLY_HEAD_SCRATCH.get_ptr_mut(0)?, true),
    };
    // SAFETY: a map value pointer, valid for the program run. Another CPU writing the same
    // socket's slot at once (two threads answering on one connection) can only garble it:
    // the daemon's parser takes any bytes.
    let head = unsafe { &mut *head };
    head.len = data.copy(&mut head.bytes, bytes);
    head.reply_ns = now;
    head.offset = offset;
    head.request_len = 0;
    if let Some(capture) = held(sock) {
        // SAFETY: both are 8-byte aligned arrays of the same size.
        unsafe { copy_words(&raw mut head.request, &raw const capture.bytes) };
        head.request_len = capture.len;
    }
    if fresh {
        let _ = HTTP1_REPLY_HEADS.insert(&sock, &*head, 0);
    }
    Some(head)
}
