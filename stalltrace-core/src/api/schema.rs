//! The public JSON shapes: NDJSON events and the items of API answers (`conns`, `stalls`).
//! Nested objects whose flattened names are OpenTelemetry semantic-convention attributes
//! (`process.pid`, `network.peer.address`, …). Documented field by field in docs/events.md.
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{
    diagnosis::Diagnosis,
    tracker::{
        model::{Endpoints, Role, Transport, UnixInfo},
        CloseSummary, ConnRef, Detail, Event, Totals,
    },
};

/// A fixed vocabulary word (event name, role, kind…): borrowed when encoding, so that writing
/// an event allocates only for its time and executable name.
pub type Name = Cow<'static, str>;

/// The version of the NDJSON event format, carried by every event as `schema` so that
/// downstream parsers can pin it. Adding a field or an enum value keeps it; renaming, removing
/// or retyping a field, or changing a field's meaning, bumps it (docs/events.md).
pub const EVENT_SCHEMA: u32 = 1;

/// An NDJSON event: its time, name and schema version ([`EVENT_SCHEMA`]), then the same
/// objects as an API item.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventJson {
    pub time: String,
    pub event: Name,
    pub schema: u32,
    #[serde(flatten)]
    pub item: ConnItemJson,
}

/// `conn.*`. Which optional members appear depends on the event or answer (docs/events.md).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ConnJson {
    pub id: u64,
    pub role: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sends: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receives: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchanges: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_send_ago_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_receive_ago_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_while_stalled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals_complete: Option<bool>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProcessJson {
    pub pid: u32,
    pub executable: ExecutableJson,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ExecutableJson {
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ThreadJson {
    pub id: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NetworkJson {
    pub transport: Name,
    #[serde(rename = "type")]
    pub kind: Name,
    pub local: EndpointJson,
    pub peer: EndpointJson,
    /// `network.protocol.name`: the application protocol recognized from the connection's
    /// first request bytes (`http`, `http2`, `tls`, `redis`, `postgresql`), in `conns` items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolJson>,
    /// `network.community_id`: the Community ID v1 flow hash (TCP and UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<String>,
    /// `network.netns`: inode of the connection's network namespace, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
}

/// `cgroup.*`: the owner's cgroup v2.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CgroupJson {
    /// The cgroup id (inode of its directory under `/sys/fs/cgroup`).
    pub id: u64,
    /// Its path below the cgroup v2 root, once the daemon has resolved the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `container.*` (OpenTelemetry's `container.id`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ContainerJson {
    pub id: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProtocolJson {
    pub name: Name,
    /// `network.protocol.plaintext`: where the daemon sees a TLS connection's plaintext from:
    /// `libssl` once one of its transfers was seen inside the host's libssl `SSL_read` (its
    /// replies then count when that returns data); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Name>,
}

/// One end of a connection: `network.local.*` / `network.peer.*`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EndpointJson {
    /// An IP address; for a Unix socket, its name (a path, `@` and an abstract name, or ""
    /// for an unbound socket), as OpenTelemetry puts it in `network.*.address`.
    pub address: String,
    /// TCP/UDP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Unix only: the socket's inode number (as `ss -x` and /proc/net/unix show it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Unix only, on the peer: the peer's process id as the kernel recorded it when the
    /// connection was made (what `SO_PEERCRED` returns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// `stall.*`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct StallJson {
    pub kind: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// UDP only: times the request was sent again while it waited (DNS: the same query id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// HTTP/2 with its streams followed: the stream the stall is about (`stall.http2.stream.id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<Http2Json>,
    /// When the quiet stretch began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Set by the `severity` of the configuration rule that matched the stall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Name>,
    /// The name of the configuration rule that matched the stall, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Name>,
    /// API answers only: `true` while the diagnosis worker's first look at the stall is under
    /// way (a few ms, up to a second on a loaded host): `cause`, `thread` and `tcp` are still
    /// to come, not unknown. Absent once the look is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis_pending: Option<bool>,
    /// Why: cause, confidence, thread, blame chain, TCP signals, request.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<Diagnosis>,
}

/// `stall.http2`: the HTTP/2 stream (RFC 9113 §5) a stall is about.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Json {
    pub stream: Http2StreamJson,
    /// Other streams of the connection answered past the threshold while this stall lasted
    /// (`stall.end`, and open stalls' items; absent when none): each was a stall of its own,
    /// hidden behind this one (a connection reports one stall at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_late_streams: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2StreamJson {
    /// The stream identifier (odd: opened by the client).
    pub id: u32,
    /// `stall.end` with resolution `stream_reset`: the end that sent the `RST_STREAM`
    /// (`client`: a cancelled call, a deadline that passed; `server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_by: Option<Role>,
}

impl Http2Json {
    /// `stall.http2` for a stall about `stream`, if any.
    pub fn stream(stream: Option<u32>) -> Option<Self> {
        Self::ended(stream, 0, None)
    }

    /// `stall.http2` of a `stall.end` (or an open stall's item), with the streams answered
    /// late behind it and the end that reset the stream, if one did.
    pub fn ended(
        stream: Option<u32>,
        other_late_streams: u32,
        reset_by: Option<Role>,
    ) -> Option<Self> {
        stream.map(|id| Self {
            stream: Http2StreamJson { id, reset_by },
            other_late_streams: (other_late_streams > 0).then_some(other_late_streams),
        })
    }
}

/// An item of `conns` and `stalls` answers: the event identity, plus `stall` for stalls.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ConnItemJson {
    pub conn: ConnJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<ThreadJson>,
    pub network: NetworkJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallJson>,
}

