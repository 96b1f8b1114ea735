//! Request capture: the first bytes of each request, read from the user buffer of the syscall
//! that moved them (the data is there: the socket tracepoints fire after the copy). The buffer
//! is found in the syscall's registers (`bpf_task_pt_regs`), so no syscall hook is needed.
//! The register layout and syscall numbers are per architecture (x86-64 and arm64, below);
//! elsewhere capture is off.
#[cfg(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))]
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};
use aya_ebpf::helpers::{
    bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_user_raw,
};
use stalltrace_common::{capture_slot, http2, syscall_regs, Capture, CAPTURE_MAX};

use crate::{
    maps::{CAPTURES, CAPTURE_BYTES, CAPTURE_SLOTS, REPLY_HEADS},
    words::zero_words,
};

#[cfg(bpf_target_arch = "x86_64")]
const REGS: syscall_regs::Layout = syscall_regs::X86_64;
#[cfg(bpf_target_arch = "aarch64")]
const REGS: syscall_regs::Layout = syscall_regs::AARCH64;

/// `struct mmsghdr` (the same on every 64-bit architecture): a `user_msghdr`, then `msg_len`
/// (the bytes the kernel moved, written after each message).
const MMSGHDR_SIZE: u64 = 64;
const MMSGHDR_LEN: u64 = 56;
/// `struct mmsghdr` entries looked at to find the one being moved.
const MAX_MMSGS: u64 = 4;
/// `struct iovec` entries walked from the first to find an offset past it (the HTTP/1.x
/// copies; the HTTP/2 walk resumes from its [`Walker`]'s entry instead, [`MAX_IOVEC_STEPS`]).
const MAX_IOVECS: u64 = 8;

/// `sock`'s slot in `CAPTURES`, which the sockets whose addresses hash alike share. An array
/// slot pointer, valid for the program run; a concurrent writer on another CPU can only
/// garble a capture, which `sock` then no longer matches or the recognizers survive (they
/// are fuzzed).
#[inline(always)]
fn slot_of(sock: u64) -> Option<*mut Capture> {
    CAPTURES.get_ptr_mut(capture_slot(sock, CAPTURE_SLOTS.load()))
}

/// Copies up to `len` bytes of the request that just started on `sock` into its slot.
/// Returns the slot, or `None` when capture is off or the buffer cannot be located.
#[inline(never)]
pub(crate) fn capture_request(sock: u64, len: u64, now: u64) -> Option<&'static mut Capture> {
    let limit = u64::from(CAPTURE_BYTES.load());
    if limit == 0 {
        return None;
    }
    // SAFETY: see `slot_of`.
    let slot = unsafe { &mut *slot_of(sock)? };
    read_head(slot, len.min(u64::from(limit)))?;
    slot.sock = sock;
    slot.request_ns = now;
    Some(slot)
}

/// Forgets the request copy an earlier connection at `sock`'s address left in its slot, as a
/// new connection opens there: slots are matched by address, which the kernel reuses, and a
/// stall on a connection whose request was never copied (a server that never read it) would
/// name the earlier connection's.
#[inline(always)]
pub(crate) fn forget(sock: u64) {
    if CAPTURE_BYTES.load() == 0 {
        return;
    }
    if let Some(slot) = slot_of(sock) {
        // SAFETY: see `slot_of`.
        unsafe {
            if (*slot).sock == sock {
                (*slot).sock = 0;
            }
        }
    }
}

/// The copy of the request in flight on `sock`, while its slot still holds it (another
/// connection's request may have taken the slot since).
#[inline(always)]
pub(crate) fn held(sock: u64) -> Option<&'static Capture> {
    if CAPTURE_BYTES.load() == 0 {
        return None;
    }
    // SAFETY: see `slot_of`.
    let slot = unsafe { &*slot_of(sock)? };
    (slot.sock == sock).then_some(slot)
}

/// Reads the first bytes of the reply-direction run that just moved `len` bytes into this
/// CPU's scratch slot (never reported: only classified). `None` when capture is off or the
/// buffer cannot be located.
#[inline(never)]
pub(crate) fn reply_head(len: u64) -> Option<&'static Capture> {
    if CAPTURE_BYTES.load() == 0 {
        return None;
    }
    // SAFETY: per-CPU slot pointer, valid for the program run; nothing else runs on this CPU.
    let slot = unsafe { &mut *REPLY_HEADS.get_ptr_mut(0)? };
    read_head(slot, len)?;
    Some(slot)
}

