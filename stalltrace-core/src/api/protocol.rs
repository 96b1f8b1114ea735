//! The control API between `stalltrace daemon` and the CLI: one JSON request per line on a Unix
//! socket, answered by one JSON response line (or, for `watch`, by a stream of event lines).
//! Documented in docs/api.md.
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::tracker::model::Endpoints;

pub const VERSION: u32 = 1;
pub const DEFAULT_SOCKET: &str = "/run/stalltrace/stalltrace.sock";
/// Requests are small; anything longer is refused without being buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Status,
    Conns {
        #[serde(default)]
        filter: Filter,
    },
    Stalls {
        #[serde(default)]
        filter: Filter,
        #[serde(default)]
        older_than_ms: Option<u64>,
    },
    Watch {
        #[serde(default)]
        filter: Filter,
    },
    /// One connection's details and stall timeline.
    Show {
        id: u64,
    },
    /// Request groups ranked by over-representation among stalls.
    Why {
        #[serde(default)]
        filter: Filter,
    },
}

/// Selects connections; every given criterion must match. Also the CLI's filter flags.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only connections of this process id.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Only connections of processes with this executable name (comm, at most 15 characters).
    #[arg(long, value_name = "NAME", value_parser = parse_comm)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Only connections with this local or peer port.
    #[arg(long, value_name = "PORT")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Only connections in this network namespace: its inode, as `ls -Li /proc/PID/ns/net` or
    /// `ip netns list-id` … `stat -L -c %i /run/netns/NAME` give it (`network.netns`).
    #[arg(long, value_name = "INODE", value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// Only connections of processes in this cgroup or below it: a cgroup v2 path
    /// (`/system.slice/nginx.service`, `/kubepods.slice`) or a cgroup id (`cgroup.id`).
    #[arg(long, value_name = "PATH|ID", value_parser = parse_cgroup)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Only connections of processes in this container: its id (docker, containerd, cri-o,
    /// podman), or an unambiguous prefix of it as `docker ps` shows (at least 4 digits).
    #[arg(long, value_name = "ID", value_parser = parse_container)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Only Unix domain socket connections whose path matches this shell pattern (`*`, `?`,
    /// `[...]`; `*` also matches `/`). The path is the name of the bound end (the listener's,
    /// which accepted connections share); abstract names start with `@`. Quote it from the shell.
    #[arg(long, value_name = "GLOB", value_parser = PathGlob::parse)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathGlob>,
}

/// A compiled `--path` pattern, carried as its text in requests. A request whose pattern does
/// not compile is refused as it is decoded (`bad_request`), like any malformed argument.
#[derive(Debug, Clone)]
pub struct PathGlob(glob::Pattern);

impl PathGlob {
    pub fn parse(text: &str) -> Result<Self, String> {
        glob::Pattern::new(text)
            .map(Self)
            .map_err(|err| format!("`{text}` is not a valid path pattern: {err}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for PathGlob {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for PathGlob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PathGlob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An executable name as the kernel keeps it: a longer one would silently match nothing.
pub fn parse_comm(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 15 {
        return Err(format!(
            "`{text}` cannot be a process name: the kernel keeps 1 to 15 bytes of it (comm); \
             use its first 15 characters"
        ));
    }
    Ok(text.to_owned())
}

/// A cgroup path (absolute) or id, as `--cgroup` takes it.
pub fn parse_cgroup(text: &str) -> Result<String, String> {
    if text.starts_with('/') || text.parse::<u64>().is_ok_and(|id| id > 0) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` is neither a cgroup path (it starts with `/`, as in \
             /proc/PID/cgroup: `/system.slice/nginx.service`) nor a cgroup id (a number)"
        ))
    }
}

/// A container id or a prefix of it, as `--container` takes it: 4 to 64 hexadecimal digits.
pub fn parse_container(text: &str) -> Result<String, String> {
    if (4..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{text}` is not a container id: give 4 to 64 hexadecimal digits of it (the \
             12 `docker ps` shows will do)"
        ))
    }
}

impl Filter {
    pub fn matches(&self, pid: u32, comm: &str, endpoints: &Endpoints) -> bool {
        self.pid.is_none_or(|want| want == pid)
            && self.comm.as_deref().is_none_or(|want| want == comm)
            && self.port.is_none_or(|want| endpoints.has_port(want))
            && self.netns.is_none_or(|want| want == endpoints.netns)
    }

