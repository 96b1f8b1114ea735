//! User-space symbolization: an instruction address in a process → the function containing
//! it, from the ELF symbol tables of the mapped binary (`.symtab`, else `.dynsym`), with Rust
//! and C++ names demangled. Stripped binaries give `module+0xoffset`.
//!
//! The binaries belong to whoever runs the spinning thread, so nothing about them is trusted:
//! a binary is opened through `/proc/PID/map_files/<range>` (the very inode the process maps,
//! not a path its owner could swap), must be a regular file, and is read through a budget
//! ([`MAX_READ_BYTES`], only the ranges the ELF parser asks for: headers and symbol tables);
//! what it yields is capped ([`MAX_SYMBOLS`], [`MAX_NAME`]). Parsed binaries are cached by
//! (device, inode), bounded in entries and bytes, least recently used evicted and counted.
use std::{
    collections::HashMap,
    fs,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt as _,
    sync::Arc,
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

/// Bytes read from one binary at most (headers, section headers, symbol and string tables).
const MAX_READ_BYTES: u64 = 64 << 20;
/// Function symbols kept per binary at most.
const MAX_SYMBOLS: usize = 500_000;
/// Longest symbol name kept, in bytes (demangled C++ templates can run to kilobytes).
const MAX_NAME: usize = 256;
/// Binaries cached at most.
const CACHE_ENTRIES: usize = 64;
/// Bytes of symbols cached at most (names and their entries).
const CACHE_BYTES: usize = 64 << 20;

/// A function symbol: [start, start + size) in the binary's virtual addresses.
struct Symbol {
    start: u64,
    size: u64,
    name: Box<str>,
}

/// What a binary tells about its addresses.
struct Binary {
    /// (file offset, file size, virtual address) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// Sorted by start.
    symbols: Vec<Symbol>,
}

impl Binary {
    /// Heap bytes it holds, roughly.
    fn bytes(&self) -> usize {
        self.segments.len() * 24
            + self.symbols.len() * std::mem::size_of::<Symbol>()
            + self.symbols.iter().map(|s| s.name.len()).sum::<usize>()
    }
}

/// A line of /proc/<pid>/maps that maps a file with execute permission.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// The mapped file's device (major, minor) and inode: its identity in the cache.
    pub dev: (u32, u32),
    pub inode: u64,
    pub path: String,
}

/// Parses the executable file mappings of /proc/<pid>/maps.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let (dev, inode) = (fields.next()?, fields.next()?);
            let path = fields.next()?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let (major, minor) = dev.split_once(':')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                dev: (
                    u32::from_str_radix(major, 16).ok()?,
                    u32::from_str_radix(minor, 16).ok()?,
                ),
                inode: inode.parse().ok()?,
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A cached binary (`None`: unreadable or not ELF, remembered so as not to retry).
struct Cached {
    binary: Option<Arc<Binary>>,
    bytes: usize,
    last_used: u64,
}

/// Caches parsed binaries by (device, inode) across calls, in bounded memory.
#[derive(Default)]
pub(crate) struct Symbolizer {
    binaries: HashMap<((u32, u32), u64), Cached>,
    cached_bytes: usize,
    uses: u64,
    /// Binaries evicted from the cache (counted as loss: `symbol_cache_evicted`).
    evicted: u64,
}

impl Symbolizer {
    /// Binaries evicted from the cache so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Names for `addresses` of process `pid`, innermost first; consecutive repeats collapsed.
    pub(crate) fn symbolize(&mut self, pid: u32, addresses: &[u64]) -> Vec<String> {
        let maps = read_bounded(&format!("/proc/{pid}/maps"), 4 << 20).unwrap_or_default();
        let mappings = parse_maps(&maps);
        let mut names: Vec<String> = Vec::new();
        for &address in addresses {
            let name = self.name(pid, &mappings, address);
            if names.last() != Some(&name) {
                names.push(name);
            }
        }
        names
    }

