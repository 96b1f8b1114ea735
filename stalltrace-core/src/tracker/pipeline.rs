//! HTTP/1.x pipelining (case 3b of issue 7): several requests written before the first
//! response is read, each owed its own response. The direction rule alone sees the first
//! response end the exchange; here the requests of the run before it (its copy,
//! `stalltrace_common::http1::RequestRun`) are counted and the responses after it are
//! framed (its `ReplyHead`), so that a later request still owed its response, once the
//! earlier ones completed, is [`Activity::Outstanding`] again.
//!
//! Judged only when both counts are certain: every response that moved ends where a
//! response's framing says, and the requests counted were copied whole. Otherwise the
//! connection is judged as without pipelining (never a stall guessed from a partial count).
use stalltrace_common::{
    http1::{ReplyHead, RequestRun},
    transfer, ConnState, CAPTURE_MAX,
};

use super::{
    activity::{self, Activity},
    framing::{self, ReplyFraming},
};
use crate::protocols::http1::{requests, response_ends};

/// The requests of a connection's latest request-direction run that held more than one, and
/// where the responses that followed end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pipeline {
    /// When the responses started (`ReplyHead::reply_ns`): which reply-direction run this is.
    pub reply_ns: u64,
    /// Bytes the connection had moved in the reply direction before them.
    pub reply_offset: u64,
    /// The first bytes (at most `CAPTURE_MAX`) of each request, in order (2 or more).
    pub requests: Vec<Box<[u8]>>,
    /// Where each response known ends, in bytes from the first one's start, in order.
    pub ends: Vec<u64>,
    /// The request owed while it was at the last sweep: its index and since when (ns).
    pub owed: Option<(usize, u64)>,
}

/// What the kernel's copy of a request-direction run says of its requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count {
    /// The run held two requests or more: they and the responses after them.
    pub pipeline: Option<Pipeline>,
    /// Every request of the run was counted; else more may have been pipelined behind those
    /// counted (a header block past the copy, a chunked body whose end is not in it, bytes
    /// that are not requests, or the copy gone) and are judged by the direction rule alone.
    pub all: bool,
}

impl Pipeline {
    /// Counts the requests of the run before the connection's latest response (which
    /// started at `head.reply_ns`) from the kernel's copies of the run (if its slot still
    /// held it) and of the responses' start, for the connection in `state`.
    pub fn count(head: &ReplyHead, run: Option<&RequestRun>, state: &ConnState) -> Count {
        let uncounted = Count {
            pipeline: None,
            all: false,
        };
        let Some(run) = run.filter(|run| run.requests == state.requests) else {
            return uncounted;
        };
        // The request direction has not moved since the responses started.
        let Some(run_len) = request_bytes(state).checked_sub(run.offset) else {
            return uncounted;
        };
        let Some(found) = requests(run.data(), run_len) else {
            return uncounted;
        };
        Count {
            pipeline: Self::from_requests(head, run, &found.starts),
            all: found.exact,
        }
    }

    /// The pipeline of the requests that start at `starts` in `run`, if there are several.
    fn from_requests(head: &ReplyHead, run: &RequestRun, starts: &[usize]) -> Option<Self> {
        if starts.len() < 2 {
            return None;
        }
        let requests: Vec<Box<[u8]>> = starts
            .iter()
            .map(|&at| {
                let bytes = &run.data()[at..];
                bytes[..bytes.len().min(CAPTURE_MAX)].into()
            })
            .collect();
        let heads: Vec<&[u8]> = requests.iter().map(|r| &r[..]).collect();
        let ends = response_ends(head.data(), &heads);
        Some(Self {
            reply_ns: head.reply_ns,
            reply_offset: head.offset,
            requests,
            ends,
            owed: None,
        })
    }

    /// The request owed a response as of `state`, by index: the responses moved end exactly
    /// where the last of them does, and the run held more requests.
    pub fn owed(&self, state: &ConnState) -> Option<usize> {
        let moved = activity::reply_bytes(state).checked_sub(self.reply_offset)?;
        let answered = self.ends.iter().position(|&end| end == moved)? + 1;
        (answered < self.requests.len()).then_some(answered)
    }

    /// The first bytes of the request owed at the last sweep.
    pub fn owed_request(&self) -> Option<&[u8]> {
        let (index, _) = self.owed?;
        self.requests.get(index).map(|r| &r[..])
    }
}

/// Bytes moved in the request direction.
fn request_bytes(state: &ConnState) -> u64 {
    if transfer::request_direction(state) == stalltrace_common::direction::IN {
        state.bytes_recv
    } else {
        state.bytes_sent
    }
}

/// The pipeline that describes the connection's latest response, if `known` does.
pub fn current<'a>(state: &ConnState, known: Option<&'a Pipeline>) -> Option<&'a Pipeline> {
    known.filter(|known| framing::current_reply(state, known.reply_ns))
}

/// A connection's activity, its latest response's framing and pipelined requests considered:
/// a request still owed after the responses before it completed is outstanding, quiet since
/// the last of those responses ended (when it became the one owed).
pub fn assess(
    state: &ConnState,
    reply: Option<&ReplyFraming>,
    known: Option<&Pipeline>,
) -> Activity {
    let activity = framing::assess(state, reply);
    if activity != Activity::Idle || transfer::is_outstanding(state) {
        return activity;
    }
    match current(state, known).and_then(|pipeline| pipeline.owed(state)) {
        Some(_) => Activity::Outstanding {
            quiet_since: activity::last_reply_ns(state),
        },
        None => activity,
    }
}

