//! stalltrace's pure core: everything that turns kernel records into verdicts and answers
//! without touching the kernel, /proc or a socket.
//!
//! - [`tracker`]: the connection lifecycle and stall state machine (kernel records in, events
//!   out);
//! - [`protocols`]: request recognizers over captured bytes;
//! - [`btf`]: the BTF parser the daemon resolves kernel struct offsets with;
//! - [`cgroup`]: container ids in cgroup paths;
//! - [`diagnosis`]: the model of "why is it stalled" and its pure classifiers;
//! - [`why`]: what is different about the requests that stall;
//! - [`loss`]: loss counters by cause;
//! - [`api`]: the control protocol and the public JSON shapes (events, answers);
//! - [`duration`], [`timefmt`]: human durations and RFC 3339 times.
//!
//! Must not: depend on aya or a build script, do I/O (the clock aside), or know how the
//! daemon schedules its work. The daemon crate (`stalltrace`) feeds it and ships its output.
/// `Display` for vocabulary enums: their wire name (`as_str`), so that text output and JSON
/// always use the same word.
macro_rules! display_as_str {
    ($($name:ty),+ $(,)?) => {$(
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )+};
}

pub mod api;
pub mod btf;
pub mod cgroup;
pub mod diagnosis;
pub mod duration;
pub mod loss;
pub mod protocols;
pub mod timefmt;
pub mod tracker;
pub mod why;
