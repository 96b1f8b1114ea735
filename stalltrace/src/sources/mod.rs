//! Where data comes from: the kernel (ring buffer and maps, via `crate::probes`), BTF, tracefs
//! and /proc.
pub(crate) mod btf;
pub(crate) mod procfs;
pub(crate) mod sock_diag;
pub(crate) mod symbols;
pub(crate) mod threads;
pub(crate) mod tracefs;
