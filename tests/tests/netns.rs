//! Network namespaces and cgroups: a hung pair inside a namespace the test creates (`ip netns`)
//! and a busy healthy pair in the root namespace with the very same addresses and ports. They
//! must stay four connections, only the namespaced ones stall, the blame chain and the TCP
//! signals come from the namespace the stall is in, a connection that predates the daemon is
//! adopted from the namespace, and events carry `network.netns`, `network.community_id`,
//! `cgroup.*`; the `--netns` and `--cgroup` filters select them.
use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::fs::MetadataExt as _,
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stalltrace_integration::{require_root, status_field, Daemon, REPORT_WITHIN, STALL_AFTER};

/// The peers, in Python (Debian's python3, installed by `cargo xtask test`):
/// - `idle PORT`: an established connection to itself that never carries data;
/// - `hang SERVER_PORT CLIENT_PORT`: a client bound to CLIENT_PORT sends a request to a server
///   on SERVER_PORT that never reads it;
/// - `busy SERVER_PORT CLIENT_PORT`: the same pair, answered at once, a request every 5 ms;
/// - `late SERVER_PORT CLIENT_PORT`: like `hang`, but the request waits for a line on stdin.
///
/// Each prints `ready` and runs until its stdin closes.
const PEERS: &str = r#"
import socket, sys, threading, time
mode = sys.argv[1]
ports = [int(p) for p in sys.argv[2:]]
def listener(port):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port))
    l.listen(16)
    return l
def connect(server_port, client_port=0):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("127.0.0.1", client_port))
    c.connect(("127.0.0.1", server_port))
    return c
l = listener(ports[0])
c = connect(ports[0], ports[1] if len(ports) > 1 else 0)
s, _ = l.accept()
if mode == "hang":
    c.sendall(b"GET /hang HTTP/1.1\r\nHost: ns\r\n\r\n")

elif mode == "busy":
    def serve():
        while True:
            if not s.recv(512):
                return
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    def ask():
        while True:
            c.sendall(b"GET /ok HTTP/1.1\r\nHost: root\r\n\r\n")
            c.recv(512)
            time.sleep(0.005)
    threading.Thread(target=serve, daemon=True).start()
    threading.Thread(target=ask, daemon=True).start()
print("ready", flush=True)
if mode == "late":
    sys.stdin.readline()
    c.sendall(b"GET /hang HTTP/1.1\r\nHost: ns\r\n\r\n")
sys.stdin.read()
"#;

/// Bytes of the `hang` request.
const REQUEST_LEN: u64 = 32;

/// The id of the container whose cgroup the hung pair runs in (named as docker names it).
const CONTAINER: &str = "5e7a11ace0000000000000000000000000000000000000000000000000000009";

/// A namespace and a container-like cgroup created for the test, deleted (with the peers)
/// even when the test fails.
struct Namespace {
    name: String,
    peers: Vec<(Child, ChildStdin)>,
    /// `stalltrace-it-PID/docker-<CONTAINER>.scope` and its parent, in the cgroup v2 tree.
    cgroups: [std::path::PathBuf; 2],
}

impl Namespace {
    /// `tag` tells apart the namespaces of tests running at once.
    fn create(tag: &str) -> Self {
        let name = format!("stalltrace-it-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let parent = cgroup_root().join(&name);
        let container = parent.join(format!("docker-{CONTAINER}.scope"));
        let _ = std::fs::remove_dir(&container);
        let _ = std::fs::remove_dir(&parent);
        std::fs::create_dir_all(&container)
            .unwrap_or_else(|e| panic!("creating {} (cgroup v2): {e}", container.display()));
        Self {
            name,
            peers: Vec::new(),
            cgroups: [container, parent],
        }
    }

    /// The cgroup path of the container, as /proc/PID/cgroup writes it.
    fn container_cgroup(&self) -> String {
        format!("/{}/docker-{CONTAINER}.scope", self.name)
    }

    fn inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }

    /// Starts the peers script with `args`, inside the namespace or not; returns its pid once
    /// it is ready.
    fn peers(&mut self, inside: bool, args: &[String]) -> u32 {
        // Inside: in the container's cgroup too, from before the first connection.
        let mut command = if inside {
            let mut command = Command::new("sh");
            command
                .args(["-c", "echo $$ > \"$0\" && exec ip netns exec \"$@\""])
                .arg(self.cgroups[0].join("cgroup.procs"))
                .args([self.name.as_str(), "/usr/bin/python3", "-c", PEERS]);
            command
        } else {
            let mut command = Command::new("/usr/bin/python3");
            command.args(["-c", PEERS]);
            command
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running /usr/bin/python3 (installed by `cargo xtask test`)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "peers {args:?} did not start");
        let pid = child.id();
        let stdin = child.stdin.take().unwrap();
        self.peers.push((child, stdin));
        pid
    }