    /// Whether the filter selects on the owner's cgroup (`--cgroup`, `--container`): then
    /// [`Filter::matches_cgroup`] must hold too.
    pub fn selects_cgroup(&self) -> bool {
        self.cgroup.is_some() || self.container.is_some()
    }

    /// The `--cgroup` and `--container` criteria, for an owner in cgroup `id` whose path is
    /// `path` (`None`: not resolved, which selects nothing but an id given as such).
    pub fn matches_cgroup(&self, id: u64, path: Option<&str>) -> bool {
        let cgroup = self
            .cgroup
            .as_deref()
            .is_none_or(|want| match want.parse::<u64>() {
                Ok(want) => want == id,
                Err(_) => path.is_some_and(|path| crate::cgroup::is_within(path, want)),
            });
        let container = self.container.as_deref().is_none_or(|want| {
            path.and_then(crate::cgroup::container_id)
                .is_some_and(|container| container.starts_with(want))
        });
        cgroup && container
    }

    /// The `path` criterion, for a connection with this Unix path (`None`: not a Unix
    /// connection, which a `path` filter never selects).
    pub fn matches_path(&self, path: Option<&str>) -> bool {
        match &self.path {
            None => true,
            Some(glob) => path.is_some_and(|path| glob.0.matches(path)),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Kept as raw JSON: answers listing many connections are serialized once, straight from
    /// their items, never built as a `Value` tree (which costs ~20× the text).
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    /// For people: what went wrong and what to do about it.
    pub message: String,
}

/// Machine-readable error codes (`error.code`), stable across versions.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not a known command, or arguments of the wrong shape.
    BadRequest,
    /// The request's `version` is not this daemon's.
    UnsupportedVersion,
    /// The request line exceeds [`MAX_REQUEST_BYTES`].
    TooLarge,
    /// No complete request line arrived in time.
    Timeout,
    /// Too many clients are connected.
    Busy,
    /// No such connection (`show`).
    NotFound,
    /// The daemon could not answer (shutting down).
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
            Self::NotFound => "not_found",
            Self::Internal => "internal",
        }
    }
}

display_as_str!(ErrorCode);

impl Response {
    pub fn ok(result: &impl Serialize) -> Self {
        Self {
            version: VERSION,
            ok: true,
            result: Some(serde_json::value::to_raw_value(result).expect("results serialize")),
            error: None,
        }
    }

