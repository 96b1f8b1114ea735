//! Every core rule against one daemon: the proof for a kernel where each daemon start is costly
//! (the kernel matrix's emulated arm64 guest verifies the programs for about two minutes). A
//! stuck request is flagged on both ends with its captured signature, an idle keep-alive
//! connection next to it is not, and the reply ends both stalls with their true duration.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
};

use stalltrace_integration::{
    echo_server, expected_capture_bytes, expected_http2_streams, reply_and_check_true_durations,
    require_root, send_timed_request, with_role, Daemon, SilentServer, REPORT_WITHIN, STALL_AFTER,
};

#[test]
fn one_daemon_flags_the_stuck_never_the_idle_and_times_the_end() {
    require_root();
    let daemon = Daemon::start("smoke");
    let capture = expected_capture_bytes();
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        status["features"]["request_capture_bytes"],
        capture,
        "{status:#}\n{}",
        daemon.stderr()
    );
    // The HTTP/2 frame walk (a verdict extra) is on exactly from Linux 6.5: 6.1 keeps capture
    // without it.
    assert_eq!(
        status["features"]["http2_streams"],
        expected_http2_streams(),
        "{status:#}"
    );

    let echo = echo_server("127.0.0.1");
    let mut idle = TcpStream::connect(echo).unwrap();
    for _ in 0..3 {
        idle.write_all(b"PING\r\n").unwrap();
        let mut reply = [0u8; 16];
        assert!(idle.read(&mut reply).unwrap() > 0);
    }
    let server = SilentServer::bind("127.0.0.1");
    let (mut client, sent) = send_timed_request(server.addr);
    let port = server.addr.port();

    let stalls = daemon.wait_for_stalls(port, 2, REPORT_WITHIN);
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", daemon.stderr());
    for (role, kind) in [
        ("server", "unanswered_request"),
        ("client", "awaiting_response"),
    ] {
        let stall = with_role(&stalls, role);
        assert_eq!(stall["stall"]["kind"], kind, "{stall:#}");
        if capture > 0 {
            assert_eq!(
                stall["stall"]["request"]["signature"], "GET /slow",
                "{stall:#}"
            );
        }
    }

    thread::sleep(STALL_AFTER * 2);
    let flagged = daemon.events_named("stall.start", echo.port());
    let missed = daemon.cli_json(&["status", "-o", "json"])["lost"]["kernel_hook_missed"]
        .as_u64()
        .unwrap_or(0);
    if !flagged.is_empty() && missed > 0 {
        // A transfer program the kernel skipped (a preemptible kernel runs tracepoint programs
        // preemptibly from 7.x: docs/design.md) loses a transfer, maybe this connection's
        // reply. The daemon cannot know the stall is false; it must say it may be.
        eprintln!(
            "NOTE: the kernel skipped {missed} transfer program runs; the idle keep-alive              connection was flagged {} time(s), and each must be `partial`",
            flagged.len()
        );
        for start in &flagged {
            assert_eq!(start["stall"]["confidence"], "partial", "{start:#}");
        }
    } else {
        assert_eq!(
            flagged,
            Vec::<serde_json::Value>::new(),
            "idle keep-alive flagged"
        );
        assert!(daemon.stalls(echo.port()).is_empty());
    }

    reply_and_check_true_durations(&daemon, &server, &mut client, sent);
}
