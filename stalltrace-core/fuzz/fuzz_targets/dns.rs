//! The DNS query recognizer on query datagrams whose header is valid and whose question is
//! arbitrary (labels, compression pointers, cut anywhere), and the UDP datagram rule on
//! arbitrary sequences: they never panic, names stay short, and a one-way flow never becomes
//! outstanding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stalltrace_common::{direction, message::proto, role, transfer, udp, ConnState};
use stalltrace_core::protocols;

fuzz_target!(|data: &[u8]| {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(data);
    if let Some(found) = protocols::recognize(&query) {
        let shown = found.display();
        assert!(shown.len() <= 160, "signature too long: {shown:?}");
        assert!(!shown.contains('\n'), "signature spans lines: {shown:?}");
    }
    // Each pair of bytes is a datagram: direction, from the peer or not, and an id.
    for dns in [false, true] {
        let mut conn = ConnState {
            role: role::CLIENT,
            proto: if dns { proto::DNS } else { proto::OTHER },
            ..Default::default()
        };
        for (t, pair) in data.chunks(2).enumerate() {
            let b = pair[0];
            let dir = if b & 1 == 0 { direction::OUT } else { direction::IN };
            let id = (b & 2 != 0).then(|| u16::from(pair.get(1).copied().unwrap_or(0) & 3));
            udp::record_datagram(&mut conn, dir, 10, t as u64, b & 4 == 0, id);
            if !dns && conn.udp_flags & udp::flags::ANSWERED == 0 {
                assert!(!transfer::is_outstanding(&conn), "one-way flow judged");
            }
            assert!(conn.exchanges <= conn.requests);
        }
    }
});