/// The current syscall's data, when capture is on (request and response bytes are read only
/// then), with its first two buffers located: what the HTTP/1.x copies read from.
pub(crate) struct Located {
    data: Data,
    /// The first buffer's user address and length (`u64::MAX` for a single buffer), and the
    /// second's (length 0: none).
    first: (u64, u64),
    second: (u64, u64),
}

impl Located {
    /// Finds the current syscall's data: a vectored call's first two `iovec` entries in one
    /// user read (nginx writes a response's head and body as two). `None` when capture is
    /// off or the data cannot be located.
    #[inline(always)]
    pub(crate) fn current() -> Option<Located> {
        if CAPTURE_BYTES.load() == 0 {
            return None;
        }
        let data = syscall_data()?;
        let (first, second) = match data {
            Data::Buffer(base) => ((base, u64::MAX), (0, 0)),
            Data::Vector(_, 0) => return None,
            // SAFETY (both): probe reads of user memory: a failure is returned, not faulted.
            Data::Vector(iov, 1) => {
                let [base, len] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]).ok()? };
                ((base, len), (0, 0))
            }
            Data::Vector(iov, _) => {
                let [base, len, next_base, next_len] =
                    unsafe { bpf_probe_read_user(iov as *const [u64; 4]).ok()? };
                ((base, len), (next_base, next_len))
            }
        };
        Some(Located {
            data,
            first,
            second,
        })
    }

    /// Copies up to `len` bytes (at most `N`) of the first buffer into `dest`; the count
    /// copied (0 on a fault).
    #[inline(always)]
    pub(crate) fn copy<const N: usize>(&self, dest: &mut [u8; N], len: u64) -> u32 {
        let (buffer, available) = self.first;
        let size = len.min(available).min(N as u64) as u32;
        // SAFETY: `size` ≤ N, the destination's length; a fault is reported, not taken.
        let copied =
            unsafe { probe_read_user_raw(dest.as_mut_ptr().cast(), size, buffer as *const _) };
        if copied == 0 {
            size
        } else {
            0
        }
    }

    /// Copies up to `len` bytes (at most `ROOM`) of the first buffer into `dest` from `at`
    /// (taken modulo `ROOM`, a power of two: `dest` holds twice as many); the count copied
    /// (0 on a fault).
    #[inline(always)]
    pub(crate) fn copy_at<const ROOM: usize, const N: usize>(
        &self,
        dest: &mut [u8; N],
        at: u32,
        len: u64,
    ) -> u32 {
        const { assert!(ROOM.is_power_of_two() && N == 2 * ROOM) };
        let (buffer, available) = self.first;
        let at = (at as usize) & (ROOM - 1);
        let size = len.min(available).min(ROOM as u64) as u32;
        // SAFETY: `at` < ROOM and `size` ≤ ROOM: within the destination's 2 × ROOM bytes; a
        // fault is reported, not taken.
        let copied = unsafe {
            probe_read_user_raw(dest.as_mut_ptr().add(at).cast(), size, buffer as *const _)
        };
        if copied == 0 {
            size
        } else {
            0
        }
    }

    /// The 8 bytes at `offset` of the data, in memory order: one read when they lie in one
    /// of the two buffers located, else across up to [`MAX_TAIL_ENTRIES`] `iovec` entries.
    #[inline(always)]
    pub(crate) fn bytes8_at(&self, offset: u64) -> Option<[u8; 8]> {
        let ((base, len), (next_base, next_len)) = (self.first, self.second);
        if offset.saturating_add(8) <= len {
            return read8(base + offset);
        }
        if offset >= len && offset - len + 8 <= next_len {
            return read8(next_base + (offset - len));
        }
        bytes8_across(&self.data, offset)
    }
}

/// The 4 bytes at `offset` of the current syscall's user buffer (an HTTP/2 frame header past
/// the captured bytes; see `message::More`), if the buffer holds them.
#[inline(always)]
pub(crate) fn bytes_at(offset: usize) -> Option<[u8; 4]> {
    match word_at(offset as u64) {
        NO_WORD => None,
        word => Some((word as u32).to_ne_bytes()),
    }
}

pub(crate) const NO_WORD: u64 = u64::MAX;

