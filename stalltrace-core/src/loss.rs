//! Loss accounting: everything the daemon failed to observe or deliver is counted by cause and
//! surfaced in `status` and in periodic `loss` events. Nothing is dropped silently.
use serde::{Deserialize, Serialize};

/// Declares the counters once: the struct, and what is done to every field (sum, difference,
/// names), so that a new cause cannot be forgotten in one of them.
macro_rules! loss_counters {
    ($($(#[doc = $doc:expr])+ $field:ident,)+) => {
        /// Every userspace table is bounded; what a full table turns away or evicts is counted
        /// here too (the last causes), next to what the kernel and the event output lost.
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[serde(default)]
        pub struct LossCounters {
            $($(#[doc = $doc])+ pub $field: u64,)+
        }

        impl LossCounters {
            /// Every cause with its count, in declaration order.
            fn causes(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($field), self.$field)),+].into_iter()
            }

            /// What was lost since `earlier`.
            pub fn since(&self, earlier: &Self) -> Self {
                Self {
                    $($field: self.$field.saturating_sub(earlier.$field),)+
                }
            }
        }
    };
}

loss_counters! {
    /// Kernel events dropped because the ring buffer was full.
    kernel_ringbuf_full,
    /// Connections the kernel could not start tracking (map insert failed).
    kernel_conn_insert_failed,
    /// Transfers the kernel did not run our program for: its recursion guard skips a program
    /// already running on that CPU (an fexit program preempted mid-run; on the tracepoint and
    /// kprobe rungs, only a program nested from an interrupt), and, on the kprobe rung, a
    /// kretprobe out of instances (more threads inside `tcp_recvmsg` than its `maxactive`),
    /// counted when the thread makes its next call.
    kernel_hook_missed,
    /// HTTP/2 streams the kernel did not follow (their slots held by older streams awaiting
    /// their responses), counted once per transfer that opened such streams.
    kernel_http2_untracked,
    /// HTTP/2 connections whose frames the kernel stopped following (frames out of step, too
    /// many frames in one transfer, bytes it could not read, stream state evicted or not
    /// insertable): judged by the direction rule from then on.
    kernel_http2_framing_lost,
    /// Connections whose kernel state was evicted from the full connection map.
    conn_evicted,
    /// Connections whose close was never observed.
    close_unseen,
    /// Ring buffer records that could not be decoded.
    malformed_records,
    /// Events not written to the events file or stdout (write errors).
    events_write_failed,
    /// Event lines dropped for `watch` clients that read too slowly.
    watch_dropped,
    /// Event lines dropped because stdout or the events file did not keep up.
    output_blocked,
    /// Requests and stalls counted in an `(other signatures)` group of `why` because its
    /// group table was full.
    why_groups_evicted,
    /// Request samples `why` did not take because too many were awaiting their completion.
    why_samples_dropped,
    /// Binaries evicted from the symbol cache (re-read when needed again).
    symbol_cache_evicted,
    /// Spinning threads whose stack was not sampled because the most threads were sampled.
    stack_threads_unsampled,
    /// Diagnoses not done or not kept: the worker's queue or the diagnosis tables were full.
    diagnoses_dropped,
    /// HTTP/1.x responses not judged by their framing: the kernel's copy of their start was
    /// gone (its slot reused or evicted) when the sweep looked.
    http1_heads_missed,
}

/// The causes with something lost, as `cause=count` pairs: for log lines.
impl std::fmt::Display for LossCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut separator = "";
        for (cause, count) in self.causes().filter(|(_, count)| *count > 0) {
            write!(f, "{separator}{cause}={count}")?;
            separator = ", ";
        }
        Ok(())
    }
}

impl LossCounters {
    pub fn total(&self) -> u64 {
        self.causes().map(|(_, count)| count).sum()
    }

    /// Losses that may have been any connection's events or state: they make stalls'
    /// diagnoses `partial`. A close never seen is one known connection's (it is closed as
    /// lost), and the bounded tables' and the output's losses lose no kernel state.
    pub fn tracking(&self) -> u64 {
        self.kernel_ringbuf_full
            + self.kernel_conn_insert_failed
            + self.kernel_hook_missed
            + self.conn_evicted
            + self.malformed_records
    }
}

/// The body of a `loss` event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossReport {
    /// Lost since the previous `loss` event.
    pub new: LossCounters,
    /// Lost since the daemon started.
    pub total: LossCounters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_and_totals() {
        let earlier = LossCounters {
            kernel_ringbuf_full: 5,
            watch_dropped: 1,
            ..Default::default()
        };
        let now = LossCounters {
            kernel_ringbuf_full: 8,
            watch_dropped: 1,
            close_unseen: 2,
            ..Default::default()
        };
        let delta = now.since(&earlier);
        assert_eq!(delta.kernel_ringbuf_full, 3);
        assert_eq!(delta.watch_dropped, 0);
        assert_eq!(delta.close_unseen, 2);
        assert_eq!(delta.total(), 5);
        assert_eq!(now.total(), 11);
        // The closes never seen are two known connections', not anyone's state.
        assert_eq!(now.tracking(), 8);
        let evicted = LossCounters {
            symbol_cache_evicted: 4,
            ..now
        };
        assert_eq!(evicted.since(&now).symbol_cache_evicted, 4);
        assert_eq!(evicted.since(&now).tracking(), 0);
        // Older daemons' answers lack the new causes.
        let old: LossCounters = serde_json::from_str(r#"{"kernel_ringbuf_full":1}"#).unwrap();
        assert_eq!(old.total(), 1);
    }

    #[test]
    fn log_lines_name_only_what_was_lost() {
        let lost = LossCounters {
            close_unseen: 4,
            output_blocked: 2,
            ..Default::default()
        };
        assert_eq!(lost.to_string(), "close_unseen=4, output_blocked=2");
        assert_eq!(lost.tracking(), 0, "neither makes other stalls partial");
    }
}
