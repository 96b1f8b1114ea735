//! Finding bytes in the data of a vectored call (`readv`, `writev`, `sendmsg`, `recvmsg`): an
//! array of `struct iovec` entries, each a user address and a length (bytes). The kernel
//! programs read the entries and the bytes from user memory; the tests give a model of it.
//! Both pass their readers in, so the search itself is written once.
//!
//! Each reader returns `None` when the memory cannot be read. Every loop is bounded by a
//! constant the caller gives, as the verifier needs.

/// One entry of a `struct iovec` array and where a byte of the data lies in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its index in the array.
    pub index: u64,
    /// Its user address and length (bytes).
    pub base: u64,
    pub len: u64,
    /// The byte's offset within it.
    pub within: u64,
}

/// Where a search through one call's entries stands: the entry it last reached and the
/// offset of the data where that entry starts. Reads at increasing offsets resume there, so
/// each entry is read once however many reads a transfer takes (a frame walk).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub entry: u64,
    pub start: u64,
}

impl Cursor {
    /// Back to the first entry.
    #[inline(always)]
    pub fn rewind(&mut self) {
        // Volatile: LLVM merges plain stores to adjacent fields into a byte-by-byte memset,
        // which costs the verifier a store per byte.
        // SAFETY: pointers to this struct's own fields.
        unsafe {
            (&raw mut self.entry).write_volatile(0);
            (&raw mut self.start).write_volatile(0);
        }
    }
}

/// The entry of the `count` entries holding byte `offset` of the data, looking at most
/// `max_steps` entries from `cursor` (which it moves there; to the first entry first when
/// `offset` lies before it). `entry(i)` reads entry `i`'s address and length.
#[inline(always)]
pub fn holding(
    cursor: &mut Cursor,
    count: u64,
    offset: u64,
    max_steps: u64,
    mut entry: impl FnMut(u64) -> Option<[u64; 2]>,
) -> Option<Entry> {
    if offset < cursor.start {
        cursor.rewind();
    }
    let mut step = 0;
    while step < max_steps && cursor.entry < count {
        let [base, len] = entry(cursor.entry)?;
        if offset < cursor.start + len {
            return Some(Entry {
                index: cursor.entry,
                base,
                len,
                within: offset - cursor.start,
            });
        }
        cursor.start += len;
        cursor.entry += 1;
        step += 1;
    }
    None
}

/// The 8 bytes from byte `from.within` of entry `from` (of `count`), in memory order,
/// across at most `max_entries` entries (empty ones included). `entry(i)` reads entry `i`;
/// `read8(address)` the 8 bytes at a user address, of which only those within the entry are
/// kept (the rest is memory that follows the entry, or past it).
#[inline(always)]
pub fn bytes8_from(
    count: u64,
    from: Entry,
    max_entries: u64,
    mut entry: impl FnMut(u64) -> Option<[u64; 2]>,
    mut read8: impl FnMut(u64) -> Option<[u8; 8]>,
) -> Option<[u8; 8]> {
    let (mut index, mut address) = (from.index, from.base + from.within);
    let mut available = from.len - from.within;
    let (mut word, mut missing) = (0u64, 8u64);
    let mut step = 0;
    while step < max_entries {
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
        [address, available] = entry(index)?;
        step += 1;
    }
    None
}