/// The `u32` at `offset` of the data the syscall moved, in memory order, or [`NO_WORD`]. A
/// plain scalar across the call: an `Option<[u8; 4]>` came back packed in a way the verifier
/// refused. In a vectored call, the entry holding `offset` is found (a word that straddles two
/// entries is not read).
#[inline(never)]
fn word_at(offset: u64) -> u64 {
    let Some(data) = syscall_data() else {
        return NO_WORD;
    };
    let Some(address) = address_of(&data, offset, 4) else {
        return NO_WORD;
    };
    // SAFETY: a probe read of user memory: a fault is returned, not taken.
    match unsafe { bpf_probe_read_user(address as *const u32) } {
        Ok(word) => u64::from(word),
        Err(_) => NO_WORD,
    }
}

/// Where a walk through one transfer's data stands: the syscall's data, found once, and the
/// `iovec` entry the last read was in. Reads at increasing offsets (a frame walk) resume
/// there, so each entry is read once per transfer, however many frames it holds. Kept in a
/// per-CPU map slot (its contents are unknown to the verifier: one state per read site).
#[repr(C)]
pub(crate) struct Walker {
    /// 0: not located yet (the walk's first read finds the data); 1: a single buffer at
    /// `base`; 2: `count` `iovec` entries at `base`.
    kind: u64,
    base: u64,
    count: u64,
    /// The entry of the last read, and the offset of the data where it starts.
    entry: u64,
    start: u64,
    /// The stream id (bytes 5–8) of the header last read, or `NO_WORD`.
    pub(crate) id: u64,
    /// The 8 bytes [`stalltrace_h2_bytes8`] read last, in memory order.
    pub(crate) word: [u8; 8],
}

impl Walker {
    /// For a new transfer: the data is located again at its first read.
    pub(crate) fn reset(&mut self) {
        self.kind = 0;
        self.rewind();
    }

    /// Finds the syscall's data at the walk's first read; false when it cannot be.
    #[inline(always)]
    fn locate(&mut self) -> bool {
        if self.kind == 0 {
            match syscall_data() {
                Some(Data::Buffer(base)) => (self.kind, self.base) = (1, base),
                Some(Data::Vector(iov, count)) => {
                    (self.kind, self.base, self.count) = (2, iov, count);
                }
                None => return false,
            }
        }
        true
    }

    /// The 8 bytes at `offset` of the data (a frame header split between two transfers or
    /// between two `iovec` entries), in memory order: bytes past the data are read from its
    /// buffer (`http2::Bytes8`). In a vectored call, the entry holding `offset` is found from
    /// the walker's current one, as [`walk_header_at`] finds a header's (it moves there):
    /// grpcio packs its frames into 23-byte slices, so a header split between entries may lie
    /// anywhere in a write of dozens. Past the last entry's end, from the memory that follows
    /// it (grpcio reads into an `iovec` entry as long as the bytes it expects: a 3-byte read
    /// has 3 bytes of buffer).
    #[inline(always)]
    fn bytes8_at(&mut self, offset: u64) -> Option<[u8; 8]> {
        if !self.locate() {
            return None;
        }
        if self.kind == 1 {
            return read8(self.base + offset);
        }
        let entry = self.holding(offset)?;
        if entry.len - entry.within >= 8 || entry.index + 1 >= self.count {
            read8(entry.base + entry.within)
        } else {
            bytes8_from(self.base, self.count, entry)
        }
    }

    /// The `iovec` entry holding byte `offset` of the data, looking at most
    /// [`MAX_IOVEC_STEPS`] entries from the current one (which it moves there), or from the
    /// first when `offset` lies before the current one.
    #[inline(always)]
    fn holding(&mut self, offset: u64) -> Option<Entry> {
        if offset < self.start {
            self.rewind();
        }
        let mut step = 0;
        while step < MAX_IOVEC_STEPS && self.entry < self.count {
            let at = self.base + 16 * self.entry;
            // SAFETY: a probe read of user memory: a failure is returned, not faulted.
            let [base, len] = unsafe { bpf_probe_read_user(at as *const [u64; 2]).ok()? };
            if offset < self.start + len {
                return Some(Entry {
                    index: self.entry,
                    base,
                    len,
                    within: offset - self.start,
                });
            }
            self.start += len;
            self.entry += 1;
            step += 1;
        }
        None
    }

    /// Back to the first entry.
    fn rewind(&mut self) {
        // Volatile: LLVM merges plain stores to adjacent fields into a byte-by-byte memset.
        // SAFETY: pointers to this struct's own fields.
        unsafe {
            (&raw mut self.entry).write_volatile(0);
            (&raw mut self.start).write_volatile(0);
        }
    }
}

