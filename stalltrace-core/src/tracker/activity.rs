//! What a kernel snapshot says about a connection's exchange (its [`Activity`]), as pure
//! functions.
//!
//! The rules, per role:
//! - a server whose last transfer was inbound (a request) has a reply outstanding;
//! - a client whose last transfer was outbound (a request) has a reply outstanding;
//! - otherwise the last exchange completed: the connection is idle, however long it stays open
//!   (keep-alive), and is never a stall.
//!
//! A connection is *quiet* for as long as nothing moved in the request direction; an outstanding
//! exchange quiet for the threshold is a stall. A half-closed connection is judged like an
//! open one for as long as its open side can still complete the exchange
//! (`transfer::can_complete`): a client that sent its request and then its FIN still awaits the
//! reply, and the server that read both still owes it.
//!
//! An HTTP/2 connection whose streams the kernel follows (`stalltrace_common::http2`) is judged
//! per stream instead: outstanding while a stream awaits its response, quiet since that stream
//! opened (the oldest such stream), whatever the connection's other streams carry.
use stalltrace_common::{
    conn_flags, direction, http2, message::proto, tcp_state, transfer, ConnState,
};

use super::model::{Resolution, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// The handshake of an active open has not completed; `since` is when connect() began.
    ConnectPending { since: u64 },
    /// A request awaits its reply; `quiet_since` is the last transfer in the request direction.
    Outstanding { quiet_since: u64 },
    /// HTTP/1.x: a response started and its framing says more of it is owed; `quiet_since` is
    /// the last transfer in the reply direction (see [`super::framing`]).
    ResponseIncomplete { quiet_since: u64 },
    /// No exchange outstanding.
    Idle,
    /// The connection left ESTABLISHED at `at` (FIN either way, or reset).
    Ending { at: u64, how: Resolution },
}

impl Activity {
    /// True while something is owed (a handshake, a reply, the rest of a response): what the
    /// sweeps keep re-reading.
    pub fn is_busy(self) -> bool {
        matches!(
            self,
            Self::Outstanding { .. }
                | Self::ConnectPending { .. }
                | Self::ResponseIncomplete { .. }
        )
    }
}

pub fn role_of(state: &ConnState) -> Role {
    Role::from_kernel(state.role)
}

/// When the request direction last moved: the start of the current quiet stretch if a request
/// is outstanding (the kernel programs' rule, `stalltrace_common::transfer`).
pub fn last_request_ns(state: &ConnState) -> u64 {
    transfer::last_request_ns(state)
}

/// When the reply direction last moved.
pub fn last_reply_ns(state: &ConnState) -> u64 {
    if transfer::request_direction(state) == direction::IN {
        state.last_send_ns
    } else {
        state.last_recv_ns
    }
}

/// Bytes moved in the reply direction.
pub fn reply_bytes(state: &ConnState) -> u64 {
    if transfer::request_direction(state) == direction::IN {
        state.bytes_sent
    } else {
        state.bytes_recv
    }
}

/// How a connection that left ESTABLISHED ended.
pub fn ending(state: &ConnState) -> Resolution {
    if state.flags & (conn_flags::PEER_RESET | conn_flags::ABORTED) != 0 {
        Resolution::Reset
    } else {
        Resolution::Closed
    }
}

/// The kernel follows this HTTP/2 connection's streams (`stalltrace_common::http2`): it is
/// judged per stream, not by the direction of its last transfer.
pub fn http2_tracking(state: &ConnState) -> bool {
    http2::tracking(state)
}

/// Bytes left unread in this connection's receive queue may be a request: not on an HTTP/2
/// connection (its preface read). Peers send control frames on idle connections (PING,
/// SETTINGS ACK, WINDOW_UPDATE), and without reading them nothing tells those from a new
/// stream's HEADERS; a stream already read and awaiting is the sweep's to judge. A server
/// that stops reading between streams is then flagged on the client's end only.
pub fn unread_may_be_request(state: &ConnState) -> bool {
    state.proto != proto::HTTP2
}

/// HTTP/2 with its streams followed: the oldest stream awaiting its response, if any.
pub fn http2_stream(state: &ConnState) -> Option<u32> {
    (http2::tracking(state) && state.h2_open > 0).then_some(state.h2_oldest_stream)
}

