//! The I/O of a diagnosis, run on the diagnosis worker (never on the event loop): the thread
//! behind a stall (/proc), what its blocking fd is (pidfd_getfd), and TCP signals (sock_diag).
//! Classification is pure (`stalltrace_core::diagnosis`).
use std::{collections::HashMap, io};

use stalltrace_common::tcp_state;
use stalltrace_core::{
    diagnosis::{classify, TcpSignals, ThreadReport, ThreadSample, ThreadVerdict},
    tracker::model::{Endpoints, Owner, Transport},
};

use super::worker::Subject;
use crate::sources::{
    netns, procfs, sock_diag,
    threads::{self, FdTarget},
};

/// What one look at a stall found.
pub(super) struct Gathered {
    pub(super) thread: Option<ThreadReport>,
    /// The endpoints of the socket the thread is blocked on, if it is one. For a socket with
    /// no IP endpoints (a Unix socket; or one they could not be read from, which then matches
    /// nothing), `Endpoints::unix(its inode, 0)`: its fd tells its own inode, not its peer's.
    pub(super) fd_peer: Option<Endpoints>,
    pub(super) tcp: Option<TcpSignals>,
    /// The connection waits in its listener's accept queue: no process holds it yet.
    pub(super) not_accepted: bool,
    /// The sample that ends this CPU-share window and starts the next.
    pub(super) sample: Option<ThreadSample>,
    /// The process's executable (`/proc/PID/exe`), for the rules' `exe` key.
    pub(super) executable_path: Option<String>,
    /// The process's cgroup v2 path (`/proc/PID/cgroup`), for the rules' `cgroup` key.
    pub(super) cgroup_path: Option<String>,
}

/// Looks at the stall of `subject`; `first` is the sample that opens the CPU-share window.
pub(super) fn gather(subject: &Subject, first: Option<ThreadSample>) -> Gathered {
    let (thread, fd_peer, sample) = if subject.pid == 0 {
        (None, None, None)
    } else {
        thread_report(subject.pid, subject.tid, first)
    };
    // TCP signals: a Unix socket has none (and no inet_diag entry to find).
    let entry = (subject.endpoints.transport != Transport::Unix)
        .then(|| {
            sock_diag::query(&subject.endpoints, subject.pid)
                .ok()
                .flatten()
        })
        .flatten();
    let executable_path = (subject.pid != 0)
        .then(|| std::fs::read_link(format!("/proc/{}/exe", subject.pid)).ok())
        .flatten()
        .map(|path| path.to_string_lossy().into_owned());
    let cgroup_path = (subject.pid != 0)
        .then(|| procfs::cgroup_path(subject.pid))
        .flatten();
    Gathered {
        executable_path,
        cgroup_path,
        thread,
        fd_peer,
        not_accepted: subject.server
            && entry
                .as_ref()
                .is_some_and(sock_diag::DiagEntry::waits_in_accept_queue),
        tcp: entry.and_then(|entry| entry.signals),
        sample,
    }
}

/// The verdict on thread `tid` of `pid`, the endpoints of the socket it is blocked on (see
/// [`Gathered::fd_peer`]), and the sample that ends its window.
fn thread_report(
    pid: u32,
    tid: u32,
    first: Option<ThreadSample>,
) -> (
    Option<ThreadReport>,
    Option<Endpoints>,
    Option<ThreadSample>,
) {
    let last = threads::sample(pid, tid);
    let Some(first) = first.or_else(|| last.clone()) else {
        let gone = ThreadReport {
            id: tid,
            verdict: ThreadVerdict::Gone,
        };
        return (Some(gone), None, None);
    };
    let mut verdict = classify(&first, last.as_ref());
    let mut fd_peer = None;
    if let ThreadVerdict::Blocked {
        fd: Some(fd),
        fd_target,
        ..
    } = &mut verdict
    {
        if let Some(target) = threads::fd_target(pid, *fd) {
            match &target {
                FdTarget::Socket {
                    local: Some(local),
                    peer: Some(peer),
                    ..
                } => {
                    // The socket is taken to be in its process's namespace (reading its own
                    // would take CAP_NET_ADMIN: SIOCGSKNS).
                    fd_peer = Some(
                        Endpoints::from_socket_addrs(Transport::Tcp, *local, *peer)
                            .in_netns(netns::of_pid(pid).unwrap_or(0)),
                    );
                }
                FdTarget::Socket { inode, .. } => fd_peer = Some(Endpoints::unix(*inode, 0)),
                _ => {}
            }
            *fd_target = Some(target.describe());
        }
    }
    (Some(ThreadReport { id: tid, verdict }), fd_peer, last)
}

/// A socket with a request sitting unread in its receive queue.
pub(crate) struct UnreadRequest {
    pub(crate) endpoints: Endpoints,
    /// Since the last data arrived (ms): how long the request has been waiting.
    pub(crate) waiting_ms: u32,
    /// The process holding the socket (from /proc): a request never read was never
    /// attributed by a transfer.
    pub(crate) owner: Option<Owner>,
}

/// Finds the open sockets (established or half-closed) whose unread bytes have waited at
/// least `stall_after_ns`, with their owners. The /proc walk for owners (every process's fds) runs only when there
/// is such a socket.
pub(super) fn scan_unread(stall_after_ns: u64) -> io::Result<Vec<UnreadRequest>> {
    let waited = |ms: u32| u64::from(ms) * 1_000_000 >= stall_after_ns;
    let entries: Vec<_> = sock_diag::dump_unread()?
        .into_iter()
        .filter_map(|entry| Some((entry.signals?.last_data_recv_ms?, entry)))
        .filter(|(ms, _)| waited(*ms))
        .collect();
    let owners = if entries.is_empty() {
        Default::default()
    } else {
        procfs::socket_owners()
    };
    // A connection still in its listener's accept queue has no socket inode yet: no process
    // holds it, and the process to name is the one that owns the listener and never accepts.
    let listeners: HashMap<(u32, u16), u64> = if entries.iter().any(|(_, e)| e.inode == 0) {
        procfs::tcp_sockets()
            .into_iter()
            .filter(|s| s.state == tcp_state::LISTEN)
            .map(|s| ((s.endpoints.netns, s.endpoints.local_port), s.inode))
            .collect()
    } else {
        HashMap::new()
    };
    Ok(entries
        .into_iter()
        .map(|(waiting_ms, entry)| {
            let holder = match entry.inode {
                0 => listeners
                    .get(&(entry.endpoints.netns, entry.endpoints.local_port))
                    .copied(),
                inode => Some(inode),
            };
            UnreadRequest {
                endpoints: entry.endpoints,
                waiting_ms,
                owner: holder.and_then(|inode| owners.get(&inode).copied()),
            }
        })
        .collect())
}
