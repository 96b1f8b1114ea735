//! Request recognizers on arbitrary bytes: they must never panic, and their output must stay a
//! short signature whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::protocols;

fuzz_target!(|data: &[u8]| {
    // Private defaults, and everything shown (preview, raw paths).
    let open = protocols::Privacy {
        preview: true,
        path_templates: false,
    };
    for privacy in [protocols::Privacy::default(), open] {
        if let Some(found) = protocols::recognize_with(data, privacy) {
            let shown = found.display();
            assert!(shown.len() <= 160, "signature too long: {shown:?}");
            assert!(!shown.contains('\n'), "signature spans lines: {shown:?}");
        }
    }
});