    fn name(&mut self, pid: u32, mappings: &[Mapping], address: u64) -> String {
        let Some(mapping) = mappings
            .iter()
            .find(|m| m.start <= address && address < m.end)
        else {
            return format!("{address:#x}");
        };
        let file_offset = address - mapping.start + mapping.offset;
        let module = mapping.path.rsplit('/').next().unwrap_or(&mapping.path);
        let module: String = module.chars().take(MAX_NAME).collect();
        self.binary(pid, mapping)
            .and_then(|binary| binary.function(file_offset))
            .unwrap_or_else(|| format!("{module}+{file_offset:#x}"))
    }

    fn binary(&mut self, pid: u32, mapping: &Mapping) -> Option<Arc<Binary>> {
        self.uses += 1;
        let key = (mapping.dev, mapping.inode);
        if let Some(cached) = self.binaries.get_mut(&key) {
            cached.last_used = self.uses;
            return cached.binary.clone();
        }
        let binary = load(pid, mapping).map(Arc::new);
        let bytes = binary.as_ref().map_or(0, |b| b.bytes()) + 64;
        while !self.binaries.is_empty()
            && (self.binaries.len() >= CACHE_ENTRIES || self.cached_bytes + bytes > CACHE_BYTES)
        {
            self.evict_least_recently_used();
        }
        if bytes <= CACHE_BYTES {
            self.cached_bytes += bytes;
            self.binaries.insert(
                key,
                Cached {
                    binary: binary.clone(),
                    bytes,
                    last_used: self.uses,
                },
            );
        }
        binary
    }

    fn evict_least_recently_used(&mut self) {
        let Some(key) = self
            .binaries
            .iter()
            .min_by_key(|(_, cached)| cached.last_used)
            .map(|(key, _)| *key)
        else {
            return;
        };
        if let Some(cached) = self.binaries.remove(&key) {
            self.cached_bytes -= cached.bytes;
            self.evicted += 1;
        }
    }
}

impl Binary {
    fn function(&self, file_offset: u64) -> Option<String> {
        let (seg_offset, _, seg_vaddr) = self.segments.iter().find(|(offset, size, _)| {
            *offset <= file_offset && file_offset < offset.saturating_add(*size)
        })?;
        let vaddr = seg_vaddr.wrapping_add(file_offset - seg_offset);
        let index = self
            .symbols
            .partition_point(|s| s.start <= vaddr)
            .checked_sub(1)?;
        let symbol = &self.symbols[index];
        let within = vaddr < symbol.start.saturating_add(symbol.size.max(1))
            || (symbol.size == 0
                && self
                    .symbols
                    .get(index + 1)
                    .is_none_or(|next| vaddr < next.start));
        within.then(|| symbol.name.to_string())
    }
}

/// A file read through a budget: reads beyond it fail, so a huge (or endless) file costs at
/// most the budget, whatever the ELF headers claim.
struct Budgeted {
    file: fs::File,
    left: u64,
}

impl Read for Budgeted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 && !buf.is_empty() {
            return Err(std::io::Error::other("symbol read budget exhausted"));
        }
        let len = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.file.read(&mut buf[..len])?;
        self.left -= read as u64;
        Ok(read)
    }
}

impl Seek for Budgeted {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Opens the file `mapping` maps in process `pid` through /proc/PID/map_files (the inode the
/// process maps, whatever its path now names) and reads its symbols within the budget.
fn load(pid: u32, mapping: &Mapping) -> Option<Binary> {
    let path = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    );
    let file = fs::File::open(&path).ok()?;
    let meta = file.metadata().ok()?;
    let same_inode = meta.ino() == mapping.inode
        && (libc::major(meta.dev()), libc::minor(meta.dev())) == mapping.dev;
    // A regular file (not a FIFO or device that could block or never end), at least an ELF
    // header long; larger ones are read only as far as the budget.
    if !meta.is_file() || meta.len() < 64 || !same_inode {
        return None;
    }
    let cache = object::ReadCache::new(Budgeted {
        file,
        left: MAX_READ_BYTES,
    });
    parse(&cache)
}

fn parse<'data, R: object::ReadRef<'data>>(data: R) -> Option<Binary> {
    let file = object::File::parse(data).ok()?;
    let segments = file
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            (offset, size, segment.address())
        })
        .collect();
    let mut symbols: Vec<Symbol> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
        .take(MAX_SYMBOLS)
        .filter_map(|s| {
            Some(Symbol {
                start: s.address(),
                size: s.size(),
                name: demangle(s.name().ok()?).into_boxed_str(),
            })
        })
        .collect();
    symbols.sort_by_key(|s| (s.start, std::cmp::Reverse(s.size)));
    symbols.dedup_by_key(|s| s.start);
    symbols.shrink_to_fit();
    Some(Binary { segments, symbols })
}

