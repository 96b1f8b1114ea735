//! Unix domain stream and seqpacket connections, found through their traffic on the same
//! `sock_send_length`/`sock_recv_length` tracepoints as TCP (Linux 6.3+).
//!
//! Unix sockets have no lifecycle tracepoint: a connection is tracked from its first transfer
//! (`UnixDiscovered`, with both ends' names), and its close is noticed by the daemon, which
//! asks `stalltrace_unix_alive` whether the socket still lives, or here, when the `struct
//! sock` address comes back for another socket (the inode tells them apart).
//!
//! The role: an accepted socket carries its listener's name (`unix_sock.addr`) and a
//! connecting client usually has none, so the bound end of a pair with one bound end is the
//! server. When both are bound (a client that bound its own name, or autobound), the accepted
//! end is the one whose address is shared (with its listener: `unix_address.refcnt` above 1).
//! Failing that (a socketpair, or a listener closed since), the end whose peer is already
//! tracked takes the other role, and failing that the first transfer decides: the sender of
//! the first bytes is the client.
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated},
    EbpfContext,
};
use stalltrace_common::{
    conn_flags, direction, role, tcp_state, transport,
    unix_alive::{PEER_CLOSED_DATA_UNREAD, PEER_CLOSED_NOTHING_UNREAD},
    ConnState, EventKind, Offsets, UnixEvent, AF_UNIX, SOCK_SEQPACKET, SOCK_STREAM, UNIX_PATH_MAX,
};

use crate::{
    conn::{emit, emit_record, insert_new, set_netns, set_owner_to_current},
    maps::{scratch_conn, CONNS},
};

#[inline(always)]
unsafe fn read<T>(base: u64, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T).ok() }
}

/// The inode number of a socket (`SOCK_INODE(sk->sk_socket)->i_ino`); `None` once released.
#[inline(always)]
fn inode_of(sock: u64, offsets: &Offsets) -> Option<u64> {
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        let socket = read::<u64>(sock, offsets.sk_socket)?;
        if socket == 0 {
            return None;
        }
        read::<u64>(socket + u64::from(offsets.socket_inode), offsets.inode_ino)
    }
}

/// The entry still describes the socket at `sock` (not an earlier one whose memory it reuses).
/// Free for other transports; two reads for a Unix entry.
#[inline(always)]
pub(crate) fn still_same(sock: u64, conn: &ConnState) -> bool {
    if conn.transport != transport::UNIX {
        return true;
    }
    // An unreadable inode is no proof of reuse: keep the entry.
    inode_of(sock, &crate::maps::OFFSETS.load()).is_none_or(|inode| inode == conn.inode)
}

/// `stale` held an earlier socket at this address, whose close the daemon had not noticed yet
/// (slab memory is reused last-freed first, so a per-request connection often gets its
/// predecessor's address within milliseconds): report that close now, then track the new one.
#[inline(never)]
pub(crate) fn replace<C: EbpfContext>(
    ctx: &C,
    sock: u64,
    stale: &mut ConnState,
    dir: u8,
    now: u64,
) -> Option<*mut ConnState> {
    stale.tcp_state = tcp_state::CLOSE;
    stale.state_ns = now;
    emit(EventKind::Closed, sock, stale);
    let _ = CONNS.remove(sock);
    discover(ctx, sock, dir, now)
}

