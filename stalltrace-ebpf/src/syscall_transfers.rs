//! The last rung: the data transfers from the syscall tracepoints, for kernels with neither the
//! sock tracepoints (6.3) nor BPF trampolines nor kprobes. The entry of each read/write-family
//! syscall resolves its file descriptor to a socket (`current->files`, read through the member
//! offsets the daemon took from BTF) and keeps it per thread in `CALLS`; the exit hands the
//! byte count to the same `on_transfer` as every other rung.
//!
//! Unlike the other rungs, these programs run for every read and write on the host, files and
//! pipes included: the entry stops at the inode's type, the exit at a map miss. The measured
//! cost is in docs/performance.md. Not seen on this rung: sendmmsg/recvmmsg, sendfile, splice
//! and io_uring.
use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use stalltrace_common::{direction, tracepoint as tp, FdOffsets, Offsets};

use crate::{
    maps::FD_OFFSETS,
    transfer_functions::{enter, leave},
};

const S_IFMT: u16 = 0o170_000;
const S_IFSOCK: u16 = 0o140_000;

/// read, write, readv, writev, sendto, sendmsg: the descriptor, no flags that matter.
#[tracepoint]
pub(crate) fn stalltrace_sys_enter_fd(ctx: TracePointContext) -> u32 {
    on_enter(&ctx, core::mem::offset_of!(tp::SysEnterFd, fd), None)
}

#[tracepoint]
pub(crate) fn stalltrace_sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    on_enter(
        &ctx,
        core::mem::offset_of!(tp::SysEnterRecvfrom, fd),
        Some(core::mem::offset_of!(tp::SysEnterRecvfrom, flags)),
    )
}

#[tracepoint]
pub(crate) fn stalltrace_sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    on_enter(
        &ctx,
        core::mem::offset_of!(tp::SysEnterRecvmsg, fd),
        Some(core::mem::offset_of!(tp::SysEnterRecvmsg, flags)),
    )
}

/// write, writev, sendto, sendmsg.
#[tracepoint]
pub(crate) fn stalltrace_sys_exit_send(ctx: TracePointContext) -> u32 {
    on_exit(&ctx, direction::OUT)
}

/// read, readv, recvfrom, recvmsg.
#[tracepoint]
pub(crate) fn stalltrace_sys_exit_recv(ctx: TracePointContext) -> u32 {
    on_exit(&ctx, direction::IN)
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext, fd_at: usize, flags_at: Option<usize>) -> u32 {
    // SAFETY: offsets within the record, checked against the kernel's format file at attach.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(fd_at) }) else {
        return 0;
    };
    let Some(sock) = socket_of(fd) else {
        return 0;
    };
    let flags = match flags_at {
        // SAFETY: as above.
        Some(at) => unsafe { ctx.read_at::<u64>(at) }.ok(),
        None => Some(0),
    };
    enter(Some(sock), flags)
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext, dir: u8) -> u32 {
    // SAFETY: as in `on_enter`.
    match unsafe { ctx.read_at::<i64>(core::mem::offset_of!(tp::SysExit, ret)) } {
        Ok(ret) => leave(ctx, dir, ret as i32),
        Err(_) => 0,
    }
}

/// The `struct sock` behind descriptor `fd` of the current task, if it is a socket.
#[inline(never)]
fn socket_of(fd: u64) -> Option<u64> {
    let o: FdOffsets = FD_OFFSETS.load();
    if o.socket_sk == Offsets::UNKNOWN {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files = read_u64(task, o.task_files)?;
    let fdt = read_u64(files, o.files_fdt)?;
    // SAFETY: probe reads of kernel memory: a fault is returned, not taken.
    let max_fds =
        unsafe { bpf_probe_read_kernel((fdt + u64::from(o.fdtable_max_fds)) as *const u32) }
            .ok()?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds = read_u64(fdt, o.fdtable_fd)?;
    let file = read_u64(fds, (fd * 8) as u32)?;
    let inode = read_u64(file, o.file_inode)?;
    // SAFETY: as above.
    let mode =
        unsafe { bpf_probe_read_kernel((inode + u64::from(o.inode_mode)) as *const u16) }.ok()?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket = read_u64(file, o.file_private_data)?;
    read_u64(socket, o.socket_sk)
}

/// The non-null pointer-sized member at `offset` of the kernel object at `base`.
#[inline(always)]
fn read_u64(base: u64, offset: u32) -> Option<u64> {
    if base == 0 {
        return None;
    }
    // SAFETY: a probe read of kernel memory: a fault is returned, not taken.
    let value = unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.ok()?;
    (value != 0).then_some(value)
}
