//! What a diagnosis says: the types carried by `stall.start`, `stall.update`, `stalls` and
//! `show`, and the samples the classifier (`super::classify`) reads. Pure data; the daemon
//! gathers the samples (`stalltrace::sources::{threads, sock_diag}`).

use serde::{Deserialize, Serialize};

use crate::tracker::model::{Role, StallKind};

/// One look at a thread.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadSample {
    /// When it was taken (CLOCK_MONOTONIC ns).
    pub at_ns: u64,
    /// CPU time consumed so far.
    pub cpu_ns: u64,
    /// Scheduler state: `R` running, `S` sleeping, `D` uninterruptible, `T` stopped, `Z` zombie.
    pub state: char,
    pub syscall: SyscallState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyscallState {
    /// On a CPU, in user space.
    Running,
    /// Inside syscall `nr` with these arguments.
    In { nr: i64, args: [u64; 6] },
    /// Blocked, but not in a syscall (e.g. a page fault).
    Outside,
    /// Not readable (permissions, or a kernel without CONFIG_HAVE_ARCH_TRACEHOOK).
    Unknown,
}

/// What the thread behind a stall is doing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum ThreadVerdict {
    /// On a CPU most of the window: a loop.
    Spinning {
        cpu_share: f64,
        /// Innermost function first, where symbols exist.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stack: Vec<String>,
    },
    /// Inside a syscall that is not an event wait: named, with its fd and what the fd is.
    Blocked {
        syscall: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd_target: Option<String>,
        /// The tracked connection behind `fd`, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd_conn: Option<u64>,
    },
    /// Parked in epoll/poll/select/futex/sleep: not working on this connection.
    Waiting { syscall: String },
    /// Runnable or in user space but barely on a CPU: starved.
    Starved { cpu_share: f64 },
    /// The thread or its process exited.
    Gone,
    /// /proc could not tell.
    Unknown,
}

/// The kernel's view of a stalled TCP connection (sock_diag / tcp_info).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSignals {
    /// Bytes received and not yet read by the application.
    pub recv_queue: u32,
    /// Bytes written and not yet acknowledged by the peer.
    pub send_queue: u32,
    pub unacked: u32,
    /// Retransmissions of the current segment (the backoff in progress).
    pub retransmitting: u8,
    pub total_retransmits: u32,
    /// Zero-window probes sent: the peer advertises no room.
    pub zero_window_probes: u8,
    /// The peer's advertised window is zero (when the kernel reports it, Linux 6.2+; never
    /// before the handshake completed: there is no window yet).
    pub zero_window: bool,
    /// Milliseconds since the last data received / sent and the last ACK received
    /// (`tcpi_last_*`); absent before the handshake completed, when the kernel reports the
    /// time since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_data_recv_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_data_sent_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_recv_ms: Option<u32>,
    /// What the application has read from the socket by any means, low 32 bits of bytes
    /// (`tcpi_bytes_received` less the receive queue, Linux 4.1+): set against what the
    /// kernel programs counted (`Conn::counted_reads`). Not reported.
    #[serde(skip)]
    pub bytes_read: Option<u32>,
    /// What the application has handed to the socket by any means, low 32 bits of bytes
    /// (`tcpi_bytes_acked` plus what is queued unacknowledged, `idiag_wqueue`; the SYN of a
    /// connecting socket and a FIN each count one): set against what the kernel programs
    /// counted (`Conn::counted_writes`). A send call still blocked in the kernel has handed
    /// over part of its buffer already. Not reported.
    #[serde(skip)]
    pub bytes_written: Option<u32>,
}

/// What TCP says about a stall (`stall.cause`), from the socket's queues and `tcp_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Server: the connection waits in its listener's accept queue; the application never
    /// called accept() for it (a full or stuck accept loop), so nobody can read its request.
    NotAccepted,
    /// Server: the request sits in the receive queue, never read by the application.
    RequestUnread,
    /// Server: the request was read and nothing was sent back.
    ReadNoReply,
    /// Bytes wait in the send queue and the peer advertises a zero window; on a server, any
    /// reply bytes still queued (the peer takes them slower than they were written).
    PeerNotReading,
    /// The current segment is being retransmitted: the network or the peer host is not
    /// answering.
    NetworkRetransmitting,
    /// Client: the request is still in the send queue, unacknowledged.
    RequestNotDelivered,
    /// Client: bytes from the peer wait unread in the receive queue: the answer (or part of
    /// it) arrived, and the client has not read it. The client is stuck, not the server.
    ResponseUnread,
    /// Client: the request was delivered; the peer has not answered.
    AwaitingPeer,
    /// Server, HTTP/1.x: part of the response went out, then the application stopped writing
    /// it (nothing waits in the send queue).
    ResponseStopped,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAccepted => "not_accepted",
            Self::RequestUnread => "request_unread",
            Self::ReadNoReply => "read_no_reply",
            Self::PeerNotReading => "peer_not_reading",
            Self::NetworkRetransmitting => "network_retransmitting",
            Self::RequestNotDelivered => "request_not_delivered",
            Self::ResponseUnread => "response_unread",
            Self::AwaitingPeer => "awaiting_peer",
            Self::ResponseStopped => "response_stopped",
        }
    }
}

