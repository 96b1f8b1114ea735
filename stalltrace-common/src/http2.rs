//! HTTP/2 per-stream accounting (RFC 9113): which of a connection's streams await their
//! response, so that one slow call among many that flow on the same connection is a stall,
//! and an idle channel is not.
//!
//! Run by the kernel programs on every transfer of a connection recognized as HTTP/2
//! ([`crate::message::proto::HTTP2`], from the client preface) and by the tracker's tests on
//! their model of the kernel. The rule:
//! - a HEADERS frame in the request direction on a new client-initiated stream (odd id, above
//!   every id seen) opens it: a response is owed;
//! - the first HEADERS or DATA frame of that stream in the reply direction (the response has
//!   begun), or a RST_STREAM either way, answers it. A response that has begun is not judged
//!   further: a server-streaming or bidirectional call (a watch) stays open for as long as it
//!   likes once it has answered, and waiting on `END_STREAM` would flag every one of them.
//!
//! Frames are followed across transfers: per direction, the bytes of the current frame still
//! to come ([`Streams::skip`]), so a reader that takes the 9-byte header and then the payload,
//! or a transfer that ends mid-frame, stays in step. When the framing cannot be followed (a
//! frame header split between two transfers, more frames in one transfer than
//! [`WALK_FRAMES`], a frame type no HTTP/2 peer sends, a header that cannot be read) the
//! connection falls back to the direction rule ([`sync::LOST`], counted as
//! [`crate::loss::HTTP2_UNTRACKED`]).
//!
//! Written for the verifier: a bounded walk, frame headers read 4 bytes at a time at offsets
//! of the transfer (`More`), and stream slots indexed by a masked stream id.
use crate::{
    direction,
    message::More,
    transfer::{self},
    ConnState,
};

/// [`ConnState::h2_sync`]: how far the kernel follows a connection's HTTP/2 streams.
pub mod sync {
    /// Not HTTP/2, or not followed yet (the client preface not seen at the start of a transfer).
    pub const NONE: u8 = 0;
    /// Frames followed from the preface on: `h2_open`/`h2_oldest_*` are right.
    pub const TRACKING: u8 = 1;
    /// The framing was lost: the connection is judged by the direction rule.
    pub const LOST: u8 = 2;
}

/// Streams awaiting their response that one connection's state holds at once. A new stream
/// whose slot (its id, masked) is held by an older one still awaiting is not followed.
pub const STREAM_SLOTS: usize = 32;
/// Frame headers one transfer may hold; a transfer with more loses the framing. A server
/// answering many concurrent streams writes a HEADERS and a DATA frame (and gRPC's trailers)
/// per stream in one go: 512 covers 128 streams (nginx's and most gRPC servers' default
/// `SETTINGS_MAX_CONCURRENT_STREAMS` is 100–128) with room. The walk's cost follows the
/// frames there are, not this bound (one read of user memory per frame header).
pub const WALK_FRAMES: usize = 512;

const PREFACE: [u8; 4] = *b"PRI ";
const PREFACE_LEN: u32 = 24;
const FRAME_HEADER_LEN: u64 = 9;
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
/// The highest frame type in use (PRIORITY_UPDATE, RFC 9218); above it, the bytes are not
/// HTTP/2 framing (extension frames are allowed, but none is sent in practice).
const MAX_FRAME_TYPE: u8 = 0x10;

