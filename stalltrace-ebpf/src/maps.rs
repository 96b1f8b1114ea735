//! Maps and load-time configuration shared by all programs.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    Global,
};
use stalltrace_common::{
    clock::ClockSample,
    http1::{ReplyHead, RequestRun},
    http2, loss, role, Capture, ConnState, Control, FdOffsets, Offsets,
};

/// The stall threshold: a reply or close after at least this much quiet is reported at once.
/// Set by the daemon at load (`EbpfLoader::set_global`), like `OFFSETS`.
#[unsafe(no_mangle)]
pub(crate) static STALL_AFTER_NS: Global<u64> = Global::new(5_000_000_000);

/// Request bytes to capture at each request start (0: off; at most CAPTURE_MAX).
#[unsafe(no_mangle)]
pub(crate) static CAPTURE_BYTES: Global<u32> = Global::new(0);

/// Entries of `CAPTURES` (a power of two), as the daemon sized it.
#[unsafe(no_mangle)]
pub(crate) static CAPTURE_SLOTS: Global<u32> = Global::new(1);

/// Non-zero when UDP sockets are traced: set by the daemon when it can see their closes (the
/// `cgroup/sock_release` program attaches), on the tracepoint rung.
#[unsafe(no_mangle)]
pub(crate) static UDP_TRACED: Global<u32> = Global::new(0);
/// Non-zero when the per-protocol accounting beyond the message classifier is in the programs:
/// HTTP/1.x responses (`http1.rs`), HTTP/2 streams (`http2.rs`), TLS clients' queued bytes
/// (`tls_queue.rs`) and libssl's calls (`libssl.rs`). Set by the daemon from Linux 6.5 (with
/// capture); elsewhere the constant lets the verifier drop that code: 6.1's gives up on the
/// transfer programs with it (1M instructions processed).
#[unsafe(no_mangle)]
pub(crate) static VERDICT_EXTRAS: Global<u32> = Global::new(0);

#[inline(always)]
pub(crate) fn verdict_extras() -> bool {
    VERDICT_EXTRAS.load() != 0
}
/// Non-zero when the kernel has what `splice.rs` (reads that bypass `sock_recv_length`) needs
/// but its program, which may still fail to load (before Linux 5.15): the entries of
/// connections found through their traffic then keep what had been read before
/// (`ConnState::consumed_base`), which the diagnosis' cross-check also uses.
#[unsafe(no_mangle)]
pub(crate) static SPLICE_READS: Global<u32> = Global::new(0);

/// Non-zero when the daemon found the system's libssl and hooks its `SSL_read` (`libssl.rs`).
#[unsafe(no_mangle)]
pub(crate) static LIBSSL_TRACED: Global<u32> = Global::new(0);
/// `ip_local_port_range` of the daemon's namespace, packed as `role::guess` takes it.
#[unsafe(no_mangle)]
pub(crate) static EPHEMERAL_PORTS: Global<u32> = Global::new(role::DEFAULT_EPHEMERAL);
/// The daemon's own process id: Unix connections to or from it (its API socket: the CLI's
/// queries, `watch`) are not tracked, so that the tracer does not report itself.
#[unsafe(no_mangle)]
pub(crate) static SELF_TGID: Global<u32> = Global::new(0);

/// Kernel struct member offsets, resolved by the daemon from BTF.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: Global<Offsets> = Global::new(Offsets::unknown());

/// Members leading from a file descriptor to its socket (the syscall rung), from BTF.
#[unsafe(no_mangle)]
pub(crate) static FD_OFFSETS: Global<FdOffsets> = Global::new(FdOffsets::unknown());

/// Live TCP connections keyed by `struct sock` address. The daemon sizes it at load; when full,
/// the least recently used entry is evicted (the daemon notices and reports it).
#[map]
pub(crate) static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(1 << 18, 0);

/// Events to the daemon. Resized by the daemon at load.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Per-CPU loss counters, indexed by `stalltrace_common::loss`.
#[map]
pub(crate) static LOSS: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::SLOTS, 0);

/// Per-CPU scratch space for building a new connection entry: a ConnState is too large to build
/// on the 512-byte BPF stack next to everything else.
#[map]
pub(crate) static SCRATCH: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed per-CPU ConnState to fill and insert into CONNS, for a connection that opened at
/// `sock` at `now` (the state clock). Its `open_ns` is read from the precise clock: the daemon
/// tells a `struct sock` address reused after a lost close record apart by it, and two
/// connections opened at one address within a tick of the coarse clock (burst after burst)
/// would look like one. A request copy an earlier connection at this address left is
/// forgotten (`capture::forget`).
#[inline(always)]
pub(crate) fn scratch_conn(sock: u64, now: u64) -> Option<&'static mut ConnState> {
    crate::capture::forget(sock);
    let conn = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within one program run (preemption is disabled).
    unsafe {
        crate::words::zero_words(conn);
        let conn = &mut *conn;
        conn.open_ns = if COARSE_CLOCK.load() == 0 {
            now
        } else {
            crate::clock::precise_now()
        };
        conn.state_ns = now;
        Some(conn)
    }
}

