//! What a thread is doing, from /proc/<pid>/task/<tid>: CPU time, scheduler state, the syscall
//! it is in and its arguments, and what its file descriptors are. Read only for threads behind
//! open (or imminent) stalls.
use std::{fs, net::SocketAddr, os::fd::FromRawFd as _};

use stalltrace_core::{
    diagnosis::{SyscallState, ThreadSample},
    timefmt::monotonic_ns,
};

/// Samples thread `tid` of process `pid`; `None` when it no longer exists.
pub(crate) fn sample(pid: u32, tid: u32) -> Option<ThreadSample> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let stat = fs::read_to_string(format!("{dir}/stat")).ok()?;
    let state = parse_stat_state(&stat)?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    // schedstat has ns precision but lags for a thread that has not been descheduled yet;
    // utime + stime (clock ticks) does not. Take the larger.
    let schedstat = fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|text| parse_schedstat(&text))
        .unwrap_or(0);
    let cpu_ns = schedstat.max(parse_stat_cpu_ns(&stat).unwrap_or(0));
    let syscall = fs::read_to_string(format!("{dir}/syscall"))
        .map_or(SyscallState::Unknown, |text| parse_syscall(&text));
    Some(ThreadSample {
        at_ns: monotonic_ns(),
        cpu_ns,
        state,
        syscall,
    })
}

/// The state letter of /proc/…/stat, which follows the parenthesized command name (which may
/// itself contain spaces and parentheses).
pub(crate) fn parse_stat_state(stat: &str) -> Option<char> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().next()?.chars().next()
}

/// utime + stime of /proc/…/stat (fields 14 and 15), in ns.
pub(crate) fn parse_stat_cpu_ns(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / ticks_per_sec)
}

/// First field of /proc/…/schedstat: time spent on the CPU, in ns.
pub(crate) fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// /proc/…/syscall: `running`, `-1 sp pc`, or `nr arg0 … arg5 sp pc` (arguments in hex).
pub(crate) fn parse_syscall(text: &str) -> SyscallState {
    let mut fields = text.split_whitespace();
    let Some(first) = fields.next() else {
        return SyscallState::Unknown;
    };
    if first == "running" {
        return SyscallState::Running;
    }
    let Ok(nr) = first.parse::<i64>() else {
        return SyscallState::Unknown;
    };
    if nr < 0 {
        return SyscallState::Outside;
    }
    let mut args = [0u64; 6];
    for arg in &mut args {
        let Some(hex) = fields.next().and_then(|f| f.strip_prefix("0x")) else {
            return SyscallState::Unknown;
        };
        let Ok(value) = u64::from_str_radix(hex, 16) else {
            return SyscallState::Unknown;
        };
        *arg = value;
    }
    SyscallState::In { nr, args }
}

/// What a file descriptor refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FdTarget {
    /// A TCP/UDP socket with its endpoints, when they could be read.
    Socket {
        inode: u64,
        local: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    },
    Pipe(u64),
    /// `anon_inode:[eventfd]` and friends.
    Anon(String),
    File(String),
}

/// Longest fd description reported (a file path can be 4 KiB).
const MAX_DESCRIPTION: usize = 256;

impl FdTarget {
    /// `socket A -> B`, `pipe (inode N)`, `file /path`…, at most 256 bytes.
    pub(crate) fn describe(&self) -> String {
        let mut text = self.describe_all();
        if text.len() > MAX_DESCRIPTION {
            let mut end = MAX_DESCRIPTION;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    }

    fn describe_all(&self) -> String {
        match self {
            Self::Socket {
                local: Some(local),
                peer: Some(peer),
                ..
            } => format!("socket {local} -> {peer}"),
            Self::Socket { inode, .. } => format!("socket (inode {inode})"),
            Self::Pipe(inode) => format!("pipe (inode {inode})"),
            Self::Anon(kind) => kind.clone(),
            Self::File(path) => format!("file {path}"),
        }
    }
}

/// Parses a /proc/…/fd/N link target.
pub(crate) fn parse_fd_link(link: &str) -> FdTarget {
    let bracketed = |prefix: &str| {
        link.strip_prefix(prefix)?
            .strip_suffix(']')?
            .parse::<u64>()
            .ok()
    };
    if let Some(inode) = bracketed("socket:[") {
        FdTarget::Socket {
            inode,
            local: None,
            peer: None,
        }
    } else if let Some(inode) = bracketed("pipe:[") {
        FdTarget::Pipe(inode)
    } else if let Some(kind) = link.strip_prefix("anon_inode:") {
        FdTarget::Anon(kind.trim_matches(|c| c == '[' || c == ']').to_owned())
    } else {
        FdTarget::File(link.to_owned())
    }
}

/// What `fd` of process `pid` is; for a socket, also its endpoints (read from a duplicate of
/// the descriptor taken with pidfd_getfd, Linux 5.6+, which needs CAP_SYS_PTRACE).
pub(crate) fn fd_target(pid: u32, fd: i64) -> Option<FdTarget> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let mut target = parse_fd_link(&link.to_string_lossy());
    if let FdTarget::Socket { local, peer, .. } = &mut target {
        if let Some(socket) = duplicate_fd(pid, fd) {
            *local = socket_addr(&socket, libc::getsockname);
            *peer = socket_addr(&socket, libc::getpeername);
        }
    }
    Some(target)
}

