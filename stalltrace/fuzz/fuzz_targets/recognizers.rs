//! Request recognizers on arbitrary bytes: they must never panic, and their output must stay a
//! short signature whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The recognizers are pure and self-contained: include the module itself rather than the
// daemon crate (which builds eBPF programs).
#[path = "../../src/signature.rs"]
#[allow(dead_code)]
mod signature;

fuzz_target!(|data: &[u8]| {
    if let Some(found) = signature::recognize(data) {
        let shown = found.display();
        assert!(shown.len() <= 160, "signature too long: {shown:?}");
        assert!(!shown.contains('\n'), "signature spans lines: {shown:?}");
    }
});