/// Entries a header read looks at from where the previous one stopped (grpcio writes a
/// request's HEADERS frame with a slice per HPACK name and value: two dozen entries).
const MAX_IOVEC_STEPS: u64 = 32;

/// The HTTP/2 frame header at `offset` of the current syscall's data (see [`Walker`]): bytes
/// 0–3 returned, and its last four of `http2::packed` (`END_STREAM` and stream id) left in
/// `walker.id`, or [`NO_WORD`] there when the header ends in a later `iovec` entry (the
/// caller reads those with [`stalltrace_h2_bytes8`]). [`NO_WORD`] when the data cannot be
/// located or read. One call per frame: each call site of this reader costs the verifier
/// its loop.
#[inline(never)]
pub(crate) fn walk_header_at(walker: &mut Walker, offset: u64) -> u64 {
    walker.id = NO_WORD;
    if !walker.locate() {
        return NO_WORD;
    }
    if walker.kind == 1 {
        return read_header(walker, walker.base + offset);
    }
    vector_header(walker, offset)
}

/// [`Walker::bytes8_at`] for the HTTP/2 walk, into this CPU's walker (`H2_WALKER`, its
/// `word`): 1 when read, 0 when not. A global BPF function (a scalar in, a scalar out): its
/// `iovec` loops are verified once, on their own, not once per pass over the walk's
/// `bpf_loop` callback (Linux 7.3's verifier went past 1M instructions with them inline).
#[unsafe(no_mangle)]
pub(crate) extern "C" fn stalltrace_h2_bytes8(offset: u64) -> u64 {
    let Some(walker) = crate::maps::H2_WALKER.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, used only within one program run.
    let walker = unsafe { &mut *walker };
    match walker.bytes8_at(offset) {
        Some(word) => {
            walker.word = word;
            1
        }
        None => 0,
    }
}

/// The 9-byte frame header at user address `address`, in one read: bytes 0–3 returned, the
/// last four of `http2::packed` left in `walker.id` ([`NO_WORD`] both when unreadable).
#[inline(always)]
fn read_header(walker: &mut Walker, address: u64) -> u64 {
    // SAFETY: a probe read of user memory: a fault is returned, not taken.
    let Ok(header) = (unsafe { bpf_probe_read_user(address as *const [u8; 9]) }) else {
        return NO_WORD;
    };
    let [a, b, c, d, e, f, g, h] = http2::packed(header);
    walker.id = u64::from(u32::from_ne_bytes([e, f, g, h]));
    u64::from(u32::from_ne_bytes([a, b, c, d]))
}

/// The word at `offset` of the `iovec` entries of `walker`, looking at most
/// [`MAX_IOVEC_STEPS`] entries from its current one (which it moves to the entry holding
/// `offset`); a frame header whose 9 bytes lie in that entry is read whole ([`read_header`]).
#[inline(always)]
fn vector_header(walker: &mut Walker, offset: u64) -> u64 {
    let Some(entry) = walker.holding(offset) else {
        return NO_WORD;
    };
    let (at, available) = (entry.base + entry.within, entry.len - entry.within);
    if available >= 9 {
        return read_header(walker, at);
    }
    if available >= 4 {
        return read_word(at);
    }
    let next = walker.base + 16 * (entry.index + 1);
    let has_next = entry.index + 1 < walker.count;
    straddling_word(entry.base + entry.len, available, next, has_next)
}

/// The word whose first `available` (1 to 3) bytes end an `iovec` entry at `end` and whose
/// others start the entry at `next` (`has_next`: there is one).
#[inline(always)]
fn straddling_word(end: u64, available: u64, next: u64, has_next: bool) -> u64 {
    if !has_next || available == 0 || available > 3 {
        return NO_WORD;
    }
    // SAFETY: a probe read of user memory: a failure is returned, not faulted.
    let Ok([next_base, next_len]) = (unsafe { bpf_probe_read_user(next as *const [u64; 2]) })
    else {
        return NO_WORD;
    };
    if next_len < 4 - available {
        return NO_WORD;
    }
    let (head, tail) = (read_word(end - 4), read_word(next_base));
    if head == NO_WORD || tail == NO_WORD {
        return NO_WORD;
    }
    // Memory order in a little- or big-endian load alike: bytes `end - available..end`, then
    // the next entry's.
    let shift = 8 * available as u32;
    let (head, tail) = (head as u32, tail as u32);
    let word = if cfg!(target_endian = "little") {
        (head >> (32 - shift)) | (tail << shift)
    } else {
        (head << (32 - shift)) | (tail >> shift)
    };
    u64::from(word)
}

