//! The connection lifecycle and stall state machine: pure, no I/O.
//!
//! Inputs are kernel events ([`Tracker::on_event`]), the daemon's periodic sweep over the
//! connections worth watching ([`Tracker::sweep`], given a lookup of the kernel's current
//! snapshot), and connections found in /proc at start-up ([`Tracker::adopt`]). Outputs are
//! [`Event`]s, in order.
//!
//! The kernel keeps per-connection counters itself and reports a request start at most once per
//! sweep epoch per connection, so a busy connection costs one event per sweep. Every connection
//! reported during the epoch that just ended is re-read at the next sweep; an idle one is then
//! dropped from the watch list until its next request start is reported. Stalls are found by
//! sweeps (nothing happens on a stalled connection, by definition); their ends are reported by
//! the kernel the moment traffic or a close arrives.
pub mod activity;
pub mod framing;
pub mod model;
pub mod pipeline;
mod table;

use std::{collections::VecDeque, num::NonZeroU64, sync::Arc};

use stalltrace_common::{
    conn_flags, direction,
    http1::{ReplyHead, RequestRun},
    http2, transfer, ConnEvent, ConnState, EventKind, UnixNames,
};

use crate::diagnosis::Diagnosis;
use activity::{Activity, AdoptedExchange};
use framing::ReplyFraming;
use model::{Endpoints, Owner, Resolution, Role, StallKind, UnixInfo};
use pipeline::Pipeline;
pub use table::SockHasher;
use table::{BySock, Table};

/// Something the daemon reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When it happened (CLOCK_MONOTONIC ns).
    pub at_ns: u64,
    pub conn: ConnRef,
    pub detail: Detail,
}

/// A connection's identity as of an event.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnRef {
    pub id: u64,
    pub role: Role,
    pub owner: Owner,
    pub endpoints: Endpoints,
    /// Unix connections: names and peer process (`None` for other transports, or when the
    /// record that carries them was lost).
    pub unix: Option<Arc<UnixInfo>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Open {
        /// Found in /proc at start-up rather than seen opening.
        adopted: bool,
    },
    Close(CloseSummary),
    StallStart {
        kind: StallKind,
        quiet_ms: u64,
        /// HTTP/2: the stream awaiting its response (see [`Stall::http2_stream`]).
        http2_stream: Option<u32>,
        /// Added by the daemon (the tracker does no I/O).
        diagnosis: Option<Box<Diagnosis>>,
    },
    /// The diagnosis of an open stall changed (emitted by the daemon).
    StallUpdate {
        kind: StallKind,
        quiet_ms: u64,
        http2_stream: Option<u32>,
        diagnosis: Box<Diagnosis>,
    },
    StallEnd {
        kind: StallKind,
        /// From the start of the quiet stretch to its end.
        duration_ms: u64,
        resolution: Resolution,
        /// UDP: the request was sent again this many times while it waited (see
        /// `stalltrace_common::udp`); 0 on other transports.
        retries: u32,
        http2_stream: Option<u32>,
        /// HTTP/2: see [`Stall::http2_late_streams`].
        http2_late_streams: u32,
        /// HTTP/2, [`Resolution::StreamReset`]: the end that reset the stream.
        http2_reset_by: Option<Role>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct CloseSummary {
    pub how: Resolution,
    pub totals: Totals,
    /// A stall was open when the connection closed, or was ended by the close.
    pub closed_while_stalled: bool,
    pub duration_ms: u64,
    /// The totals cover the whole connection. False when it was found already open, when the
    /// kernel lost its state (map eviction), or when its close was never seen.
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sends: u64,
    pub receives: u64,
    pub requests: u64,
    pub exchanges: u64,
    pub retransmits: u32,
}

impl Totals {
    pub fn from_kernel(state: &ConnState) -> Self {
        Self {
            bytes_sent: state.bytes_sent,
            bytes_received: state.bytes_recv,
            sends: state.send_calls,
            receives: state.recv_calls,
            requests: state.requests,
            exchanges: state.exchanges,
            retransmits: state.retransmits,
        }
    }
}

/// An open stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub kind: StallKind,
    /// Start of the quiet stretch (last transfer in the request direction, or connect(); for
    /// an HTTP/2 stream, when it was opened).
    pub quiet_since_ns: u64,
    /// HTTP/2 with its streams followed by the kernel: the id of the stream that awaits its
    /// response (the stall is that stream's, not the connection's).
    pub http2_stream: Option<u32>,
    /// When it was reported.
    pub reported_ns: u64,
    exchanges_at_start: u64,
    /// `response_incomplete` with a `Content-Length` body: the bytes of it still owed when the
    /// stall began.
    pub owed_bytes: Option<u64>,
    /// When the request behind the stall last moved (ns): the quiet's start, except for
    /// `response_incomplete`, whose quiet starts with the response. Blame chains pair a
    /// proxy's inbound and outbound requests by it.
    pub request_ns: u64,
    /// Sweeps re-read a stalled connection's kernel entry no earlier than this.
    next_check_ns: u64,
    /// HTTP/1.x: a pipelined request's, owed after the responses before it completed
    /// ([`pipeline`]); its quiet starts when the last of them ended.
    pub pipelined: bool,
    /// Opened by [`Tracker::request_unread`]: its request was never read, so no request the
    /// kernel captured on this connection is its.
    pub unread: bool,
    /// HTTP/2: other streams of the connection answered (or reset) past the threshold while
    /// this stall lasted, or by the same read or write as its own stream, each a stall of
    /// its own that this one hid (a connection reports one at a time; up to 15 per read or
    /// write).
    pub http2_late_streams: u32,
}

/// A tracked connection. Every tracked end pays for its record (152 bytes, boxed: 160 with
/// glibc's chunk header; 200 000 ends on a busy host): what few connections use lives in one
/// box of its own ([`Extras`]), and options take no more room than their values.
#[derive(Clone, Debug)]
pub struct Conn {
    pub id: u64,
    pub role: Role,
    pub endpoints: Endpoints,
    pub owner: Owner,
    pub opened_ns: u64,
    pub adopted: bool,
    /// Boxed: stalls are rare, and every tracked connection pays for this field.
    pub stall: Option<Box<Stall>>,
    /// See [`Conn::quiet_since`] (a quiet stretch cannot start at 0 ns, the clock's start).
    quiet_since: Option<NonZeroU64>,
    /// Some of this connection's history is missing (see [`CloseSummary::complete`]).
    pub incomplete: bool,
    /// UDP: retries of the current (or last) exchange, as of the latest kernel snapshot.
    pub retries: u32,
    /// TCP: what the kernel entry counted as moved, as of the latest snapshot (see
    /// [`Counted`]).
    pub counted: Counted,
    extras: Option<Box<Extras>>,
    /// `open_ns` of the kernel entry this record follows: tells a reused sock address apart.
    kernel_open_ns: u64,
    announced: bool,
    closed_while_stalled: bool,
    watch_epoch: u32,
    missing_sweeps: u8,
}

// Every tracked end pays for it: see `Conn`.
const _: () = assert!(std::mem::size_of::<Conn>() <= 152);

/// What a connection's kernel entry counted as moved, on the socket's own scale, for the
/// diagnosis to set against what the socket says (`TcpSignals::bytes_read`,
/// `bytes_written`). Two words and which of them are known, not two `Option<u32>` (8 bytes
/// less a record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    reads: u32,
    writes: u32,
    known: u8,
}

impl Counted {
    const READS: u8 = 1;
    const WRITES: u8 = 2;

    /// From a TCP entry: what it counted as read ([`transfer::counted_reads`]) when that scale
    /// is known (not for an entry found through its traffic without splice reads on), and as
    /// sent (low 32 bits) when it was tracked from its handshake.
    fn from_kernel(state: &ConnState) -> Self {
        let (reads, writes) = (counted_reads(state), counted_writes(state));
        Self {
            reads: reads.unwrap_or(0),
            writes: writes.unwrap_or(0),
            known: (u8::from(reads.is_some()) * Self::READS)
                | (u8::from(writes.is_some()) * Self::WRITES),
        }
    }

