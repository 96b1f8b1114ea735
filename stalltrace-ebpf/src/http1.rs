//! HTTP/1.x responses (`stalltrace_common::http1`): the start of each response is copied into
//! its connection's `HTTP1_REPLY_HEADS` slot for the daemon to parse, and each transfer of it
//! leaves its last bytes in `ConnState::reply_tail`; the start of each request-direction run
//! (the requests before a response, several when pipelined) goes into its
//! `HTTP1_REQUEST_RUNS` slot. Runs only on connections recognized as HTTP/1.x, for transfers
//! in the reply direction and at request-direction runs' starts, and only with capture on. The
//! syscall's buffer is located once per transfer; a keep-alive connection's slot is rewritten
//! in place.
use stalltrace_common::{
    capture_slot,
    http1::{tail_after, Reply, RequestRun, RunCopy, REQUEST_RUN_ROOM, TAIL_UNKNOWN},
    role, verdict_flags, Capture, ConnState, CAPTURE_MAX,
};

use crate::{
    capture::{bytes8_at, capture_data, copy_data, copy_data_at, Data},
    maps::{
        CAPTURES, CAPTURE_SLOTS, HTTP1_REPLY_HEADS, HTTP1_REQUEST_RUNS, REPLY_HEAD_SCRATCH,
        REQUEST_RUN_SLOTS,
    },
    words::copy_words,
};

/// After `record_transfer` recorded a transfer of `bytes` at `now` that `reply` says belongs
/// to a response.
#[inline(never)]
pub(crate) fn on_reply(sock: u64, conn: &mut ConnState, reply: Reply, bytes: u64, now: u64) {
    let Some(data) = capture_data() else {
        conn.reply_tail = TAIL_UNKNOWN;
        return;
    };
    let starts = reply == Reply::Starts;
    conn.reply_tail = tail_after(conn.reply_tail, starts, bytes, |at| bytes8_at(&data, at));
    if starts {
        let moved = if conn.role == role::SERVER {
            conn.bytes_sent
        } else {
            conn.bytes_recv
        };
        keep_head(sock, &data, moved - bytes, bytes, now);
    }
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
            let Some(data) = capture_data() else {
                return;
            };
            if copy == RunCopy::Starts {
                copy_data(&data, &mut run.bytes, bytes)
            } else {
                copy_data_at::<REQUEST_RUN_ROOM, { 2 * REQUEST_RUN_ROOM }>(
                    &data,
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
/// connection's next response), else through this CPU's scratch entry.
#[inline(always)]
fn keep_head(sock: u64, data: &Data, offset: u64, bytes: u64, now: u64) {
    let (head, fresh) = match HTTP1_REPLY_HEADS.get_ptr_mut(&sock) {
        Some(head) => (head, false),
        None => match REPLY_HEAD_SCRATCH.get_ptr_mut(0) {
            Some(head) => (head, true),
            None => return,
        },
    };
    // SAFETY: a map value pointer, valid for the program run. Another CPU writing the same
    // socket's slot at once (two threads answering on one connection) can only garble it:
    // the daemon's parser takes any bytes.
    let head = unsafe { &mut *head };
    head.len = copy_data(data, &mut head.bytes, bytes);
    head.reply_ns = now;
    head.offset = offset;
    head.request_len = 0;
    let slot = capture_slot(sock, CAPTURE_SLOTS.load());
    if let Some(capture) = CAPTURES.get_ptr(slot) {
        // SAFETY: as above.
        let capture = unsafe { &*capture };
        if capture.sock == sock {
            // SAFETY: both are 8-byte aligned arrays of the same size.
            unsafe { copy_words(&raw mut head.request, &raw const capture.bytes) };
            head.request_len = capture.len;
        }
    }
    if fresh {
        let _ = HTTP1_REPLY_HEADS.insert(&sock, head, 0);
    }
}
