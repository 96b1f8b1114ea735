//! Who accepted a passive connection: `accept()`/`accept4()` return a file descriptor, which is
//! resolved to its `struct sock` through the task's file table. Connections established before
//! the daemon started are left to the transfer path, which discovers them on first traffic.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext, EbpfContext,
};
use aya_log_ebpf::debug;
use stalltrace_common::{tracepoint::SysExit, EventKind};

use crate::{
    conn::{emit, set_owner_to_current},
    kernel_read::sock_of_fd,
    maps::{CONNS, OFFSETS},
};

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn stalltrace_accept4(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn stalltrace_accept(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

#[inline(always)]
fn on_accept(ctx: &TracePointContext) {
    // SAFETY: the context of sys_exit_* tracepoints is a SysExit record.
    let ret = unsafe { (*(ctx.as_ptr() as *const SysExit)).ret };
    if ret < 0 || ret > i64::from(i32::MAX) {
        return;
    }
    let offsets = OFFSETS.load();
    let Some(sock) = sock_of_fd(ret as u32, &offsets) else {
        if offsets.can_resolve_fd() {
            debug!(ctx, "accept: fd {} did not resolve to a socket", ret);
        }
        return;
    };
    // Only connections seen completing their handshake are in the map: this also filters out
    // accepted Unix and non-TCP sockets.
    let Some(conn) = CONNS.get_ptr_mut(sock) else {
        return;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let conn = unsafe { &mut *conn };
    set_owner_to_current(conn);
    let now = unsafe { bpf_ktime_get_ns() };
    emit(EventKind::Accepted, sock, conn, now);
}
