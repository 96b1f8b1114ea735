//! Transfer accounting: what one send or receive does to a connection's [`ConnState`].
//!
//! Written once for both sides: the kernel programs run it on every transfer, and the
//! tracker's tests run it on their model of the kernel, so the two cannot drift apart. Keep it
//! cheap and branch-light: it is on the hot path of every socket call.
use crate::{conn_flags, direction, message::Message, role, tcp_state, verdict_flags, ConnState};

/// What a transfer did to the connection's exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// More bytes in the same direction as the previous transfer.
    Continued,
    /// The first bytes of a request (the direction turned to the request direction).
    RequestStarted,
    /// The first bytes of a reply to an outstanding request.
    ReplyStarted,
    /// The first transfer of a connection whose first bytes went in the reply direction
    /// (nothing to answer: e.g. a server greeting).
    Unsolicited,
    /// A protocol control message in the request direction: nothing asked, nothing answered.
    Control,
    /// The connection became a stream of one-way messages: no exchange is judged from here on.
    StreamStarted,
}

/// The direction in which this connection's requests travel: inbound for a server, outbound
/// for a client (and for a connection whose role is unknown).
#[inline(always)]
pub fn request_direction(conn: &ConnState) -> u8 {
    if conn.role == role::SERVER {
        direction::IN
    } else {
        direction::OUT
    }
}

/// A request is outstanding: the last transfer that counted went in the request direction.
#[inline(always)]
pub fn is_outstanding(conn: &ConnState) -> bool {
    conn.last_dir != direction::NONE && conn.last_dir == request_direction(conn)
}

/// Whose first bytes a transfer needs read, to be classified ([`crate::message::classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// None: the transfer continues a run, or nothing it could say changes the verdict.
    Skip,
    /// It may start a request: the direction turns to the request direction on a connection
    /// that is not a stream (the capture also names the request).
    Request,
    /// It continues an outstanding request on a protocol whose housekeeping must not restart
    /// the quiet ([`crate::message::judges_housekeeping`]).
    Continuation,
    /// It may answer the outstanding request on such a protocol, or on a TLS client
    /// connection, whose receives may be held back ([`is_tls_client`]).
    Reply,
}

/// Whose first bytes a transfer in direction `dir` needs read.
#[inline(always)]
pub fn look(conn: &ConnState, dir: u8) -> Look {
    if conn.flags & conn_flags::STREAM != 0 {
        return Look::Skip;
    }
    let housekeeping = crate::message::judges_housekeeping(conn.proto) && is_outstanding(conn);
    if dir == request_direction(conn) {
        if dir != conn.last_dir {
            Look::Request
        } else if housekeeping {
            Look::Continuation
        } else {
            Look::Skip
        }
    } else if dir != conn.last_dir
        && (housekeeping || (is_tls_client(conn) && is_outstanding(conn)))
    {
        Look::Reply
    } else {
        Look::Skip
    }
}

/// In TCP state `state`, this side can still complete an outstanding exchange: a server can
/// still send its reply after the peer's FIN (`CLOSE_WAIT`: the peer half-closed after its
/// request, `shutdown(SHUT_WR)`), and a client can still receive one after its own FIN
/// (`FIN_WAIT1`/`FIN_WAIT2`) or read one that arrived with the peer's (`CLOSE_WAIT` with
/// [`verdict_flags::REPLY_UNREAD_AT_PEER_FIN`]). A client whose peer closed with nothing
/// left unread waits for what can never come: its exchange ends at the peer's FIN.
#[inline(always)]
pub fn can_complete(conn: &ConnState, state: u8) -> bool {
    match state {
        tcp_state::ESTABLISHED => true,
        tcp_state::CLOSE_WAIT => {
            conn.role == role::SERVER
                || conn.verdict_flags & verdict_flags::REPLY_UNREAD_AT_PEER_FIN != 0
        }
        tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 => conn.role != role::SERVER,
        _ => false,
    }
}

/// When the request direction last moved (ns): the start of the current quiet stretch while a
/// request is outstanding. A reply or a close does not change it.
#[inline(always)]
pub fn last_request_ns(conn: &ConnState) -> u64 {
    if request_direction(conn) == direction::IN {
        conn.last_recv_ns
    } else {
        conn.last_send_ns
    }
}

