//! Reads of kernel structures at member offsets the daemon resolved from BTF (see
//! `stalltrace_common::Offsets`); used only off the hot path.
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use stalltrace_common::{transfer, ConnState, Offsets, AF_INET6};

#[inline(always)]
unsafe fn read<T>(base: u64, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T).ok() }
}

/// The socket's address family and protocol (`sk_protocol`).
#[inline(always)]
pub(crate) fn socket_family(sock: u64, offsets: &Offsets) -> Option<(u16, u16)> {
    if !offsets.can_read_sock() {
        return None;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        Some((
            read::<u16>(sock, offsets.skc_family)?,
            read::<u16>(sock, offsets.sk_protocol)?,
        ))
    }
}

/// Fills the connection's addresses and ports from its `struct sock`.
#[inline(always)]
pub(crate) fn read_endpoints(
    sock: u64,
    family: u16,
    offsets: &Offsets,
    conn: &mut ConnState,
) -> bool {
    if !offsets.can_read_sock() {
        return false;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        let (Some(dport), Some(num)) = (
            read::<u16>(sock, offsets.skc_dport),
            read::<u16>(sock, offsets.skc_num),
        ) else {
            return false;
        };
        conn.peer_port = u16::from_be(dport);
        conn.local_port = num;
        // Read straight into the entry: no address copies on the stack.
        let (peer, local, len) = if family == AF_INET6 {
            if !offsets.can_read_sock_v6() {
                return false;
            }
            (offsets.skc_v6_daddr, offsets.skc_v6_rcv_saddr, 16)
        } else {
            (offsets.skc_daddr, offsets.skc_rcv_saddr, 4)
        };
        let at = |offset: u32| (sock + u64::from(offset)) as *const u8;
        if bpf_probe_read_kernel_buf(at(peer), &mut conn.peer_addr[..len]).is_err()
            || bpf_probe_read_kernel_buf(at(local), &mut conn.local_addr[..len]).is_err()
        {
            return false;
        }
    }
    true
}

/// The socket's TCP state (`sock_common.skc_state`), if readable.
#[inline(always)]
pub(crate) fn tcp_state_of(sock: u64, offsets: &Offsets) -> Option<u8> {
    if offsets.skc_state == Offsets::UNKNOWN {
        return None;
    }
    // SAFETY: probe read of kernel memory; a failure is returned, not faulted.
    unsafe { read::<u8>(sock, offsets.skc_state) }
}

/// Sequence space received but not yet read by the application (`rcv_nxt - copied_seq`, as
/// `tcp_inq()` computes it; a received FIN counts one).
#[inline(always)]
pub(crate) fn unread_sequence(sock: u64, offsets: &Offsets) -> Option<u32> {
    if !offsets.can_read_receive_queue() {
        return None;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        let rcv_nxt = read::<u32>(sock, offsets.tcp_rcv_nxt)?;
        let copied = read::<u32>(sock, offsets.tcp_copied_seq)?;
        Some(rcv_nxt.wrapping_sub(copied))
    }
}

/// `sk_shutdown` bit: no more data will be received (`include/net/sock.h`).
const RCV_SHUTDOWN: u8 = 1;

/// What the application has read from the TCP socket by any means (`transfer::consumed`:
/// `tcp_sock.bytes_received` less what is unread), low 32 bits; `unknown` when that cannot be
/// read. A value on every path, not an `Option`: combined with the unread queue at the
/// peer's FIN, the `None` path left a register unset that 5.10's and 6.1's verifiers refused
/// to see copied ("R5 !read_ok").
#[inline(always)]
pub(crate) fn consumed_bytes(sock: u64, offsets: &Offsets, unknown: u32) -> u32 {
    if !offsets.can_read_consumed() {
        return unknown;
    }
    let Some(unread) = unread_sequence(sock, offsets) else {
        return unknown;
    };
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    let Some(received) = (unsafe { read::<u64>(sock, offsets.tcp_bytes_received) }) else {
        return unknown;
    };
    let shutdown = if offsets.sk_shutdown == Offsets::UNKNOWN {
        0
    } else {
        // SAFETY: as above.
        unsafe { read::<u8>(sock, offsets.sk_shutdown) }.unwrap_or(0)
    };
    transfer::consumed(received, unread, shutdown & RCV_SHUTDOWN != 0)
}