/// At most `limit` bytes of a text file (procfs files have no size to check first).
fn read_bounded(path: &str, limit: u64) -> Option<String> {
    let mut text = String::new();
    fs::File::open(path)
        .ok()?
        .take(limit)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Rust (legacy and v0) names without their hash; other names as they are; at most
/// [`MAX_NAME`] bytes.
fn demangle(name: &str) -> String {
    let mut name = format!("{:#}", rustc_demangle::demangle(name));
    if name.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
        name.push('…');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_file_mappings() {
        let maps = "55d4c0a00000-55d4c0a20000 r--p 00000000 fe:01 131 /usr/bin/app\n\
                    55d4c0a20000-55d4c0b00000 r-xp 00020000 fe:01 131 /usr/bin/app\n\
                    7ffd1000-7ffd2000 r-xp 00000000 00:00 0 [vdso]\n\
                    7f00-8f00 rw-p 00000000 00:00 0\n";
        assert_eq!(
            parse_maps(maps),
            [Mapping {
                start: 0x55d4_c0a2_0000,
                end: 0x55d4_c0b0_0000,
                offset: 0x20000,
                dev: (0xfe, 1),
                inode: 131,
                path: "/usr/bin/app".into(),
            }]
        );
    }

    #[test]
    fn demangles_rust_names() {
        assert_eq!(
            demangle("_ZN10stalltrace5tests4spin17h0123456789abcdefE"),
            "stalltrace::tests::spin"
        );
        assert_eq!(demangle("epoll_wait"), "epoll_wait");
        let long = demangle(&"x".repeat(10_000));
        assert!(long.len() <= MAX_NAME + 3 && long.ends_with('…'), "{long}");
    }

    #[inline(never)]
    fn a_function_with_a_name() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn symbolizes_a_function_of_this_process() {
        let address = a_function_with_a_name as *const () as u64;
        let names = Symbolizer::default().symbolize(std::process::id(), &[address + 1]);
        assert_eq!(names.len(), 1);
        assert!(names[0].ends_with("a_function_with_a_name"), "{names:?}");
        assert_eq!(
            Symbolizer::default().symbolize(std::process::id(), &[8]),
            ["0x8"]
        );
    }

    #[test]
    fn the_cache_is_bounded_and_counts_evictions() {
        let address = a_function_with_a_name as *const () as u64;
        let mut symbolizer = Symbolizer::default();
        let _ = symbolizer.symbolize(std::process::id(), &[address]);
        assert_eq!(symbolizer.binaries.len(), 1);
        assert!(symbolizer.cached_bytes > 0);
        // Fill the cache with fake entries: the oldest go, counted.
        for inode in 0..(CACHE_ENTRIES as u64 + 5) {
            symbolizer.uses += 1;
            let mapping = Mapping {
                start: 0,
                end: 0,
                offset: 0,
                dev: (0, 0),
                inode: u64::MAX - inode,
                path: "/nonexistent".into(),
            };
            assert!(symbolizer.binary(std::process::id(), &mapping).is_none());
        }
        assert_eq!(symbolizer.binaries.len(), CACHE_ENTRIES);
        assert_eq!(symbolizer.evicted(), 6);
        assert!(symbolizer.cached_bytes <= CACHE_BYTES);
    }

    #[test]
    fn reads_stop_at_the_budget() {
        let file = fs::File::open("/proc/self/exe").unwrap();
        let mut budgeted = Budgeted { file, left: 10 };
        let mut buf = [0u8; 64];
        assert_eq!(budgeted.read(&mut buf).unwrap(), 10);
        assert!(budgeted.read(&mut buf).is_err());
    }
}
