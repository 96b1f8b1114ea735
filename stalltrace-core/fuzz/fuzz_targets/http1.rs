//! The HTTP/1.x response framing parser on arbitrary request and response heads (the kernel
//! copies both from user memory: anything goes): it never panics, and a framing with a known
//! end never ends inside the header block it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::protocols::http1::{chunked_complete, framing, Framing};

fuzz_target!(|data: &[u8]| {
    // The first line is the request, the rest the response.
    let split = data.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (request, response) = data.split_at(split);
    if let Framing::Length { bytes } = framing(request, response) {
        let header_end = response
            .windows(2)
            .position(|w| w == b"\n\n" || w == b"\r\n")
            .expect("a complete header block has line ends");
        assert!(bytes as usize > header_end, "ends inside the header block");
    }
    if let Ok(tail) = <[u8; 8]>::try_from(&data[..8.min(data.len())]) {
        let _ = chunked_complete(tail);
    }
});