/// HTTP/2 connections' stream state (`stalltrace_common::http2`), keyed by `struct sock`
/// address: only connections recognized as HTTP/2 have an entry. When full, the least
/// recently used is evicted and its connection falls back to the direction rule (counted).
#[map]
pub(crate) static H2_STREAMS: LruHashMap<u64, http2::Streams> =
    LruHashMap::with_max_entries(8192, 0);

/// Per-CPU scratch space for a new `H2_STREAMS` entry (too large for the BPF stack).
#[map]
pub(crate) static H2_SCRATCH: PerCpuArray<http2::Streams> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU position of the HTTP/2 frame walk in the current transfer's data.
#[map]
pub(crate) static H2_WALKER: PerCpuArray<crate::capture::Walker> =
    PerCpuArray::with_max_entries(1, 0);

/// The request in flight per connection, direct-mapped by `capture_slot` (a collision
/// overwrites; `Capture::sock` tells). Sized by the daemon (a power of two).
#[map]
pub(crate) static CAPTURES: Array<Capture> = Array::with_max_entries(1, 0);

/// Per CPU, the first bytes of a reply-direction run, read to tell housekeeping from a reply
/// (see `message::classify_reply`); never reported.
#[map]
pub(crate) static REPLY_HEADS: PerCpuArray<Capture> = PerCpuArray::with_max_entries(1, 0);

/// The start of the latest response per HTTP/1.x connection (`stalltrace_common::http1`),
/// keyed by `struct sock` address; the daemon reads it within a sweep of the response's start,
/// so the least recently used entries can go.
#[map]
pub(crate) static HTTP1_REPLY_HEADS: LruHashMap<u64, ReplyHead> =
    LruHashMap::with_max_entries(4096, 0);

/// Per CPU, the `ReplyHead` being filled (too large for the BPF stack).
#[map]
pub(crate) static REPLY_HEAD_SCRATCH: PerCpuArray<ReplyHead> = PerCpuArray::with_max_entries(1, 0);

/// The start of the latest request-direction run per HTTP/1.x connection
/// (`stalltrace_common::http1::RequestRun`), direct-mapped by `capture_slot` (a collision
/// overwrites; `RequestRun::sock` tells); read by the daemon with the response that follows
/// it. Sized by the daemon (a power of two).
#[map]
pub(crate) static HTTP1_REQUEST_RUNS: Array<RequestRun> = Array::with_max_entries(1, 0);

/// Entries of `HTTP1_REQUEST_RUNS`, as the daemon sized it.
#[unsafe(no_mangle)]
pub(crate) static REQUEST_RUN_SLOTS: Global<u32> = Global::new(1);

/// Slot 0 is 1 once the daemon can tell when a Unix socket closes (`stalltrace_unix_alive`
/// loaded, on a rung that sees Unix transfers): until then Unix connections are not tracked,
/// since nothing would ever remove their entries.
#[map]
pub(crate) static UNIX_TRACED: Array<u32> = Array::with_max_entries(1, 0);

/// Slot 0 is 1 when HTTP/1.x responses are framed: the rung attached sees every byte a
/// response sends (`sendfile` included), else their byte counts would fall short.
#[map]
pub(crate) static HTTP1_FRAMED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn http1_framed() -> bool {
    HTTP1_FRAMED.get(0).is_some_and(|on| *on != 0)
}

#[inline(always)]
pub(crate) fn unix_traced() -> bool {
    UNIX_TRACED.get(0).is_some_and(|on| *on != 0)
}

/// Slot 0 holds the daemon's current sweep epoch and the coarse clock's fit (`clock.rs`).
#[map]
pub(crate) static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

/// Set before loading: connection state is timed from jiffies with the fit in `CONTROL` (1),
/// or with `bpf_ktime_get_ns` (0: no fit could be made). See `clock.rs`.
#[unsafe(no_mangle)]
pub(crate) static COARSE_CLOCK: Global<u32> = Global::new(0);

/// Slot 0: the sample `stalltrace_clock_sample` takes for the daemon's clock fit.
#[map]
pub(crate) static CLOCK_SAMPLE: Array<ClockSample> = Array::with_max_entries(1, 0);

/// Local ports with a listening TCP socket, per network namespace (`listen_key`), with the
/// number of listeners on each; used to guess the role of a connection that was already open
/// when the daemon started.
#[map]
pub(crate) static LISTEN_PORTS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
pub(crate) fn stall_after_ns() -> u64 {
    STALL_AFTER_NS.load()
}

#[inline(always)]
pub(crate) fn count_loss(slot: u32) {
    if let Some(counter) = LOSS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; preemption is disabled while a tracepoint program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub(crate) fn current_epoch() -> u32 {
    CONTROL.get(0).map_or(0, |control| control.epoch)
}
