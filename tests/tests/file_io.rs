//! Regular file I/O must cost nothing: the data programs hang off socket tracepoints or TCP
//! functions, which never run for files. Checked with the kernel's own per-program run
//! counters. The last-resort syscall rung is the exception, by design: there file I/O runs
//! the programs (its stated cost), which must stop at the descriptor and track nothing.
use std::io::{Read as _, Seek as _, Write as _};

use serde_json::Value;
use stalltrace_integration::{require_root, Daemon};

/// Runs of the data transfer programs of one direction (`stalltrace_send`, `stalltrace_recv`),
/// whichever rung hooks them: the raw tracepoint, fexit, or kprobe and kretprobe.
fn runs(status: &Value, prefix: &str) -> u64 {
    let programs: Vec<&Value> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["program"].as_str().unwrap().starts_with(prefix))
        .collect();
    assert!(!programs.is_empty(), "{prefix} not attached: {status:#}");
    programs
        .iter()
        .map(|p| p["run_count"].as_u64().unwrap())
        .sum()
}

#[test]
fn file_reads_and_writes_never_run_the_socket_programs() {
    require_root();
    let daemon = Daemon::start_with("file-io", &["--bpf-stats"]);
    let before = daemon.cli_json(&["status", "-o", "json"]);

    const OPS: u64 = 100_000;
    let path = std::env::temp_dir().join(format!("stalltrace-file-io-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let block = [7u8; 64];
    for _ in 0..OPS {
        file.write_all(&block).unwrap();
    }
    file.rewind().unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..OPS {
        file.read_exact(&mut buf).unwrap();
    }
    std::fs::remove_file(&path).unwrap();

    let after = daemon.cli_json(&["status", "-o", "json"]);
    if after["hooks"]["transfers"]["rung"] == "syscall" {
        let entries = runs(&after, "stalltrace_sys_enter") - runs(&before, "stalltrace_sys_enter");
        assert!(
            entries >= 2 * OPS,
            "{entries} entries for {} file calls",
            2 * OPS
        );
        assert_eq!(
            after["connections"]["tracked"], before["connections"]["tracked"],
            "file I/O tracked something"
        );
        return;
    }
    for program in ["stalltrace_send", "stalltrace_recv"] {
        // Other tests' sockets run them a little meanwhile; 2 × OPS file calls must not.
        let delta = runs(&after, program) - runs(&before, program);
        assert!(
            delta < OPS / 10,
            "{program} ran {delta} times during {OPS} file writes + reads"
        );
    }
}
