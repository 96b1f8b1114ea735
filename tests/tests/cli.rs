//! The exit status of the CLI is the one `--help` documents: 0 success, 1 error (daemon
//! unreachable…), 2 usage. Needs no daemon and no root.
use std::process::{Command, Output};

use stalltrace_integration::binary;

fn run(args: &[&str]) -> Output {
    Command::new(binary()).args(args).output().unwrap()
}

#[test]
fn exit_status_is_the_documented_one() {
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Exit status:"), "{text}");
    for line in ["0  success", "1  error", "2  usage error"] {
        assert!(text.contains(line), "--help lacks {line:?}: {text}");
    }

    // Usage errors: unknown flag, bad value, missing command, a flag that does not apply.
    for args in [
        &["conns", "--no-such-flag"][..],
        &["stalls", "--older-than", "soon"],
        &["conns", "--port", "99999"],
        &[],
        &["why", "--pid", "1"],
        &["show"],
    ] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "stalltrace {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "stalltrace {args:?}");
    }

    // Errors: no daemon behind the socket, for every client command.
    for command in [
        &["status"][..],
        &["conns", "--pid", "1"],
        &["stalls"],
        &["show", "1"],
        &["why", "--comm", "x"],
        &["watch"],
    ] {
        let out = Command::new(binary())
            .args(command)
            .args(["--socket", "/nonexistent/stalltrace.sock"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "stalltrace {command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
