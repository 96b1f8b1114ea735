//! Blame chains: from a stalled connection to what it waits on. Built on the event loop from
//! what the worker already found: lookups only, no I/O. Each step follows the strongest
//! evidence there is:
//!
//! - **fd**: the thread behind the stall is blocked in a syscall on a socket: that connection;
//! - **peer**: a client connection's other end, when it is local;
//! - **timing** (+ **signature**): a server whose thread waits on everything at once (an event
//!   loop in epoll, poll or select) has no fd to follow. Its process sending a request that is
//!   now stalled shortly after it read its own stalled request links the two, one outbound
//!   request to one inbound request: first those with the same signature (a proxied path, a
//!   forwarded query), in order (the first read to the first sent); then, for the rest, an
//!   outbound request no other inbound one took, if it is the only one left. Never a guess
//!   between several. Only stalled requests take part, so healthy requests through the same
//!   process are never blamed.
use std::collections::HashMap;

use stalltrace_core::{
    diagnosis::{BlameLink, Evidence, ThreadVerdict},
    tracker::{
        model::{Role, Transport},
        Conn, Tracker,
    },
};

/// Links followed at most in a blame chain.
const MAX_BLAME: usize = 8;
/// An outbound request sent this long at most after the inbound one was read can be what the
/// inbound one waits on (ns).
pub(super) const LINK_WINDOW_NS: u64 = 2_000_000_000;

/// A stalled request of an event loop's process: inbound (read at `at_ns`) or outbound (sent
/// at `at_ns`).
pub(super) struct Request {
    pub(super) conn: u64,
    pub(super) at_ns: u64,
    pub(super) signature: Option<String>,
}

/// What each event loop's stalled inbound request waits on, by inbound connection id.
#[derive(Default)]
pub(super) struct Links {
    by_inbound: HashMap<u64, Link>,
}

struct Link {
    outbound: u64,
    evidence: Evidence,
    gap_ns: u64,
}

impl Links {
    /// Pairs each process's stalled inbound requests (read by an event loop) with its stalled
    /// outbound requests, one to one: by signature first, in order, then by being the only
    /// outbound request left in the window.
    pub(super) fn assign(
        inbound: HashMap<u32, Vec<Request>>,
        mut outbound: HashMap<u32, Vec<Request>>,
    ) -> Self {
        let mut links = Self::default();
        for (pid, mut inbound) in inbound {
            let Some(outbound) = outbound.get_mut(&pid) else {
                continue;
            };
            inbound.sort_by_key(|r| r.at_ns);
            outbound.sort_by_key(|r| r.at_ns);
            let mut claimed = vec![false; outbound.len()];
            let in_window = |read: &Request, sent: &Request| {
                sent.at_ns >= read.at_ns && sent.at_ns - read.at_ns <= LINK_WINDOW_NS
            };
            for read in &inbound {
                let same = read.signature.as_ref().and_then(|signature| {
                    (0..outbound.len()).find(|&j| {
                        !claimed[j]
                            && in_window(read, &outbound[j])
                            && outbound[j].signature.as_ref() == Some(signature)
                    })
                });
                if let Some(j) = same {
                    claimed[j] = true;
                    links.add(read, &outbound[j], Evidence::TimingAndSignature);
                }
            }
            for read in &inbound {
                if links.by_inbound.contains_key(&read.conn) {
                    continue;
                }
                let mut left =
                    (0..outbound.len()).filter(|&j| !claimed[j] && in_window(read, &outbound[j]));
                if let (Some(j), None) = (left.next(), left.next()) {
                    claimed[j] = true;
                    links.add(read, &outbound[j], Evidence::Timing);
                }
            }
        }
        links
    }

    fn add(&mut self, read: &Request, sent: &Request, evidence: Evidence) {
        let link = Link {
            outbound: sent.conn,
            evidence,
            gap_ns: sent.at_ns - read.at_ns,
        };
        self.by_inbound.insert(read.conn, link);
    }

    /// The outbound connection the inbound one `conn` waits on, how that is known, and the
    /// words for people.
    fn of(&self, conn: u64) -> Option<(u64, String, Evidence)> {
        let link = self.by_inbound.get(&conn)?;
        let how = match link.evidence {
            Evidence::TimingAndSignature => ", the same request",
            _ => ", the only one left",
        };
        let via = format!(
            "sent {:.1} ms after the request was read{how}",
            link.gap_ns as f64 / 1e6
        );
        Some((link.outbound, via, link.evidence))
    }
}

