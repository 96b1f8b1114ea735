//! The pure classifiers of a diagnosis: a thread's verdict from two /proc samples, the TCP
//! cause from sock_diag signals, and the confidence left after lost events. Unit-tested
//! without any I/O.
use super::model::{Cause, Confidence, SyscallState, TcpSignals, ThreadSample, ThreadVerdict};

/// Share of a sampling window on CPU above which a thread is spinning.
pub const SPINNING_CPU_SHARE: f64 = 0.5;

/// Classifies a thread from two samples taken `last.at_ns - first.at_ns` apart.
pub fn classify(first: &ThreadSample, last: Option<&ThreadSample>) -> ThreadVerdict {
    let Some(last) = last else {
        return ThreadVerdict::Gone;
    };
    let window = last.at_ns.saturating_sub(first.at_ns);
    let cpu_share = if window == 0 {
        0.0
    } else {
        (last.cpu_ns.saturating_sub(first.cpu_ns) as f64 / window as f64).min(1.0)
    };
    if cpu_share >= SPINNING_CPU_SHARE {
        return ThreadVerdict::Spinning {
            cpu_share: round2(cpu_share),
            stack: Vec::new(),
        };
    }
    match last.syscall {
        SyscallState::In { nr, args } => {
            let name = syscall_name(nr).map_or_else(|| format!("syscall {nr}"), str::to_owned);
            if is_wait(nr) {
                ThreadVerdict::Waiting { syscall: name }
            } else {
                ThreadVerdict::Blocked {
                    syscall: name,
                    fd: takes_fd(nr).then_some(args[0] as i64),
                    fd_target: None,
                    fd_conn: None,
                }
            }
        }
        SyscallState::Running | SyscallState::Outside if last.state == 'R' => {
            ThreadVerdict::Starved {
                cpu_share: round2(cpu_share),
            }
        }
        _ => ThreadVerdict::Unknown,
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Syscall numbers worth naming (I/O, waits and sleeps), from the libc crate's table for the
/// architecture the daemon runs on (`/proc/PID/syscall` gives that architecture's numbers).
const SYSCALLS: &[(i64, &str, Kind)] = &[
    (libc::SYS_read, "read", Kind::Fd),
    (libc::SYS_write, "write", Kind::Fd),
    (libc::SYS_pread64, "pread64", Kind::Fd),
    (libc::SYS_pwrite64, "pwrite64", Kind::Fd),
    (libc::SYS_readv, "readv", Kind::Fd),
    (libc::SYS_writev, "writev", Kind::Fd),
    (libc::SYS_nanosleep, "nanosleep", Kind::Wait),
    (libc::SYS_sendfile, "sendfile", Kind::Fd),
    (libc::SYS_connect, "connect", Kind::Fd),
    (libc::SYS_accept, "accept", Kind::Fd),
    (libc::SYS_sendto, "sendto", Kind::Fd),
    (libc::SYS_recvfrom, "recvfrom", Kind::Fd),
    (libc::SYS_sendmsg, "sendmsg", Kind::Fd),
    (libc::SYS_recvmsg, "recvmsg", Kind::Fd),
    (libc::SYS_wait4, "wait4", Kind::Wait),
    (libc::SYS_flock, "flock", Kind::Fd),
    (libc::SYS_fsync, "fsync", Kind::Fd),
    (libc::SYS_fdatasync, "fdatasync", Kind::Fd),
    (libc::SYS_rt_sigsuspend, "rt_sigsuspend", Kind::Wait),
    (libc::SYS_futex, "futex", Kind::Wait),
    (libc::SYS_clock_nanosleep, "clock_nanosleep", Kind::Wait),
    (libc::SYS_waitid, "waitid", Kind::Wait),
    (libc::SYS_pselect6, "pselect6", Kind::Wait),
    (libc::SYS_ppoll, "ppoll", Kind::Wait),
    (libc::SYS_epoll_pwait, "epoll_pwait", Kind::Wait),
    (libc::SYS_accept4, "accept4", Kind::Fd),
    (libc::SYS_preadv, "preadv", Kind::Fd),
    (libc::SYS_pwritev, "pwritev", Kind::Fd),
    (libc::SYS_recvmmsg, "recvmmsg", Kind::Fd),
    (libc::SYS_sendmmsg, "sendmmsg", Kind::Fd),
    (libc::SYS_io_uring_enter, "io_uring_enter", Kind::Other),
    (libc::SYS_epoll_pwait2, "epoll_pwait2", Kind::Wait),
    (libc::SYS_futex_waitv, "futex_waitv", Kind::Wait),
];

/// The older calls x86-64 keeps and the generic table (arm64) dropped for their successors.
#[cfg(target_arch = "x86_64")]
const LEGACY_SYSCALLS: &[(i64, &str, Kind)] = &[
    (libc::SYS_poll, "poll", Kind::Wait),
    (libc::SYS_select, "select", Kind::Wait),
    (libc::SYS_pause, "pause", Kind::Wait),
    (libc::SYS_epoll_wait, "epoll_wait", Kind::Wait),
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_SYSCALLS: &[(i64, &str, Kind)] = &[];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// First argument is a file descriptor.
    Fd,
    /// Parks the thread until an event or a timeout.
    Wait,
    Other,
}

fn lookup(nr: i64) -> Option<&'static (i64, &'static str, Kind)> {
    SYSCALLS
        .iter()
        .chain(LEGACY_SYSCALLS)
        .find(|(n, _, _)| *n == nr)
}

pub fn syscall_name(nr: i64) -> Option<&'static str> {
    lookup(nr).map(|(_, name, _)| *name)
}