/// One HTTP/2 connection's stream state, kept by the kernel in its own map keyed by the
/// `struct sock` address (only HTTP/2 connections pay for it).
///
/// A connection's two directions are often walked by two threads at once (a reader and a
/// writer, on two CPUs), and the BPF target has no atomic read-modify-write here: so every
/// field has one writer, the walk of one direction. A slot's stream awaits its response while
/// its generation (`opened`, bumped by the request direction when a stream takes the slot)
/// differs from the generation each direction last closed (`closed`: the reply direction
/// answers, either direction resets).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streams {
    /// Bytes of the current frame still to come, per direction (`[in, out]`).
    pub skip: [u32; 2],
    /// The walk of the current transfer, per direction: the offset of its next frame header.
    pub cursor: [u64; 2],
    /// The walk of the current transfer, per direction: what it found (bits of `WALK_*`, and
    /// the streams not followed above `WALK_UNTRACKED_SHIFT`).
    pub walk: [u32; 2],
    /// The highest client-initiated stream id opened: a HEADERS frame on a lower id is a
    /// trailer, not a new request.
    pub highest: u32,
    pub _pad: u32,
    /// Per slot: its stream's id, when it was opened (ns) and its generation.
    pub ids: [u32; STREAM_SLOTS],
    pub opened_ns: [u64; STREAM_SLOTS],
    pub opened: [u32; STREAM_SLOTS],
    /// Per direction (`[in, out]`) and slot: the generation it last closed.
    pub closed: [[u32; STREAM_SLOTS]; 2],
}

const _: () = assert!(core::mem::size_of::<Streams>() == 808);

impl Streams {
    pub const EMPTY: Self = Self {
        skip: [0; 2],
        cursor: [0; 2],
        walk: [0; 2],
        highest: 0,
        _pad: 0,
        ids: [0; STREAM_SLOTS],
        opened_ns: [0; STREAM_SLOTS],
        opened: [0; STREAM_SLOTS],
        closed: [[0; STREAM_SLOTS]; 2],
    };

    #[inline(always)]
    fn slot(id: u32) -> usize {
        ((id >> 1) as usize) & (STREAM_SLOTS - 1)
    }

    /// Slot `slot`'s stream awaits its response.
    #[inline(always)]
    fn awaits(&self, slot: usize) -> bool {
        let slot = slot & (STREAM_SLOTS - 1);
        let generation = self.opened[slot];
        generation != self.closed[0][slot] && generation != self.closed[1][slot]
    }

    /// Opens stream `id` at `now` (request direction); false if its slot is held (the stream
    /// is not followed).
    #[inline(always)]
    fn open(&mut self, id: u32, now: u64) -> bool {
        let slot = Self::slot(id);
        if self.awaits(slot) {
            return false;
        }
        self.ids[slot] = id;
        self.opened_ns[slot] = now;
        // A generation neither direction has closed: the slot awaits again.
        let (a, b) = (self.closed[0][slot], self.closed[1][slot]);
        let mut generation = self.opened[slot].wrapping_add(1);
        if generation == a || generation == b {
            generation = a.max(b).wrapping_add(1);
        }
        self.opened[slot] = generation;
        true
    }

    /// Answers or resets stream `id` from direction `side`: when it was opened, if it was
    /// awaiting its response.
    #[inline(always)]
    fn close(&mut self, side: usize, id: u32) -> Option<u64> {
        let slot = Self::slot(id);
        if !self.awaits(slot) || self.ids[slot] != id {
            return None;
        }
        self.closed[side & 1][slot] = self.opened[slot];
        Some(self.opened_ns[slot])
    }
}

/// Reads the frame header at an offset of the transfer: its bytes 0–3 (length, type) and
/// 5–8 (stream id), or `None` when they cannot be read. In the kernel, one call per frame
/// (the verifier explores each call site of the user-memory reader).
pub trait Header: FnMut(usize) -> Option<[u8; 8]> {}
impl<F: FnMut(usize) -> Option<[u8; 8]>> Header for F {}

/// A [`Header`] reader from 4-byte reads (`More`): for tests and userspace models.
pub fn header_from(mut more: impl More) -> impl Header {
    move |at: usize| {
        let [a, b, c, d] = more(at)?;
        let [e, f, g, h] = more(at + 5)?;
        Some([a, b, c, d, e, f, g, h])
    }
}

/// What one transfer's frames did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// A stream awaiting its response for at least the threshold was answered: the stall
    /// (reported or not yet swept) ends ([`ConnState::h2_ended_stream`] names it).
    pub ended: bool,
    /// Streams opened but not followed (slot held), or the framing lost: to count as loss.
    pub untracked: u32,
}

/// The streams of `conn` are followed ([`sync::TRACKING`]).
#[inline(always)]
pub fn tracking(conn: &ConnState) -> bool {
    conn.h2_sync == sync::TRACKING
}

