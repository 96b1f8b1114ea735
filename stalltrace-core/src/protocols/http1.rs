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
    /// A chunked body: it ends with the last chunk and the blank line after its trailers, if
    /// any (`0\r\n\r\n`, `000;ext=1\r\n\r\n`, `0\r\nExpires: …\r\n\r\n`).
    Chunked,
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
                Framing::Chunked
            }
        } else {
            Framing::Stream("delimited by the close")
        };
    }
    let mut lengths = value("content-length");
    match lengths.next() {
        None => Framing::Stream("delimited by the close"),
        Some(first) => {
            // Repeated headers must agree (RFC 9110 §8.6), each maybe a list of one value.
            let mut all = first
                .split(',')
                .map(str::trim)
                .map(str::to_owned)
                .collect::<Vec<_>>();
            for more in lengths {
                all.extend(more.split(',').map(str::trim).map(str::to_owned));
            }
            let Ok(length) = all[0].parse::<u64>() else {
                return Framing::Unknown("invalid Content-Length");
            };
            if all.iter().any(|l| *l != all[0]) {
                return Framing::Unknown("conflicting Content-Length");
            }
            match head_len.checked_add(length) {
                Some(bytes) => Framing::Length { bytes },
                None => Framing::Unknown("invalid Content-Length"),
            }
        }
    }
}

/// A chunked body whose last transfer ended as `tail` (the last 8 bytes, see
/// `ConnState::reply_tail`) is complete: it ended with a blank line, which the last chunk (with
/// any extension, zeros or trailers) always does. A data chunk whose data ends with `\r\n`
/// does too: such a body stopping there is missed, never a complete one flagged. `None` when
/// the tail is not known.
pub fn chunked_complete(tail: [u8; 8]) -> Option<bool> {
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
        assert_eq!(framing(GET, chunked), Framing::Chunked);
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
    fn the_last_chunk_is_seen_in_the_tail() {
        for complete in [
            b"o\r\n0\r\n\r\n",
            b"\0\0\x000\r\n\r\n",
            b"=bar\r\n\r\n", // 0;foo=bar
            b"\n000\r\n\r\n",
            b"x: 1\r\n\r\n", // trailers, announced or not
        ] {
            assert_eq!(chunked_complete(*complete), Some(true), "{complete:?}");
        }
        assert_eq!(chunked_complete(*b"\nhello\r\n"), Some(false));
        assert_eq!(chunked_complete(*b"64\r\nbbbb"), Some(false));
        assert_eq!(chunked_complete([0xff; 8]), None);
    }
}
