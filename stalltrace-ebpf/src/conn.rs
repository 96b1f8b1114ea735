//! Operations on one connection's state, shared by the programs. The transfer accounting
//! itself is `stalltrace_common::transfer`, shared with userspace.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_comm},
};
use stalltrace_common::{
    loss, Capture, ConnEvent, ConnState, EventHeader, EventKind, RequestEvent, COMM_LEN,
};

use crate::{
    maps::{count_loss, current_epoch, EVENTS},
    words::copy_words,
};

/// Writes an event with a snapshot of `conn` and marks the connection as reported in the current
/// epoch. A full ring buffer is counted, and the connection stays unmarked so that its next
/// request start is reported again.
#[inline(always)]
pub(crate) fn emit(kind: EventKind, sock: u64, conn: &mut ConnState, now: u64) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_loss(loss::RINGBUF_FULL);
        return;
    };
    conn.notified_epoch = current_epoch();
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved, writable record of ConnEvent's size. Fields are
    // written in place: a ConnEvent built on the stack would not fit the 512-byte BPF stack.
    unsafe {
        (*event).header = EventHeader {
            kind: kind as u32,
            _pad: 0,
            ts_ns: now,
            sock,
        };
        copy_words(&raw mut (*event).conn, conn);
    }
    entry.submit(wakeup_flag());
}

/// Like `emit`, with the captured bytes of the request that just started appended.
#[inline(always)]
pub(crate) fn emit_request(
    kind: EventKind,
    sock: u64,
    conn: &mut ConnState,
    capture: &Capture,
    now: u64,
) {
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        count_loss(loss::RINGBUF_FULL);
        return;
    };
    conn.notified_epoch = current_epoch();
    let record = entry.as_mut_ptr();
    // SAFETY: as in `emit`, for a RequestEvent-sized record.
    unsafe {
        (*record).event.header = EventHeader {
            kind: kind as u32,
            _pad: 0,
            ts_ns: now,
            sock,
        };
        copy_words(&raw mut (*record).event.conn, conn);
        copy_words(&raw mut (*record).capture, capture);
    }
    entry.submit(wakeup_flag());
}

/// The daemon drains the ring on a short timer, so waking it for every record would only burn
/// CPU; wake it early only when the ring is a quarter full.
#[inline(always)]
pub(crate) fn wakeup_flag() -> u64 {
    let used = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    let size = EVENTS.query(BPF_RB_RING_SIZE.into());
    if used > size / 4 {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Records the calling thread as the connection's last user. Returns true when the process is
/// new to the connection (first owner, or handed over to another process).
#[inline(always)]
pub(crate) fn set_owner_to_current(conn: &mut ConnState) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    conn.tid = pid_tgid as u32;
    if conn.tgid == tgid {
        return false;
    }
    conn.tgid = tgid;
    // SAFETY: the helper writes at most COMM_LEN bytes into the connection's comm field.
    unsafe { bpf_get_current_comm(conn.comm.as_mut_ptr().cast(), COMM_LEN as u32) };
    true
}