/// A transfer on a socket the map does not hold: if it is a connected Unix stream or
/// seqpacket socket, track it and report it with its names. Returns the new entry; the
/// caller records the transfer on it.
#[inline(never)]
pub(crate) fn discover<C: EbpfContext>(
    ctx: &C,
    sock: u64,
    dir: u8,
    now: u64,
) -> Option<*mut ConnState> {
    let offsets = crate::maps::OFFSETS.load();
    if !offsets.can_read_unix() || !crate::maps::unix_traced() {
        return None;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    let (family, kind, state, peer, addr) = unsafe {
        (
            // Checked again here: `replace` comes with any socket whose memory held a Unix one.
            read::<u16>(sock, offsets.skc_family)?,
            read::<u16>(sock, offsets.sk_type)?,
            read::<u8>(sock, offsets.skc_state)?,
            read::<u64>(sock, offsets.unix_peer)?,
            read::<u64>(sock, offsets.unix_addr)?,
        )
    };
    // Connected (unix_sock uses TCP_ESTABLISHED for it); datagram sockets are not followed.
    if family != AF_UNIX
        || (kind != SOCK_STREAM && kind != SOCK_SEQPACKET)
        || state != tcp_state::ESTABLISHED
        || peer == 0
    {
        return None;
    }
    let inode = inode_of(sock, &offsets)?;
    // SAFETY: as above.
    let peer_addr = unsafe { read::<u64>(peer, offsets.unix_addr) }.unwrap_or(0);
    let conn = scratch_conn(sock, now)?;
    conn.family = AF_UNIX;
    conn.transport = transport::UNIX;
    conn.tcp_state = tcp_state::ESTABLISHED;
    conn.flags = conn_flags::ESTABLISHED;
    conn.peer_sock = peer;
    conn.inode = inode;
    // A peer already released (its end closed) has no inode left: 0.
    conn.peer_inode = inode_of(peer, &offsets).unwrap_or(0);
    conn.peer_tgid = peer_pid(sock, &offsets);
    conn.role = role_of(addr, peer_addr, peer, dir);
    if addr == 0 && peer_addr == 0 {
        // Two unnamed ends: a socketpair, almost always an event loop's wake-up pair (asyncio's
        // self-pipe: a byte one way, nothing back, by design). Listed, never judged.
        conn.flags |= conn_flags::STREAM;
    }
    set_netns(sock, conn);
    set_owner_to_current(conn);
    let daemon = crate::maps::SELF_TGID.load();
    if daemon != 0 && (conn.tgid == daemon || conn.peer_tgid == daemon) {
        return None;
    }
    if !insert_new(ctx, sock, conn) {
        return None;
    }
    let entry = CONNS.get_ptr_mut(sock)?;
    // SAFETY: map value pointer, valid for the duration of the program.
    emit_discovered(sock, unsafe { &mut *entry }, addr, peer_addr);
    Some(entry)
}

/// See the module comment.
#[inline(always)]
fn role_of(addr: u64, peer_addr: u64, peer: u64, dir: u8) -> u8 {
    if addr != 0 && peer_addr == 0 {
        return role::SERVER;
    }
    if addr == 0 && peer_addr != 0 {
        return role::CLIENT;
    }
    if addr != 0 {
        // Both bound (a client that bound its own name, autobind included): the accepted end
        // shares its listener's address, which the connecting end's own does not.
        match (shared_address(addr), shared_address(peer_addr)) {
            (Some(true), Some(false)) => return role::SERVER,
            (Some(false), Some(true)) => return role::CLIENT,
            _ => {}
        }
    }
    if let Some(other) = CONNS.get_ptr(peer) {
        // SAFETY: map value pointer, valid for the duration of the program.
        return if unsafe { (*other).role } == role::SERVER {
            role::CLIENT
        } else {
            role::SERVER
        };
    }
    if dir == direction::OUT {
        role::CLIENT
    } else {
        role::SERVER
    }
}

/// Whether the `unix_address` at `addr` is held by more than one socket (a listener and the
/// sockets it accepted); `None` when that cannot be read.
#[inline(always)]
fn shared_address(addr: u64) -> Option<bool> {
    let offsets = crate::maps::OFFSETS.load();
    if offsets.unix_address_refcnt == Offsets::UNKNOWN {
        return None;
    }
    // SAFETY: probe read of kernel memory; a failure is returned, not faulted.
    unsafe { read::<u32>(addr, offsets.unix_address_refcnt) }.map(|holders| holders > 1)
}

/// The pid (in the initial pid namespace) of the peer's process as recorded at connect() or
/// socketpair() (`sk_peer_pid`); 0 if unknown.
#[inline(always)]
fn peer_pid(sock: u64, offsets: &Offsets) -> u32 {
    if !offsets.can_read_peer_pid() {
        return 0;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        let Some(pid) = read::<u64>(sock, offsets.sk_peer_pid).filter(|&pid| pid != 0) else {
            return 0;
        };
        read::<i32>(pid + u64::from(offsets.pid_numbers), offsets.upid_nr).map_or(0, |nr| nr as u32)
    }
}

/// Writes a `UnixDiscovered` record: the snapshot, then both names read straight into it.
#[inline(never)]
fn emit_discovered(sock: u64, conn: &mut ConnState, addr: u64, peer_addr: u64) {
    let offsets = &crate::maps::OFFSETS.load();
    let kind = EventKind::UnixDiscovered;
    emit_record::<UnixEvent>(kind, sock, conn, |record| {
        // SAFETY: `record` points to a reserved, writable UnixEvent.
        unsafe {
            (*record).names._pad = 0;
            (*record).names.local_len =
                read_name(addr, offsets, (&raw mut (*record).names.local).cast());
            (*record).names.peer_len =
                read_name(peer_addr, offsets, (&raw mut (*record).names.peer).cast());
        }
    });
}

/// Copies the `sun_path` bytes of `unix_address` `addr` (0: unbound) to `dst`
/// (UNIX_PATH_MAX bytes); returns how many are valid. Only as many as the kernel says are
/// read: the address is allocated to its length.
#[inline(always)]
unsafe fn read_name(addr: u64, offsets: &Offsets, dst: *mut u8) -> u16 {
    if addr == 0 {
        return 0;
    }
    // `len` counts `sun_family` (2 bytes) and the path.
    let Some(len) = (unsafe { read::<i32>(addr, offsets.unix_address_len) }) else {
        return 0;
    };
    let len = len - 2;
    if len <= 0 {
        return 0;
    }
    let len = (len as u32).min(UNIX_PATH_MAX as u32);
    let src = addr + u64::from(offsets.unix_address_name) + 2;
    // SAFETY: `dst` has UNIX_PATH_MAX writable bytes and `len` is at most that; the helper
    // faults nothing (a failed read is reported as a nameless end).
    let ret = unsafe { generated::bpf_probe_read_kernel(dst.cast(), len, src as *const _) };
    if ret == 0 {
        len as u16
    } else {
        0
    }
}

/// Run by the daemon with `BPF_PROG_TEST_RUN`, never attached: arguments (sock address,
/// inode, ask about the peer); returns 1 if that socket is still open, 0 if it was released
/// (its `sk_socket` is cleared then) or the memory now holds another socket, 2 if the kernel's
/// layout is unknown. Asked about its peer (third argument not 0), an open socket the peer
/// will send nothing more (`RCV_SHUTDOWN`: the peer was released, or shut down for writing)
/// returns [`PEER_CLOSED_NOTHING_UNREAD`] or [`PEER_CLOSED_DATA_UNREAD`]: whether what the
/// peer sent still waits in this socket's receive queue.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp")]
fn stalltrace_unix_alive(ctx: *mut core::ffi::c_void) -> u32 {
    let offsets = crate::maps::OFFSETS.load();
    if !offsets.can_read_unix() {
        return 2;
    }
    let args = ctx as *const u64;
    // SAFETY: a raw tracepoint context is an array of u64 arguments; the daemon passes three.
    let (sock, inode, ask_peer) = unsafe { (*args, *args.add(1), *args.add(2)) };
    if inode_of(sock, &offsets) != Some(inode) {
        return 0;
    }
    if ask_peer == 0 || offsets.sk_shutdown == Offsets::UNKNOWN {
        return 1;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    let shutdown = unsafe { read::<u8>(sock, offsets.sk_shutdown) }.unwrap_or(0);
    if shutdown & RCV_SHUTDOWN == 0 {
        return 1;
    }
    let queued = if offsets.sk_receive_queue_qlen == Offsets::UNKNOWN {
        None
    } else {
        // SAFETY: as above.
        unsafe { read::<u32>(sock, offsets.sk_receive_queue_qlen) }
    };
    // Unknown: the reply may be there.
    if queued == Some(0) {
        PEER_CLOSED_NOTHING_UNREAD
    } else {
        PEER_CLOSED_DATA_UNREAD
    }
}

/// `sk_shutdown` bit: no more data will be received (`include/net/sock.h`).
const RCV_SHUTDOWN: u8 = 1;
