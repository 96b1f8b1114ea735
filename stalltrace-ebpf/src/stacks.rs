//! Where a spinning thread spins: a CPU-clock perf event, opened by the daemon only for the
//! threads behind open stalls that are on CPU, samples their user stacks.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, perf_event},
    maps::{HashMap, StackTrace},
    programs::{tracing::StackIdContext as _, PerfEventContext},
};
use stalltrace_common::StackKey;

#[map]
pub(crate) static STACKS: StackTrace = StackTrace::with_max_entries(1024, 0);

/// Samples per (thread, stack).
#[map]
pub(crate) static STACK_COUNTS: HashMap<StackKey, u64> = HashMap::with_max_entries(4096, 0);

#[perf_event]
pub(crate) fn stalltrace_stack(ctx: PerfEventContext) -> u32 {
    let Ok(stack_id) = ctx.get_stackid(&STACKS, BPF_F_USER_STACK.into()) else {
        return 0;
    };
    let key = StackKey {
        tid: bpf_get_current_pid_tgid() as u32,
        stack_id: stack_id as u32,
    };
    match STACK_COUNTS.get_ptr_mut(&key) {
        // SAFETY: map value pointer, valid for the program run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = STACK_COUNTS.insert(&key, &1, 0);
        }
    }
    0
}
