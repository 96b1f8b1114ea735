//! HTTP/2 per-stream accounting (RFC 9113): which of a connection's streams await their
//! response, so that one slow call among many that flow on the same connection is a stall,
//! and an idle channel is not.
//!
//! Run by the kernel programs on every transfer of a connection recognized as HTTP/2
//! ([`crate::message::proto::HTTP2`], from the client preface) and by the tracker's tests on
//! their model of the kernel. The rule:
//! - a HEADERS frame in the request direction on a new client-initiated stream (odd id, above
//!   every id seen) opens it; a response is owed once the request has ended: that frame's
//!   `END_STREAM` flag, or the one of a later DATA frame or trailers of the stream (a request
//!   whose body still comes, a client-streaming call, is its client's to finish: an upload
//!   that lasts longer than the threshold is no stall);
//! - the first HEADERS or DATA frame of that stream in the reply direction (the response has
//!   begun), or a RST_STREAM either way, answers it. A response that has begun is not judged
//!   further: a server-streaming or bidirectional call (a watch) stays open for as long as it
//!   likes once it has answered, and waiting on `END_STREAM` would flag every one of them.
//!
//! Frames are followed across transfers: per direction, the bytes of the current frame still
//! to come ([`Streams::skip`]), so a reader that takes the 9-byte header and then the payload,
//! or a transfer that ends mid-frame, stays in step. When the framing cannot be followed (a
//! frame header split between two transfers, more frames in one transfer than
//! [`WALK_FRAMES`], an unknown frame type longer than any extension's, a header that cannot
//! be read) the
//! connection falls back to the direction rule ([`sync::LOST`], counted as
//! [`crate::loss::HTTP2_UNTRACKED`]).
//!
//! Written for the verifier: a bounded walk, frame headers read 4 bytes at a time at offsets
//! of the transfer (`More`), and stream slots indexed by a masked stream id (then probed, a
//! few at most).
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

/// [`ConnState::h2_ended_how`]: how the stream a `QuietEnded` record names ended.
pub mod ended {
    /// Its response began, or the connection closed on it.
    pub const ANSWERED: u8 = 0;
    /// Its client reset it (`RST_STREAM`: a cancelled call, a deadline that passed).
    pub const RESET_BY_CLIENT: u8 = 1;
    /// Its server reset it (`RST_STREAM`: a refused stream, an error).
    pub const RESET_BY_SERVER: u8 = 2;
}

/// Streams awaiting their response that one connection's state holds at once.
pub const STREAM_SLOTS: usize = 32;
/// Slots a new stream may take: the one its id maps to (masked), else the first of seven
/// others that holds no stream awaiting; a stream that finds all eight held is not followed.
/// The others are 16, 8, 24… slots away (the id's slot with its high bits flipped), far
/// from the slots of the streams opened just before and after it (ids come in order): while
/// a call is slow, the calls whose ids map to its slot take one that no call in flight
/// needs (the next slots would push each following call on, until one is lost). Answering a
/// stream looks at as many, its id first.
pub const STREAM_PROBES: usize = 8;
const PROBE_OFFSETS: [usize; STREAM_PROBES] = [0, 16, 8, 24, 4, 20, 12, 28];
/// Frame headers one transfer may hold; a transfer with more loses the framing. A server
/// answering many concurrent streams writes a HEADERS and a DATA frame (and gRPC's trailers)
/// per stream in one go, and a server reading a client's burst reads as many per call
/// (grpcio's thousand calls fired at once: over 2 000 frames in one read). The walk's cost
/// follows the frames there are, not this bound (~40 ns a frame: one read of user memory per
/// header), and `bpf_loop`'s callback is verified once whatever it is: so it bounds what one
/// syscall may pay (~160 µs, once: a connection that passes it is no longer followed).
pub const WALK_FRAMES: usize = 4096;

const PREFACE: [u8; 4] = *b"PRI ";
const PREFACE_LEN: u32 = 24;
const FRAME_HEADER_LEN: u64 = 9;
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
/// How far beyond the highest stream the client opened a frame may name one: a reply racing
/// its request's walk on another CPU, or the ids of pushed streams (even, the server's), stay
/// well within it; a stream id read from payload bytes (31 random bits) almost never does.
const MAX_STREAM_ID_LEAD: u32 = 1 << 10;
/// The flag of a DATA or HEADERS frame that ends its sender's side of the stream.
const END_STREAM: u8 = 0x1;
/// [`Streams::opened_ns`] of a stream whose request has not ended (no `END_STREAM` yet): it
/// holds its slot, and no response is owed yet.
const REQUEST_UNFINISHED: u64 = u64::MAX;
/// A frame of a type RFC 9113 does not define (an extension's, or a reserved "grease" type
/// browsers send: peers must ignore the types they do not know, §5.5) is skipped, up to this
/// many bytes: `SETTINGS_MAX_FRAME_SIZE`'s initial value, and extension frames are
/// control-sized. A longer one is taken for bytes that are not HTTP/2 framing.
const MAX_UNKNOWN_FRAME_LEN: u64 = 16_384;

/// One HTTP/2 connection's stream state, kept by the kernel in its own map keyed by the
/// `struct sock` address (only HTTP/2 connections pay for it).
///
/// A connection's two directions are often walked by two threads at once (a reader and a
/// writer, on two CPUs), and the BPF target has no atomic read-modify-write here: so every
/// field has one writer, the walk of one direction. A slot's stream awaits its response while
/// its generation (`generation`, changed by the request direction when a stream takes the
/// slot) differs from the generation each direction last closed (`closed`: the reply
/// direction answers, either direction resets). Generations take 2 bits, held in bit planes
/// (bit `slot` of plane 0, the low bit, and of plane 1): three values are always enough for
/// one that differs from both closed ones, and the slots awaiting are a few word operations
/// ([`Streams::awaiting`]), not a pass over 32 slots.
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
    /// The stream whose request ends with the frame the request direction is still
    /// transferring (its `END_STREAM` frame's payload is still to come; 0: none): the request
    /// ends when its last byte moves, not its header.
    pub ending: u32,
    /// A stream opened while sending its request that found all its slots held (0: none):
    /// placed when its request ends, if it does, as a response is then owed.
    pub unplaced: u32,
    /// 1 while the reply direction's first frame is still to come and must be the server's
    /// `SETTINGS` (its connection preface, RFC 9113 §3.4): set when nothing moved that way
    /// before the walk began, cleared by that direction's walk.
    pub reply_preface: u32,
    /// Per slot: its stream's id, and when its request ended (ns; [`REQUEST_UNFINISHED`]
    /// until then).
    pub ids: [u32; STREAM_SLOTS],
    pub opened_ns: [u64; STREAM_SLOTS],
    /// Per slot, its generation (bit planes).
    pub generation: [u32; 2],
    /// Per direction (`[in, out]`) and slot: the generation it last closed (bit planes).
    pub closed: [[u32; 2]; 2],
    /// Per direction: the first bytes of a frame header the last transfer ended inside
    /// (`held_len` of them, 1 to 8, byte `i` in bits `8i..8i + 8`), joined with the rest at
    /// the next transfer. A reader with a fixed buffer splits headers anywhere.
    pub held: [u64; 2],
    pub held_len: [u32; 2],
}