/// The outstanding request has been quiet for at least `stall_after_ns` at `now` (ns).
#[inline(always)]
pub fn quiet_past_threshold(conn: &ConnState, now: u64, stall_after_ns: u64) -> bool {
    is_outstanding(conn) && now.saturating_sub(last_request_ns(conn)) >= stall_after_ns
}

/// A transfer in direction `dir` at `now`, of kind `message`, would end a quiet stretch of at
/// least the threshold: the stall (reported or not yet swept) ends with it. Call before
/// [`record_transfer`].
#[inline(always)]
pub fn ends_quiet(
    conn: &ConnState,
    dir: u8,
    message: Message,
    now: u64,
    stall_after_ns: u64,
) -> bool {
    conn.last_dir != dir
        && message == Message::Data
        && quiet_past_threshold(conn, now, stall_after_ns)
}

/// Records a transfer of `bytes` in direction `dir` ([`direction::IN`] or
/// [`direction::OUT`]) at `now` (ns): counters, last-transfer times and the request/reply
/// turn. `message` is what the transfer's first bytes are, when they were read ([`look`];
/// else [`Message::Data`]): control messages change no turn, either way. A zeroed entry (a
/// connection first seen through its traffic) is set up correctly.
///
/// Counters are plain increments: sends and receives touch different fields, and two threads
/// sending on one socket in the same instant is rare enough that a lost count is acceptable
/// (the BPF target's `core` has no atomic read-modify-write on stable Rust).
#[inline(always)]
pub fn record_transfer(
    conn: &mut ConnState,
    dir: u8,
    bytes: u64,
    now: u64,
    message: Message,
) -> Turn {
    if dir == direction::IN {
        conn.bytes_recv += bytes;
        conn.recv_calls += 1;
    } else {
        conn.bytes_sent += bytes;
        conn.send_calls += 1;
    }
    if message == Message::Control {
        // Housekeeping moves no exchange, and no quiet clock: times are those of data.
        return Turn::Control;
    }
    record_turn(conn, dir, now, message)
}

/// The request/reply turn of data moved in direction `dir` at `now` (ns), without counting
/// bytes or calls: [`record_transfer`]'s second half, also run alone when libssl returns the
/// plaintext of receives counted earlier ([`plaintext_received`]).
#[inline(always)]
pub fn record_turn(conn: &mut ConnState, dir: u8, now: u64, message: Message) -> Turn {
    if dir == direction::IN {
        conn.last_recv_ns = now;
    } else {
        conn.last_send_ns = now;
    }
    let previous = conn.last_dir;
    if previous == dir || conn.flags & conn_flags::STREAM != 0 {
        return Turn::Continued;
    }
    if message == Message::StreamStart {
        conn.flags |= conn_flags::STREAM;
        conn.last_dir = direction::NONE;
        conn.dir_since_ns = now;
        return Turn::StreamStarted;
    }
    conn.last_dir = dir;
    conn.dir_since_ns = now;
    if dir == request_direction(conn) {
        conn.requests += 1;
        Turn::RequestStarted
    } else if previous != direction::NONE {
        conn.exchanges += 1;
        Turn::ReplyStarted
    } else {
        Turn::Unsolicited
    }
}

/// A TLS connection whose replies come in (a client's, not a stream): its receives are not
/// all replies, though their records say application_data. A TLS 1.3 client reads the
/// server's NewSessionTickets in its first read after its first request. Two rules then hold
/// such a receive back: bytes that had arrived before the request was sent
/// ([`received_before_request`]), and a receive made inside libssl's `SSL_read` (the daemon
/// hooks it), which is counted as housekeeping ([`Message::Control`]: bytes, no turn) while
/// the reply turn is taken when `SSL_read` returns application data
/// ([`plaintext_received`]). A server's receives (its requests) are judged from their records.
#[inline(always)]
pub fn is_tls_client(conn: &ConnState) -> bool {
    conn.proto == crate::message::proto::TLS
        && request_direction(conn) == direction::OUT
        && conn.flags & conn_flags::STREAM == 0
}

