//! HTTP/1.x response framing (RFC 9112 §6): what the kernel keeps of each response so that the
//! daemon can tell a response that stopped half-way (`response_incomplete`) from a complete
//! one on an idle keep-alive connection — which the direction rule alone cannot: both end
//! with a transfer in the reply direction.
//!
//! The kernel does no parsing (a header block is up to a few KiB of text: too costly and too
//! verifier-hungry on the hot path). When a response starts on an HTTP/1.x connection it
//! copies the first [`REPLY_HEAD_MAX`] bytes, with the request's captured bytes and where the
//! response starts in the reply direction's byte count, into a per-connection [`ReplyHead`]
//! slot; on every transfer of the response it keeps the last 8 bytes in
//! [`ConnState::reply_tail`] (a chunked body ends with `0\r\n\r\n`). The daemon reads the
//! slot when it first sees the response, parses the header block
//! (`stalltrace_core::protocols::http1`) and compares the byte count with the framing.
use crate::{conn_flags, message::proto, transfer, ConnState, CAPTURE_MAX};

/// Bytes of a response's start copied into its [`ReplyHead`]: the status line and header
/// block must fit for the framing to be known (else it is not judged).
pub const REPLY_HEAD_MAX: usize = 1024;

/// The start of the latest response on an HTTP/1.x connection, kept by the kernel in the
/// `HTTP1_REPLY_HEADS` map (keyed by `struct sock` address, least recently used evicted) and
/// read by the daemon's sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHead {
    /// When the response started (`CLOCK_MONOTONIC` ns): the connection's
    /// [`ConnState::dir_since_ns`] while it is the latest.
    pub reply_ns: u64,
    /// Bytes the connection had moved in the reply direction before the response
    /// ([`ConnState::bytes_sent`] for a server, `bytes_recv` for a client).
    pub offset: u64,
    /// Valid bytes in `bytes` and in `request`.
    pub len: u32,
    pub request_len: u32,
    /// The first bytes of the request it answers (its method tells whether a body follows:
    /// none after `HEAD`), when the request's capture slot still held them.
    pub request: [u8; CAPTURE_MAX],
    /// The first bytes of the response.
    pub bytes: [u8; REPLY_HEAD_MAX],
}

impl ReplyHead {
    pub fn data(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(REPLY_HEAD_MAX)]
    }

    pub fn request(&self) -> &[u8] {
        &self.request[..(self.request_len as usize).min(CAPTURE_MAX)]
    }
}

/// Bytes of a request-direction run copied after its first transfer's: the run's first
/// transfer is copied up to `2 * REQUEST_RUN_ROOM` bytes (a header block with cookies is
/// often more than 512), each next one appends up to this many while fewer are held, so a
/// run's copy holds at least this many bytes (when the run moved them) and never more than
/// twice as many.
pub const REQUEST_RUN_ROOM: usize = 512;

/// The start of the latest request-direction run on an HTTP/1.x connection (case 3b of issue
/// 7, pipelining): the requests a client wrote before reading, or a server read before
/// answering. Kept by the kernel in the `HTTP1_REQUEST_RUNS` array (slot chosen by hashing the
/// sock address, [`crate::capture_slot`]: an array lookup costs less than a hash map's on this
/// path, run at every request start; a collision overwrites, and `sock` tells): written at the
/// run's first transfer, appended to by the next ones while it has room
/// ([`verdict_flags::REQUEST_RUN_OPEN`]); read by the daemon's sweep with the [`ReplyHead`] of
/// the response that follows, to count the requests the run held and name the one owed.
///
/// [`verdict_flags::REQUEST_RUN_OPEN`]: crate::verdict_flags::REQUEST_RUN_OPEN
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRun {
    /// Whose run it is: the `struct sock` address.
    pub sock: u64,
    /// [`ConnState::requests`] once the run started: which run this is.
    pub requests: u64,
    /// Bytes the connection had moved in the request direction before the run
    /// ([`ConnState::bytes_recv`] for a server, `bytes_sent` for a client).
    pub offset: u64,
    /// Valid bytes in `bytes`: the run's first bytes, without a gap (a transfer copied only in
    /// part ends the copy).
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; 2 * REQUEST_RUN_ROOM],
}

