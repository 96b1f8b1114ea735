//! Blame chains: from a stalled connection to what it waits on — the connection its thread is
//! blocked on (followed through the fd), then that connection's local peer, and so on. Built on
//! the event loop from what the worker already found: lookups only, no I/O.
use stalltrace_core::{
    diagnosis::{BlameLink, ThreadVerdict},
    tracker::{model::Role, Conn, Tracker},
};

/// Links followed at most in a blame chain.
const MAX_BLAME: usize = 8;

/// Follows the stall from `conn` (whose thread verdict is `verdict`) to what it waits on.
/// `verdict_of` gives the latest verdict on the thread behind another connection, when one is
/// known. Empty when nothing is behind it.
pub(super) fn blame_chain(
    conn: &Conn,
    verdict: Option<ThreadVerdict>,
    tracker: &Tracker,
    verdict_of: impl Fn(&Conn) -> Option<ThreadVerdict>,
) -> Vec<BlameLink> {
    let mut chain = vec![link(conn, None)];
    let mut current = conn;
    let mut verdict = verdict;
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
        verdict = verdict_of(next);
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