/// This transfer in direction `dir` may start an HTTP/2 connection: its protocol is not
/// known yet (the request direction's first bytes not classified: this may be that
/// transfer) and it goes in the request direction. Cheap: no bytes read.
#[inline(always)]
pub fn may_start(conn: &ConnState, dir: u8) -> bool {
    conn.proto == crate::message::proto::UNKNOWN
        && conn.h2_sync == sync::NONE
        && dir == transfer::request_direction(conn)
}

/// `conn`'s streams should be followed from this transfer in direction `dir` on
/// ([`may_start`]), as it begins with the HTTP/2 client preface (read with `more`). The
/// caller then creates its [`Streams`] with [`start`]; the message classifier recognizes
/// the protocol from the same bytes. (An HTTP/2 connection upgraded from HTTP/1.1, `h2c`,
/// sends its preface after the protocol was known: it is judged by the direction rule.)
#[inline(always)]
pub fn starts(conn: &ConnState, dir: u8, more: &mut impl More) -> bool {
    may_start(conn, dir) && more(0) == Some(PREFACE)
}

/// Starts following `conn`'s streams in `streams` (a fresh entry) at a transfer in the
/// request direction that begins with the preface (skipped as if it were a frame).
#[inline(always)]
pub fn start(conn: &mut ConnState, streams: &mut Streams) {
    *streams = Streams::EMPTY;
    streams.skip[side(transfer::request_direction(conn))] = PREFACE_LEN;
    conn.h2_sync = sync::TRACKING;
    conn.h2_open = 0;
    conn.h2_oldest_ns = 0;
    conn.h2_oldest_stream = 0;
}

/// Stops following `conn`'s streams: the direction rule judges it from here on.
#[inline(always)]
pub fn lose(conn: &mut ConnState) {
    conn.h2_sync = sync::LOST;
    conn.h2_answered_late = 0;
    conn.h2_open = 0;
    conn.h2_oldest_ns = 0;
    conn.h2_oldest_stream = 0;
}

#[inline(always)]
fn side(dir: u8) -> usize {
    if dir == direction::IN {
        0
    } else {
        1
    }
}

/// Walks the frames of a transfer of `total` bytes in direction `dir` at `now` on a
/// [`tracking`] connection, `header(offset)` reading the frame header at `offset` of the
/// transfer ([`Header`]):
/// opens and answers streams in `streams` and keeps `conn`'s summary (`h2_open`,
/// `h2_oldest_*`, `h2_ended_*`) up to date. Loses the framing ([`lose`]) when it cannot
/// follow it. [`walk_begin`], then [`walk_frame`] until it returns false (at most
/// [`WALK_FRAMES`] times), then [`walk_end`]: the kernel runs the frames through `bpf_loop`,
/// whose callback the verifier checks once, whatever the count.
///
/// Everything the walk carries from one frame to the next lives in `streams` (a map value in
/// the kernel, whose contents the verifier does not track), not in locals: what a frame
/// found is the same state to the verifier whatever it was.
#[inline(always)]
pub fn walk(
    conn: &mut ConnState,
    streams: &mut Streams,
    dir: u8,
    total: u64,
    now: u64,
    stall_after_ns: u64,
    mut header: impl Header,
) -> Walk {
    let at = walk_begin(streams, dir);
    let request = dir == transfer::request_direction(conn);
    let mut frames = 0;
    while frames < WALK_FRAMES
        && walk_frame(
            conn,
            streams,
            at,
            request,
            total,
            now,
            stall_after_ns,
            &mut header,
        )
    {
        frames += 1;
    }
    walk_end(conn, streams, at, total)
}

/// Starts [`walk`]ing a transfer in direction `dir`: the index of that direction in
/// [`Streams`]' per-direction fields, which the other steps take.
#[inline(always)]
pub fn walk_begin(streams: &mut Streams, dir: u8) -> usize {
    let at = side(dir);
    streams.cursor[at] = u64::from(streams.skip[at]);
    streams.walk[at] = 0;
    at
}

