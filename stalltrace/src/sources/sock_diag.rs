//! The kernel's view of TCP sockets over NETLINK_SOCK_DIAG (what `ss` uses): queue sizes,
//! owning inode, and tcp_info, in every network namespace (a netlink socket answers for the
//! namespace it was created in: those of other namespaces come from the broker, `netns.rs`).
//! Messages are built and parsed by hand (the layouts are stable UAPI).
use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use stalltrace_common::tcp_state;

use super::netns;
use stalltrace_core::{
    diagnosis::TcpSignals,
    tracker::model::{Endpoints, Transport},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;

/// One socket as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiagEntry {
    pub endpoints: Endpoints,
    pub state: u8,
    pub recv_queue: u32,
    pub send_queue: u32,
    pub inode: u64,
    pub signals: Option<TcpSignals>,
    /// Data segments received and sent (`tcpi_data_segs_in`/`_out`, Linux 4.6+), when the
    /// kernel reports them.
    pub data_segs: Option<(u32, u32)>,
}

/// The socket with these endpoints, in their namespace, with tcp_info; `None` if it no
/// longer exists, or if its namespace cannot be queried (then its signals are left out).
/// `pid` is a process that may be in that namespace (the connection's owner): it is used to
/// reach the namespace only if it is in it.
pub(crate) fn query(endpoints: &Endpoints, pid: u32) -> io::Result<Option<DiagEntry>> {
    // A dual-stack socket carrying IPv4 is an AF_INET6 socket with mapped addresses.
    let families: &[u8] = match endpoints.local {
        IpAddr::V4(_) => &[libc::AF_INET as u8, libc::AF_INET6 as u8],
        IpAddr::V6(_) => &[libc::AF_INET6 as u8],
    };
    let ask = |socket: &OwnedFd| -> io::Result<Option<DiagEntry>> {
        for &family in families {
            let request = request(
                family,
                !0,
                1 << (INET_DIAG_INFO - 1),
                Some(endpoints),
                false,
            );
            if let Some(entry) = exchange(socket, &request, |_| true, endpoints.netns)?
                .into_iter()
                .next()
            {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    };
    let own = netns::own();
    if endpoints.netns == 0 || endpoints.netns == netns::label(own) {
        return ask(&open()?);
    }
    if netns::of_pid(pid) != Some(endpoints.netns) {
        // No process known to be in it; the periodic dump reaches every namespace.
        return Ok(None);
    }
    Ok(netns::with_socket(u64::from(endpoints.netns), pid, ask)?.flatten())
}

impl DiagEntry {
    /// The connection waits in its listener's accept queue: an established socket gets its
    /// inode when accept() takes it. One without an inode in a state only its process's close
    /// leads to (`FIN_WAIT*` — also a time-wait socket's substate — `CLOSING`, `LAST_ACK`) is
    /// an orphan: accepted, and closed since.
    pub(crate) fn waits_in_accept_queue(&self) -> bool {
        self.inode == 0 && matches!(self.state, tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT)
    }
}

/// The TCP states of a connection whose owner may still move data, or owe it: established, or
/// half-closed by either end (the peer's FIN received: `CLOSE_WAIT`; its own sent:
/// `FIN_WAIT1`, `FIN_WAIT2`). A server that read a request and its FIN still owes the reply,
/// and the client that sent them still awaits it.
pub(crate) const OPEN_STATES: u32 = 1 << tcp_state::ESTABLISHED
    | 1 << tcp_state::CLOSE_WAIT
    | 1 << tcp_state::FIN_WAIT1
    | 1 << tcp_state::FIN_WAIT2;

/// `state` is one of [`OPEN_STATES`] (any byte: from /proc or the kernel).
pub(crate) fn is_open(state: u8) -> bool {
    1u32.checked_shl(u32::from(state))
        .is_some_and(|bit| OPEN_STATES & bit != 0)
}

/// The open TCP sockets ([`OPEN_STATES`]) with unread bytes, with tcp_info, in every network
/// namespace a process is in (each namespace once; those that cannot be queried are said once
/// and skipped). Filtered while parsing: a host may have hundreds of thousands of sockets.
pub(crate) fn dump_unread() -> io::Result<Vec<DiagEntry>> {
    dump_open(|entry| entry.recv_queue > 0)
}

/// The open TCP sockets ([`OPEN_STATES`]) `keep` keeps, with tcp_info, in every network
/// namespace a process is in, as [`dump_unread`] walks them.
pub(crate) fn dump_open(keep: fn(&DiagEntry) -> bool) -> io::Result<Vec<DiagEntry>> {
    let dump = |socket: &OwnedFd, label: u32| -> io::Result<Vec<DiagEntry>> {
        let mut entries = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let info = 1 << (INET_DIAG_INFO - 1);
            let request = request(family, OPEN_STATES, info, None, true);
            entries.extend(exchange(socket, &request, keep, label)?);
        }
        Ok(entries)
    };
    let own = netns::own();
    let namespaces = netns::all();
    let mut entries = dump(&open()?, netns::label(own))?;
    for &(inode, pid) in namespaces.iter().filter(|(inode, _)| *inode != own) {
        let label = netns::label(inode);
        // A namespace that vanished since the walk, or whose dump failed, is skipped: the
        // others are still worth reporting.
        match netns::with_socket(inode, pid, |socket| dump(socket, label)) {
            Ok(Some(found)) => entries.extend(found),
            Ok(None) => {}
            Err(err) => log::debug!("sock_diag dump of network namespace {inode}: {err}"),
        }
    }
    netns::retain(
        &namespaces
            .iter()
            .map(|(inode, _)| *inode)
            .collect::<HashSet<_>>(),
    );
    Ok(entries)
}

/// A sock_diag socket in the calling thread's network namespace.
pub(crate) fn open() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket syscall; the descriptor is owned from here on.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn request(
    family: u8,
    states: u32,
    extensions: u8,
    exact: Option<&Endpoints>,
    dump: bool,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    message.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    message.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, extensions, 0]);
    message.extend_from_slice(&states.to_ne_bytes());
    let mut id = [0u8; 48];
    if let Some(endpoints) = exact {
        id[0..2].copy_from_slice(&endpoints.local_port.to_be_bytes());
        id[2..4].copy_from_slice(&endpoints.peer_port.to_be_bytes());
        id[4..20].copy_from_slice(&wire_address(family, endpoints.local));
        id[20..36].copy_from_slice(&wire_address(family, endpoints.peer));
    }
    id[40..44].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    id[44..48].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    message.extend_from_slice(&id);
    message
}