/// The `u32` at user address `address`, in memory order, or [`NO_WORD`].
#[inline(always)]
fn read_word(address: u64) -> u64 {
    // SAFETY: a probe read of user memory: a fault is returned, not taken.
    match unsafe { bpf_probe_read_user(address as *const u32) } {
        Ok(word) => u64::from(word),
        Err(_) => NO_WORD,
    }
}

/// Entries of a vectored call the 8 bytes at an offset may span (a writer's chunk-size line,
/// data and `\r\n` each in an entry of their own: nginx).
const MAX_TAIL_ENTRIES: u64 = 4;

/// The 8 bytes at `offset` of `data`, in memory order, across up to [`MAX_TAIL_ENTRIES`]
/// entries of a vectored call. Each entry's part is read as a whole word from where it starts
/// (bytes past the part are user memory, shifted out).
#[inline(always)]
fn bytes8_across(data: &Data, offset: u64) -> Option<[u8; 8]> {
    let (iov, count) = match *data {
        Data::Buffer(base) => return read8(base + offset),
        Data::Vector(iov, count) => (iov, count),
    };
    let entry = iovec_holding(iov, count, offset)?;
    bytes8_from(iov, count, entry)
}

/// The 8 bytes from byte `entry.within` of `entry` (of the `count` entries of the `struct
/// iovec` array at `iov`), in memory order, across up to [`MAX_TAIL_ENTRIES`] entries.
#[inline(always)]
fn bytes8_from(iov: u64, count: u64, entry: Entry) -> Option<[u8; 8]> {
    let (mut index, mut address, mut available) = (
        entry.index,
        entry.base + entry.within,
        entry.len - entry.within,
    );
    let (mut word, mut missing) = (0u64, 8u64);
    let mut step = 0;
    while step < MAX_TAIL_ENTRIES {
        let take = if available < missing {
            available
        } else {
            missing
        };
        if take > 0 {
            let part = u64::from_be_bytes(read8(address)?);
            // take ≤ 8; a whole word only when nothing was taken before.
            word = if take == 8 {
                part
            } else {
                (word << (8 * take)) | (part >> (8 * (8 - take)))
            };
            missing -= take;
        }
        if missing == 0 {
            return Some(word.to_be_bytes());
        }
        index += 1;
        if index >= count {
            return None;
        }
        // SAFETY: a probe read of user memory: a failure is returned, not faulted.
        let [base, len] =
            unsafe { bpf_probe_read_user((iov + 16 * index) as *const [u64; 2]).ok()? };
        (address, available) = (base, len);
        step += 1;
    }
    None
}

#[inline(always)]
fn read8(address: u64) -> Option<[u8; 8]> {
    // SAFETY: a probe read of user memory: a fault is returned, not taken.
    unsafe { bpf_probe_read_user(address as *const [u8; 8]).ok() }
}

/// The user address of byte `offset` of `data`, if `size` bytes from it lie in one buffer.
#[inline(always)]
fn address_of(data: &Data, offset: u64, size: u64) -> Option<u64> {
    let (address, available) = match *data {
        Data::Buffer(base) => (base + offset, u64::MAX),
        Data::Vector(iov, count) => {
            let entry = iovec_holding(iov, count, offset)?;
            (entry.base + entry.within, entry.len - entry.within)
        }
    };
    (available >= size).then_some(address)
}

/// An entry of a `struct iovec` array, and where in it a byte of the data lies.
struct Entry {
    index: u64,
    base: u64,
    len: u64,
    within: u64,
}

/// In the `count` entries of the `struct iovec` array at `iov`, the entry holding byte
/// `offset` of the data.
#[inline(always)]
fn iovec_holding(iov: u64, count: u64, mut offset: u64) -> Option<Entry> {
    let mut i = 0;
    while i < MAX_IOVECS && i < count {
        // One read per entry (base, length): a helper call costs more than the bytes.
        // SAFETY: a probe read of user memory: a failure is returned, not faulted.
        let [base, len] = unsafe { bpf_probe_read_user((iov + 16 * i) as *const [u64; 2]).ok()? };
        if offset < len {
            return Some(Entry {
                index: i,
                base,
                len,
                within: offset,
            });
        }
        offset -= len;
        i += 1;
    }
    None
}

