//! The kernel/userspace ABI of stalltrace.
//!
//! Every type here crosses the kernel boundary as raw bytes (ring buffer records, map keys and
//! values, load-time globals), so each is `#[repr(C)]` with explicit padding and a size pinned by
//! a compile-time assertion: a layout change fails the build of both sides instead of silently
//! mis-decoding. Discriminants of [`EventKind`] are stable ids; never renumber them.
//!
//! Also here, because both sides run it: the transfer accounting ([`transfer`]), so that the
//! kernel programs and the tracker's model of them cannot drift. `no_std`, no allocation,
//! nothing that would not pass the BPF verifier; aya only behind the `user` feature.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod clock;
pub mod http1;
pub mod http2;
pub mod message;
pub mod transfer;
pub mod udp;

/// Length of a task's `comm` (executable name) in the kernel, NUL padded.
pub const COMM_LEN: usize = 16;

/// What a ring buffer record reports. Values are stable ids.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `connect()` sent a SYN (TCP state `SYN_SENT`), in the connecting thread's context.
    ConnectStarted = 1,
    /// A handshake completed: an active open (`SYN_SENT` → `ESTABLISHED`, the `connect()`er
    /// known), or a passive one (`SYN_RECV` → `ESTABLISHED`, in softirq: no owner yet).
    Established = 2,
    // 3 was `Accepted` (an accept() syscall hook), retired: see docs/design.md.
    /// First traffic of a process on a connection: a passive connection's first transfer (its
    /// owner is only known then), or a connection the map did not hold (opened before the
    /// daemon started, or evicted), or a connection handed to another process.
    Discovered = 4,
    /// A request began on a connection not yet reported in the current epoch (see [`Control`]).
    RequestStarted = 5,
    /// Traffic or a close arrived on a connection that had an exchange outstanding and had been
    /// quiet for at least the stall threshold: a stall (reported or not yet swept) just ended.
    QuietEnded = 6,
    /// The connection reached TCP `CLOSE`; the snapshot holds its final totals.
    Closed = 7,
    /// The reply to a request reported by `RequestStarted` began: a sampled exchange is
    /// complete (its latency is this record's time minus the request's).
    ExchangeCompleted = 8,
    /// First traffic on a Unix stream/seqpacket connection the map did not hold (every Unix
    /// connection is found this way: Unix sockets have no lifecycle tracepoint). The record is
    /// a [`UnixEvent`]: the event, then both ends' socket names.
    UnixDiscovered = 9,
    /// An HTTP/1.x response's bytes moved again after at least the stall threshold of quiet
    /// mid-response: a `response_incomplete` stall (reported or not yet swept) just ended.
    ReplyResumed = 10,
}

impl EventKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::ConnectStarted,
            2 => Self::Established,
            4 => Self::Discovered,
            5 => Self::RequestStarted,
            6 => Self::QuietEnded,
            7 => Self::Closed,
            8 => Self::ExchangeCompleted,
            9 => Self::UnixDiscovered,
            10 => Self::ReplyResumed,
            _ => return None,
        })
    }
}

/// Which side opened the connection.
pub mod role {
    pub const UNKNOWN: u8 = 0;
    /// Active open: this process called `connect()`.
    pub const CLIENT: u8 = 1;
    /// Passive open: this process accepted the connection.
    pub const SERVER: u8 = 2;

    /// Linux's default `ip_local_port_range`, packed as [`guess`] takes it.
    pub const DEFAULT_EPHEMERAL: u32 = 32_768 | 60_999 << 16;

    /// The role of a connection not seen opening (open before the daemon, or found by its
    /// traffic): server when a listener holds its local port (`listened`); also when none
    /// does but its local port lies outside `ephemeral`, the range `connect()` picks ports
    /// from (`ip_local_port_range`: the lowest port in the low 16 bits, the highest in the
    /// high 16), and its peer's inside it: a server that closed its listener after accepting
    /// (socat without `fork`, a server draining). Otherwise client.
    #[inline(always)]
    pub fn guess(listened: bool, local_port: u16, peer_port: u16, ephemeral: u32) -> u8 {
        let (low, high) = (ephemeral as u16, (ephemeral >> 16) as u16);
        let picked = |port: u16| low <= port && port <= high;
        if listened || (!picked(local_port) && picked(peer_port)) {
            SERVER
        } else {
            CLIENT
        }
    }
}

/// Direction of the most recent data transfer on a connection.
pub mod direction {
    pub const NONE: u8 = 0;
    pub const IN: u8 = 1;
    pub const OUT: u8 = 2;
}

/// Bits of [`ConnState::flags`].
pub mod conn_flags {
    /// The entry was created from traffic, not from the open: the connection predates the daemon
    /// or its entry was evicted. Counters then start from that point.
    pub const DISCOVERED: u8 = 1 << 0;
    /// A RST was received from the peer.
    pub const PEER_RESET: u8 = 1 << 1;
    /// The connection reached `ESTABLISHED` at some point.
    pub const ESTABLISHED: u8 = 1 << 2;
    /// It reached `CLOSE` without the FIN handshake: a reset was sent or received.
    pub const ABORTED: u8 = 1 << 3;
    /// The request in flight was reported (`RequestStarted`): report its completion.
    pub const SAMPLED: u8 = 1 << 4;
    /// The connection carries one-way messages (see `message::Message::StreamStart`): no
    /// exchange is judged any more.
    pub const STREAM: u8 = 1 << 5;
    /// TLS: the last record in the request direction was a change_cipher_spec, so the next
    /// application_data record is the handshake's Finished (TLS 1.3 in middlebox
    /// compatibility mode), not a request.
    pub const TLS_FINISHED_NEXT: u8 = 1 << 6;
    /// TLS through libssl: a receive of this connection was seen inside an `SSL_read` call
    /// (uprobes on the system's libssl), so its replies are counted when `SSL_read` returns
    /// application data, not at each receive (see `transfer::is_tls_client`).
    pub const TLS_LIBSSL: u8 = 1 << 7;
}