impl RequestRun {
    pub fn data(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(2 * REQUEST_RUN_ROOM)]
    }
}

/// What a transfer does to its connection's [`RequestRun`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunCopy {
    /// Nothing: another protocol, the reply direction, a stream, or a run whose copy is full.
    Skip,
    /// A request-direction run starts: a new copy.
    Starts,
    /// More bytes of the run, while its copy has room.
    Appends,
}

/// What the transfer in direction `dir` that [`transfer::record_transfer`] just recorded as
/// `turn` does to the run's copy. Call after it.
#[inline(always)]
pub fn run_copy(conn: &ConnState, dir: u8, turn: transfer::Turn) -> RunCopy {
    if conn.proto != proto::HTTP1
        || conn.flags & conn_flags::STREAM != 0
        || dir != transfer::request_direction(conn)
    {
        RunCopy::Skip
    } else if turn == transfer::Turn::RequestStarted {
        RunCopy::Starts
    } else if turn == transfer::Turn::Continued
        && conn.verdict_flags & crate::verdict_flags::REQUEST_RUN_OPEN != 0
    {
        RunCopy::Appends
    } else {
        RunCopy::Skip
    }
}

/// What a transfer in direction `dir` is to an HTTP/1.x response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not a response's bytes (another protocol, the request direction, a stream).
    Skip,
    /// A response starts: the request was outstanding.
    Starts,
    /// More bytes of the current response.
    Continues,
}

/// Call before [`transfer::record_transfer`].
#[inline(always)]
pub fn reply(conn: &ConnState, dir: u8) -> Reply {
    if conn.proto != proto::HTTP1
        || conn.flags & conn_flags::STREAM != 0
        || dir == transfer::request_direction(conn)
    {
        Reply::Skip
    } else if transfer::is_outstanding(conn) {
        Reply::Starts
    } else if conn.last_dir == dir {
        Reply::Continues
    } else {
        Reply::Skip
    }
}

/// A response's bytes moved again after at least `stall_after_ns` of quiet at `now`: a
/// `response_incomplete` stall (reported or not yet swept) may have just ended. Call before
/// [`transfer::record_transfer`].
#[inline(always)]
pub fn resumes_after_quiet(conn: &ConnState, reply: Reply, now: u64, stall_after_ns: u64) -> bool {
    let last = if transfer::request_direction(conn) == crate::direction::IN {
        conn.last_send_ns
    } else {
        conn.last_recv_ns
    };
    reply == Reply::Continues && now.saturating_sub(last) >= stall_after_ns
}

/// [`ConnState::reply_tail`] when the last bytes could not be read.
pub const TAIL_UNKNOWN: [u8; 8] = [0xff; 8];