const _: () = assert!(core::mem::size_of::<Streams>() == 480);

impl Streams {
    pub const EMPTY: Self = Self {
        skip: [0; 2],
        cursor: [0; 2],
        walk: [0; 2],
        highest: 0,
        ending: 0,
        unplaced: 0,
        reply_preface: 0,
        ids: [0; STREAM_SLOTS],
        opened_ns: [0; STREAM_SLOTS],
        generation: [0; 2],
        closed: [[0; 2]; 2],
        held: [0; 2],
        held_len: [0; 2],
    };

    /// The slot of stream `id` at probe `probe` (0 to [`STREAM_PROBES`] - 1).
    #[inline(always)]
    fn slot(id: u32, probe: usize) -> usize {
        ((id >> 1) as usize ^ PROBE_OFFSETS[probe & (STREAM_PROBES - 1)]) & (STREAM_SLOTS - 1)
    }

    /// The slots whose streams await their response (bit `slot`).
    #[inline(always)]
    fn awaiting(&self) -> u32 {
        let [low, high] = self.generation;
        let differs =
            |[closed_low, closed_high]: [u32; 2]| (low ^ closed_low) | (high ^ closed_high);
        differs(self.closed[0]) & differs(self.closed[1])
    }

    /// Slot `slot`'s stream awaits its response.
    #[inline(always)]
    fn awaits(&self, slot: usize) -> bool {
        self.awaiting() & (1 << (slot & (STREAM_SLOTS - 1))) != 0
    }

    /// Opens stream `id` (request direction), its request ended at `ended` (ns, or
    /// [`REQUEST_UNFINISHED`]), in the first of its [`STREAM_PROBES`] slots that holds no
    /// stream awaiting. If all are held, a request that has ended (a response is owed) takes
    /// the first held by a stream still sending its request, which is no longer followed:
    /// dozens of open uploads or quiet bidirectional calls must not hide a stuck call.
    #[inline(always)]
    fn open(&mut self, id: u32, ended: u64) -> Opened {
        let awaiting = self.awaiting();
        let mut sending = STREAM_SLOTS;
        let mut probe = 0;
        while probe < STREAM_PROBES {
            let slot = Self::slot(id, probe);
            if awaiting & (1 << slot) == 0 {
                self.take(slot, id, ended);
                return Opened::Free;
            }
            if sending == STREAM_SLOTS && self.opened_ns[slot] == REQUEST_UNFINISHED {
                sending = slot;
            }
            probe += 1;
        }
        if ended == REQUEST_UNFINISHED || sending == STREAM_SLOTS {
            return Opened::Full;
        }
        self.take(sending, id, ended);
        Opened::Displaced
    }

    /// Slot `slot` holds stream `id`, its request ended at `ended`.
    #[inline(always)]
    fn take(&mut self, slot: usize, id: u32, ended: u64) {
        let slot = slot & (STREAM_SLOTS - 1);
        self.ids[slot] = id;
        self.opened_ns[slot] = ended;
        // A generation neither direction has closed: the slot awaits again.
        let (a, b) = (
            plane_value(self.closed[0], slot),
            plane_value(self.closed[1], slot),
        );
        let generation = if a != 0 && b != 0 {
            0
        } else if a != 1 && b != 1 {
            1
        } else {
            2
        };
        set_plane_value(&mut self.generation, slot, generation);
    }

    /// The slot of stream `id`, if it awaits. (An id is opened once: no two slots awaiting
    /// hold the same.)
    #[inline(always)]
    fn find(&self, id: u32) -> Option<usize> {
        let mut probe = 0;
        while probe < STREAM_PROBES {
            let slot = Self::slot(id, probe);
            if self.ids[slot] == id && self.awaits(slot) {
                return Some(slot);
            }
            probe += 1;
        }
        None
    }

    /// Answers or resets stream `id` from direction `side`: when its request ended
    /// ([`REQUEST_UNFINISHED`] if it had not), if it was awaiting its response.
    #[inline(always)]
    fn close(&mut self, side: usize, id: u32) -> Option<u64> {
        let slot = self.find(id)? & (STREAM_SLOTS - 1);
        let generation = plane_value(self.generation, slot);
        set_plane_value(&mut self.closed[side & 1], slot, generation);
        Some(self.opened_ns[slot])
    }

    /// Opens new stream `id` from the walk of direction `at` (the request's), its request
    /// ended at `ended` (or [`REQUEST_UNFINISHED`]), noting in `walk[at]` what changed and
    /// what is not followed.
    #[inline(always)]
    fn open_new(&mut self, at: usize, id: u32, ended: u64) {
        let at = at & 1;
        match self.open(id, ended) {
            Opened::Free => self.walk[at] |= WALK_CHANGED,
            Opened::Displaced => {
                self.walk[at] |= WALK_CHANGED;
                self.walk[at] += 1 << WALK_UNTRACKED_SHIFT;
            }
            Opened::Full if ended == REQUEST_UNFINISHED => {
                // Placed if its request ends; one noted before it is given up.
                if self.unplaced != 0 {
                    self.walk[at] += 1 << WALK_UNTRACKED_SHIFT;
                }
                self.unplaced = id;
            }
            Opened::Full => self.walk[at] += 1 << WALK_UNTRACKED_SHIFT,
        }
    }

    /// Stream `id`'s request ends at `now`, seen by the walk of direction `at`: its response
    /// is owed from then (an unplaced stream is placed now).
    #[inline(always)]
    fn request_ends(&mut self, at: usize, id: u32, now: u64) {
        if self.end_request(id, now) {
            self.walk[at & 1] |= WALK_CHANGED;
        } else if id == self.unplaced {
            self.unplaced = 0;
            self.open_new(at, id, now);
        }
    }

    /// Stream `id`'s request ends at `now` (request direction): its response is owed from
    /// then. False if it is not awaiting, or its request had ended.
    #[inline(always)]
    fn end_request(&mut self, id: u32, now: u64) -> bool {
        match self.find(id) {
            Some(slot) if self.opened_ns[slot & (STREAM_SLOTS - 1)] == REQUEST_UNFINISHED => {
                self.opened_ns[slot & (STREAM_SLOTS - 1)] = now;
                true
            }
            _ => false,
        }
    }
}

/// How [`Streams::open`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opened {
    /// In a free slot.
    Free,
    /// In place of a stream still sending its request, no longer followed.
    Displaced,
    /// Not at all: the stream is not followed.
    Full,
}

/// Slot `slot`'s 2-bit value in `planes`.
#[inline(always)]
fn plane_value(planes: [u32; 2], slot: usize) -> u32 {
    let slot = slot & (STREAM_SLOTS - 1);
    ((planes[0] >> slot) & 1) | (((planes[1] >> slot) & 1) << 1)
}