/// An address as inet_diag_sockid holds it for `family`.
fn wire_address(family: u8, ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match (i32::from(family), ip) {
        (libc::AF_INET, IpAddr::V4(v4)) => out[..4].copy_from_slice(&v4.octets()),
        (_, IpAddr::V4(v4)) => out = v4.to_ipv6_mapped().octets(),
        (_, IpAddr::V6(v6)) => out = v6.octets(),
    }
    out
}

/// Sends `request` on `socket` and collects the answered sockets that `keep` selects,
/// labelled with namespace `netns`. Sockets are reused across requests: answers to an earlier
/// request (left unread by a failure) are skipped by their sequence number.
fn exchange(
    socket: &OwnedFd,
    request: &[u8],
    keep: fn(&DiagEntry) -> bool,
    netns: u32,
) -> io::Result<Vec<DiagEntry>> {
    static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut request = request.to_vec();
    request[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut entries = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        match parse_messages(&buffer[..received as usize], sequence, keep, &mut entries) {
            Parsed::More => continue,
            Parsed::Done | Parsed::Error(0) | Parsed::Error(libc::ENOENT) => {
                for entry in &mut entries {
                    entry.endpoints.netns = netns;
                }
                return Ok(entries);
            }
            Parsed::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    More,
    Done,
    Error(i32),
}

/// Parses a datagram of netlink messages into `entries` (those `keep` selects); messages
/// of another request than `sequence` are skipped.
fn parse_messages(
    mut data: &[u8],
    sequence: u32,
    keep: fn(&DiagEntry) -> bool,
    entries: &mut Vec<DiagEntry>,
) -> Parsed {
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        let flags = u16::from_ne_bytes(data[6..8].try_into().unwrap());
        let answers = u32::from_ne_bytes(data[8..12].try_into().unwrap());
        if len < NLMSG_HDR || len > data.len() {
            return Parsed::Error(libc::EBADMSG);
        }
        let payload = &data[NLMSG_HDR..len];
        if answers != sequence {
            data = &data[align4(len).min(data.len())..];
            continue;
        }
        match kind {
            NLMSG_DONE => return Parsed::Done,
            NLMSG_ERROR => {
                let errno = payload.get(..4).map_or(libc::EBADMSG, |b| {
                    -i32::from_ne_bytes(b.try_into().unwrap())
                });
                return Parsed::Error(errno);
            }
            SOCK_DIAG_BY_FAMILY => {
                entries.extend(parse_entry(payload).filter(keep));
                // An exact query answers with one message, not a multipart dump.
                if flags & 0x2 == 0 {
                    return Parsed::Done;
                }
            }
            _ => {}
        }
        data = &data[align4(len).min(data.len())..];
    }
    Parsed::More
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// inet_diag_msg followed by attributes.
fn parse_entry(payload: &[u8]) -> Option<DiagEntry> {
    let msg = payload.get(..MSG_LEN)?;
    let family = i32::from(msg[0]);
    let u32_at = |at: usize| u32::from_ne_bytes(msg[at..at + 4].try_into().unwrap());
    let address = |at: usize| -> IpAddr {
        let raw: [u8; 16] = msg[at..at + 16].try_into().unwrap();
        if family == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            Ipv6Addr::from(raw).to_canonical()
        }
    };
    let endpoints = Endpoints {
        transport: Transport::Tcp,
        local: address(8),
        local_port: u16::from_be_bytes([msg[4], msg[5]]),
        peer: address(24),
        peer_port: u16::from_be_bytes([msg[6], msg[7]]),
        // Set by `exchange`: the namespace of the socket that asked.
        netns: 0,
    };
    let state = msg[1];
    // The kernel counts a received FIN in the receive queue (rcv_nxt - copied_seq): it is no
    // unread data (a client that gave up must not make its request look unread).
    let fin_received = matches!(
        state,
        tcp_state::CLOSE_WAIT | tcp_state::LAST_ACK | tcp_state::CLOSING
    );
    let mut entry = DiagEntry {
        endpoints,
        state,
        recv_queue: u32_at(56).saturating_sub(u32::from(fin_received)),
        send_queue: u32_at(60),
        inode: u64::from(u32_at(68)),
        signals: None,
        data_segs: None,
    };
    let mut attributes = &payload[MSG_LEN..];
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if len < 4 || len > attributes.len() {
            break;
        }
        if kind == INET_DIAG_INFO {
            entry.signals = Some(parse_tcp_info(&attributes[4..len], &entry));
            entry.data_segs = data_segs(&attributes[4..len]);
        }
        attributes = &attributes[align4(len).min(attributes.len())..];
    }
    Some(entry)
}

