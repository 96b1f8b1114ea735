//! stalltrace: an eBPF request stall tracer.
//!
//! Data flows one way: kernel programs (`stalltrace-ebpf`) → `sources` (ring buffer, /proc,
//! BTF, tracefs) → `tracker` (the pure lifecycle and stall state machine) → `sinks` (NDJSON
//! events, the control API). `cli` is the client side of the API.
pub mod duration;
pub mod sinks;
pub mod sources;
pub mod timefmt;
pub mod tracker;
