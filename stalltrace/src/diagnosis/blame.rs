//! Blame chains: from a stalled connection to what it waits on — the connection its thread is
//! blocked on (followed through the fd), then that connection's local peer, and so on.
use stalltrace_core::{
    diagnosis::{BlameLink, ThreadVerdict},
    tracker::{
        model::{Endpoints, Role},
        Conn, Tracker,
    },
};

use super::gather::thread_report;
use crate::sources::threads::FdTarget;

/// Links followed at most in a blame chain.
const MAX_BLAME: usize = 8;

/// The tracked connection a socket fd refers to.
pub(super) fn socket_conn(target: &FdTarget, tracker: &Tracker) -> Option<u64> {
    let FdTarget::Socket {
        local: Some(local),
        peer: Some(peer),
        ..
    } = target
    else {
        return None;
    };
    tracker
        .find_by_endpoints(&Endpoints::from_socket_addrs(*local, *peer))
        .map(|(_, c)| c.id)
}

/// Follows the stall from `conn` to what it waits on: the connection its thread is blocked
/// reading, then that connection's local peer, and so on. Empty when nothing is behind it.
pub(super) fn blame_chain(
    conn: &Conn,
    verdict: Option<&ThreadVerdict>,
    tracker: &Tracker,
) -> Vec<BlameLink> {
    let mut chain = vec![link(conn, None)];
    let mut current = conn;
    let mut verdict = verdict.cloned();
    while chain.len() < MAX_BLAME {
        let next = match (&verdict, current.role) {
            (
                Some(ThreadVerdict::Blocked {
                    syscall,
                    fd: Some(fd),
                    fd_conn: Some(id),
                    ..
                }),
                _,
            ) => tracker.find_by_id(*id).map(|(_, next)| {
                let via = format!("thread {} blocked in {syscall}(fd {fd})", current.owner.tid);
                (next, via)
            }),
            (_, Role::Client) => tracker
                .find_by_endpoints(&current.endpoints.reversed())
                .map(|(_, next)| (next, "peer".to_owned())),
            _ => None,
        };
        let Some((next, via)) = next else {
            break;
        };
        if chain.iter().any(|l| l.conn == next.id) {
            break;
        }
        chain.push(link(next, Some(via)));
        verdict = thread_report(next, tracker, None).0.map(|t| t.verdict);
        current = next;
    }
    if chain.len() == 1 {
        chain.clear();
    }
    chain
}

fn link(conn: &Conn, via: Option<String>) -> BlameLink {
    BlameLink {
        conn: conn.id,
        role: conn.role,
        stall: conn.stall.as_ref().map(|s| s.kind),
        pid: (conn.owner.pid != 0).then_some(conn.owner.pid),
        executable: (conn.owner.pid != 0).then(|| conn.owner.comm.as_str().into_owned()),
        local: conn.endpoints.local_addr(),
        peer: conn.endpoints.peer_addr(),
        via,
    }
}
