//! The Debian package as an administrator meets it: `dpkg -i`, the unit checked by
//! `systemd-analyze verify`, the daemon started from the unit's `ExecStart` line and readiness
//! notified, logrotate rotating the events file with the packaged snippet, an upgrade that keeps
//! a changed conffile, then remove and purge.
//!
//! This machine's PID 1 is not systemd, so the test is the service manager: it runs `ExecStart`
//! as written with what of the unit changes the daemon's start (the capability bounding set and
//! no_new_privs, through setpriv; the runtime and logs directories; `$NOTIFY_SOCKET`) and sends
//! the unit's `ExecReload`. The rest of the sandbox (ProtectSystem, PrivateTmp…) is checked by
//! `systemd-analyze verify` only.
//!
//! The package comes from `STALLTRACE_DEB`, set by `cargo xtask test` (which builds it).
use std::{
    fs,
    io::Write as _,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{exchange, require_root, RUNTIME_CAPABILITIES};

const UNIT: &str = "/usr/lib/systemd/system/stalltrace.service";
const LOGROTATE: &str = "/etc/logrotate.d/stalltrace";
const EVENTS: &str = "/var/log/stalltrace/events.ndjson";
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/stalltrace.service";

fn deb() -> PathBuf {
    std::env::var_os("STALLTRACE_DEB")
        .map(PathBuf::from)
        .expect(
        "STALLTRACE_DEB is not set: run `cargo xtask test`, which builds the package and names it",
    )
}

/// Runs `command` and returns its output; fails the test with its stderr unless it succeeds.
fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn package_status() -> String {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", "stalltrace"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every value of `key` in the unit (`Key=value` lines).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim().to_owned())
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{key}= in the unit: {values:?}");
    values[0].clone()
}

/// Purges the package (and stops a daemon started from it) when the test ends, passed or
/// failed, so that the machine is left as it was.
struct Installed {
    daemon: Option<Child>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if package_status().contains("installed") || package_status().contains("config-files") {
            let _ = Command::new("dpkg")
                .args(["--purge", "stalltrace"])
                .output();
        }
        let _ = fs::remove_dir_all("/run/stalltrace");
    }
}