/// An `SSL_read` call on `conn` returned application data at `now` (ns), after receives it
/// made were held back ([`is_tls_client`]): the turn they did not take. Returns whether a
/// quiet stretch of at least `stall_after_ns` ended ([`ends_quiet`]) and the turn.
#[inline(always)]
pub fn plaintext_received(conn: &mut ConnState, now: u64, stall_after_ns: u64) -> (bool, Turn) {
    let quiet_ended = ends_quiet(conn, direction::IN, Message::Data, now, stall_after_ns);
    (
        quiet_ended,
        record_turn(conn, direction::IN, now, Message::Data),
    )
}

/// Of a receive of `bytes` on a TLS client connection with a request outstanding, whether all
/// of them had arrived before the request was sent: `queued` bytes still to be read from those
/// that sat unread in the receive queue when it was sent (counted down here). Such bytes
/// cannot answer it — a TLS 1.3 server's NewSessionTickets, read by a pre-warmed pool
/// connection's first `read` after its first request — whatever the client's TLS library.
#[inline(always)]
pub fn received_before_request(queued: &mut u32, bytes: u64) -> bool {
    if bytes <= u64::from(*queued) {
        *queued -= bytes as u32;
        true
    } else {
        *queued = 0;
        false
    }
}

/// What the application has read from a TCP socket by any means (low 32 bits of bytes):
/// `bytes_received` (`tcp_sock.bytes_received`: every advance of `rcv_nxt`, a received FIN's
/// one included, as `ss -ti` shows) less the `unread` sequence space (`rcv_nxt - copied_seq`,
/// which holds that FIN until a read returns end of file). A FIN unread counts in both; one
/// read is no byte: `read_shutdown` (`sk_shutdown & RCV_SHUTDOWN`, set by the FIN) with
/// nothing unread takes it off. (A local `shutdown(SHUT_RD)` sets it too, with no FIN: one
/// byte too few then, which reads as nothing unseen, never as a phantom byte.)
#[inline(always)]
pub fn consumed(bytes_received: u64, unread: u32, read_shutdown: bool) -> u32 {
    let fin_read = u32::from(read_shutdown && unread == 0);
    (bytes_received as u32)
        .wrapping_sub(unread)
        .wrapping_sub(fin_read)
}

/// Bytes the application read from a TCP connection without a receive the programs saw:
/// `splice(2)` or `sendfile(2)` from the socket (`tcp_splice_read`, as haproxy forwards
/// bodies), or `TCP_ZEROCOPY_RECEIVE`, which leave `sock_recv_length` and `tcp_recvmsg` out.
/// `consumed` is what it has read by any means ([`consumed`], at the end of such a read), set
/// against what the entry counted since [`ConnState::consumed_base`]. 0 when nothing is
/// missing, or when the entry counted more (bytes counted at the peer's FIN before they were
/// read): never negative, and at most 2^31 - 1 (a single read moves far less).
#[inline(always)]
pub fn spliced_bytes(conn: &ConnState, consumed: u32) -> u64 {
    unseen_reads(counted_reads(conn), consumed)
}

/// What the entry counted as read, on the scale of [`consumed`] (low 32 bits).
#[inline(always)]
pub fn counted_reads(conn: &ConnState) -> u32 {
    conn.consumed_base.wrapping_add(conn.bytes_recv as u32)
}

/// At the peer's FIN, whether a client has a reply that can still answer its request
/// ([`can_complete`] in `CLOSE_WAIT`): data beyond the FIN unread in its receive queue
/// (`unread`, `rcv_nxt - copied_seq`, in which the FIN counts one), or data the application
/// has read (`consumed`, [`consumed`]) beyond what the hooks counted. The second is a receive
/// that has copied the reply out and not returned: the kernel handles a FIN that came meanwhile
/// when that receive releases the socket, before the receive's hook runs. `consumed` is set
/// against the count only on a connection counted from its handshake: one found through its
/// traffic may not know what was read before ([`ConnState::consumed_base`]).
#[inline(always)]
pub fn reply_at_peer_fin(conn: &ConnState, unread: u32, consumed: u32) -> bool {
    let counted_from_handshake = conn.flags & conn_flags::DISCOVERED == 0;
    unread > 1 || (counted_from_handshake && unseen_reads(counted_reads(conn), consumed) > 0)
}