display_as_str!(Cause, Confidence, Evidence);

/// How far a diagnosis can be trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    #[default]
    Full,
    /// Events may be missing (`confidence_reason` says why).
    Partial,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Partial => "partial",
        }
    }
}

/// Everything known about why a connection is stalled; carried by `stall.start`,
/// `stall.update`, `stalls` and `show`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// What TCP says, when the socket could be queried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// `partial`, with `confidence_reason`, when events may be missing.
    pub confidence: Confidence,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_reason: Option<String>,
    /// The responsible thread: for a server, the one that read the request; for a client,
    /// the one that sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<ThreadReport>,
    /// The stalls behind this one, from symptom to root, this connection first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blame: Vec<BlameLink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSignals>,
    /// Segments retransmitted since the stall began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestReport>,
    /// `response_incomplete`: bytes of the response's `Content-Length` body still owed when
    /// the stall began (absent for a chunked body: its length is not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed_bytes: Option<u64>,
    /// The path of the process's executable (`/proc/PID/exe`, read by the diagnosis worker's
    /// first look), for the rules' `exe` key. Not reported: events name the executable.
    #[serde(skip)]
    pub executable_path: Option<String>,
    /// The process's cgroup (v2 path from `/proc/PID/cgroup`, read with the executable), for
    /// the rules' `cgroup` key (container ids are part of it). Not reported.
    #[serde(skip)]
    pub cgroup_path: Option<String>,
}

/// A thread and its verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreadReport {
    pub id: u32,
    #[serde(flatten)]
    pub verdict: ThreadVerdict,
}

/// The request that opened the outstanding exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestReport {
    pub protocol: String,
    pub signature: String,
    /// The captured bytes, hex-encoded: only with `--capture-raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_hex: Option<String>,
}

/// One connection in a blame chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlameLink {
    pub conn: u64,
    pub role: Role,
    /// Its own stall kind, if it is stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    /// `ip:port`; for a Unix connection, the socket's name as in `network.local.address`
    /// ("" when unbound).
    pub local: String,
    pub peer: String,
    /// How the previous link leads here, for people: `thread 12 blocked in recvfrom(fd 7)`,
    /// `peer` (the other end of a local connection), or the timing that links an event loop's
    /// inbound request to its outbound one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// How the previous link leads here, as a fixed word (see [`Evidence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// The evidence for a blame link, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// The thread behind the previous link is blocked in a syscall on this connection's fd.
    #[serde(rename = "fd")]
    Fd,
    /// This is the other end of the previous link, a connection between two local processes.
    #[serde(rename = "peer")]
    Peer,
    /// The previous link's process (an event loop: no fd to follow) sent this stalled request
    /// shortly after it read its own stalled request, and both requests have the same
    /// signature (a proxied path, a forwarded query).
    #[serde(rename = "timing+signature")]
    TimingAndSignature,
    /// As above, without a signature to compare: the closest outbound request in time.
    #[serde(rename = "timing")]
    Timing,
}

impl Evidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fd => "fd",
            Self::Peer => "peer",
            Self::TimingAndSignature => "timing+signature",
            Self::Timing => "timing",
        }
    }
}

impl Diagnosis {
    /// Worth a `stall.update`: the verdicts changed, not just the numbers.
    pub fn differs_materially(&self, other: &Self) -> bool {
        let verdict = |d: &Self| {
            d.thread.as_ref().map(|t| match &t.verdict {
                ThreadVerdict::Spinning { stack, .. } => format!("spinning {stack:?}"),
                ThreadVerdict::Blocked { syscall, fd, .. } => format!("blocked {syscall} {fd:?}"),
                ThreadVerdict::Waiting { syscall } => format!("waiting {syscall}"),
                other => format!("{other:?}"),
            })
        };
        self.cause != other.cause
            || verdict(self) != verdict(other)
            || self
                .blame
                .iter()
                .map(|l| l.conn)
                .ne(other.blame.iter().map(|l| l.conn))
            || self.confidence != other.confidence
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
