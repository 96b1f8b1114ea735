//! The BTF parser on arbitrary blobs: an error or a parsed blob, never a panic, a hang or a
//! stack overflow; lookups on whatever parsed never panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data.to_vec()) {
        let _ = btf.member("sock", &["__sk_common", "skc_daddr"]);
        let _ = btf.member("sock", &["sk_protocol"]);
        let _ = btf.member("s", &["a", "b"]);
    }
});
