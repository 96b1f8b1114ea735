//! The hook ladder on the running kernel: `--hooks auto` takes a rung and says which; a forced
//! rung is either used or refused with an error naming the kernel feature it lacks. The other
//! rungs are proven by the same stall tests in `cargo xtask vm-test`'s guests.
use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{binary, require_root, status_at, START_WITHIN};

/// Starts `stalltrace daemon ARGS`; `Ok(status)` once it answers, `Err(stderr)` if it exits.
fn start(name: &str, args: &[&str]) -> Result<(Child, Value), String> {
    let dir = std::env::temp_dir().join(format!("stalltrace-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let stderr = dir.join("stderr.log");
    let mut child = Command::new(binary())
        .arg("daemon")
        .args(args)
        // The rung comes from ARGS alone (the kernel matrix sets it for the other tests).
        .env_remove("STALLTRACE_HOOKS")
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1), "start-up failures exit with 1");
            return Err(std::fs::read_to_string(&stderr).unwrap());
        }
        if let Some(status) = status_at(&socket) {
            return Ok((child, status));
        }
        assert!(Instant::now() < deadline, "daemon not answering");
        thread::sleep(Duration::from_millis(100));
    }
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().unwrap();
}

/// The rung of every data transfer program in `status`.
fn transfer_rungs(status: &Value) -> Vec<String> {
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let name = p["program"].as_str().unwrap();
            name.starts_with("stalltrace_send") || name.starts_with("stalltrace_recv")
        })
        .map(|p| p["rung"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn auto_takes_a_rung_and_says_which() {
    require_root();
    let (child, status) = start("hooks-auto", &[]).unwrap_or_else(|err| panic!("{err}"));
    let rung = status["hooks"]["transfers"]["rung"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(status["hooks"]["transfers"]["forced"], false, "{status:#}");
    let rungs = transfer_rungs(&status);
    assert!(
        rungs.len() >= 2 && rungs.iter().all(|r| *r == rung),
        "{status:#}"
    );
    stop(child);
}

#[test]
fn a_forced_rung_is_used_or_refused_naming_the_kernel_feature() {
    require_root();
    for (rung, feature) in [
        ("tracepoint", "sock/sock_send_length"),
        ("fentry", "fentry/fexit"),
        ("kprobe", "kprobes (CONFIG_KPROBES)"),
    ] {
        match start(&format!("hooks-{rung}"), &["--hooks", rung]) {
            Ok((child, status)) => {
                assert_eq!(status["hooks"]["transfers"]["rung"], rung, "{status:#}");
                assert_eq!(status["hooks"]["transfers"]["forced"], true, "{status:#}");
                assert!(
                    transfer_rungs(&status).iter().all(|r| r == rung),
                    "{status:#}"
                );
                stop(child);
            }
            Err(stderr) => {
                assert!(
                    stderr.contains(&format!("--hooks {rung}: cannot hook the data transfers"))
                        && stderr.contains(feature),
                    "{rung}: {stderr}"
                );
                // Refused before anything ran: no other rung was tried.
                let others = ["tracepoint:", "fentry:", "kprobe:"]
                    .into_iter()
                    .filter(|other| !other.starts_with(rung));
                for other in others {
                    assert!(!stderr.contains(other), "{rung}: {stderr}");
                }
            }
        }
    }
}

#[test]
fn an_unreadable_btf_file_is_an_error() {
    require_root();
    let err = start("hooks-btf", &["--btf", "/nonexistent/vmlinux.btf"]).unwrap_err();
    assert!(
        err.contains("reading the BTF file /nonexistent/vmlinux.btf"),
        "{err}"
    );
}