/// Copies up to `len` bytes from the current syscall's user buffer into `slot` (zeros after
/// them, as `message::Head` needs); sets `slot.len` to the count read (0 on a fault).
#[inline(always)]
fn read_head(slot: &mut Capture, len: u64) -> Option<()> {
    let (buffer, available) = first_buffer(&syscall_data()?)?;
    copy_user(slot, buffer, len.min(available));
    Some(())
}

/// Replaces the capture of the request in flight on `sock`, if its slot still holds it, with
/// the first `len` bytes at user address `buffer`: the plaintext that libssl's `SSL_read`
/// returned for a request whose records were captured (`libssl.rs`).
#[inline(always)]
pub(crate) fn recapture_request(sock: u64, buffer: u64, len: u64) {
    let limit = u64::from(CAPTURE_BYTES.load());
    let Some(slot) = slot_of(sock) else {
        return;
    };
    // SAFETY: see `slot_of`.
    let slot = unsafe { &mut *slot };
    if limit > 0 && slot.sock == sock {
        copy_user(slot, buffer, len.min(limit));
    }
}

/// Copies up to `len` bytes at user address `buffer` into `slot` (zeros after them); sets
/// `slot.len` to the count read (0 on a fault).
#[inline(always)]
fn copy_user(slot: &mut Capture, buffer: u64, len: u64) {
    let size = len.min(CAPTURE_MAX as u64) as u32;
    // SAFETY: the array follows two u64s and two u32s: 8-byte aligned. (An assignment of
    // zeros compiles to a byte-by-byte memset call.)
    unsafe { zero_words(&raw mut slot.bytes) };
    // SAFETY: `size` ≤ CAPTURE_MAX, the destination's length; a fault is reported, not taken.
    let copied =
        unsafe { probe_read_user_raw(slot.bytes.as_mut_ptr().cast(), size, buffer as *const _) };
    slot.len = if copied == 0 { size } else { 0 };
}

/// Where the data of the current syscall is.
pub(crate) enum Data {
    /// One buffer (read, write, sendto, recvfrom).
    Buffer(u64),
    /// An array of `struct iovec` and its length (readv, writev, sendmsg, recvmsg; the
    /// message being moved of sendmmsg, recvmmsg).
    Vector(u64, u64),
}

/// Other architectures have other registers and syscall numbers: there the daemon turns
/// capture off (this is never reached).
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
#[inline(always)]
pub(crate) fn syscall_data() -> Option<Data> {
    None
}

#[cfg(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))]
#[inline(always)]
pub(crate) fn syscall_data() -> Option<Data> {
    use syscall_regs::{MSGHDR_IOV, MSGHDR_IOVLEN};
    // SAFETY: `regs` is a BTF-typed `struct pt_regs *` from the kernel: the verifier turns
    // these loads into fault-safe ones at their (BTF-checked) offsets, with no helper call.
    // User memory is read with probe reads: failures are returned, not faulted.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let nr = syscall_nr(regs);
        let arg1 = regs.add(REGS.arg1.offset).cast::<u64>().read_volatile();
        match nr {
            n if n == REGS.read || n == REGS.write || n == REGS.sendto || n == REGS.recvfrom => {
                Some(Data::Buffer(arg1))
            }
            n if n == REGS.readv || n == REGS.writev => {
                let count = regs.add(REGS.arg2.offset).cast::<u64>().read_volatile();
                Some(Data::Vector(arg1, count))
            }
            n if n == REGS.sendmsg
                || n == REGS.recvmsg
                || n == REGS.sendmmsg
                || n == REGS.recvmmsg =>
            {
                let msghdr = if n == REGS.sendmsg || n == REGS.recvmsg {
                    arg1
                } else {
                    current_mmsghdr(arg1)
                };
                // Both members in one read: a user read is the costliest call here.
                const { assert!(MSGHDR_IOVLEN == MSGHDR_IOV + 8) };
                let [iov, count] =
                    bpf_probe_read_user((msghdr + MSGHDR_IOV) as *const [u64; 2]).ok()?;
                Some(Data::Vector(iov, count))
            }
            _ => None,
        }
    }
}