/// One frame of [`walk`] (`request`: the transfer goes in the request direction): false when
/// the walk is over, the transfer's `total` bytes walked or the framing lost.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn walk_frame(
    conn: &mut ConnState,
    streams: &mut Streams,
    at: usize,
    request: bool,
    total: u64,
    now: u64,
    stall_after_ns: u64,
    header: &mut impl Header,
) -> bool {
    let at = at & 1;
    if streams.cursor[at] >= total {
        return false;
    }
    if !frame(
        conn,
        streams,
        at,
        request,
        total,
        now,
        stall_after_ns,
        header,
    ) {
        streams.walk[at] |= WALK_LOST;
        return false;
    }
    true
}

/// Ends [`walk`]: what the transfer's frames did. A transfer not walked to its end (more
/// than [`WALK_FRAMES`] frames) loses the framing.
#[inline(always)]
pub fn walk_end(conn: &mut ConnState, streams: &mut Streams, at: usize, total: u64) -> Walk {
    let at = at & 1;
    let mut result = Walk {
        ended: streams.walk[at] & WALK_ENDED != 0,
        untracked: streams.walk[at] >> WALK_UNTRACKED_SHIFT,
    };
    if streams.walk[at] & WALK_LOST != 0 || streams.cursor[at] < total {
        lose(conn);
        result.untracked += 1;
        result.ended = false;
        return result;
    }
    conn.h2_answered_late = u8::from(result.ended);
    // At most a frame's length plus its header: fits.
    streams.skip[at] = (streams.cursor[at] - total) as u32;
    if streams.walk[at] & WALK_CHANGED != 0 {
        summarize(conn, streams);
    }
    result
}

/// Bits of [`Streams::walk`].
const WALK_LOST: u32 = 1;
const WALK_CHANGED: u32 = 2;
const WALK_ENDED: u32 = 4;
const WALK_UNTRACKED_SHIFT: u32 = 8;

/// The frame at `streams.cursor[at]` (its header within the transfer's `total` bytes, `at`
/// the direction's index): opens or answers its stream, moves the cursor past it. False when
/// it is not a frame that can be followed.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn frame(
    conn: &mut ConnState,
    streams: &mut Streams,
    at: usize,
    request: bool,
    total: u64,
    now: u64,
    stall_after_ns: u64,
    header: &mut impl Header,
) -> bool {
    let at = at & 1;
    let offset = streams.cursor[at];
    // A header split between two transfers is not followed.
    if offset + FRAME_HEADER_LEN > total {
        return false;
    }
    let Some([l0, l1, l2, kind, s0, s1, s2, s3]) = header(offset as usize) else {
        return false;
    };
    if kind > MAX_FRAME_TYPE {
        return false;
    }
    let length = (u64::from(l0) << 16) | (u64::from(l1) << 8) | u64::from(l2);
    streams.cursor[at] = offset + FRAME_HEADER_LEN + length;
    let asks = request && kind == HEADERS;
    let answers = kind == RST_STREAM || (!request && matches!(kind, HEADERS | DATA));
    if !asks && !answers {
        return true;
    }
    let id = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
    if id == 0 {
        // Stream frames always name a stream: these bytes are not frames.
        return false;
    }
    if asks {
        if id & 1 == 1 && id > streams.highest {
            streams.highest = id;
            if streams.open(id, now) {
                streams.walk[at] |= WALK_CHANGED;
            } else {
                streams.walk[at] += 1 << WALK_UNTRACKED_SHIFT;
            }
        }
    } else if let Some(opened) = streams.close(at, id) {
        streams.walk[at] |= WALK_CHANGED;
        let first = streams.walk[at] & WALK_ENDED == 0;
        if now.saturating_sub(opened) >= stall_after_ns && (first || opened < conn.h2_ended_ns) {
            streams.walk[at] |= WALK_ENDED;
            conn.h2_ended_ns = opened;
            conn.h2_ended_stream = id;
        }
    }
    true
}

