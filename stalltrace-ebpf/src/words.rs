//! Word-by-word copies. Plain struct copies compile to memcpy/memset calls that loop byte by
//! byte (slow) and, from a tracepoint context, use a modified context pointer (rejected by the
//! verifier). Volatile u64 accesses at constant offsets avoid both.
use core::mem::size_of;

/// Zeroes a `T` whose size is a multiple of 8 bytes, a word at a time.
///
/// # Safety
/// `dst` must be valid for writes and 8-byte aligned.
#[inline(always)]
pub(crate) unsafe fn zero_words<T>(dst: *mut T) {
    const { assert!(size_of::<T>() % 8 == 0) };
    let words = dst.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        unsafe { words.add(i).write_volatile(0) };
    }
}

/// Copies a `T` whose size is a multiple of 8 bytes.
///
/// # Safety
/// `dst` must be valid for writes, `src` for reads, both 8-byte aligned.
#[inline(always)]
pub(crate) unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(size_of::<T>() % 8 == 0) };
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}

/// Copies a 16-byte address (8-byte aligned at both ends, e.g. from a tracepoint record).
///
/// # Safety
/// `src` valid for reads, `dst` for writes, both 8-byte aligned.
#[inline(always)]
pub(crate) unsafe fn copy_addr16(dst: &mut [u8; 16], src: *const [u8; 16]) {
    let (dst, src) = ((dst as *mut [u8; 16]).cast::<u64>(), src.cast::<u64>());
    unsafe {
        dst.write_volatile(src.read_volatile());
        dst.add(1).write_volatile(src.add(1).read_volatile());
    }
}

/// Copies a 4-byte address (4-byte aligned at the source).
///
/// # Safety
/// `src` valid for reads and 4-byte aligned.
#[inline(always)]
pub(crate) unsafe fn copy_addr4(dst: &mut [u8; 16], src: *const [u8; 4]) {
    let word = unsafe { src.cast::<u32>().read_volatile() };
    unsafe { (dst as *mut [u8; 16]).cast::<u32>().write_volatile(word) };
}