    /// Bytes read (low 32 bits), if known.
    pub fn reads(&self) -> Option<u32> {
        (self.known & Self::READS != 0).then_some(self.reads)
    }

    /// Bytes sent (low 32 bits), if known.
    pub fn writes(&self) -> Option<u32> {
        (self.known & Self::WRITES != 0).then_some(self.writes)
    }
}

/// The fields of a [`Conn`] that few connections use, boxed together.
#[derive(Clone, Debug, Default)]
struct Extras {
    /// Unix connections: see [`ConnRef::unix`].
    unix: Option<Arc<UnixInfo>>,
    /// HTTP/1.x: the framing of the latest response, once a sweep read its head.
    reply: Option<Box<ReplyFraming>>,
    /// HTTP/1.x: the requests pipelined before the latest response, when there were several.
    pipeline: Option<Box<Pipeline>>,
    /// When the quiet of the latest stall that ended began (ns): see [`Conn::ended_quiet`].
    ended_quiet_since: Option<NonZeroU64>,
}

impl Conn {
    /// A record with no request outstanding, no stall and nothing counted yet.
    fn new(id: u64, role: Role, endpoints: Endpoints, owner: Owner, opened_ns: u64) -> Self {
        Self {
            id,
            role,
            endpoints,
            owner,
            opened_ns,
            adopted: false,
            stall: None,
            quiet_since: None,
            incomplete: false,
            retries: 0,
            counted: Counted::default(),
            extras: None,
            kernel_open_ns: 0,
            announced: false,
            closed_while_stalled: false,
            watch_epoch: 0,
            missing_sweeps: 0,
        }
    }

    /// Start of the quiet stretch of the request outstanding at the last sweep (ns), if any.
    pub fn quiet_since(&self) -> Option<u64> {
        self.quiet_since.map(NonZeroU64::get)
    }

    fn set_quiet_since(&mut self, since: Option<u64>) {
        self.quiet_since = since.and_then(NonZeroU64::new);
    }

    /// Unix connections: see [`ConnRef::unix`].
    pub fn unix(&self) -> Option<&Arc<UnixInfo>> {
        self.extras.as_ref()?.unix.as_ref()
    }

    /// HTTP/1.x: the framing of the latest response, once a sweep read its head.
    fn reply(&self) -> Option<&ReplyFraming> {
        self.extras.as_ref()?.reply.as_deref()
    }

    fn reply_mut(&mut self) -> Option<&mut ReplyFraming> {
        self.extras.as_mut()?.reply.as_deref_mut()
    }

    /// HTTP/1.x: the requests pipelined before the latest response, when there were several.
    fn pipeline(&self) -> Option<&Pipeline> {
        self.extras.as_ref()?.pipeline.as_deref()
    }

    fn pipeline_mut(&mut self) -> Option<&mut Pipeline> {
        self.extras.as_mut()?.pipeline.as_deref_mut()
    }

    /// Whether a stall that began its quiet at `quiet_since` (ns) ended already. A client
    /// whose response and the server's FIN come together has that end reported twice at
    /// times: by the receive's program and by the state change's, run on two CPUs at once,
    /// each before the other's write to the entry shows. The second is not a new stall.
    fn ended_quiet(&self, quiet_since: u64) -> bool {
        self.extras
            .as_ref()
            .and_then(|extras| extras.ended_quiet_since)
            .is_some_and(|ended| ended.get() == quiet_since)
    }

    fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// When the quiet of its open stall began (ns), as reported: never before the connection
    /// opened (that time is precise, the quiet's start on the state clock, up to a tick
    /// behind), but for an adopted connection, whose request may predate the daemon.
    pub fn stall_since_ns(&self) -> Option<u64> {
        let since = self.stall.as_deref()?.quiet_since_ns;
        Some(if self.adopted {
            since
        } else {
            since.max(self.opened_ns)
        })
    }

    /// What the connection is doing as of the kernel snapshot `state`, its latest HTTP/1.x
    /// response's framing and the requests pipelined before it considered.
    pub fn activity(&self, state: &ConnState) -> Activity {
        pipeline::assess(state, self.reply(), self.pipeline())
    }

    /// The first bytes of the request behind an open pipelined stall (the capture holds the
    /// run's first request, not this one).
    pub fn pipelined_request(&self) -> Option<&[u8]> {
        self.stall.as_ref().filter(|stall| stall.pipelined)?;
        self.pipeline()?.owed_request()
    }

    pub fn reference(&self) -> ConnRef {
        ConnRef {
            id: self.id,
            role: self.role,
            owner: self.owner,
            endpoints: self.endpoints,
            unix: self.unix().cloned(),
        }
    }

    /// Takes what a newer kernel snapshot knows better.
    fn refresh(&mut self, state: &ConnState) {
        if let Some(owner) = Owner::from_kernel(state) {
            self.owner = owner;
        }
        self.retries = state.retries;
        self.counted = Counted::from_kernel(state);
        if self.endpoints.local_port == 0 {
            // connect() picks the local port after the SYN_SENT transition. (A Unix entry's
            // peer inode may be 0, where the tracker knows it from the peer: keep that.)
            let endpoints = Endpoints::from_kernel(state);
            if endpoints
                .unix_inodes()
                .is_none_or(|inodes| inodes.peer != 0)
            {
                self.endpoints = endpoints;
            }
        }
    }
}

/// What a TCP entry counted as read, on the socket's scale, if its base is known: counted
/// from the handshake, or found through its traffic with the base read then (`consumed_base`
/// set; 0 there means not read, or nothing read before: either way not trusted).
fn counted_reads(state: &ConnState) -> Option<u32> {
    let base_known = state.flags & conn_flags::DISCOVERED == 0 || state.consumed_base != 0;
    (state.transport == stalltrace_common::transport::TCP && base_known)
        .then(|| transfer::counted_reads(state))
}

/// What a TCP entry counted as sent, on the socket's scale (from the handshake), if it was
/// tracked from its handshake (an entry found through its traffic missed the start).
fn counted_writes(state: &ConnState) -> Option<u32> {
    (state.transport == stalltrace_common::transport::TCP
        && state.flags & conn_flags::DISCOVERED == 0)
        .then_some(state.bytes_sent as u32)
}

/// A connection found in /proc at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct Adoption {
    pub endpoints: Endpoints,
    pub role: Role,
    pub owner: Owner,
}

/// Counters for `stalltrace status` and loss reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Records with an unknown event kind (a mismatched kernel object).
    pub unknown_events: u64,
    /// Connections whose kernel state was evicted from the map and rebuilt from traffic.
    pub evictions: u64,
    /// Connections whose close was never seen (the kernel entry vanished, or the sock address
    /// was reused before a close event arrived).
    pub lost_closes: u64,
    /// Connections reported late by [`Tracker::reconcile`], their opening events lost.
    pub recovered: u64,
    /// Ring records of an earlier connection at an address, drained after a resynchronization
    /// had tracked that address's newer connection: passed over (their connection is gone).
    pub late_records: u64,
    /// HTTP/1.x responses whose head the kernel no longer held when a sweep looked (its slot
    /// reused by a later response, or evicted): their framing is unknown, and not judged.
    pub reply_heads_missed: u64,
    /// HTTP/1.x request-direction runs (before a response a sweep read the head of) that
    /// held several requests, counted ([`pipeline`]).
    pub http1_pipelined_runs: u64,
    /// Such runs whose requests could not all be counted (see [`pipeline::Count::all`]):
    /// requests pipelined behind those counted are judged by the direction rule alone.
    pub http1_runs_uncounted: u64,
}

/// What one resynchronization ([`Tracker::begin_resync`]) found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciled {
    /// Kernel connections the tracker did not know or had not reported, now tracked or reported.
    pub recovered: usize,
    /// Tracked connections missing from the kernel map, now watched to confirm their close.
    pub vanished: usize,
    /// Kernel entries passed over: their connection closed, or another took its address,
    /// after the snapshot began.
    pub superseded: usize,
}