/// Sets `conn`'s count of streams awaiting their response and the oldest of them (kept in
/// `conn` while looking, for the verifier, as in [`walk`]).
#[inline(always)]
fn summarize(conn: &mut ConnState, streams: &Streams) {
    conn.h2_open = 0;
    conn.h2_oldest_ns = 0;
    conn.h2_oldest_stream = 0;
    let mut slot = 0;
    while slot < STREAM_SLOTS {
        if streams.awaits(slot) {
            conn.h2_open += 1;
            let opened = streams.opened_ns[slot];
            if conn.h2_oldest_ns == 0 || opened < conn.h2_oldest_ns {
                conn.h2_oldest_ns = opened;
                conn.h2_oldest_stream = streams.ids[slot];
            }
        }
        slot += 1;
    }
}

/// At `now`, a followed stream has awaited its response for at least `stall_after_ns`.
#[inline(always)]
pub fn quiet_past_threshold(conn: &ConnState, now: u64, stall_after_ns: u64) -> bool {
    tracking(conn) && conn.h2_open > 0 && now.saturating_sub(conn.h2_oldest_ns) >= stall_after_ns
}

/// The connection can no longer answer its oldest stream (it is closing): names that stream
/// in `h2_ended_*` for the `QuietEnded` record that reports it.
#[inline(always)]
pub fn end_oldest(conn: &mut ConnState) {
    conn.h2_ended_ns = conn.h2_oldest_ns;
    conn.h2_ended_stream = conn.h2_oldest_stream;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{message::proto, role};
    use std::{vec, vec::Vec};

    const MS: u64 = 1_000_000;
    const THRESHOLD: u64 = 2_000 * MS;

    fn frame(kind: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        let len = payload_len as u32;
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.resize(9 + payload_len, 0xab);
        bytes
    }

    fn preface() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 6));
        bytes
    }

    struct Conn {
        state: ConnState,
        streams: Streams,
    }

    impl Conn {
        fn new(role_id: u8) -> Self {
            let mut state = ConnState {
                role: role_id,
                ..Default::default()
            };
            let mut streams = Streams::EMPTY;
            let request = transfer::request_direction(&state);
            let first = preface();
            assert!(starts(&state, request, &mut reader(&first)));
            start(&mut state, &mut streams);
            let mut conn = Self { state, streams };
            assert_eq!(conn.transfer(request, 0, &first), Walk::default());
            conn
        }

        fn transfer(&mut self, dir: u8, at_ms: u64, bytes: &[u8]) -> Walk {
            walk(
                &mut self.state,
                &mut self.streams,
                dir,
                bytes.len() as u64,
                at_ms * MS,
                THRESHOLD,
                header_from(reader(bytes)),
            )
        }
    }

    fn reader(bytes: &[u8]) -> impl More + '_ {
        |at: usize| bytes.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]])
    }

    fn call(stream: u32) -> Vec<u8> {
        let mut bytes = frame(1, stream, 40);
        bytes.extend(frame(0, stream, 12));
        bytes
    }

    fn response(stream: u32) -> Vec<u8> {
        let mut bytes = frame(1, stream, 20);
        bytes.extend(frame(0, stream, 12));
        bytes.extend(frame(1, stream, 30));
        bytes
    }

    #[test]
    fn a_slow_stream_stays_owed_while_others_complete() {
        for role_id in [role::CLIENT, role::SERVER] {
            let mut conn = Conn::new(role_id);
            let (ask, reply) = if role_id == role::CLIENT {
                (direction::OUT, direction::IN)
            } else {
                (direction::IN, direction::OUT)
            };
            conn.transfer(ask, 100, &call(1));
            assert_eq!((conn.state.h2_open, conn.state.h2_oldest_stream), (1, 1));
            for i in 1..12u32 {
                let at = 100 + u64::from(i) * 500;
                conn.transfer(ask, at, &call(1 + 2 * i));
                assert_eq!(conn.state.h2_open, 2);
                assert!(!conn.transfer(reply, at + 5, &response(1 + 2 * i)).ended);
                assert_eq!(conn.state.h2_open, 1, "{role_id}: call {i} answered");
                assert_eq!(
                    (conn.state.h2_oldest_stream, conn.state.h2_oldest_ns),
                    (1, 100 * MS)
                );
                assert!(quiet_past_threshold(&conn.state, at * MS, THRESHOLD) == (at >= 2_100));
            }
            let walk = conn.transfer(reply, 6_100, &response(1));
            assert!(walk.ended);
            assert_eq!(
                (conn.state.h2_ended_stream, conn.state.h2_ended_ns),
                (1, 100 * MS)
            );
            assert_eq!((conn.state.h2_open, conn.state.h2_oldest_ns), (0, 0));
            assert!(tracking(&conn.state));
        }
    }

    #[test]
    fn frames_are_followed_across_transfers() {
        let mut conn = Conn::new(role::SERVER);
        // A reader that takes the 9-byte header, then the payload in two reads.
        let request = call(1);
        conn.transfer(direction::IN, 1, &request[..9]);
        conn.transfer(direction::IN, 1, &request[9..30]);
        conn.transfer(direction::IN, 1, &request[30..]);
        assert_eq!(conn.state.h2_open, 1);
        // A write the kernel took in part: the rest of its frame comes with the next one.
        let mut reply = response(1);
        let rest = reply.split_off(12);
        conn.transfer(direction::OUT, 2, &reply);
        assert_eq!(conn.state.h2_open, 0, "the response began");
        conn.transfer(direction::OUT, 2, &rest);
        conn.transfer(direction::IN, 3, &call(3));
        assert_eq!((conn.state.h2_open, conn.state.h2_oldest_stream), (1, 3));
        assert!(tracking(&conn.state));
    }

    #[test]
    fn control_frames_trailers_and_pushes_open_nothing() {
        let mut conn = Conn::new(role::CLIENT);
        let mut control = frame(8, 0, 4); // WINDOW_UPDATE
        control.extend(frame(6, 0, 8)); // PING
        conn.transfer(direction::OUT, 1, &control);
        conn.transfer(direction::IN, 1, &frame(4, 0, 0));
        assert_eq!(conn.state.h2_open, 0);
        conn.transfer(direction::OUT, 2, &call(5));
        conn.transfer(direction::IN, 3, &response(5));
        // Client trailers on an answered stream, a lower id, an even id: no new request.
        conn.transfer(direction::OUT, 4, &frame(1, 5, 3));
        conn.transfer(direction::OUT, 4, &frame(1, 3, 3));
        conn.transfer(direction::OUT, 4, &frame(1, 6, 3));
        assert_eq!(conn.state.h2_open, 0);
        assert!(tracking(&conn.state));
    }

    #[test]
    fn a_burst_of_concurrent_calls_and_their_answers_stays_followed() {
        // h2load -m32, or a gRPC client's burst: every call in one write, every response
        // (HEADERS, DATA, trailers) in one read: 64 then 96 frames in one transfer each.
        let mut conn = Conn::new(role::CLIENT);
        let ids = (0..STREAM_SLOTS as u32).map(|i| 1 + 2 * i);
        let calls: Vec<u8> = ids.clone().flat_map(call).collect();
        assert_eq!(conn.transfer(direction::OUT, 1, &calls).untracked, 0);
        assert_eq!(conn.state.h2_open as usize, STREAM_SLOTS);
        let answers: Vec<u8> = ids.rev().flat_map(response).collect();
        assert_eq!(conn.transfer(direction::IN, 2, &answers).untracked, 0);
        assert_eq!(
            (conn.state.h2_sync, conn.state.h2_open),
            (sync::TRACKING, 0)
        );
    }

    #[test]
    fn a_reset_answers_either_way() {
        let mut conn = Conn::new(role::CLIENT);
        conn.transfer(direction::OUT, 0, &call(1));
        conn.transfer(direction::OUT, 0, &call(3));
        let walk = conn.transfer(direction::OUT, 2_500, &frame(3, 1, 4));
        assert!(walk.ended, "a cancel after the threshold ends the stall");
        assert_eq!(conn.state.h2_ended_stream, 1);
        conn.transfer(direction::IN, 2_600, &frame(3, 3, 4));
        assert_eq!(conn.state.h2_open, 0);
    }

    #[test]
    fn oldest_of_several_overdue_streams_is_named_and_slots_are_bounded() {
        let mut conn = Conn::new(role::CLIENT);
        conn.transfer(direction::OUT, 0, &call(1));
        conn.transfer(direction::OUT, 10, &call(3));
        let mut both = response(3);
        both.extend(response(1));
        assert!(conn.transfer(direction::IN, 3_000, &both).ended);
        assert_eq!((conn.state.h2_ended_stream, conn.state.h2_ended_ns), (1, 0));
        conn.transfer(direction::OUT, 3_100, &call(65));
        assert_eq!(conn.state.h2_open, 1);
        // Stream 65 + 64 maps to the slot of stream 65, still awaiting: not followed.
        let walk = conn.transfer(direction::OUT, 3_200, &call(129));
        assert_eq!((walk.untracked, conn.state.h2_open), (1, 1));
        let walk = conn.transfer(direction::OUT, 3_300, &call(131));
        assert_eq!((walk.untracked, conn.state.h2_open), (0, 2));
        assert_eq!(conn.state.h2_oldest_stream, 65);
    }

    #[test]
    fn lost_framing_falls_back_to_the_direction_rule() {
        // A header split between two transfers.
        let mut conn = Conn::new(role::SERVER);
        conn.transfer(direction::IN, 1, &call(1));
        let walk = conn.transfer(direction::IN, 2, &call(3)[..5]);
        assert_eq!(walk.untracked, 1);
        assert_eq!((conn.state.h2_sync, conn.state.h2_open), (sync::LOST, 0));
        assert!(!quiet_past_threshold(&conn.state, u64::MAX, THRESHOLD));
        // Bytes that are no frames.
        let mut conn = Conn::new(role::SERVER);
        conn.transfer(direction::IN, 1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(conn.state.h2_sync, sync::LOST);
        // As many frames as one walk follows, then one more.
        let mut conn = Conn::new(role::CLIENT);
        let most: Vec<u8> = (0..WALK_FRAMES).flat_map(|_| frame(8, 0, 4)).collect();
        conn.transfer(direction::IN, 1, &most);
        assert_eq!(conn.state.h2_sync, sync::TRACKING);
        let mut conn = Conn::new(role::CLIENT);
        let many: Vec<u8> = (0..=WALK_FRAMES).flat_map(|_| frame(8, 0, 4)).collect();
        conn.transfer(direction::IN, 1, &many);
        assert_eq!(conn.state.h2_sync, sync::LOST);
        // A header that cannot be read.
        let mut conn = Conn::new(role::CLIENT);
        let bytes = call(1);
        let result = super::walk(
            &mut conn.state,
            &mut conn.streams,
            direction::OUT,
            bytes.len() as u64,
            1,
            THRESHOLD,
            |_| None,
        );
        assert_eq!((result.untracked, conn.state.h2_sync), (1, sync::LOST));
    }

    #[test]
    fn only_a_preface_at_the_start_of_a_request_transfer_starts_following() {
        let state = ConnState {
            role: role::SERVER,
            ..Default::default()
        };
        let first = preface();
        assert!(starts(&state, direction::IN, &mut reader(&first)));
        assert!(!starts(&state, direction::OUT, &mut reader(&first)));
        assert!(!starts(&state, direction::IN, &mut reader(&call(1))));
        for known in [proto::HTTP1, proto::HTTP2, proto::OTHER] {
            let other = ConnState {
                proto: known,
                ..state
            };
            assert!(!starts(&other, direction::IN, &mut reader(&first)));
        }
        let lost = ConnState {
            h2_sync: sync::LOST,
            ..state
        };
        assert!(!starts(&lost, direction::IN, &mut reader(&first)));
    }

    #[test]
    fn garbage_never_panics() {
        for seed in 0..200u32 {
            let mut conn = Conn::new(role::CLIENT);
            let bytes: Vec<u8> = (0..300u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 13) as u8)
                .collect();
            for (i, chunk) in bytes.chunks(1 + seed as usize % 40).enumerate() {
                let dir = if i % 2 == 0 {
                    direction::IN
                } else {
                    direction::OUT
                };
                conn.transfer(dir, i as u64, chunk);
            }
            assert!(conn.state.h2_open as usize <= STREAM_SLOTS);
        }
    }
}
