//! Returning memory the daemon no longer uses to the OS. glibc keeps freed small blocks in its
//! arenas; after a one-off peak (start-up, a large answer) that would show as resident memory
//! for the daemon's whole life. So would the pages of the binary that only start-up reads.

pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only releases memory that is already free.
    unsafe { libc::malloc_trim(0) };
}

/// Drops the whole pages of `bytes`, read-only data of the binary's image (file-backed, never
/// written), from resident memory: the eBPF object, 4 MiB read once while loading. A later
/// read would fault them back in from the file, unchanged.
pub(crate) fn release_image_pages(bytes: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => return,
    };
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end <= start {
        return;
    }
    // SAFETY: the range lies within a static of the binary's read-only image: a private file
    // mapping never written, whose pages MADV_DONTNEED drops and a later access reads again
    // from the file. No reference into it is invalidated.
    let ret =
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if ret != 0 {
        log::debug!(
            "releasing the eBPF object's pages: {}",
            std::io::Error::last_os_error()
        );
    }
}
