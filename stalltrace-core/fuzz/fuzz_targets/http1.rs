//! The HTTP/1.x parsers on arbitrary request and response bytes (the kernel copies both from
//! user memory: anything goes): they never panic; a framing with a known end never ends
//! inside the header block it parsed; pipelined requests are found in order, each where the
//! copy holds it, and the responses after them end in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_core::protocols::http1::{
    chunked_complete, framing, requests, response_ends, Framing,
};

fuzz_target!(|data: &[u8]| {
    // The first line is the request, the rest the response.
    let split = data.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (request, response) = data.split_at(split);
    let header_end = || {
        response
            .windows(2)
            .position(|w| w == b"\n\n" || w == b"\r\n")
            .expect("a complete header block has line ends")
    };
    match framing(request, response) {
        Framing::Length { bytes } => {
            assert!(bytes as usize > header_end(), "ends inside the header block")
        }
        Framing::Chunked { head } => {
            assert!(head as usize > header_end(), "a body inside the header block")
        }
        _ => {}
    }
    if let Ok(tail) = <[u8; 8]>::try_from(&data[..8.min(data.len())]) {
        let moved = u64::from(data[0]);
        let _ = chunked_complete(u64::from(data[1]), moved, tail);
    }
    // The whole input as a request-direction run's copy, the run maybe longer than the copy
    // (by the first byte's value); the responses after it from the first line on.
    let extra = data.first().map_or(0, |&b| u64::from(b));
    for run_len in [data.len() as u64, data.len() as u64 + extra] {
        let Some(found) = requests(data, run_len) else {
            continue;
        };
        assert!(found.starts.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(found.starts.iter().all(|&at| at < data.len()), "in the copy");
        let heads: Vec<&[u8]> = found.starts.iter().map(|&at| &data[at..]).collect();
        let ends = response_ends(response, &heads);
        assert!(ends.len() <= heads.len());
        assert!(ends.windows(2).all(|w| w[0] < w[1]), "responses end in order");
    }
});