/// Answers of the kernel's `stalltrace_unix_alive` program beyond 0 (released), 1 (open) and
/// 2 (layout unknown), when asked whether the socket's peer closed as well.
pub mod unix_alive {
    /// Open, its peer will send nothing more (released, or shut down for writing), and
    /// nothing the peer sent is left unread.
    pub const PEER_CLOSED_NOTHING_UNREAD: u32 = 3;
    /// Open, its peer will send nothing more, with bytes it sent still unread (or unknown).
    pub const PEER_CLOSED_DATA_UNREAD: u32 = 4;
}

/// Bits of [`ConnState::verdict_flags`].
pub mod verdict_flags {
    /// The peer's FIN found a reply (bytes not yet read by the application) in this
    /// non-server end's receive queue: in `CLOSE_WAIT` the outstanding request can still be
    /// answered by reading it. Without it, a client the peer closed on has nothing left to
    /// wait for ([`crate::transfer::can_complete`]).
    pub const REPLY_UNREAD_AT_PEER_FIN: u8 = 1 << 0;
    /// HTTP/1.x: the copy of the current request-direction run (`http1::RequestRun`) has room
    /// left, so the run's next transfers append to it (pipelined requests written apart).
    pub const REQUEST_RUN_OPEN: u8 = 1 << 1;
}

/// Linux TCP states (`include/net/tcp_states.h`), as reported by `sock/inet_sock_set_state`.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// Transport of a tracked socket ([`ConnState::transport`]). TCP is 0 so that a zeroed entry
/// (every TCP path before other transports were traced) reads as TCP.
pub mod transport {
    pub const TCP: u8 = 0;
    pub const UDP: u8 = 1;
    /// `AF_UNIX` `SOCK_STREAM` or `SOCK_SEQPACKET`.
    pub const UNIX: u8 = 2;
}

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
/// Socket types (`sock.sk_type`).
pub const SOCK_STREAM: u16 = 1;
pub const SOCK_SEQPACKET: u16 = 5;

