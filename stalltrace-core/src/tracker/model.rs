//! Domain types of the connection tracker, decoded from the kernel ABI.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use stalltrace_common::{role, transport, ConnState, AF_INET6, COMM_LEN};

/// Which side opened the connection: `client` called `connect()`, `server` accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Server,
}

impl Role {
    pub fn from_kernel(value: u8) -> Self {
        if value == role::SERVER {
            Self::Server
        } else {
            Self::Client
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// `network.transport`: the kernel's transport of a tracked socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
    /// A Unix domain stream or seqpacket socket.
    Unix,
}

impl Transport {
    /// From [`ConnState::transport`]; an id this build does not know reads as TCP, the
    /// transport of every record before the others were traced.
    pub fn from_kernel(value: u8) -> Self {
        match value {
            transport::UDP => Self::Udp,
            transport::UNIX => Self::Unix,
            _ => Self::Tcp,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Unix => "unix",
        }
    }
}

/// The inode numbers of a Unix connection's two sockets: its identity (see
/// [`Endpoints::unix`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixInodes {
    pub local: u64,
    pub peer: u64,
}

/// What is known of a Unix connection beyond its identity, fixed when it is made: the names
/// both sockets are bound to, as shown (see [`unix_name`]), and the peer's process as the
/// kernel recorded it (`SO_PEERCRED`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixInfo {
    pub local_name: String,
    pub peer_name: String,
    /// 0 when the kernel had none.
    pub peer_pid: u32,
    /// Its path is one of [`ONE_WAY_UNIX_PATHS`]: it carries one-way messages and is never
    /// judged.
    pub one_way: bool,
    /// This end is the client and its peer is bound: the peer's name is the listener's, even
    /// when this end bound a name of its own (autobind).
    pub peer_is_server: bool,
}

/// Unix stream sockets whose connections only ever flow one way, on any host that runs them:
/// judged by the direction rule, each would look like a request nobody answers.
/// `/run/systemd/journal/stdout`: the stdout and stderr of every systemd service, streamed to
/// journald.
pub const ONE_WAY_UNIX_PATHS: &[&str] = &["/run/systemd/journal/stdout"];

impl UnixInfo {
    pub fn from_kernel(state: &ConnState, names: &stalltrace_common::UnixNames) -> Self {
        let mut info = Self {
            local_name: unix_name(names.local()),
            peer_name: unix_name(names.peer()),
            peer_pid: state.peer_tgid,
            one_way: false,
            peer_is_server: state.role == role::CLIENT && !names.peer().is_empty(),
        };
        info.one_way = ONE_WAY_UNIX_PATHS.contains(&info.path());
        info
    }

    /// The connection's path: the listener's name, which an accepted socket shares: the
    /// server end's when both are bound, else whichever end is bound, the local one first; ""
    /// for two unbound ends (a socketpair).
    pub fn path(&self) -> &str {
        if self.peer_is_server || self.local_name.is_empty() {
            &self.peer_name
        } else {
            &self.local_name
        }
    }
}

/// A Unix socket name (`sun_path` bytes, as long as the kernel's `unix_address.len` says) as
/// `ss` shows it: a path up to its first NUL; an abstract name (leading NUL) as `@` and the
/// rest, its NULs shown as `@`; "" for an unbound socket. Bytes that are not UTF-8 become
/// U+FFFD: names are arbitrary bytes chosen by local users.
pub fn unix_name(raw: &[u8]) -> String {
    match raw.split_first() {
        None => String::new(),
        Some((0, rest)) => {
            let shown: Vec<u8> = rest
                .iter()
                .map(|&b| if b == 0 { b'@' } else { b })
                .collect();
            format!("@{}", String::from_utf8_lossy(&shown))
        }
        Some(_) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }
    }
}

/// Transport, addresses and ports of a connection, and the network namespace they are
/// addresses in. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as seen on dual-stack sockets)
/// are stored as IPv4: that is the network the traffic uses, and it makes the same connection
/// compare equal whichever source reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub transport: Transport,
    pub local: IpAddr,
    pub local_port: u16,
    pub peer: IpAddr,
    pub peer_port: u16,
    /// Inode of the network namespace (`/proc/PID/ns/net`); 0 when not known (a kernel whose
    /// BTF lacks the members to read it: then every source leaves it 0). Part of the identity:
    /// equal addresses and ports in two namespaces are two connections.
    pub netns: u32,
}

