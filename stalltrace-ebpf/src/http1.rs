//! HTTP/1.x responses (`stalltrace_common::http1`): the start of each response is copied into
//! its connection's `HTTP1_REPLY_HEADS` slot for the daemon to parse, and each transfer of it
//! leaves its last bytes in `ConnState::reply_tail`. Runs only on connections recognized as
//! HTTP/1.x, for transfers in the reply direction.
use stalltrace_common::{
    capture_slot,
    http1::{tail_after, Reply},
    role, ConnState,
};

use crate::{
    capture::{bytes_at, read_data},
    maps::{CAPTURES, CAPTURE_SLOTS, HTTP1_REPLY_HEADS, REPLY_HEAD_SCRATCH},
    words::copy_words,
};

/// After `record_transfer` recorded a transfer of `bytes` at `now` that `reply` says belongs
/// to a response.
#[inline(never)]
pub(crate) fn on_reply(sock: u64, conn: &mut ConnState, reply: Reply, bytes: u64, now: u64) {
    let starts = reply == Reply::Starts;
    conn.reply_tail = tail_after(conn.reply_tail, starts, bytes, bytes_at);
    if starts {
        let moved = if conn.role == role::SERVER {
            conn.bytes_sent
        } else {
            conn.bytes_recv
        };
        keep_head(sock, moved - bytes, bytes, now);
    }
}

/// Copies the first bytes of the response that starts with this transfer, and those of the
/// request it answers, into the connection's slot.
#[inline(always)]
fn keep_head(sock: u64, offset: u64, bytes: u64, now: u64) {
    let Some(head) = REPLY_HEAD_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, used only within this program run.
    let head = unsafe { &mut *head };
    head.len = read_data(&mut head.bytes, bytes);
    if head.len == 0 {
        return;
    }
    head.reply_ns = now;
    head.offset = offset;
    head.request_len = 0;
    let slot = capture_slot(sock, CAPTURE_SLOTS.load());
    if let Some(capture) = CAPTURES.get_ptr(slot) {
        // SAFETY: array slot pointer, valid for the program run; a concurrent writer can only
        // garble it (the daemon's parser takes any bytes).
        let capture = unsafe { &*capture };
        if capture.sock == sock {
            // SAFETY: both are 8-byte aligned arrays of the same size.
            unsafe { copy_words(&raw mut head.request, &raw const capture.bytes) };
            head.request_len = capture.len;
        }
    }
    let _ = HTTP1_REPLY_HEADS.insert(&sock, head, 0);
}