/// Per-connection state, kept by the kernel programs in the `CONNS` map (keyed by the kernel's
/// `struct sock` address) and copied whole into every event.
///
/// Timestamps are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`). Addresses are in network
/// order; IPv4 addresses occupy the first 4 bytes. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// When the connection was opened (SYN sent, or accepted), or first seen if discovered.
    pub open_ns: u64,
    /// Last TCP state change.
    pub state_ns: u64,
    pub last_recv_ns: u64,
    pub last_send_ns: u64,
    /// When the current run of transfers in `last_dir` began.
    pub dir_since_ns: u64,
    pub bytes_recv: u64,
    pub bytes_sent: u64,
    /// Successful receive / send calls.
    pub recv_calls: u64,
    pub send_calls: u64,
    /// Requests started (server: inbound run after silence or a reply; client: outbound run).
    pub requests: u64,
    /// Exchanges completed (a reply followed a request).
    pub exchanges: u64,
    /// Process (thread group) and thread that last touched the connection.
    pub tgid: u32,
    pub tid: u32,
    /// Epoch of the last event emitted for this connection (see [`Control`]).
    pub notified_epoch: u32,
    pub retransmits: u32,
    pub local_port: u16,
    pub peer_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// One of [`role`].
    pub role: u8,
    /// One of [`tcp_state`].
    pub tcp_state: u8,
    /// One of [`direction`].
    pub last_dir: u8,
    /// Bits of [`conn_flags`].
    pub flags: u8,
    /// One of [`message::proto`]: recognized from the first captured request bytes.
    pub proto: u8,
    /// One of [`transport`].
    pub transport: u8,
    /// Bytes of a housekeeping record still to come in the request direction (a TLS server
    /// reads a record's 5-byte header first, then its body): they are housekeeping too.
    pub housekeeping_left: u16,
    pub _pad2: [u8; 2],
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    /// cgroup v2 id of the owner ([`ConnState::tgid`]) when it became the owner
    /// (`bpf_get_current_cgroup_id`: the inode of its directory under `/sys/fs/cgroup`); 0 until
    /// an owner is known.
    pub cgroup_id: u64,
    /// Inode of the socket's network namespace (`sock.skc_net->ns.inum`, what
    /// `/proc/PID/ns/net` links to); 0 when it cannot be read (see [`Offsets::can_read_netns`]).
    pub netns: u32,
    /// UDP: datagrams sent again during the current (or last) exchange while it was
    /// outstanding (DNS: a query id already sent in it), see [`udp`].
    pub retries: u32,
    /// UDP DNS: the query ids outstanding in the current exchange (valid per `udp_pending`).
    pub query_ids: [u16; 2],
    /// UDP: bits of [`udp::flags`].
    pub udp_flags: u8,
    /// UDP DNS: bit `i` set when `query_ids[i]` awaits its answer.
    pub udp_pending: u8,
    pub _pad3: [u8; 2],
    /// Unix sockets: the peer's `struct sock` address (the key of its own entry); 0 otherwise.
    pub peer_sock: u64,
    /// Unix sockets: the inode numbers of this socket and of its peer (as `ss -x` and
    /// /proc/net/unix show them); they tell a reused sock address apart. 0 otherwise.
    pub inode: u64,
    pub peer_inode: u64,
    /// Unix sockets: the peer's process (thread group id) as the kernel recorded it when the
    /// connection was made (`sk_peer_pid`, what `SO_PEERCRED` returns); 0 otherwise.
    pub peer_tgid: u32,
    /// TCP: what the application had read from the socket before this entry counted any (low
    /// 32 bits of bytes, [`transfer::spliced_bytes`]): set when a connection is found through
    /// its traffic; 0 for one tracked from its handshake.
    pub consumed_base: u32,
    /// HTTP/1.x: the last 8 bytes of the latest transfer in the reply direction (zeros before
    /// them when it moved fewer; all `0xff` when they could not be read): whether a chunked
    /// body's last chunk has gone by (see [`http1`]).
    pub reply_tail: [u8; 8],
    /// Bits of [`verdict_flags`]: what the verdict needs beyond the exchange's direction.
    pub verdict_flags: u8,
    pub _pad5: [u8; 7],
    /// HTTP/2 with its streams followed ([`http2`], `h2_sync` [`http2::sync::TRACKING`]): when
    /// the oldest stream still awaiting its response was opened (ns; 0: none awaits).
    pub h2_oldest_ns: u64,
    /// HTTP/2: when the stream named by `h2_ended_stream` was opened (ns): the last stream
    /// whose response (or reset) came after at least the stall threshold, or that was still
    /// awaiting it at the close; set just before the `QuietEnded` record that reports it.
    pub h2_ended_ns: u64,
    /// HTTP/2: the id of the oldest stream awaiting its response (valid with `h2_oldest_ns`).
    pub h2_oldest_stream: u32,
    /// HTTP/2: see `h2_ended_ns`.
    pub h2_ended_stream: u32,
    /// HTTP/2: streams awaiting their response, as far as the kernel follows them.
    pub h2_open: u8,
    /// HTTP/2: one of [`http2::sync`].
    pub h2_sync: u8,
    /// HTTP/2: how many streams that had awaited their response for at least the threshold
    /// the last transfer answered (1 to 15; 0: none), the oldest of them named by
    /// `h2_ended_*`: the kernel reports `QuietEnded`.
    pub h2_answered_late: u8,
    /// HTTP/2: how the stream named by `h2_ended_stream` ended, one of [`http2::ended`].
    pub h2_ended_how: u8,
    pub _pad6: [u8; 4],
    pub comm: [u8; COMM_LEN],
}

/// Header of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] id.
    pub kind: u32,
    pub _pad: u32,
    /// When it happened (`CLOCK_MONOTONIC` ns).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the connection's identity while it lives.
    pub sock: u64,
}

/// The one record type the kernel writes to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub conn: ConnState,
}

/// Most request bytes captured (`--capture-bytes`).
pub const CAPTURE_MAX: usize = 64;

/// The first bytes of the request in flight on a connection, copied from the syscall's user
/// buffer when the request starts. Held in the `CAPTURES` array (slot chosen by hashing the
/// sock address; `sock` tells whose it is) and appended to `RequestStarted` records.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capture {
    pub sock: u64,
    /// When the request started.
    pub request_ns: u64,
    /// Bytes valid in `bytes`.
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; CAPTURE_MAX],
}

impl Capture {
    /// The captured bytes.
    pub fn data(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(CAPTURE_MAX)]
    }
}

/// A `RequestStarted` record when capture is on: the event, then the capture.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestEvent {
    pub event: ConnEvent,
    pub capture: Capture,
}

/// Longest Unix socket name (`sizeof(sockaddr_un.sun_path)`).
pub const UNIX_PATH_MAX: usize = 108;

/// The names (`sun_path` bytes) both ends of a Unix connection are bound to, read from the
/// kernel's `unix_sock.addr` when the connection is first seen. An accepted socket carries its
/// listener's name; an unbound end (a connecting client, a socketpair) has none (length 0).
/// Abstract names start with a NUL byte and may contain more: they are bytes, not strings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixNames {
    /// Bytes valid in `local` / `peer` (at most [`UNIX_PATH_MAX`]).
    pub local_len: u16,
    pub peer_len: u16,
    pub _pad: u32,
    pub local: [u8; UNIX_PATH_MAX],
    pub peer: [u8; UNIX_PATH_MAX],
}

impl UnixNames {
    /// The local name's bytes.
    pub fn local(&self) -> &[u8] {
        &self.local[..usize::from(self.local_len).min(UNIX_PATH_MAX)]
    }

    /// The peer's name's bytes.
    pub fn peer(&self) -> &[u8] {
        &self.peer[..usize::from(self.peer_len).min(UNIX_PATH_MAX)]
    }

