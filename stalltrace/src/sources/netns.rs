//! Network namespaces: which ones exist (one process in each, from /proc), which one a process
//! is in, and NETLINK_SOCK_DIAG sockets inside each of them.
//!
//! sock_diag answers about the namespace its netlink socket was created in, and creating one
//! in another namespace takes `setns`, which needs `CAP_SYS_ADMIN`: the daemon drops it after
//! start-up. So, before dropping it, the daemon forks the *namespace broker*: a process of its
//! own (`stalltrace-ns`) that keeps `CAP_SYS_ADMIN` alone, holds no other descriptor and
//! does one thing: given a namespace descriptor (`/proc/PID/ns/net`, opened by the daemon with
//! its `CAP_SYS_PTRACE`), it enters the namespace and sends back a new sock_diag socket
//! created there. The daemon's own threads never change namespace. The broker dies with the
//! daemon (`PR_SET_PDEATHSIG`) and when its socket closes.
use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, IoSlice},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, OnceLock,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Namespaces whose sock_diag socket is kept open at most. A socket holds its namespace
/// alive, so sockets of namespaces that no process is in any more are closed at every scan
/// ([`retain`]).
const MAX_SOCKETS: usize = 4096;

/// Whether the kernel programs read connections' namespaces; when they cannot, every source
/// leaves the namespace 0 so that the same connection still compares equal.
static KNOWN: AtomicBool = AtomicBool::new(true);

/// Says whether the programs fill `ConnState::netns` (their BTF offsets resolved).
pub(crate) fn set_known(known: bool) {
    KNOWN.store(known, Ordering::Relaxed);
}

/// `inode` as connections are labelled with it: 0 when namespaces are not read.
pub(crate) fn label(inode: u64) -> u32 {
    if KNOWN.load(Ordering::Relaxed) {
        u32::try_from(inode).unwrap_or(0)
    } else {
        0
    }
}

/// The namespace of process `pid` (the inode `/proc/PID/ns/net` links to), as [`label`]s it.
pub(crate) fn of_pid(pid: u32) -> Option<u32> {
    let inode = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
    Some(label(inode))
}

/// The daemon's own namespace (its inode).
pub(crate) fn own() -> u64 {
    static OWN: OnceLock<u64> = OnceLock::new();
    *OWN.get_or_init(|| {
        fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0)
    })
}

/// Every network namespace a process is in, once each: (inode, a process in it). Processes
/// that vanish during the walk are skipped. A namespace no process is in (one `ip netns`
/// keeps by a bind mount only) holds no socket an application waits on.
pub(crate) fn all() -> Vec<(u64, u32)> {
    let mut seen = HashSet::new();
    let mut namespaces = Vec::new();
    for (pid, process) in super::procfs::processes() {
        if let Ok(meta) = fs::metadata(process.join("ns/net")) {
            if seen.insert(meta.ino()) {
                namespaces.push((meta.ino(), pid));
            }
        }
    }
    namespaces
}

/// The daemon's handle on the broker process.
pub(crate) struct Broker {
    channel: OwnedFd,
    /// Number of the last request.
    sequence: u8,
}

static BROKER: OnceLock<Mutex<Broker>> = OnceLock::new();
static BROKER_PID: OnceLock<u32> = OnceLock::new();

impl Broker {
    /// Forks the broker. Must run while the daemon still has `CAP_SYS_ADMIN` and before it
    /// starts any thread (a fork copies only the calling thread). Then [`socket_in`] can reach
    /// it.
    pub(crate) fn start() -> Result<()> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error()).context("creating the broker's socket pair");
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the process is single-threaded here (see above), so the child may allocate.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()).context("forking the namespace broker"),
            0 => {
                drop(ours);
                let code = match serve(theirs, parent) {
                    Ok(()) => 0,
                    Err(err) => {
                        log::warn!("namespace broker: {err:#}");
                        1
                    }
                };
                // SAFETY: leaves the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            pid => {
                drop(theirs);
                // A broker that hangs must not hold up the diagnosis worker for long.
                set_timeout(&ours, Duration::from_secs(2))?;
                if BROKER
                    .set(Mutex::new(Broker {
                        channel: ours,
                        sequence: 0,
                    }))
                    .is_err()
                {
                    bail!("the namespace broker was already started");
                }
                let _ = BROKER_PID.set(pid.unsigned_abs());
                Ok(())
            }
        }
    }

    /// The broker's process id, if it was started. Never waits (the worker may hold the
    /// broker's lock for its answer; the loop asks this for `status`).
    pub(crate) fn pid() -> Option<u32> {
        BROKER_PID.get().copied()
    }
}

/// A sock_diag socket in the namespace `process` is in (`None`: no broker, or the process or
/// namespace vanished). Blocks for the broker's answer: call it off the event loop.
pub(crate) fn socket_in(process: u32) -> io::Result<OwnedFd> {
    let Some(broker) = BROKER.get() else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no namespace broker: sock_diag sees the daemon's namespace only",
        ));
    };
    let namespace = fs::File::open(format!("/proc/{process}/ns/net"))?;
    let mut broker = broker
        .lock()
        .map_err(|_| io::Error::other("the namespace broker's lock is poisoned"))?;
    // Answers carry the request's number: one that arrives after its request timed out is
    // skipped, never taken for the answer to the next (it would be another namespace).
    broker.sequence = broker.sequence.wrapping_add(1);
    let sequence = broker.sequence;
    send_fd(&broker.channel, [sequence, 0], namespace.as_raw_fd())?;
    loop {
        let ([answered, errno], socket) = recv_fd(&broker.channel)?;
        if answered != sequence {
            continue;
        }
        return match socket {
            Some(socket) if errno == 0 => Ok(socket),
            _ => Err(io::Error::from_raw_os_error(i32::from(errno).max(1))),
        };
    }
}