/// Sets slot `slot`'s 2-bit value in `planes` to `value`.
#[inline(always)]
fn set_plane_value(planes: &mut [u32; 2], slot: usize, value: u32) {
    let bit = 1u32 << (slot & (STREAM_SLOTS - 1));
    planes[0] = (planes[0] & !bit) | if value & 1 != 0 { bit } else { 0 };
    planes[1] = (planes[1] & !bit) | if value & 2 != 0 { bit } else { 0 };
}

/// Reads the frame header at an offset of the transfer, as [`packed`] (8 bytes: length,
/// type, `END_STREAM` and stream id), or `None` when it cannot be read. In the kernel, one
/// call per frame (the verifier explores each call site of the user-memory reader).
pub trait Header: FnMut(usize) -> Option<[u8; 8]> {}
impl<F: FnMut(usize) -> Option<[u8; 8]>> Header for F {}

/// Reads the 8 bytes at an offset of the transfer into its second argument, in memory order;
/// false when they cannot be read. Bytes past the transfer's end are whatever its buffer
/// holds there (they are not used). Only frame headers split between transfers need it. (A
/// flag and an out-parameter, not an `Option`: a nine-byte value comes back through the
/// caller's stack, which the verifier refuses to see returned.)
pub trait Bytes8: FnMut(u64, &mut [u8; 8]) -> bool {}
impl<F: FnMut(u64, &mut [u8; 8]) -> bool> Bytes8 for F {}

/// A [`Bytes8`] reader of `bytes` (zeros past their end): for tests and userspace models.
pub fn bytes8_from(bytes: &[u8]) -> impl Bytes8 + '_ {
    move |at: u64, word: &mut [u8; 8]| {
        let Some(from) = bytes.get(at as usize..) else {
            return false;
        };
        let n = from.len().min(8);
        *word = [0; 8];
        word[..n].copy_from_slice(&from[..n]);
        true
    }
}

/// The walk's 8 bytes of a 9-byte frame header: bytes 0–3 (length, type), then the stream
/// id (bytes 5–8) with its reserved bit, which receivers ignore (RFC 9113 §4.1), set to the
/// frame's `END_STREAM` flag (byte 4's bit 0; the only flag the walk needs).
#[inline(always)]
pub fn packed(header: [u8; 9]) -> [u8; 8] {
    let [a, b, c, d, flags, e, f, g, h] = header;
    [
        a,
        b,
        c,
        d,
        (e & 0x7f) | ((flags & END_STREAM) << 7),
        f,
        g,
        h,
    ]
}

/// A [`Header`] reader from 4-byte reads (`More`): for tests and userspace models.
pub fn header_from(mut more: impl More) -> impl Header {
    move |at: usize| {
        let [a, b, c, d] = more(at)?;
        let [flags, ..] = more(at + 4)?;
        let [e, f, g, h] = more(at + 5)?;
        Some(packed([a, b, c, d, flags, e, f, g, h]))
    }
}

/// What one transfer's frames did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// A stream awaiting its response for at least the threshold was answered: the stall
    /// (reported or not yet swept) ends ([`ConnState::h2_ended_stream`] names it).
    pub ended: bool,
    /// Streams opened but not followed (their slots held): to count as loss.
    pub untracked: u32,
    /// The framing was lost ([`lose`]): to count as loss.
    pub lost: bool,
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
/// request direction that begins with the preface (skipped as if it were a frame). When
/// nothing has moved in the reply direction yet, that direction's first frame must be the
/// server's SETTINGS: else its first bytes were missed (the programs attaching while the
/// connection opened) and its frames are not followed.
#[inline(always)]
pub fn start(conn: &mut ConnState, streams: &mut Streams) {
    *streams = Streams::EMPTY;
    let request = transfer::request_direction(conn);
    streams.skip[side(request)] = PREFACE_LEN;
    let replied = if request == direction::IN {
        conn.bytes_sent
    } else {
        conn.bytes_recv
    };
    streams.reply_preface = u32::from(replied == 0);
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
/// transfer ([`Header`]) and `bytes8` the bytes of a header split between two transfers
/// ([`Bytes8`]): opens and answers streams in `streams` and keeps `conn`'s summary
/// (`h2_open`, `h2_oldest_*`, `h2_ended_*`) up to date. Loses the framing ([`lose`]) when
/// it cannot follow it. [`walk_begin`], then [`walk_frame`] until it returns false (at most
/// [`WALK_FRAMES`] times), then [`walk_end`]: the kernel runs the frames through `bpf_loop`,
/// whose callback the verifier checks once, whatever the count.
///
/// Everything the walk carries from one frame to the next lives in `streams` (a map value in
/// the kernel, whose contents the verifier does not track), not in locals: what a frame
/// found is the same state to the verifier whatever it was.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn walk(
    conn: &mut ConnState,
    streams: &mut Streams,
    dir: u8,
    total: u64,
    now: u64,
    stall_after_ns: u64,
    mut header: impl Header,
    mut bytes8: impl Bytes8,
) -> Walk {
    let transfer = walk_begin(conn, streams, dir, total, now, stall_after_ns);
    let mut frames = 0;
    while frames < WALK_FRAMES && walk_frame(conn, streams, &transfer, &mut header, &mut bytes8) {
        frames += 1;
    }
    walk_end(conn, streams, &transfer)
}

/// The transfer a [`walk`] goes through.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Its direction's index in [`Streams`]' per-direction fields.
    pub at: usize,
    /// It goes in the request direction.
    pub request: bool,
    /// Its bytes.
    pub total: u64,
    /// When it was made, and the stall threshold (ns).
    pub now: u64,
    pub stall_after_ns: u64,
}

/// Starts [`walk`]ing a transfer of `total` bytes in direction `dir` at `now`.
#[inline(always)]
pub fn walk_begin(
    conn: &ConnState,
    streams: &mut Streams,
    dir: u8,
    total: u64,
    now: u64,
    stall_after_ns: u64,
) -> Transfer {
    let at = side(dir);
    let request = dir == transfer::request_direction(conn);
    streams.cursor[at] = u64::from(streams.skip[at]);
    streams.walk[at] = 0;
    if request && streams.ending != 0 && streams.cursor[at] <= total {
        // The rest of the frame that ends a request: it ends now.
        streams.request_ends(at, streams.ending, now);
        streams.ending = 0;
    }
    Transfer {
        at,
        request,
        total,
        now,
        stall_after_ns,
    }
}

/// One frame of [`walk`] (first, the rest of a header the previous transfer ended inside):
/// false when the walk is over, the transfer's bytes walked or the framing lost.
#[inline(always)]
pub fn walk_frame(
    conn: &mut ConnState,
    streams: &mut Streams,
    transfer: &Transfer,
    header: &mut impl Header,
    bytes8: &mut impl Bytes8,
) -> bool {
    let at = transfer.at & 1;
    let step = if streams.held_len[at] != 0 {
        join(conn, streams, transfer, bytes8)
    } else if streams.cursor[at] >= transfer.total {
        return false;
    } else {
        frame(conn, streams, transfer, header, bytes8)
    };
    match step {
        Step::Next => true,
        Step::End => false,
        Step::Lost => {
            streams.walk[at] |= WALK_LOST;
            false
        }
    }
}