pub fn assess(state: &ConnState) -> Activity {
    match state.tcp_state {
        tcp_state::SYN_SENT => Activity::ConnectPending {
            since: state.open_ns,
        },
        open if transfer::can_complete(state, open) && http2::tracking(state) => {
            // Per stream: one awaiting its response is outstanding since it was opened,
            // whatever the other streams carry; none, and the channel is idle.
            match http2_stream(state) {
                Some(_) => Activity::Outstanding {
                    quiet_since: state.h2_oldest_ns,
                },
                None => Activity::Idle,
            }
        }
        open if transfer::can_complete(state, open) => {
            if transfer::is_outstanding(state) {
                Activity::Outstanding {
                    quiet_since: last_request_ns(state),
                }
            } else {
                Activity::Idle
            }
        }
        _ => Activity::Ending {
            at: state.state_ns,
            how: ending(state),
        },
    }
}

/// What the socket itself says of the exchange on a connection the daemon adopted (open before
/// it started: the kernel programs have seen none of its traffic yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptedExchange {
    /// Nothing tells: shown as `unknown`, judged from its next transfer on.
    Unknown,
    /// The last data went the reply way (or none went either way): nothing is owed.
    Completed,
    /// The last data went the request way, at `since` (ns), and nothing came back since; or,
    /// on a server, a request waits unread in the receive queue.
    Outstanding { since: u64 },
}

/// The socket's counters at adoption, from sock_diag (`tcp_info`): bytes waiting unread,
/// milliseconds since data was last received and sent (since the handshake if none was;
/// `None`: unknown), data segments received and sent, when the kernel reports them, whether
/// the peer's FIN came (the socket in `CLOSE_WAIT`) and whether this end sent its own
/// (`FIN_WAIT1`, `FIN_WAIT2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketHistory {
    pub recv_queue: u32,
    pub peer_closed: bool,
    pub closed_here: bool,
    pub last_data_recv_ms: Option<u32>,
    pub last_data_sent_ms: Option<u32>,
    pub data_segs_in: Option<u32>,
    pub data_segs_out: Option<u32>,
}

