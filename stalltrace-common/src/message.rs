//! What the first bytes of a run of transfers in the request direction say it is: a request,
//! a protocol control message that neither asks nor answers anything, or the start of a
//! stream (after which the connection carries one-way messages, not requests).
//!
//! Run by the kernel programs on the bytes they capture when a request would start (the
//! first bytes a client sends or a server reads after the other direction moved), so the
//! verdict's [`transfer`](crate::transfer) rule never has to look at bytes itself; and by the
//! tracker's tests on their model of the kernel. Written for the BPF verifier: fixed-size
//! buffer, bounded loops, no panicking indexing (`get` everywhere).
//!
//! A connection's protocol ([`proto`]) is recognized from its first request-direction bytes
//! and kept in [`ConnState::proto`](crate::ConnState::proto); the rules per protocol:
//! - HTTP/2 (RFC 9113; the client preface, also after an `Upgrade: h2c` exchange): a run whose frames
//!   (those whose header lies in the captured bytes) are all control frames — SETTINGS, PING,
//!   WINDOW_UPDATE, PRIORITY, RST_STREAM, GOAWAY, PUSH_PROMISE — is [`Message::Control`];
//!   a HEADERS or DATA frame makes it a request.
//! - TLS (RFC 8446 / 5246 record layer): a run whose first record is a handshake,
//!   change_cipher_spec or alert record is control; application_data is a request. (A TLS 1.3
//!   client's Finished travels as application_data; clients in middlebox-compatibility mode —
//!   OpenSSL, Go, rustls, browsers — send a change_cipher_spec record before it.)
//! - PostgreSQL: a `START_REPLICATION` simple query starts a stream (the standby's status
//!   updates are never answered).
//! - Redis (RESP or inline): `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE` and `MONITOR` start a
//!   stream (the server pushes; the client's later commands are not judged).
//! - HTTP/1.x: a run that starts with a masked WebSocket frame (what a client sends after an
//!   `Upgrade: websocket` exchange) starts a stream.
//! - D-Bus (on Unix sockets, recognized by the NUL byte that opens its SASL exchange): a run
//!   whose first message is a signal, a method return, an error, or a method call flagged
//!   NO_REPLY_EXPECTED is control (one-way: nothing is owed); so is a lone `BEGIN` (the end of
//!   the authentication, which gets no answer). In the reply direction, an incoming signal or
//!   method call is not the reply (see [`judges_housekeeping`]).
//!
//! Anything else is a request, as before: the direction rule stays the fallback.
use crate::{conn_flags, transfer::Look, ConnState, CAPTURE_MAX};

/// Protocols told apart by their first bytes (stable ids, in `ConnState::proto`).
pub mod proto {
    /// Not looked at yet (no capture).
    pub const UNKNOWN: u8 = 0;
    /// Looked at, none of the below: the direction rule alone.
    pub const OTHER: u8 = 1;
    pub const HTTP1: u8 = 2;
    pub const HTTP2: u8 = 3;
    pub const TLS: u8 = 4;
    pub const REDIS: u8 = 5;
    pub const POSTGRESQL: u8 = 6;
    /// DNS over UDP (RFC 1035): port 53, or a query header (see `udp::looks_like_dns_query`).
    pub const DNS: u8 = 7;
    /// D-Bus on a Unix stream socket: the SASL exchange's leading NUL byte (see `is_dbus_auth`).
    pub const DBUS: u8 = 8;

    /// The name used in events (OpenTelemetry `network.protocol.name` where one exists).
    pub const fn name(id: u8) -> Option<&'static str> {
        Some(match id {
            HTTP1 => "http",
            HTTP2 => "http2",
            TLS => "tls",
            REDIS => "redis",
            POSTGRESQL => "postgresql",
            DNS => "dns",
            DBUS => "dbus",
            _ => return None,
        })
    }
}

/// What a run of transfers is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Application data: in the request direction a request (a reply is owed), in the reply
    /// direction a reply.
    Data,
    /// Protocol housekeeping: neither asks nor answers.
    Control,
    /// From here on the connection carries one-way messages: it is no longer judged.
    StreamStart,
}

/// The first captured bytes of a request-direction run: `len` (≤ [`CAPTURE_MAX`]) valid bytes
/// of a transfer of `total` bytes; the buffer past `len` must be zeros. Bytes are read at
/// offsets that do not depend on `len` (zeros match no pattern that matters), so that the
/// verifier explores one path per pattern, not one per possible capture length.
pub struct Head<'a> {
    bytes: &'a [u8; CAPTURE_MAX],
    len: usize,
    total: u64,
}

impl<'a> Head<'a> {
    pub fn new(bytes: &'a [u8; CAPTURE_MAX], len: usize, total: u64) -> Self {
        Self {
            bytes,
            len: if len > CAPTURE_MAX { CAPTURE_MAX } else { len },
            total,
        }
    }

    #[inline(always)]
    fn at(&self, i: usize) -> Option<u8> {
        self.bytes.get(i).copied()
    }

    /// The 4 bytes at `at` of the transfer: from the capture at the offsets the verifier can
    /// bound (the first two: constants), else from `more` — never by an index computed from
    /// the data, which older verifiers (6.1) cannot bound however it is checked.
    #[inline(always)]
    fn word(&self, at: usize, more: &mut impl More) -> Option<[u8; 4]> {
        let captured = |first: usize| {
            (first + 4 <= self.len).then(|| {
                [
                    self.at(first).unwrap_or(0),
                    self.at(first + 1).unwrap_or(0),
                    self.at(first + 2).unwrap_or(0),
                    self.at(first + 3).unwrap_or(0),
                ]
            })
        };
        match at {
            0 => captured(0).or_else(|| more(0)),
            1 => captured(1).or_else(|| more(1)),
            _ => more(at),
        }
    }

