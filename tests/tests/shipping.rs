//! docs/shipping.md's syslog-ng recipe, run for real: a syslog-ng (Debian's syslog-ng-core)
//! reads the daemon's events file with the recipe's source, parser and filter, across a
//! rotation as logrotate does it (rename, then SIGHUP), and every line arrives whole, parsed and
//! exactly once — the `stall.start` written before the rotation and the one written after it.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use stalltrace_integration::{require_root, send_request, Daemon, SilentServer, REPORT_WITHIN};

const SYSLOG_NG: &str = "/usr/sbin/syslog-ng";
/// The line in docs/shipping.md that precedes the tested configuration block.
const RECIPE_MARK: &str = "<!-- syslog-ng recipe: tested by tests/tests/shipping.rs -->";
/// The events file the recipe reads (the packaged unit's).
const RECIPE_EVENTS: &str = "/var/log/stalltrace/events.ndjson";

/// The fenced block after [`RECIPE_MARK`] in docs/shipping.md.
fn recipe() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/shipping.md");
    let doc = fs::read_to_string(&path).unwrap();
    let after = doc
        .split_once(RECIPE_MARK)
        .unwrap_or_else(|| panic!("{} lacks {RECIPE_MARK}", path.display()))
        .1;
    let block = after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a fenced block follows the mark")
        .0;
    assert!(
        block.contains(RECIPE_EVENTS),
        "the recipe reads {RECIPE_EVENTS}"
    );
    block.to_owned()
}

/// A syslog-ng in the foreground with its own persist file, pid file and control socket.
struct SyslogNg {
    child: Child,
    dir: PathBuf,
}

impl SyslogNg {
    /// Runs the recipe on `events`, writing what it ships to `dir/shipped.log`: the parsed
    /// event name, schema and connection id, then the line as read.
    fn start(dir: &Path, events: &Path) -> Self {
        assert!(
            Path::new(SYSLOG_NG).exists(),
            "{SYSLOG_NG} is missing: `cargo xtask test` installs syslog-ng-core"
        );
        let config = format!(
            "@version: 3.38\n\
             {}\n\
             destination d_test {{ file(\"{}\" template(\"${{.stalltrace.event}} \
             ${{.stalltrace.schema}} ${{.stalltrace.conn.id}} ${{MESSAGE}}\\n\")); }};\n\
             log {{ source(s_stalltrace); parser(p_stalltrace); filter(f_stalltrace_v1); \
             destination(d_test); flags(flow-control); }};\n",
            recipe().replace(RECIPE_EVENTS, &events.display().to_string()),
            dir.join("shipped.log").display()
        );
        fs::write(dir.join("syslog-ng.conf"), config).unwrap();
        let child = Command::new(SYSLOG_NG)
            .args(["--foreground", "--no-caps", "--cfgfile"])
            .arg(dir.join("syslog-ng.conf"))
            .arg("--persist-file")
            .arg(dir.join("syslog-ng.persist"))
            .arg("--pidfile")
            .arg(dir.join("syslog-ng.pid"))
            .arg("--control")
            .arg(dir.join("syslog-ng.ctl"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("syslog-ng.log")).unwrap())
            .stderr(fs::File::create(dir.join("syslog-ng.err")).unwrap())
            .spawn()
            .unwrap();
        let mut syslog = Self {
            child,
            dir: dir.to_owned(),
        };
        // Up when it has written its pid file (after parsing the configuration).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("syslog-ng.pid").exists() {
            if let Some(status) = syslog.child.try_wait().unwrap() {
                panic!("syslog-ng exited ({status}):\n{}", syslog.errors());
            }
            assert!(
                Instant::now() < deadline,
                "syslog-ng did not start:\n{}",
                syslog.errors()
            );
            thread::sleep(Duration::from_millis(50));
        }
        syslog
    }

    fn errors(&self) -> String {
        fs::read_to_string(self.dir.join("syslog-ng.err")).unwrap_or_default()
    }

    /// Shipped lines: (event, schema, conn id) as syslog-ng parsed them, and the line as read.
    fn shipped(&self) -> Vec<(String, String, String, String)> {
        fs::read_to_string(self.dir.join("shipped.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let mut parts = line.splitn(4, ' ');
                let mut next = || parts.next().unwrap_or_default().to_owned();
                (next(), next(), next(), next())
            })
            .collect()
    }
}

impl Drop for SyslogNg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server-side stall on a fresh connection; returns its `stall.start` line as written.
fn stall(daemon: &Daemon, file: &Path) -> (SilentServer, std::net::TcpStream, String) {
    let server = SilentServer::bind("127.0.0.1");
    let client = send_request(server.addr);
    let port = server.addr.port();
    let stall = daemon.wait_for_stall(port, "server", REPORT_WITHIN);
    let id = stall["conn"]["id"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = fs::read_to_string(file).unwrap_or_default();
        let line = text.lines().find(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|e| e["event"] == "stall.start" && e["conn"]["id"] == id)
        });
        if let Some(line) = line {
            return (server, client, line.to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "no stall.start for conn {id} in {}",
            file.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn syslog_ng_ships_every_line_whole_across_a_rotation() {
    require_root();
    let daemon = Daemon::start("shipping");
    let dir = daemon.dir().join("syslog-ng");
    fs::create_dir_all(&dir).unwrap();
    let syslog = SyslogNg::start(&dir, &daemon.events);

    let (_server_a, _client_a, before) = stall(&daemon, &daemon.events);
    // logrotate's `create` rotation: rename, then the postrotate SIGHUP.
    let rotated = daemon.events.with_extension("ndjson.1");
    fs::rename(&daemon.events, &rotated).unwrap();
    daemon.signal(libc::SIGHUP);
    let (_server_b, _client_b, after) = stall(&daemon, &daemon.events);

    // Everything written to the rotated file, and the post-rotation stall, arrive exactly once
    // and byte for byte, parsed.
    let expected: Vec<String> = fs::read_to_string(&rotated)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .chain([after.clone()])
        .collect();
    assert!(
        expected.contains(&before),
        "the first stall.start is in the rotated file"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shipped = syslog.shipped();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (_, _, _, line) in &shipped {
            *counts.entry(line.as_str()).or_default() += 1;
        }
        let missing: Vec<&String> = expected
            .iter()
            .filter(|line| !counts.contains_key(line.as_str()))
            .collect();
        if missing.is_empty() {
            for line in &expected {
                assert_eq!(counts[line.as_str()], 1, "shipped more than once: {line}");
            }
            for stall_start in [&before, &after] {
                let event: serde_json::Value = serde_json::from_str(stall_start).unwrap();
                let (name, schema, id, _) = shipped
                    .iter()
                    .find(|(_, _, _, line)| line == stall_start)
                    .unwrap();
                assert_eq!(name, "stall.start");
                assert_eq!(schema, "1");
                assert_eq!(id, &event["conn"]["id"].to_string());
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "syslog-ng did not ship {} lines, e.g. {}\n{}",
            missing.len(),
            missing[0],
            syslog.errors()
        );
        thread::sleep(Duration::from_millis(200));
    }
}
