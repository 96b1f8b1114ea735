//! HTTP/1.x responses owed in part: the framing of each connection's latest response, parsed
//! once from the head the kernel copied (`stalltrace_common::http1`), turns an idle-looking
//! connection into [`Activity::ResponseIncomplete`] while the bytes it promised have not all
//! moved.
use stalltrace_common::{
    conn_flags, direction, http1::ReplyHead, message::proto, transfer, ConnState,
};

use super::activity::{self, Activity};
use crate::protocols::http1::{chunked_complete, framing, response_ends, Framing};

/// The framing of a connection's latest response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyFraming {
    /// When the response started (`ReplyHead::reply_ns`): which response this is.
    pub reply_ns: u64,
    /// Bytes the connection had moved in the reply direction before it.
    pub offset: u64,
    pub framing: Framing,
    /// Where the response ends (bytes from its start), when the copy holds all of it: a
    /// chunked response then followed by another (pipelining) is not judged by the other's
    /// last bytes.
    pub end: Option<u64>,
    /// Start of the quiet in the response found by the last sweep, while it was incomplete.
    pub incomplete_since: Option<u64>,
}

/// What an incomplete response still owes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed {
    /// This many bytes of a `Content-Length` body (or of the header block).
    Bytes(u64),
    /// A chunked body's last chunk.
    LastChunk,
}

impl ReplyFraming {
    /// Parses a head the kernel copied.
    pub fn from_head(head: &ReplyHead) -> Self {
        Self {
            reply_ns: head.reply_ns,
            offset: head.offset,
            framing: framing(head.request(), head.data()),
            end: response_ends(head.data(), &[head.request()])
                .first()
                .copied(),
            incomplete_since: None,
        }
    }

    /// What the response still owes as of `state`, if its framing says (`None`: complete,
    /// or not known).
    pub fn owed(&self, state: &ConnState) -> Option<Owed> {
        match self.framing {
            Framing::Length { bytes } => {
                let moved = activity::reply_bytes(state).saturating_sub(self.offset);
                (moved < bytes).then(|| Owed::Bytes(bytes - moved))
            }
            Framing::Chunked { head } => {
                let moved = activity::reply_bytes(state).saturating_sub(self.offset);
                let ended = self.end.is_some_and(|end| moved >= end);
                (!ended && chunked_complete(head, moved, state.reply_tail) == Some(false))
                    .then_some(Owed::LastChunk)
            }
            Framing::Stream(_) | Framing::Unknown(_) => None,
        }
    }
}

/// The connection's latest response needs its head read: an HTTP/1.x response started (the
/// reply direction moved last) and it is not the one `known` describes.
pub fn needs_head(state: &ConnState, known: Option<&ReplyFraming>) -> bool {
    state.proto == proto::HTTP1
        && state.flags & conn_flags::STREAM == 0
        && state.last_dir != direction::NONE
        && state.last_dir != transfer::request_direction(state)
        && known.is_none_or(|known| known.reply_ns != state.dir_since_ns)
}

/// The latest response's framing, if `known` describes it.
pub fn current<'a>(state: &ConnState, known: Option<&'a ReplyFraming>) -> Option<&'a ReplyFraming> {
    known.filter(|known| current_reply(state, known.reply_ns))
}

/// The connection's latest response on HTTP/1.x is the one that started at `reply_ns`.
pub fn current_reply(state: &ConnState, reply_ns: u64) -> bool {
    reply_ns == state.dir_since_ns && state.proto == proto::HTTP1
}

/// A connection's activity, its latest response's framing considered.
pub fn assess(state: &ConnState, known: Option<&ReplyFraming>) -> Activity {
    let activity = activity::assess(state);
    if activity != Activity::Idle || state.last_dir == transfer::request_direction(state) {
        return activity;
    }
    match current(state, known).and_then(|reply| reply.owed(state)) {
        Some(_) => Activity::ResponseIncomplete {
            quiet_since: activity::last_reply_ns(state),
        },
        None => activity,
    }
}

