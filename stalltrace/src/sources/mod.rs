//! Where data comes from: the kernel (ring buffer and maps, via `crate::probes`), BTF, tracefs,
//! /proc, network namespaces, cgroups, sock_diag and ELF symbol tables. Each source reads and
//! parses one thing; it must not decide verdicts (the core's job) nor keep state across calls beyond a bounded cache.
pub(crate) mod btf;
pub(crate) mod cgroups;
pub(crate) mod kernel_clock;
pub(crate) mod libssl;
pub(crate) mod netns;
pub(crate) mod procfs;
pub(crate) mod sock_diag;
pub(crate) mod symbols;
pub(crate) mod threads;
pub(crate) mod tracefs;

/// Mounts a pseudo-filesystem of type `fstype` (also its source name) at `target`.
pub(crate) fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let target = std::ffi::CString::new(target)?;
    let fstype = std::ffi::CString::new(fstype)?;
    // SAFETY: valid NUL-terminated strings; no mount data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
