//! stalltrace: an eBPF request stall tracer.
//!
//! Data flows one way: kernel programs (`stalltrace-ebpf`, loaded by `probes`) → `sources`
//! (ring buffer records, /proc, BTF, tracefs) → `tracker` (the pure lifecycle and stall state
//! machine) → `sinks` (NDJSON events, the control API). `cli` is the client side of the API.
pub mod api;
pub mod cli;
pub mod daemon;
pub mod diagnose;
pub mod diagnosis;
pub mod duration;
pub mod heap;
pub mod logger;
pub mod loss;
pub mod probes;
pub mod signature;
pub mod sinks;
pub mod sources;
pub mod timefmt;
pub mod tracker;
pub mod why;