/// Bytes the socket says were read (`consumed`) beyond those `counted` ([`counted_reads`]);
/// 0 when none, or when more were counted (a modular difference past 2^31 is that).
#[inline(always)]
pub fn unseen_reads(counted: u32, consumed: u32) -> u64 {
    let unseen = consumed.wrapping_sub(counted);
    if unseen < 1 << 31 {
        u64::from(unseen)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_by_splice_are_what_the_socket_consumed_beyond_the_count() {
        let mut conn = ConnState {
            role: role::CLIENT,
            ..Default::default()
        };
        // A 44-byte head read by recv(), then 65 536 body bytes by splice(): the socket has
        // received 70 000, 4 420 of them unread.
        record_transfer(&mut conn, direction::IN, 44, 1, Message::Data);
        let read = consumed(70_000, 4_420, false);
        assert_eq!(read, 65_580);
        assert_eq!(spliced_bytes(&conn, read), 65_536);
        record_transfer(&mut conn, direction::IN, 65_536, 2, Message::Data);
        assert_eq!(spliced_bytes(&conn, read), 0, "counted once");
        // The peer's FIN came with the last bytes: the kernel counts it as received and, until
        // a read returns end of file, as unread. It is no byte either way.
        assert_eq!(consumed(70_001, 4_421, true), 65_580);
        assert_eq!(consumed(70_001, 1, true), 70_000, "all data read");
        assert_eq!(consumed(70_001, 0, true), 70_000, "end of file read too");
        // Bytes counted before they were read (at the peer's FIN) are never negative.
        conn.bytes_recv += 100;
        assert_eq!(spliced_bytes(&conn, read), 0);
    }

    #[test]
    fn a_reply_at_the_peers_fin_is_one_unread_or_one_being_read() {
        let mut conn = ConnState {
            role: role::CLIENT,
            flags: conn_flags::ESTABLISHED,
            ..Default::default()
        };
        record_transfer(&mut conn, direction::OUT, 22, 1, Message::Data);
        // The FIN alone, nothing read since the request: no reply.
        assert!(!reply_at_peer_fin(&conn, 1, 0));
        // The reply waits in the queue with the FIN.
        assert!(reply_at_peer_fin(&conn, 41, 0));
        // A receive copied the 40-byte reply out and has not returned (its hook not run).
        assert!(reply_at_peer_fin(&conn, 1, 40));
        // Once counted, the same bytes are no reply to a later request.
        record_transfer(&mut conn, direction::IN, 40, 2, Message::Data);
        record_transfer(&mut conn, direction::OUT, 22, 3, Message::Data);
        assert!(!reply_at_peer_fin(&conn, 1, 40));
        // A connection found through its traffic read bytes before it was counted.
        conn.flags |= conn_flags::DISCOVERED;
        assert!(!reply_at_peer_fin(&conn, 1, 5_000));
    }

    #[test]
    fn a_connection_found_through_its_traffic_counts_splices_from_its_base() {
        // 5 GiB had been read before the daemon saw the connection: the 32-bit counters
        // wrapped, the difference does not care.
        let before = 5u64 << 30;
        let mut conn = ConnState {
            role: role::SERVER,
            ..Default::default()
        };
        record_transfer(&mut conn, direction::IN, 300, 1, Message::Data);
        conn.consumed_base = consumed(before + 300, 0, false).wrapping_sub(300);
        assert_eq!(spliced_bytes(&conn, consumed(before + 300, 0, false)), 0);
        assert_eq!(
            spliced_bytes(&conn, consumed(before + 300 + 8_192, 0, false)),
            8_192
        );
    }

    fn server() -> ConnState {
        ConnState {
            role: role::SERVER,
            ..Default::default()
        }
    }

    #[test]
    fn a_server_request_then_reply_is_one_exchange() {
        let mut conn = server();
        assert_eq!(
            record_transfer(&mut conn, direction::IN, 10, 1, Message::Data),
            Turn::RequestStarted
        );
        assert!(is_outstanding(&conn));
        assert_eq!(
            record_transfer(&mut conn, direction::IN, 5, 2, Message::Data),
            Turn::Continued
        );
        assert_eq!(last_request_ns(&conn), 2);
        assert_eq!(
            record_transfer(&mut conn, direction::OUT, 20, 3, Message::Data),
            Turn::ReplyStarted
        );
        assert!(!is_outstanding(&conn));
        assert_eq!(
            (
                conn.bytes_recv,
                conn.recv_calls,
                conn.bytes_sent,
                conn.send_calls
            ),
            (15, 2, 20, 1)
        );
        assert_eq!(
            (conn.requests, conn.exchanges, conn.dir_since_ns),
            (1, 1, 3)
        );
    }

    #[test]
    fn a_greeting_before_any_request_is_no_exchange() {
        let mut conn = server();
        assert_eq!(
            record_transfer(&mut conn, direction::OUT, 5, 1, Message::Data),
            Turn::Unsolicited
        );
        assert_eq!((conn.requests, conn.exchanges), (0, 0));
        assert!(!is_outstanding(&conn));
    }

    #[test]
    fn clients_send_their_requests() {
        let mut conn = ConnState {
            role: role::CLIENT,
            ..Default::default()
        };
        record_transfer(&mut conn, direction::OUT, 10, 100, Message::Data);
        assert!(is_outstanding(&conn));
        assert!(!quiet_past_threshold(&conn, 150, 100));
        assert!(quiet_past_threshold(&conn, 200, 100));
        assert!(ends_quiet(&conn, direction::IN, Message::Data, 200, 100));
        assert!(
            !ends_quiet(&conn, direction::OUT, Message::Data, 200, 100),
            "more request bytes"
        );
        assert!(
            !ends_quiet(&conn, direction::IN, Message::Control, 200, 100),
            "housekeeping is no reply"
        );
    }

    #[test]
    fn half_closed_connections_can_still_complete_on_the_open_side() {
        let server = server();
        let client = ConnState {
            role: role::CLIENT,
            ..Default::default()
        };
        let mut client_with_reply = client;
        client_with_reply.verdict_flags = verdict_flags::REPLY_UNREAD_AT_PEER_FIN;
        assert!(can_complete(&client_with_reply, tcp_state::CLOSE_WAIT));
        for (state, server_can, client_can) in [
            (tcp_state::ESTABLISHED, true, true),
            // The peer closed and nothing it sent is left to read: nothing can answer.
            (tcp_state::CLOSE_WAIT, true, false),
            (tcp_state::FIN_WAIT1, false, true),
            (tcp_state::FIN_WAIT2, false, true),
            (tcp_state::LAST_ACK, false, false),
            (tcp_state::CLOSING, false, false),
            (tcp_state::CLOSE, false, false),
            (tcp_state::SYN_SENT, false, false),
        ] {
            assert_eq!(can_complete(&server, state), server_can, "server {state}");
            assert_eq!(can_complete(&client, state), client_can, "client {state}");
        }
    }

    #[test]
    fn control_messages_neither_ask_nor_answer() {
        let mut conn = ConnState {
            role: role::CLIENT,
            ..Default::default()
        };
        record_transfer(&mut conn, direction::OUT, 10, 1, Message::Data);
        record_transfer(&mut conn, direction::IN, 10, 2, Message::Data);
        assert_eq!(look(&conn, direction::OUT), Look::Request);
        assert_eq!(
            record_transfer(&mut conn, direction::OUT, 13, 3, Message::Control),
            Turn::Control
        );
        assert!(!is_outstanding(&conn), "a WINDOW_UPDATE is owed nothing");
        assert_eq!(
            (conn.requests, conn.bytes_sent, conn.last_send_ns),
            (1, 23, 1),
            "counted, but no quiet clock moved"
        );
        assert_eq!(
            look(&conn, direction::OUT),
            Look::Request,
            "the next send is read"
        );
        assert_eq!(
            record_transfer(&mut conn, direction::OUT, 40, 4, Message::Data),
            Turn::RequestStarted
        );
        assert!(is_outstanding(&conn));
    }

    #[test]
    fn a_stream_is_never_outstanding() {
        let mut conn = ConnState {
            role: role::SERVER,
            ..Default::default()
        };
        assert_eq!(
            record_transfer(&mut conn, direction::IN, 40, 1, Message::StreamStart),
            Turn::StreamStarted
        );
        for t in 2..10 {
            let dir = if t % 3 == 0 {
                direction::OUT
            } else {
                direction::IN
            };
            assert_eq!(look(&conn, dir), Look::Skip);
            assert_eq!(
                record_transfer(&mut conn, dir, 5, t, Message::Data),
                Turn::Continued
            );
            assert!(!is_outstanding(&conn));
        }
        assert_eq!((conn.requests, conn.recv_calls), (0, 6));
    }

    #[test]
    fn a_tls_client_reply_counts_when_libssl_returns_plaintext() {
        use crate::message::proto;
        const SECOND: u64 = 1_000_000_000;
        let mut conn = ConnState {
            role: role::CLIENT,
            proto: proto::TLS,
            ..Default::default()
        };
        // The first request on a fresh TLS 1.3 connection, then SSL_read: the receive of the
        // server's NewSessionTickets is deferred, no reply.
        record_transfer(&mut conn, direction::OUT, 40, SECOND, Message::Data);
        assert!(is_tls_client(&conn));
        assert_eq!(
            look(&conn, direction::IN),
            Look::Reply,
            "receives are judged"
        );
        assert_eq!(
            record_transfer(&mut conn, direction::IN, 500, SECOND + 1, Message::Control),
            Turn::Control
        );
        assert!(is_outstanding(&conn), "tickets answer nothing");
        assert!(quiet_past_threshold(&conn, 4 * SECOND, 2 * SECOND));
        // The reply's receive, deferred too; SSL_read then returns its plaintext at 7 s.
        record_transfer(&mut conn, direction::IN, 30, 7 * SECOND, Message::Control);
        assert_eq!(
            plaintext_received(&mut conn, 7 * SECOND, 2 * SECOND),
            (true, Turn::ReplyStarted)
        );
        assert!(!is_outstanding(&conn));
        assert_eq!(
            (
                conn.exchanges,
                conn.recv_calls,
                conn.bytes_recv,
                conn.last_recv_ns
            ),
            (1, 2, 530, 7 * SECOND)
        );
        // More plaintext of the same reply: no new turn.
        assert_eq!(
            plaintext_received(&mut conn, 7 * SECOND + 5, 2 * SECOND),
            (false, Turn::Continued)
        );
    }

    #[test]
    fn only_tls_replies_wait_for_libssl() {
        use crate::message::proto;
        let server = ConnState {
            role: role::SERVER,
            proto: proto::TLS,
            ..Default::default()
        };
        assert!(
            !is_tls_client(&server),
            "a server's receives are its requests"
        );
        for protocol in [proto::UNKNOWN, proto::HTTP1, proto::HTTP2] {
            let client = ConnState {
                role: role::CLIENT,
                proto: protocol,
                ..Default::default()
            };
            assert!(!is_tls_client(&client), "{protocol}");
        }
        let stream = ConnState {
            role: role::CLIENT,
            proto: proto::TLS,
            flags: conn_flags::STREAM,
            ..Default::default()
        };
        assert!(!is_tls_client(&stream));
    }

    #[test]
    fn bytes_queued_before_the_request_are_no_reply() {
        // 500 bytes of session tickets sat unread when the request was sent.
        let mut queued = 500;
        assert!(received_before_request(&mut queued, 5), "a record header");
        assert!(
            received_before_request(&mut queued, 495),
            "its body and the next record"
        );
        assert_eq!(queued, 0);
        assert!(!received_before_request(&mut queued, 5), "then the reply");
        let mut queued = 500;
        assert!(
            !received_before_request(&mut queued, 600),
            "a read holding the tickets and part of the reply"
        );
        assert_eq!(queued, 0);
    }
}