impl ConnItemJson {
    /// The item for `conn`, with `conn.id` and `conn.role` set.
    pub fn new(conn: &ConnRef) -> Self {
        let (process, thread, network) = identity(conn);
        Self {
            conn: base_conn(conn),
            process,
            thread,
            network,
            cgroup: (conn.owner.cgroup_id != 0).then_some(CgroupJson {
                id: conn.owner.cgroup_id,
                path: None,
            }),
            container: None,
            stall: None,
        }
    }

    /// Adds the path of the owner's cgroup (resolved from its id by the daemon) and the
    /// container id it holds, if any.
    pub fn set_cgroup_path(&mut self, path: &str) {
        if let Some(cgroup) = self.cgroup.as_mut() {
            cgroup.path = Some(path.to_owned());
            self.container =
                crate::cgroup::container_id(path).map(|id| ContainerJson { id: id.to_owned() });
        }
    }
}

/// The `process`, `thread` and `network` objects of a connection; `None`s when no process has
/// used it yet.
pub fn identity(conn: &ConnRef) -> (Option<ProcessJson>, Option<ThreadJson>, NetworkJson) {
    let owner = conn.owner;
    let process = (owner.pid != 0).then(|| ProcessJson {
        pid: owner.pid,
        executable: ExecutableJson {
            name: owner.comm.as_str().into_owned(),
        },
    });
    let thread = (owner.tid != 0).then_some(ThreadJson { id: owner.tid });
    (
        process,
        thread,
        network(&conn.endpoints, conn.unix.as_deref()),
    )
}

