//! User-space symbolization: an instruction address in a process → the function containing
//! it, from the ELF symbol tables of the mapped binary (`.symtab`, else `.dynsym`), with Rust
//! and C++ names demangled. Stripped binaries give `module+0xoffset`.
use std::{collections::HashMap, fs, path::PathBuf, sync::Arc};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

/// A function symbol: [start, start + size) in the binary's virtual addresses.
struct Symbol {
    start: u64,
    size: u64,
    name: String,
}

/// What a binary tells about its addresses.
struct Binary {
    /// (file offset, file size, virtual address) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// Sorted by start.
    symbols: Vec<Symbol>,
}

/// A line of /proc/<pid>/maps that maps a file with execute permission.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: String,
}

/// Parses the executable file mappings of /proc/<pid>/maps.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let path = fields.nth(2)?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                path: path.to_owned(),
            })
        })
        .collect()
}

/// Caches parsed binaries (by path) across calls.
#[derive(Default)]
pub(crate) struct Symbolizer {
    binaries: HashMap<PathBuf, Option<Arc<Binary>>>,
}

impl Symbolizer {
    /// Names for `addresses` of process `pid`, innermost first; consecutive repeats collapsed.
    pub(crate) fn symbolize(&mut self, pid: u32, addresses: &[u64]) -> Vec<String> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
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
        // Through /proc/<pid>/root: the path as the process sees it (containers).
        let path = PathBuf::from(format!("/proc/{pid}/root{}", mapping.path));
        let binary = self
            .binaries
            .entry(path.clone())
            .or_insert_with(|| load(&path).map(Arc::new))
            .clone();
        binary
            .and_then(|binary| binary.function(file_offset))
            .unwrap_or_else(|| format!("{module}+{file_offset:#x}"))
    }
}

impl Binary {
    fn function(&self, file_offset: u64) -> Option<String> {
        let (seg_offset, _, seg_vaddr) = self
            .segments
            .iter()
            .find(|(offset, size, _)| *offset <= file_offset && file_offset < offset + size)?;
        let vaddr = seg_vaddr + (file_offset - seg_offset);
        let index = self
            .symbols
            .partition_point(|s| s.start <= vaddr)
            .checked_sub(1)?;
        let symbol = &self.symbols[index];
        let within = vaddr < symbol.start + symbol.size.max(1)
            || (symbol.size == 0
                && self
                    .symbols
                    .get(index + 1)
                    .is_none_or(|next| vaddr < next.start));
        within.then(|| symbol.name.clone())
    }
}

fn load(path: &PathBuf) -> Option<Binary> {
    let data = fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
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
        .filter_map(|s| {
            Some(Symbol {
                start: s.address(),
                size: s.size(),
                name: demangle(s.name().ok()?),
            })
        })
        .collect();
    symbols.sort_by_key(|s| (s.start, std::cmp::Reverse(s.size)));
    symbols.dedup_by_key(|s| s.start);
    Some(Binary { segments, symbols })
}

/// Rust (legacy and v0) names without their hash; other names as they are.
fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
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
}