/// Ends [`walk`]: what the transfer's frames did. A transfer not walked to its end (more
/// than [`WALK_FRAMES`] frames) loses the framing.
#[inline(always)]
pub fn walk_end(conn: &mut ConnState, streams: &mut Streams, transfer: &Transfer) -> Walk {
    let at = transfer.at & 1;
    let mut result = Walk {
        ended: streams.walk[at] & WALK_ENDED != 0,
        untracked: streams.walk[at] >> WALK_UNTRACKED_SHIFT,
        lost: false,
    };
    if streams.walk[at] & WALK_LOST != 0 || streams.cursor[at] < transfer.total {
        lose(conn);
        result.lost = true;
        result.ended = false;
        return result;
    }
    conn.h2_answered_late = if result.ended {
        ((streams.walk[at] & WALK_LATE) >> WALK_LATE_SHIFT) as u8
    } else {
        0
    };
    // At most a frame's length plus its header: fits.
    streams.skip[at] = (streams.cursor[at] - transfer.total) as u32;
    if streams.walk[at] & WALK_CHANGED != 0 {
        summarize(conn, streams);
    }
    result
}

/// Bits of [`Streams::walk`].
const WALK_LOST: u32 = 1;
const WALK_CHANGED: u32 = 2;
const WALK_ENDED: u32 = 4;
/// Streams answered late (up to 15).
const WALK_LATE_SHIFT: u32 = 4;
const WALK_LATE: u32 = 0xf << WALK_LATE_SHIFT;
const WALK_UNTRACKED_SHIFT: u32 = 8;

/// What one step of the walk did.
enum Step {
    /// A frame followed: on to the next.
    Next,
    /// The transfer's bytes are walked (its last ones may start a header).
    End,
    /// Not a frame that can be followed.
    Lost,
}

/// The frame whose header is at `streams.cursor[at]`: opens or answers its stream and moves
/// the cursor past it; a header the transfer ends inside is held for the next ([`hold`]).
#[inline(always)]
fn frame(
    conn: &mut ConnState,
    streams: &mut Streams,
    transfer: &Transfer,
    header: &mut impl Header,
    bytes8: &mut impl Bytes8,
) -> Step {
    let at = transfer.at & 1;
    let offset = streams.cursor[at];
    if offset + FRAME_HEADER_LEN > transfer.total {
        return hold(streams, at, offset, transfer.total, bytes8);
    }
    match header(offset as usize) {
        Some(bytes) => follow(conn, streams, transfer, offset + FRAME_HEADER_LEN, bytes),
        None => Step::Lost,
    }
}

/// Keeps the first bytes of a frame header, from `offset` to the transfer's end at `total`
/// (1 to 8 of them), for the next transfer in the same direction to complete.
#[inline(always)]
fn hold(
    streams: &mut Streams,
    at: usize,
    offset: u64,
    total: u64,
    bytes8: &mut impl Bytes8,
) -> Step {
    let at = at & 1;
    let count = total - offset;
    // The 8 bytes that end the transfer, or (a transfer shorter than that) that start it.
    let (from, skip) = if total >= 8 {
        (total - 8, 8 - count)
    } else {
        (0, offset)
    };
    let mut word = [0; 8];
    if !bytes8(from, &mut word) {
        return Step::Lost;
    }
    streams.held[at] = keep_low(u64::from_le_bytes(word) >> (8 * (skip & 7)), count);
    streams.held_len[at] = count as u32;
    streams.cursor[at] = total;
    Step::End
}

/// Completes the frame header held from the previous transfer with this one's first bytes
/// (or holds them too, while the header is still incomplete) and follows its frame.
#[inline(always)]
fn join(
    conn: &mut ConnState,
    streams: &mut Streams,
    transfer: &Transfer,
    bytes8: &mut impl Bytes8,
) -> Step {
    let at = transfer.at & 1;
    // 1 to 8.
    let held = u64::from(streams.held_len[at]).min(8);
    streams.held_len[at] = 0;
    let mut word = [0; 8];
    if !bytes8(0, &mut word) {
        return Step::Lost;
    }
    let word = u64::from_le_bytes(word);
    let needed = FRAME_HEADER_LEN - held;
    if transfer.total < needed {
        // Still incomplete: the whole transfer is more of it.
        let count = transfer.total;
        // `held` is below 8 here (`count` is at least 1).
        streams.held[at] |= keep_low(word, count).wrapping_shl(8 * held as u32);
        streams.held_len[at] = (held + count) as u32;
        streams.cursor[at] = transfer.total;
        return Step::End;
    }
    // The header's bytes 0–7, then its byte 8 (the stream id's last).
    let first = if held >= 8 {
        streams.held[at]
    } else {
        streams.held[at] | (word << (8 * held))
    };
    let last = (word >> (8 * (8 - held))) as u8;
    let first = first.to_le_bytes();
    let [l0, l1, l2, kind, flags, s0, s1, s2] = first;
    follow(
        conn,
        streams,
        transfer,
        needed,
        packed([l0, l1, l2, kind, flags, s0, s1, s2, last]),
    )
}

/// The low `count` bytes (0 to 8) of `word`.
#[inline(always)]
fn keep_low(word: u64, count: u64) -> u64 {
    if count >= 8 {
        word
    } else {
        word & ((1u64 << (8 * count)) - 1)
    }
}

