//! Resolves kernel struct member offsets from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), so the kernel programs can read `struct sock` and the file table
//! on any kernel layout (aya's Rust programs cannot carry CO-RE field relocations).
//!
//! Only what that needs is parsed: the type section (all kinds, to keep type ids right) and
//! struct/union members.
use std::collections::HashMap;

use anyhow::{bail, ensure, Context as _, Result};
use stalltrace_common::Offsets;

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

mod kind {
    pub(super) const INT: u8 = 1;
    pub(super) const PTR: u8 = 2;
    pub(super) const ARRAY: u8 = 3;
    pub(super) const STRUCT: u8 = 4;
    pub(super) const UNION: u8 = 5;
    pub(super) const ENUM: u8 = 6;
    pub(super) const FWD: u8 = 7;
    pub(super) const TYPEDEF: u8 = 8;
    pub(super) const VOLATILE: u8 = 9;
    pub(super) const CONST: u8 = 10;
    pub(super) const RESTRICT: u8 = 11;
    pub(super) const FUNC: u8 = 12;
    pub(super) const FUNC_PROTO: u8 = 13;
    pub(super) const VAR: u8 = 14;
    pub(super) const DATASEC: u8 = 15;
    pub(super) const FLOAT: u8 = 16;
    pub(super) const DECL_TAG: u8 = 17;
    pub(super) const TYPE_TAG: u8 = 18;
    pub(super) const ENUM64: u8 = 19;
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
pub(crate) struct Btf {
    data: Vec<u8>,
    types: Vec<Type>,
    strings: (usize, usize),
    structs_by_name: HashMap<String, u32>,
}

/// Where a member lives and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub offset: u32,
    pub size: u32,
}

impl Btf {
    pub(crate) fn from_kernel() -> Result<Self> {
        let data = std::fs::read(VMLINUX_BTF).with_context(|| {
            format!("reading {VMLINUX_BTF} (needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")
        })?;
        Self::parse(data)
    }

    pub(crate) fn parse(data: Vec<u8>) -> Result<Self> {
        ensure!(
            data.len() >= 24,
            "BTF blob too short ({} bytes)",
            data.len()
        );
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#x})");
        let u32_at = |off: usize| u32::from_le_bytes(data[off..off + 4].try_into().unwrap());
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = (hdr_len + str_off, str_len);
        ensure!(
            types_end <= data.len() && strings.0 + strings.1 <= data.len(),
            "BTF sections exceed the blob"
        );
        let mut types = Vec::new();
        let mut pos = types_start;
        while pos < types_end {
            ensure!(pos + 12 <= types_end, "truncated BTF type at byte {pos}");
            let info = u32_at(pos + 4);
            let ty = Type {
                kind: ((info >> 24) & 0x1f) as u8,
                name_off: u32_at(pos),
                vlen: (info & 0xffff) as u16,
                kind_flag: info >> 31 == 1,
                size_or_type: u32_at(pos + 8),
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
                other => bail!("unknown BTF kind {other} at byte {pos}"),
            };
            pos = ty.extra + extra_len;
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

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.data[off..off + 4].try_into().unwrap())
    }

    fn string(&self, off: u32) -> &str {
        let (start, len) = self.strings;
        let start = start + off as usize;
        let end = self.data[start..start + len - off as usize]
            .iter()
            .position(|&b| b == 0)
            .map_or(start, |n| start + n);
        std::str::from_utf8(&self.data[start..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1)
            .and_then(|index| self.types.get(index as usize))
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..32 {
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

    fn size_of(&self, id: u32) -> Option<u32> {
        let (_, ty) = self.resolve(id)?;
        match ty.kind {
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FLOAT => {
                Some(ty.size_or_type)
            }
            kind::PTR => Some(8),
            kind::ARRAY => {
                let elem = self.u32_at(ty.extra);
                let count = self.u32_at(ty.extra + 8);
                self.size_of(elem)?.checked_mul(count)
            }
            _ => None,
        }
    }

    /// Finds `name` among the members of the struct/union `id`, looking inside anonymous
    /// members. Returns (byte offset, member type id).
    fn find_member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let (_, ty) = self.resolve(id)?;
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
            let (offset, found) = self.find_member(member_type, name)?;
            Some((bit_offset / 8 + offset, found))
        })
    }