fn is_wait(nr: i64) -> bool {
    lookup(nr).is_some_and(|(_, _, kind)| *kind == Kind::Wait)
}

fn takes_fd(nr: i64) -> bool {
    lookup(nr).is_some_and(|(_, _, kind)| *kind == Kind::Fd)
}

/// What TCP says about a stall, most specific first.
pub fn tcp_cause(server_side: bool, signals: &TcpSignals) -> Cause {
    if signals.retransmitting > 0 {
        return Cause::NetworkRetransmitting;
    }
    // A server's reply bytes still queued after the threshold: it answered, and the peer takes
    // them slower than they were written (a zero window, or just a slow reader).
    if signals.send_queue > 0
        && (signals.zero_window || signals.zero_window_probes > 0 || server_side)
    {
        return Cause::PeerNotReading;
    }
    if server_side {
        if signals.recv_queue > 0 {
            Cause::RequestUnread
        } else {
            Cause::ReadNoReply
        }
    } else if signals.recv_queue > 0 {
        Cause::ResponseUnread
    } else if signals.send_queue > 0 {
        Cause::RequestNotDelivered
    } else {
        Cause::AwaitingPeer
    }
}

/// [`tcp_cause`] for a stall of one HTTP/2 stream, whose request was written (a client's) or
/// read (a server's: its HEADERS opened it) and whose response has not begun (its first frame would have ended the
/// stall): the bytes in a connection's queues are other streams' as much as this one's, and
/// say nothing of it unless the peer takes nothing at all (a zero window). A client's unread
/// bytes still show a client that does not read.
pub fn tcp_cause_of_stream(server_side: bool, signals: &TcpSignals) -> Cause {
    if signals.retransmitting > 0 {
        Cause::NetworkRetransmitting
    } else if signals.send_queue > 0 && (signals.zero_window || signals.zero_window_probes > 0) {
        Cause::PeerNotReading
    } else if server_side {
        Cause::ReadNoReply
    } else if signals.recv_queue > 0 {
        Cause::ResponseUnread
    } else {
        Cause::AwaitingPeer
    }
}

/// How far a connection's state can be trusted: `partial` (with why) when the daemon lost
/// events after the connection opened, since one of them may have been this connection's.
pub fn confidence(opened_ns: u64, last_loss_ns: Option<u64>) -> (Confidence, Option<String>) {
    match last_loss_ns {
        Some(lost_at) if lost_at >= opened_ns => (
            Confidence::Partial,
            Some(
                "events were lost since this connection opened (see `loss`): its state may \
                 be stale"
                    .into(),
            ),
        ),
        _ => (Confidence::Full, None),
    }
}

/// Sequence numbers a socket's byte count may hold beyond its data: a SYN and a FIN.
const CONTROL_SEQUENCE_SLACK: u64 = 2;

