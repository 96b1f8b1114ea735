//! HTTP/1.x response framing (RFC 9112 §6.3): from the first bytes of a response and of the
//! request it answers (both copied by the kernel, `stalltrace_common::http1`), whether the
//! response's length is known and where it ends — so that a response that stopped half-way is
//! told apart from a complete one.
//!
//! Untrusted bytes, possibly truncated: never panics (fuzzed, `fuzz/fuzz_targets/http1.rs`).
//! When in doubt the answer is [`Framing::Unknown`] or [`Framing::Stream`]: neither is judged.

/// What a response's head says about where it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// It ends `bytes` bytes after its first byte (the header block and a `Content-Length`
    /// body; no body after `HEAD`, 204, 304).
    Length { bytes: u64 },
    /// A chunked body after a header block of `head` bytes: it ends with the last chunk and
    /// the blank line after its trailers, if any (`0\r\n\r\n`, `000;ext=1\r\n\r\n`,
    /// `0\r\nExpires: …\r\n\r\n`).
    Chunked { head: u64 },
    /// One-way from here on, or delimited by the close: never owed anything.
    Stream(&'static str),
    /// Not known from what was copied.
    Unknown(&'static str),
}

/// Response headers looked at, at most.
const MAX_HEADERS: usize = 64;

/// Content types whose bodies are open-ended streams of events, not one answer.
const STREAMING_TYPES: [&str; 5] = [
    "text/event-stream",
    "application/x-ndjson",
    "application/stream+json",
    "application/json-seq",
    "multipart/x-mixed-replace",
];

/// Request-target query parameters of well-known watch/follow endpoints (Kubernetes
/// `?watch=1`, Docker `logs?follow=1`): their chunked responses stream until cancelled.
const STREAMING_QUERIES: [&str; 2] = ["watch=", "follow="];

/// The framing of the response whose first bytes are `response`, answering the request whose
/// first bytes are `request` (empty when not captured).
pub fn framing(request: &[u8], response: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(len)) => len as u64,
        Ok(httparse::Status::Partial) => {
            return Framing::Unknown("header block longer than what was copied")
        }
        Err(httparse::Error::TooManyHeaders) => return Framing::Unknown("too many headers"),
        Err(_) => return Framing::Unknown("not an HTTP/1.x response"),
    };
    let Some(status) = parsed.code else {
        return Framing::Unknown("no status code");
    };
    if request.is_empty() {
        return Framing::Unknown("request not captured");
    }
    let method = request.split(|&b| b == b' ').next().unwrap_or_default();
    match status {
        101 => return Framing::Stream("switched protocols"),
        100..=199 => return Framing::Unknown("interim response"),
        200..=299 if method == b"CONNECT" => return Framing::Stream("tunnel"),
        204 | 304 => return Framing::Length { bytes: head_len },
        _ if method == b"HEAD" => return Framing::Length { bytes: head_len },
        _ => {}
    }
    let value = |name: &'static str| {
        parsed
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if let Some(content_type) = value("content-type").next() {
        if STREAMING_TYPES.iter().any(|t| content_type.starts_with(t)) {
            return Framing::Stream("streaming content type");
        }
    }
    if let Some(codings) = value("transfer-encoding").next_back() {
        // Chunked must be the last coding; else the body is delimited by the close.
        return if codings.rsplit(',').next().map(str::trim) == Some("chunked") {
            let target = request.split(|&b| b == b' ').nth(1).unwrap_or_default();
            let target = String::from_utf8_lossy(target);
            if STREAMING_QUERIES.iter().any(|q| target.contains(q)) {
                Framing::Stream("watch or follow request")
            } else {
                Framing::Chunked { head: head_len }
            }
        } else {
            Framing::Stream("delimited by the close")
        };
    }
    match content_length(parsed.headers) {
        Ok(None) => Framing::Stream("delimited by the close"),
        Ok(Some(length)) => match head_len.checked_add(length) {
            Some(bytes) => Framing::Length { bytes },
            None => Framing::Unknown("invalid Content-Length"),
        },
        Err(why) => Framing::Unknown(why),
    }
}

