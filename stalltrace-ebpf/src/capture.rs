//! Request capture: the first bytes of each request, read from the user buffer of the syscall
//! that moved them (the data is there: the socket tracepoints fire after the copy). The buffer
//! is found in the syscall's registers (`bpf_task_pt_regs`), so no syscall hook is needed.
//! x86-64 only (register layout and syscall numbers).
use aya_ebpf::helpers::{
    bpf_probe_read_user,
    generated::{
        bpf_get_current_task_btf, bpf_probe_read_user as probe_read_user_raw, bpf_task_pt_regs,
    },
};
use stalltrace_common::{capture_slot, Capture, CAPTURE_MAX};

use crate::maps::{CAPTURES, CAPTURE_BYTES, CAPTURE_SLOTS};

/// `struct pt_regs` offsets on x86-64.
const PT_REGS_SI: u64 = 13 * 8;
const PT_REGS_ORIG_AX: u64 = 15 * 8;

// x86-64 syscall numbers whose second argument locates the data.
const READ: u64 = 0;
const WRITE: u64 = 1;
const READV: u64 = 19;
const WRITEV: u64 = 20;
const SENDTO: u64 = 44;
const RECVFROM: u64 = 45;
const SENDMSG: u64 = 46;
const RECVMSG: u64 = 47;
/// `struct user_msghdr.msg_iov`.
const MSGHDR_IOV: u64 = 16;

/// Copies up to `len` bytes of the request that just started on `sock` into its slot.
/// Returns the slot, or `None` when capture is off or the buffer cannot be located.
#[inline(never)]
pub(crate) fn capture_request(sock: u64, len: u64, now: u64) -> Option<&'static mut Capture> {
    let limit = u64::from(CAPTURE_BYTES.load());
    if limit == 0 {
        return None;
    }
    let slots = CAPTURE_SLOTS.load();
    // SAFETY: array slot pointer, valid for the program run; a concurrent writer on another
    // CPU can only garble a capture, which `sock` then no longer matches or the recognizers
    // survive (they are fuzzed).
    let slot = unsafe { &mut *CAPTURES.get_ptr_mut(capture_slot(sock, slots))? };
    let buffer = user_buffer()?;
    let size = len.min(limit).min(CAPTURE_MAX as u64) as u32;
    // SAFETY: `size` ≤ CAPTURE_MAX, the destination's length; a fault is reported, not taken.
    let copied =
        unsafe { probe_read_user_raw(slot.bytes.as_mut_ptr().cast(), size, buffer as *const _) };
    slot.sock = sock;
    slot.request_ns = now;
    slot.len = if copied == 0 { size } else { 0 };
    Some(slot)
}

/// The user address of the data the current syscall moved. Other architectures have other
/// registers and syscall numbers: there the daemon turns capture off (this is never reached).
#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
fn user_buffer() -> Option<u64> {
    None
}

/// The user address of the data the current syscall moved.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn user_buffer() -> Option<u64> {
    // SAFETY: `regs` is a BTF-typed `struct pt_regs *` from the kernel: the verifier turns
    // these loads into fault-safe ones at their (BTF-checked) offsets, with no helper call.
    // User memory is read with probe reads: failures are returned, not faulted.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64;
        let nr = regs.byte_add(PT_REGS_ORIG_AX as usize).read_volatile();
        let arg1 = regs.byte_add(PT_REGS_SI as usize).read_volatile();
        match nr {
            READ | WRITE | SENDTO | RECVFROM => Some(arg1),
            // iov[0].iov_base
            READV | WRITEV => bpf_probe_read_user(arg1 as *const u64).ok(),
            SENDMSG | RECVMSG => {
                let iov: u64 = bpf_probe_read_user((arg1 + MSGHDR_IOV) as *const u64).ok()?;
                bpf_probe_read_user(iov as *const u64).ok()
            }
            _ => None,
        }
    }
}
