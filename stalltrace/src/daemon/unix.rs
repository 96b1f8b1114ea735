//! Unix connections: the names their first record carries, and their closes, which no
//! tracepoint reports. Every sweep re-reads some connections' kernel entries (watched ones,
//! stalled ones once a second, and an audit cycle through the whole table); for a Unix entry,
//! one test run of the kernel's `stalltrace_unix_alive` (~1 µs, no I/O) says whether its socket
//! was released. A released one is closed like a TCP connection reaching CLOSE: its entry's
//! final counters, dated when noticed (within a sweep of the close for a connection with a
//! request outstanding or a stall, within an audit cycle for an idle one).
//!
//! A client whose peer closed while its request was outstanding is judged as a TCP
//! client in `CLOSE_WAIT`: it can still complete only by reading a reply the peer left in its
//! receive queue; with nothing queued, its exchange ends (`transfer::can_complete`).
use stalltrace_common::{
    role, tcp_state, transfer, transport, verdict_flags, ConnEvent, ConnState, EventHeader,
    EventKind,
};

use super::Daemon;
use crate::probes::{Probes, UnixLiveness};

/// The kernel entry of `sock` as a sweep reads it; a Unix connection whose socket was released
/// is noted in `released` and returned as closing (so the sweep starts no stall on it).
pub(super) fn lookup(
    probes: &Probes,
    sock: u64,
    now: u64,
    released: &mut Vec<(u64, ConnState)>,
) -> Option<ConnState> {
    let state = snapshot(probes, sock, now)?;
    if state.transport == transport::UNIX && state.tcp_state == tcp_state::CLOSE {
        released.push((sock, state));
    }
    Some(state)
}

/// The kernel entry of `sock` as the verdict judges it at `now`: a released Unix socket is
/// closed (`CLOSE`), and a Unix client with a request outstanding whose peer will send nothing
/// more (released, or shut down for writing) is in TCP's `CLOSE_WAIT`, with
/// [`verdict_flags::REPLY_UNREAD_AT_PEER_FIN`] when what the peer sent still waits in its
/// receive queue. Dated `now`: Unix sockets report no close, so it is when the daemon noticed.
pub(super) fn snapshot(probes: &Probes, sock: u64, now: u64) -> Option<ConnState> {
    let mut state = probes.maps.lookup(sock)?;
    if state.transport != transport::UNIX {
        return Some(state);
    }
    // Only a client waiting for an answer is owed anything by its peer: ask for those alone.
    let ask_peer = state.role != role::SERVER && transfer::is_outstanding(&state);
    match probes.unix_liveness(sock, state.inode, ask_peer) {
        UnixLiveness::Released => {
            state.tcp_state = tcp_state::CLOSE;
            state.state_ns = now;
        }
        UnixLiveness::PeerClosed { unread } => {
            state.tcp_state = tcp_state::CLOSE_WAIT;
            state.state_ns = now;
            if unread {
                state.verdict_flags |= verdict_flags::REPLY_UNREAD_AT_PEER_FIN;
            }
        }
        UnixLiveness::Open | UnixLiveness::Unknown => {}
    }
    Some(state)
}

impl Daemon {
    /// Closes the Unix connections a sweep found released, and drops their kernel entries.
    pub(super) fn close_released_unix(
        &mut self,
        probes: &mut Probes,
        released: Vec<(u64, ConnState)>,
        now: u64,
    ) {
        for (sock, state) in released {
            // Unless the kernel already put a new socket's entry there.
            if probes
                .maps
                .lookup(sock)
                .is_some_and(|current| current.inode == state.inode)
            {
                probes.maps.forget(sock);
            }
            let closed = ConnEvent {
                header: EventHeader {
                    kind: EventKind::Closed as u32,
                    _pad: 0,
                    ts_ns: now,
                    sock,
                },
                conn: state,
            };
            self.tracker.on_event(&closed, &mut self.out);
            self.sample_exchange(&closed, None);
        }
    }
}