fn duplicate_fd(pid: u32, fd: i64) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: plain syscalls; every returned fd is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd as i32);
        use std::os::fd::AsRawFd as _;
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as i32, 0);
        (copy >= 0).then(|| std::os::fd::OwnedFd::from_raw_fd(copy as i32))
    }
}

type NameFn = unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> i32;

fn socket_addr(socket: &std::os::fd::OwnedFd, name: NameFn) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: sockaddr_storage is large enough for any address; len is in/out.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if name(socket.as_raw_fd(), (&raw mut storage).cast(), &mut len) != 0 {
            return None;
        }
        match i32::from(storage.ss_family) {
            libc::AF_INET => {
                let addr: &libc::sockaddr_in = &*(&raw const storage).cast();
                let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
            }
            libc::AF_INET6 => {
                let addr: &libc::sockaddr_in6 = &*(&raw const storage).cast();
                let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr).to_canonical();
                Some(SocketAddr::new(ip, u16::from_be(addr.sin6_port)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_state_survives_odd_command_names() {
        assert_eq!(
            parse_stat_state("42 (a (weird) name) S 1 42 42 0"),
            Some('S')
        );
        assert_eq!(parse_stat_state("7 (nginx) R 1"), Some('R'));
        assert_eq!(parse_stat_state("garbage"), None);
    }

    #[test]
    fn syscall_lines() {
        assert_eq!(parse_syscall("running\n"), SyscallState::Running);
        assert_eq!(parse_syscall("-1 0x7ffc 0x7f00\n"), SyscallState::Outside);
        assert_eq!(
            parse_syscall("45 0x7 0x7f12 0x100 0x0 0x0 0x0 0x7ffd 0x7f33\n"),
            SyscallState::In {
                nr: 45,
                args: [7, 0x7f12, 0x100, 0, 0, 0]
            }
        );
        assert_eq!(parse_syscall("45 0x7"), SyscallState::Unknown);
        assert_eq!(parse_syscall(""), SyscallState::Unknown);
    }

    #[test]
    fn fd_links() {
        assert_eq!(
            parse_fd_link("socket:[123]"),
            FdTarget::Socket {
                inode: 123,
                local: None,
                peer: None
            }
        );
        assert_eq!(parse_fd_link("pipe:[9]"), FdTarget::Pipe(9));
        assert_eq!(
            parse_fd_link("anon_inode:[eventfd]"),
            FdTarget::Anon("eventfd".into())
        );
        assert_eq!(
            parse_fd_link("/var/lib/db"),
            FdTarget::File("/var/lib/db".into())
        );
        let long = FdTarget::File(format!("/{}", "d/".repeat(2000))).describe();
        assert!(long.len() <= MAX_DESCRIPTION + 3 && long.ends_with('…'));
    }

    #[test]
    fn samples_this_thread_and_reads_a_socket_fd() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let pid = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::spin_loop();
        }
        let now = sample(pid, tid).expect("this thread exists");
        assert_eq!(now.state, 'R');
        assert!(now.cpu_ns > 0);
        assert!(sample(pid, u32::MAX).is_none());

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        use std::os::fd::AsRawFd as _;
        let target = fd_target(pid, i64::from(client.as_raw_fd())).unwrap();
        let FdTarget::Socket { local, peer, .. } = target else {
            panic!("not a socket: {target:?}");
        };
        // Reading endpoints needs CAP_SYS_PTRACE for pidfd_getfd (the tests run as root).
        if local.is_some() {
            assert_eq!(local, Some(client.local_addr().unwrap()));
            assert_eq!(peer, Some(listener.local_addr().unwrap()));
        }
    }
}