    /// The names carried by a [`EventKind::UnixDiscovered`] record.
    pub fn from_record_tail(bytes: &[u8]) -> Option<Self> {
        let start = core::mem::size_of::<ConnEvent>();
        let tail = bytes.get(start..start + core::mem::size_of::<Self>())?;
        // SAFETY: length checked; every bit pattern is a valid UnixNames.
        Some(unsafe { core::ptr::read_unaligned(tail.as_ptr().cast::<Self>()) })
    }
}

/// A [`EventKind::UnixDiscovered`] record: the event, then the socket names.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnixEvent {
    pub event: ConnEvent,
    pub names: UnixNames,
}

/// Mixes all bits of a `struct sock` address (the murmur3 64-bit finalizer). Sock addresses
/// share their high bits and have aligned low bits, so they must be mixed before being masked
/// into a table slot; the kernel chooses them, so no protection against chosen keys is needed.
#[inline(always)]
pub const fn mix_sock(sock: u64) -> u64 {
    let mut x = sock;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Slot of `sock` in a `CAPTURES` array of `slots` entries (a power of two).
#[inline(always)]
pub const fn capture_slot(sock: u64, slots: u32) -> u32 {
    (mix_sock(sock) as u32) & (slots - 1)
}

/// Key of the `LISTEN_PORTS` map: a listening port in a network namespace (its inode, 0 when
/// namespaces are not read), so that a port listened on in one container does not make the
/// connections of another look like servers.
#[inline(always)]
pub const fn listen_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

/// Key of the `STACK_COUNTS` map: how often a thread was sampled in a user stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tid: u32,
    /// Id in the `STACKS` stack trace map.
    pub stack_id: u32,
}

/// Slots of the per-CPU `LOSS` counter map. Every event the kernel could not deliver and every
/// connection it could not track is counted in one of them.
pub mod loss {
    /// `bpf_ringbuf_reserve` failed: the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// A new connection could not be inserted into the `CONNS` map.
    pub const CONN_INSERT_FAILED: u32 = 1;
    /// HTTP/2 streams the kernel could not follow (their table slots held by older streams
    /// still awaiting their responses): counted once per transfer that opens such streams.
    pub const HTTP2_UNTRACKED: u32 = 2;
    /// HTTP/2 connections whose frames the kernel stopped following (frames out of step,
    /// more frames in one transfer than it walks, bytes it could not read, its stream state
    /// evicted or not insertable): judged by the direction rule from then on.
    pub const HTTP2_FRAMING_LOST: u32 = 3;
    /// Returns of hooked calls that ran no program, found when the same thread enters the next
    /// call (kprobe and syscall rungs): a kretprobe keeps at most `maxactive` calls in flight
    /// (the kernel's default: the number of possible CPUs without full preemption, else at
    /// least 10), so more threads blocked in `tcp_recvmsg` than that lose their receives.
    pub const RETURN_MISSED: u32 = 4;
    pub const SLOTS: u32 = 5;
}

/// Written by the daemon into the single slot of the `CONTROL` array at every sweep.
///
/// The kernel reports a request start only if the connection has not been reported during the
/// current `epoch`; the daemon re-reads every connection reported in the last two epochs. So a
/// busy connection costs at most one event per sweep, however many exchanges it carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub epoch: u32,
    pub _pad: u32,
    /// The coarse clock of connection state ([`clock`]): ns per jiffy, 0 for
    /// `bpf_ktime_get_ns`.
    pub clock_tick_ns: u64,
    /// Its offset (ns, modular), see [`clock::coarse_ns`].
    pub clock_base_ns: u64,
}

/// Byte offsets of kernel struct members, resolved by the daemon from the running kernel's BTF
/// and handed to the programs at load time (CO-RE done by hand: aya's Rust programs cannot
/// emit field relocations). [`Offsets::UNKNOWN`] disables the features that need a member.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `struct sock_common` members, relative to `struct sock`.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// Address family and protocol: tell TCP sockets from others on the raw data hooks.
    pub skc_family: u32,
    pub sk_protocol: u32,
    /// `sock_common.skc_state` (u8): the TCP state, for sockets found through their traffic.
    pub skc_state: u32,
    /// `tcp_sock.rcv_nxt` and `tcp_sock.copied_seq` (u32 sequence numbers): their difference
    /// is what sits unread in the receive queue (as `tcp_inq()` computes it).
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    /// `sock_common.skc_net.net` (a `struct net *`) and `net.ns.inum` (u32): the socket's
    /// network namespace, so that identical endpoints in two namespaces stay two connections.
    pub skc_net: u32,
    pub net_ns_inum: u32,
    /// `sock.sk_type` (u16): `SOCK_STREAM`, `SOCK_SEQPACKET`… (Unix sockets).
    pub sk_type: u32,
    /// `sock.sk_socket` (pointer to the `struct socket`, NULL once the socket is released).
    pub sk_socket: u32,
    /// `sock.sk_peer_pid` (pointer to the peer's `struct pid`).
    pub sk_peer_pid: u32,
    /// `unix_sock.peer` and `unix_sock.addr` (pointers).
    pub unix_peer: u32,
    pub unix_addr: u32,
    /// `unix_address.len` (int: bytes of `name`, `sun_family` included) and `unix_address.name`.
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// `socket_alloc.vfs_inode` (the inode after the `struct socket`, `SOCK_INODE()`), and
    /// `inode.i_ino`.
    pub socket_inode: u32,
    pub inode_ino: u32,
    /// `pid.numbers` and `upid.nr`: `numbers[0].nr` is the pid in the initial namespace.
    pub pid_numbers: u32,
    pub upid_nr: u32,
    /// `sock.sk_receive_queue.qlen` (u32): buffers queued unread (Unix sockets: whether a
    /// closed peer's reply still waits to be read).
    pub sk_receive_queue_qlen: u32,
    /// `sock.sk_shutdown` (u8): `RCV_SHUTDOWN` (1) once the peer will send nothing more (a
    /// Unix peer released, or shut down for writing).
    pub sk_shutdown: u32,
    /// `unix_address.refcnt` (a `refcount_t`, u32): a listener shares its address with every
    /// socket it accepted, so a count above 1 marks the accepted end of a pair whose ends are
    /// both bound.
    pub unix_address_refcnt: u32,
    /// `tcp_sock.bytes_received` (u64): bytes the socket received, all of them (RFC 4898
    /// `tcpEStatsAppHCThruOctetsReceived`); less what is unread, what the application read by
    /// any means, `splice(2)` included ([`transfer::spliced_bytes`]).
    pub tcp_bytes_received: u32,
}

