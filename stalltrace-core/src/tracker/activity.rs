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
use stalltrace_common::{conn_flags, direction, http2, tcp_state, transfer, ConnState};

use super::model::{Resolution, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// The handshake of an active open has not completed; `since` is when connect() began.
    ConnectPending { since: u64 },
    /// A request awaits its reply; `quiet_since` is the last transfer in the request direction.
    Outstanding { quiet_since: u64 },
    /// No exchange outstanding.
    Idle,
    /// The connection left ESTABLISHED at `at` (FIN either way, or reset).
    Ending { at: u64, how: Resolution },
}

pub fn role_of(state: &ConnState) -> Role {
    Role::from_kernel(state.role)
}

/// When the request direction last moved: the start of the current quiet stretch if a request
/// is outstanding (the kernel programs' rule, `stalltrace_common::transfer`).
pub fn last_request_ns(state: &ConnState) -> u64 {
    transfer::last_request_ns(state)
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

/// HTTP/2 with its streams followed: the oldest stream awaiting its response, if any.
pub fn http2_stream(state: &ConnState) -> Option<u32> {
    (http2::tracking(state) && state.h2_open > 0).then_some(state.h2_oldest_stream)
}

/// When the reply direction last moved (ns).
pub fn last_reply_ns(state: &ConnState) -> u64 {
    if transfer::request_direction(state) == direction::IN {
        state.last_send_ns
    } else {
        state.last_recv_ns
    }
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