/// The `Content-Length` of a message with `headers`, if it has one. Repeated headers must
/// agree (RFC 9110 §8.6), each maybe a list of one value.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, &'static str> {
    let mut all = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|v| v.trim_ascii());
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.any(|v| v != first) {
        return Err("conflicting Content-Length");
    }
    std::str::from_utf8(first)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Some)
        .ok_or("invalid Content-Length")
}

/// Requests looked at in one request-direction run, at most.
const MAX_PIPELINED: usize = 64;

/// The requests at the start of a request-direction run (pipelining: several written before
/// the first response is read), from its first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requests {
    /// Where each request whose header block was copied whole starts, in bytes from the
    /// run's start, in order.
    pub starts: Vec<usize>,
    /// `starts` holds every request of the run; else the run holds at least these (its
    /// later bytes were not copied, or a chunked body's end was not).
    pub exact: bool,
}

/// The requests of a run of `run_len` bytes whose first bytes are `copied`: each request's
/// header block, then its body (`Content-Length` or chunked; none without either, RFC 9112
/// §6.3), then the next request. `None` when the bytes are not a sequence of HTTP/1.x
/// requests (or what follows a `CONNECT` or an `Upgrade` is not known to be requests).
/// Untrusted bytes: never panics (fuzzed).
pub fn requests(copied: &[u8], run_len: u64) -> Option<Requests> {
    let mut found = Requests {
        starts: Vec::new(),
        exact: false,
    };
    let mut at = 0usize;
    while (at as u64) < run_len {
        if found.starts.len() == MAX_PIPELINED {
            return Some(found);
        }
        // The run's later bytes were not copied: more requests, maybe, not seen.
        let Some(rest) = copied.get(at..).filter(|rest| !rest.is_empty()) else {
            return Some(found);
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            // Cut by the copy, or not all sent yet: not counted either way.
            Ok(httparse::Status::Partial) => return Some(found),
            Err(_) => return None,
        };
        found.starts.push(at);
        let tunnel = request.method == Some("CONNECT")
            || request
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
        let chunked = request
            .headers
            .iter()
            .rfind(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .is_some_and(|h| {
                h.value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            });
        let body = if chunked {
            match chunked_len(&rest[head_len..]) {
                Some(len) => len,
                // Its end was not copied: this request is the last one known.
                None => return Some(found),
            }
        } else {
            content_length(request.headers).ok()?.unwrap_or(0)
        };
        let end = (at as u64)
            .checked_add(head_len as u64)
            .and_then(|end| end.checked_add(body))?;
        if tunnel && end < run_len {
            return None;
        }
        // Past the copy (a body longer than it): the next request's start is not seen.
        at = usize::try_from(end).ok()?;
    }
    found.exact = true;
    Some(found)
}

/// Chunks looked at in one chunked body, at most.
const MAX_CHUNKS: usize = 256;

/// The length of the chunked body (chunks, last chunk, trailers and the blank line) at the
/// start of `body`, if all of it is there.
fn chunked_len(body: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    for _ in 0..MAX_CHUNKS {
        let (line, size) = match httparse::parse_chunk_size(body.get(at..)?) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            _ => return None,
        };
        at = at.checked_add(line)?;
        if size == 0 {
            let mut trailers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            return match httparse::parse_headers(body.get(at..)?, &mut trailers) {
                Ok(httparse::Status::Complete((len, _))) => Some((at + len) as u64),
                _ => None,
            };
        }
        // The data and its CRLF.
        at = at
            .checked_add(usize::try_from(size).ok()?)?
            .checked_add(2)?;
    }
    None
}

