//! Reads of kernel structures at member offsets the daemon resolved from BTF (see
//! `stalltrace_common::Offsets`); used only off the hot path.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use stalltrace_common::{ConnState, Offsets, AF_INET, AF_INET6, IPPROTO_TCP};

#[inline(always)]
unsafe fn read<T>(base: u64, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T).ok() }
}

/// The socket is an IPv4/IPv6 TCP socket; returns its family.
#[inline(always)]
pub fn tcp_family(sock: u64, offsets: &Offsets) -> Option<u16> {
    if !offsets.can_read_sock() {
        return None;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    let (family, protocol) = unsafe {
        (
            read::<u16>(sock, offsets.skc_family)?,
            read::<u16>(sock, offsets.sk_protocol)?,
        )
    };
    (protocol == IPPROTO_TCP && (family == AF_INET || family == AF_INET6)).then_some(family)
}

/// Fills the connection's addresses and ports from its `struct sock`.
#[inline(always)]
pub fn read_endpoints(sock: u64, family: u16, offsets: &Offsets, conn: &mut ConnState) -> bool {
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

/// The `struct sock` behind file descriptor `fd` of the current task, if `fd` is a socket.
/// The caller checks that the result is a tracked connection.
#[inline(always)]
pub fn sock_of_fd(fd: u32, offsets: &Offsets) -> Option<u64> {
    if !offsets.can_resolve_fd() {
        return None;
    }
    // SAFETY: probe reads of kernel memory; failures are returned, not faulted.
    unsafe {
        let task = bpf_get_current_task();
        let files: u64 = read(task, offsets.task_files)?;
        let fdt: u64 = read(files, offsets.files_fdt)?;
        let max_fds: u32 = read(fdt, offsets.fdt_max_fds)?;
        if fd >= max_fds {
            return None;
        }
        let fd_array: u64 = read(fdt, offsets.fdt_fd)?;
        let file: u64 = read(fd_array + u64::from(fd) * 8, 0)?;
        let socket: u64 = read(file, offsets.file_private_data)?;
        let sock: u64 = read(socket, offsets.socket_sk)?;
        (sock != 0).then_some(sock)
    }
}