/// The `u32` in memory order whose first `available` (1 to 3) bytes end an entry and whose
/// others start the next: `head` is the `u32` read at the 4 bytes that end the entry, `tail`
/// the one at the next entry's start (both read in memory order).
#[inline(always)]
pub fn straddling_word(head: u32, tail: u32, available: u64) -> u32 {
    let shift = 8 * available as u32;
    if cfg!(target_endian = "little") {
        (head >> (32 - shift)) | (tail << shift)
    } else {
        (head << (32 - shift)) | (tail >> shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    /// User memory with a `struct iovec` array at `IOV` and each entry's bytes at an address
    /// of its own, 64 bytes apart (bytes after an entry's end are 0xee: not the data).
    struct Memory {
        bytes: Vec<u8>,
        count: u64,
    }

    const IOV: u64 = 0x1000;
    const DATA: u64 = 0x8000;

    impl Memory {
        fn new(slices: &[&[u8]]) -> Self {
            let mut bytes = vec![0xee; 0x8000 + 4096 * slices.len().max(1)];
            let mut at = DATA;
            for (i, slice) in slices.iter().enumerate() {
                let entry = IOV as usize + 16 * i;
                bytes[entry..entry + 8].copy_from_slice(&at.to_ne_bytes());
                bytes[entry + 8..entry + 16].copy_from_slice(&(slice.len() as u64).to_ne_bytes());
                bytes[at as usize..at as usize + slice.len()].copy_from_slice(slice);
                at += slice.len() as u64 + 64;
            }
            Self {
                bytes,
                count: slices.len() as u64,
            }
        }

        fn entry(&self, index: u64) -> Option<[u64; 2]> {
            let at = (IOV + 16 * index) as usize;
            let word = |at: usize| u64::from_ne_bytes(self.bytes[at..at + 8].try_into().unwrap());
            Some([word(at), word(at + 8)])
        }

        fn read8(&self, address: u64) -> Option<[u8; 8]> {
            let at = usize::try_from(address).ok()?;
            self.bytes.get(at..at + 8)?.try_into().ok()
        }

        fn read4(&self, address: u64) -> u32 {
            let at = address as usize;
            u32::from_ne_bytes(self.bytes[at..at + 4].try_into().unwrap())
        }

        fn bytes8(&self, cursor: &mut Cursor, offset: u64, max_steps: u64) -> Option<[u8; 8]> {
            let entry = holding(cursor, self.count, offset, max_steps, |i| self.entry(i))?;
            bytes8_from(self.count, entry, 4, |i| self.entry(i), |a| self.read8(a))
        }
    }

    /// `data` cut into slices of `size` bytes (the last one shorter).
    fn sliced(data: &[u8], size: usize) -> Vec<&[u8]> {
        data.chunks(size).collect()
    }

    #[test]
    fn every_offset_is_found_walking_forward_through_small_slices() {
        // grpcio packs its frames in 23-byte slices; one call writes dozens.
        let data: Vec<u8> = (0..=255u8).cycle().take(23 * 40).collect();
        let memory = Memory::new(&sliced(&data, 23));
        let mut cursor = Cursor::default();
        for offset in 0..data.len() as u64 - 8 {
            let got = memory.bytes8(&mut cursor, offset, 32);
            let want: [u8; 8] = data[offset as usize..offset as usize + 8]
                .try_into()
                .unwrap();
            assert_eq!(got, Some(want), "offset {offset}");
            assert_eq!(
                cursor.entry,
                offset / 23,
                "the cursor sits on the entry holding it"
            );
        }
    }

    #[test]
    fn an_offset_before_the_cursor_is_found_from_the_first_entry() {
        let data: Vec<u8> = (0..200u8).collect();
        let memory = Memory::new(&sliced(&data, 7));
        let mut cursor = Cursor::default();
        assert_eq!(memory.bytes8(&mut cursor, 150, 32).unwrap()[0], 150);
        assert_eq!(memory.bytes8(&mut cursor, 3, 32).unwrap()[0], 3);
        assert_eq!(cursor, Cursor { entry: 0, start: 0 });
    }

    #[test]
    fn the_search_gives_up_past_its_steps_and_past_the_data() {
        let data: Vec<u8> = (0..=255u8).cycle().take(280).collect();
        let memory = Memory::new(&sliced(&data, 7));
        // Entry 30 is 30 steps from the first: found with 32, not with 16.
        assert!(memory.bytes8(&mut Cursor::default(), 7 * 30, 16).is_none());
        assert!(memory.bytes8(&mut Cursor::default(), 7 * 30, 32).is_some());
        // Past the last entry.
        assert!(memory.bytes8(&mut Cursor::default(), 280, 64).is_none());
        // Eight bytes that run past the data's end.
        assert!(memory.bytes8(&mut Cursor::default(), 276, 64).is_none());
    }

    #[test]
    fn eight_bytes_span_at_most_four_entries_and_skip_empty_ones() {
        let data: Vec<u8> = (0..8u8).collect();
        let memory = Memory::new(&[&data[..2], &[], &data[2..5], &data[5..]]);
        assert_eq!(
            memory.bytes8(&mut Cursor::default(), 0, 32),
            Some(data[..].try_into().unwrap())
        );
        let memory = Memory::new(&[
            &data[..2],
            &data[2..4],
            &data[4..6],
            &data[6..7],
            &data[7..],
        ]);
        assert!(memory.bytes8(&mut Cursor::default(), 0, 32).is_none());
        // An unreadable entry is no answer.
        let memory = Memory::new(&sliced(&data, 3));
        let entry = holding(&mut Cursor::default(), 3, 0, 32, |i| memory.entry(i)).unwrap();
        assert!(bytes8_from(3, entry, 4, |_| None, |a| memory.read8(a)).is_none());
        assert!(bytes8_from(3, entry, 4, |i| memory.entry(i), |_| None).is_none());
    }

    #[test]
    fn a_word_straddling_two_entries_is_joined_in_memory_order() {
        let data: Vec<u8> = (10..20u8).collect();
        for cut in 1..4usize {
            let memory = Memory::new(&[&data[..cut], &data[cut..]]);
            let first = memory.entry(0).unwrap();
            let second = memory.entry(1).unwrap();
            let head = memory.read4(first[0] + first[1] - 4);
            let tail = memory.read4(second[0]);
            let word = straddling_word(head, tail, cut as u64);
            assert_eq!(word.to_ne_bytes(), [10, 11, 12, 13], "cut after {cut}");
        }
    }
}