/// Where the responses at the start of a reply-direction run end, in bytes from its start, in
/// order: as many as `copied` (the run's first bytes) tells, each framed for its request
/// (`requests`, their first bytes in order: a `HEAD` is answered without a body). A response
/// whose end is not known ends the list.
pub fn response_ends(copied: &[u8], requests: &[&[u8]]) -> Vec<u64> {
    let mut ends = Vec::new();
    let mut at = 0u64;
    for request in requests {
        let Some(rest) = usize::try_from(at)
            .ok()
            .and_then(|at| copied.get(at..))
            .filter(|rest| !rest.is_empty())
        else {
            break;
        };
        let len = match framing(request, rest) {
            Framing::Length { bytes } => bytes,
            Framing::Chunked { head } => match rest.get(head as usize..).and_then(chunked_len) {
                Some(body) => head + body,
                None => break,
            },
            Framing::Stream(_) | Framing::Unknown(_) => break,
        };
        let Some(end) = at.checked_add(len) else {
            break;
        };
        at = end;
        ends.push(at);
    }
    ends
}

/// The shortest chunked body: the last chunk alone (`0\r\n\r\n`).
const LAST_CHUNK_ALONE: u64 = 5;

/// A chunked response of which `moved` bytes have moved, the last transfer ending as `tail`
/// (its last 8 bytes, see `ConnState::reply_tail`), after a header block of `head` bytes, is
/// complete: its body began and ended with a blank line, which the last chunk (with any
/// extension, zeros or trailers) always does. The header block ends with a blank line too:
/// a response stopped right after it is owed its body. A data chunk whose data ends with
/// `\r\n` ends with one as well: such a body stopping there is missed, never a complete one
/// flagged. `None` when the tail is not known.
pub fn chunked_complete(head: u64, moved: u64, tail: [u8; 8]) -> Option<bool> {
    if moved < head.saturating_add(LAST_CHUNK_ALONE) {
        return Some(false);
    }
    (tail != stalltrace_common::http1::TAIL_UNKNOWN).then(|| tail.ends_with(b"\r\n\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_content_length_body_ends_after_the_header_block() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\nhello";
        let header_block = head.len() as u64 - 5;
        assert_eq!(
            framing(GET, head),
            Framing::Length {
                bytes: header_block + 10_000
            }
        );
        let repeated = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nContent-Length: 7, 7\r\n\r\n";
        assert!(matches!(framing(GET, repeated), Framing::Length { .. }));
        let conflicting = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n";
        assert_eq!(
            framing(GET, conflicting),
            Framing::Unknown("conflicting Content-Length")
        );
    }

    #[test]
    fn some_responses_have_no_body_whatever_their_headers_say() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n";
        let bytes = head.len() as u64;
        assert_eq!(
            framing(b"HEAD / HTTP/1.1\r\n", head),
            Framing::Length { bytes }
        );
        let head = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10000\r\n\r\n";
        let bytes = head.len() as u64;
        assert_eq!(framing(GET, head), Framing::Length { bytes });
    }

    #[test]
    fn chunked_bodies_and_streams() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello";
        assert!(matches!(framing(GET, chunked), Framing::Chunked { .. }));
        let sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(framing(GET, sse), Framing::Stream(_)));
        assert!(matches!(
            framing(b"GET /api/v1/pods?watch=1 HTTP/1.1", chunked),
            Framing::Stream(_)
        ));
        let until_close = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n";
        assert!(matches!(framing(GET, until_close), Framing::Stream(_)));
        let tunnel = b"HTTP/1.1 200 Connection established\r\n\r\n";
        assert!(matches!(
            framing(b"CONNECT example.com:443 HTTP/1.1", tunnel),
            Framing::Stream(_)
        ));
    }

    #[test]
    fn what_was_not_copied_is_unknown() {
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\nX-Long: aaaa";
        assert!(matches!(framing(GET, cut), Framing::Unknown(_)));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(framing(b"", head), Framing::Unknown("request not captured"));
        assert!(matches!(
            framing(GET, b"\x16\x03\x01garbage"),
            Framing::Unknown(_)
        ));
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(matches!(framing(GET, interim), Framing::Unknown(_)));
    }

    #[test]
    fn pipelined_requests_are_counted_through_their_bodies() {
        let run = b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n\
                    POST /form HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
                    PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n0\r\nX: 1\r\n\r\n\
                    GET /slow HTTP/1.1\r\n\r\n";
        let found = requests(run, run.len() as u64).unwrap();
        let names: Vec<_> = found.starts.iter().map(|&at| &run[at..at + 9]).collect();
        assert_eq!(
            names,
            [&b"GET /fast"[..], b"POST /for", b"PUT /up H", b"GET /slow"]
        );
        assert!(found.exact);
        let one = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(
            requests(one, one.len() as u64),
            Some(Requests {
                starts: vec![0],
                exact: true
            })
        );
    }

    #[test]
    fn requests_not_copied_whole_are_not_counted() {
        let run = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHo";
        let found = requests(run, 500).unwrap();
        assert_eq!(
            (found.starts, found.exact),
            (vec![0], false),
            "cut by the copy"
        );
        let found = requests(run, run.len() as u64).unwrap();
        assert_eq!(found.starts, vec![0], "not all sent");
        let body = b"POST /a HTTP/1.1\r\nContent-Length: 900\r\n\r\nxxxx";
        let found = requests(body, 2_000).unwrap();
        assert_eq!(
            (found.starts, found.exact),
            (vec![0], false),
            "past the copy"
        );
        let chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nxx";
        assert!(!requests(chunked, 2_000).unwrap().exact);
        assert_eq!(requests(b"\x16\x03\x01\x02\x00", 5), None);
        let garbage_after = b"GET /a HTTP/1.1\r\n\r\n\x00\x01binary";
        assert_eq!(requests(garbage_after, garbage_after.len() as u64), None);
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        assert_eq!(requests(upgrade, upgrade.len() as u64), None);
    }

    #[test]
    fn pipelined_responses_end_where_their_framing_says() {
        let get = &b"GET / HTTP/1.1"[..];
        let head = &b"HEAD / HTTP/1.1"[..];
        let replies = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
                        HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n\
                        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n\
                        HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\nabc";
        let ends = response_ends(replies, &[get, head, get, get, get]);
        assert_eq!(ends.len(), 4);
        assert_eq!(ends[0], 40);
        assert_eq!(ends[1], 40 + 38, "no body after HEAD");
        let chunked_end = replies.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() as u64 + 5;
        assert_eq!(ends[2], chunked_end);
        assert_eq!(
            ends[3],
            chunked_end + 41 + 9999,
            "its end is known, past the copy"
        );
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n";
        assert!(response_ends(cut, &[get, get]).is_empty());
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert!(response_ends(interim, &[get]).is_empty());
    }

    #[test]
    fn the_last_chunk_is_seen_in_the_tail() {
        for complete in [
            b"o\r\n0\r\n\r\n",
            b"\0\0\x000\r\n\r\n",
            b"=bar\r\n\r\n", // 0;foo=bar
            b"\n000\r\n\r\n",
            b"x: 1\r\n\r\n", // trailers, announced or not
        ] {
            assert_eq!(
                chunked_complete(40, 45, *complete),
                Some(true),
                "{complete:?}"
            );
        }
        assert_eq!(chunked_complete(40, 60, *b"\nhello\r\n"), Some(false));
        assert_eq!(chunked_complete(40, 60, *b"64\r\nbbbb"), Some(false));
        assert_eq!(chunked_complete(40, 60, [0xff; 8]), None);
        // The header block's own blank line: no body yet, whatever the tail.
        assert_eq!(chunked_complete(40, 40, *b"nked\r\n\r\n"), Some(false));
        assert_eq!(chunked_complete(40, 44, *b"\r\n\r\n0\r\n\r"), Some(false));
        assert_eq!(chunked_complete(40, 40, [0xff; 8]), Some(false));
    }
}