/// The broker's loop (in the child): only `CAP_SYS_ADMIN`, no descriptor but its channel.
fn serve(channel: OwnedFd, parent: libc::pid_t) -> Result<()> {
    // SAFETY: prctl with integer arguments; a name of at most 16 bytes with its NUL.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"stalltrace-ns".as_ptr(), 0, 0, 0);
        // The daemon may have died before PR_SET_PDEATHSIG took effect.
        if libc::getppid() != parent {
            return Ok(());
        }
    }
    // Nothing of the daemon's (maps, the API socket, files) stays open here: the channel
    // moves to descriptor 3 and everything above it is closed.
    let raw = channel.into_raw_fd();
    // SAFETY: dup2 and close_range on descriptor numbers; 0–2 are left as they are.
    unsafe {
        if raw != 3 && libc::dup2(raw, 3) != 3 {
            bail!("dup2: {}", io::Error::last_os_error());
        }
        libc::close_range(4, u32::MAX, 0);
    }
    // SAFETY: descriptor 3 is the channel now, owned from here on.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    let keep = [caps::Capability::CAP_SYS_ADMIN].into_iter().collect();
    crate::privileges::drop_to(&keep).context("dropping privileges")?;
    loop {
        let ([sequence, _], namespace) = match recv_fd(&channel) {
            Ok(message) => message,
            // The daemon closed its end: done.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err).context("reading a request"),
        };
        let answer = namespace
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
            .and_then(|namespace| socket_inside(&namespace));
        match answer {
            Ok(socket) => send_fd(&channel, [sequence, 0], socket.as_raw_fd()),
            Err(err) => {
                let errno = err.raw_os_error().unwrap_or(libc::EIO).clamp(1, 255) as u8;
                send_fd(&channel, [sequence, errno], -1)
            }
        }
        .context("answering")?;
    }
}

/// Enters `namespace` (this whole single-threaded process) and creates a sock_diag socket.
fn socket_inside(namespace: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: setns on a descriptor we own.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    super::sock_diag::open()
}

fn set_timeout(socket: &OwnedFd, timeout: Duration) -> Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a timeval of the size given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error()).context("setting the broker's timeout");
        }
    }
    Ok(())
}

/// Sends a message (request number, errno) and, unless `fd` is negative, a descriptor with it.
fn send_fd(channel: &OwnedFd, message: [u8; 2], fd: RawFd) -> io::Result<()> {
    let iov = [IoSlice::new(&message)];
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iov.as_ptr().cast_mut().cast();
    header.msg_iovlen = 1;
    if fd >= 0 {
        // SAFETY: the control buffer holds one cmsg carrying one int (checked by CMSG_SPACE).
        unsafe {
            let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
            assert!(space <= size_of_val(&control));
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
        }
    }
    // SAFETY: the header points at live buffers.
    if unsafe { libc::sendmsg(channel.as_raw_fd(), &header, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives a message (request number, errno) and the descriptor that came with it, if any.
fn recv_fd(channel: &OwnedFd) -> io::Result<([u8; 2], Option<OwnedFd>)> {
    let mut message = [0u8; 2];
    let mut iov = libc::iovec {
        iov_base: message.as_mut_ptr().cast(),
        iov_len: message.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = size_of_val(&control);
    // SAFETY: the header points at live buffers; received descriptors are close-on-exec.
    let received =
        unsafe { libc::recvmsg(channel.as_raw_fd(), &raw mut header, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    if received == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    Ok((message, fd))
}

/// sock_diag sockets per namespace, kept open between scans; used by one thread (the diagnosis
/// worker), behind a lock only because it is process-wide.
#[derive(Default)]
struct Namespaces {
    sockets: HashMap<u64, OwnedFd>,
    /// Namespaces that could not be entered, said once each.
    failed: HashSet<u64>,
}

static NAMESPACES: OnceLock<Mutex<Namespaces>> = OnceLock::new();

/// Runs `query` with a sock_diag socket in namespace `inode` (one of [`all`], with a process
/// `pid` in it). `Ok(None)` when that namespace cannot be queried (no broker, or the broker
/// failed): its signals are left out.
pub(crate) fn with_socket<T>(
    inode: u64,
    pid: u32,
    query: impl FnOnce(&OwnedFd) -> io::Result<T>,
) -> io::Result<Option<T>> {
    let mut namespaces = NAMESPACES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| io::Error::other("the namespace sockets' lock is poisoned"))?;
    if !namespaces.sockets.contains_key(&inode) {
        if namespaces.sockets.len() >= MAX_SOCKETS {
            return Ok(None);
        }
        match socket_in(pid) {
            Ok(socket) => {
                namespaces.sockets.insert(inode, socket);
            }
            Err(err) => {
                if namespaces.failed.insert(inode) {
                    log::warn!(
                        "network namespace {inode} (process {pid}) cannot be queried over \
                         sock_diag ({err}): its TCP signals are left out and its unread \
                         requests go undetected"
                    );
                }
                return Ok(None);
            }
        }
    }
    query(&namespaces.sockets[&inode]).map(Some)
}

/// Closes the sockets of namespaces not in `alive` (a socket would keep its namespace alive).
pub(crate) fn retain(alive: &HashSet<u64>) {
    if let Some(namespaces) = NAMESPACES.get() {
        if let Ok(mut namespaces) = namespaces.lock() {
            namespaces.sockets.retain(|inode, _| alive.contains(inode));
            namespaces.failed.retain(|inode| alive.contains(inode));
        }
    }
}