/// Follows the stall from `conn` (whose thread verdict is `verdict`) to what it waits on.
/// `verdict_of` gives the latest verdict on the thread behind another connection, when one is
/// known. Empty when nothing is behind it.
pub(super) fn blame_chain(
    conn: &Conn,
    verdict: Option<ThreadVerdict>,
    tracker: &Tracker,
    links: &Links,
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
                links.of(current.id).and_then(|(id, via, evidence)| {
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
pub(super) fn is_event_loop(syscall: &str) -> bool {
    matches!(
        syscall,
        "epoll_wait" | "epoll_pwait" | "epoll_pwait2" | "poll" | "ppoll" | "select" | "pselect6"
    )
}

fn link(conn: &Conn, via: Option<String>, evidence: Option<Evidence>) -> BlameLink {
    let (local, peer) = match (conn.unix(), conn.endpoints.transport) {
        (Some(unix), _) => (unix.local_name.clone(), unix.peer_name.clone()),
        // Its names were lost with its first record: no address to show.
        (None, Transport::Unix) => (String::new(), String::new()),
        (None, _) => (
            conn.endpoints.local_addr().to_string(),
            conn.endpoints.peer_addr().to_string(),
        ),
    };
    BlameLink {
        conn: conn.id,
        role: conn.role,
        stall: conn.stall.as_ref().map(|s| s.kind),
        pid: (conn.owner.pid != 0).then_some(conn.owner.pid),
        executable: (conn.owner.pid != 0).then(|| conn.owner.comm.as_str().into_owned()),
        local,
        peer,
        via,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn request(conn: u64, at_ms: u64, signature: Option<&str>) -> Request {
        Request {
            conn,
            at_ns: at_ms * MS,
            signature: signature.map(str::to_owned),
        }
    }

    fn links(inbound: Vec<Request>, outbound: Vec<Request>) -> Links {
        Links::assign(
            HashMap::from([(7, inbound)]),
            HashMap::from([(7, outbound)]),
        )
    }

    fn target(links: &Links, conn: u64) -> Option<(u64, Evidence)> {
        links.of(conn).map(|(out, _, evidence)| (out, evidence))
    }

    #[test]
    fn identical_requests_are_paired_in_order() {
        let sig = Some("GET /slow/orders/{id}");
        let links = links(
            vec![request(1, 0, sig), request(2, 300, sig)],
            vec![request(11, 1, sig), request(12, 301, sig)],
        );
        assert_eq!(target(&links, 1), Some((11, Evidence::TimingAndSignature)));
        assert_eq!(target(&links, 2), Some((12, Evidence::TimingAndSignature)));
    }

    #[test]
    fn an_outbound_request_taken_by_its_own_inbound_one_is_not_blamed_for_another() {
        // /internal waits on nothing upstream; /api/pay's upstream request is its own.
        let links = links(
            vec![
                request(1, 0, Some("GET /internal/report")),
                request(2, 500, Some("GET /api/pay")),
            ],
            vec![request(12, 509, Some("GET /api/pay"))],
        );
        assert_eq!(target(&links, 2), Some((12, Evidence::TimingAndSignature)));
        assert_eq!(target(&links, 1), None);
    }

    #[test]
    fn a_different_protocol_upstream_is_linked_only_when_it_is_the_only_one() {
        let query = Some("postgresql Query SELECT");
        let one = links(
            vec![request(1, 0, Some("GET /checkout"))],
            vec![request(11, 2, query)],
        );
        assert_eq!(target(&one, 1), Some((11, Evidence::Timing)));
        let two = links(
            vec![request(1, 0, Some("GET /checkout"))],
            vec![request(11, 2, query), request(12, 3, query)],
        );
        assert_eq!(target(&two, 1), None, "never a guess between several");
    }

    #[test]
    fn requests_sent_before_the_read_or_long_after_are_not_candidates() {
        let links = links(
            vec![request(1, 1_000, None)],
            vec![request(11, 999, None), request(12, 3_100, None)],
        );
        assert_eq!(target(&links, 1), None);
    }

    #[test]
    fn other_processes_requests_are_never_candidates() {
        let links = Links::assign(
            HashMap::from([(7, vec![request(1, 0, None)])]),
            HashMap::from([(8, vec![request(11, 1, None)])]),
        );
        assert_eq!(target(&links, 1), None);
    }
}
