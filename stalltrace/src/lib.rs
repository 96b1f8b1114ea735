//! stalltrace's daemon and CLI: everything that touches the kernel, /proc, sockets and files.
//! The logic they serve is in `stalltrace-core`.
//!
//! Data flows one way: kernel programs (`stalltrace-ebpf`, loaded by [`probes`]) and
//! [`sources`] (ring buffer records, /proc, BTF, tracefs, sock_diag) → the core's tracker →
//! [`diagnosis`] (gathering what explains a stall) and `why` → [`sinks`] (NDJSON events, the
//! control API). [`daemon`] owns the loop that runs them; [`cli`] is the client side of the API.
pub mod cli;
pub mod config;
pub mod daemon;
mod diagnosis;
mod heap;
pub mod logger;
mod privileges;
mod probes;
pub use probes::Rung;
pub mod sinks;
mod sources;
