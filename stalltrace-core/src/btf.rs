//! A BTF parser: finds struct member offsets in a BTF blob (the running kernel's
//! `/sys/kernel/btf/vmlinux`), so the kernel programs can read `struct sock` on any kernel
//! layout (aya's Rust programs cannot carry CO-RE field relocations).
//!
//! Only what that needs is parsed: the type section (all kinds, to keep type ids right) and
//! struct/union members. The blob is untrusted input: every read is bounds-checked, type
//! chains and nesting are depth-limited, and malformed blobs are an error, never a panic or a
//! hang (fuzzed: `fuzz/fuzz_targets/btf.rs`).
use std::collections::{HashMap, HashSet};

const MAGIC: u16 = 0xeb9f;
/// Typedef/qualifier chains, array element chains and anonymous-member nesting followed at
/// most this deep (real kernels need a handful): a cyclic blob ends there.
const MAX_DEPTH: u32 = 32;

pub mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
}

/// Why a blob was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BtfError(pub String);

impl std::fmt::Display for BtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

macro_rules! reject {
    ($($arg:tt)*) => { return Err(BtfError(format!($($arg)*))) };
}

#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u8,
    name_off: u32,
    vlen: u16,
    kind_flag: bool,
    /// `size` for sized kinds, `type` for reference kinds.
    size_or_type: u32,
    /// Byte offset of the kind-specific data that follows the common header.
    extra: usize,
}

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    types: Vec<Type>,
    /// (start, length) of the string section in `data`.
    strings: (usize, usize),
    structs_by_name: HashMap<String, u32>,
}

/// Where a member lives and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
}

