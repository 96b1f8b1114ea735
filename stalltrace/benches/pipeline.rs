//! Userspace microbenchmark: ring buffer record decoding + the tracker state machine, on one
//! core, over a realistic mix of lifecycle events (connection churn: every connection opens,
//! starts a request, and closes, on both ends). Prints one JSON line for `cargo xtask bench`.
use std::{hint::black_box, time::Instant};

use stalltrace::sinks::ndjson::EventSink;
use stalltrace_common::{
    conn_flags, direction, role, tcp_state, ConnEvent, ConnState, EventHeader, EventKind, AF_INET,
};
use stalltrace_core::tracker::Tracker;

const CONNECTIONS: u64 = 200_000;

/// The records the kernel writes for one connection's client and server ends.
fn lifecycle(n: u64, records: &mut Vec<Vec<u8>>) {
    let t = n * 10_000;
    for (end, conn_role) in [(0u64, role::CLIENT), (1, role::SERVER)] {
        let sock = 0xffff_8880_0000_0000 + n * 2 + end;
        let mut state = ConnState {
            open_ns: t,
            state_ns: t,
            role: conn_role,
            family: AF_INET,
            tcp_state: tcp_state::ESTABLISHED,
            flags: conn_flags::ESTABLISHED,
            tgid: 1000,
            tid: 1001,
            local_port: (n % 60_000) as u16 + 1024,
            peer_port: 8080,
            notified_epoch: 1,
            ..Default::default()
        };
        state.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        state.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut push = |kind: EventKind, state: &ConnState, at: u64| {
            let event = ConnEvent {
                header: EventHeader {
                    kind: kind as u32,
                    _pad: 0,
                    ts_ns: at,
                    sock,
                },
                conn: *state,
            };
            records.push(event.as_bytes().to_vec());
        };
        let opened = if conn_role == role::CLIENT {
            EventKind::Established
        } else {
            EventKind::Discovered
        };
        push(opened, &state, t);
        state.last_dir = if conn_role == role::CLIENT {
            direction::OUT
        } else {
            direction::IN
        };
        state.requests = 1;
        push(EventKind::RequestStarted, &state, t + 100);
        state.exchanges = 1;
        state.last_dir = if conn_role == role::CLIENT {
            direction::IN
        } else {
            direction::OUT
        };
        state.tcp_state = tcp_state::CLOSE;
        push(EventKind::Closed, &state, t + 200);
    }
}

fn main() {
    let mut records = Vec::new();
    for n in 0..CONNECTIONS {
        lifecycle(n, &mut records);
    }
    let count = records.len() as f64;

    let mut tracker = Tracker::new(5_000_000_000);
    let mut out = Vec::with_capacity(16);
    let started = Instant::now();
    for record in &records {
        let event = ConnEvent::from_bytes(record).expect("valid record");
        tracker.on_event(&event, &mut out);
        black_box(&out);
        out.clear();
    }
    let state_machine = count / started.elapsed().as_secs_f64();

    // The same, plus the NDJSON sink (encoding every output event, writing to /dev/null).
    let mut tracker = Tracker::new(5_000_000_000);
    let mut sink = EventSink::new(Box::new(std::io::sink()), "null".into());
    let started = Instant::now();
    for chunk in records.chunks(1024) {
        for record in chunk {
            let event = ConnEvent::from_bytes(record).expect("valid record");
            tracker.on_event(&event, &mut out);
        }
        sink.write_events(&out);
        sink.flush();
        out.clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let lines = sink.written();
    println!(
        "{{\"records\":{},\"decode_and_track_per_sec\":{:.0},\"with_ndjson_per_sec\":{:.0},\"ndjson_lines_per_sec\":{:.0}}}",
        records.len(),
        state_machine,
        count / elapsed,
        lines as f64 / elapsed
    );
}
