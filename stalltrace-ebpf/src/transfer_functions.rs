//! The transfers of `transfer.rs` on kernels without its sock tracepoints (Linux < 6.3), taken
//! where the TCP send and receive functions return. The daemon picks one rung at start-up:
//!
//! - fexit (BPF trampolines; BTF, Linux 5.5+): arguments and return value in one program;
//! - kprobe + kretprobe (any kernel with CONFIG_KPROBES): the entry keeps the arguments per
//!   thread in `CALLS`, the return reads them back.
//!
//! Both end in the same `on_transfer` as the tracepoints, so events and verdicts do not depend
//! on the rung, but for HTTP/2's streams: the frame walk is the tracepoints' alone (see
//! `transfer::on_transfer`), and HTTP/2 takes the direction rule here. Only TCP functions are hooked: files, pipes and other sockets run nothing.
//! `tcp_sendpage` carries sendfile/splice sends, which bypass `tcp_sendmsg` before Linux 6.5
//! (the daemon hooks it where the kernel has it).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
    EbpfContext, Global,
};
use stalltrace_common::{direction, loss};

use crate::{maps::count_loss, transfer::on_transfer};

/// Parameters of `tcp_recvmsg`: 6 before Linux 5.19 (sk, msg, len, nonblock, flags, addr_len),
/// 5 from then on (nonblock folded into flags), 4 once addr_len went too (6.18). Set by the
/// daemon from the kernel's BTF; the verifier sees a constant and drops the other branches.
#[unsafe(no_mangle)]
static TCP_RECVMSG_ARGS: Global<u32> = Global::new(5);

/// Word `index` of an fexit context (the arguments, then the return value), read with a
/// helper. Read directly, a pointer argument is a typed kernel pointer (the verifier forbids
/// the arithmetic map keys and capture slots need), and LLVM may turn a choice between slots
/// into a context access at a computed offset (which the verifier refuses).
#[inline(always)]
fn ctx_word(ctx: &FExitContext, index: usize) -> Option<u64> {
    // SAFETY: `index` is within the traced function's arguments and return value (the callers
    // choose it by the function's prototype); a failed read is returned, not faulted.
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(index)).ok() }
}

// int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)
#[fexit(function = "tcp_sendmsg")]
pub(crate) fn stalltrace_send_fexit(ctx: FExitContext) -> i32 {
    if let (Some(sock), Some(ret)) = (ctx_word(&ctx, 0), ctx_word(&ctx, 3)) {
        on_transfer(&ctx, sock, direction::OUT, ret as i32, 0);
    }
    0
}

// int tcp_sendpage(struct sock *sk, struct page *page, int offset, size_t size, int flags)
#[fexit(function = "tcp_sendpage")]
pub(crate) fn stalltrace_sendpage_fexit(ctx: FExitContext) -> i32 {
    if let (Some(sock), Some(ret)) = (ctx_word(&ctx, 0), ctx_word(&ctx, 5)) {
        on_transfer(&ctx, sock, direction::OUT, ret as i32, 0);
    }
    0
}

#[fexit(function = "tcp_recvmsg")]
pub(crate) fn stalltrace_recv_fexit(ctx: FExitContext) -> i32 {
    // The return value follows the arguments.
    let (flags, ret) = match TCP_RECVMSG_ARGS.load() {
        6 => (ctx_word(&ctx, 4), ctx_word(&ctx, 6)),
        4 => (ctx_word(&ctx, 3), ctx_word(&ctx, 4)),
        _ => (ctx_word(&ctx, 3), ctx_word(&ctx, 5)),
    };
    if let (Some(sock), Some(flags), Some(ret)) = (ctx_word(&ctx, 0), flags, ret) {
        on_transfer(&ctx, sock, direction::IN, ret as i32, flags as i32);
    }
    0
}

/// What a kprobe keeps for its kretprobe.
#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    sock: u64,
    flags: u64,
}

/// Threads inside a hooked function or syscall, by pid_tgid. LRU: an entry whose return was
/// missed (the kernel's kretprobe instances ran out) is evicted in time rather than leaked,
/// or found by the thread's next call, and counted.
#[map]
static CALLS: LruHashMap<u64, Call> = LruHashMap::with_max_entries(1 << 14, 0);

/// Keeps the socket and flags of a call for its return (kprobe and syscall rungs).
#[inline(always)]
pub(crate) fn enter(sock: Option<u64>, flags: Option<u64>) -> u32 {
    let (Some(sock), Some(flags)) = (sock, flags) else {
        return 0;
    };
    let (key, call) = (bpf_get_current_pid_tgid(), Call { sock, flags });
    // A call of this thread still kept: its return ran no program (`loss::RETURN_MISSED`).
    if CALLS.insert(key, call, BPF_NOEXIST.into()).is_err() {
        count_loss(loss::RETURN_MISSED);
        let _ = CALLS.insert(key, call, 0);
    }
    0
}

/// The return of a call `enter` kept (`ret`: bytes moved or a negative errno): the transfer.
#[inline(always)]
pub(crate) fn leave<C: EbpfContext>(ctx: &C, dir: u8, ret: i32) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: map value pointer, copied out before the entry is removed.
    let Some(call) = CALLS.get_ptr(key).map(|call| unsafe { *call }) else {
        return 0;
    };
    let _ = CALLS.remove(key);
    on_transfer(ctx, call.sock, dir, ret, call.flags as i32);
    0
}

#[kprobe(function = "tcp_sendmsg")]
pub(crate) fn stalltrace_send_kprobe(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0), Some(0))
}

#[kretprobe(function = "tcp_sendmsg")]
pub(crate) fn stalltrace_send_kretprobe(ctx: RetProbeContext) -> u32 {
    leave(&ctx, direction::OUT, ctx.ret::<u64>() as i32)
}

#[kprobe(function = "tcp_sendpage")]
pub(crate) fn stalltrace_sendpage_kprobe(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0), Some(0))
}

#[kretprobe(function = "tcp_sendpage")]
pub(crate) fn stalltrace_sendpage_kretprobe(ctx: RetProbeContext) -> u32 {
    leave(&ctx, direction::OUT, ctx.ret::<u64>() as i32)
}

#[kprobe(function = "tcp_recvmsg")]
pub(crate) fn stalltrace_recv_kprobe(ctx: ProbeContext) -> u32 {
    // Both registers are read, then one is chosen: a register picked by index would be a
    // context access at a variable offset, which the verifier refuses.
    let (fourth, fifth) = (
        core::hint::black_box(ctx.arg::<u64>(3)),
        core::hint::black_box(ctx.arg::<u64>(4)),
    );
    let flags = if TCP_RECVMSG_ARGS.load() == 6 {
        fifth
    } else {
        fourth
    };
    enter(ctx.arg(0), flags)
}

#[kretprobe(function = "tcp_recvmsg")]
pub(crate) fn stalltrace_recv_kretprobe(ctx: RetProbeContext) -> u32 {
    leave(&ctx, direction::IN, ctx.ret::<u64>() as i32)
}