    /// `pattern` (ASCII, upper case) at `at`, ignoring the case of letters.
    #[inline(always)]
    fn has_at(&self, at: usize, pattern: &[u8]) -> bool {
        let mut i = 0;
        while i < pattern.len() {
            match self.at(at + i) {
                Some(b) if b.to_ascii_uppercase() == pattern[i] => {}
                _ => return false,
            }
            i += 1;
        }
        true
    }
}

/// Housekeeping may travel in the request direction while a request is outstanding, and in
/// the reply direction before its reply (HTTP/2 SETTINGS, PING, WINDOW_UPDATE — grpcio's
/// keepalives and flow-control probes among them): such transfers are read too, so that they
/// neither restart the quiet nor pass for the reply.
#[inline(always)]
pub fn judges_housekeeping(protocol: u8) -> bool {
    protocol == proto::HTTP2 || protocol == proto::DBUS
}

/// Where to read frame headers past the captured bytes: `more(offset)` returns the 4 bytes at
/// `offset` of the transfer's buffer (the kernel reads them from the user buffer), or `None`.
pub trait More: FnMut(usize) -> Option<[u8; 4]> {}
impl<F: FnMut(usize) -> Option<[u8; 4]>> More for F {}

/// Classifies a transfer whose first bytes `head` were read because [`look`](crate::transfer::look)
/// said `look`: a run that may start a request (recognizing the connection's protocol first if
/// it is [`proto::UNKNOWN`]), a continuation of an outstanding request, or a run that may
/// answer it.
#[inline(always)]
pub fn classify(conn: &mut ConnState, look: Look, head: &Head, more: impl More) -> Message {
    match look {
        Look::Skip => Message::Data,
        Look::Request => request(conn, head, more),
        Look::Continuation if conn.proto == proto::HTTP2 => http2(head, false, more),
        Look::Reply if conn.proto == proto::HTTP2 => http2(head, true, more),
        Look::Continuation if conn.proto == proto::DBUS => dbus(head, more),
        Look::Reply if conn.proto == proto::DBUS => dbus_reply(head, more),
        Look::Continuation | Look::Reply => Message::Data,
    }
}

#[inline(always)]
fn request(conn: &mut ConnState, head: &Head, more: impl More) -> Message {
    if head.len == 0 {
        return Message::Data;
    }
    if conn.housekeeping_left > 0 {
        let body = head.total.min(u64::from(conn.housekeeping_left)) as u16;
        conn.housekeeping_left -= body;
        return Message::Control;
    }
    let protocol = &mut conn.proto;
    if *protocol == proto::UNKNOWN {
        *protocol = if is_dbus_auth(conn.transport, head) {
            proto::DBUS
        } else {
            recognize(head)
        };
    } else if is_tls_client_hello(head) {
        // STARTTLS-style: TLS after a plaintext exchange (PostgreSQL's SSLRequest, SMTP…).
        *protocol = proto::TLS;
    } else if is_http2_preface(head) {
        // HTTP/2 after an HTTP/1.1 `Upgrade: h2c` exchange.
        *protocol = proto::HTTP2;
    }
    match *protocol {
        proto::HTTP2 => http2(head, false, more),
        proto::TLS => tls(conn, head, more),
        // After an HTTP/1.1 `Upgrade: websocket` exchange, the client sends frames.
        proto::HTTP1 if is_websocket_client_frame(head) => Message::StreamStart,
        proto::POSTGRESQL if is_start_replication(head) => Message::StreamStart,
        proto::REDIS if is_redis_subscription(head) => Message::StreamStart,
        proto::DBUS => dbus(head, more),
        _ => Message::Data,
    }
}

/// A D-Bus connection's first bytes (D-Bus specification, "Authentication protocol"): the
/// client's NUL byte (which carries its credentials), alone — libdbus and the bus daemon
/// move it in a call of its own — or followed by `AUTH` (sd-bus), on a Unix socket.
fn is_dbus_auth(transport: u8, head: &Head) -> bool {
    transport == crate::transport::UNIX
        && head.at(0) == Some(0)
        && (head.total == 1 || head.has_at(1, b"AUTH"))
}

/// D-Bus message types (D-Bus specification, "Message Format") and the flag of a method call
/// that wants no reply.
const DBUS_METHOD_CALL: u8 = 1;
const DBUS_METHOD_RETURN: u8 = 2;
const DBUS_ERROR: u8 = 3;
const DBUS_SIGNAL: u8 = 4;
const DBUS_NO_REPLY_EXPECTED: u8 = 0x1;
/// `BEGIN\r\n`: the last line of the authentication; messages may follow in the same write.
const DBUS_BEGIN_LEN: usize = 7;

