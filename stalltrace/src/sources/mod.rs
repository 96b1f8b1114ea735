//! Where data comes from: the kernel (ring buffer and maps, via `crate::probes`), BTF, tracefs
//! and /proc.
pub mod btf;
pub mod procfs;
pub mod sock_diag;
pub mod symbols;
pub mod threads;
pub mod tracefs;