/// The direction rule applied to the socket's own history, at `now` (ns): whichever way data
/// last went decides, as for a connection the kernel followed. Data that went the request way
/// only (no data segment the other way) is a request never answered. The kernel keeps the
/// times in milliseconds (jiffies), counted from the handshake before any data: otherwise,
/// data both ways within the same millisecond cannot be ordered and is `Unknown`. The
/// half-close rules (docs/events.md, half-closed connections), as for a connection the kernel
/// followed: a client whose server closed has nothing left to wait for but what sits unread,
/// a server that sent its FIN can answer nothing more, and a server whose client half-closed
/// still owes its reply.
pub fn infer_adopted(role: Role, history: &SocketHistory, now: u64) -> AdoptedExchange {
    let at = |ms: u32| now.saturating_sub(u64::from(ms) * 1_000_000);
    let done = match role {
        Role::Server => history.closed_here,
        Role::Client => history.peer_closed && history.recv_queue == 0,
    };
    if done {
        return AdoptedExchange::Completed;
    }
    let (request, reply, segs) = match role {
        Role::Server => (
            history.last_data_recv_ms,
            history.last_data_sent_ms,
            history.data_segs_in.zip(history.data_segs_out),
        ),
        _ => (
            history.last_data_sent_ms,
            history.last_data_recv_ms,
            history.data_segs_out.zip(history.data_segs_in),
        ),
    };
    match segs {
        Some((0, _)) => return AdoptedExchange::Completed,
        Some((_, 0)) => {
            return request.map_or(AdoptedExchange::Unknown, |asked| {
                AdoptedExchange::Outstanding { since: at(asked) }
            })
        }
        _ => {}
    }
    // A request sits unread: whatever was sent before, it is owed an answer.
    if role == Role::Server && history.recv_queue > 0 {
        return match request {
            Some(ms) => AdoptedExchange::Outstanding { since: at(ms) },
            None => AdoptedExchange::Unknown,
        };
    }
    match (request, reply) {
        (None, _) => AdoptedExchange::Completed,
        (Some(asked), None) => AdoptedExchange::Outstanding { since: at(asked) },
        (Some(asked), Some(answered)) if asked < answered => {
            AdoptedExchange::Outstanding { since: at(asked) }
        }
        (Some(asked), Some(answered)) if asked == answered => AdoptedExchange::Unknown,
        _ => AdoptedExchange::Completed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stalltrace_common::role;

    fn conn(role_id: u8, last_dir: u8) -> ConnState {
        ConnState {
            role: role_id,
            tcp_state: tcp_state::ESTABLISHED,
            last_dir,
            last_recv_ns: 100,
            last_send_ns: 200,
            ..Default::default()
        }
    }

    #[test]
    fn server_that_read_last_owes_a_reply() {
        assert_eq!(
            assess(&conn(role::SERVER, direction::IN)),
            Activity::Outstanding { quiet_since: 100 }
        );
        assert_eq!(assess(&conn(role::SERVER, direction::OUT)), Activity::Idle);
    }

    #[test]
    fn client_that_sent_last_awaits_a_reply() {
        assert_eq!(
            assess(&conn(role::CLIENT, direction::OUT)),
            Activity::Outstanding { quiet_since: 200 }
        );
        assert_eq!(assess(&conn(role::CLIENT, direction::IN)), Activity::Idle);
    }

    #[test]
    fn a_fresh_connection_is_idle() {
        assert_eq!(assess(&conn(role::SERVER, direction::NONE)), Activity::Idle);
        assert_eq!(assess(&conn(role::CLIENT, direction::NONE)), Activity::Idle);
    }

    #[test]
    fn syn_sent_is_a_pending_connect() {
        let mut state = conn(role::CLIENT, direction::NONE);
        state.tcp_state = tcp_state::SYN_SENT;
        state.open_ns = 42;
        assert_eq!(assess(&state), Activity::ConnectPending { since: 42 });
    }

    #[test]
    fn a_half_closed_exchange_is_still_outstanding_on_its_open_side() {
        let mut client = conn(role::CLIENT, direction::OUT);
        client.tcp_state = tcp_state::FIN_WAIT2;
        assert_eq!(assess(&client), Activity::Outstanding { quiet_since: 200 });
        let mut server = conn(role::SERVER, direction::IN);
        server.tcp_state = tcp_state::CLOSE_WAIT;
        assert_eq!(assess(&server), Activity::Outstanding { quiet_since: 100 });
        server.last_dir = direction::OUT;
        assert_eq!(assess(&server), Activity::Idle);
    }

    #[test]
    fn a_client_the_peer_closed_on_waits_only_for_a_reply_left_unread() {
        let mut client = conn(role::CLIENT, direction::OUT);
        client.tcp_state = tcp_state::CLOSE_WAIT;
        client.state_ns = 700;
        assert_eq!(
            assess(&client),
            Activity::Ending {
                at: 700,
                how: Resolution::Closed
            },
            "the server died after reading: nothing can answer"
        );
        client.verdict_flags = stalltrace_common::verdict_flags::REPLY_UNREAD_AT_PEER_FIN;
        assert_eq!(
            assess(&client),
            Activity::Outstanding { quiet_since: 200 },
            "the reply came with the FIN: it is there to read"
        );
        client.last_dir = direction::IN;
        assert_eq!(assess(&client), Activity::Idle, "read");
    }

    #[test]
    fn adopted_connections_are_judged_from_the_sockets_own_history() {
        let now = 100_000_000_000;
        let history = |recv_queue, recv, sent| SocketHistory {
            recv_queue,
            last_data_recv_ms: recv,
            last_data_sent_ms: sent,
            ..SocketHistory::default()
        };
        let since = |ms: u64| AdoptedExchange::Outstanding {
            since: now - ms * 1_000_000,
        };
        // A server that read a request 30 s ago and has answered nothing since.
        assert_eq!(
            infer_adopted(Role::Server, &history(0, Some(30_000), Some(90_000)), now),
            since(30_000)
        );
        assert_eq!(
            infer_adopted(Role::Server, &history(0, Some(30_000), None), now),
            since(30_000)
        );
        // The same server after it answered: keep-alive.
        assert_eq!(
            infer_adopted(Role::Server, &history(0, Some(30_000), Some(29_000)), now),
            AdoptedExchange::Completed
        );
        // A request nobody read, behind an answered one.
        assert_eq!(
            infer_adopted(Role::Server, &history(40, Some(5_000), Some(1_000)), now),
            since(5_000)
        );
        // A client waiting since its request; and one whose answer came.
        assert_eq!(
            infer_adopted(Role::Client, &history(0, Some(60_000), Some(20_000)), now),
            since(20_000)
        );
        assert_eq!(
            infer_adopted(Role::Client, &history(0, Some(19_000), Some(20_000)), now),
            AdoptedExchange::Completed
        );
        // No data yet either way, and data both ways in the same millisecond.
        assert_eq!(
            infer_adopted(Role::Client, &history(0, None, None), now),
            AdoptedExchange::Completed
        );
        assert_eq!(
            infer_adopted(Role::Client, &history(0, Some(7), Some(7)), now),
            AdoptedExchange::Unknown
        );
        // Handshake, request and read within one millisecond: the segments tell.
        let segments = |data_in, data_out| SocketHistory {
            data_segs_in: Some(data_in),
            data_segs_out: Some(data_out),
            ..history(0, Some(7), Some(7))
        };
        assert_eq!(infer_adopted(Role::Server, &segments(1, 0), now), since(7));
        assert_eq!(infer_adopted(Role::Client, &segments(0, 1), now), since(7));
        assert_eq!(
            infer_adopted(Role::Client, &segments(0, 0), now),
            AdoptedExchange::Completed,
            "nothing asked"
        );
        assert_eq!(
            infer_adopted(Role::Client, &segments(3, 3), now),
            AdoptedExchange::Unknown,
            "answered before, the order unknown"
        );
    }

    #[test]
    fn adopted_half_closed_connections_follow_the_half_close_rules() {
        let now = 100_000_000_000;
        let closed = |recv_queue| SocketHistory {
            recv_queue,
            peer_closed: true,
            last_data_recv_ms: Some(60_000),
            last_data_sent_ms: Some(20_000),
            ..SocketHistory::default()
        };
        let outstanding = AdoptedExchange::Outstanding {
            since: now - 20_000_000_000,
        };
        // A client whose server closed after its request: nothing will come.
        assert_eq!(
            infer_adopted(Role::Client, &closed(0), now),
            AdoptedExchange::Completed
        );
        // Unless something sits unread: it still awaits its read.
        assert_eq!(infer_adopted(Role::Client, &closed(30), now), outstanding);
        // A server whose client sent a request and its FIN still owes the reply.
        let server = SocketHistory {
            last_data_recv_ms: Some(20_000),
            last_data_sent_ms: Some(60_000),
            ..closed(0)
        };
        assert_eq!(infer_adopted(Role::Server, &server, now), outstanding);
        // A server that read the request and sent its own FIN, no reply: it can answer
        // nothing more (`closing` when the kernel follows it).
        let shut = SocketHistory {
            peer_closed: false,
            closed_here: true,
            ..server
        };
        assert_eq!(
            infer_adopted(Role::Server, &shut, now),
            AdoptedExchange::Completed
        );
        // A client that sent its request and its FIN still awaits the reply.
        let client = SocketHistory {
            peer_closed: false,
            closed_here: true,
            ..closed(0)
        };
        assert_eq!(infer_adopted(Role::Client, &client, now), outstanding);
    }

    #[test]
    fn leaving_established_is_an_ending_with_its_cause() {
        let mut state = conn(role::SERVER, direction::IN);
        state.tcp_state = tcp_state::LAST_ACK;
        state.state_ns = 900;
        assert_eq!(
            assess(&state),
            Activity::Ending {
                at: 900,
                how: Resolution::Closed
            }
        );
        state.tcp_state = tcp_state::CLOSE;
        state.flags |= conn_flags::PEER_RESET;
        assert_eq!(
            assess(&state),
            Activity::Ending {
                at: 900,
                how: Resolution::Reset
            }
        );
        state.flags = conn_flags::ABORTED;
        assert_eq!(ending(&state), Resolution::Reset);
    }
}
