//! HTTP/2 per-stream accounting on the hot path (the rule: `stalltrace_common::http2`). Only
//! connections recognized as HTTP/2 come here: one lookup in `H2_STREAMS` per transfer, and
//! one 9-byte read of the user buffer per frame header, plus one per `iovec` entry the walk
//! passes in a vectored call.
use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::generated::bpf_loop};
use stalltrace_common::{
    http2::{self, Streams},
    loss, ConnState,
};

use crate::{
    capture::{bytes_at, stalltrace_h2_bytes8, walk_header_at, Walker, NO_WORD},
    maps::{count_loss, stall_after_ns, verdict_extras, CONNS, H2_SCRATCH, H2_STREAMS, H2_WALKER},
};

/// Follows the streams of HTTP/2 connection `conn` (on `sock`) through a transfer of `bytes`
/// in direction `dir` at `now`; starts following them at a transfer that begins with the
/// client preface ([`http2::may_start`] connections). What it found is left in `conn`
/// (`h2_sync`, `h2_answered_late`…), not returned: the caller's paths then stay one for the
/// verifier.
/// A global BPF function: the verifier checks it once, on its own, not once per path of its
/// callers (the walk is ~200 000 of the transfer programs' verified instructions otherwise).
/// It may take scalars only (Linux 5.10), so it looks the connection up again; the caller
/// holds no reference to it across the call.
#[unsafe(no_mangle)]
pub(crate) extern "C" fn stalltrace_http2_transfer(
    sock: u64,
    dir: u64,
    bytes: u64,
    now: u64,
) -> u64 {
    if !verdict_extras() {
        return 0;
    }
    let Some(conn) = CONNS.get_ptr_mut(sock) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for the duration of the program; no other reference
    // to it lives across this call.
    on_transfer(sock, unsafe { &mut *conn }, dir as u8, bytes, now);
    0
}

#[inline(always)]
fn on_transfer(sock: u64, conn: &mut ConnState, dir: u8, bytes: u64, now: u64) {
    let streams = match H2_STREAMS.get_ptr_mut(sock) {
        Some(streams) if http2::tracking(conn) => streams,
        _ if http2::tracking(conn) => {
            // Evicted from the full map: the framing cannot be picked up again.
            http2::lose(conn);
            count_loss(loss::HTTP2_FRAMING_LOST);
            return;
        }
        _ => match start(sock, conn, dir) {
            Some(streams) => streams,
            None => return,
        },
    };
    let Some(walker) = H2_WALKER.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: map value pointers, valid for the duration of the program; the walker's
    // per-CPU slot is used only within one program run.
    let (streams, walker) = unsafe { (&mut *streams, &mut *walker) };
    walker.reset();
    let transfer = http2::walk_begin(conn, streams, dir, bytes, now, stall_after_ns());
    let mut walk = Frames {
        conn,
        streams,
        walker,
        transfer,
    };
    // SAFETY: `walk_frames` takes the context given here, which lives across the call. A
    // failure runs no frame: the transfer is then not walked to its end, and the framing lost.
    unsafe {
        bpf_loop(
            http2::WALK_FRAMES as u32,
            walk_frames as *mut c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    let result = http2::walk_end(walk.conn, walk.streams, &transfer);
    if result.untracked > 0 {
        count_loss(loss::HTTP2_UNTRACKED);
    }
    if result.lost {
        count_loss(loss::HTTP2_FRAMING_LOST);
    }
    if !http2::tracking(walk.conn) {
        let _ = H2_STREAMS.remove(sock);
    }
}

/// A transfer's frame walk, for `bpf_loop`'s callback: the references live on the caller's
/// stack, where the verifier keeps their types.
struct Frames<'a> {
    conn: &'a mut ConnState,
    streams: &'a mut Streams,
    walker: &'a mut Walker,
    transfer: http2::Transfer,
}

/// `bpf_loop`'s callback: one frame of the walk (`http2::walk_frame`); 1 stops the loop.
/// Verified once, however many frames a transfer holds (a loop in the program is verified
/// once per iteration, which held the walk to 16 frames).
extern "C" fn walk_frames(_index: u64, walk: *mut c_void) -> i64 {
    // SAFETY: the context `on_transfer` passed to `bpf_loop`.
    let walk = unsafe { &mut *walk.cast::<Frames>() };
    // Both readers move the walker; the walk calls them one at a time.
    let walker: *mut Walker = &raw mut *walk.walker;
    let mut header = |at: usize| {
        // SAFETY: see above.
        let first = walk_header_at(unsafe { &mut *walker }, at as u64);
        if first == NO_WORD {
            return None;
        }
        let [a, b, c, d] = (first as u32).to_ne_bytes();
        // SAFETY: see above.
        let id = unsafe { (*walker).id };
        let [e, f, g, h] = if id != NO_WORD {
            (id as u32).to_ne_bytes()
        } else {
            // The header ends in a later `iovec` entry: its bytes 1–8.
            if stalltrace_h2_bytes8(at as u64 + 1) == 0 {
                return None;
            }
            // SAFETY: see above.
            let [_, _, _, flags, e, f, g, h] = unsafe { (*walker).word };
            let [.., e, f, g, h] = http2::packed([a, b, c, d, flags, e, f, g, h]);
            [e, f, g, h]
        };
        Some([a, b, c, d, e, f, g, h])
    };
    let more = http2::walk_frame(
        walk.conn,
        walk.streams,
        &walk.transfer,
        &mut header,
        &mut |at, word: &mut [u8; 8]| {
            if stalltrace_h2_bytes8(at) == 0 {
                return false;
            }
            // SAFETY: see above.
            *word = unsafe { (*walker).word };
            true
        },
    );
    i64::from(!more)
}

/// Starts following `conn`'s streams if this transfer begins with the client preface.
#[inline(always)]
fn start(sock: u64, conn: &mut ConnState, dir: u8) -> Option<*mut Streams> {
    if !http2::starts(conn, dir, &mut bytes_at) {
        return None;
    }
    let scratch = H2_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within one program run.
    let scratch = unsafe { &mut *scratch };
    http2::start(conn, scratch);
    // A stale entry (a reused sock address whose close was missed) is replaced.
    let _ = H2_STREAMS.remove(sock);
    if H2_STREAMS
        .insert(sock, scratch, u64::from(BPF_NOEXIST))
        .is_err()
    {
        http2::lose(conn);
        count_loss(loss::HTTP2_FRAMING_LOST);
        return None;
    }
    H2_STREAMS.get_ptr_mut(sock)
}

/// Forgets the stream state of a connection that closed.
#[inline(always)]
pub(crate) fn forget(sock: u64, conn: &ConnState) {
    if conn.h2_sync != http2::sync::NONE {
        let _ = H2_STREAMS.remove(sock);
    }
}