fn u32_in(data: &[u8], off: usize) -> Option<u32> {
    let bytes = data.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < 24 {
            reject!("BTF blob too short ({} bytes)", data.len());
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != MAGIC {
            reject!("not little-endian BTF (magic {magic:#x})");
        }
        let word = |off: usize| u32_in(&data, off).unwrap_or(0) as usize;
        let hdr_len = word(4);
        let (type_off, type_len) = (word(8), word(12));
        let (str_off, str_len) = (word(16), word(20));
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = (hdr_len + str_off, str_len);
        if hdr_len < 24 || types_end > data.len() || strings.0 + strings.1 > data.len() {
            reject!("BTF sections exceed the blob");
        }
        let mut types = Vec::new();
        let mut pos = types_start;
        while pos < types_end {
            if pos + 12 > types_end {
                reject!("truncated BTF type at byte {pos}");
            }
            let field = |off: usize| u32_in(&data, off).unwrap_or(0);
            let info = field(pos + 4);
            let ty = Type {
                kind: ((info >> 24) & 0x1f) as u8,
                name_off: field(pos),
                vlen: (info & 0xffff) as u16,
                kind_flag: info >> 31 == 1,
                size_or_type: field(pos + 8),
                extra: pos + 12,
            };
            let vlen = usize::from(ty.vlen);
            let extra_len = match ty.kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                other => reject!("unknown BTF kind {other} at byte {pos}"),
            };
            pos = ty.extra + extra_len;
            if pos > types_end {
                reject!(
                    "BTF type at byte {} overruns the type section",
                    ty.extra - 12
                );
            }
            types.push(ty);
        }
        let mut btf = Self {
            data,
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (index, ty) in btf.types.iter().enumerate() {
            if ty.kind == kind::STRUCT && ty.vlen > 0 {
                let name = btf.string(ty.name_off).to_owned();
                if !name.is_empty() {
                    btf.structs_by_name.entry(name).or_insert(index as u32 + 1);
                }
            }
        }
        Ok(btf)
    }

    /// A word of kind-specific data; parsing checked that it lies in the type section, so
    /// 0 (never seen) only guards against a bug.
    fn u32_at(&self, off: usize) -> u32 {
        u32_in(&self.data, off).unwrap_or(0)
    }

    /// The NUL-terminated string at `off` in the string section; "" when out of range or
    /// not UTF-8.
    fn string(&self, off: u32) -> &str {
        let (start, len) = self.strings;
        let Some(section) = self.data.get(start..start + len) else {
            return "";
        };
        let Some(tail) = section.get(off as usize..) else {
            return "";
        };
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1)
            .and_then(|index| self.types.get(index as usize))
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Some((id, ty)),
            }
        }
        None
    }

    fn size_of(&self, id: u32, depth: u32) -> Option<u32> {
        if depth >= MAX_DEPTH {
            return None;
        }
        let (_, ty) = self.resolve(id)?;
        match ty.kind {
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FLOAT => {
                Some(ty.size_or_type)
            }
            kind::PTR => Some(8),
            kind::ARRAY => {
                let elem = self.u32_at(ty.extra);
                let count = self.u32_at(ty.extra + 8);
                self.size_of(elem, depth + 1)?.checked_mul(count)
            }
            _ => None,
        }
    }

    /// Finds `name` among the members of the struct/union `id`, looking inside anonymous
    /// members. Returns (byte offset, member type id). Each struct is searched once (`seen`):
    /// a malformed blob whose anonymous members lead back to their own struct, many times
    /// over, would otherwise cost exponential time within the depth bound.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: u32,
        seen: &mut HashSet<u32>,
    ) -> Option<(u32, u32)> {
        if depth >= MAX_DEPTH {
            return None;
        }
        let (resolved, ty) = self.resolve(id)?;
        if !seen.insert(resolved) {
            return None;
        }
        if ty.kind != kind::STRUCT && ty.kind != kind::UNION {
            return None;
        }
        let mut anonymous = Vec::new();
        for index in 0..usize::from(ty.vlen) {
            let at = ty.extra + index * 12;
            let (member_name, member_type, raw_offset) =
                (self.u32_at(at), self.u32_at(at + 4), self.u32_at(at + 8));
            let bit_offset = if ty.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            if member_name == 0 {
                anonymous.push((bit_offset, member_type));
            } else if self.string(member_name) == name {
                return (bit_offset % 8 == 0).then_some((bit_offset / 8, member_type));
            }
        }
        anonymous.into_iter().find_map(|(bit_offset, member_type)| {
            let (offset, found) = self.find_member(member_type, name, depth + 1, seen)?;
            Some(((bit_offset / 8).checked_add(offset)?, found))
        })
    }

    /// The names of the (non-empty) structs the blob defines.
    pub fn struct_names(&self) -> impl Iterator<Item = &str> {
        self.structs_by_name.keys().map(String::as_str)
    }

    /// Offset and size of `path` (members, outermost first) within `struct name`.
    pub fn member(&self, struct_name: &str, path: &[&str]) -> Option<Member> {
        let mut id = *self.structs_by_name.get(struct_name)?;
        let mut offset: u32 = 0;
        for step in path {
            let (member_offset, member_type) =
                self.find_member(id, step, 0, &mut HashSet::new())?;
            offset = offset.checked_add(member_offset)?;
            id = member_type;
        }
        Some(Member {
            offset,
            size: self.size_of(id, 0)?,
        })
    }
    /// The parameter names of the kernel function `name` (a BTF FUNC and its FUNC_PROTO), in
    /// order; `None` when the blob has no such function. Unnamed parameters are "".
    pub fn function_params(&self, name: &str) -> Option<Vec<&str>> {
        let func = self
            .types
            .iter()
            .find(|ty| ty.kind == kind::FUNC && self.string(ty.name_off) == name)?;
        let proto = self.ty(func.size_or_type)?;
        if proto.kind != kind::FUNC_PROTO {
            return None;
        }
        Some(
            (0..usize::from(proto.vlen))
                .map(|index| self.string(self.u32_at(proto.extra + index * 8)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: enough of the format to test parsing against known layouts.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                ..Default::default()
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn header(
            &mut self,
            name: &str,
            kind: u8,
            vlen: u32,
            flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name = self.name(name);
            let info = (u32::from(flag) << 31) | (u32::from(kind) << 24) | vlen;
            for word in [name, info, size_or_type] {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            self.count += 1;
            self.count
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.header(name, kind::INT, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }

        fn ptr(&mut self, to: u32) -> u32 {
            self.header("", kind::PTR, 0, false, to)
        }

        fn array(&mut self, elem: u32, index: u32, count: u32) -> u32 {
            let id = self.header("", kind::ARRAY, 0, false, 0);
            for word in [elem, index, count] {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            id
        }

        fn composite(
            &mut self,
            kind: u8,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.header(name, kind, members.len() as u32, false, size);
            for &(member, ty, bit_offset) in members {
                let member = self.name(member);
                for word in [member, ty, bit_offset] {
                    self.types.extend_from_slice(&word.to_le_bytes());
                }
            }
            id
        }

        fn build(self) -> Vec<u8> {
            let mut blob = Vec::new();
            blob.extend_from_slice(&MAGIC.to_le_bytes());
            blob.extend_from_slice(&[1, 0]);
            let hdr_len = 24u32;
            let type_len = self.types.len() as u32;
            for word in [hdr_len, 0, type_len, type_len, self.strings.len() as u32] {
                blob.extend_from_slice(&word.to_le_bytes());
            }
            blob.extend_from_slice(&self.types);
            blob.extend_from_slice(&self.strings);
            blob
        }
    }

    #[test]
    fn function_params_come_from_the_func_proto() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let proto = b.header("", kind::FUNC_PROTO, 3, false, int);
        for (param, ty) in [("sk", int), ("", int), ("flags", int)] {
            let param = b.name(param);
            b.types.extend_from_slice(&param.to_le_bytes());
            b.types.extend_from_slice(&ty.to_le_bytes());
        }
        b.header("tcp_recvmsg", kind::FUNC, 0, false, proto);
        // A FUNC whose type is not a prototype is no function to hook.
        b.header("broken", kind::FUNC, 0, false, int);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(
            btf.function_params("tcp_recvmsg"),
            Some(vec!["sk", "", "flags"])
        );
        assert_eq!(btf.function_params("tcp_sendpage"), None);
        assert_eq!(btf.function_params("broken"), None);
    }

    /// A sock_common shaped like Linux's: addresses inside an anonymous struct inside an
    /// anonymous union, ports likewise.
    fn sample() -> Btf {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1);
        let u16_ = b.int("unsigned short", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("unsigned long long", 8);
        let addrs = b.composite(
            kind::STRUCT,
            "",
            8,
            &[("skc_daddr", u32_, 0), ("skc_rcv_saddr", u32_, 32)],
        );
        let addr_union = b.composite(
            kind::UNION,
            "",
            8,
            &[("skc_addrpair", u64_, 0), ("", addrs, 0)],
        );
        let ports = b.composite(
            kind::STRUCT,
            "",
            4,
            &[("skc_dport", u16_, 0), ("skc_num", u16_, 16)],
        );
        let port_union = b.composite(
            kind::UNION,
            "",
            4,
            &[("skc_portpair", u32_, 0), ("", ports, 0)],
        );
        let v6 = b.array(u8_, u32_, 16);
        let common = b.composite(
            kind::STRUCT,
            "sock_common",
            88,
            &[
                ("", addr_union, 0),
                ("", port_union, 96),
                ("skc_family", u16_, 16 * 8),
                ("skc_v6_daddr", v6, 56 * 8),
                ("skc_v6_rcv_saddr", v6, 72 * 8),
            ],
        );
        let sock_ptr = b.ptr(common);
        b.composite(
            kind::STRUCT,
            "sock",
            200,
            &[("__sk_common", common, 0), ("sk_protocol", u16_, 120 * 8)],
        );
        b.composite(
            kind::STRUCT,
            "socket",
            48,
            &[("state", u32_, 0), ("sk", sock_ptr, 24 * 8)],
        );
        Btf::parse(b.build()).unwrap()
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let btf = sample();
        assert_eq!(
            btf.member("sock", &["__sk_common", "skc_rcv_saddr"]),
            Some(Member { offset: 4, size: 4 })
        );
        assert_eq!(
            btf.member("sock", &["__sk_common", "skc_num"]),
            Some(Member {
                offset: 14,
                size: 2
            })
        );
        assert_eq!(
            btf.member("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
            Some(Member {
                offset: 72,
                size: 16
            })
        );
        assert_eq!(
            btf.member("socket", &["sk"]),
            Some(Member {
                offset: 24,
                size: 8
            })
        );
        assert_eq!(btf.member("socket", &["nope"]), None);
        assert_eq!(btf.member("nope", &["sk"]), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
        let mut blob = Builder::new().build();
        blob[12] = 200; // type section longer than the blob
        assert!(Btf::parse(blob).is_err());
    }

    /// Malformed blobs are errors (or harmless lookups), never panics, hangs or stack
    /// overflows: the cases the fuzzer exercises, pinned.
    #[test]
    fn malformed_blobs_are_errors_not_panics() {
        // A struct whose members run past the type section.
        let mut b = Builder::new();
        let u32_ = b.int("u", 4);
        b.composite(kind::STRUCT, "s", 4, &[("a", u32_, 0)]);
        let mut blob = b.build();
        let vlen_at = 24 + 16 + 4; // the struct's info word: 0x7f01 members
        blob[vlen_at] = 0x01;
        blob[vlen_at + 1] = 0x7f;
        assert!(Btf::parse(blob).is_err());

        // Unknown kind.
        let mut b = Builder::new();
        b.header("x", 31, 0, false, 0);
        assert!(Btf::parse(b.build()).is_err());

        // Header length below the minimum, sections at huge offsets.
        let mut blob = Builder::new().build();
        blob[4] = 4;
        assert!(Btf::parse(blob).is_err());
        let mut blob = Builder::new().build();
        blob[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::parse(blob).is_err());

        // A member name offset past the string section, a typedef cycle, an array of itself
        // and an anonymous member containing itself: lookups fail, they do not loop.
        let mut b = Builder::new();
        let typedef = b.header("t", kind::TYPEDEF, 0, false, 1); // id 1 -> itself
        let array = b.array(2, typedef, 4); // id 2: array of itself
        let anon = b.count + 1;
        b.composite(kind::STRUCT, "", 8, &[("", anon, 0)]); // anonymous member: itself
        let mut blob_builder = b;
        blob_builder.composite(
            kind::STRUCT,
            "sock",
            8,
            &[("a", typedef, 0), ("b", array, 0), ("", anon, 0)],
        );
        let mut blob = blob_builder.build();
        blob.extend_from_slice(&[0xff; 3]); // trailing bytes outside every section
        let btf = Btf::parse(blob).unwrap();
        assert_eq!(btf.member("sock", &["a"]), None);
        assert_eq!(btf.member("sock", &["b"]), None);
        assert_eq!(btf.member("sock", &["zz"]), None);
        assert_eq!(btf.string(u32::MAX), "");
    }

    #[test]
    fn anonymous_members_leading_back_many_times_are_searched_once() {
        // 64 anonymous members, each the struct itself: within the depth bound that was
        // 64^32 lookups (the fuzzer found it); each struct is now searched once.
        let mut b = Builder::new();
        let looped = b.count + 1;
        let members: Vec<(&str, u32, u32)> = (0..64).map(|_| ("", looped, 0)).collect();
        b.composite(kind::STRUCT, "sock", 8, &members);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.member("sock", &["skc_daddr"]), None);
    }
}