/// The reply tail after a transfer of `bytes` bytes, given `read(offset)`, the 8 bytes of the
/// transfer's buffer at `offset`: its last 8 bytes, or for a shorter transfer the previous
/// tail's last bytes followed by the transfer's (a response's first transfer starts from
/// zeros). One read per transfer: this runs on every transfer of a response.
#[inline(always)]
pub fn tail_after(
    previous: [u8; 8],
    starts: bool,
    bytes: u64,
    read: impl FnOnce(u64) -> Option<[u8; 8]>,
) -> [u8; 8] {
    let Some(last) = read(bytes.saturating_sub(8)) else {
        return TAIL_UNKNOWN;
    };
    if bytes >= 8 {
        return last;
    }
    // Fewer than 8 bytes: the read went past them (user memory, not ours); keep the first
    // `bytes`, after what came before.
    let n = bytes as u32;
    let data = u64::from_be_bytes(last) >> (8 * (8 - n));
    let before = if starts || previous == TAIL_UNKNOWN || n == 0 {
        0
    } else {
        u64::from_be_bytes(previous) << (8 * n)
    };
    (before | data).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{direction, role};

    /// Reads 8 bytes at an offset of `data`, and past its end (user memory goes on).
    fn reader(data: &[u8]) -> impl FnOnce(u64) -> Option<[u8; 8]> + '_ {
        |at| {
            let mut word = *b"GARBAGE!";
            for (i, b) in data.iter().skip(at as usize).take(8).enumerate() {
                word[i] = *b;
            }
            Some(word)
        }
    }

    #[test]
    fn the_tail_is_the_last_eight_bytes() {
        let data = b"5\r\nhello\r\n0\r\n\r\n";
        let tail = tail_after([0; 8], true, data.len() as u64, reader(data));
        assert_eq!(&tail, b"o\r\n0\r\n\r\n");
    }

    #[test]
    fn a_short_transfer_shifts_in_after_the_previous_tail() {
        let tail = tail_after(*b"hello\r\n!", false, 7, reader(b"\r\n0\r\n\r\n"));
        assert_eq!(&tail, b"!\r\n0\r\n\r\n");
        let tail = tail_after(*b"abcdefgh", false, 5, reader(b"0\r\n\r\n"));
        assert_eq!(&tail, b"fgh0\r\n\r\n");
        let tail = tail_after(*b"abcdefgh", true, 5, reader(b"0\r\n\r\n"));
        assert_eq!(
            &tail, b"\0\0\x000\r\n\r\n",
            "a new response starts from zeros"
        );
        let tail = tail_after(*b"abcdefgh", false, 2, reader(b"\r\n"));
        assert_eq!(&tail, b"cdefgh\r\n");
        assert_eq!(tail_after([0; 8], false, 20, |_| None), TAIL_UNKNOWN);
        let tail = tail_after(TAIL_UNKNOWN, false, 4, reader(b"\r\n\r\n"));
        assert_eq!(&tail, b"\0\0\0\0\r\n\r\n", "an unknown tail is not kept");
    }

    #[test]
    fn request_runs_are_copied_from_their_start_while_there_is_room() {
        use crate::transfer::Turn;
        let mut server = ConnState {
            role: role::SERVER,
            proto: proto::HTTP1,
            ..Default::default()
        };
        let (inbound, outbound) = (direction::IN, direction::OUT);
        assert_eq!(
            run_copy(&server, inbound, Turn::RequestStarted),
            RunCopy::Starts
        );
        assert_eq!(run_copy(&server, inbound, Turn::Continued), RunCopy::Skip);
        server.verdict_flags |= crate::verdict_flags::REQUEST_RUN_OPEN;
        assert_eq!(
            run_copy(&server, inbound, Turn::Continued),
            RunCopy::Appends
        );
        assert_eq!(run_copy(&server, outbound, Turn::Continued), RunCopy::Skip);
        assert_eq!(run_copy(&server, inbound, Turn::Control), RunCopy::Skip);
        server.flags |= conn_flags::STREAM;
        assert_eq!(
            run_copy(&server, inbound, Turn::RequestStarted),
            RunCopy::Skip
        );
        let redis = ConnState {
            role: role::CLIENT,
            proto: proto::REDIS,
            ..Default::default()
        };
        assert_eq!(
            run_copy(&redis, outbound, Turn::RequestStarted),
            RunCopy::Skip
        );
    }

    #[test]
    fn responses_start_after_the_request_and_continue_in_the_reply_direction() {
        let mut server = ConnState {
            role: role::SERVER,
            proto: proto::HTTP1,
            last_dir: direction::IN,
            last_send_ns: 100,
            ..Default::default()
        };
        assert_eq!(reply(&server, direction::IN), Reply::Skip);
        assert_eq!(reply(&server, direction::OUT), Reply::Starts);
        server.last_dir = direction::OUT;
        assert_eq!(reply(&server, direction::OUT), Reply::Continues);
        assert!(!resumes_after_quiet(&server, Reply::Continues, 150, 100));
        assert!(resumes_after_quiet(&server, Reply::Continues, 200, 100));
        server.flags |= conn_flags::STREAM;
        assert_eq!(reply(&server, direction::OUT), Reply::Skip);
        let client = ConnState {
            role: role::CLIENT,
            proto: proto::HTTP1,
            last_dir: direction::OUT,
            ..Default::default()
        };
        assert_eq!(reply(&client, direction::IN), Reply::Starts);
        let other = ConnState {
            proto: proto::REDIS,
            ..client
        };
        assert_eq!(reply(&other, direction::IN), Reply::Skip);
    }
}