/// A head as the kernel copies it: `response`'s first bytes and `request`'s, for a response
/// that started at `reply_ns` after `offset` bytes in the reply direction.
#[cfg(test)]
pub(super) fn test_head(request: &[u8], response: &[u8], reply_ns: u64, offset: u64) -> ReplyHead {
    use stalltrace_common::{http1::REPLY_HEAD_MAX, CAPTURE_MAX};
    let mut head = ReplyHead {
        reply_ns,
        offset,
        len: response.len() as u32,
        request_len: request.len() as u32,
        request: [0; CAPTURE_MAX],
        bytes: [0; REPLY_HEAD_MAX],
    };
    head.request[..request.len()].copy_from_slice(request);
    head.bytes[..response.len()].copy_from_slice(response);
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use stalltrace_common::{role, tcp_state};

    fn client(bytes_recv: u64) -> ConnState {
        ConnState {
            role: role::CLIENT,
            proto: proto::HTTP1,
            tcp_state: tcp_state::ESTABLISHED,
            last_dir: direction::IN,
            dir_since_ns: 1_000,
            last_recv_ns: 1_500,
            bytes_recv,
            ..Default::default()
        }
    }

    #[test]
    fn a_response_short_of_its_content_length_is_incomplete_until_it_all_moved() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n";
        let reply = ReplyFraming::from_head(&test_head(b"GET / HTTP/1.1", response, 1_000, 50));
        let header_block = response.len() as u64;
        let partial = client(50 + header_block + 100);
        assert!(needs_head(&partial, None));
        assert!(!needs_head(&partial, Some(&reply)));
        assert_eq!(reply.owed(&partial), Some(Owed::Bytes(9_900)));
        assert_eq!(
            assess(&partial, Some(&reply)),
            Activity::ResponseIncomplete { quiet_since: 1_500 }
        );
        let done = client(50 + header_block + 10_000);
        assert_eq!(assess(&done, Some(&reply)), Activity::Idle);
        let mut next = partial;
        next.dir_since_ns = 2_000;
        assert_eq!(
            assess(&next, Some(&reply)),
            Activity::Idle,
            "another response: this framing does not describe it"
        );
        assert!(needs_head(&next, Some(&reply)));
        let mut asking = partial;
        asking.last_dir = direction::OUT;
        asking.last_send_ns = 3_000;
        assert_eq!(
            assess(&asking, Some(&reply)),
            Activity::Outstanding { quiet_since: 3_000 }
        );
    }

    #[test]
    fn a_chunked_response_is_owed_its_last_chunk() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n";
        let reply = ReplyFraming::from_head(&test_head(b"GET / HTTP/1.1", response, 1_000, 0));
        let mut state = client(500);
        state.reply_tail = *b"aaaaaaaa";
        assert_eq!(reply.owed(&state), Some(Owed::LastChunk));
        state.reply_tail = *b"a\r\n0\r\n\r\n";
        assert_eq!(reply.owed(&state), None);
        state.reply_tail = stalltrace_common::http1::TAIL_UNKNOWN;
        assert_eq!(reply.owed(&state), None, "not known: not judged");
        // The header block sent, then nothing: its blank line is no last chunk.
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let reply = ReplyFraming::from_head(&test_head(b"GET / HTTP/1.1", head, 1_000, 0));
        let mut state = client(head.len() as u64);
        state.reply_tail.copy_from_slice(&head[head.len() - 8..]);
        assert_eq!(reply.owed(&state), Some(Owed::LastChunk));
        state.bytes_recv += 5;
        state.reply_tail = *b"\n\r\n0\r\n\r\n";
        assert_eq!(reply.owed(&state), None, "then the last chunk alone");
        // A whole chunked response, then the next one (pipelined) in the same run: the run's
        // last bytes are the next one's.
        let both = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                     HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast";
        let reply = ReplyFraming::from_head(&test_head(b"GET / HTTP/1.1", both, 1_000, 0));
        let mut state = client(both.len() as u64);
        state.reply_tail.copy_from_slice(&both[both.len() - 8..]);
        assert_eq!(reply.owed(&state), None);
    }

    #[test]
    fn other_protocols_and_streams_are_never_owed_anything() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n";
        let reply =
            ReplyFraming::from_head(&test_head(b"GET /events HTTP/1.1", response, 1_000, 0));
        assert_eq!(assess(&client(400), Some(&reply)), Activity::Idle);
        let mut redis = client(400);
        redis.proto = proto::REDIS;
        assert!(!needs_head(&redis, None));
    }
}
