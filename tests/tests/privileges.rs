//! Least privilege: after start-up the daemon runs with the documented capabilities only, in
//! every thread, with no_new_privs set.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use stalltrace_integration::{require_root, status_field, Daemon, REPORT_WITHIN};

/// The run-time set of docs/design.md ("Least privilege"), with capability numbers.
const DOCUMENTED: &[(&str, u32)] = &[
    ("CAP_CHECKPOINT_RESTORE", 40),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_PERFMON", 38),
    ("CAP_SYS_PTRACE", 19),
];

#[test]
fn daemon_keeps_only_the_documented_capabilities_and_sets_no_new_privs() {
    require_root();
    let daemon = Daemon::start("privileges");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    let pid = status["pid"].as_u64().expect("status has the daemon's pid");

    let expected: u64 = DOCUMENTED.iter().map(|(_, bit)| 1u64 << bit).sum();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut checked = 0;
    for task in tasks {
        let path = task.unwrap().path().join("status");
        let text = std::fs::read_to_string(&path).unwrap();
        let effective = u64::from_str_radix(status_field(&text, "CapEff"), 16).unwrap();
        assert_eq!(
            effective,
            expected,
            "{}: CapEff {effective:#x}, documented {expected:#x}",
            path.display()
        );
        let permitted = u64::from_str_radix(status_field(&text, "CapPrm"), 16).unwrap();
        assert_eq!(permitted, expected, "{}: CapPrm", path.display());
        let bounding = u64::from_str_radix(status_field(&text, "CapBnd"), 16).unwrap();
        assert_eq!(bounding, expected, "{}: CapBnd", path.display());
        assert_eq!(status_field(&text, "NoNewPrivs"), "1", "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 1);

    let names: Vec<&str> = DOCUMENTED.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        status["privileges"]["capabilities"],
        serde_json::json!(names),
        "{status:#}"
    );
    assert_eq!(status["privileges"]["no_new_privs"], true);
    let design =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md")).unwrap();
    for name in names {
        assert!(
            design.contains(name),
            "docs/design.md does not document {name}"
        );
    }
    assert!(
        daemon.stderr().contains("privileges dropped: keeping CAP_"),
        "{}",
        daemon.stderr()
    );
}

/// The reduced set still reads what it must of other users' processes: the owner of a request
/// nobody reads, run by `nobody`, is found from its /proc/PID/fd (mode 0500, owned by
/// `nobody`: needs CAP_DAC_READ_SEARCH, and CAP_SYS_PTRACE for the links).
#[test]
fn the_owner_of_another_users_socket_is_still_found() {
    require_root();
    let daemon = Daemon::start("privileges-other-user");
    let script = "import socket, time\n\
                  s = socket.socket()\n\
                  s.bind(('127.0.0.1', 0))\n\
                  s.listen()\n\
                  print(s.getsockname()[1], flush=True)\n\
                  c, _ = s.accept()\n\
                  time.sleep(30)\n";
    let mut server = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("running /usr/bin/python3 as nobody");
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port: u16 = port.trim().parse().expect("the server prints its port");
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();

    let on_server = daemon.wait_for_stall(port, "server", REPORT_WITHIN + Duration::from_secs(2));
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        on_server["stall"]["cause"], "request_unread",
        "{on_server:#}"
    );
    assert_eq!(
        on_server["process"]["pid"],
        server.id(),
        "the owner, from /proc/PID/fd of another user: {on_server:#}"
    );
}
