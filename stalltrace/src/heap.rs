//! Returning freed heap to the OS. glibc keeps freed small blocks in its arenas; after a
//! one-off peak (start-up, a large answer) that would show as resident memory for the
//! daemon's whole life.

pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only releases memory that is already free.
    unsafe { libc::malloc_trim(0) };
}