/// `tcpi_data_segs_in` and `tcpi_data_segs_out` (UAPI offsets 152 and 156), if present.
fn data_segs(info: &[u8]) -> Option<(u32, u32)> {
    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    Some((u32_at(152)?, u32_at(156)?))
}

/// The fields of struct tcp_info used (offsets are UAPI; newer fields only if present).
fn parse_tcp_info(info: &[u8], entry: &DiagEntry) -> TcpSignals {
    let u8_at = |at: usize| info.get(at).copied().unwrap_or(0);
    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    const SND_WND: usize = 228;
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    // tcpi_state: before the handshake completes (SYN_SENT, SYN_RECV) there is no window and
    // no data, and the last_* times count from boot.
    let handshaken = !matches!(u8_at(0), 2 | 3);
    let since = |at: usize| handshaken.then(|| u32_at(at));
    TcpSignals {
        recv_queue: entry.recv_queue,
        send_queue: entry.send_queue,
        unacked: u32_at(24),
        retransmitting: u8_at(2),
        zero_window_probes: u8_at(3),
        total_retransmits: u32_at(100),
        zero_window: handshaken && info.len() >= SND_WND + 4 && u32_at(SND_WND) == 0,
        last_data_sent_ms: since(44),
        last_data_recv_ms: since(52),
        last_ack_recv_ms: since(56),
        bytes_read: info.get(BYTES_RECEIVED..BYTES_RECEIVED + 8).map(|b| {
            (u64::from_ne_bytes(b.try_into().unwrap()) as u32).wrapping_sub(entry.recv_queue)
        }),
        bytes_written: info.get(BYTES_ACKED..BYTES_ACKED + 8).map(|b| {
            (u64::from_ne_bytes(b.try_into().unwrap()) as u32).wrapping_add(entry.send_queue)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
    };

    fn endpoints(stream: &TcpStream) -> Endpoints {
        let (local, peer) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
        Endpoints::from_socket_addrs(Transport::Tcp, local, peer)
            .in_netns(netns::label(netns::own()))
    }

    #[test]
    fn requests_have_the_uapi_layout() {
        let ends = Endpoints {
            transport: Transport::Tcp,
            local: "127.0.0.1".parse().unwrap(),
            local_port: 8080,
            peer: "127.0.0.2".parse().unwrap(),
            peer_port: 50_000,
            netns: 0,
        };
        let message = request(libc::AF_INET as u8, !0, 2, Some(&ends), false);
        assert_eq!(message.len(), 72);
        assert_eq!(&message[16..18], &[libc::AF_INET as u8, 6]);
        assert_eq!(&message[24..26], &8080u16.to_be_bytes());
        assert_eq!(&message[28..32], &[127, 0, 0, 1]);
        assert_eq!(&message[44..48], &[127, 0, 0, 2]);
        let mapped = wire_address(libc::AF_INET6 as u8, ends.local);
        assert_eq!(&mapped[10..], &[0xff, 0xff, 127, 0, 0, 1]);
    }

    #[test]
    fn garbage_answers_are_errors_not_panics() {
        let mut entries = Vec::new();
        let all = |_: &DiagEntry| true;
        assert_eq!(parse_messages(&[0; 8], 1, all, &mut entries), Parsed::More);
        let mut bad = vec![0u8; 16];
        bad[0] = 200; // longer than the datagram
        assert_eq!(
            parse_messages(&bad, 1, all, &mut entries),
            Parsed::Error(libc::EBADMSG)
        );
        // The end of an earlier request's dump does not end this one.
        let mut stale = vec![0u8; 16];
        stale[0] = 16;
        stale[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        stale[8..12].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_messages(&stale, 2, all, &mut entries), Parsed::More);
        assert_eq!(parse_messages(&stale, 1, all, &mut entries), Parsed::Done);
        assert!(parse_entry(&[1, 2, 3]).is_none());
    }

    #[test]
    fn finds_a_live_socket_and_its_unread_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"unread request").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // A kernel without NETLINK_SOCK_DIAG fails this test, loudly: the daemon loses its TCP
        // signals there.
        let found = query(&endpoints(&server), 0).expect("NETLINK_SOCK_DIAG must answer");
        let entry = found.expect("the server socket exists");
        assert_eq!(entry.recv_queue, 14);
        let signals = entry.signals.expect("tcp_info requested");
        assert_eq!(signals.recv_queue, 14);
        assert_eq!(
            stalltrace_core::diagnosis::tcp_cause(true, &signals),
            stalltrace_core::diagnosis::Cause::RequestUnread
        );
        let unread = dump_unread().unwrap();
        assert!(unread.iter().any(|e| e.endpoints == endpoints(&server)));
        assert!(unread.iter().all(|e| is_open(e.state)));
        assert!(unread.iter().all(|e| e.recv_queue > 0));
        assert_eq!(signals.bytes_read, Some(0), "received, not read");
        let mut buf = [0u8; 14];
        server.read_exact(&mut buf).unwrap();
        let read = query(&endpoints(&server), 0).unwrap().unwrap();
        assert_eq!(read.recv_queue, 0);
        assert_eq!(read.signals.unwrap().bytes_read, Some(14));
        // Bytes read by splice(2) into a pipe are read as far as the socket is concerned.
        client.write_all(&[b'b'; 100]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut pipe = [0; 2];
        // SAFETY: plain syscalls on descriptors this test owns.
        let spliced = unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let moved = libc::splice(
                std::os::fd::AsRawFd::as_raw_fd(&server),
                std::ptr::null_mut(),
                pipe[1],
                std::ptr::null_mut(),
                100,
                0,
            );
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            moved
        };
        assert_eq!(spliced, 100);
        let read = query(&endpoints(&server), 0).unwrap().unwrap();
        assert_eq!(read.signals.unwrap().bytes_read, Some(114));
        let unread = dump_unread().unwrap();
        assert!(!unread.iter().any(|e| e.endpoints == endpoints(&server)));
    }

    #[test]
    fn a_send_blocked_in_the_kernel_has_handed_bytes_over() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let server_ends = endpoints(&server);
        let written = |ends| {
            query(&ends, 0)
                .unwrap()
                .unwrap()
                .signals
                .unwrap()
                .bytes_written
        };
        server.write_all(b"hello").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            written(server_ends),
            Some(5),
            "acknowledged: no SYN in a server's count"
        );
        // A 64 MiB write to a peer that never reads blocks with part of it handed over.
        let sender = std::thread::spawn(move || server.write_all(&vec![b'x'; 64 << 20]));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let handed = written(server_ends).unwrap();
        assert!(
            handed > 5 + 65_536,
            "{handed} bytes taken by the blocked write"
        );
        assert!(!sender.is_finished(), "the write is still blocked");
        drop(client);
        assert!(sender.join().unwrap().is_err(), "the peer closed");
    }

    #[test]
    fn only_a_socket_never_accepted_waits_in_the_accept_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let client_ends = endpoints(&client);
        // The server's view of the same connection: the client's endpoints swapped.
        let server_ends = Endpoints {
            local: client_ends.peer,
            local_port: client_ends.peer_port,
            peer: client_ends.local,
            peer_port: client_ends.local_port,
            ..client_ends
        };
        let waiting = || {
            query(&server_ends, 0)
                .unwrap()
                .expect("the server socket")
                .waits_in_accept_queue()
        };
        assert!(waiting(), "not accepted yet");
        let (server, _) = listener.accept().unwrap();
        assert!(!waiting(), "accepted");
        drop(server); // its process closes it; the client keeps its end open
        let orphan = query(&server_ends, 0).unwrap().expect("the closed socket");
        assert_eq!(orphan.inode, 0, "no process holds it");
        // FIN_WAIT2 once the client's (delayed, ~40 ms) ACK of the FIN came.
        assert!(
            matches!(orphan.state, tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2),
            "{orphan:?}"
        );
        assert!(!orphan.waits_in_accept_queue(), "closed, not waiting");
        drop(client);
    }

    #[test]
    fn a_peers_fin_is_not_unread_data() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"request").unwrap();
        let mut buf = [0u8; 7];
        server.read_exact(&mut buf).unwrap();
        drop(client); // the client gives up: its FIN waits in the server's receive queue
        std::thread::sleep(std::time::Duration::from_millis(50));
        let entry = query(&endpoints(&server), 0)
            .unwrap()
            .expect("the server socket");
        assert_eq!(entry.state, tcp_state::CLOSE_WAIT);
        assert_eq!(entry.recv_queue, 0, "the FIN is no request");
        let signals = entry.signals.expect("tcp_info requested");
        assert_eq!(
            stalltrace_core::diagnosis::tcp_cause(true, &signals),
            stalltrace_core::diagnosis::Cause::ReadNoReply
        );
    }
}