impl Offsets {
    pub const UNKNOWN: u32 = u32::MAX;

    pub const fn unknown() -> Self {
        let u = Self::UNKNOWN;
        Self {
            skc_daddr: u,
            skc_rcv_saddr: u,
            skc_dport: u,
            skc_num: u,
            skc_v6_daddr: u,
            skc_v6_rcv_saddr: u,
            skc_family: u,
            sk_protocol: u,
            skc_state: u,
            tcp_rcv_nxt: u,
            tcp_copied_seq: u,
            skc_net: u,
            net_ns_inum: u,
            sk_type: u,
            sk_socket: u,
            sk_peer_pid: u,
            unix_peer: u,
            unix_addr: u,
            unix_address_len: u,
            unix_address_name: u,
            socket_inode: u,
            inode_ino: u,
            pid_numbers: u,
            upid_nr: u,
            sk_receive_queue_qlen: u,
            sk_shutdown: u,
            unix_address_refcnt: u,
            tcp_bytes_received: u,
        }
    }

    /// Unix stream/seqpacket connections can be tracked: their type, peer, names and inodes
    /// can be read. (The peer's pid is optional: `sk_peer_pid` and `pid.numbers`.)
    pub const fn can_read_unix(&self) -> bool {
        self.skc_family != Self::UNKNOWN
            && self.skc_state != Self::UNKNOWN
            && self.sk_type != Self::UNKNOWN
            && self.sk_socket != Self::UNKNOWN
            && self.unix_peer != Self::UNKNOWN
            && self.unix_addr != Self::UNKNOWN
            && self.unix_address_len != Self::UNKNOWN
            && self.unix_address_name != Self::UNKNOWN
            && self.socket_inode != Self::UNKNOWN
            && self.inode_ino != Self::UNKNOWN
    }

    /// The peer's pid can be read (`sk_peer_pid` → `pid.numbers[0].nr`).
    pub const fn can_read_peer_pid(&self) -> bool {
        self.sk_peer_pid != Self::UNKNOWN
            && self.pid_numbers != Self::UNKNOWN
            && self.upid_nr != Self::UNKNOWN
    }

    /// The network namespace inode can be read from a `struct sock`.
    pub const fn can_read_netns(&self) -> bool {
        self.skc_net != Self::UNKNOWN && self.net_ns_inum != Self::UNKNOWN
    }

    /// The connection's protocol, addresses and ports can be read from a `struct sock`.
    pub const fn can_read_sock(&self) -> bool {
        self.skc_family != Self::UNKNOWN
            && self.sk_protocol != Self::UNKNOWN
            && self.skc_daddr != Self::UNKNOWN
            && self.skc_rcv_saddr != Self::UNKNOWN
            && self.skc_dport != Self::UNKNOWN
            && self.skc_num != Self::UNKNOWN
    }

    /// The receive queue's unread byte count can be read from a `struct tcp_sock`.
    pub const fn can_read_receive_queue(&self) -> bool {
        self.tcp_rcv_nxt != Self::UNKNOWN && self.tcp_copied_seq != Self::UNKNOWN
    }

    /// What the application has read from a `struct tcp_sock` can be computed (received less
    /// unread).
    pub const fn can_read_consumed(&self) -> bool {
        self.can_read_receive_queue() && self.tcp_bytes_received != Self::UNKNOWN
    }

    /// IPv6 addresses can be read from a `struct sock` (absent on kernels without IPv6).
    pub const fn can_read_sock_v6(&self) -> bool {
        self.skc_v6_daddr != Self::UNKNOWN && self.skc_v6_rcv_saddr != Self::UNKNOWN
    }
}

/// Byte offsets of the kernel members that lead from a file descriptor to its socket
/// (`current->files->fdt->fd[fd]`, then the file's inode mode and `private_data`, a
/// `struct socket`, and its `sk`): the syscall tracepoint rung sees descriptors, not sockets.
/// Resolved by the daemon from BTF like [`Offsets`]; [`Offsets::UNKNOWN`] when missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    /// `fdtable.max_fds` (u32) and `fdtable.fd` (`struct file **`).
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    /// `inode.i_mode` (u16): `S_IFSOCK` tells a socket.
    pub inode_mode: u32,
    pub socket_sk: u32,
}