/// The current syscall reads from sockets without `sock_recv_length` or `tcp_recvmsg`
/// (`splice`, `sendfile`, `getsockopt`'s zero-copy receive: see `syscall_regs::Layout`).
#[cfg(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))]
#[inline(always)]
pub(crate) fn in_unseen_read_syscall() -> bool {
    // SAFETY: as in `syscall_data`: BTF-typed register loads.
    let nr = unsafe { syscall_nr(bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8) };
    nr == REGS.splice || nr == REGS.sendfile || nr == REGS.getsockopt
}

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
#[inline(always)]
pub(crate) fn in_unseen_read_syscall() -> bool {
    false
}

/// In a `sendmmsg`/`recvmmsg` array at `base`, the entry the kernel is moving: the first
/// whose `msg_len` is still 0 (the kernel writes each entry's after moving it). Callers zero
/// them, as glibc's resolver does; an array that does not reads as its first entry.
#[inline(always)]
fn current_mmsghdr(base: u64) -> u64 {
    let mut i = 0;
    while i < MAX_MMSGS {
        let entry = base + i * MMSGHDR_SIZE;
        // SAFETY: a probe read of user memory: a fault is returned, not taken.
        match unsafe { bpf_probe_read_user((entry + MMSGHDR_LEN) as *const u32) } {
            Ok(0) => return entry,
            Ok(_) => i += 1,
            Err(_) => break,
        }
    }
    base
}

/// The destination address of the datagram the current `sendto`/`sendmsg`/`sendmmsg` is
/// sending, written into `port` (host order) and `addr` (network order, IPv4 in the first 4
/// bytes) if it is an address of `family`. False when the call names no address (a
/// connected socket) or it cannot be read.
#[cfg(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))]
#[inline(never)]
pub(crate) fn syscall_peer(family: u16, port: &mut u16, addr: &mut [u8; 16]) -> bool {
    // SAFETY: as in `syscall_data`: BTF-typed register loads, probe reads of user memory.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let nr = syscall_nr(regs);
        let arg1 = regs.add(REGS.arg1.offset).cast::<u64>().read_volatile();
        let name = match nr {
            n if n == REGS.sendto => regs.add(REGS.arg4.offset).cast::<u64>().read_volatile(),
            n if n == REGS.sendmsg => match bpf_probe_read_user(arg1 as *const u64) {
                Ok(name) => name,
                Err(_) => return false,
            },
            n if n == REGS.sendmmsg => {
                match bpf_probe_read_user(current_mmsghdr(arg1) as *const u64) {
                    Ok(name) => name,
                    Err(_) => return false,
                }
            }
            _ => return false,
        };
        if name == 0 {
            return false;
        }
        // sockaddr_in: family, port, address at 4; sockaddr_in6: address at 8.
        let Ok(head) = bpf_probe_read_user(name as *const [u16; 2]) else {
            return false;
        };
        if head[0] != family {
            return false;
        }
        let (at, len) = if family == stalltrace_common::AF_INET6 {
            (8, 16)
        } else {
            (4, 4)
        };
        if probe_read_user_raw(addr.as_mut_ptr().cast(), len, (name + at) as *const _) != 0 {
            return false;
        }
        *port = u16::from_be(head[1]);
        true
    }
}

/// The current syscall's number, from the task's registers (see `syscall_regs`).
///
/// # Safety
/// `regs` is the BTF-typed `struct pt_regs *` of the current task.
#[cfg(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64"))]
#[inline(always)]
unsafe fn syscall_nr(regs: *const u8) -> u64 {
    unsafe {
        if REGS.nr.size == 4 {
            u64::from(regs.add(REGS.nr.offset).cast::<u32>().read_volatile())
        } else {
            regs.add(REGS.nr.offset).cast::<u64>().read_volatile()
        }
    }
}

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
#[inline(always)]
pub(crate) fn syscall_peer(_family: u16, _port: &mut u16, _addr: &mut [u8; 16]) -> bool {
    false
}

/// The user address of `data`'s first buffer, and how many bytes it holds: a vectored
/// call's first buffer (`iov[0]`) may hold fewer than the call moved.
#[inline(always)]
fn first_buffer(data: &Data) -> Option<(u64, u64)> {
    match *data {
        Data::Buffer(base) => Some((base, u64::MAX)),
        Data::Vector(iov, _) => {
            // SAFETY: a probe read of user memory: a failure is returned, not faulted.
            let [base, len] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]).ok()? };
            Some((base, len))
        }
    }
}
