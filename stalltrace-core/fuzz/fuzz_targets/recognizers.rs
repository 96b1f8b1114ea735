//! Request recognizers and the kernel programs' message classifier on arbitrary bytes: they
//! must never panic, the signature must stay short, and a protocol once recognized stays one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_common::{
    message::{classify, proto, Head},
    transfer::Look,
    transport, ConnState, CAPTURE_MAX,
};
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
    // As the kernel reads them: up to CAPTURE_MAX bytes, zeros after, of a longer transfer.
    let mut head = [0u8; CAPTURE_MAX];
    let len = data.len().min(CAPTURE_MAX);
    head[..len].copy_from_slice(&data[..len]);
    let head = Head::new(&head, len, data.len() as u64);
    let more = |at: usize| data.get(at..at + 4).map(|b| [b[0], b[1], b[2], b[3]]);
    // Unix sockets too: D-Bus is recognized there only.
    for transport in [transport::TCP, transport::UNIX] {
        for protocol in 0..=proto::DBUS + 1 {
            for look in [Look::Request, Look::Continuation, Look::Reply] {
                let mut conn = ConnState {
                    proto: protocol,
                    transport,
                    housekeeping_left: u16::from(data.first().copied().unwrap_or(0)),
                    ..Default::default()
                };
                classify(&mut conn, look, &head, more);
                assert!(protocol == proto::UNKNOWN || conn.proto != proto::UNKNOWN);
            }
        }
    }
});