impl FdOffsets {
    pub const fn unknown() -> Self {
        let u = Offsets::UNKNOWN;
        Self {
            task_files: u,
            files_fdt: u,
            fdtable_max_fds: u,
            fdtable_fd: u,
            file_inode: u,
            file_private_data: u,
            inode_mode: u,
            socket_sk: u,
        }
    }
}

/// Where request capture finds the current syscall's number and data arguments in the task's
/// `struct pt_regs` (read through `bpf_task_pt_regs`), per architecture. The layout is kernel
/// internal: the daemon checks it against the running kernel's BTF and turns capture off when
/// it differs, so the programs never read at a wrong offset.
pub mod syscall_regs {
    /// A `struct pt_regs` member: its BTF name (a path from the struct) and byte offset.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Member {
        pub path: &'static [&'static str],
        pub offset: usize,
        /// Bytes.
        pub size: usize,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Layout {
        /// The syscall number.
        pub nr: Member,
        /// The second, third and fifth syscall arguments (the buffer or iovec array, the
        /// count, and `sendto`'s destination address).
        pub arg1: Member,
        pub arg2: Member,
        pub arg4: Member,
        /// Syscall numbers whose second argument locates the data moved.
        pub read: u64,
        pub write: u64,
        pub readv: u64,
        pub writev: u64,
        pub sendto: u64,
        pub recvfrom: u64,
        pub sendmsg: u64,
        pub recvmsg: u64,
        pub sendmmsg: u64,
        pub recvmmsg: u64,
        /// Syscalls that read from a socket without `sock_recv_length`: `splice(2)` and
        /// `sendfile(2)` from a socket (`tcp_splice_read`), and `getsockopt(2)`'s
        /// `TCP_ZEROCOPY_RECEIVE` (see `transfer::spliced_bytes`).
        pub splice: u64,
        pub sendfile: u64,
        pub getsockopt: u64,
    }

    /// x86-64: `orig_ax` holds the number; arguments in `di`, `si`, `dx`, `r10`, `r8`.
    pub const X86_64: Layout = Layout {
        nr: Member {
            path: &["orig_ax"],
            offset: 15 * 8,
            size: 8,
        },
        arg1: Member {
            path: &["si"],
            offset: 13 * 8,
            size: 8,
        },
        arg2: Member {
            path: &["dx"],
            offset: 12 * 8,
            size: 8,
        },
        arg4: Member {
            path: &["r8"],
            offset: 9 * 8,
            size: 8,
        },
        read: 0,
        write: 1,
        readv: 19,
        writev: 20,
        sendto: 44,
        recvfrom: 45,
        sendmsg: 46,
        recvmsg: 47,
        sendmmsg: 307,
        recvmmsg: 299,
        splice: 275,
        sendfile: 40,
        getsockopt: 55,
    };

    /// arm64: `regs[31]`, `sp`, `pc`, `pstate`, `orig_x0`, then `syscallno` (s32). Arguments
    /// are `regs[0..]`: the return value replaces `regs[0]` only after the syscall returns,
    /// and the socket tracepoints fire inside it. Numbers from the generic syscall table.
    pub const AARCH64: Layout = Layout {
        nr: Member {
            path: &["syscallno"],
            offset: 35 * 8,
            size: 4,
        },
        arg1: Member {
            path: &["regs"],
            offset: 8,
            size: 8,
        },
        arg2: Member {
            path: &["regs"],
            offset: 2 * 8,
            size: 8,
        },
        arg4: Member {
            path: &["regs"],
            offset: 4 * 8,
            size: 8,
        },
        read: 63,
        write: 64,
        readv: 65,
        writev: 66,
        sendto: 206,
        recvfrom: 207,
        sendmsg: 211,
        recvmsg: 212,
        sendmmsg: 269,
        recvmmsg: 243,
        splice: 76,
        sendfile: 71,
        getsockopt: 209,
    };

    /// `struct user_msghdr.msg_iov` and `.msg_iovlen` (the same on every 64-bit architecture).
    pub const MSGHDR_IOV: u64 = 16;
    pub const MSGHDR_IOVLEN: u64 = 24;
}

/// Records of the tracepoints the programs read directly, as laid out by the kernel (see
/// `/sys/kernel/tracing/events/<category>/<name>/format`). The daemon checks each field's offset
/// and size against the running kernel's format files before attaching.
pub mod tracepoint {
    /// `sock/inet_sock_set_state` (stable since Linux 4.16).
    #[repr(C)]
    pub struct InetSockSetState {
        pub common: u64,
        pub skaddr: u64,
        pub oldstate: i32,
        pub newstate: i32,
        pub sport: u16,
        pub dport: u16,
        pub family: u16,
        pub protocol: u16,
        pub saddr: [u8; 4],
        pub daddr: [u8; 4],
        pub saddr_v6: [u8; 16],
        pub daddr_v6: [u8; 16],
    }

    /// Leading fields of `tcp/tcp_retransmit_skb`.
    #[repr(C)]
    pub struct TcpRetransmitSkb {
        pub common: u64,
        pub skbaddr: u64,
        pub skaddr: u64,
        pub state: i32,
        pub sport: u16,
    }