/// `ip` as its `Display` writes it. IPv4 digits are written directly: every event carries two
/// addresses, and `Display` for `Ipv4Addr` (four `u8`s through the formatting machinery) was
/// 8 % of the daemon's CPU time under connection churn (perf, 116 000 events/s).
fn address_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// The `network` object of a connection; `unix` is what is known of a Unix connection.
pub fn network(endpoints: &Endpoints, unix: Option<&UnixInfo>) -> NetworkJson {
    let (local, peer) = match endpoints.unix_inodes() {
        Some(inodes) => {
            let unknown = UnixInfo::default();
            let info = unix.unwrap_or(&unknown);
            (
                EndpointJson {
                    address: info.local_name.clone(),
                    port: None,
                    inode: Some(inodes.local),
                    pid: None,
                },
                EndpointJson {
                    address: info.peer_name.clone(),
                    port: None,
                    inode: Some(inodes.peer),
                    pid: (info.peer_pid != 0).then_some(info.peer_pid),
                },
            )
        }
        None => (
            EndpointJson {
                address: address_text(endpoints.local),
                port: Some(endpoints.local_port),
                inode: None,
                pid: None,
            },
            EndpointJson {
                address: address_text(endpoints.peer),
                port: Some(endpoints.peer_port),
                inode: None,
                pid: None,
            },
        ),
    };
    NetworkJson {
        transport: endpoints.transport.as_str().into(),
        kind: endpoints.network_type().into(),
        local,
        peer,
        protocol: None,
        community_id: endpoints.community_id(),
        netns: (endpoints.netns != 0).then_some(endpoints.netns),
    }
}

pub fn base_conn(conn: &ConnRef) -> ConnJson {
    ConnJson {
        id: conn.id,
        role: conn.role.as_str().into(),
        ..ConnJson::default()
    }
}

/// The event name and JSON body of a tracker event; `time` is its RFC 3339 timestamp.
pub fn event_json(event: &Event, time: String) -> EventJson {
    let mut item = ConnItemJson::new(&event.conn);
    let conn = &mut item.conn;
    let (name, stall) = match &event.detail {
        Detail::Open { adopted } => {
            conn.adopted = Some(*adopted);
            ("conn.open", None)
        }
        Detail::Close(summary) => {
            add_close(conn, summary);
            ("conn.close", None)
        }
        Detail::StallStart {
            kind,
            quiet_ms,
            http2_stream,
            diagnosis,
        } => (
            "stall.start",
            Some(StallJson {
                kind: kind.as_str().into(),
                quiet_ms: Some(*quiet_ms),
                http2: Http2Json::stream(*http2_stream),
                diagnosis: diagnosis.as_deref().cloned(),
                ..StallJson::default()
            }),
        ),
        Detail::StallUpdate {
            kind,
            quiet_ms,
            http2_stream,
            diagnosis,
        } => (
            "stall.update",
            Some(StallJson {
                kind: kind.as_str().into(),
                quiet_ms: Some(*quiet_ms),
                http2: Http2Json::stream(*http2_stream),
                diagnosis: Some((**diagnosis).clone()),
                ..StallJson::default()
            }),
        ),
        Detail::StallEnd {
            kind,
            duration_ms,
            resolution,
            retries,
            http2_stream,
            http2_late_streams,
            http2_reset_by,
        } => (
            "stall.end",
            Some(StallJson {
                kind: kind.as_str().into(),
                duration_ms: Some(*duration_ms),
                resolution: Some(resolution.as_str().into()),
                retries: udp_retries(&event.conn.endpoints, *retries),
                http2: Http2Json::ended(*http2_stream, *http2_late_streams, *http2_reset_by),
                ..StallJson::default()
            }),
        ),
    };
    item.stall = stall;
    EventJson {
        time,
        event: name.into(),
        schema: EVENT_SCHEMA,
        item,
    }
}

/// `stall.retries`: UDP only (TCP retransmits are counted by the kernel, not by requests).
pub fn udp_retries(endpoints: &Endpoints, retries: u32) -> Option<u32> {
    (endpoints.transport == Transport::Udp).then_some(retries)
}

fn add_close(conn: &mut ConnJson, summary: &CloseSummary) {
    conn.end = Some(summary.how.as_str().into());
    conn.duration_ms = Some(summary.duration_ms);
    add_totals(conn, &summary.totals);
    conn.closed_while_stalled = Some(summary.closed_while_stalled);
    conn.totals_complete = Some(summary.complete);
}