/// A resynchronization in progress.
#[derive(Default)]
struct Resync {
    /// Keys of the snapshot's entries so far.
    seen: BySock<()>,
    /// Addresses whose connection closed or was replaced since the snapshot began, with the
    /// newest kernel open time (ns) of a connection gone from there: entries of that
    /// connection or older are outdated; a newer one's (the address taken again, its records
    /// lost) is not.
    superseded: BySock<u64>,
    found: Reconciled,
}

/// Sweeps a kernel entry may be missing before the connection's close is taken as lost.
const MISSING_SWEEPS_BEFORE_LOST: u8 = 3;
/// Idle connections each sweep also re-reads, in turn: a connection whose close was never
/// reported (its kernel entry gone) is found and closed as lost within a cycle through the
/// table, instead of staying listed for ever.
const AUDIT_PER_SWEEP: usize = 128;
/// How often sweeps re-read the kernel entry of a stalled connection. The kernel reports a
/// stall's end the moment it happens; the re-read catches an end whose event was lost, or
/// one no transfer reports (a request that sat unread, then read and answered), dated
/// exactly either way. Thousands of open stalls then cost a map read each per second, not
/// per sweep.
const STALLED_RECHECK_NS: u64 = 1_000_000_000;
/// Kernel reads between two looks at a sweep's clock.
pub const SWEEP_CLOCK_EVERY: usize = 64;

pub struct Tracker {
    stall_after_ns: u64,
    conns: Table,
    /// Connections re-read at sweeps, with the ticket of their place in `watch_queue`.
    watched: BySock<u64>,
    /// Sweep order (round robin); entries whose ticket no longer matches are stale.
    watch_queue: VecDeque<(u64, u64)>,
    next_ticket: u64,
    /// Most kernel entries one sweep reads, and most time it reads for; the rest wait for
    /// the next sweeps.
    sweep_budget: usize,
    sweep_time: std::time::Duration,
    /// Connections still to audit in the current cycle through the table.
    audit: Vec<u64>,
    next_id: u64,
    stats: Stats,
    /// Inodes of the Unix sockets connected when the daemon started (their connections are
    /// found at their first transfer, like new ones): each is taken out when found.
    preexisting_unix: std::collections::HashSet<u64>,
    /// Adopted connections not taken over by the kernel yet, by id: what their socket said of
    /// their exchange at start-up ([`Tracker::set_adopted_exchange`]).
    adopted_exchanges: std::collections::HashMap<u64, AdoptedExchange>,
    /// Those of them whose inferred request is not yet quiet for the threshold: (id, since).
    adopted_due: Vec<(u64, u64)>,
    /// A resynchronization with the kernel map in progress.
    resync: Option<Box<Resync>>,
}

impl Tracker {
    pub fn new(stall_after_ns: u64) -> Self {
        Self {
            stall_after_ns,
            conns: Table::default(),
            watched: BySock::default(),
            watch_queue: VecDeque::new(),
            next_ticket: 0,
            sweep_budget: usize::MAX,
            sweep_time: std::time::Duration::MAX,
            audit: Vec::new(),
            next_id: 1,
            stats: Stats::default(),
            preexisting_unix: Default::default(),
            adopted_exchanges: Default::default(),
            adopted_due: Vec::new(),
            resync: None,
        }
    }