    /// Leading field of `tcp/tcp_receive_reset`.
    #[repr(C)]
    pub struct TcpReceiveReset {
        pub common: u64,
        pub skaddr: u64,
    }

    /// Leading fields of `syscalls/sys_enter_*` for the calls whose first argument is a file
    /// descriptor. Every syscall argument takes 8 bytes in these records.
    #[repr(C)]
    pub struct SysEnterFd {
        pub common: u64,
        pub syscall_nr: u64,
        pub fd: u64,
    }

    /// `syscalls/sys_enter_recvfrom` up to its `flags`.
    #[repr(C)]
    pub struct SysEnterRecvfrom {
        pub common: u64,
        pub syscall_nr: u64,
        pub fd: u64,
        pub ubuf: u64,
        pub size: u64,
        pub flags: u64,
    }

    /// `syscalls/sys_enter_recvmsg` up to its `flags`.
    #[repr(C)]
    pub struct SysEnterRecvmsg {
        pub common: u64,
        pub syscall_nr: u64,
        pub fd: u64,
        pub msg: u64,
        pub flags: u64,
    }

    /// `syscalls/sys_exit_*`.
    #[repr(C)]
    pub struct SysExit {
        pub common: u64,
        pub syscall_nr: u64,
        pub ret: i64,
    }
}

// Layouts are part of the ABI: pin them so both sides fail to build on an accidental change.
const _: () = assert!(core::mem::size_of::<ConnState>() == 272);
const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 296);
const _: () = assert!(core::mem::size_of::<UnixNames>() == 224);
const _: () = assert!(core::mem::size_of::<UnixEvent>() == 520);
const _: () = assert!(core::mem::size_of::<Control>() == 24);
const _: () = assert!(core::mem::size_of::<Capture>() == 88);
const _: () = assert!(core::mem::size_of::<http1::RequestRun>() == 1056);
const _: () = assert!(core::mem::size_of::<RequestEvent>() == 384);
const _: () = assert!(core::mem::size_of::<Offsets>() == 112);
const _: () = assert!(core::mem::size_of::<FdOffsets>() == 32);
const _: () = assert!(core::mem::size_of::<http1::ReplyHead>() == 1112);

/// Userspace side: lets the types live in aya's maps.
#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have explicit
    // padding fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for clock::ClockSample {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Capture {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnixNames {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FdOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::http1::ReplyHead {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::http1::RequestRun {}
}

impl ConnEvent {
    /// Decodes a ring buffer record. `None` if the record is shorter than an event (a
    /// mismatched kernel object); longer records are accepted for forward compatibility.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked above; every bit pattern is a valid ConnEvent (integers and
        // byte arrays only), and read_unaligned copes with the ring buffer's 8-byte (not
        // necessarily 16-byte) alignment.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The record's bytes, as the kernel writes them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C) without implicit padding; the slice borrows self.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// The record's kind; `None` for an id this build does not know.
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_u32(self.header.kind)
    }
}

