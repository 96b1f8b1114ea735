//! The BTF parser on arbitrary blobs: an error or a parsed blob, never a panic, a hang or a
//! stack overflow; lookups on whatever parsed never panic either.
//!
//! Half the inputs are taken as whole blobs; the other half get a valid header (magic, header
//! length, section offsets from the first input bytes) around the rest, so that the fuzzer
//! spends its time in the type and string sections rather than on the magic number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::btf::Btf;

fn framed(data: &[u8]) -> Vec<u8> {
    let (&split, body) = data.split_first().unwrap_or((&0, &[]));
    let type_len = (usize::from(split) * 4).min(body.len()) as u32;
    let str_len = body.len() as u32 - type_len;
    let mut blob = vec![0x9f, 0xeb, 1, 0];
    for word in [24, 0, type_len, type_len, str_len] {
        blob.extend_from_slice(&u32::to_le_bytes(word));
    }
    blob.extend_from_slice(body);
    blob
}

fn lookups(btf: &Btf) {
    let _ = btf.member("sock", &["__sk_common", "skc_daddr"]);
    let _ = btf.member("sock", &["sk_protocol"]);
    let _ = btf.member("s", &["a", "b"]);
    // Every struct the blob names, with paths of the empty name (a member name offset
    // pointing at a NUL), which the fuzzer can produce without guessing names.
    for name in btf.struct_names().take(16) {
        let _ = btf.member(name, &[""]);
        let _ = btf.member(name, &["", ""]);
        let _ = btf.member(name, &[name]);
    }
}

fuzz_target!(|data: &[u8]| {
    let blob = match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => framed(rest),
        _ => data.to_vec(),
    };
    if let Ok(btf) = Btf::parse(blob) {
        lookups(&btf);
    }
});
