//! Blame chains: from a stalled connection to what it waits on. Built on the event loop from
//! what the worker already found: lookups only, no I/O. Each step follows the strongest
//! evidence there is:
//!
//! - **fd**: the thread behind the stall is blocked in a syscall on a socket: that connection;
//! - **peer**: a client connection's other end, when it is local;
//! - **timing** (+ **signature**): a server whose thread waits on everything at once (an event
//!   loop in epoll, poll or select) has no fd to follow. Its process sending a request that is
//!   now stalled shortly after it read its own stalled request links the two: when the two
//!   requests have the same signature (a proxied path, a forwarded query), when the same
//!   thread sent it, or when it is the only such request; never a guess between several. Only
//!   stalled connections are candidates, so healthy requests through the same process are
//!   never blamed.
use std::collections::HashMap;

use stalltrace_core::{
    diagnosis::{BlameLink, Evidence, ThreadVerdict},
    tracker::{model::Role, Conn, Tracker},
};

/// Links followed at most in a blame chain.
const MAX_BLAME: usize = 8;
/// An outbound request sent this long at most after the inbound one was read can be what the
/// inbound one waits on (ns).
pub(super) const LINK_WINDOW_NS: u64 = 2_000_000_000;

/// A stalled outbound (client) request, a candidate for what an inbound one waits on.
pub(super) struct Outbound {
    pub(super) conn: u64,
    pub(super) tid: u32,
    /// When it was sent (the stall's quiet start).
    pub(super) sent_ns: u64,
    pub(super) signature: Option<String>,
}

/// The stalled outbound requests of each process, and the request signature of every stall.
#[derive(Default)]
pub(super) struct Outbounds {
    pub(super) by_pid: HashMap<u32, Vec<Outbound>>,
    pub(super) signatures: HashMap<u64, String>,
}

/// Follows the stall from `conn` (whose thread verdict is `verdict`) to what it waits on.
/// `verdict_of` gives the latest verdict on the thread behind another connection, when one is
/// known. Empty when nothing is behind it.
pub(super) fn blame_chain(
    conn: &Conn,
    verdict: Option<ThreadVerdict>,
    tracker: &Tracker,
    outbounds: &Outbounds,
    verdict_of: impl Fn(&Conn) -> Option<ThreadVerdict>,
) -> Vec<BlameLink> {
    let mut chain = vec![link(conn, None, None)];
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
                (next, via, Evidence::Fd)
            }),
            (_, Role::Client) => tracker
                .find_by_endpoints(&current.endpoints.reversed())
                .map(|(_, next)| (next, "peer".to_owned(), Evidence::Peer)),
            (Some(ThreadVerdict::Waiting { syscall }), Role::Server) if is_event_loop(syscall) => {
                outbound_of(current, outbounds).and_then(|(id, via, evidence)| {
                    tracker
                        .find_by_id(id)
                        .map(|(_, next)| (next, via, evidence))
                })
            }
            _ => None,
        };
        let Some((next, via, evidence)) = next else {
            break;
        };
        if chain.iter().any(|l| l.conn == next.id) {
            break;
        }
        chain.push(link(next, Some(via), Some(evidence)));
        verdict = verdict_of(next);
        current = next;
    }
    if chain.len() == 1 {
        chain.clear();
    }
    chain
}

/// The waits of an event loop: the thread parks on all its connections at once.
fn is_event_loop(syscall: &str) -> bool {
    matches!(
        syscall,
        "epoll_wait" | "epoll_pwait" | "epoll_pwait2" | "poll" | "ppoll" | "select" | "pselect6"
    )
}

/// The stalled outbound request that the stalled inbound request on `server` waits on: sent by
/// the same process within [`LINK_WINDOW_NS`] after the inbound one was read, and singled out
/// by the same signature, else by the same thread, else by being the only one.
fn outbound_of(server: &Conn, outbounds: &Outbounds) -> Option<(u64, String, Evidence)> {
    let read_ns = server.stall.as_ref()?.quiet_since_ns;
    let signature = outbounds.signatures.get(&server.id);
    let candidates: Vec<&Outbound> = outbounds
        .by_pid
        .get(&server.owner.pid)?
        .iter()
        .filter(|out| out.sent_ns >= read_ns && out.sent_ns - read_ns <= LINK_WINDOW_NS)
        .collect();
    let single = |keep: &dyn Fn(&Outbound) -> bool| {
        let mut kept = candidates.iter().filter(|out| keep(out));
        match (kept.next(), kept.next()) {
            (Some(one), None) => Some(*one),
            _ => None,
        }
    };
    let (best, evidence, how) = if let Some(out) =
        single(&|out| signature.is_some() && out.signature.as_ref() == signature)
    {
        (out, Evidence::TimingAndSignature, ", the same request")
    } else if let Some(out) = single(&|out| out.tid == server.owner.tid) {
        (out, Evidence::Timing, " by the same thread")
    } else {
        (single(&|_| true)?, Evidence::Timing, ", the only one")
    };
    let gap_ms = (best.sent_ns - read_ns) as f64 / 1e6;
    let via = format!("sent {gap_ms:.1} ms after the request was read{how}");
    Some((best.conn, via, evidence))
}

fn link(conn: &Conn, via: Option<String>, evidence: Option<Evidence>) -> BlameLink {
    BlameLink {
        conn: conn.id,
        role: conn.role,
        stall: conn.stall.as_ref().map(|s| s.kind),
        pid: (conn.owner.pid != 0).then_some(conn.owner.pid),
        executable: (conn.owner.pid != 0).then(|| conn.owner.comm.as_str().into_owned()),
        local: conn.endpoints.local_addr(),
        peer: conn.endpoints.peer_addr(),
        via,
        evidence,
    }
}
