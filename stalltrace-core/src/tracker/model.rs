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
        };
        info.one_way = ONE_WAY_UNIX_PATHS.contains(&info.path());
        info
    }

    /// The connection's path: the name of whichever end is bound (the listener's, which an
    /// accepted socket shares), the local one first; "" for two unbound ends (a socketpair).
    pub fn path(&self) -> &str {
        if self.local_name.is_empty() {
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

/// Transport, addresses and ports of a connection. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as seen
/// on dual-stack sockets) are stored as IPv4: that is the network the traffic uses, and it
/// makes the same connection compare equal whichever source reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub transport: Transport,
    pub local: IpAddr,
    pub local_port: u16,
    pub peer: IpAddr,
    pub peer_port: u16,
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
    /// (getsockname/getpeername): IPv4-mapped addresses are unmapped as everywhere else.
    pub fn from_socket_addrs(transport: Transport, local: SocketAddr, peer: SocketAddr) -> Self {
        Self {
            transport,
            local: local.ip().to_canonical(),
            local_port: local.port(),
            peer: peer.ip().to_canonical(),
            peer_port: peer.port(),
        }
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
        }
    }

    pub fn has_port(&self, port: u16) -> bool {
        self.transport != Transport::Unix && (self.local_port == port || self.peer_port == port)
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
}

impl Owner {
    /// The owner recorded in a kernel snapshot, if it has one.
    pub fn from_kernel(state: &ConnState) -> Option<Self> {
        (state.tgid != 0).then(|| Self {
            pid: state.tgid,
            tid: state.tid,
            comm: Comm::from_kernel(state.comm),
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
        }
    }
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
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Closed => "closed",
            Self::Reset => "reset",
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