    /// Offset and size of `path` (members, outermost first) within `struct name`.
    pub(crate) fn member(&self, struct_name: &str, path: &[&str]) -> Option<Member> {
        let mut id = *self.structs_by_name.get(struct_name)?;
        let mut offset = 0;
        for step in path {
            let (member_offset, member_type) = self.find_member(id, step)?;
            offset += member_offset;
            id = member_type;
        }
        Some(Member {
            offset,
            size: self.size_of(id)?,
        })
    }
}

/// The offsets the kernel programs use; members that cannot be found (or have an unexpected
/// size) stay unknown, which disables the feature that needs them. `missing` names them.
pub(crate) fn resolve_offsets(btf: &Btf) -> (Offsets, Vec<&'static str>) {
    let mut offsets = Offsets::unknown();
    let mut missing = Vec::new();
    let wanted: [(&mut u32, &str, &[&str], u32, &'static str); 8] = [
        (
            &mut offsets.skc_family,
            "sock",
            &["__sk_common", "skc_family"],
            2,
            "sock.skc_family",
        ),
        (
            &mut offsets.sk_protocol,
            "sock",
            &["sk_protocol"],
            2,
            "sock.sk_protocol",
        ),
        (
            &mut offsets.skc_daddr,
            "sock",
            &["__sk_common", "skc_daddr"],
            4,
            "sock.skc_daddr",
        ),
        (
            &mut offsets.skc_rcv_saddr,
            "sock",
            &["__sk_common", "skc_rcv_saddr"],
            4,
            "sock.skc_rcv_saddr",
        ),
        (
            &mut offsets.skc_dport,
            "sock",
            &["__sk_common", "skc_dport"],
            2,
            "sock.skc_dport",
        ),
        (
            &mut offsets.skc_num,
            "sock",
            &["__sk_common", "skc_num"],
            2,
            "sock.skc_num",
        ),
        (
            &mut offsets.skc_v6_daddr,
            "sock",
            &["__sk_common", "skc_v6_daddr"],
            16,
            "sock.skc_v6_daddr",
        ),
        (
            &mut offsets.skc_v6_rcv_saddr,
            "sock",
            &["__sk_common", "skc_v6_rcv_saddr"],
            16,
            "sock.skc_v6_rcv_saddr",
        ),
    ];
    for (slot, struct_name, path, size, label) in wanted {
        match btf.member(struct_name, path) {
            Some(member) if member.size == size => *slot = member.offset,
            _ => missing.push(label),
        }
    }
    (offsets, missing)
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
    fn unresolved_members_are_reported_missing() {
        let (offsets, missing) = resolve_offsets(&sample());
        assert_eq!(offsets.skc_dport, 12);
        assert_eq!(offsets.skc_family, 16);
        assert_eq!(offsets.sk_protocol, 120);
        assert!(offsets.can_read_sock());
        assert!(missing.is_empty(), "{missing:?}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
        let mut blob = Builder::new().build();
        blob[12] = 200; // type section longer than the blob
        assert!(Btf::parse(blob).is_err());
    }

    #[test]
    fn running_kernel_layout_resolves() {
        // A kernel without BTF fails this test, loudly: the daemon loses adoption there.
        let btf = Btf::from_kernel().unwrap_or_else(|err| {
            panic!("this kernel's BTF ({VMLINUX_BTF}) is unreadable: {err:#}")
        });
        let (offsets, missing) = resolve_offsets(&btf);
        assert!(missing.is_empty(), "missing members: {missing:?}");
        // These have been stable in sock_common forever; a wrong parse would move them.
        assert_eq!(offsets.skc_daddr, 0);
        assert_eq!(offsets.skc_rcv_saddr, 4);
        assert_eq!(offsets.skc_dport, 12);
        assert_eq!(offsets.skc_num, 14);
    }
}