    /// A success whose result is already serialized JSON.
    pub fn ok_raw(json: String) -> Self {
        Self {
            version: VERSION,
            ok: true,
            result: Some(RawValue::from_string(json).expect("valid JSON")),
            error: None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::failed(ApiError::new(code, message))
    }

    pub fn failed(error: ApiError) -> Self {
        Self {
            version: VERSION,
            ok: false,
            result: None,
            error: Some(error),
        }
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Parses a request line, or says what is wrong with it.
pub fn parse_request(line: &str) -> Result<Request, ApiError> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("not JSON: {e}")))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedVersion,
                format!("this daemon speaks API version {VERSION}, the request has {v}"),
            ));
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("missing \"version\" (this daemon speaks version {VERSION})"),
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::model::Transport;

    #[test]
    fn requests_round_trip() {
        let request = Request {
            version: VERSION,
            command: Command::Stalls {
                filter: Filter {
                    pid: Some(7),
                    port: Some(80),
                    ..Filter::default()
                },
                older_than_ms: Some(1500),
            },
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"command":"stalls","filter":{"pid":7,"port":80},"older_than_ms":1500}"#
        );
        assert_eq!(parse_request(&line).unwrap(), request);
        assert_eq!(
            parse_request(r#"{"version":1,"command":"status"}"#)
                .unwrap()
                .command,
            Command::Status
        );
    }

    #[test]
    fn malformed_requests_get_specific_errors() {
        let code = |line: &str| parse_request(line).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"status"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"version":99,"command":"status"}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(r#"{"version":1,"command":"reboot"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"version":1}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"version":1,"command":"conns","filter":{"pid":"x"}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"[1,2,3]"#), ErrorCode::BadRequest);
    }

    #[test]
    fn filters_match_all_given_criteria() {
        let endpoints = Endpoints {
            transport: Transport::Tcp,
            local: "127.0.0.1".parse().unwrap(),
            local_port: 8080,
            peer: "127.0.0.1".parse().unwrap(),
            peer_port: 50_000,
            netns: 4_026_531_840,
        };
        assert!(Filter::default().matches(1, "x", &endpoints));
        let filter = Filter {
            pid: Some(1),
            comm: Some("nginx".into()),
            port: Some(50_000),
            netns: Some(4_026_531_840),
            ..Filter::default()
        };
        assert!(filter.matches(1, "nginx", &endpoints));
        assert!(!filter.matches(2, "nginx", &endpoints));
        assert!(!filter.matches(1, "redis", &endpoints));
        let port = Filter {
            port: Some(9),
            ..Filter::default()
        };
        assert!(!port.matches(1, "nginx", &endpoints));
        // A Unix connection has no port.
        assert!(!port.matches(1, "nginx", &Endpoints::unix(10, 11)));
        let other_namespace = Filter {
            netns: Some(4_026_532_000),
            ..Filter::default()
        };
        assert!(!other_namespace.matches(1, "nginx", &endpoints));
    }

    #[test]
    fn cgroup_and_container_filters() {
        let id = "3f2a9c1b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3";
        let docker = format!("/system.slice/docker-{id}.scope");
        let by = |cgroup: Option<&str>, container: Option<&str>| Filter {
            cgroup: cgroup.map(|c| parse_cgroup(c).unwrap()),
            container: container.map(|c| parse_container(c).unwrap()),
            ..Filter::default()
        };
        assert!(!Filter::default().selects_cgroup());
        assert!(by(Some("/system.slice"), None).matches_cgroup(9, Some(&docker)));
        assert!(by(Some("9"), None).matches_cgroup(9, None));
        assert!(!by(Some("10"), None).matches_cgroup(9, Some(&docker)));
        assert!(!by(Some("/user.slice"), None).matches_cgroup(9, Some(&docker)));
        assert!(!by(Some("/system.slice"), None).matches_cgroup(9, None));
        assert!(by(None, Some("3F2A9C1B8E7D")).matches_cgroup(9, Some(&docker)));
        assert!(by(None, Some(id)).matches_cgroup(9, Some(&docker)));
        assert!(!by(None, Some("3f2b")).matches_cgroup(9, Some(&docker)));
        assert!(!by(None, Some("3f2a")).matches_cgroup(9, Some("/system.slice/x.service")));
        assert!(parse_cgroup("system.slice").is_err());
        assert!(parse_cgroup("0").is_err());
        assert!(parse_container("3f2").is_err());
        assert!(parse_container("docker-3f2a").is_err());
    }

    #[test]
    fn path_filters_glob_unix_paths_only() {
        let filter = |text: &str| Filter {
            path: Some(PathGlob::parse(text).unwrap()),
            ..Filter::default()
        };
        assert!(Filter::default().matches_path(None));
        assert!(filter("/run/php/*.sock").matches_path(Some("/run/php/php8.2-fpm.sock")));
        assert!(filter("/run/*").matches_path(Some("/run/php/fpm.sock")));
        assert!(filter("@app-*").matches_path(Some("@app-1")));
        assert!(!filter("/run/php/*.sock").matches_path(Some("/var/run/docker.sock")));
        assert!(
            !filter("*").matches_path(None),
            "TCP never matches a path filter"
        );
        assert!(PathGlob::parse("[").is_err());
        // Over the API, a bad pattern is a bad request, not a panic.
        let bad = parse_request(r#"{"version":1,"command":"conns","filter":{"path":"[x"}}"#);
        assert_eq!(bad.unwrap_err().code, ErrorCode::BadRequest);
        let good =
            parse_request(r#"{"version":1,"command":"conns","filter":{"path":"/run/*.sock"}}"#)
                .unwrap();
        let Command::Conns { filter } = good.command else {
            panic!("{good:?}")
        };
        assert!(filter.matches_path(Some("/run/a.sock")));
    }
}