/// The header of the message at `at` (a constant: 0, or after `BEGIN`): its type and flags,
/// and whether the transfer holds nothing after it, if it is a D-Bus 1 message header. (A
/// bus delivers a signal and a method return in one read — `NameAcquired`, then
/// `RequestName`'s return —: a one-way first message decides only when it is alone.)
#[inline(always)]
fn dbus_header(head: &Head, at: usize, more: &mut impl More) -> Option<(u8, u8, bool)> {
    let [endianness @ (b'l' | b'B'), kind, flags, 1] = head.word(at, more)? else {
        return None;
    };
    let number = |word: [u8; 4]| {
        u64::from(if endianness == b'l' {
            u32::from_le_bytes(word)
        } else {
            u32::from_be_bytes(word)
        })
    };
    // Fixed header (16 bytes, the header fields' array length last), the fields padded to 8,
    // then the body.
    let body = number(head.word(at + 4, more)?);
    let fields = number(head.word(at + 12, more)?);
    let end = at as u64 + ((16 + fields + 7) & !7) + body;
    Some((kind, flags, end >= head.total))
}

/// A request-direction run on a D-Bus connection: control if its first message is one-way
/// (a signal, a method return or error — answers to the peer's calls —, a method call with
/// NO_REPLY_EXPECTED) and alone in the write, or if it is a lone `BEGIN`. Only the first
/// message is looked at (constant offsets): a write with more is data. Authentication lines
/// (`AUTH`, `NEGOTIATE_UNIX_FD`) are answered: requests.
fn dbus(head: &Head, mut more: impl More) -> Message {
    let at = if head.has_at(0, b"BEGIN\r\n") {
        if head.total <= DBUS_BEGIN_LEN as u64 {
            return Message::Control;
        }
        DBUS_BEGIN_LEN
    } else {
        0
    };
    match dbus_header(head, at, &mut more) {
        Some((DBUS_METHOD_CALL, flags, _)) if flags & DBUS_NO_REPLY_EXPECTED == 0 => Message::Data,
        Some((DBUS_METHOD_CALL | DBUS_METHOD_RETURN | DBUS_ERROR | DBUS_SIGNAL, _, true)) => {
            Message::Control
        }
        _ => Message::Data,
    }
}

/// A reply-direction run on a D-Bus connection with a call outstanding: a signal or a method
/// call from the peer is not the reply; a method return, an error or anything else may be.
fn dbus_reply(head: &Head, mut more: impl More) -> Message {
    match dbus_header(head, 0, &mut more) {
        Some((DBUS_METHOD_CALL | DBUS_SIGNAL, _, true)) => Message::Control,
        _ => Message::Data,
    }
}

fn is_http2_preface(head: &Head) -> bool {
    head.has_at(0, b"PRI * HTTP/2.0")
}

fn recognize(head: &Head) -> u8 {
    if is_http2_preface(head) {
        proto::HTTP2
    } else if is_tls_client_hello(head) {
        proto::TLS
    } else if is_http1_request(head) {
        proto::HTTP1
    } else if matches!(head.at(0), Some(b'*')) || is_redis_subscription(head) {
        proto::REDIS
    } else if is_postgres_startup(head) {
        proto::POSTGRESQL
    } else {
        proto::OTHER
    }
}

const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

fn is_http1_request(head: &Head) -> bool {
    let mut i = 0;
    while i < HTTP1_METHODS.len() {
        if head.has_at(0, HTTP1_METHODS[i]) {
            return true;
        }
        i += 1;
    }
    false
}

/// A client-to-server WebSocket frame (RFC 6455 §5.2): FIN/RSV/opcode with a defined opcode
/// (RSV2/RSV3 clear), and the mask bit that every client frame must set. No HTTP/1.x request
/// starts with such a byte (method names are ASCII letters).
fn is_websocket_client_frame(head: &Head) -> bool {
    match (head.at(0), head.at(1)) {
        (Some(b0), Some(b1)) => {
            b0 & 0x30 == 0 && matches!(b0 & 0x0f, 0..=2 | 8..=10) && b1 & 0x80 != 0
        }
        _ => false,
    }
}

/// A TLS handshake record holding a ClientHello: `16 03 0x len len 01`; or the record header
/// alone, as a server built on OpenSSL reads it (5 bytes first, then the body).
fn is_tls_client_hello(head: &Head) -> bool {
    head.at(0) == Some(0x16)
        && head.at(1) == Some(0x03)
        && matches!(head.at(2), Some(0..=4))
        && (head.len == 5 || head.at(5) == Some(0x01))
}

/// A PostgreSQL StartupMessage (protocol 3.x) or SSLRequest / GSSENCRequest: a 4-byte length,
/// then the code `00 03 00 00`, `04 d2 16 2f` or `04 d2 16 30`.
fn is_postgres_startup(head: &Head) -> bool {
    if head.at(0) != Some(0) {
        return false;
    }
    match (head.at(4), head.at(5), head.at(6)) {
        (Some(0), Some(3), Some(0)) => true,
        (Some(0x04), Some(0xd2), Some(0x16)) => matches!(head.at(7), Some(0x2f | 0x30)),
        _ => false,
    }
}

/// A simple query (`Q`, length, text) starting with `START_REPLICATION`.
fn is_start_replication(head: &Head) -> bool {
    head.at(0) == Some(b'Q') && head.has_at(5, b"START_REPLICATION")
}

/// Redis commands that turn the connection into a push stream, as RESP arrays
/// (`*2\r\n$9\r\nSUBSCRIBE…`, with up to 99 arguments) or inline commands.
fn is_redis_subscription(head: &Head) -> bool {
    if head.at(0) != Some(b'*') {
        return redis_subscription_at(head, 0);
    }
    // `*N\r\n` then `$L\r\n`: the command starts at 8 to 10 (N and L of 1 or 2 digits).
    redis_subscription_at(head, 8)
        || redis_subscription_at(head, 9)
        || redis_subscription_at(head, 10)
}