impl Endpoints {
    pub fn from_kernel(state: &ConnState) -> Self {
        let transport = Transport::from_kernel(state.transport);
        if transport == Transport::Unix {
            return Self::unix(state.inode, state.peer_inode);
        }
        Self {
            transport,
            local: ip_from_kernel(state.family, &state.local_addr),
            local_port: state.local_port,
            peer: ip_from_kernel(state.family, &state.peer_addr),
            peer_port: state.peer_port,
            netns: state.netns,
        }
    }

    /// `network.type` in OpenTelemetry terms (`unix` for Unix sockets, which it leaves open).
    pub fn network_type(&self) -> &'static str {
        if self.transport == Transport::Unix {
            return "unix";
        }
        match self.local {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        }
    }

    /// The endpoints of a `transport` socket whose addresses were read from the socket itself
    /// (getsockname/getpeername): IPv4-mapped addresses are unmapped as everywhere else. Its
    /// namespace is not known from the addresses: see [`Endpoints::in_netns`].
    pub fn from_socket_addrs(transport: Transport, local: SocketAddr, peer: SocketAddr) -> Self {
        Self {
            transport,
            local: local.ip().to_canonical(),
            local_port: local.port(),
            peer: peer.ip().to_canonical(),
            peer_port: peer.port(),
            netns: 0,
        }
    }

    /// The same endpoints in network namespace `netns` (an inode, 0: unknown).
    pub fn in_netns(self, netns: u32) -> Self {
        Self { netns, ..self }
    }

    /// `network.community_id`: the Community ID v1 flow hash (seed 0) that Zeek, Suricata and
    /// Elastic compute for the same flow, so that a log backend joins both ends of a
    /// connection seen on two hosts. TCP and UDP only; `None` for other transports, and for a
    /// flow whose addresses are not all known (an unconnected UDP socket's local address reads
    /// `0.0.0.0`, a UDP server's peer `0.0.0.0:0`): a hash of those would never match the
    /// wire's.
    ///
    /// Every event carries it, and a SHA-1 costs about as much as encoding the rest of an
    /// event: the last flows hashed are remembered per thread (a direct-mapped table of
    /// [`COMMUNITY_ID_MEMO`] entries), so the events of both ends of a connection hash it
    /// once (measured: 45–75 ns remembered, ~190 ns hashed, against ~750 ns to encode an
    /// event).
    pub fn community_id(&self) -> Option<String> {
        if self.local.is_unspecified() || self.peer.is_unspecified() || self.peer_port == 0 {
            return None;
        }
        // Both ends of a flow hash alike: remember it once, in one orientation.
        let key = self.in_netns(0);
        let key = if (key.local, key.local_port) <= (key.peer, key.peer_port) {
            key
        } else {
            key.reversed()
        };
        let slot = key.memo_slot();
        let known = COMMUNITY_IDS.with_borrow(|memo| {
            memo.get(slot)
                .and_then(|entry| entry.as_ref())
                .filter(|(endpoints, _)| *endpoints == key)
                .map(|(_, id)| id.clone())
        });
        if known.is_some() {
            return known;
        }
        let id = key.hash_community_id()?;
        COMMUNITY_IDS.with_borrow_mut(|memo| {
            if memo.is_empty() {
                memo.resize(COMMUNITY_ID_MEMO, None);
            }
            memo[slot] = Some((key, id.clone()));
        });
        Some(id)
    }

    fn memo_slot(&self) -> usize {
        let fold = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        };
        let ports = u64::from(self.local_port) << 16 | u64::from(self.peer_port);
        let mixed = stalltrace_common::mix_sock(
            ports ^ fold(self.local).rotate_left(32) ^ fold(self.peer).rotate_left(17),
        );
        mixed as usize & (COMMUNITY_ID_MEMO - 1)
    }

    fn hash_community_id(&self) -> Option<String> {
        let protocol = match self.transport {
            Transport::Tcp => stalltrace_common::IPPROTO_TCP as u8,
            Transport::Udp => stalltrace_common::IPPROTO_UDP as u8,
            Transport::Unix => return None,
        };
        // Mixed families (one end IPv4-mapped, the other plain IPv6) hash as IPv6, as the
        // packets on the wire are.
        let (local, peer) = match (self.local, self.peer) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                (self.local, self.peer)
            }
            (local, peer) => (to_v6(local), to_v6(peer)),
        };
        community_id::calculate_community_id(
            0,
            local,
            peer,
            Some(self.local_port),
            Some(self.peer_port),
            protocol,
            false,
        )
        .ok()
    }

    /// A Unix connection's endpoints from its two sockets' inodes. Unix connections have no
    /// addresses that tell them apart (every connection accepted on a listener shares its
    /// path): their identity is the inode pair, kept in the address fields as 128-bit
    /// integers so that `Endpoints` stays one plain key for every transport (hashing,
    /// `reversed`, the blame chain's peer lookup all work unchanged). Read them back with
    /// [`Endpoints::unix_inodes`]; never show these "addresses".
    pub fn unix(local_inode: u64, peer_inode: u64) -> Self {
        Self {
            transport: Transport::Unix,
            local: IpAddr::V6(Ipv6Addr::from(u128::from(local_inode))),
            local_port: 0,
            peer: IpAddr::V6(Ipv6Addr::from(u128::from(peer_inode))),
            peer_port: 0,
            netns: 0,
        }
    }

    /// A Unix connection's inodes (see [`Endpoints::unix`]); `None` for other transports.
    pub fn unix_inodes(&self) -> Option<UnixInodes> {
        let inode = |address: IpAddr| match address {
            IpAddr::V6(v6) => u64::try_from(u128::from(v6)).unwrap_or(0),
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
        };
        (self.transport == Transport::Unix).then(|| UnixInodes {
            local: inode(self.local),
            peer: inode(self.peer),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(self.local, self.local_port)
    }

    pub fn peer_addr(&self) -> SocketAddr {
        SocketAddr::new(self.peer, self.peer_port)
    }

    /// The same connection seen from its other end.
    pub fn reversed(&self) -> Self {
        Self {
            transport: self.transport,
            local: self.peer,
            local_port: self.peer_port,
            peer: self.local,
            peer_port: self.local_port,
            netns: self.netns,
        }
    }

    pub fn has_port(&self, port: u16) -> bool {
        self.transport != Transport::Unix && (self.local_port == port || self.peer_port == port)
    }
}

/// Flows whose Community ID each thread remembers (a power of two; ~100 bytes each).
pub const COMMUNITY_ID_MEMO: usize = 1024;

thread_local! {
    static COMMUNITY_IDS: std::cell::RefCell<Vec<Option<(Endpoints, String)>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn to_v6(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

fn ip_from_kernel(family: u16, addr: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        Ipv6Addr::from(*addr).to_canonical()
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

/// The executable name the kernel keeps per task (`comm`, at most 15 bytes).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Comm([u8; COMM_LEN]);

impl Comm {
    pub fn from_kernel(raw: [u8; COMM_LEN]) -> Self {
        Self(raw)
    }

    pub fn new(name: &str) -> Self {
        let mut raw = [0; COMM_LEN];
        let len = name.len().min(COMM_LEN - 1);
        raw[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self(raw)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        String::from_utf8_lossy(&self.0[..len])
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The process and thread that last used a connection. pid 0: not known yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    /// The process's cgroup v2 id (the inode of its directory under `/sys/fs/cgroup`), from
    /// the kernel when the process became the owner, or from `/proc` for adopted connections;
    /// 0: not known.
    pub cgroup_id: u64,
}

impl Owner {
    /// The owner recorded in a kernel snapshot, if it has one.
    pub fn from_kernel(state: &ConnState) -> Option<Self> {
        (state.tgid != 0).then(|| Self {
            pid: state.tgid,
            tid: state.tid,
            comm: Comm::from_kernel(state.comm),
            cgroup_id: state.cgroup_id,
        })
    }
}

/// What a stall is waiting for (`stall.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StallKind {
    /// Server role: a request came in and nothing went out since.
    UnansweredRequest,
    /// Client role: a request went out and nothing came back since.
    AwaitingResponse,
    /// `connect()` sent a SYN and the handshake has not completed.
    ConnectPending,
    /// HTTP/1.x, either role: a response started and stopped short of what its framing
    /// promised (`Content-Length` bytes, or a chunked body's last chunk), and nothing more of
    /// it moved since.
    ResponseIncomplete,
}

impl StallKind {
    pub fn for_role(role: Role) -> Self {
        match role {
            Role::Server => Self::UnansweredRequest,
            Role::Client => Self::AwaitingResponse,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnansweredRequest => "unanswered_request",
            Self::AwaitingResponse => "awaiting_response",
            Self::ConnectPending => "connect_pending",
            Self::ResponseIncomplete => "response_incomplete",
        }
    }

    /// Every kind, for listings that show each one (metrics series exported at zero).
    pub const ALL: [Self; 4] = [
        Self::UnansweredRequest,
        Self::AwaitingResponse,
        Self::ConnectPending,
        Self::ResponseIncomplete,
    ];
}

/// How a stall ended (`stall.resolution`), or how a connection ended (`conn.end`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Traffic came back (or the handshake completed, for `connect_pending`).
    Response,
    /// Either side closed the connection with a FIN.
    Closed,
    /// The connection was reset.
    Reset,
    /// HTTP/2: the stalled stream was reset (`RST_STREAM`), its connection still open: by its
    /// client (a cancelled call, a deadline that passed) or its server (see
    /// `Detail::StallEnd::http2_reset_by`).
    StreamReset,
    /// The daemon stopped while the stall was open: it may go on, unwatched.
    DaemonStopped,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Closed => "closed",
            Self::Reset => "reset",
            Self::StreamReset => "stream_reset",
            Self::DaemonStopped => "daemon_stopped",
        }
    }
}

display_as_str!(Transport, Role, StallKind, Resolution);

#[cfg(test)]
mod tests {
    use super::*;
    use stalltrace_common::AF_INET;

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mut state = ConnState {
            family: AF_INET6,
            local_port: 80,
            ..Default::default()
        };
        state.local_addr = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).octets();
        state.peer_addr = Ipv6Addr::LOCALHOST.octets();
        let endpoints = Endpoints::from_kernel(&state);
        assert_eq!(endpoints.local, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(endpoints.network_type(), "ipv4");
        assert_eq!(endpoints.peer, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn ipv4_uses_the_first_four_bytes() {
        let mut state = ConnState {
            family: AF_INET,
            ..Default::default()
        };
        state.peer_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        state.peer_addr[4] = 0xff; // garbage past the address must be ignored
        assert_eq!(
            Endpoints::from_kernel(&state).peer,
            IpAddr::from([10, 1, 2, 3])
        );
    }

    fn flow(
        transport: Transport,
        local: &str,
        local_port: u16,
        peer: &str,
        peer_port: u16,
    ) -> Endpoints {
        Endpoints {
            transport,
            local: local.parse().unwrap(),
            local_port,
            peer: peer.parse().unwrap(),
            peer_port,
            netns: 0,
        }
    }

    /// The TCP and UDP vectors of the Community ID spec's baseline (corelight/community-id-spec,
    /// `baseline/baseline_deflt.json`, seed 0) and of Zeek's own test, from both ends.
    #[test]
    fn community_id_matches_the_published_vectors() {
        use Transport::{Tcp, Udp};
        let vectors = [
            (
                Tcp,
                "128.232.110.120",
                34855,
                "66.35.250.204",
                80,
                "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
            ),
            (
                Udp,
                "192.168.1.52",
                54585,
                "8.8.8.8",
                53,
                "1:d/FP5EW3wiY1vCndhwleRRKHowQ=",
            ),
            (
                Tcp,
                "2001:470:e5bf:dead:4957:2174:e82c:4887",
                63943,
                "2607:f8b0:400c:c03::1a",
                25,
                "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=",
            ),
            (
                Tcp,
                "1.2.3.4",
                1122,
                "5.6.7.8",
                3344,
                "1:wCb3OG7yAFWelaUydu0D+125CLM=",
            ),
            (
                Udp,
                "1.2.3.4",
                1122,
                "5.6.7.8",
                3344,
                "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=",
            ),
        ];
        for (transport, a, a_port, b, b_port, expected) in vectors {
            let forward = flow(transport, a, a_port, b, b_port);
            assert_eq!(
                forward.community_id().as_deref(),
                Some(expected),
                "{forward:?}"
            );
            let backward = forward.reversed();
            assert_eq!(
                backward.community_id().as_deref(),
                Some(expected),
                "{backward:?}"
            );
            // The namespace is this host's business, not the flow's.
            assert_eq!(
                forward.in_netns(4_026_532_000).community_id().as_deref(),
                Some(expected)
            );
        }
        assert_eq!(flow(Transport::Unix, "::", 0, "::", 0).community_id(), None);
        // An unconnected UDP socket's local address, a UDP server's unknown peer.
        assert_eq!(
            flow(Transport::Udp, "0.0.0.0", 5353, "127.0.0.77", 53).community_id(),
            None
        );
        assert_eq!(
            flow(Transport::Udp, "127.0.0.1", 53, "0.0.0.0", 0).community_id(),
            None
        );
    }

    /// The memo never answers for another flow: every flow of many more than it holds, asked
    /// twice in a row and again later, gets the hash computed afresh.
    #[test]
    fn remembered_community_ids_are_those_of_the_flow_asked() {
        let flows: Vec<Endpoints> = (0..4 * COMMUNITY_ID_MEMO as u16)
            .map(|port| flow(Transport::Tcp, "10.0.0.1", port, "10.0.0.2", 443))
            .collect();
        for round in 0..2 {
            for endpoints in &flows {
                let fresh = endpoints.hash_community_id();
                assert_eq!(
                    endpoints.community_id(),
                    fresh,
                    "round {round}: {endpoints:?}"
                );
                assert_eq!(
                    endpoints.community_id(),
                    fresh,
                    "round {round}: {endpoints:?}"
                );
            }
        }
        let tcp = flows[0];
        let udp = Endpoints {
            transport: Transport::Udp,
            ..tcp
        };
        assert_ne!(tcp.community_id(), udp.community_id());
    }

    #[test]
    fn endpoints_in_two_namespaces_differ() {
        let root = flow(Transport::Tcp, "127.0.0.1", 8080, "127.0.0.1", 40000).in_netns(1);
        let other = root.in_netns(2);
        assert_ne!(root, other);
        assert_eq!(root.reversed().netns, 1);
        assert_eq!(root.reversed().reversed(), root);
    }

    #[test]
    fn unix_names_are_shown_as_ss_does() {
        assert_eq!(unix_name(b""), "");
        assert_eq!(unix_name(b"/run/php/fpm.sock\0"), "/run/php/fpm.sock");
        assert_eq!(unix_name(b"\0app\0x"), "@app@x");
        assert_eq!(unix_name(b"/tmp/\xff.sock"), "/tmp/\u{fffd}.sock");
        assert_eq!(unix_name(b"\0"), "@");
    }

    #[test]
    fn unix_endpoints_are_their_inodes_and_reverse() {
        let state = ConnState {
            transport: stalltrace_common::transport::UNIX,
            inode: 5,
            peer_inode: 6,
            ..Default::default()
        };
        let endpoints = Endpoints::from_kernel(&state);
        assert_eq!(endpoints, Endpoints::unix(5, 6));
        assert_eq!(endpoints.reversed(), Endpoints::unix(6, 5));
        let inodes = endpoints.unix_inodes().unwrap();
        assert_eq!((inodes.local, inodes.peer), (5, 6));
        assert_eq!(
            Endpoints::unix(u64::MAX, 0).unix_inodes().unwrap().local,
            u64::MAX
        );
        assert_ne!(endpoints, Endpoints::unix(5, 7));
        assert_eq!(endpoints.network_type(), "unix");
        assert!(!endpoints.has_port(0));
    }

    #[test]
    fn comm_stops_at_nul_and_truncates() {
        let mut raw = [0u8; COMM_LEN];
        raw[..5].copy_from_slice(b"nginx");
        assert_eq!(Comm::from_kernel(raw).as_str(), "nginx");
        assert_eq!(
            Comm::new("a-very-long-process-name").as_str(),
            "a-very-long-pro"
        );
    }
}