/// The next notification datagram that contains `state` (e.g. `READY=1`), within `within`.
fn wait_for_notification(
    socket: &UnixDatagram,
    state: &str,
    daemon: &mut Child,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if message.lines().any(|line| line == state) {
                    return message;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
        if let Some(status) = daemon.try_wait().unwrap() {
            if state != "STOPPING=1" {
                panic!("the daemon exited ({status}) before notifying {state}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {state} notification within {within:?}"
        );
    }
}

/// Waits until `path` holds an event of a connection to `port`, and returns it.
fn wait_for_event_in(path: &Path, port: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if let Some(event) = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|event| stalltrace_integration::touches(event, port))
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no event for port {port} in {}:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_package_installs_runs_from_its_unit_upgrades_and_purges() {
    require_root();
    let deb = deb();
    let scratch = std::env::temp_dir().join(format!("stalltrace-package-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).unwrap();
    if !package_status().is_empty() {
        eprintln!(
            "stalltrace was installed before the test ({}): purging it",
            package_status()
        );
        run(Command::new("dpkg").args(["--purge", "stalltrace"]));
    }
    // The package's scripts start the unit where systemd runs, and the daemon started here
    // from ExecStart needs the default socket: neither may be taken already.
    assert!(
        !Path::new("/run/systemd/system").exists(),
        "systemd is PID 1 here: installing the package would start the real service; this test \
         plays the service manager itself and runs where systemd does not (like CI's machine)"
    );
    assert!(
        std::os::unix::net::UnixStream::connect("/run/stalltrace/stalltrace.sock").is_err(),
        "a stalltrace daemon already answers on /run/stalltrace/stalltrace.sock: stop it first"
    );
    let mut installed = Installed { daemon: None };

    // Install.
    run(Command::new("dpkg").arg("--install").arg(&deb));
    assert!(
        package_status().starts_with("install ok installed"),
        "{}",
        package_status()
    );
    for path in [
        "/usr/bin/stalltrace",
        UNIT,
        LOGROTATE,
        "/usr/share/man/man1/stalltrace.1.gz",
        "/usr/share/man/man1/stalltrace-daemon.1.gz",
        "/usr/share/bash-completion/completions/stalltrace",
        "/usr/share/zsh/vendor-completions/_stalltrace",
        "/usr/share/fish/vendor_completions.d/stalltrace.fish",
        "/usr/share/doc/stalltrace/events.md",
    ] {
        assert!(Path::new(path).exists(), "{path} not installed");
    }
    assert!(
        Path::new(ENABLED).exists(),
        "the unit is not enabled: no {ENABLED}"
    );
    let group = run(Command::new("getent").args(["group", "stalltrace"]));
    let gid: u32 = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .nth(2)
        .and_then(|gid| gid.trim().parse().ok())
        .expect("the group stalltrace has a gid");
    // The man page is the one generated from the CLI: it documents the daemon's flags.
    let page = run(Command::new("zcat").arg("/usr/share/man/man1/stalltrace-daemon.1.gz"));
    assert!(String::from_utf8_lossy(&page.stdout).contains("stall\\-after"));
    let completion = run(Command::new("bash")
        .arg("-c")
        .arg("source /usr/share/bash-completion/completions/stalltrace && complete -p stalltrace"));
    assert!(String::from_utf8_lossy(&completion.stdout).contains("stalltrace"));

    // systemd's own check of the unit: any warning (an unknown key, a bad value, a missing
    // binary) fails.
    let verify = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify {UNIT}:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Start the daemon as systemd would from the unit.
    let unit = fs::read_to_string(UNIT).unwrap();
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    let exec_start = unit_value(&unit, "ExecStart");
    assert!(
        !exec_start.contains(['"', '\'', '$', '%', '\\']),
        "ExecStart is run here without systemd's quoting, variables and specifiers: {exec_start}"
    );
    let argv: Vec<&str> = exec_start.split_whitespace().collect();
    let bounding: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| {
            let name = cap
                .strip_prefix("CAP_")
                .expect("capability names start with CAP_");
            format!("+{}", name.to_lowercase())
        })
        .collect();
    assert_eq!(unit_value(&unit, "RuntimeDirectory"), "stalltrace");
    assert_eq!(unit_value(&unit, "LogsDirectory"), "stalltrace");
    fs::create_dir_all("/run/stalltrace").unwrap();
    fs::create_dir_all("/var/log/stalltrace").unwrap();
    let notify_path = scratch.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = fs::File::create(scratch.join("daemon.log")).unwrap();
    let started = Instant::now();
    let mut daemon = Command::new("setpriv")
        .arg("--bounding-set")
        .arg(format!("-all,{}", bounding.join(",")))
        .args(["--inh-caps", "-all", "--no-new-privs"])
        .args(&argv)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let ready = wait_for_notification(&notify, "READY=1", &mut daemon, Duration::from_secs(30));
    installed.daemon = Some(daemon);
    eprintln!("READY after {:?}: {ready:?}", started.elapsed());
    assert!(ready.contains("STATUS=tracing"), "{ready}");

    // Ready means answering, on the default socket, for the group `stalltrace`.
    let status = run(Command::new("/usr/bin/stalltrace").args(["status", "-o", "json"]));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["privileges"]["capabilities"],
        serde_json::json!(RUNTIME_CAPABILITIES),
        "{status}"
    );
    // Under its unit's bounding set nothing is lost: no warning at start, every program
    // attached (the cgroup program for UDP closes needs CAP_NET_ADMIN).
    let log = fs::read_to_string(scratch.join("daemon.log")).unwrap();
    assert!(!log.contains("warn:"), "{log}");
    assert_eq!(status["features"]["udp"], true, "{status}");
    let socket = fs::metadata("/run/stalltrace/stalltrace.sock").unwrap();
    assert_eq!(socket.gid(), gid, "the API socket's group");
    assert_eq!(socket.mode() & 0o777, 0o660, "the API socket's mode");

    // Events reach the events file, each with its schema version.
    let before = exchange();
    let event = wait_for_event_in(Path::new(EVENTS), before);
    assert_eq!(event["schema"], 1, "{event}");
    assert_eq!(fs::metadata(EVENTS).unwrap().mode() & 0o777, 0o600);

    // logrotate with the packaged snippet, then the unit's ExecReload (what its postrotate's
    // `systemctl reload` runs): later events go to the new file.
    let pid = installed.daemon.as_ref().unwrap().id().to_string();
    run(Command::new("logrotate")
        .args(["--force", "--state"])
        .arg(scratch.join("logrotate.state"))
        .arg(LOGROTATE));
    let rotated = format!("{EVENTS}.1");
    assert!(
        Path::new(&rotated).exists(),
        "logrotate did not rotate {EVENTS}"
    );
    let reload = unit_value(&unit, "ExecReload").replace("$MAINPID", &pid);
    run(Command::new("sh").arg("-c").arg(&reload));
    let after = exchange();
    wait_for_event_in(Path::new(EVENTS), after);
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .any(|event| stalltrace_integration::touches(&event, after)),
        "an event after the rotation went to the rotated file"
    );

    // SIGTERM, systemd's stop: STOPPING=1, then a clean exit.
    let mut daemon = installed.daemon.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    wait_for_notification(&notify, "STOPPING=1", &mut daemon, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "the daemon exited with {exit}:\n{}",
        fs::read_to_string(scratch.join("daemon.log")).unwrap_or_default()
    );
    let _ = fs::remove_dir_all("/run/stalltrace");

    // Upgrade to a newer version (the same files, repacked): a conffile changed by the
    // administrator is kept, the unit stays enabled.
    let mut conf = fs::OpenOptions::new().append(true).open(LOGROTATE).unwrap();
    writeln!(conf, "# changed by the administrator").unwrap();
    let tree = scratch.join("upgrade");
    run(Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(&deb)
        .arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let version = unit_values(&text.replace(": ", "="), "Version")[0].clone();
    let newer = format!("{version}+upgrade1");
    fs::write(
        &control,
        text.replace(&format!("Version: {version}"), &format!("Version: {newer}")),
    )
    .unwrap();
    let upgrade = scratch.join("upgrade.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&upgrade));
    run(Command::new("dpkg")
        .args(["--force-confold", "--install"])
        .arg(&upgrade));
    assert_eq!(package_status(), format!("install ok installed {newer}"));
    assert!(fs::read_to_string(LOGROTATE)
        .unwrap()
        .contains("changed by the administrator"));
    assert!(Path::new(ENABLED).exists(), "the upgrade disabled the unit");

    // Remove keeps the configuration and the events; purge removes them.
    run(Command::new("dpkg").args(["--remove", "stalltrace"]));
    assert!(
        package_status().starts_with("deinstall ok config-files"),
        "{}",
        package_status()
    );
    assert!(!Path::new("/usr/bin/stalltrace").exists());
    assert!(!Path::new(UNIT).exists());
    assert!(Path::new(LOGROTATE).exists(), "remove deleted the conffile");
    assert!(Path::new(EVENTS).exists(), "remove deleted the events");
    run(Command::new("dpkg").args(["--purge", "stalltrace"]));
    assert!(
        package_status().is_empty() || package_status().starts_with("unknown"),
        "{}",
        package_status()
    );
    for path in [LOGROTATE, "/var/log/stalltrace", ENABLED] {
        assert!(!Path::new(path).exists(), "{path} left after purge");
    }
    let _ = fs::remove_dir_all(&scratch);
}
