//! Operations on one connection's state, shared by the programs. The transfer accounting
//! itself is `stalltrace_common::transfer`, shared with userspace.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    EbpfContext,
};
use aya_log_ebpf::warn;
use stalltrace_common::{
    listen_key, loss, role, Capture, ConnEvent, ConnState, EventHeader, EventKind, RequestEvent,
    COMM_LEN,
};

use crate::{
    clock::precise_now,
    maps::{count_loss, current_epoch, CONNS, EPHEMERAL_PORTS, EVENTS, LISTEN_PORTS, OFFSETS},
    words::copy_words,
};

/// Writes an event with a snapshot of `conn` and marks the connection as reported in the current
/// epoch. A full ring buffer is counted, and the connection stays unmarked so that its next
/// request start is reported again.
#[inline(always)]
pub(crate) fn emit(kind: EventKind, sock: u64, conn: &mut ConnState) {
    emit_record::<ConnEvent>(kind, sock, conn, |_| {});
}

/// Like `emit`, with the captured bytes of the request that just started appended.
#[inline(always)]
pub(crate) fn emit_request(kind: EventKind, sock: u64, conn: &mut ConnState, capture: &Capture) {
    emit_record::<RequestEvent>(kind, sock, conn, |record| {
        // SAFETY: `record` points to a reserved, writable RequestEvent.
        unsafe { copy_words(&raw mut (*record).capture, capture) }
    });
}

/// Reserves a record of type `T`, which starts with a [`ConnEvent`], writes the header (dated by
/// the precise clock: `stalltrace why` times sampled exchanges from these) and the snapshot of
/// `conn`, lets `tail` write the rest of it, and submits it (`emit`).
#[inline(always)]
pub(crate) fn emit_record<T: 'static>(
    kind: EventKind,
    sock: u64,
    conn: &mut ConnState,
    tail: impl FnOnce(*mut T),
) {
    // Read before the reservation, whose pointer would otherwise be spilled around the call.
    let ts_ns = precise_now();
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count_loss(loss::RINGBUF_FULL);
        return;
    };
    conn.notified_epoch = current_epoch();
    let record = entry.as_mut_ptr();
    let event = record.cast::<ConnEvent>();
    // SAFETY: `record` points to a reserved, writable record of T's size, which starts with a
    // ConnEvent. Fields are written in place: a record built on the stack would not fit the
    // 512-byte BPF stack.
    unsafe {
        (*event).header = EventHeader {
            kind: kind as u32,
            _pad: 0,
            ts_ns,
            sock,
        };
        copy_words(&raw mut (*event).conn, conn);
    }
    tail(record);
    entry.submit(wakeup_flag());
}

/// Inserts the entry of a connection first seen now. False when another CPU inserted it first
/// (and reported it), or when the map refused it (counted).
#[inline(always)]
pub(crate) fn insert_new<C: EbpfContext>(ctx: &C, sock: u64, conn: &ConnState) -> bool {
    match CONNS.insert(sock, conn, BPF_NOEXIST.into()) {
        Ok(()) => true,
        Err(EEXIST) => false,
        Err(err) => {
            warn!(
                ctx,
                "tracking a connection failed: map insert returned {}", err
            );
            count_loss(loss::CONN_INSERT_FAILED);
            false
        }
    }
}

const EEXIST: i32 = -17;

/// The daemon drains the ring on a short timer, so waking it for every record would only burn
/// CPU; wake it early only when the ring is a quarter full.
#[inline(always)]
fn wakeup_flag() -> u64 {
    let used = EVENTS.query(BPF_RB_AVAIL_DATA.into());
    let size = EVENTS.query(BPF_RB_RING_SIZE.into());
    if used > size / 4 {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Records the calling thread as the connection's last user, and a new owner's cgroup. Returns
/// true when the process is new to the connection (first owner, or handed over to another
/// process). Call it only in the context of a task that uses the socket (not in softirq).
#[inline(always)]
pub(crate) fn set_owner_to_current(conn: &mut ConnState) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    conn.tid = pid_tgid as u32;
    if conn.tgid == tgid {
        return false;
    }
    conn.tgid = tgid;
    // SAFETY: no arguments; the cgroup v2 id of the current task.
    conn.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the helper writes at most COMM_LEN bytes into the connection's comm field.
    unsafe { bpf_get_current_comm(conn.comm.as_mut_ptr().cast(), COMM_LEN as u32) };
    true
}

/// The role of a TCP connection not seen opening, from its ports (`role::guess`): its
/// endpoints and namespace must be set.
#[inline(always)]
pub(crate) fn guess_role(conn: &ConnState) -> u8 {
    let listened = LISTEN_PORTS
        .get_ptr(listen_key(conn.netns, conn.local_port))
        .is_some();
    role::guess(
        listened,
        conn.local_port,
        conn.peer_port,
        EPHEMERAL_PORTS.load(),
    )
}

/// Records the network namespace of `sock` (the inode of `sock->__sk_common.skc_net.net->ns`)
/// in a new connection's entry: every program that creates an entry calls this, so that equal
/// endpoints in two namespaces are two connections. Two probe reads, once per connection; left
/// 0 when the kernel's BTF lacks the members or a read fails.
#[inline(always)]
pub(crate) fn set_netns(sock: u64, conn: &mut ConnState) {
    conn.netns = netns_of(sock);
}

/// The inode of the network namespace of `sock`; 0 when it cannot be read.
#[inline(always)]
pub(crate) fn netns_of(sock: u64) -> u32 {
    let offsets = OFFSETS.load();
    if !offsets.can_read_netns() {
        return 0;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        match bpf_probe_read_kernel((sock + u64::from(offsets.skc_net)) as *const u64) {
            Ok(net) if net != 0 => {
                bpf_probe_read_kernel((net + u64::from(offsets.net_ns_inum)) as *const u32)
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }
}
