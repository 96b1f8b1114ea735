//! Where data comes from: the kernel (ring buffer and maps, via `crate::probes`), BTF, tracefs,
//! /proc, network namespaces, sock_diag and ELF symbol tables. Each source reads and parses one thing; it must not
//! decide verdicts (the core's job) nor keep state across calls beyond a bounded cache.
pub(crate) mod btf;
pub(crate) mod cgroups;
pub(crate) mod netns;
pub(crate) mod procfs;
pub(crate) mod sock_diag;
pub(crate) mod symbols;
pub(crate) mod threads;
pub(crate) mod tracefs;
