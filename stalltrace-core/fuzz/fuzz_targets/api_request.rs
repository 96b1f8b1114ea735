//! The control API's request decoder on arbitrary input (anyone allowed on the socket can send
//! it anything): it must never panic, must refuse with one of the documented error codes, and
//! whatever it accepts must survive a round trip through the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::api::{self, ErrorCode};

fuzz_target!(|data: &[u8]| {
    // As the server hands it over: one line, trailing whitespace trimmed.
    let text = String::from_utf8_lossy(data);
    let line = text.trim_end();
    match api::parse_request(line) {
        Ok(request) => {
            assert_eq!(request.version, api::VERSION);
            let encoded = serde_json::to_string(&request).expect("requests serialize");
            assert!(!encoded.contains('\n'), "a request spans lines: {encoded:?}");
            let decoded = api::parse_request(&encoded).expect("an encoded request parses");
            assert_eq!(decoded, request);
        }
        Err(error) => {
            assert!(
                matches!(
                    error.code,
                    ErrorCode::BadRequest | ErrorCode::UnsupportedVersion
                ),
                "undocumented error code {:?}",
                error.code
            );
            assert!(!error.message.is_empty());
        }
    }
});