/// Follows the frame whose header ([`packed`] in `bytes`) ends at offset `end` of the
/// transfer: moves the cursor past its payload, opens, ends the request of or answers its
/// stream.
#[inline(always)]
fn follow(
    conn: &mut ConnState,
    streams: &mut Streams,
    transfer: &Transfer,
    end: u64,
    bytes: [u8; 8],
) -> Step {
    let at = transfer.at & 1;
    let [l0, l1, l2, kind, s0, s1, s2, s3] = bytes;
    let length = (u64::from(l0) << 16) | (u64::from(l1) << 8) | u64::from(l2);
    let id = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
    if !plausible(kind, length, id, streams.highest) {
        return Step::Lost;
    }
    // `END_STREAM`'s bit: a SETTINGS frame's `ACK`.
    let end_stream = s0 & 0x80 != 0;
    if !transfer.request && streams.reply_preface != 0 {
        streams.reply_preface = 0;
        if kind != SETTINGS || end_stream {
            // The reply direction's first bytes were not seen: where its frames start is
            // not known.
            return Step::Lost;
        }
    }
    streams.cursor[at] = end + length;
    let message = matches!(kind, HEADERS | DATA);
    // Request HEADERS open a stream (or are its trailers); request frames that end it end
    // its request.
    let asks = transfer.request && (kind == HEADERS || (kind == DATA && end_stream));
    let answers = kind == RST_STREAM || (!transfer.request && message);
    if !asks && !answers {
        return Step::Next;
    }
    if asks {
        // A request ends with the last byte of its `END_STREAM` frame: one whose payload is
        // still to come (a large message on a slow link) ends with a later transfer.
        let ends_now = end_stream && streams.cursor[at] <= transfer.total;
        if end_stream && !ends_now {
            streams.ending = id;
        }
        if kind == HEADERS && id & 1 == 1 && id > streams.highest {
            streams.highest = id;
            let ended = if ends_now {
                transfer.now
            } else {
                REQUEST_UNFINISHED
            };
            streams.open_new(at, id, ended);
        } else if ends_now {
            streams.request_ends(at, id, transfer.now);
        }
    } else if let Some(opened) = streams.close(at, id) {
        streams.walk[at] |= WALK_CHANGED;
        let first = streams.walk[at] & WALK_ENDED == 0;
        let owed = opened != REQUEST_UNFINISHED;
        if owed && transfer.now.saturating_sub(opened) >= transfer.stall_after_ns {
            if streams.walk[at] & WALK_LATE != WALK_LATE {
                streams.walk[at] += 1 << WALK_LATE_SHIFT;
            }
            if first || opened < conn.h2_ended_ns {
                streams.walk[at] |= WALK_ENDED;
                conn.h2_ended_ns = opened;
                conn.h2_ended_stream = id;
                conn.h2_ended_how = match (kind, transfer.request) {
                    (RST_STREAM, true) => ended::RESET_BY_CLIENT,
                    (RST_STREAM, false) => ended::RESET_BY_SERVER,
                    _ => ended::ANSWERED,
                };
            }
        }
    }
    Step::Next
}

/// A frame header a peer may send (RFC 9113 §4.2, §5.1.1, §6; each violation is a connection
/// error): a frame about a stream names one and a frame about the connection names none,
/// control frames have their fixed lengths, an extension's frame is control-sized, and no
/// stream is more than [`MAX_STREAM_ID_LEAD`] beyond the highest the client opened. Bytes that
/// fail are payload taken for a header: the walk is out of step (it began inside a frame —
/// a daemon attaching while the connection opened, its receive program a moment after its
/// send one), and following it would open streams no response reaches, their slots held for
/// good and a stall flagged. A random header passes about once in 10^6.
#[inline(always)]
fn plausible(kind: u8, length: u64, id: u32, highest: u32) -> bool {
    let on_stream = id != 0;
    let shape = match kind {
        DATA | HEADERS | PUSH_PROMISE | CONTINUATION => on_stream,
        PRIORITY => on_stream && length == 5,
        RST_STREAM => on_stream && length == 4,
        SETTINGS => !on_stream && length.is_multiple_of(6),
        PING => !on_stream && length == 8,
        GOAWAY => !on_stream && length >= 8,
        WINDOW_UPDATE => length == 4,
        _ => length <= MAX_UNKNOWN_FRAME_LEN,
    };
    shape && id <= highest.saturating_add(MAX_STREAM_ID_LEAD)
}