#[inline(always)]
fn redis_subscription_at(head: &Head, at: usize) -> bool {
    if at > 0 && head.at(at - 1) != Some(b'\n') {
        return false;
    }
    let command_ends = |len: usize| matches!(head.at(at + len), Some(0 | b'\r' | b' '));
    (head.has_at(at, b"SUBSCRIBE") && command_ends(9))
        || ((head.has_at(at, b"PSUBSCRIBE") || head.has_at(at, b"SSUBSCRIBE")) && command_ends(10))
        || (head.has_at(at, b"MONITOR") && command_ends(7))
}

/// HTTP/2 frame types (RFC 9113 §6) that carry requests and replies: DATA, HEADERS,
/// CONTINUATION; and those that end requests when they come from the server.
const H2_DATA: u8 = 0;
const H2_HEADERS: u8 = 1;
const H2_RST_STREAM: u8 = 3;
const H2_GOAWAY: u8 = 7;
const H2_CONTINUATION: u8 = 9;
const H2_PREFACE_LEN: usize = 24;
const H2_FRAME_HEADER_LEN: usize = 9;
/// Frames of one transfer looked at, at most.
pub const H2_MAX_FRAMES: usize = 8;

/// A transfer of frames: control only if every frame it holds was seen to be a control frame.
/// A DATA, HEADERS, CONTINUATION or unknown frame (in a `reply`, also RST_STREAM and
/// GOAWAY), or a frame header that cannot be read, makes it data. Headers past the captured
/// bytes are read with `more`, up to [`H2_MAX_FRAMES`] frames.
fn http2(head: &Head, reply: bool, mut more: impl More) -> Message {
    let mut at = if is_http2_preface(head) {
        H2_PREFACE_LEN
    } else {
        0
    };
    let mut frames = 0;
    while frames < H2_MAX_FRAMES {
        if at as u64 >= head.total {
            // Every frame of the transfer was seen: all control frames (if any).
            return if frames == 0 {
                Message::Data
            } else {
                Message::Control
            };
        }
        let header = head.word(at, &mut more);
        let Some([l0, l1, l2, kind]) = header else {
            break;
        };
        if kind > H2_CONTINUATION
            || matches!(kind, H2_DATA | H2_HEADERS | H2_CONTINUATION)
            || (reply && matches!(kind, H2_RST_STREAM | H2_GOAWAY))
        {
            return Message::Data;
        }
        let length = (usize::from(l0) << 16) | (usize::from(l1) << 8) | usize::from(l2);
        at += H2_FRAME_HEADER_LEN + length;
        frames += 1;
    }
    // A frame not seen: it may carry a request.
    Message::Data
}

const TLS_CHANGE_CIPHER_SPEC: u8 = 20;
const TLS_ALERT: u8 = 21;
const TLS_HANDSHAKE: u8 = 22;
const TLS_APPLICATION_DATA: u8 = 23;

/// Records of TLS a transfer looks at, at most.
const TLS_MAX_RECORDS: usize = 4;