/// Why a verdict made from the transfers the programs saw cannot be trusted, when the socket
/// says the application read or wrote more than they counted (`reads` and `writes`, on the
/// socket's scale: see `tracker::Conn::counted_reads`): bytes moved by a read no hook saw (an
/// io_uring splice, a kernel without the splice-read program, an in-kernel consumer), or by a
/// send still blocked in the kernel (the hooks see a send when it returns) or one no hook saw.
pub fn unseen_bytes_reason(
    reads: Option<u32>,
    writes: Option<u32>,
    signals: &TcpSignals,
) -> Option<String> {
    let unseen = |counted: Option<u32>, socket: Option<u32>| {
        Some(stalltrace_common::transfer::unseen_reads(counted?, socket?))
    };
    if let Some(read) = unseen(reads, signals.bytes_read).filter(|&n| n > CONTROL_SEQUENCE_SLACK) {
        return Some(format!(
            "the socket says {read} bytes were read that no hook saw (splice, sendfile or \
             io_uring from a socket where they are not traced): this verdict, from the \
             transfers seen, may be wrong"
        ));
    }
    let written = unseen(writes, signals.bytes_written).filter(|&n| n > CONTROL_SEQUENCE_SLACK)?;
    Some(format!(
        "the socket has taken {written} bytes that no hook saw sent: a send call still blocked \
         in the kernel (a reply under way, as fast as the peer reads) or one not traced \
         (sendfile, splice or io_uring where they are not): this verdict, from the transfers \
         seen, may be wrong"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, cpu_ms: u64, state: char, syscall: SyscallState) -> ThreadSample {
        ThreadSample {
            at_ns: at_ms * 1_000_000,
            cpu_ns: cpu_ms * 1_000_000,
            state,
            syscall,
        }
    }

    #[test]
    fn a_thread_on_cpu_most_of_the_window_is_spinning() {
        let first = sample(0, 100, 'R', SyscallState::Running);
        let last = sample(1000, 1080, 'R', SyscallState::Running);
        assert_eq!(
            classify(&first, Some(&last)),
            ThreadVerdict::Spinning {
                cpu_share: 0.98,
                stack: vec![]
            }
        );
    }

    #[test]
    fn a_thread_in_a_socket_read_is_blocked_with_its_fd() {
        let first = sample(0, 5, 'S', SyscallState::Outside);
        let blocked = SyscallState::In {
            nr: libc::SYS_recvfrom,
            args: [9, 0, 0, 0, 0, 0],
        };
        let last = sample(1000, 5, 'S', blocked);
        assert_eq!(
            classify(&first, Some(&last)),
            ThreadVerdict::Blocked {
                syscall: "recvfrom".into(),
                fd: Some(9),
                fd_target: None,
                fd_conn: None
            }
        );
    }

    #[test]
    fn event_waits_and_locks_are_waiting() {
        let first = sample(0, 5, 'S', SyscallState::Outside);
        for (nr, name) in [
            (libc::SYS_epoll_pwait, "epoll_pwait"),
            (libc::SYS_futex, "futex"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_nanosleep, "nanosleep"),
        ] {
            let last = sample(1000, 6, 'S', SyscallState::In { nr, args: [0; 6] });
            assert_eq!(
                classify(&first, Some(&last)),
                ThreadVerdict::Waiting {
                    syscall: name.into()
                }
            );
        }
    }

    #[test]
    fn gone_starved_and_unknown() {
        let first = sample(0, 5, 'S', SyscallState::Outside);
        assert_eq!(classify(&first, None), ThreadVerdict::Gone);
        let runnable = sample(1000, 50, 'R', SyscallState::Running);
        assert_eq!(
            classify(&first, Some(&runnable)),
            ThreadVerdict::Starved { cpu_share: 0.05 }
        );
        let unreadable = sample(1000, 5, 'S', SyscallState::Unknown);
        assert_eq!(classify(&first, Some(&unreadable)), ThreadVerdict::Unknown);
        let odd = sample(
            1000,
            5,
            'S',
            SyscallState::In {
                nr: 9999,
                args: [0; 6],
            },
        );
        assert!(matches!(
            classify(&first, Some(&odd)),
            ThreadVerdict::Blocked { syscall, fd: None, .. } if syscall == "syscall 9999"
        ));
    }

    #[test]
    fn verdicts_serialize_with_a_tag() {
        let verdict = ThreadVerdict::Waiting {
            syscall: "epoll_wait".into(),
        };
        assert_eq!(
            serde_json::to_string(&verdict).unwrap(),
            r#"{"verdict":"waiting","syscall":"epoll_wait"}"#
        );
    }

    #[test]
    fn losses_after_the_open_make_a_stall_partial() {
        assert_eq!(confidence(100, None).0, Confidence::Full);
        assert_eq!(
            confidence(100, Some(50)).0,
            Confidence::Full,
            "lost before it opened"
        );
        let (level, reason) = confidence(100, Some(150));
        assert_eq!(level, Confidence::Partial);
        assert!(reason.unwrap().contains("lost"));
    }

    #[test]
    fn an_http2_servers_queues_hold_other_streams_bytes() {
        // Another stream's response still in flight, the next calls' frames unread.
        let busy = TcpSignals {
            send_queue: 24,
            recv_queue: 30,
            ..Default::default()
        };
        assert_eq!(tcp_cause(true, &busy), Cause::PeerNotReading);
        assert_eq!(tcp_cause_of_stream(true, &busy), Cause::ReadNoReply);
        let blocked_peer = TcpSignals {
            zero_window: true,
            ..busy
        };
        assert_eq!(
            tcp_cause_of_stream(true, &blocked_peer),
            Cause::PeerNotReading
        );
        // The client's queued bytes are other streams' requests: the server end may well
        // have read this one.
        let sending = TcpSignals {
            send_queue: 60,
            ..Default::default()
        };
        assert_eq!(tcp_cause(false, &sending), Cause::RequestNotDelivered);
        assert_eq!(tcp_cause_of_stream(false, &sending), Cause::AwaitingPeer);
        assert_eq!(tcp_cause_of_stream(false, &busy), Cause::ResponseUnread);
    }

    #[test]
    fn tcp_causes() {
        let unread = TcpSignals {
            recv_queue: 90,
            ..Default::default()
        };
        assert_eq!(tcp_cause(true, &unread), Cause::RequestUnread);
        assert_eq!(tcp_cause(true, &TcpSignals::default()), Cause::ReadNoReply);
        let blocked_peer = TcpSignals {
            send_queue: 65_536,
            zero_window_probes: 3,
            ..Default::default()
        };
        assert_eq!(tcp_cause(true, &blocked_peer), Cause::PeerNotReading);
        let lossy = TcpSignals {
            send_queue: 100,
            retransmitting: 2,
            ..Default::default()
        };
        assert_eq!(tcp_cause(false, &lossy), Cause::NetworkRetransmitting);
        assert_eq!(
            tcp_cause(false, &TcpSignals::default()),
            Cause::AwaitingPeer
        );
        let answered = TcpSignals {
            recv_queue: 40,
            ..Default::default()
        };
        assert_eq!(tcp_cause(false, &answered), Cause::ResponseUnread);
    }

    #[test]
    fn bytes_a_blocked_send_handed_over_make_a_verdict_unsure() {
        let written = |bytes_written| TcpSignals {
            bytes_written,
            ..Default::default()
        };
        // A server counted 0 bytes sent: its sendall() of 40 MB is blocked, 2.5 MB handed over.
        let reason = unseen_bytes_reason(None, Some(0), &written(Some(2_500_000))).unwrap();
        assert!(reason.contains("2500000 bytes"), "{reason}");
        assert!(reason.contains("send call still blocked"), "{reason}");
        // A client's SYN and FIN take a sequence number each: nothing unseen.
        assert_eq!(
            unseen_bytes_reason(None, Some(100), &written(Some(102))),
            None
        );
        assert_eq!(
            unseen_bytes_reason(None, None, &written(Some(1 << 20))),
            None
        );
    }

    #[test]
    fn reads_no_hook_saw_make_a_verdict_unsure() {
        let unseen_reads_reason =
            |counted, signals: &TcpSignals| unseen_bytes_reason(counted, None, signals);
        let read = |bytes_read| TcpSignals {
            bytes_read,
            ..Default::default()
        };
        // 2 MiB spliced into a pipe while 44 bytes of head were counted.
        let reason = unseen_reads_reason(Some(44), &read(Some(44 + (2 << 20)))).unwrap();
        assert!(reason.contains("2097152 bytes were read"), "{reason}");
        assert_eq!(unseen_reads_reason(Some(44), &read(Some(44))), None);
        // The peer's FIN, once read as the end of the stream, is one more: nothing unseen.
        assert_eq!(unseen_reads_reason(Some(44), &read(Some(45))), None);
        // Counted before read (a reply counted at the peer's FIN): nothing unseen.
        assert_eq!(unseen_reads_reason(Some(100), &read(Some(44))), None);
        // Either count unknown: nothing said.
        assert_eq!(unseen_reads_reason(None, &read(Some(1 << 20))), None);
        assert_eq!(unseen_reads_reason(Some(44), &read(None)), None);
        // The 32-bit scales wrap together.
        assert_eq!(
            unseen_reads_reason(Some(u32::MAX - 9), &read(Some(10))).map(|r| r.contains(" 20 ")),
            Some(true)
        );
    }
}