/// The stall of a connection whose activity is `activity` is a pipelined request's: the
/// kernel's direction rule says nothing is outstanding, and one of the requests `known` is
/// owed. (Not an HTTP/2 stream's: its connection may be outstanding while the last transfer
/// answered another stream.)
pub fn is_pipelined(state: &ConnState, activity: Activity, known: Option<&Pipeline>) -> bool {
    matches!(activity, Activity::Outstanding { .. })
        && !transfer::is_outstanding(state)
        && current(state, known)
            .and_then(|pipeline| pipeline.owed(state))
            .is_some()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::tracker::framing::test_head;
    use stalltrace_common::{direction, http1::REQUEST_RUN_ROOM, message::proto, role, tcp_state};

    const RUN: &[u8] =
        b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n";
    const FAST: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfast";

    pub(in crate::tracker) fn test_run(bytes: &[u8], requests: u64, offset: u64) -> RequestRun {
        let mut run = RequestRun {
            sock: 0,
            requests,
            offset,
            len: bytes.len() as u32,
            _pad: 0,
            bytes: [0; 2 * REQUEST_RUN_ROOM],
        };
        run.bytes[..bytes.len()].copy_from_slice(bytes);
        run
    }

    /// A client that wrote `RUN` after 100 bytes of earlier traffic each way, and has read
    /// `received` bytes of responses since, the last at 5_000.
    fn client(received: u64) -> ConnState {
        ConnState {
            role: role::CLIENT,
            proto: proto::HTTP1,
            tcp_state: tcp_state::ESTABLISHED,
            last_dir: direction::IN,
            dir_since_ns: 4_000,
            last_send_ns: 3_000,
            last_recv_ns: 5_000,
            bytes_sent: 100 + RUN.len() as u64,
            bytes_recv: 100 + received,
            requests: 2,
            ..Default::default()
        }
    }

    fn pipeline_for(state: &ConnState, responses: &[u8]) -> Option<Pipeline> {
        let head = test_head(RUN, responses, 4_000, 100);
        Pipeline::count(&head, Some(&test_run(RUN, 2, 100)), state).pipeline
    }

    #[test]
    fn a_request_behind_a_complete_response_is_owed_its_own() {
        let state = client(FAST.len() as u64);
        let pipeline = pipeline_for(&state, FAST).unwrap();
        assert_eq!(pipeline.owed(&state), Some(1));
        assert_eq!(&pipeline.requests[1][..9], b"GET /slow");
        assert_eq!(
            assess(&state, None, Some(&pipeline)),
            Activity::Outstanding { quiet_since: 5_000 }
        );
        assert!(is_pipelined(
            &state,
            Activity::Outstanding { quiet_since: 5_000 },
            Some(&pipeline)
        ));
        // Outstanding for another reason (an HTTP/2 stream, say), no request owed: not this.
        assert!(!is_pipelined(
            &state,
            Activity::Outstanding { quiet_since: 5_000 },
            None
        ));
        // The second response's first bytes came: not owed any more (its framing is not known).
        let mut later = state;
        later.bytes_recv += 20;
        later.last_recv_ns = 9_000;
        assert_eq!(assess(&later, None, Some(&pipeline)), Activity::Idle);
        // A new request went: the direction rule judges.
        let mut asking = state;
        asking.last_dir = direction::OUT;
        asking.last_send_ns = 9_000;
        assert_eq!(
            assess(&asking, None, Some(&pipeline)),
            Activity::Outstanding { quiet_since: 9_000 }
        );
        assert!(!is_pipelined(
            &asking,
            Activity::Outstanding { quiet_since: 9_000 },
            Some(&pipeline)
        ));
    }

    #[test]
    fn all_answered_or_not_known_is_never_owed() {
        let both = [FAST, FAST].concat();
        let state = client(both.len() as u64);
        let pipeline = pipeline_for(&state, &both).unwrap();
        assert_eq!(pipeline.owed(&state), None);
        assert_eq!(assess(&state, None, Some(&pipeline)), Activity::Idle);
        // The first response mid-way: 3a judges it, not this.
        let state = client(10);
        assert_eq!(pipeline.owed(&state), None);
        // A response whose end is not known (closed-delimited) ends the count.
        let open = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nfast";
        let state = client(open.len() as u64);
        assert_eq!(pipeline_for(&state, open).unwrap().owed(&state), None);
    }

    #[test]
    fn only_the_run_before_the_response_and_only_two_requests_or_more() {
        let state = client(FAST.len() as u64);
        let head = test_head(RUN, FAST, 4_000, 100);
        let older = Pipeline::count(&head, Some(&test_run(RUN, 1, 100)), &state);
        assert_eq!((older.pipeline, older.all), (None, false), "an older run");
        let gone = Pipeline::count(&head, None, &state);
        assert_eq!((gone.pipeline, gone.all), (None, false), "its slot reused");
        let one = &RUN[..RUN.len() / 2];
        let mut single = state;
        single.bytes_sent = 100 + one.len() as u64;
        let alone = Pipeline::count(&head, Some(&test_run(one, 2, 100)), &single);
        assert_eq!((alone.pipeline, alone.all), (None, true));
        // The second request's head was not copied whole: not counted.
        let cut = &RUN[..RUN.len() - 5];
        let partial = Pipeline::count(&head, Some(&test_run(cut, 2, 100)), &state);
        assert_eq!((partial.pipeline, partial.all), (None, false));
        // Another response than the one described.
        let pipeline = pipeline_for(&state, FAST).unwrap();
        let mut next = state;
        next.dir_since_ns = 8_000;
        assert_eq!(assess(&next, None, Some(&pipeline)), Activity::Idle);
    }
}