/// The byte, call and exchange counters of `conn.*`.
pub fn add_totals(conn: &mut ConnJson, totals: &Totals) {
    conn.bytes_sent = Some(totals.bytes_sent);
    conn.bytes_received = Some(totals.bytes_received);
    conn.sends = Some(totals.sends);
    conn.receives = Some(totals.receives);
    conn.requests = Some(totals.requests);
    conn.exchanges = Some(totals.exchanges);
    conn.retransmits = Some(totals.retransmits);
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_read_as_display_writes_them() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let octets = [0, 1, 9, 10, 42, 99, 100, 101, 199, 200, 250, 255];
        for a in octets {
            for b in octets {
                let v4 = IpAddr::V4(Ipv4Addr::new(a, b, 255 - a, b / 3));
                assert_eq!(super::address_text(v4), v4.to_string());
            }
        }
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert_eq!(super::address_text(v6), "2001:db8::1");
    }

    use super::*;
    use crate::tracker::model::{Comm, Owner, Resolution, Role, StallKind, Transport};
    use serde_json::json;

    fn conn_ref() -> ConnRef {
        ConnRef {
            id: 7,
            role: Role::Server,
            owner: Owner {
                pid: 100,
                tid: 101,
                comm: Comm::new("api"),
                cgroup_id: 4242,
            },
            endpoints: Endpoints {
                transport: Transport::Tcp,
                local: "::1".parse().unwrap(),
                local_port: 8080,
                peer: "::1".parse().unwrap(),
                peer_port: 50_000,
                netns: 4_026_532_001,
            },
            unix: None,
        }
    }

    #[test]
    fn unix_connections_name_paths_inodes_and_the_peer_pid() {
        let event = Event {
            at_ns: 0,
            conn: ConnRef {
                role: Role::Client,
                endpoints: Endpoints::unix(31, 32),
                unix: Some(std::sync::Arc::new(UnixInfo {
                    local_name: String::new(),
                    peer_name: "/run/php/fpm.sock".into(),
                    peer_pid: 900,
                    one_way: false,
                    peer_is_server: true,
                })),
                ..conn_ref()
            },
            detail: Detail::Open { adopted: false },
        };
        let value = serde_json::to_value(event_json(&event, "T".into())).unwrap();
        assert_eq!(
            value["network"],
            json!({
                "transport": "unix", "type": "unix",
                "local": {"address": "", "inode": 31},
                "peer": {"address": "/run/php/fpm.sock", "inode": 32, "pid": 900}
            })
        );
        // The CLI reads it back.
        let item: EventJson = serde_json::from_value(value).unwrap();
        assert_eq!(item.item.network.peer.pid, Some(900));
    }

    fn encode(detail: Detail) -> serde_json::Value {
        let event = Event {
            at_ns: 0,
            conn: conn_ref(),
            detail,
        };
        serde_json::to_value(event_json(&event, "T".into())).unwrap()
    }

    #[test]
    fn stall_start_has_the_documented_shape() {
        let value = encode(Detail::StallStart {
            kind: StallKind::UnansweredRequest,
            quiet_ms: 5_003,
            diagnosis: None,
            http2_stream: None,
        });
        assert_eq!(
            value,
            json!({
                "time": "T",
                "event": "stall.start",
                "schema": 1,
                "conn": {"id": 7, "role": "server"},
                "process": {"pid": 100, "executable": {"name": "api"}},
                "thread": {"id": 101},
                "network": {
                    "transport": "tcp", "type": "ipv6",
                    "local": {"address": "::1", "port": 8080},
                    "peer": {"address": "::1", "port": 50000},
                    "community_id": "1:sc6jUb5yNHzMBPE4mkZKbUeyci8=",
                    "netns": 4_026_532_001u32
                },
                "cgroup": {"id": 4242},
                "stall": {"kind": "unanswered_request", "quiet_ms": 5003}
            })
        );
    }

    #[test]
    fn a_resolved_cgroup_path_names_the_container() {
        let id = "3f2a9c1b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3";
        let mut item = ConnItemJson::new(&conn_ref());
        item.set_cgroup_path(&format!("/system.slice/docker-{id}.scope"));
        let value = serde_json::to_value(&item).unwrap();
        assert_eq!(value["cgroup"]["id"], 4242);
        assert_eq!(
            value["cgroup"]["path"],
            format!("/system.slice/docker-{id}.scope")
        );
        assert_eq!(value["container"]["id"], id);
        item.set_cgroup_path("/system.slice/nginx.service");
        assert!(item.container.is_none());
        // No owner, no cgroup: a path has nothing to describe.
        let mut anonymous = conn_ref();
        anonymous.owner = Default::default();
        let mut item = ConnItemJson::new(&anonymous);
        item.set_cgroup_path("/system.slice/nginx.service");
        assert!(item.cgroup.is_none() && item.container.is_none());
    }

    #[test]
    fn stall_end_carries_duration_and_resolution() {
        let value = encode(Detail::StallEnd {
            kind: StallKind::AwaitingResponse,
            duration_ms: 7_300,
            resolution: Resolution::Closed,
            retries: 0,
            http2_stream: None,
            http2_late_streams: 0,
            http2_reset_by: None,
        });
        assert_eq!(value["event"], "stall.end");
        assert_eq!(value["schema"], EVENT_SCHEMA);
        assert_eq!(
            value["stall"],
            json!({"kind": "awaiting_response", "duration_ms": 7300, "resolution": "closed"})
        );
    }

    #[test]
    fn a_udp_stall_end_counts_its_retries() {
        let mut conn = conn_ref();
        conn.endpoints.transport = Transport::Udp;
        let event = Event {
            at_ns: 1,
            conn,
            detail: Detail::StallEnd {
                kind: StallKind::AwaitingResponse,
                duration_ms: 10_000,
                resolution: Resolution::Response,
                retries: 2,
                http2_stream: None,
                http2_late_streams: 0,
                http2_reset_by: None,
            },
        };
        let value = serde_json::to_value(event_json(&event, "t".into())).unwrap();
        assert_eq!(value["network"]["transport"], "udp");
        assert_eq!(value["stall"]["retries"], 2);
    }

    #[test]
    fn close_carries_totals() {
        let value = encode(Detail::Close(CloseSummary {
            how: Resolution::Reset,
            totals: Totals {
                bytes_sent: 1,
                bytes_received: 2,
                sends: 3,
                receives: 4,
                requests: 5,
                exchanges: 6,
                retransmits: 7,
            },
            closed_while_stalled: true,
            duration_ms: 8,
            complete: true,
        }));
        assert_eq!(value["event"], "conn.close");
        assert_eq!(value["schema"], EVENT_SCHEMA);
        assert_eq!(
            value["conn"],
            json!({
                "id": 7, "role": "server", "end": "reset", "duration_ms": 8,
                "bytes_sent": 1, "bytes_received": 2, "sends": 3, "receives": 4,
                "requests": 5, "exchanges": 6, "retransmits": 7,
                "closed_while_stalled": true, "totals_complete": true
            })
        );
        assert!(value.get("stall").is_none());
    }

    #[test]
    fn unknown_owner_omits_process_and_thread() {
        let mut conn = conn_ref();
        conn.owner = Owner::default();
        let event = Event {
            at_ns: 0,
            conn,
            detail: Detail::Open { adopted: true },
        };
        let value = serde_json::to_value(event_json(&event, "T".into())).unwrap();
        assert_eq!(value["schema"], EVENT_SCHEMA);
        assert!(value.get("process").is_none());
        assert!(value.get("thread").is_none());
        assert_eq!(value["conn"]["adopted"], true);
    }

    #[test]
    fn events_round_trip_through_json() {
        let event = Event {
            at_ns: 0,
            conn: conn_ref(),
            detail: Detail::Open { adopted: false },
        };
        let json = event_json(&event, "T".into());
        let text = serde_json::to_string(&json).unwrap();
        assert!(!text.contains('\n'), "NDJSON needs one line per event");
        assert_eq!(serde_json::from_str::<EventJson>(&text).unwrap(), json);
    }
}