    /// The inodes of the Unix sockets connected before the daemon started (/proc/net/unix):
    /// a Unix connection is found at its first transfer, and one of these is then reported
    /// as adopted, its totals incomplete.
    pub fn set_preexisting_unix(&mut self, inodes: std::collections::HashSet<u64>) {
        self.preexisting_unix = inodes;
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Bounds the kernel reads of one sweep, in count and in time, so that a burst of new
    /// connections (all watched for an epoch) cannot stall the daemon's loop: the excess is
    /// read by the next sweeps. The time is checked every [`SWEEP_CLOCK_EVERY`] reads (a read
    /// costs ~1 µs, ten times that with both cores busy), so a sweep reads at least that many.
    pub fn set_sweep_budget(&mut self, reads: usize, time: std::time::Duration) {
        self.sweep_budget = reads.max(1);
        self.sweep_time = time;
    }

    /// Returns memory held since a burst (every new connection is watched for an epoch).
    /// True when something was given back.
    pub fn compact(&mut self) -> bool {
        let live = self.watched.len().max(1024);
        let mut shrunk = self.conns.compact();
        if self.watched.capacity() > 4 * live {
            self.watched.shrink_to(2 * live);
            shrunk = true;
        }
        if self.watch_queue.capacity() > 4 * live {
            self.watch_queue.shrink_to(2 * live);
            shrunk = true;
        }
        shrunk
    }

    fn watch(&mut self, sock: u64) {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.watched.entry(sock) {
            entry.insert(self.next_ticket);
            self.watch_queue.push_back((sock, self.next_ticket));
            self.next_ticket += 1;
        }
    }

    pub fn stall_after_ns(&self) -> u64 {
        self.stall_after_ns
    }

    /// Every tracked connection, with its kernel key when the kernel knows it.
    pub fn conns(&self) -> impl Iterator<Item = (Option<u64>, &Conn)> {
        self.conns.iter()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection the kernel knows as `sock`.
    pub fn conn(&self, sock: u64) -> Option<&Conn> {
        self.conns.get(sock)
    }

    /// A connection by id, with its kernel key.
    pub fn find_by_id(&self, id: u64) -> Option<(Option<u64>, &Conn)> {
        self.conns.by_id(id)
    }

    /// A connection by its endpoints, with its kernel key.
    pub fn find_by_endpoints(&self, endpoints: &Endpoints) -> Option<(Option<u64>, &Conn)> {
        self.conns.by_endpoints(endpoints)
    }

    /// The Unix connection end whose socket has inode `inode`, with its kernel key.
    pub fn find_unix_by_inode(&self, inode: u64) -> Option<(Option<u64>, &Conn)> {
        self.conns.by_unix_inode(inode)
    }

    /// Watched connections whose outstanding request has been quiet since before `since_ns`
    /// and is not (yet) a stall: the ones about to stall.
    pub fn suspects(&self, since_ns: u64) -> Vec<u64> {
        self.watched
            .keys()
            .copied()
            .filter(|sock| {
                self.conns.get(*sock).is_some_and(|conn| {
                    conn.stall.is_none() && conn.quiet_since().is_some_and(|q| q <= since_ns)
                })
            })
            .collect()
    }

    /// Records the owner of a connection found from /proc (for one that never transferred).
    pub fn set_owner(&mut self, sock: u64, owner: Owner) {
        if let Some(conn) = self.conns.get_mut(sock) {
            conn.owner = owner;
        }
    }

    /// Bytes have sat unread in the receive queue of `sock` since `quiet_since` (seen by
    /// sock_diag: the application never read them, so no transfer reported them); `state` is
    /// the kernel entry's snapshot, if it has one. Opens an `unanswered_request` stall once
    /// they have been quiet for the threshold, unless they need not be a request
    /// ([`activity::unread_may_be_request`]). Returns whether a stall was opened.
    pub fn request_unread(
        &mut self,
        sock: u64,
        state: Option<&ConnState>,
        quiet_since: u64,
        now: u64,
        out: &mut Vec<Event>,
    ) -> bool {
        let stall_after_ns = self.stall_after_ns;
        let Some(conn) = self.conns.get_mut(sock) else {
            return false;
        };
        if conn.stall.is_some()
            || now.saturating_sub(quiet_since) < stall_after_ns
            || state.is_some_and(|state| !activity::unread_may_be_request(state))
        {
            return false;
        }
        let mark = out.len();
        // Its exchanges so far are unknown here: only a reply (or a close) ends it.
        start_stall(
            conn,
            StallKind::UnansweredRequest,
            quiet_since,
            now,
            None,
            u64::MAX,
            out,
        );
        if let Some(stall) = conn.stall.as_deref_mut() {
            stall.unread = true;
        }
        self.conns.note_stalls(&out[mark..]);
        self.watch(sock);
        true
    }

    /// Open stalls, oldest first.
    pub fn stalls(&self) -> Vec<(&Conn, Stall)> {
        let mut stalls: Vec<_> = self
            .conns
            .stalled()
            .filter_map(|conn| conn.stall.as_deref().map(|stall| (conn, *stall)))
            .collect();
        stalls.sort_by_key(|(conn, stall)| (stall.quiet_since_ns, conn.id));
        stalls
    }

    /// Ends every open stall at `now` as `daemon_stopped`: the daemon stops, and whoever reads
    /// its events must not keep them open forever.
    pub fn stop(&mut self, now: u64, out: &mut Vec<Event>) {
        let mark = out.len();
        let stalled: Vec<(Option<u64>, u64)> = self
            .conns
            .stalled()
            .filter_map(|conn| Some((self.conns.by_id(conn.id)?.0, conn.id)))
            .collect();
        for (sock, id) in stalled {
            let conn = match sock {
                Some(sock) => self.conns.get_mut(sock),
                None => self.conns.adopted_by_id_mut(id),
            };
            if let Some(conn) = conn {
                end_stall(conn, now, Resolution::DaemonStopped, out);
            }
        }
        self.conns.note_stalls(&out[mark..]);
    }

    /// Open stalls.
    pub fn stalled(&self) -> usize {
        self.conns.stalled_count()
    }

    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    /// Registers a connection that was already open when the daemon started.
    pub fn adopt(&mut self, adoption: Adoption, now: u64, out: &mut Vec<Event>) {
        if self.conns.by_endpoints(&adoption.endpoints).is_some() {
            return;
        }
        let id = self.take_id();
        let mut conn = Conn::new(id, adoption.role, adoption.endpoints, adoption.owner, now);
        conn.adopted = true;
        conn.incomplete = true;
        announce(&mut conn, now, out);
        self.conns.insert_adopted(conn);
    }

    /// What the socket of adopted connection `endpoints` says of its exchange (sock_diag at
    /// start-up, [`activity::infer_adopted`]): until the kernel sees its traffic, it is shown
    /// so (`unknown`, `idle` or `active`), and a request outstanding for the threshold opens
    /// its stall at the next sweep, dated from the inferred start of the quiet.
    pub fn set_adopted_exchange(&mut self, endpoints: &Endpoints, exchange: AdoptedExchange) {
        let Some(id) = self.conns.adopted_id(endpoints) else {
            return;
        };
        self.adopted_exchanges.insert(id, exchange);
        if let AdoptedExchange::Outstanding { since } = exchange {
            self.adopted_due.push((id, since));
        }
    }

    /// The endpoints of the connections adopted at start-up that no kernel record has taken
    /// over: what [`Tracker::retire_adopted`] is given back, checked against the sockets
    /// still open.
    pub fn adopted_endpoints(&self) -> Vec<Endpoints> {
        self.conns.adopted_endpoints().copied().collect()
    }

    /// Closes the adopted connections in `gone`, whose sockets are no longer open (read from
    /// /proc after kernel records were lost): their close record was lost, and nothing else
    /// removes a connection the kernel programs never saw — sweeps, audits and
    /// resynchronizations read kernel entries only. Each closes as a close never seen
    /// (`complete: false`, counted in `lost_closes`), an open stall ending `closed`; an
    /// endpoint no longer adopted (taken over or closed since) is passed over. Returns how many
    /// closed.
    pub fn retire_adopted(
        &mut self,
        gone: impl IntoIterator<Item = Endpoints>,
        now: u64,
        out: &mut Vec<Event>,
    ) -> usize {
        let mark = out.len();
        let mut closed = 0;
        for endpoints in gone {
            let Some(conn) = self.conns.remove_adopted(&endpoints) else {
                continue;
            };
            self.adopted_exchanges.remove(&conn.id);
            self.close_unseen(conn, now, out);
            closed += 1;
        }
        self.conns.note_stalls(&out[mark..]);
        closed
    }

    /// What the socket said of adopted connection `id`'s exchange, while the kernel has not
    /// seen its traffic; `None` for other connections.
    pub fn adopted_exchange(&self, id: u64) -> Option<AdoptedExchange> {
        self.adopted_exchanges.get(&id).copied()
    }

    /// Opens the stalls of adopted connections whose inferred request has become quiet for
    /// the threshold.
    fn judge_adopted(&mut self, now: u64, out: &mut Vec<Event>) {
        if self.adopted_due.is_empty() {
            return;
        }
        let mark = out.len();
        let stall_after_ns = self.stall_after_ns;
        let conns = &mut self.conns;
        self.adopted_due.retain(|&(id, since)| {
            let Some(conn) = conns.adopted_by_id_mut(id) else {
                return false; // taken over by the kernel, or closed
            };
            conn.set_quiet_since(Some(since));
            if now.saturating_sub(since) < stall_after_ns {
                return true;
            }
            if conn.stall.is_none() {
                let kind = StallKind::for_role(conn.role);
                start_stall(conn, kind, since, now, None, 0, out);
            }
            false
        });
        self.conns.note_stalls(&out[mark..]);
    }

    /// Applies one kernel record.
    pub fn on_event(&mut self, event: &ConnEvent, out: &mut Vec<Event>) {
        let mark = out.len();
        self.apply_event(event, None, out);
        self.conns.note_stalls(&out[mark..]);
    }

    /// Applies a [`EventKind::UnixDiscovered`] record with the socket names it carries.
    pub fn on_unix_event(&mut self, event: &ConnEvent, names: &UnixNames, out: &mut Vec<Event>) {
        let mark = out.len();
        let info = Arc::new(UnixInfo::from_kernel(&event.conn, names));
        self.apply_event(event, Some(info), out);
        self.conns.note_stalls(&out[mark..]);
    }

    fn apply_event(
        &mut self,
        event: &ConnEvent,
        unix: Option<Arc<UnixInfo>>,
        out: &mut Vec<Event>,
    ) {
        self.stats.events += 1;
        let Some(kind) = event.kind() else {
            self.stats.unknown_events += 1;
            return;
        };
        let sock = event.header.sock;
        let at = event.header.ts_ns;
        let state = &event.conn;
        if self
            .conns
            .get(sock)
            .is_some_and(|known| state.open_ns < known.kernel_open_ns)
        {
            // A record of an earlier connection at this address, still in the ring when a
            // resynchronization read the newer one's entry (a burst that overflowed the ring
            // leaves a backlog): that connection is gone, and its record must not close or
            // replace the newer one.
            self.stats.late_records += 1;
            return;
        }
        if kind == EventKind::Closed {
            self.superseded(sock, state.open_ns);
            self.on_closed(sock, state, at, out);
            return;
        }
        let before = self.conns.get(sock).map(|conn| conn.id);
        if kind == EventKind::ConnectStarted {
            if let Some(stale) = self.conns.remove(sock) {
                self.close_unseen(stale, at, out);
            }
        }
        let stall_after_ns = self.stall_after_ns;
        self.conn_for(sock, state, at, out);
        if self.conns.get(sock).map(|conn| conn.id) != before {
            // Connections before this one at the address are gone.
            self.superseded(sock, state.open_ns.saturating_sub(1));
        }
        self.refresh(sock, state, at, out);
        if state.peer_sock != 0 {
            self.conns.link_unix_peers(sock, state.peer_sock);
        }
        let conn = self.conns.get_mut(sock).expect("conn_for tracks it");
        if let Some(unix) = unix.filter(|_| conn.unix().is_none()) {
            conn.extras_mut().unix = Some(unix);
        }
        match kind {
            // A passive connection waits for its first transfer to be reported with its owner.
            EventKind::Established if conn.role == Role::Server => {}
            EventKind::Established => {
                let pending = conn
                    .stall
                    .as_ref()
                    .filter(|s| s.kind == StallKind::ConnectPending);
                if pending.is_none() && at.saturating_sub(state.open_ns) >= stall_after_ns {
                    // The handshake took longer than the threshold between two sweeps.
                    let threshold_at = state.open_ns + stall_after_ns;
                    start_stall(
                        conn,
                        StallKind::ConnectPending,
                        state.open_ns,
                        threshold_at,
                        None,
                        0,
                        out,
                    );
                }
                if conn.stall.is_some() {
                    end_stall(conn, at, Resolution::Response, out);
                }
                announce(conn, at, out);
            }
            EventKind::QuietEnded if activity::http2_tracking(state) => {
                // An HTTP/2 stream awaited its response past the threshold and was answered (or
                // reset), or the connection closed on it: that stream's stall ends.
                let stream = Some(state.h2_ended_stream);
                if conn.stall.is_none() {
                    let (since, kind) = (state.h2_ended_ns, StallKind::for_role(conn.role));
                    let threshold_at = since + stall_after_ns;
                    start_stall(conn, kind, since, threshold_at, stream, 0, out);
                }
                // Streams answered late by the same transfer, besides the one named.
                let others = u32::from(state.h2_answered_late.saturating_sub(1));
                match conn.stall.as_deref_mut() {
                    Some(stall) if stall.http2_stream == stream => {
                        stall.http2_late_streams += others;
                        let still_open =
                            state.h2_open > 0 && state.h2_oldest_stream == state.h2_ended_stream;
                        let how = match activity::assess(state) {
                            Activity::Ending { how, .. } if still_open => how,
                            _ => Resolution::Response,
                        };
                        let reset_by = match state.h2_ended_how {
                            http2::ended::RESET_BY_CLIENT => Some(Role::Client),
                            http2::ended::RESET_BY_SERVER => Some(Role::Server),
                            _ => None,
                        };
                        match reset_by {
                            Some(by) if how == Resolution::Response => {
                                end_stream_stall(conn, at, by, out)
                            }
                            _ => end_stall(conn, at, how, out),
                        }
                    }
                    // Another stream's stall is open: these ended hidden behind it.
                    Some(stall) => stall.http2_late_streams += 1 + others,
                    None => {}
                }
            }
            EventKind::QuietEnded
                if conn.stall.is_none() && conn.ended_quiet(activity::last_request_ns(state)) => {}
            EventKind::QuietEnded => {
                // The kernel saw quiet of at least the threshold end with this transfer or close.
                if conn.stall.is_none() {
                    let quiet_since = activity::last_request_ns(state);
                    let kind = StallKind::for_role(conn.role);
                    let threshold_at = quiet_since + stall_after_ns;
                    let exchanges = state.exchanges;
                    start_stall(conn, kind, quiet_since, threshold_at, None, exchanges, out);
                }
                // What happened first decides: a reply (the request is no longer outstanding,
                // even if a FIN came with it), else the close.
                let how = match activity::assess(state) {
                    Activity::Ending { how, .. } if transfer::is_outstanding(state) => how,
                    _ => Resolution::Response,
                };
                end_stall(conn, at, how, out);
            }
            // A passive connection is reported at its first transfer (its owner is only known
            // then), dated when it was established.
            EventKind::Discovered | EventKind::UnixDiscovered => {
                announce(conn, state.open_ns.min(at), out)
            }
            EventKind::RequestStarted | EventKind::ExchangeCompleted => announce(conn, at, out),
            EventKind::ReplyResumed => {
                // A response's bytes moved after quiet past the threshold: more of one, or a
                // pipelined request's. Ends its stall; one that began and ended between two
                // sweeps is reported now, dated when it crossed the threshold.
                let incomplete_since = conn.reply().and_then(|r| r.incomplete_since);
                let owed_since = conn.pipeline().and_then(|p| p.owed);
                let since = match (incomplete_since, owed_since) {
                    (Some(quiet_since), _) => {
                        Some((StallKind::ResponseIncomplete, quiet_since, false))
                    }
                    (None, Some((_, quiet_since))) => {
                        Some((StallKind::for_role(conn.role), quiet_since, true))
                    }
                    (None, None) => None,
                };
                match since {
                    Some((kind, quiet_since, pipelined)) if conn.stall.is_none() => {
                        let threshold_at = quiet_since + stall_after_ns;
                        if at >= threshold_at {
                            start_stall(
                                conn,
                                kind,
                                quiet_since,
                                threshold_at,
                                None,
                                state.exchanges,
                                out,
                            );
                            if let Some(stall) = conn.stall.as_deref_mut() {
                                stall.pipelined = pipelined;
                            }
                        }
                    }
                    _ => {}
                }
                let resumed = conn
                    .stall
                    .as_ref()
                    .is_some_and(|s| s.kind == StallKind::ResponseIncomplete || s.pipelined);
                if resumed {
                    end_stall(conn, at, Resolution::Response, out);
                }
                if let Some(reply) = conn.reply_mut() {
                    reply.incomplete_since = None;
                }
                if let Some(pipeline) = conn.pipeline_mut() {
                    pipeline.owed = None;
                }
            }
            EventKind::ConnectStarted => {}
            EventKind::Closed => unreachable!("handled above"),
        }
        conn.watch_epoch = conn.watch_epoch.max(state.notified_epoch);
        self.watch(sock);
    }

    /// Starts bringing the tracker back in line with the kernel's connection map after lost
    /// events. The map's snapshot is read while events keep coming, and handed over in chunks
    /// ([`Tracker::resync_entries`]), then [`Tracker::finish_resync`]. From now until then, a
    /// sock address whose connection the tracker closes or replaces (a close record, a close
    /// found lost, a record of a new connection there) has its snapshot entry passed over: read
    /// before the close, it would bring the connection back; read before the address was
    /// reused, it would close its successor. Other entries are applied even if the tracker
    /// heard of their connection since (a record or a sweep's read need not have reported it:
    /// its owner may have been unknown then). A resynchronization in progress is dropped.
    pub fn begin_resync(&mut self) {
        self.resync = Some(Box::default());
    }

    /// Whether a resynchronization is in progress.
    pub fn resyncing(&self) -> bool {
        self.resync.is_some()
    }

    /// The connection at `sock` opened at `gone_open_ns` (kernel open time) closed, or another
    /// took its address: its entry in the snapshot being reconciled, and any older one, is
    /// outdated.
    fn superseded(&mut self, sock: u64, gone_open_ns: u64) {
        if let Some(resync) = self.resync.as_deref_mut() {
            let newest = resync.superseded.entry(sock).or_insert(gone_open_ns);
            *newest = (*newest).max(gone_open_ns);
        }
    }

    /// Takes the owner and byte counters of a newer kernel snapshot of `sock` (read from the
    /// `CONNS` map), when it is still the same connection; its exchanges are left to records
    /// and sweeps. A diagnosis compares the socket's byte counts with the counted ones: a
    /// record still in the ring would otherwise make bytes look unseen.
    pub fn refresh_counts(&mut self, sock: u64, state: &ConnState) {
        // A TCP record without its local port yet learns it from records and sweeps only:
        // they merge its adopted twin, if any (`Tracker::refresh`).
        let learns_no_port = |conn: &Conn| {
            conn.endpoints.transport != model::Transport::Tcp || conn.endpoints.local_port != 0
        };
        if self
            .conns
            .get(sock)
            .is_some_and(|conn| conn.kernel_open_ns == state.open_ns && learns_no_port(conn))
        {
            self.conns.refresh(sock, state);
        }
    }

    /// Whether the stall open on `sock` is over by a newer kernel snapshot of it (the reply
    /// direction moved since it began), though no record or sweep said so yet; also true when
    /// none is open, and when the `CONNS` map no longer holds the socket (`None`: it closed,
    /// its `Closed` record still in the ring, or, rarely, a full map evicted it). What a
    /// diagnosis looked at then tells of what came after it (a closed socket's fd is gone: it
    /// would read as never accepted). An HTTP/2 stream's stall is never over by this rule: the
    /// other streams' responses move meanwhile.
    pub fn stall_over_in(&self, sock: u64, state: Option<&ConnState>) -> bool {
        let Some(conn) = self.conns.get(sock) else {
            return true;
        };
        let Some(stall) = conn.stall.as_deref() else {
            return true;
        };
        let Some(state) = state else {
            return true;
        };
        conn.kernel_open_ns != state.open_ns
            || (stall.http2_stream.is_none()
                && activity::last_reply_ns(state) > stall.quiet_since_ns)
    }

    /// Reconciles part of the kernel map's snapshot (entries as they were read, in any number
    /// of chunks, repeated keys allowed): connections whose opening events were lost are
    /// reported now. Nothing happens unless a resynchronization began.
    pub fn resync_entries(
        &mut self,
        kernel: impl IntoIterator<Item = (u64, ConnState)>,
        now: u64,
        out: &mut Vec<Event>,
    ) {
        let Some(mut resync) = self.resync.take() else {
            return;
        };
        let mark = out.len();
        for (sock, state) in kernel {
            resync.seen.insert(sock, ());
            if resync
                .superseded
                .get(&sock)
                .is_some_and(|&gone| state.open_ns <= gone)
            {
                resync.found.superseded += 1;
                continue;
            }
            let before = self.conns.get(sock).map(|conn| (conn.id, conn.announced));
            self.conn_for(sock, &state, now, out);
            self.refresh(sock, &state, now, out);
            let conn = self.conns.get_mut(sock).expect("conn_for tracks it");
            // Reported like its lost events would have: once established with a known owner
            // (a passive connection's owner is known from its first transfer).
            let established = state.flags & conn_flags::ESTABLISHED != 0;
            if established && Owner::from_kernel(&state).is_some() {
                announce(conn, state.open_ns.min(now), out);
            }
            // A known connection whose lost events left a request unseen is watched too, or
            // only the audit cycle (thousands of entries after a burst) would find its stall.
            let busy = conn.activity(&state).is_busy();
            let recovered = before != Some((conn.id, conn.announced));
            if recovered || busy {
                self.watch(sock);
            }
            resync.found.recovered += usize::from(recovered);
        }
        self.conns.note_stalls(&out[mark..]);
        self.resync = Some(resync);
    }

    /// Ends the resynchronization: tracked connections the snapshot did not hold (nor
    /// opened at an address since it began) are watched, so that the next sweeps close them as lost
    /// unless their close event is still in flight. What it found, in all.
    pub fn finish_resync(&mut self) -> Reconciled {
        let Some(resync) = self.resync.take() else {
            return Reconciled::default();
        };
        let mut found = resync.found;
        let vanished: Vec<u64> = self
            .conns
            .socks()
            .filter(|sock| !resync.seen.contains_key(sock) && !resync.superseded.contains_key(sock))
            .collect();
        found.vanished = vanished.len();
        for sock in vanished {
            self.watch(sock);
        }
        self.stats.recovered += found.recovered as u64;
        found
    }

    /// Re-reads the watched connections. `epoch` is the epoch the daemon just started;
    /// `lookup` returns the kernel's current entry for a `struct sock` address.
    pub fn sweep(
        &mut self,
        now: u64,
        epoch: u32,
        lookup: impl FnMut(u64) -> Option<ConnState>,
        out: &mut Vec<Event>,
    ) {
        self.sweep_with_heads(now, epoch, lookup, |_| None, |_| None, out);
    }

    /// [`Tracker::sweep`], with `reply_head` returning the kernel's copy of the start of an
    /// HTTP/1.x connection's latest response (the `HTTP1_REPLY_HEADS` map), read once per
    /// response, and `request_run` its copy of the request-direction run before it (the
    /// `HTTP1_REQUEST_RUNS` map), read with it.
    pub fn sweep_with_heads(
        &mut self,
        now: u64,
        epoch: u32,
        mut lookup: impl FnMut(u64) -> Option<ConnState>,
        mut reply_head: impl FnMut(u64) -> Option<ReplyHead>,
        mut request_run: impl FnMut(u64) -> Option<RequestRun>,
        out: &mut Vec<Event>,
    ) {
        self.judge_adopted(now, out);
        let mark = out.len();
        self.schedule_audit();
        let stall_after_ns = self.stall_after_ns;
        let mut budget = self.sweep_budget;
        let started = std::time::Instant::now();
        let mut lost = Vec::new();
        let mut reads = 0;
        for _ in 0..self.watch_queue.len() {
            if budget == 0 {
                break;
            }
            if reads == SWEEP_CLOCK_EVERY {
                if started.elapsed() >= self.sweep_time {
                    break;
                }
                reads = 0;
            }
            let Some((sock, ticket)) = self.watch_queue.pop_front() else {
                break;
            };
            if self.watched.get(&sock) != Some(&ticket) {
                continue; // closed (and maybe re-watched) since it was queued
            }
            let stalled_until = self.conns.get(sock).and_then(|c| c.stall.as_deref());
            if stalled_until.is_some_and(|stall| stall.next_check_ns > now) {
                self.watch_queue.push_back((sock, ticket));
                continue;
            }
            budget -= 1;
            reads += 1;
            let state = lookup(sock);
            if let Some(state) = &state {
                self.refresh(sock, state, now, out);
            }
            let Some(conn) = self.conns.get_mut(sock) else {
                self.watched.remove(&sock);
                continue;
            };
            let Some(state) = state else {
                // Its close event may still be in flight; after a few sweeps, it is lost.
                conn.missing_sweeps += 1;
                if conn.missing_sweeps >= MISSING_SWEEPS_BEFORE_LOST {
                    lost.push(sock);
                } else {
                    self.watch_queue.push_back((sock, ticket));
                }
                continue;
            };
            conn.missing_sweeps = 0;
            if let Some(stall) = conn.stall.as_deref_mut() {
                stall.next_check_ns = now + STALLED_RECHECK_NS;
            }
            if framing::needs_head(&state, conn.reply()) {
                let head = reply_head(sock).filter(|head| head.reply_ns == state.dir_since_ns);
                // A response whose bytes the kernel could not read (they came by splice: its
                // tail is unknown) had no head copied: nothing was lost.
                if head.is_none() && state.reply_tail != stalltrace_common::http1::TAIL_UNKNOWN {
                    self.stats.reply_heads_missed += 1;
                }
                let extras = conn.extras_mut();
                extras.pipeline = head.as_ref().and_then(|head| {
                    let count = Pipeline::count(head, request_run(sock).as_ref(), &state);
                    self.stats.http1_runs_uncounted += u64::from(!count.all);
                    self.stats.http1_pipelined_runs += u64::from(count.pipeline.is_some());
                    count.pipeline.map(Box::new)
                });
                extras.reply = Some(Box::new(match head {
                    Some(head) => ReplyFraming::from_head(&head),
                    None => ReplyFraming {
                        reply_ns: state.dir_since_ns,
                        offset: 0,
                        framing: crate::protocols::http1::Framing::Unknown("head not copied"),
                        end: None,
                        incomplete_since: None,
                    },
                }));
            }
            let activity = conn.activity(&state);
            observe(conn, &state, activity, now, stall_after_ns, out);
            let recently_reported = conn.watch_epoch.saturating_add(1) >= epoch;
            if activity.is_busy() || conn.stall.is_some() || recently_reported {
                self.watch_queue.push_back((sock, ticket));
            } else {
                self.watched.remove(&sock);
            }
        }
        for sock in lost {
            let open_ns = self.conns.get(sock).map_or(0, |conn| conn.kernel_open_ns);
            self.superseded(sock, open_ns);
            self.watched.remove(&sock);
            if let Some(conn) = self.conns.remove(sock) {
                self.close_unseen(conn, now, out);
            }
        }
        self.conns.note_stalls(&out[mark..]);
    }

    /// Watches the next [`AUDIT_PER_SWEEP`] connections of the audit cycle (starting a new
    /// cycle through the table when one ends): the sweep re-reads them, and drops those it
    /// finds idle from the watch list again.
    fn schedule_audit(&mut self) {
        if self.audit.is_empty() {
            self.audit.extend(self.conns.socks());
        }
        for _ in 0..AUDIT_PER_SWEEP {
            let Some(sock) = self.audit.pop() else {
                break;
            };
            if self.conns.contains(sock) {
                self.watch(sock);
            }
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Makes `sock` hold the record for the connection in `state`: the known one, one adopted
    /// from /proc with the same endpoints, or a new one. A record left behind by an earlier connection on the same
    /// sock address (its close lost) is closed first.
    fn conn_for(&mut self, sock: u64, state: &ConnState, at: u64, out: &mut Vec<Event>) {
        let discovered = state.flags & conn_flags::DISCOVERED != 0;
        if let Some(known) = self.conns.get(sock) {
            let same = if discovered {
                known.endpoints == Endpoints::from_kernel(state) || known.endpoints.local_port == 0
            } else {
                known.kernel_open_ns == state.open_ns
            };
            if !same {
                let stale = self.conns.remove(sock).expect("present");
                self.close_unseen(stale, at, out);
            } else if discovered && known.kernel_open_ns != state.open_ns && !known.adopted {
                // Same connection, new kernel entry: the old one was evicted.
                self.stats.evictions += 1;
                let conn = self.conns.get_mut(sock).expect("present");
                conn.incomplete = true;
                conn.kernel_open_ns = state.open_ns;
            }
        }
        if !self.conns.contains(sock) {
            let endpoints = Endpoints::from_kernel(state);
            let preexisting = endpoints
                .unix_inodes()
                .is_some_and(|inodes| self.preexisting_unix.remove(&inodes.local));
            // Adopted connections are a start-up affair: skip hashing once they are all known.
            let adopted = if self.conns.has_adopted() {
                self.conns.remove_adopted(&endpoints)
            } else {
                None
            };
            let conn = match adopted {
                Some(mut conn) => {
                    // From here on the kernel's view judges it.
                    self.adopted_exchanges.remove(&conn.id);
                    conn.kernel_open_ns = state.open_ns;
                    conn
                }
                None => {
                    let id = self.take_id();
                    let role = activity::role_of(state);
                    let mut conn = Conn::new(id, role, endpoints, Owner::default(), state.open_ns);
                    conn.adopted = preexisting;
                    conn.incomplete = discovered || preexisting;
                    conn.retries = state.retries;
                    conn.counted = Counted::from_kernel(state);
                    conn.kernel_open_ns = state.open_ns;
                    conn
                }
            };
            self.conns.insert(sock, conn);
        }
    }

    /// Takes what a newer kernel snapshot of `sock` knows better ([`Table::refresh`]), and
    /// merges the record /proc adopted for the same connection, if there is one.
    ///
    /// The kernel reports a `connect()` at `SYN_SENT`, before its local port is chosen, and
    /// the daemon adopts from /proc after attaching its programs but before it reads their
    /// first records: a connection opened in between is both a kernel record on port 0 (which
    /// [`Tracker::conn_for`] cannot match with an adopted record by endpoints) and an adopted
    /// record, announced. Left alone, the adopted twin would never be taken over nor closed
    /// (the kernel's close names the kernel record's sock), and a request the socket said
    /// was outstanding at start-up would open a stall on it that never ends. So once the
    /// port is known, the two are one: the kernel's record from here on, under the adopted
    /// record's id, as `conn_for` keeps an adopted record the kernel reports.
    /// Only a record whose endpoints change here can be such a twin: the others were matched
    /// (or not) by `conn_for` already, and cost no lookup.
    fn refresh(&mut self, sock: u64, state: &ConnState, at: u64, out: &mut Vec<Event>) {
        let learnt = self.conns.refresh(sock, state);
        if !learnt || !self.conns.has_adopted() {
            return;
        }
        let Some(kernel) = self.conns.get(sock) else {
            return;
        };
        let (endpoints, announced) = (kernel.endpoints, kernel.announced);
        let (kernel_open_ns, incomplete, opened_ns) =
            (kernel.kernel_open_ns, kernel.incomplete, kernel.opened_ns);
        let Some(mut twin) = self.conns.remove_adopted(&endpoints) else {
            return;
        };
        // From here on the kernel's view judges it.
        self.adopted_exchanges.remove(&twin.id);
        if announced {
            // Reported under its own id too (only after lost records: a port is learnt before
            // a connection is reported): the twin goes, as a close never seen would.
            self.close_unseen(twin, at, out);
            return;
        }
        // The kernel followed it from its connect(): its totals and open time are the better.
        twin.kernel_open_ns = kernel_open_ns;
        twin.incomplete = incomplete;
        twin.opened_ns = twin.opened_ns.min(opened_ns);
        twin.refresh(state);
        self.conns.insert(sock, twin);
    }

    fn on_closed(&mut self, sock: u64, state: &ConnState, at: u64, out: &mut Vec<Event>) {
        self.watched.remove(&sock);
        let endpoints = Endpoints::from_kernel(state);
        let conn = match self.conns.remove(sock) {
            Some(conn) => Some(conn),
            None => self.conns.remove_adopted(&endpoints),
        };
        if let Some(conn) = &conn {
            self.adopted_exchanges.remove(&conn.id);
        }
        // A connection never reported (e.g. reset in the accept queue) closes silently.
        let Some(mut conn) = conn else {
            return;
        };
        conn.refresh(state);
        let how = activity::ending(state);
        let stall_after_ns = self.stall_after_ns;
        let connect_failed = state.flags & conn_flags::ESTABLISHED == 0;
        if conn.stall.is_none() && connect_failed {
            // A connect() that hung past the threshold and failed between two sweeps. (For
            // established connections the kernel reports such an ending as QuietEnded first.)
            let pending_since = state.open_ns;
            if at.saturating_sub(pending_since) >= stall_after_ns {
                let threshold_at = pending_since + stall_after_ns;
                let kind = StallKind::ConnectPending;
                start_stall(&mut conn, kind, pending_since, threshold_at, None, 0, out);
            }
        }
        if let Some(stall) = conn.stall.as_deref().copied() {
            match replied_before_the_end(&stall, conn.role, state) {
                Some(replied) => end_stall(&mut conn, replied, Resolution::Response, out),
                None => end_stall(&mut conn, at, how, out),
            }
        }
        // A passive connection that never carried data is reported now, dated at its
        // handshake like any other (an accept-and-close is a dropped user, not noise).
        let opened = conn.opened_ns.min(at);
        announce(&mut conn, opened, out);
        let complete = !conn.incomplete && state.flags & conn_flags::DISCOVERED == 0;
        let summary = CloseSummary {
            how,
            totals: Totals::from_kernel(state),
            closed_while_stalled: conn.closed_while_stalled,
            duration_ms: ms(at.saturating_sub(conn.opened_ns)),
            complete,
        };
        out.push(Event {
            at_ns: at,
            conn: conn.reference(),
            detail: Detail::Close(summary),
        });
    }

    /// Closes a connection whose close was never observed: its totals are unknown.
    fn close_unseen(&mut self, mut conn: Conn, at: u64, out: &mut Vec<Event>) {
        self.stats.lost_closes += 1;
        if conn.stall.is_some() {
            end_stall(&mut conn, at, Resolution::Closed, out);
        }
        if !conn.announced {
            return;
        }
        out.push(Event {
            at_ns: at,
            conn: conn.reference(),
            detail: Detail::Close(CloseSummary {
                how: Resolution::Closed,
                totals: Totals::default(),
                closed_while_stalled: conn.closed_while_stalled,
                duration_ms: ms(at.saturating_sub(conn.opened_ns)),
                complete: false,
            }),
        });
    }
}

/// Applies a snapshot read by a sweep: ends a stall the connection left, starts one it entered.
fn observe(
    conn: &mut Conn,
    state: &ConnState,
    activity: Activity,
    now: u64,
    stall_after_ns: u64,
    out: &mut Vec<Event>,
) {
    if let Some(stall) = conn.stall.as_deref().copied() {
        let stream = activity::http2_stream(state);
        let end = match (stall.kind, activity) {
            (_, Activity::Ending { at, how }) => Some(
                replied_before_the_end(&stall, conn.role, state)
                    .map_or((at, how), |at| (at, Resolution::Response)),
            ),
            // A pipelined request's response started (or a later one's end went by). The
            // kernel reports when at once (`ReplyResumed`); this is when its event was lost.
            _ if stall.pipelined => (activity::last_reply_ns(state) > stall.quiet_since_ns)
                .then(|| (activity::last_reply_ns(state), Resolution::Response)),
            // An HTTP/2 stream's stall ends when that stream no longer awaits its response
            // (its end event lost, or not yet drained): dated by the last reply-direction
            // transfer. Other streams' exchanges say nothing about it. Once the framing is
            // lost, the direction rule below judges it, as it does the connection.
            _ if stall.http2_stream.is_some() && activity::http2_tracking(state) => (stream
                != stall.http2_stream)
                .then(|| (activity::last_reply_ns(state), Resolution::Response)),
            (StallKind::ConnectPending, Activity::ConnectPending { .. }) => None,
            (StallKind::ConnectPending, _) => Some((state.state_ns, Resolution::Response)),
            // The response moved again (more of it, all of it, or a new request went).
            (StallKind::ResponseIncomplete, Activity::ResponseIncomplete { quiet_since })
                if quiet_since > stall.quiet_since_ns =>
            {
                Some((quiet_since, Resolution::Response))
            }
            (StallKind::ResponseIncomplete, Activity::ResponseIncomplete { .. }) => None,
            (StallKind::ResponseIncomplete, Activity::Idle) => {
                Some((activity::last_reply_ns(state), Resolution::Response))
            }
            (StallKind::ResponseIncomplete, Activity::Outstanding { .. }) => {
                Some((state.dir_since_ns, Resolution::Response))
            }
            // A reply went out since the quiet began. (A request nobody has read yet leaves
            // the connection idle as the kernel saw it: that is no reply, and no end.)
            (_, Activity::Idle | Activity::ResponseIncomplete { .. })
                if state.dir_since_ns > stall.quiet_since_ns =>
            {
                Some((state.dir_since_ns, Resolution::Response))
            }
            // A reply came and a new request went since (its end event was lost): the reply
            // time is unknown, the new request's start bounds it.
            (_, Activity::Outstanding { .. }) if state.exchanges > stall.exchanges_at_start => {
                Some((state.dir_since_ns, Resolution::Response))
            }
            _ => None,
        };
        if let Some((at, how)) = end {
            end_stall(conn, at, how, out);
        }
    }
    if conn.stall.is_some() {
        return;
    }
    conn.set_quiet_since(match activity {
        Activity::Outstanding { quiet_since } | Activity::ResponseIncomplete { quiet_since } => {
            Some(quiet_since)
        }
        _ => None,
    });
    if let Some(reply) = conn.reply_mut() {
        reply.incomplete_since = match activity {
            Activity::ResponseIncomplete { quiet_since } => Some(quiet_since),
            _ => None,
        };
    }
    let pipelined = pipeline::is_pipelined(state, activity, conn.pipeline());
    if let Some(pipeline) = conn.pipeline_mut() {
        pipeline.owed = match activity {
            Activity::Outstanding { quiet_since } if pipelined => {
                pipeline.owed(state).map(|index| (index, quiet_since))
            }
            _ => None,
        };
    }
    let (kind, quiet_since) = match activity {
        Activity::Outstanding { quiet_since } => (StallKind::for_role(conn.role), quiet_since),
        Activity::ResponseIncomplete { quiet_since } => {
            (StallKind::ResponseIncomplete, quiet_since)
        }
        Activity::ConnectPending { since } => (StallKind::ConnectPending, since),
        Activity::Idle | Activity::Ending { .. } => return,
    };
    if now.saturating_sub(quiet_since) >= stall_after_ns {
        let owed = conn.reply().and_then(|reply| reply.owed(state));
        let stream = activity::http2_stream(state);
        start_stall(conn, kind, quiet_since, now, stream, state.exchanges, out);
        if let Some(stall) = conn.stall.as_deref_mut() {
            if let Some(framing::Owed::Bytes(bytes)) = owed {
                stall.owed_bytes = Some(bytes);
            }
            if kind == StallKind::ResponseIncomplete {
                stall.request_ns = activity::last_request_ns(state);
            }
            stall.pipelined = pipelined;
        }
    }
}

/// When a reply went out (or came in) after the stall's quiet began, if one did, on a
/// connection whose end was found before its stall was: what happened first decides. (The
/// kernel reports such a reply as a quiet end at once; not when the reply was its first sight
/// of an adopted connection.) Never for an HTTP/2 stream's stall: the connection's replies are
/// its other streams' answers; the kernel reports that stream's own (`QuietEnded`). Judged
/// by the tracker's `role`: the record of a close the kernel did not track guesses it.
fn replied_before_the_end(stall: &Stall, role: Role, state: &ConnState) -> Option<u64> {
    let request = if role == Role::Server {
        direction::IN
    } else {
        direction::OUT
    };
    let outstanding = state.last_dir != direction::NONE && state.last_dir == request;
    (stall.kind != StallKind::ConnectPending
        && stall.http2_stream.is_none()
        && !outstanding
        && state.dir_since_ns > stall.quiet_since_ns)
        .then_some(state.dir_since_ns)
}

/// Opens a stall reported at `at`. A stall found only after it ended is dated when it crossed
/// the threshold (`at` = `quiet_since` + threshold).
fn start_stall(
    conn: &mut Conn,
    kind: StallKind,
    quiet_since: u64,
    at: u64,
    http2_stream: Option<u32>,
    exchanges_at_start: u64,
    out: &mut Vec<Event>,
) {
    if conn.unix().is_some_and(|unix| unix.one_way) {
        return;
    }
    announce(conn, at, out);
    conn.stall = Some(Box::new(Stall {
        kind,
        quiet_since_ns: quiet_since,
        http2_stream,
        reported_ns: at,
        exchanges_at_start,
        owed_bytes: None,
        request_ns: quiet_since,
        next_check_ns: at + STALLED_RECHECK_NS,
        pipelined: false,
        unread: false,
        http2_late_streams: 0,
    }));
    out.push(Event {
        at_ns: at,
        conn: conn.reference(),
        detail: Detail::StallStart {
            kind,
            quiet_ms: ms(at.saturating_sub(quiet_since)),
            http2_stream,
            diagnosis: None,
        },
    });
}

fn end_stall(conn: &mut Conn, at: u64, resolution: Resolution, out: &mut Vec<Event>) {
    if resolution != Resolution::Response && conn.stall.is_some() {
        conn.closed_while_stalled = true;
    }
    push_stall_end(conn, at, resolution, None, out);
}

/// Ends the stall of an HTTP/2 stream that `by` reset, its connection open.
fn end_stream_stall(conn: &mut Conn, at: u64, by: Role, out: &mut Vec<Event>) {
    push_stall_end(conn, at, Resolution::StreamReset, Some(by), out);
}

fn push_stall_end(
    conn: &mut Conn,
    at: u64,
    resolution: Resolution,
    http2_reset_by: Option<Role>,
    out: &mut Vec<Event>,
) {
    let Some(stall) = conn.stall.take() else {
        return;
    };
    conn.extras_mut().ended_quiet_since = NonZeroU64::new(stall.quiet_since_ns);
    out.push(Event {
        at_ns: at,
        conn: conn.reference(),
        detail: Detail::StallEnd {
            kind: stall.kind,
            duration_ms: ms(at.saturating_sub(stall.quiet_since_ns)),
            resolution,
            retries: conn.retries,
            http2_stream: stall.http2_stream,
            http2_late_streams: stall.http2_late_streams,
            http2_reset_by,
        },
    });
}

fn announce(conn: &mut Conn, at: u64, out: &mut Vec<Event>) {
    if conn.announced {
        return;
    }
    conn.announced = true;
    out.push(Event {
        at_ns: at,
        conn: conn.reference(),
        detail: Detail::Open {
            adopted: conn.adopted,
        },
    });
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

#[cfg(test)]
mod http2_tests;
#[cfg(test)]
mod tests;