/// A transfer of TLS records: housekeeping if every record it holds is handshake,
/// change_cipher_spec or alert — or the application_data record that follows a
/// change_cipher_spec, which is the TLS 1.3 Finished. A housekeeping record whose body the
/// transfer does not hold (a server reading the 5-byte header first) leaves that body to come
/// as housekeeping too.
fn tls(conn: &mut ConnState, head: &Head, mut more: impl More) -> Message {
    let mut finished_next = conn.flags & conn_flags::TLS_FINISHED_NEXT != 0;
    conn.flags &= !conn_flags::TLS_FINISHED_NEXT;
    let mut at = 0usize;
    let mut records = 0;
    while records < TLS_MAX_RECORDS {
        if at as u64 >= head.total {
            break;
        }
        // [type, version, version, length high] and [version, version, length high, low].
        let first = head.word(at, &mut more);
        let second = head.word(at + 1, &mut more);
        let (Some([kind, ..]), Some([_, _, hi, lo])) = (first, second) else {
            return Message::Data;
        };
        match kind {
            TLS_CHANGE_CIPHER_SPEC => finished_next = true,
            TLS_ALERT => {}
            // TLS 1.2's Finished follows its change_cipher_spec as a handshake record: the
            // next application_data record is data, not a TLS 1.3 Finished.
            TLS_HANDSHAKE => finished_next = false,
            TLS_APPLICATION_DATA if finished_next => finished_next = false,
            _ => return Message::Data,
        }
        at += 5 + usize::from(u16::from_be_bytes([hi, lo]));
        records += 1;
    }
    if records == 0 || (at as u64) < head.total {
        // Nothing seen, or records past those looked at: they may hold a request.
        return Message::Data;
    }
    conn.housekeeping_left = (at as u64 - head.total).min(u64::from(u16::MAX)) as u16;
    if finished_next {
        conn.flags |= conn_flags::TLS_FINISHED_NEXT;
    }
    Message::Control
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    fn conn(protocol: u8) -> ConnState {
        ConnState {
            proto: protocol,
            ..Default::default()
        }
    }

    /// Frame headers past the capture are read from `bytes`, as the kernel reads them.
    fn from(bytes: &[u8]) -> impl More + '_ {
        |at: usize| bytes.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]])
    }

    fn no_more(_: usize) -> Option<[u8; 4]> {
        None
    }

    fn classify_look(conn: &mut ConnState, look: Look, bytes: &[u8]) -> Message {
        let mut buffer = [0u8; CAPTURE_MAX];
        let len = bytes.len().min(CAPTURE_MAX);
        buffer[..len].copy_from_slice(&bytes[..len]);
        classify(
            conn,
            look,
            &Head::new(&buffer, len, bytes.len() as u64),
            from(bytes),
        )
    }

    fn classify_bytes(conn: &mut ConnState, bytes: &[u8]) -> Message {
        classify_look(conn, Look::Request, bytes)
    }

    fn h2_frame(kind: u8, stream: u32, payload: &[u8]) -> [u8; 9] {
        let len = payload.len() as u32;
        let s = stream.to_be_bytes();
        [
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }

    #[test]
    fn http2_preface_and_settings_alone_are_housekeeping() {
        let mut p = conn(proto::UNKNOWN);
        let mut run = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        run.extend_from_slice(&h2_frame(4, 0, &[0; 12]));
        run.extend_from_slice(&[0; 12]);
        assert_eq!(classify_bytes(&mut p, &run), Message::Control);
        assert_eq!(p.proto, proto::HTTP2);
    }

    #[test]
    fn http2_window_update_and_ping_ack_are_housekeeping_headers_are_requests() {
        let mut p = conn(proto::HTTP2);
        let mut run = h2_frame(8, 0, &[0, 0, 0, 17]).to_vec();
        run.extend_from_slice(&[0, 0, 0, 17]);
        run.extend_from_slice(&h2_frame(6, 0, &[0; 8]));
        run.extend_from_slice(&[0; 8]);
        assert_eq!(classify_bytes(&mut p, &run), Message::Control);
        let mut run = h2_frame(8, 0, &[0, 0, 0, 17]).to_vec();
        run.extend_from_slice(&[0, 0, 0, 17]);
        run.extend_from_slice(&h2_frame(H2_HEADERS, 3, &[0x82; 20]));
        assert_eq!(classify_bytes(&mut p, &run), Message::Data);
        assert_eq!(
            classify_bytes(&mut p, &h2_frame(H2_DATA, 3, b"x")),
            Message::Data
        );
    }

    #[test]
    fn http2_server_housekeeping_is_no_reply() {
        let mut head = [0u8; CAPTURE_MAX];
        let mut run = h2_frame(8, 0, &[0, 0, 0, 9]).to_vec();
        run.extend_from_slice(&[0, 0, 0, 9]);
        run.extend_from_slice(&h2_frame(6, 0, &[1; 8]));
        run.extend_from_slice(&[1; 8]);
        head[..run.len()].copy_from_slice(&run);
        let at = Head::new(&head, run.len(), run.len() as u64);
        assert!(judges_housekeeping(proto::HTTP2) && !judges_housekeeping(proto::HTTP1));
        assert_eq!(
            classify(&mut conn(proto::HTTP2), Look::Reply, &at, from(&run)),
            Message::Control
        );
        assert_eq!(
            classify(&mut conn(proto::HTTP2), Look::Reply, &at, no_more),
            Message::Data,
            "a frame that cannot be read may be the reply"
        );
        let reset = h2_frame(H2_RST_STREAM, 1, &[0, 0, 0, 8]);
        let mut head = [0u8; CAPTURE_MAX];
        head[..9].copy_from_slice(&reset);
        head[9..13].copy_from_slice(&[0, 0, 0, 8]);
        assert_eq!(
            classify(
                &mut conn(proto::HTTP2),
                Look::Reply,
                &Head::new(&head, 13, 13),
                no_more
            ),
            Message::Data,
            "a reset stream is answered"
        );
        let mut p = conn(proto::HTTP2);
        assert_eq!(
            classify(&mut p, Look::Request, &Head::new(&head, 13, 13), no_more),
            Message::Control,
            "a client's reset asks nothing"
        );
    }

    #[test]
    fn http2_frames_past_the_capture_may_be_requests() {
        // grpcio's first write: preface, SETTINGS, WINDOW_UPDATE, then HEADERS past 64 bytes.
        let mut p = conn(proto::UNKNOWN);
        let mut run = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        run.extend_from_slice(&h2_frame(4, 0, &[0; 24]));
        run.extend_from_slice(&[0; 24]);
        run.extend_from_slice(&h2_frame(8, 0, &[0; 4]));
        run.extend_from_slice(&[0; 4]);
        run.extend_from_slice(&h2_frame(H2_HEADERS, 1, &[0x82; 30]));
        run.extend_from_slice(&[0x82; 30]);
        assert_eq!(classify_bytes(&mut p, &run), Message::Data);
        // The same without the HEADERS frame: every frame header seen (the last payload is
        // past the capture), all control.
        let mut p = conn(proto::UNKNOWN);
        run.truncate(run.len() - 39);
        assert!(run.len() > CAPTURE_MAX);
        assert_eq!(classify_bytes(&mut p, &run), Message::Control);
        // A frame header past the capture is read from the buffer; unreadable, it may be a
        // request.
        let mut p = conn(proto::HTTP2);
        let mut run = h2_frame(4, 0, &[0; 60]).to_vec();
        run.extend_from_slice(&[0; 60]);
        run.extend_from_slice(&h2_frame(8, 0, &[0; 4]));
        run.extend_from_slice(&[0; 4]);
        assert_eq!(classify_bytes(&mut p, &run), Message::Control);
        let mut head = [0u8; CAPTURE_MAX];
        head.copy_from_slice(&run[..CAPTURE_MAX]);
        let head = Head::new(&head, CAPTURE_MAX, run.len() as u64);
        assert_eq!(
            classify(&mut p, Look::Request, &head, no_more),
            Message::Data
        );
        let mut p = conn(proto::HTTP2);
        let mut settings_ack = h2_frame(4, 0, &[]).to_vec();
        settings_ack.extend_from_slice(&h2_frame(8, 0, &[0; 4]));
        settings_ack.extend_from_slice(&[0; 4]);
        assert_eq!(classify_bytes(&mut p, &settings_ack), Message::Control);
    }

    #[test]
    fn tls_handshake_records_are_housekeeping_application_data_is_a_request() {
        let mut p = conn(proto::UNKNOWN);
        let client_hello = [
            0x16, 0x03, 0x01, 0x00, 0x06, 0x01, 0x00, 0x00, 0x02, 0x03, 0x03,
        ];
        assert_eq!(classify_bytes(&mut p, &client_hello), Message::Control);
        assert_eq!(p.proto, proto::TLS);
        assert_eq!(
            p.housekeeping_left, 0,
            "the whole record was in the transfer"
        );
        // TLS 1.3 client's second flight: change_cipher_spec, then Finished (as app data).
        let mut finished = vec![0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        finished.extend_from_slice(&record(0x17, 0x35));
        assert_eq!(classify_bytes(&mut p, &finished), Message::Control);
        assert_eq!(classify_bytes(&mut p, &record(0x17, 0x40)), Message::Data);
        assert_eq!(
            classify_bytes(&mut p, &record(0x15, 0x13)),
            Message::Control
        );
        // change_cipher_spec alone, then the Finished in the next write.
        let mut p = conn(proto::TLS);
        let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        assert_eq!(classify_bytes(&mut p, &ccs), Message::Control);
        assert_eq!(
            classify_bytes(&mut p, &record(0x17, 0x35)),
            Message::Control
        );
        assert_eq!(classify_bytes(&mut p, &record(0x17, 0x35)), Message::Data);
        // A Finished and the first request in one write: a request.
        let mut p = conn(proto::TLS);
        let mut both = ccs.to_vec();
        both.extend_from_slice(&record(0x17, 0x35));
        both.extend_from_slice(&record(0x17, 0x40));
        assert_eq!(classify_bytes(&mut p, &both), Message::Data);
    }

    /// TLS 1.2: the client's second flight ends change_cipher_spec, Finished (a handshake
    /// record): its first application_data record is a request, not a TLS 1.3 Finished.
    #[test]
    fn a_tls12_first_request_is_a_request() {
        let mut p = conn(proto::TLS);
        let mut flight = record(0x16, 0x25); // ClientKeyExchange
        flight.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        flight.extend_from_slice(&record(0x16, 0x28)); // Finished, encrypted
        assert_eq!(classify_bytes(&mut p, &flight), Message::Control);
        assert_eq!(classify_bytes(&mut p, &record(0x17, 0x40)), Message::Data);
        // The Finished in a write of its own (OpenSSL writes per record on some paths).
        let mut p = conn(proto::TLS);
        let ccs = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        assert_eq!(classify_bytes(&mut p, &ccs), Message::Control);
        assert_eq!(
            classify_bytes(&mut p, &record(0x16, 0x28)),
            Message::Control
        );
        assert_eq!(classify_bytes(&mut p, &record(0x17, 0x40)), Message::Data);
    }

    /// A whole TLS record of `kind` with a body of `len` bytes.
    fn record(kind: u8, len: u16) -> Vec<u8> {
        let mut record = vec![kind, 0x03, 0x03];
        record.extend_from_slice(&len.to_be_bytes());
        record.resize(5 + usize::from(len), 0xaa);
        record
    }

    #[test]
    fn a_server_reading_the_record_header_alone_sees_tls() {
        // OpenSSL's server reads each record's 5-byte header, then its body.
        let mut p = conn(proto::UNKNOWN);
        let header = [0x16, 0x03, 0x01, 0x00, 0x20];
        assert_eq!(classify_bytes(&mut p, &header), Message::Control);
        assert_eq!(p.proto, proto::TLS);
        assert_eq!(p.housekeeping_left, 0x20);
        let mut body = [0u8; 0x20];
        body[0] = 0x01;
        assert_eq!(classify_bytes(&mut p, &body), Message::Control, "its body");
        // The TLS 1.3 client's second flight: change_cipher_spec, then Finished.
        assert_eq!(
            classify_bytes(&mut p, &[0x14, 0x03, 0x03, 0x00, 0x01]),
            Message::Control
        );
        assert_eq!(classify_bytes(&mut p, &[0x01]), Message::Control);
        assert_eq!(p.housekeeping_left, 0);
        let finished = [0x17, 0x03, 0x03, 0x00, 0x35];
        assert_eq!(classify_bytes(&mut p, &finished), Message::Control);
        assert_eq!(classify_bytes(&mut p, &[0xaa; 0x35]), Message::Control);
        assert_eq!(
            classify_bytes(&mut p, &[0x17, 0x03, 0x03, 0x00, 0x40]),
            Message::Data,
            "the first request"
        );
    }

    #[test]
    fn starttls_after_a_postgres_ssl_request_switches_to_tls() {
        let mut p = conn(proto::UNKNOWN);
        let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(classify_bytes(&mut p, &ssl_request), Message::Data);
        assert_eq!(p.proto, proto::POSTGRESQL);
        let mut client_hello = record(0x16, 0x200);
        client_hello[5] = 0x01;
        assert_eq!(classify_bytes(&mut p, &client_hello), Message::Control);
        assert_eq!(p.proto, proto::TLS);
    }

    #[test]
    fn postgres_start_replication_starts_a_stream() {
        let mut p = conn(proto::UNKNOWN);
        let mut startup = vec![0, 0, 0, 0x50, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0database\0replication\0replication\0true\0");
        assert_eq!(classify_bytes(&mut p, &startup), Message::Data);
        assert_eq!(p.proto, proto::POSTGRESQL);
        assert_eq!(
            classify_bytes(&mut p, b"Q\0\0\0\x16IDENTIFY_SYSTEM\0"),
            Message::Data
        );
        assert_eq!(
            classify_bytes(
                &mut p,
                b"Q\0\0\0\x2bSTART_REPLICATION 0/3000000 TIMELINE 1\0"
            ),
            Message::StreamStart
        );
        assert_eq!(
            classify_bytes(&mut p, b"Q\0\0\0\x0eSELECT 1;\0"),
            Message::Data
        );
    }

    #[test]
    fn redis_subscriptions_and_monitor_start_streams() {
        let mut p = conn(proto::UNKNOWN);
        assert_eq!(
            classify_bytes(&mut p, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            Message::Data
        );
        assert_eq!(p.proto, proto::REDIS);
        for command in [
            &b"*2\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n"[..],
            b"*2\r\n$10\r\nPSUBSCRIBE\r\n$2\r\nn*\r\n",
            b"*1\r\n$7\r\nMONITOR\r\n",
            b"SUBSCRIBE news\r\n",
        ] {
            assert_eq!(classify_bytes(&mut p, command), Message::StreamStart);
        }
        assert_eq!(
            classify_bytes(&mut p, b"*2\r\n$13\r\nSUBSCRIBEXXXXX\r\n"),
            Message::Data
        );
        let mut inline = conn(proto::UNKNOWN);
        assert_eq!(
            classify_bytes(&mut inline, b"MONITOR\r\n"),
            Message::StreamStart
        );
    }

    #[test]
    fn after_an_upgrade_websocket_frames_start_a_stream_and_h2c_speaks_http2() {
        let mut p = conn(proto::UNKNOWN);
        let upgrade = b"GET /chat HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nUpgrade: websocket\r\n";
        assert_eq!(classify_bytes(&mut p, upgrade), Message::Data);
        assert_eq!(p.proto, proto::HTTP1);
        // A masked text frame "hi".
        let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        assert_eq!(classify_bytes(&mut p, &frame), Message::StreamStart);
        let mut p = conn(proto::HTTP1);
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&h2_frame(4, 0, &[]));
        assert_eq!(classify_bytes(&mut p, &preface), Message::Control);
        assert_eq!(p.proto, proto::HTTP2);
        let mut p = conn(proto::HTTP1);
        assert_eq!(
            classify_bytes(&mut p, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Message::Data
        );
    }

    #[test]
    fn anything_else_is_a_request_and_never_panics() {
        let mut p = conn(proto::UNKNOWN);
        assert_eq!(classify_bytes(&mut p, b"\x00\x01"), Message::Data);
        assert_eq!(p.proto, proto::OTHER);
        let mut p = conn(proto::UNKNOWN);
        assert_eq!(classify_bytes(&mut p, b""), Message::Data);
        assert_eq!(p.proto, proto::UNKNOWN, "nothing seen, nothing decided");
        for protocol in 0..=8u8 {
            for len in 0..=CAPTURE_MAX {
                for fill in [0u8, 0xff, b'\n', b'*', 0x16] {
                    let mut bytes = [0u8; CAPTURE_MAX];
                    bytes[..len].fill(fill);
                    let head = Head::new(&bytes, len, 200);
                    for look in [Look::Request, Look::Continuation, Look::Reply] {
                        classify(&mut conn(protocol), look, &head, no_more);
                    }
                }
            }
        }
    }

    /// A D-Bus message header of `kind` with `flags` (little-endian), then a few body bytes.
    fn dbus_message(endian: u8, kind: u8, flags: u8) -> Vec<u8> {
        let mut message = vec![
            endian, kind, flags, 1, 8, 0, 0, 0, 2, 0, 0, 0, 0x20, 0, 0, 0,
        ];
        message.extend_from_slice(&[0x01; 40]);
        message
    }

    fn unix_conn() -> ConnState {
        ConnState {
            transport: crate::transport::UNIX,
            ..Default::default()
        }
    }

    #[test]
    fn dbus_is_recognized_by_its_sasl_nul_on_unix_sockets_only() {
        for first in [&b"\0"[..], b"\0AUTH EXTERNAL 30\r\n"] {
            let mut p = unix_conn();
            assert_eq!(classify_bytes(&mut p, first), Message::Data, "answered");
            assert_eq!(p.proto, proto::DBUS, "{first:?}");
        }
        let mut tcp = conn(proto::UNKNOWN);
        classify_bytes(&mut tcp, b"\0");
        assert_ne!(tcp.proto, proto::DBUS);
        let mut other = unix_conn();
        classify_bytes(&mut other, b"\0\x01\x02");
        assert_ne!(other.proto, proto::DBUS, "a NUL and anything but AUTH");
        assert_eq!(proto::name(proto::DBUS), Some("dbus"));
    }

    #[test]
    fn dbus_one_way_messages_neither_ask_nor_answer() {
        for (endian, kind, flags, expected) in [
            (b'l', DBUS_METHOD_CALL, 0, Message::Data),
            (b'B', DBUS_METHOD_CALL, 0, Message::Data),
            (
                b'l',
                DBUS_METHOD_CALL,
                DBUS_NO_REPLY_EXPECTED,
                Message::Control,
            ),
            (b'l', DBUS_METHOD_CALL, 0x2 | 0x4, Message::Data),
            (b'l', DBUS_SIGNAL, 0, Message::Control),
            (b'B', DBUS_SIGNAL, 0, Message::Control),
            (
                b'l',
                DBUS_METHOD_RETURN,
                DBUS_NO_REPLY_EXPECTED,
                Message::Control,
            ),
            (b'l', DBUS_ERROR, 0, Message::Control),
            (b'l', 0, 0, Message::Data),
            (b'l', 9, 0, Message::Data),
            (b'x', DBUS_SIGNAL, 0, Message::Data),
        ] {
            let mut p = conn(proto::DBUS);
            let message = dbus_message(endian, kind, flags);
            assert_eq!(
                classify_bytes(&mut p, &message),
                expected,
                "{endian} {kind} {flags}"
            );
            // The same while a call is outstanding (more bytes the request way).
            let mut p = conn(proto::DBUS);
            assert_eq!(
                classify_look(&mut p, Look::Continuation, &message),
                expected
            );
        }
        // A major version other than 1 is no D-Bus 1 message.
        let mut p = conn(proto::DBUS);
        let mut message = dbus_message(b'l', DBUS_SIGNAL, 0);
        message[3] = 2;
        assert_eq!(classify_bytes(&mut p, &message), Message::Data);
    }

    #[test]
    fn dbus_begin_alone_is_owed_nothing_and_a_call_behind_it_is_a_request() {
        let mut p = conn(proto::DBUS);
        assert_eq!(classify_bytes(&mut p, b"BEGIN\r\n"), Message::Control);
        let mut run = b"BEGIN\r\n".to_vec();
        run.extend_from_slice(&dbus_message(b'l', DBUS_METHOD_CALL, 0));
        assert_eq!(classify_bytes(&mut p, &run), Message::Data, "Hello");
        let mut run = b"BEGIN\r\n".to_vec();
        run.extend_from_slice(&dbus_message(b'l', DBUS_SIGNAL, 0));
        assert_eq!(classify_bytes(&mut p, &run), Message::Control);
        // Authentication lines are answered by the bus.
        assert_eq!(
            classify_bytes(&mut p, b"NEGOTIATE_UNIX_FD\r\n"),
            Message::Data
        );
    }

    #[test]
    fn dbus_signals_and_calls_from_the_peer_are_not_the_reply() {
        for (kind, expected) in [
            (DBUS_SIGNAL, Message::Control),
            (DBUS_METHOD_CALL, Message::Control),
            (DBUS_METHOD_RETURN, Message::Data),
            (DBUS_ERROR, Message::Data),
        ] {
            let mut p = conn(proto::DBUS);
            let message = dbus_message(b'l', kind, 0);
            assert_eq!(classify_look(&mut p, Look::Reply, &message), expected);
        }
    }

    #[test]
    fn a_dbus_client_that_emits_a_signal_owes_nothing_and_a_call_awaits_its_return() {
        use crate::{direction, role, transfer};
        let mut client = ConnState {
            role: role::CLIENT,
            ..unix_conn()
        };
        // What the kernel programs do on each transfer: look, classify, record.
        let step = |conn: &mut ConnState, dir: u8, bytes: &[u8], at: u64| {
            let look = transfer::look(conn, dir);
            let message = classify_look(conn, look, bytes);
            transfer::record_transfer(conn, dir, bytes.len() as u64, at, message)
        };
        step(&mut client, direction::OUT, b"\0", 1);
        step(&mut client, direction::OUT, b"AUTH EXTERNAL 30\r\n", 2);
        step(&mut client, direction::IN, b"OK 1234\r\n", 3);
        step(&mut client, direction::OUT, b"BEGIN\r\n", 4);
        assert!(!transfer::is_outstanding(&client), "BEGIN gets no answer");
        let call = dbus_message(b'l', DBUS_METHOD_CALL, 0);
        step(&mut client, direction::OUT, &call, 5);
        let acquired = dbus_message(b'l', DBUS_SIGNAL, 0);
        let returned = dbus_message(b'l', DBUS_METHOD_RETURN, 0);
        step(&mut client, direction::IN, &returned, 6);
        step(&mut client, direction::IN, &acquired, 7);
        let signal = dbus_message(b'l', DBUS_SIGNAL, 0);
        step(&mut client, direction::OUT, &signal, 8);
        assert!(!transfer::is_outstanding(&client), "a signal asks nothing");
        step(&mut client, direction::OUT, &call, 9);
        assert!(transfer::is_outstanding(&client));
        step(&mut client, direction::IN, &acquired, 10);
        assert!(
            transfer::is_outstanding(&client),
            "a signal from the bus is not the return"
        );
        step(&mut client, direction::IN, &returned, 11);
        assert!(!transfer::is_outstanding(&client));
        assert_eq!(client.requests, 3, "AUTH, and the two calls");
        // RequestName: the bus delivers NameAcquired and the return in one read.
        step(&mut client, direction::OUT, &call, 12);
        step(
            &mut client,
            direction::IN,
            &[acquired, returned].concat(),
            13,
        );
        assert!(
            !transfer::is_outstanding(&client),
            "a return behind a signal in one read is the reply"
        );
    }
}
