//! Transfer accounting: what one send or receive does to a connection's [`ConnState`].
//!
//! Written once for both sides: the kernel programs run it on every transfer, and the
//! tracker's tests run it on their model of the kernel, so the two cannot drift apart. Keep it
//! cheap and branch-light: it is on the hot path of every socket call.
use crate::{direction, role, ConnState};

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

/// A request is outstanding: the last transfer went in the request direction.
#[inline(always)]
pub fn is_outstanding(conn: &ConnState) -> bool {
    conn.last_dir != direction::NONE && conn.last_dir == request_direction(conn)
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

/// A transfer in direction `dir` at `now` would end a quiet stretch of at least the threshold:
/// the stall (reported or not yet swept) ends with it. Call before [`record_transfer`].
#[inline(always)]
pub fn ends_quiet(conn: &ConnState, dir: u8, now: u64, stall_after_ns: u64) -> bool {
    conn.last_dir != dir && quiet_past_threshold(conn, now, stall_after_ns)
}

/// Records a transfer of `bytes` in direction `dir` ([`direction::IN`] or
/// [`direction::OUT`]) at `now` (ns): counters, last-transfer times and the request/reply
/// turn. A zeroed entry (a connection first seen through its traffic) is set up correctly.
///
/// Counters are plain increments: sends and receives touch different fields, and two threads
/// sending on one socket in the same instant is rare enough that a lost count is acceptable
/// (the BPF target's `core` has no atomic read-modify-write on stable Rust).
#[inline(always)]
pub fn record_transfer(conn: &mut ConnState, dir: u8, bytes: u64, now: u64) -> Turn {
    if dir == direction::IN {
        conn.bytes_recv += bytes;
        conn.recv_calls += 1;
        conn.last_recv_ns = now;
    } else {
        conn.bytes_sent += bytes;
        conn.send_calls += 1;
        conn.last_send_ns = now;
    }
    let previous = conn.last_dir;
    if previous == dir {
        return Turn::Continued;
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

#[cfg(test)]
mod tests {
    use super::*;

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
            record_transfer(&mut conn, direction::IN, 10, 1),
            Turn::RequestStarted
        );
        assert!(is_outstanding(&conn));
        assert_eq!(
            record_transfer(&mut conn, direction::IN, 5, 2),
            Turn::Continued
        );
        assert_eq!(last_request_ns(&conn), 2);
        assert_eq!(
            record_transfer(&mut conn, direction::OUT, 20, 3),
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
            record_transfer(&mut conn, direction::OUT, 5, 1),
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
        record_transfer(&mut conn, direction::OUT, 10, 100);
        assert!(is_outstanding(&conn));
        assert!(!quiet_past_threshold(&conn, 150, 100));
        assert!(quiet_past_threshold(&conn, 200, 100));
        assert!(ends_quiet(&conn, direction::IN, 200, 100));
        assert!(
            !ends_quiet(&conn, direction::OUT, 200, 100),
            "more request bytes"
        );
    }
}
