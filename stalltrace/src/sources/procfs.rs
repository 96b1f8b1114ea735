//! /proc: TCP sockets that exist before the daemon starts (adopted so that a stall on them is
//! still flagged), in every network namespace, their owning processes, and listening ports.
use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use stalltrace_common::{role, tcp_state};
use stalltrace_core::tracker::{
    model::{Comm, Endpoints, Owner, Role, Transport},
    Adoption,
};

use super::{cgroups, netns, sock_diag};

/// A line of /proc/net/tcp or /proc/net/tcp6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcSocket {
    pub endpoints: Endpoints,
    pub state: u8,
    pub inode: u64,
}

/// Parses one line of /proc/net/tcp{,6}; `None` for the header or a malformed line.
pub(crate) fn parse_tcp_line(line: &str) -> Option<ProcSocket> {
    let mut columns = line.split_whitespace();
    let _slot = columns.next()?;
    let (local, local_port) = parse_address(columns.next()?)?;
    let (peer, peer_port) = parse_address(columns.next()?)?;
    let state = u8::from_str_radix(columns.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode
    let inode = columns.nth(5)?.parse().ok()?;
    Some(ProcSocket {
        endpoints: Endpoints {
            transport: Transport::Tcp,
            local,
            local_port,
            peer,
            peer_port,
            netns: 0,
        },
        state,
        inode,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6): 32-bit words in host byte order.
fn parse_address(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Ipv6Addr::from(octets).to_canonical()
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Most Unix sockets remembered from /proc/net/unix at start-up (8 bytes each).
const MAX_UNIX_INODES: usize = 1 << 20;

/// The inodes of the connected Unix stream and seqpacket sockets of the daemon's network
/// namespace (/proc/net/unix), at most [`MAX_UNIX_INODES`]: those that predate the daemon.
pub(crate) fn connected_unix_inodes() -> std::collections::HashSet<u64> {
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(parse_unix_line)
        .take(MAX_UNIX_INODES)
        .collect()
}

/// The inode of a /proc/net/unix line (`Num RefCount Protocol Flags Type St Inode Path`) for a
/// connected (`St` 03) stream (`Type` 0001) or seqpacket (0005) socket.
pub(crate) fn parse_unix_line(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().take(7).collect();
    let [_, _, _, _, kind, state, inode] = fields[..] else {
        return None;
    };
    (matches!(kind, "0001" | "0005") && state == "03").then(|| inode.parse().ok())?
}

/// All TCP sockets of every network namespace a process is in: `/proc/PID/net/tcp{,6}` of
/// one process per namespace (it lists that process's namespace), each socket labelled with
/// its namespace.
pub(crate) fn tcp_sockets() -> Vec<ProcSocket> {
    tcp_sockets_and_namespaces().0
}

/// [`tcp_sockets`], and the namespaces (labels) whose lists were read whole: a namespace
/// whose file could not be read (its process exited meanwhile, say) says nothing of the
/// sockets in it.
fn tcp_sockets_and_namespaces() -> (Vec<ProcSocket>, HashSet<u32>) {
    let mut sockets = Vec::new();
    let (mut read, mut failed) = (HashSet::new(), HashSet::new());
    for (inode, pid) in netns::all() {
        let label = netns::label(inode);
        let mut found = Vec::new();
        let mut whole = true;
        for file in ["tcp", "tcp6"] {
            let text = match fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
                Ok(text) => text,
                // No IPv6 in this kernel: nothing to miss.
                Err(err) if file == "tcp6" && err.kind() == std::io::ErrorKind::NotFound => {
                    continue
                }
                Err(_) => {
                    whole = false;
                    continue;
                }
            };
            found.extend(text.lines().filter_map(parse_tcp_line).map(|mut socket| {
                socket.endpoints.netns = label;
                socket
            }));
        }
        // A process that changed namespace since it was listed (`setns`, `unshare`) showed
        // another namespace's sockets: none of them belong to this one.
        if netns::of_pid(pid) != Some(label) {
            failed.insert(label);
            continue;
        }
        if whole {
            read.insert(label);
        } else {
            failed.insert(label);
        }
        sockets.extend(found);
    }
    read.retain(|label| !failed.contains(label));
    (sockets, read)
}

/// Of `adopted` (connections adopted at start-up that no kernel record has taken over), those
/// whose socket is gone: not listed in /proc/PID/net/tcp{,6} of its namespace, or listed in
/// `TIME_WAIT` or `CLOSE` (the socket itself has closed), or an orphan — inode 0 outside
/// `SYN_RECV`: its owner closed it and the kernel is finishing the close (`FIN_WAIT1`,
/// `FIN_WAIT2`, `CLOSING`, `LAST_ACK`), after which no later read would see it go unless
/// the ring loses records again. A connection of a namespace that
/// could not be read is never taken as gone.
pub(crate) fn gone_connections(adopted: &[Endpoints]) -> Vec<Endpoints> {
    let (sockets, read) = tcp_sockets_and_namespaces();
    gone_among(adopted, &sockets, &read)
}

/// [`gone_connections`] on lists already read.
fn gone_among(
    adopted: &[Endpoints],
    sockets: &[ProcSocket],
    read: &HashSet<u32>,
) -> Vec<Endpoints> {
    let open: HashSet<&Endpoints> = sockets
        .iter()
        .filter(|s| {
            !matches!(
                s.state,
                tcp_state::TIME_WAIT | tcp_state::CLOSE | tcp_state::LISTEN
            ) && (s.inode != 0 || s.state == tcp_state::SYN_RECV)
        })
        .map(|s| &s.endpoints)
        .collect();
    adopted
        .iter()
        .filter(|endpoints| read.contains(&endpoints.netns) && !open.contains(endpoints))
        .copied()
        .collect()
}

/// Every process: its pid and `/proc/<pid>`. Processes come and go during a walk: callers skip
/// what vanished.
pub(crate) fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    fs::read_dir("/proc")
        .into_iter()
        .flat_map(|entries| entries.flatten())
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// Socket inode → the process holding it, from every /proc/<pid>/fd.
pub(crate) fn socket_owners() -> HashMap<u64, Owner> {
    let mut owners = HashMap::new();
    for (pid, process) in processes() {
        let Ok(fds) = fs::read_dir(process.join("fd")) else {
            continue;
        };
        let comm = fs::read_to_string(process.join("comm")).unwrap_or_default();
        let owner = Owner {
            pid,
            tid: pid,
            comm: Comm::new(comm.trim_end()),
            cgroup_id: cgroups::id_of_process(pid).unwrap_or(0),
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(&target.to_string_lossy()) {
                owners.entry(inode).or_insert(owner);
            }
        }
    }
    owners
}

/// `socket:[12345]` → 12345
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The (network namespace, port) pairs with a listener.
pub(crate) fn listeners(sockets: &[ProcSocket]) -> HashSet<(u32, u16)> {
    sockets
        .iter()
        .filter(|s| s.state == tcp_state::LISTEN)
        .map(|s| (s.endpoints.netns, s.endpoints.local_port))
        .collect()
}

/// Open connections (established or half-closed: [`sock_diag::OPEN_STATES`]) that a process
/// holds, with their owners and roles (`role::guess`, as the kernel programs guess it for a
/// connection they find by its traffic). An orphan (inode 0: closed by its process, the
/// kernel finishing its FIN exchange) is nobody's connection any more.
pub(crate) fn adoptions(sockets: &[ProcSocket]) -> Vec<Adoption> {
    let listening = listeners(sockets);
    let ephemeral = ephemeral_ports();
    let owners = socket_owners();
    sockets
        .iter()
        .filter(|s| sock_diag::is_open(s.state) && s.inode != 0)
        .map(|s| Adoption {
            endpoints: s.endpoints,
            role: adopted_role(&s.endpoints, &listening, ephemeral),
            owner: owners.get(&s.inode).copied().unwrap_or_default(),
        })
        .collect()
}

fn adopted_role(endpoints: &Endpoints, listening: &HashSet<(u32, u16)>, ephemeral: u32) -> Role {
    let listened = listening.contains(&(endpoints.netns, endpoints.local_port));
    Role::from_kernel(role::guess(
        listened,
        endpoints.local_port,
        endpoints.peer_port,
        ephemeral,
    ))
}

/// The ports `connect()` picks from in the daemon's namespace
/// (`/proc/sys/net/ipv4/ip_local_port_range`), packed as `role::guess` takes them; Linux's
/// default when it cannot be read.
pub(crate) fn ephemeral_ports() -> u32 {
    parse_port_range(
        &fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default(),
    )
}

fn parse_port_range(text: &str) -> u32 {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => u32::from(low) | u32::from(high) << 16,
        _ => role::DEFAULT_EPHEMERAL,
    }
}

/// The cgroup of process `pid` (`/proc/PID/cgroup`), as [`cgroup_of`] picks it.
pub(crate) fn cgroup_path(pid: u32) -> Option<String> {
    cgroup_of(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The path a process's cgroup file gives: the unified (v2, `0::`) one, unless it is the root
/// and a v1 hierarchy places the process deeper (hybrid hosts, where container runtimes use
/// the v1 controllers); then the first such v1 path.
pub(crate) fn cgroup_of(text: &str) -> Option<String> {
    let mut unified = None;
    let mut legacy = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if id == "0" {
            unified = Some(path);
        } else if legacy.is_none() && path != "/" {
            legacy = Some(path);
        }
    }
    match (unified, legacy) {
        (Some("/"), Some(deeper)) | (None, Some(deeper)) => Some(deeper.to_owned()),
        (Some(path), _) => Some(path.to_owned()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_connections_are_gone_when_their_socket_is_closed_or_missing() {
        let line = |text: &str| parse_tcp_line(text).unwrap();
        let mut sockets = vec![
            // 127.0.0.1:8080 ← 127.0.0.1:40000, established; the same pair from the client.
            line("0: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 11"),
            line("1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 0 0 12"),
            // :40001 → :8080 in TIME_WAIT; :40002's server end in CLOSE_WAIT (still open).
            line("2: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 00:00000000 00000000 0 0 0"),
            line("3: 0100007F:1F90 0100007F:9C42 08 00000000:00000000 00:00000000 00000000 0 0 13"),
            // :40004 → :8080 closed by its owner, an orphan in FIN_WAIT2 (inode 0); :40005
            // half-closed by shutdown(SHUT_WR), still open (FIN_WAIT2, inode set).
            line("4: 0100007F:9C44 0100007F:1F90 05 00000000:00000000 00:00000000 00000000 0 0 0"),
            line("5: 0100007F:9C45 0100007F:1F90 05 00000000:00000000 00:00000000 00000000 0 0 14"),
        ];
        for socket in &mut sockets {
            socket.endpoints.netns = 7;
        }
        let conn = |local_port, peer_port, netns| Endpoints {
            local_port,
            peer_port,
            netns,
            ..sockets[0].endpoints
        };
        let adopted = [
            conn(8080, 40000, 7), // open
            conn(40001, 8080, 7), // TIME_WAIT: closed
            conn(8080, 40002, 7), // CLOSE_WAIT: open
            conn(8080, 40003, 7), // not listed: closed
            conn(8080, 40003, 9), // a namespace not read: kept
            conn(40004, 8080, 7), // orphan: closed
            conn(40005, 8080, 7), // half-closed, still open: kept
        ];
        let read = HashSet::from([7]);
        assert_eq!(
            gone_among(&adopted, &sockets, &read),
            [
                conn(40001, 8080, 7),
                conn(8080, 40003, 7),
                conn(40004, 8080, 7)
            ]
        );
    }

    #[test]
    fn unix_lines_give_connected_stream_inodes() {
        let line = |text: &str| parse_unix_line(text);
        assert_eq!(
            line("00000000ced8c265: 00000003 00000000 00000000 0001 03 9212427"),
            Some(9212427)
        );
        assert_eq!(
            line("00000000b921b9a5: 00000003 00000000 00000000 0005 03 77 @app"),
            Some(77)
        );
        // A listener (St 01), a datagram socket, the header, garbage.
        assert_eq!(
            line("0000000000000000: 00000002 00000000 00010000 0001 01 10 /run/a.sock"),
            None
        );
        assert_eq!(
            line("0000000000000000: 00000002 00000000 00000000 0002 01 11"),
            None
        );
        assert_eq!(
            line("Num       RefCount Protocol Flags    Type St Inode Path"),
            None
        );
        assert_eq!(line("x: 1 2 3 0001 03 notanumber"), None);
        assert_eq!(line(""), None);
    }

    #[test]
    fn parses_ipv4_lines() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(parse_tcp_line(header), None);
        let line = "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 20 4 30 10 -1";
        let socket = parse_tcp_line(line).unwrap();
        assert_eq!(socket.endpoints.local, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(socket.endpoints.local_port, 8080);
        assert_eq!(socket.endpoints.peer_port, 50_000);
        assert_eq!(socket.state, tcp_state::ESTABLISHED);
        assert_eq!(socket.inode, 31337);
    }

    #[test]
    fn parses_ipv6_lines_and_unmaps_ipv4() {
        let loopback = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 42 1";
        let socket = parse_tcp_line(loopback).unwrap();
        assert_eq!(socket.endpoints.local, IpAddr::V6(Ipv6Addr::LOCALHOST));
        let mapped = "   0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 43 1";
        let socket = parse_tcp_line(mapped).unwrap();
        assert_eq!(socket.endpoints.peer, IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "",
            "1: zz:1 0:0 01",
            "1: 0100007F:1F90 0100007F:C350 01 x x x x x notanumber",
        ] {
            assert_eq!(parse_tcp_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn finds_listening_ports_and_socket_inodes() {
        let listen = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1";
        let conn = "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 8 1";
        let sockets: Vec<_> = [listen, conn, listen]
            .iter()
            .filter_map(|l| parse_tcp_line(l))
            .collect();
        assert_eq!(listeners(&sockets), [(0, 8080)].into_iter().collect());
        assert_eq!(socket_inode("socket:[8]"), Some(8));
        assert_eq!(socket_inode("pipe:[8]"), None);
        let adopted = adoptions(&sockets);
        assert_eq!(adopted.len(), 1);
        assert_eq!(adopted[0].role, Role::Server);
    }

    #[test]
    fn half_closed_connections_are_adopted_and_orphans_and_closed_ones_are_not() {
        let line = |text: &str| parse_tcp_line(text).unwrap();
        let sockets = [
            // A listener on :8080; a server end established; one in CLOSE_WAIT (its client sent
            // a request and its FIN); a client end in FIN_WAIT2 that did so; an orphan in
            // FIN_WAIT2 (inode 0); one in TIME_WAIT; one in LAST_ACK; a state byte from no
            // kernel.
            line("0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 10"),
            line("1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 11"),
            line("2: 0100007F:1F90 0100007F:9C41 08 00000000:00000000 00:00000000 00000000 0 0 12"),
            line("3: 0100007F:9C42 0100007F:1F90 05 00000000:00000000 00:00000000 00000000 0 0 13"),
            line("4: 0100007F:9C43 0100007F:1F90 05 00000000:00000000 00:00000000 00000000 0 0 0"),
            line("5: 0100007F:9C44 0100007F:1F90 06 00000000:00000000 00:00000000 00000000 0 0 0"),
            line("6: 0100007F:1F90 0100007F:9C45 09 00000000:00000000 00:00000000 00000000 0 0 14"),
            line("7: 0100007F:1F90 0100007F:9C46 FF 00000000:00000000 00:00000000 00000000 0 0 15"),
        ];
        let adopted: Vec<_> = adoptions(&sockets)
            .into_iter()
            .map(|a| (a.endpoints.local_port, a.endpoints.peer_port, a.role))
            .collect();
        assert_eq!(
            adopted,
            [
                (8080, 40000, Role::Server),
                (8080, 40001, Role::Server),
                (40002, 8080, Role::Client),
            ]
        );
    }

    #[test]
    fn a_server_without_its_listener_is_told_by_its_port() {
        let ephemeral = parse_port_range("32768\t60999\n");
        assert_eq!(ephemeral, role::DEFAULT_EPHEMERAL);
        assert_eq!(parse_port_range("garbage"), role::DEFAULT_EPHEMERAL);
        assert_eq!(parse_port_range("50000 40000"), role::DEFAULT_EPHEMERAL);
        assert_eq!(parse_port_range("1024 2048"), 1024 | 2048 << 16);
        let line = |text: &str| parse_tcp_line(text).unwrap();
        // :8080 ← :40000 with no listener left on :8080, and the client end.
        let server =
            line("0: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 11");
        let client =
            line("1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 0 0 12");
        let none = HashSet::new();
        assert_eq!(
            adopted_role(&server.endpoints, &none, ephemeral),
            Role::Server
        );
        assert_eq!(
            adopted_role(&client.endpoints, &none, ephemeral),
            Role::Client
        );
        // Both ports ephemeral (a test server on port 0), no listener: client, as before.
        let both =
            line("2: 0100007F:9C41 0100007F:9C42 01 00000000:00000000 00:00000000 00000000 0 0 13");
        assert_eq!(
            adopted_role(&both.endpoints, &none, ephemeral),
            Role::Client
        );
        // A listener decides whatever the ports.
        let listening = HashSet::from([(both.endpoints.netns, both.endpoints.local_port)]);
        assert_eq!(
            adopted_role(&both.endpoints, &listening, ephemeral),
            Role::Server
        );
    }

    #[test]
    fn finds_a_live_connection_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let local_port = client.local_addr().unwrap().port();
        let server_port = listener.local_addr().unwrap().port();
        let adopted = adoptions(&tcp_sockets());
        // Both ports: on a busy host another connection may share one of them.
        let mine = adopted
            .iter()
            .find(|a| a.endpoints.local_port == local_port && a.endpoints.peer_port == server_port)
            .expect("the client side is listed");
        assert_eq!(mine.role, Role::Client);
        assert_eq!(mine.owner.pid, std::process::id());
        let server_side = adopted
            .iter()
            .find(|a| a.endpoints.peer_port == local_port && a.endpoints.local_port == server_port)
            .expect("the server side is listed");
        assert_eq!(server_side.role, Role::Server);
    }

    #[test]
    fn the_cgroup_is_the_unified_path_or_the_deeper_legacy_one() {
        assert_eq!(
            cgroup_of("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        let hybrid = "9:name=systemd:/\n4:memory:/docker/3f2a9c\n1:cpu:/docker/3f2a9c\n0::/\n";
        assert_eq!(cgroup_of(hybrid).as_deref(), Some("/docker/3f2a9c"));
        assert_eq!(cgroup_of("0::/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_of("garbage").as_deref(), None);
        assert_eq!(cgroup_of("").as_deref(), None);
    }
}
