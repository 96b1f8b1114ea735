//! Least privilege: after start-up the daemon runs with the documented capabilities only, in
//! every thread, with no_new_privs set.
use stalltrace_integration::{require_root, Daemon};

/// The run-time set of docs/design.md ("Least privilege"), with capability numbers.
const DOCUMENTED: &[(&str, u32)] = &[
    ("CAP_CHECKPOINT_RESTORE", 40),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_PERFMON", 38),
    ("CAP_SYS_PTRACE", 19),
];

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
        .trim()
}

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