impl Capture {
    /// The capture appended to a record, if the record carries one.
    pub fn from_record_tail(bytes: &[u8]) -> Option<Self> {
        let start = core::mem::size_of::<ConnEvent>();
        let tail = bytes.get(start..start + core::mem::size_of::<Self>())?;
        // SAFETY: length checked; every bit pattern is a valid Capture.
        Some(unsafe { core::ptr::read_unaligned(tail.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn sample() -> ConnEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..5].copy_from_slice(b"nginx");
        ConnEvent {
            header: EventHeader {
                kind: EventKind::RequestStarted as u32,
                _pad: 0,
                ts_ns: 0x0102_0304_0506_0708,
                sock: 0xffff_8880_1234_5678,
            },
            conn: ConnState {
                open_ns: 1,
                state_ns: 2,
                last_recv_ns: 3,
                last_send_ns: 4,
                dir_since_ns: 5,
                bytes_recv: 6,
                bytes_sent: 7,
                recv_calls: 8,
                send_calls: 9,
                requests: 10,
                exchanges: 11,
                tgid: 12,
                tid: 13,
                notified_epoch: 14,
                retransmits: 15,
                local_port: 8080,
                peer_port: 40000,
                family: AF_INET6,
                role: role::SERVER,
                tcp_state: tcp_state::ESTABLISHED,
                last_dir: direction::IN,
                flags: conn_flags::ESTABLISHED,
                proto: 0,
                transport: transport::TCP,
                housekeeping_left: 0,
                _pad2: [0; 2],
                local_addr: [0xfe; 16],
                peer_addr: [0x01; 16],
                cgroup_id: 0x1122_3344_5566_7788,
                netns: 4_026_531_840,
                retries: 0,
                query_ids: [0; 2],
                udp_flags: 0,
                udp_pending: 0,
                _pad3: [0; 2],
                peer_sock: 0,
                inode: 0,
                peer_inode: 0,
                peer_tgid: 0,
                consumed_base: 0,
                reply_tail: *b"a\r\n0\r\n\r\n",
                verdict_flags: 0,
                _pad5: [0; 7],
                h2_oldest_ns: 0,
                h2_ended_ns: 0,
                h2_oldest_stream: 0,
                h2_ended_stream: 0,
                h2_open: 0,
                h2_sync: 0,
                h2_answered_late: 0,
                h2_ended_how: 0,
                _pad6: [0; 4],
                comm,
            },
        }
    }

    #[test]
    fn event_round_trips_through_bytes() {
        let event = sample();
        let decoded = ConnEvent::from_bytes(event.as_bytes()).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(decoded.kind(), Some(EventKind::RequestStarted));
    }

    #[test]
    fn field_offsets_are_stable() {
        // The byte positions the kernel writes; a reorder must be a deliberate ABI change.
        let event = sample();
        let bytes = event.as_bytes();
        assert_eq!(
            &bytes[0..4],
            &(EventKind::RequestStarted as u32).to_ne_bytes()
        );
        assert_eq!(&bytes[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(&bytes[16..24], &0xffff_8880_1234_5678u64.to_ne_bytes());
        let conn = 24;
        assert_eq!(&bytes[conn..conn + 8], &1u64.to_ne_bytes());
        assert_eq!(&bytes[conn + 88..conn + 92], &12u32.to_ne_bytes());
        assert_eq!(&bytes[conn + 104..conn + 106], &8080u16.to_ne_bytes());
        assert_eq!(bytes[conn + 110], role::SERVER);
        assert_eq!(
            &bytes[conn + 152..conn + 160],
            &0x1122_3344_5566_7788u64.to_ne_bytes()
        );
        assert_eq!(
            &bytes[conn + 160..conn + 164],
            &4_026_531_840u32.to_ne_bytes()
        );
        assert_eq!(&bytes[conn + 208..conn + 216], b"a\r\n0\r\n\r\n");
        assert_eq!(&bytes[conn + 256..conn + 261], b"nginx");
    }

    #[test]
    fn captures_ride_at_the_end_of_request_records() {
        let mut capture = Capture {
            sock: 0xffff_8880_1234_5678,
            request_ns: 99,
            len: 5,
            _pad: 0,
            bytes: [0; CAPTURE_MAX],
        };
        capture.bytes[..5].copy_from_slice(b"GET /");
        let record = RequestEvent {
            event: sample(),
            capture,
        };
        // SAFETY: RequestEvent is repr(C) without implicit padding.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&record as *const RequestEvent).cast::<u8>(),
                core::mem::size_of::<RequestEvent>(),
            )
        };
        assert_eq!(ConnEvent::from_bytes(bytes).unwrap(), record.event);
        let decoded = Capture::from_record_tail(bytes).unwrap();
        assert_eq!(decoded, capture);
        assert_eq!(decoded.data(), b"GET /");
        assert!(Capture::from_record_tail(record.event.as_bytes()).is_none());
    }

    #[test]
    fn unix_names_ride_at_the_end_of_unix_records() {
        let mut names = UnixNames {
            local_len: 0,
            peer_len: 5,
            _pad: 0,
            local: [0; UNIX_PATH_MAX],
            peer: [0; UNIX_PATH_MAX],
        };
        names.peer[..5].copy_from_slice(b"\0abc\0");
        let record = UnixEvent {
            event: sample(),
            names,
        };
        // SAFETY: UnixEvent is repr(C) without implicit padding.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&record as *const UnixEvent).cast::<u8>(),
                core::mem::size_of::<UnixEvent>(),
            )
        };
        let decoded = UnixNames::from_record_tail(bytes).unwrap();
        assert_eq!(decoded.local(), b"");
        assert_eq!(decoded.peer(), b"\0abc\0");
        assert!(UnixNames::from_record_tail(record.event.as_bytes()).is_none());
        // A garbled length never reads past the name.
        let garbled = UnixNames {
            local_len: u16::MAX,
            ..names
        };
        assert_eq!(garbled.local().len(), UNIX_PATH_MAX);
    }

    #[test]
    fn capture_slots_spread_aligned_addresses() {
        let slots: std::collections::HashSet<u32> = (0..1024u64)
            .map(|i| capture_slot(0xffff_8880_0000_0000 + i * 2048, 4096))
            .collect();
        assert!(slots.len() > 800, "{}", slots.len());
        assert!(slots.iter().all(|&s| s < 4096));
    }

    #[test]
    fn listen_keys_tell_namespaces_apart() {
        assert_ne!(listen_key(1, 8080), listen_key(2, 8080));
        assert_ne!(listen_key(1, 8080), listen_key(1, 8081));
        assert_eq!(listen_key(0, 8080), 8080);
        assert_eq!(listen_key(u32::MAX, u16::MAX), (1 << 48) - 1);
    }

    #[test]
    fn short_records_are_rejected() {
        let event = sample();
        assert!(ConnEvent::from_bytes(&event.as_bytes()[..100]).is_none());
    }

    #[test]
    fn event_kind_ids_are_stable() {
        for (id, kind) in [
            (1, EventKind::ConnectStarted),
            (2, EventKind::Established),
            (4, EventKind::Discovered),
            (5, EventKind::RequestStarted),
            (6, EventKind::QuietEnded),
            (7, EventKind::Closed),
            (8, EventKind::ExchangeCompleted),
            (9, EventKind::UnixDiscovered),
            (10, EventKind::ReplyResumed),
        ] {
            assert_eq!(EventKind::from_u32(id), Some(kind));
            assert_eq!(kind as u32, id);
        }
        assert_eq!(EventKind::from_u32(0), None);
        assert_eq!(EventKind::from_u32(3), None, "retired id");
        assert_eq!(EventKind::from_u32(11), None);
    }
}