    /// Sends a line to the last peers started (`late` sends its request then).
    fn go(&mut self) {
        let (_, stdin) = self.peers.last_mut().expect("peers started");
        std::io::Write::write_all(stdin, b"go\n").unwrap();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for (mut child, stdin) in self.peers.drain(..) {
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        for cgroup in &self.cgroups {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

/// The cgroup v2 file system: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
fn cgroup_root() -> std::path::PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|root| root.join("cgroup.controllers").exists())
        .expect("a cgroup v2 file system (mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified)")
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2, installed by `cargo xtask test`)");
    assert!(status.success(), "ip {args:?} failed");
}

/// Two ports free on 127.0.0.1 now.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

fn items(value: Value) -> Vec<Value> {
    value.as_array().expect("an array").clone()
}

fn netns_of(item: &Value) -> u64 {
    item["network"]["netns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no network.netns: {item:#}"))
}

/// The cgroup v2 path of process `pid`, as /proc writes it.
fn cgroup_path(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        .expect("a cgroup v2 path")
}

#[test]
fn identical_endpoints_in_two_namespaces_stay_apart() {
    require_root();
    let mut namespace = Namespace::create("pair");
    let inside = namespace.inode();
    let root = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(inside, root);

    // Opened before the daemon: adopted from the namespace's /proc/PID/net/tcp.
    let (idle_port, _) = free_ports();
    namespace.peers(true, &[String::from("idle"), idle_port.to_string()]);
    let daemon = Daemon::start("netns");

    let (server_port, client_port) = free_ports();
    let ports = [server_port.to_string(), client_port.to_string()];
    namespace.peers(false, &[&["busy".to_owned()][..], &ports].concat());
    let hung = namespace.peers(true, &[&["hang".to_owned()][..], &ports].concat());

    // Both ends of the hung pair stall: the client's at its request, the server's (which never
    // reads) found by the unread-request scan, which must reach into the namespace.
    let mut stalls = daemon.wait_for_stalls(server_port, 2, STALL_AFTER + Duration::from_secs(12));
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", daemon.stderr());
    // A stall is listed once its first diagnosis is in or after at most 1 s without it (then
    // the diagnosis follows): the TCP signals from inside the namespace come through the
    // broker, which a loaded machine can make the slower.
    let diagnosed = Instant::now() + REPORT_WITHIN;
    while stalls.iter().any(|s| !s["stall"]["tcp"].is_object()) && Instant::now() < diagnosed {
        thread::sleep(Duration::from_millis(200));
        stalls = daemon.stalls(server_port);
    }
    for stall in &stalls {
        assert_eq!(netns_of(stall), inside, "{stall:#}");
        assert_eq!(stall["process"]["pid"], hung, "{stall:#}");
    }
    let server = stalls
        .iter()
        .find(|s| s["conn"]["role"] == "server")
        .expect("the server's stall");
    let client = stalls
        .iter()
        .find(|s| s["conn"]["role"] == "client")
        .expect("the client's stall");
    assert_eq!(server["stall"]["kind"], "unanswered_request", "{server:#}");
    assert_eq!(client["stall"]["kind"], "awaiting_response", "{client:#}");
    // TCP signals from the namespace's socket: the root twin's receive queue is drained.
    assert_eq!(
        server["stall"]["tcp"]["recv_queue"], REQUEST_LEN,
        "{server:#}"
    );
    assert_eq!(server["stall"]["cause"], "request_unread", "{server:#}");
    assert!(client["stall"]["tcp"].is_object(), "{client:#}");

    // The blame chain goes to the server in the same namespace, not to the root twin.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let blamed = loop {
        let found = daemon.events().into_iter().find(|e| {
            (e["event"] == "stall.start" || e["event"] == "stall.update")
                && e["conn"]["id"] == client["conn"]["id"]
                && e["stall"]["blame"].as_array().is_some_and(|b| b.len() >= 2)
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no blame chain for {client:#}\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let blame = blamed["stall"]["blame"].as_array().unwrap();
    assert_eq!(blame[1]["conn"], server["conn"]["id"], "{blame:#?}");
    assert_eq!(blame[1]["evidence"], "peer", "{blame:#?}");

    // Four connections with one 4-tuple: two per namespace, four ids; the root ones busy and
    // never stalled.
    let conns = items(daemon.cli_json(&["conns", "-o", "json", "--port", &ports[0]]));
    assert_eq!(conns.len(), 4, "{conns:#?}");
    let mut ids: Vec<u64> = conns
        .iter()
        .map(|c| c["conn"]["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "{conns:#?}");
    let root_conns: Vec<&Value> = conns.iter().filter(|c| netns_of(c) == root).collect();
    assert_eq!(root_conns.len(), 2, "{conns:#?}");
    assert!(
        root_conns.iter().all(|c| c["conn"]["state"] != "stalled"),
        "{root_conns:#?}"
    );
    assert!(
        root_conns
            .iter()
            .all(|c| c["conn"]["requests"].as_u64().unwrap_or(0) > 10),
        "busy: {root_conns:#?}"
    );
    // The same flow hash on both ends and in both namespaces: it names the flow, not the host.
    let community = conns[0]["network"]["community_id"].as_str().unwrap();
    assert!(community.starts_with("1:"), "{community}");
    assert!(
        conns
            .iter()
            .all(|c| c["network"]["community_id"] == community),
        "{conns:#?}"
    );

    // Filters.
    let netns = |inode: u64, command: &str| {
        items(daemon.cli_json(&[
            command,
            "-o",
            "json",
            "--port",
            &ports[0],
            "--netns",
            &inode.to_string(),
        ]))
    };
    assert_eq!(netns(root, "stalls").len(), 0);
    assert_eq!(netns(inside, "stalls").len(), 2);
    assert_eq!(netns(root, "conns").len(), 2);
    assert_eq!(netns(inside, "conns").len(), 2);

    // Adopted from the namespace, both ends, labelled with it.
    let adopted = items(daemon.cli_json(&[
        "conns",
        "-o",
        "json",
        "--port",
        &idle_port.to_string(),
        "--netns",
        &inside.to_string(),
    ]));
    assert_eq!(adopted.len(), 2, "{adopted:#?}");
    assert!(
        adopted.iter().all(|c| c["conn"]["adopted"] == true),
        "{adopted:#?}"
    );

    // The owner's cgroup: its id at once, its path once resolved (off the loop), and the
    // container id the path holds.
    let path = namespace.container_cgroup();
    assert_eq!(cgroup_path(hung), path);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let with_path = loop {
        let stalls = netns(inside, "stalls");
        if stalls.iter().all(|s| s["cgroup"]["path"].is_string()) {
            break stalls;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cgroup paths never resolved: {stalls:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let cgroup_id = namespace.cgroups[0].metadata().unwrap().ino();
    for stall in &with_path {
        assert_eq!(stall["cgroup"]["path"], path.as_str(), "{stall:#}");
        assert_eq!(stall["cgroup"]["id"], cgroup_id, "{stall:#}");
        assert_eq!(stall["container"]["id"], CONTAINER, "{stall:#}");
    }
    let select = |flag: &str, value: &str| {
        items(daemon.cli_json(&["conns", "-o", "json", "--port", &ports[0], flag, value])).len()
    };
    assert_eq!(select("--cgroup", &path), 2);
    assert_eq!(
        select("--cgroup", &format!("/{}", namespace.name)),
        2,
        "below it"
    );
    assert_eq!(select("--cgroup", &cgroup_id.to_string()), 2, "by id");
    assert_eq!(select("--cgroup", "/stalltrace-no-such-cgroup"), 0);
    assert_eq!(select("--container", &CONTAINER[..12]), 2);
    assert_eq!(select("--container", "5e7a11ace001"), 0);

    // Events carry the namespace; none of the root pair's events is a stall.
    let events = daemon.events_named("stall.start", server_port);
    assert!(
        events.len() >= 2 && events.iter().all(|e| netns_of(e) == inside),
        "{events:#?}"
    );
    daemon.stop();
}

/// The namespace broker (the process that enters namespaces for sock_diag) keeps
/// `CAP_SYS_ADMIN` and nothing else, sets no_new_privs, holds no descriptor of the daemon's,
/// and ends with the daemon.
#[test]
fn the_namespace_broker_keeps_cap_sys_admin_alone_and_ends_with_the_daemon() {
    require_root();
    let daemon = Daemon::start("netns-broker");
    let status = daemon.cli_json(&["status", "-o", "json"]);
    assert_eq!(status["features"]["network_namespaces"], true, "{status:#}");
    let pid = status["features"]["namespace_broker_pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no namespace broker: {status:#}\n{}", daemon.stderr()));
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&text, "Name"), "stalltrace-ns");
    assert_eq!(
        status_field(&text, "PPid"),
        status["pid"].to_string(),
        "a child of the daemon"
    );
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let value = u64::from_str_radix(status_field(&text, set), 16).unwrap();
        assert_eq!(value, CAP_SYS_ADMIN, "{set} {value:#x}");
    }
    assert_eq!(status_field(&text, "CapInh"), "0000000000000000");
    assert_eq!(status_field(&text, "NoNewPrivs"), "1");
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2, 3], "stdio and its channel only");
    daemon.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}/status")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|text| status_field(&text, "Name") == "stalltrace-ns")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection that predates the daemon is found by its first traffic, and the kernel guesses
/// its role from the ports with a listener: in its own namespace only. Here the client's local
/// port is listened on in the root namespace: it is still a client, and its request stalls as
/// one.
#[test]
fn a_listener_in_another_namespace_does_not_make_a_client_a_server() {
    require_root();
    let mut namespace = Namespace::create("roles");
    let (server_port, client_port) = free_ports();
    let _root_listener = TcpListener::bind(("127.0.0.1", client_port)).unwrap();
    let ports = [server_port.to_string(), client_port.to_string()];
    namespace.peers(true, &[&["late".to_owned()][..], &ports].concat());
    let daemon = Daemon::start("netns-roles");
    namespace.go();
    let client = daemon.wait_for_stall(server_port, "client", STALL_AFTER * 6);
    assert_eq!(client["stall"]["kind"], "awaiting_response", "{client:#}");
    assert_eq!(
        client["network"]["local"]["port"], client_port,
        "{client:#}"
    );
    assert_eq!(netns_of(&client), namespace.inode(), "{client:#}");
    daemon.stop();
}