/// Sets `conn`'s count of streams awaiting their response and the oldest of them (kept in
/// `conn` while looking, for the verifier, as in [`walk`]).
#[inline(always)]
fn summarize(conn: &mut ConnState, streams: &Streams) {
    conn.h2_open = 0;
    conn.h2_oldest_ns = 0;
    conn.h2_oldest_stream = 0;
    // Only the slots awaiting are looked at, up to the last of them.
    let awaiting = streams.awaiting();
    let mut slot = 0;
    while slot < STREAM_SLOTS && awaiting >> slot != 0 {
        let opened = streams.opened_ns[slot];
        if awaiting & (1 << slot) != 0 && opened != REQUEST_UNFINISHED {
            conn.h2_open += 1;
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
/// in `h2_ended_*` for the `QuietEnded` record that reports it (none was answered).
#[inline(always)]
pub fn end_oldest(conn: &mut ConnState) {
    conn.h2_ended_ns = conn.h2_oldest_ns;
    conn.h2_ended_stream = conn.h2_oldest_stream;
    conn.h2_ended_how = ended::ANSWERED;
    conn.h2_answered_late = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{message::proto, role};
    use std::{vec, vec::Vec};

    const MS: u64 = 1_000_000;
    const THRESHOLD: u64 = 2_000 * MS;

    fn frame(kind: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        flagged(kind, 0, stream, payload_len)
    }

    /// A DATA or HEADERS frame that ends its stream's side.
    fn ending(kind: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        flagged(kind, END_STREAM, stream, payload_len)
    }

    fn flagged(kind: u8, flags: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        let len = payload_len as u32;
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
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
            let mut conn = Self::started(role_id);
            // The server's preface: its SETTINGS.
            let (_, reply) = conn.directions();
            assert_eq!(conn.transfer(reply, 0, &frame(4, 0, 12)), Walk::default());
            conn
        }

        /// Followed from the client's preface on, nothing seen the other way.
        fn started(role_id: u8) -> Self {
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

        /// The request direction, then the reply's.
        fn directions(&self) -> (u8, u8) {
            let ask = transfer::request_direction(&self.state);
            let reply = if ask == direction::IN {
                direction::OUT
            } else {
                direction::IN
            };
            (ask, reply)
        }

        /// A transfer, walked while the streams are followed (as the kernel does).
        fn transfer(&mut self, dir: u8, at_ms: u64, bytes: &[u8]) -> Walk {
            if !tracking(&self.state) {
                return Walk::default();
            }
            walk(
                &mut self.state,
                &mut self.streams,
                dir,
                bytes.len() as u64,
                at_ms * MS,
                THRESHOLD,
                header_from(reader(bytes)),
                bytes8_from(bytes),
            )
        }
    }

    fn reader(bytes: &[u8]) -> impl More + '_ {
        |at: usize| bytes.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]])
    }

    /// A unary call: HEADERS, then a DATA frame that ends the request.
    fn call(stream: u32) -> Vec<u8> {
        let mut bytes = frame(1, stream, 40);
        bytes.extend(ending(0, stream, 12));
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
            let (ask, reply) = conn.directions();
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
    fn a_response_is_owed_from_the_end_of_its_request() {
        for role_id in [role::CLIENT, role::SERVER] {
            let mut conn = Conn::new(role_id);
            let (ask, reply) = conn.directions();
            // A client-streaming call: a message every second for ten seconds.
            conn.transfer(ask, 100, &frame(1, 1, 40));
            for second in 1..10 {
                conn.transfer(ask, second * 1_000, &frame(0, 1, 500));
                assert_eq!(conn.state.h2_open, 0, "{role_id}: the request still comes");
                assert!(!quiet_past_threshold(
                    &conn.state,
                    second * 1_000 + 900,
                    THRESHOLD
                ));
            }
            // A GET (HEADERS that end the request) is owed at once.
            conn.transfer(ask, 9_500, &ending(1, 3, 20));
            assert_eq!((conn.state.h2_open, conn.state.h2_oldest_stream), (1, 3));
            conn.transfer(reply, 9_600, &response(3));
            conn.transfer(ask, 10_000, &ending(0, 1, 500));
            assert_eq!(
                (conn.state.h2_open, conn.state.h2_oldest_ns),
                (1, 10_000 * MS)
            );
            assert!(!quiet_past_threshold(&conn.state, 11_999 * MS, THRESHOLD));
            assert!(quiet_past_threshold(&conn.state, 12_000 * MS, THRESHOLD));
            let walk = conn.transfer(reply, 13_000, &response(1));
            assert!(walk.ended, "{role_id}");
            assert_eq!(
                (conn.state.h2_ended_stream, conn.state.h2_ended_ns),
                (1, 10_000 * MS)
            );
            // A request ended by its trailers.
            conn.transfer(ask, 14_000, &frame(1, 5, 40));
            conn.transfer(ask, 14_100, &frame(0, 5, 40));
            conn.transfer(ask, 15_000, &ending(1, 5, 10));
            assert_eq!(
                (conn.state.h2_open, conn.state.h2_oldest_ns),
                (1, 15_000 * MS)
            );
        }
    }

    #[test]
    fn a_stream_answered_before_its_request_ends_is_owed_nothing() {
        // A bidirectional call whose server answers at once, and a call its client cancels
        // mid-request.
        let mut conn = Conn::new(role::SERVER);
        conn.transfer(direction::IN, 0, &frame(1, 1, 40));
        conn.transfer(direction::IN, 0, &frame(1, 3, 40));
        assert!(!conn.transfer(direction::OUT, 10, &frame(1, 1, 20)).ended);
        assert!(!conn.transfer(direction::IN, 3_000, &frame(3, 3, 4)).ended);
        conn.transfer(direction::IN, 5_000, &ending(0, 1, 8));
        conn.transfer(direction::IN, 5_000, &ending(0, 3, 8));
        assert_eq!(conn.state.h2_open, 0);
        assert!(!conn.transfer(direction::OUT, 9_000, &response(1)).ended);
        // Requests that never end hold their slots until their streams close (the eight
        // slots streams 65, 129 and 193 may take): another such request finds none, and is
        // placed if its request ends; a request that has ended, a response owed, takes the
        // slot of one still sending.
        let mut conn = Conn::new(role::CLIENT);
        for id in (1..=57).step_by(8) {
            conn.transfer(direction::OUT, 1, &frame(1, id, 40));
        }
        let walk = conn.transfer(direction::OUT, 2, &frame(1, 65, 40));
        assert_eq!(
            (walk.untracked, conn.state.h2_open),
            (0, 0),
            "placed if it ends"
        );
        let walk = conn.transfer(direction::OUT, 3, &call(129));
        assert_eq!(
            (walk.untracked, conn.state.h2_open),
            (2, 1),
            "stream 65 given up, stream 1 displaced by a unary call (HEADERS, then DATA)"
        );
        conn.transfer(direction::OUT, 4, &frame(3, 57, 4));
        let walk = conn.transfer(direction::OUT, 5, &call(193));
        assert_eq!((walk.untracked, conn.state.h2_open), (0, 2));
        conn.transfer(direction::OUT, 6, &ending(0, 1, 4));
        assert!(conn.transfer(direction::IN, 3_000, &response(129)).ended);
        assert_eq!(
            (conn.state.h2_open, conn.state.h2_oldest_stream),
            (1, 193),
            "stream 1, displaced, owes nothing"
        );
        // An unplaced stream whose request ends in a later write, a slot free by then.
        conn.transfer(direction::OUT, 3_100, &frame(1, 257, 40));
        let walk = conn.transfer(direction::OUT, 3_200, &frame(1, 321, 40));
        assert_eq!((walk.untracked, conn.state.h2_open), (0, 1));
        conn.transfer(direction::OUT, 3_300, &frame(3, 49, 4));
        let walk = conn.transfer(direction::OUT, 3_400, &ending(0, 321, 4));
        assert_eq!((walk.untracked, conn.state.h2_open), (0, 2));
        assert!(conn.transfer(direction::IN, 6_000, &response(321)).ended);
    }

    #[test]
    fn a_request_ends_with_the_last_byte_of_its_end_stream_frame() {
        for role_id in [role::CLIENT, role::SERVER] {
            let mut conn = Conn::new(role_id);
            let (ask, reply) = conn.directions();
            // A unary call whose one DATA frame of 5 000 bytes comes 500 bytes every 500 ms
            // (a large message on a slow link), answered 200 ms after its last byte.
            let mut request = frame(1, 1, 40);
            request.extend(ending(0, 1, 5_000));
            let mut at = 49 + 9 + 500;
            conn.transfer(ask, 0, &request[..at]);
            let mut ms = 0;
            while at < request.len() {
                assert_eq!(conn.state.h2_open, 0, "{role_id}: uploading at {ms} ms");
                ms += 500;
                conn.transfer(ask, ms, &request[at..at + 500]);
                at += 500;
            }
            assert_eq!(
                (conn.state.h2_open, conn.state.h2_oldest_ns),
                (1, 4_500 * MS)
            );
            assert!(!conn.transfer(reply, 4_700, &response(1)).ended);
            // A frame header alone, its 3 bytes 3 s later.
            let mut request = frame(1, 3, 40);
            request.extend(ending(0, 3, 3));
            conn.transfer(ask, 5_000, &request[..58]);
            assert_eq!(conn.state.h2_open, 0, "{role_id}");
            conn.transfer(ask, 8_000, &request[58..]);
            assert_eq!(
                (conn.state.h2_open, conn.state.h2_oldest_ns),
                (1, 8_000 * MS)
            );
            conn.transfer(reply, 8_100, &response(3));
            // HEADERS that end the request, in two parts.
            let get = ending(1, 5, 30);
            conn.transfer(ask, 9_000, &get[..20]);
            assert_eq!(conn.state.h2_open, 0, "{role_id}");
            conn.transfer(ask, 9_500, &get[20..]);
            assert_eq!(
                (
                    conn.state.h2_open,
                    conn.state.h2_oldest_stream,
                    conn.state.h2_oldest_ns
                ),
                (1, 5, 9_500 * MS)
            );
        }
    }

    #[test]
    fn a_slot_awaits_after_every_open_whichever_direction_closed_it_last() {
        // One slot reused by streams 1, 65, 129…, closed by one direction or the other in
        // every order: each open awaits, each close ends it, no other slot moves.
        let mut streams = Streams::EMPTY;
        for (i, sides) in (0..64u32).map(|i| (i, [(i >> 1) & 1, i & 1])) {
            let id = 1 + 64 * i;
            assert_eq!(streams.open(id, u64::from(i)), Opened::Free);
            assert_eq!(streams.awaiting(), 1, "stream {id} awaits in slot 0");
            assert_eq!(streams.close(sides[0] as usize, id), Some(u64::from(i)));
            assert_eq!(streams.awaiting(), 0);
            assert_eq!(streams.close(sides[1] as usize, id), None, "closed once");
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
        assert_eq!(
            (conn.state.h2_ended_stream, conn.state.h2_ended_how),
            (1, ended::RESET_BY_CLIENT)
        );
        assert!(conn.transfer(direction::IN, 2_600, &frame(3, 3, 4)).ended);
        assert_eq!(
            (conn.state.h2_ended_stream, conn.state.h2_ended_how),
            (3, ended::RESET_BY_SERVER)
        );
        assert_eq!(conn.state.h2_open, 0);
        conn.transfer(direction::OUT, 2_700, &call(5));
        assert!(conn.transfer(direction::IN, 5_000, &response(5)).ended);
        assert_eq!(
            (conn.state.h2_ended_stream, conn.state.h2_ended_how),
            (5, ended::ANSWERED)
        );
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
        // Streams 9 to 65 take slots 4, 8… 28 and 0, the eight stream 129 may take.
        for (i, id) in (9..=65).step_by(8).enumerate() {
            conn.transfer(direction::OUT, 3_100 + i as u64, &call(id));
        }
        assert_eq!(conn.state.h2_open, 8);
        let walk = conn.transfer(direction::OUT, 3_200, &call(129));
        assert_eq!((walk.untracked, conn.state.h2_open), (1, 8), "not followed");
        // Stream 131's slot (1) is free.
        let walk = conn.transfer(direction::OUT, 3_300, &call(131));
        assert_eq!((walk.untracked, conn.state.h2_open), (0, 9));
        assert_eq!(conn.state.h2_oldest_stream, 9);
        // Stream 193 maps to slot 0 too: answered there or elsewhere, by its id.
        conn.transfer(direction::IN, 3_400, &response(65));
        conn.transfer(direction::OUT, 3_500, &call(193));
        assert!(conn.transfer(direction::IN, 6_000, &response(193)).ended);
        assert_eq!((conn.state.h2_ended_stream, conn.state.h2_open), (193, 8));
    }

    #[test]
    fn calls_that_flow_past_slow_ones_stay_followed() {
        // A gRPC channel: calls 1 and 3 are slow; 1 000 calls after them, `in_flight` at a
        // time, are answered in order. Every 32nd maps to a slow call's slot and takes
        // another, which no call in flight needs.
        for in_flight in [1, 2, 8, 16, 24, 28] {
            let mut conn = Conn::new(role::SERVER);
            conn.transfer(direction::IN, 1, &call(1));
            conn.transfer(direction::IN, 2, &call(3));
            let mut flowing = std::collections::VecDeque::new();
            for (i, id) in (5..2_005).step_by(2).enumerate() {
                let at = 10 + i as u64 / 1_000;
                if flowing.len() == in_flight {
                    let answered = flowing.pop_front().unwrap();
                    assert!(!conn.transfer(direction::OUT, at, &response(answered)).ended);
                }
                let walk = conn.transfer(direction::IN, at, &call(id));
                assert_eq!(walk.untracked, 0, "{in_flight} in flight: stream {id}");
                flowing.push_back(id);
                assert_eq!(conn.state.h2_open as usize, 2 + flowing.len());
                assert_eq!(conn.state.h2_oldest_stream, 1);
            }
            assert!(conn.transfer(direction::OUT, 3_000, &response(1)).ended);
            assert_eq!(conn.state.h2_ended_stream, 1);
        }
    }

    #[test]
    fn frames_no_peer_sends_lose_the_framing() {
        let lost = |bytes: &[u8]| {
            let mut conn = Conn::new(role::SERVER);
            conn.transfer(direction::IN, 0, &call(1));
            conn.transfer(direction::OUT, 10, bytes);
            conn.state.h2_sync == sync::LOST
        };
        for valid in [
            frame(8, 0, 4),
            frame(8, 1, 4),
            frame(4, 0, 0),
            frame(4, 0, 18),
            frame(6, 0, 8),
            frame(7, 0, 8),
            frame(7, 0, 30),
            frame(3, 1, 4),
            frame(2, 1, 5),
            frame(5, 1, 40),
            frame(9, 1, 40),
            frame(0, 1, 40_000),
            frame(0x10, 0, 12),
            // A server's pushed stream, and a reply racing its request's walk.
            frame(1, 2, 10),
            frame(1, 101, 10),
        ] {
            assert!(!lost(&valid), "{valid:02x?}");
        }
        for invalid in [
            frame(0, 0, 40),
            frame(1, 0, 40),
            frame(9, 0, 4),
            frame(8, 0, 5),
            frame(4, 1, 0),
            frame(4, 0, 7),
            frame(6, 0, 9),
            frame(6, 1, 8),
            frame(7, 0, 4),
            frame(3, 1, 5),
            frame(3, 0, 4),
            frame(2, 1, 4),
            frame(0x0a, 0, 16_385),
            frame(0, 1 + MAX_STREAM_ID_LEAD + 2, 40),
        ] {
            assert!(lost(&invalid), "{invalid:02x?}");
        }
    }

    /// A walk that starts inside a frame (the first read of the replies missed: the daemon
    /// attached its receive program a moment after its send program, while the connection
    /// opened) takes payload bytes for headers. It must lose the framing rather than follow
    /// them and never see an answer: its calls' slots would stay held, a stall flagged.
    #[test]
    fn a_walk_out_of_step_loses_the_framing_instead_of_holding_streams() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const CALLS: u32 = 40;
        for missed in 0..200 {
            // Replies whose payloads look like protobuf and HPACK: many small bytes, which
            // read as frame types and lengths that exist.
            let mut replies = frame(4, 0, 12);
            for i in 0..CALLS {
                let id = 1 + 2 * i;
                for (kind, flags, len) in [(1, 4, 12), (0, 0, 30), (1, 5, 16)] {
                    let start = replies.len();
                    replies.extend(flagged(kind, flags, id, len));
                    for byte in &mut replies[start + 9..] {
                        let r = random();
                        *byte = if r % 3 == 0 {
                            r as u8
                        } else {
                            (r >> 8) as u8 % 10
                        };
                    }
                }
            }
            let mut conn = Conn::started(role::CLIENT);
            let mut replies = &replies[missed..];
            for i in 0..CALLS {
                conn.transfer(direction::OUT, u64::from(i), &call(1 + 2 * i));
                let take = replies.len().min(random() as usize % 90 + 1);
                conn.transfer(direction::IN, u64::from(i), &replies[..take]);
                replies = &replies[take..];
            }
            while !replies.is_empty() {
                let take = replies.len().min(random() as usize % 90 + 1);
                conn.transfer(direction::IN, 100, &replies[..take]);
                replies = &replies[take..];
            }
            let expected = if missed == 0 {
                sync::TRACKING
            } else {
                sync::LOST
            };
            assert_eq!(
                (conn.state.h2_sync, conn.state.h2_open),
                (expected, 0),
                "{missed} bytes missed"
            );
        }
    }

    #[test]
    fn frames_of_unknown_types_are_skipped() {
        // RFC 9113 §5.5: ignored by peers that do not know them (a "grease" type, 0xfa).
        let mut conn = Conn::new(role::SERVER);
        conn.transfer(direction::IN, 0, &call(1));
        let walk = conn.transfer(direction::IN, 10, &frame(0xfa, 0, 8));
        assert_eq!((walk.untracked, conn.state.h2_sync), (0, sync::TRACKING));
        assert!(conn.transfer(direction::OUT, 3_000, &response(1)).ended);
        // One longer than any extension's is no frame.
        let walk = conn.transfer(direction::IN, 3_100, &frame(0xfa, 0, 16_385));
        assert_eq!((walk.lost, conn.state.h2_sync), (true, sync::LOST));
    }

    #[test]
    fn lost_framing_falls_back_to_the_direction_rule() {
        // Bytes that are no frames.
        let mut conn = Conn::new(role::SERVER);
        let walk = conn.transfer(direction::IN, 1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((walk.lost, walk.untracked), (true, 0));
        assert_eq!((conn.state.h2_sync, conn.state.h2_open), (sync::LOST, 0));
        assert!(!quiet_past_threshold(&conn.state, u64::MAX, THRESHOLD));
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
            |_, _: &mut [u8; 8]| false,
        );
        assert_eq!((result.lost, conn.state.h2_sync), (true, sync::LOST));
        // The start of a header that cannot be read.
        let mut conn = Conn::new(role::SERVER);
        let bytes = call(1);
        super::walk(
            &mut conn.state,
            &mut conn.streams,
            direction::IN,
            5,
            1,
            THRESHOLD,
            header_from(reader(&bytes)),
            |_, _: &mut [u8; 8]| false,
        );
        assert_eq!(conn.state.h2_sync, sync::LOST);
    }

    /// Feeds `bytes` to `conn` in direction `dir` as transfers cut at `cuts`.
    fn transfers(conn: &mut Conn, dir: u8, at_ms: u64, bytes: &[u8], cuts: &[usize]) -> bool {
        let mut ended = false;
        let mut from = 0;
        for &to in cuts.iter().chain([bytes.len()].iter()) {
            let to = to.min(bytes.len());
            if to > from {
                ended |= conn.transfer(dir, at_ms, &bytes[from..to]).ended;
                from = to;
            }
        }
        ended
    }

    #[test]
    fn frame_headers_split_anywhere_between_reads_are_joined() {
        // Two calls, then their answers (the first late), as a reader with a fixed buffer
        // gets them: cut once, twice, or a byte at a time, headers included.
        let calls: Vec<u8> = [call(1), call(3)].concat();
        let answers: Vec<u8> = [response(3), response(1)].concat();
        let mut cut_sets: Vec<Vec<usize>> = (1..calls.len().max(answers.len()))
            .flat_map(|a| [vec![a], vec![a, a + 1], vec![a, a + 4], vec![a, a + 7]])
            .collect();
        cut_sets.push((1..answers.len()).collect());
        for cuts in &cut_sets {
            let mut conn = Conn::new(role::SERVER);
            assert!(!transfers(&mut conn, direction::IN, 1, &calls, cuts));
            assert_eq!(
                (
                    conn.state.h2_sync,
                    conn.state.h2_open,
                    conn.state.h2_oldest_stream
                ),
                (sync::TRACKING, 2, 1),
                "calls cut at {cuts:?}"
            );
            // Stream 3's answer in time, stream 1's late: each part of the answers carries the
            // time of the answer it ends in.
            let early = response(3).len();
            let (soon, late): (Vec<usize>, Vec<usize>) = cuts.iter().partition(|&&c| c < early);
            assert!(!transfers(
                &mut conn,
                direction::OUT,
                100,
                &answers[..early],
                &soon
            ));
            assert_eq!(conn.state.h2_open, 1, "answers cut at {cuts:?}");
            let rest: Vec<usize> = late.iter().map(|c| c - early).collect();
            let late = transfers(&mut conn, direction::OUT, 2_500, &answers[early..], &rest);
            assert!(
                late,
                "answers cut at {cuts:?}: the late stream's stall ends"
            );
            assert_eq!(
                (
                    conn.state.h2_sync,
                    conn.state.h2_open,
                    conn.state.h2_ended_stream
                ),
                (sync::TRACKING, 0, 1),
                "answers cut at {cuts:?}"
            );
        }
    }

    #[test]
    fn grpcio_calls_packed_into_slices_stay_followed() {
        // A grpcio client's write of four unary calls (strace of python3-grpcio, 6+ calls in
        // flight): HEADERS, WINDOW_UPDATE and DATA per call, then the connection's
        // WINDOW_UPDATE, packed into 23-byte slices that `sendmsg` passes as `iovec` entries
        // (the kernel finds each header in its entry: capture.rs). Each call's WINDOW_UPDATE
        // header is split between two entries, the fourth's between entries 9 and 10. As one
        // transfer, and as transfers cut where the entries end.
        const SLICES: [&str; 12] = [
            "0000080104000000dfc3c28386c1c0bfbe000004080000",
            "0000df0000000500000b0001000000df0000000006303a",
            "3130303a",
            "0000080104000000e1c3c28386c1c0bfbe000004080000",
            "0000e10000000500000b0001000000e10000000006303a",
            "3130303a",
            "0000080104000000e3c3c28386c1c0bfbe000004080000",
            "0000e30000000500000b0001000000e30000000006303a",
            "3130303a",
            "0000080104000000e5c3c28386c1c0bfbe000004080000",
            "0000e50000000500000b0001000000e50000000006303a",
            "3130303a000004080000000000000000dc",
        ];
        let slices: Vec<Vec<u8>> = SLICES
            .iter()
            .map(|hex| {
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect()
            })
            .collect();
        let bytes = slices.concat();
        let cuts: Vec<usize> = slices
            .iter()
            .scan(0, |end, slice| {
                *end += slice.len();
                Some(*end)
            })
            .collect();
        for cuts in [&[][..], &cuts[..]] {
            let mut conn = Conn::new(role::CLIENT);
            assert!(!transfers(&mut conn, direction::OUT, 1, &bytes, cuts));
            assert_eq!(
                (
                    conn.state.h2_sync,
                    conn.state.h2_open,
                    conn.state.h2_oldest_stream
                ),
                (sync::TRACKING, 4, 223),
                "cut at {cuts:?}"
            );
            let answers: Vec<u8> = [223, 225, 227, 229]
                .into_iter()
                .flat_map(response)
                .collect();
            assert!(!conn.transfer(direction::IN, 5, &answers).ended);
            assert_eq!(
                (conn.state.h2_sync, conn.state.h2_open),
                (sync::TRACKING, 0)
            );
        }
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
