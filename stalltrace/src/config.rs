//! The daemon's configuration file (`--config`, TOML): a key for every flag of `stalltrace
//! daemon`, and `[[rule]]`s that set, per kind of traffic, another stall threshold, a severity,
//! or that stalls are ignored. Read at start (an invalid file stops the daemon, with the line
//! and the reason), by `stalltrace check-config`, and again on SIGHUP (rules and `stall_after`
//! only; an invalid file then keeps the rules in force).
use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{de::Error as _, Deserialize, Deserializer};
use stalltrace_core::{duration::HumanDuration, tracker::model::Transport};

use crate::cli::{self, HooksArg, LogLevel, MetricsLabel};

/// Configuration files larger than this are refused (a rules file is a few KiB).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Rules at most: each stall is matched against them in order, on the event loop.
pub const MAX_RULES: usize = 1000;

/// The file's keys. Each is the flag of the same name (`stall_after` is `--stall-after`);
/// `None`: not in the file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, deserialize_with = "threshold")]
    pub stall_after: Option<HumanDuration>,
    pub socket: Option<PathBuf>,
    pub events_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "mode")]
    pub events_file_mode: Option<u32>,
    #[serde(default, deserialize_with = "size")]
    pub events_file_max_size: Option<u64>,
    #[serde(default, deserialize_with = "in_range::<_, 1, 1000>")]
    pub events_file_keep: Option<u32>,
    #[serde(default, deserialize_with = "size")]
    pub events_buffer: Option<u64>,
    pub socket_group: Option<String>,
    #[serde(default, deserialize_with = "in_range::<_, 1, 16_777_216>")]
    pub max_conns: Option<u32>,
    #[serde(default, deserialize_with = "ring_size")]
    pub ring_buffer_size: Option<u32>,
    #[serde(default, deserialize_with = "in_range::<_, 0, 64>")]
    pub capture_bytes: Option<u32>,
    pub capture_raw: Option<bool>,
    pub bpf_stats: Option<bool>,
    pub log_level: Option<LogLevel>,
    pub capture_preview: Option<bool>,
    pub no_path_templates: Option<bool>,
    pub metrics_address: Option<SocketAddr>,
    pub metrics_labels: Option<Vec<MetricsLabel>>,
    pub hooks: Option<HooksArg>,
    pub libssl: Option<bool>,
    pub btf: Option<PathBuf>,
    #[serde(default)]
    pub rule: Vec<toml::Spanned<RuleSpec>>,
}

/// The keys of [`FileConfig`], which are the daemon's flags (a unit test checks both ways).
pub const KEYS: &[&str] = &[
    "stall_after",
    "socket",
    "events_file",
    "events_file_mode",
    "events_file_max_size",
    "events_file_keep",
    "events_buffer",
    "socket_group",
    "max_conns",
    "ring_buffer_size",
    "capture_bytes",
    "capture_raw",
    "bpf_stats",
    "log_level",
    "capture_preview",
    "no_path_templates",
    "metrics_address",
    "metrics_labels",
    "hooks",
    "libssl",
    "btf",
];

/// One `[[rule]]` as written: what it matches (all given keys must match) and what it does.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A name for logs and `check-config` (default: `rule N`).
    pub name: Option<String>,
    /// Executable name (comm, at most 15 characters), glob (`python3*`).
    #[serde(default, deserialize_with = "glob")]
    pub comm: Option<Glob>,
    /// Executable path (`/proc/PID/exe`, read by the diagnosis worker's first look), glob.
    #[serde(default, deserialize_with = "glob")]
    pub exe: Option<Glob>,
    pub local_port: Option<u16>,
    pub peer_port: Option<u16>,
    /// Peer address or network (`10.0.0.7`, `10.0.0.0/8`, `fd00::/8`).
    #[serde(default, deserialize_with = "network")]
    pub peer: Option<ipnet::IpNet>,
    pub transport: Option<Transport>,
    /// A Unix connection's path (the bound end's name; `@name` for an abstract one), glob.
    #[serde(default, deserialize_with = "glob")]
    pub path: Option<Glob>,
    /// cgroup path (from /proc/PID/cgroup, read by the diagnosis worker's first look; the
    /// unified v2 path, or the deeper v1 one on hybrid hosts), glob: container ids are in it.
    #[serde(default, deserialize_with = "glob")]
    pub cgroup: Option<Glob>,
    /// Request signature as reported (`redis BLPOP`, `GET /v1/watch/{id}`), glob.
    #[serde(default, deserialize_with = "glob")]
    pub request: Option<Glob>,
    #[serde(default, deserialize_with = "threshold")]
    pub stall_after: Option<HumanDuration>,
    pub ignore: Option<bool>,
    pub severity: Option<Severity>,
}

/// `stall.severity` of the stalls a rule matches.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// A glob pattern (`*`, `?`, `[a-z]`) with its text.
#[derive(Debug, Clone)]
pub struct Glob {
    pub text: String,
    pattern: glob::Pattern,
}

impl Glob {
    pub fn matches(&self, text: &str) -> bool {
        self.pattern.matches(text)
    }
}

/// A rule ready to match: its spec, name and the line it starts on.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub line: usize,
    pub spec: RuleSpec,
}

/// What is known of a stall when it starts, for rules to match on.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub transport: Transport,
    pub comm: &'a str,
    pub local_port: u16,
    pub peer: IpAddr,
    pub peer_port: u16,
    /// A Unix connection's path ("" for a socketpair); `None` for other transports.
    pub path: Option<&'a str>,
    /// The request signature, if the request was captured and recognized.
    pub request: Option<&'a str>,
    /// The executable's path, if the diagnosis worker's first look came before the stall was
    /// reported (`/proc/PID/exe`).
    pub exe: Option<&'a str>,
    /// The process's cgroup v2 path, known like `exe`.
    pub cgroup: Option<&'a str>,
}

impl Rule {
    /// Whether every key the rule gives matches `subject`. An `exe` or `cgroup` not known
    /// (no first look in time) matches nothing.
    pub fn matches(&self, subject: &Subject<'_>) -> bool {
        let spec = &self.spec;
        spec.exe
            .as_ref()
            .is_none_or(|g| subject.exe.is_some_and(|exe| g.matches(exe)))
            && spec
                .cgroup
                .as_ref()
                .is_none_or(|g| subject.cgroup.is_some_and(|c| g.matches(c)))
            && spec.transport.is_none_or(|t| t == subject.transport)
            && spec.comm.as_ref().is_none_or(|g| g.matches(subject.comm))
            && spec.local_port.is_none_or(|p| p == subject.local_port)
            && spec.peer_port.is_none_or(|p| p == subject.peer_port)
            && spec
                .peer
                .is_none_or(|net| subject.path.is_none() && net.contains(&subject.peer))
            && spec
                .path
                .as_ref()
                .is_none_or(|g| subject.path.is_some_and(|path| g.matches(path)))
            && spec
                .request
                .as_ref()
                .is_none_or(|g| subject.request.is_some_and(|r| g.matches(r)))
    }
}

/// What the rules decide for one stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Index of the rule that matched.
    pub rule: Option<usize>,
    /// Report the stall only once quiet this long (ns); `None`: the daemon's `stall_after`.
    pub stall_after_ns: Option<u64>,
    pub ignore: bool,
    pub severity: Option<Severity>,
}

/// What a rule adds to the events of a stall it matched (`stall.severity`, `stall.rule`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotation {
    pub severity: Option<Severity>,
    /// The rule's name.
    pub rule: Option<String>,
}

/// The rules in force, in file order.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
}

impl Rules {
    /// The first rule (in file order) that matches decides; no match: report at the default
    /// threshold.
    pub fn decide(&self, subject: &Subject<'_>) -> Decision {
        let Some((index, rule)) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(subject))
        else {
            return Decision::default();
        };
        Decision {
            rule: Some(index),
            stall_after_ns: rule.spec.stall_after.map(|d| d.0.as_nanos() as u64),
            ignore: rule.spec.ignore == Some(true),
            severity: rule.spec.severity,
        }
    }

    /// The smallest threshold any rule sets.
    pub fn min_stall_after(&self) -> Option<Duration> {
        self.rules
            .iter()
            .filter_map(|rule| rule.spec.stall_after.map(|d| d.0))
            .min()
    }
}

/// A configuration file, parsed and checked.
#[derive(Debug, Default)]
pub struct Loaded {
    pub file: FileConfig,
    pub rules: Rules,
    /// The keys it sets, sorted (`[[rule]]` aside).
    pub keys: Vec<String>,
}

/// What `check-config` says of a valid file: the keys it sets, each rule (what it matches,
/// what it does), and the threshold the kernel will run with.
pub fn describe(path: &Path, loaded: &Loaded) -> Vec<String> {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut lines = vec![format!(
        "{}: valid: {}, {}",
        path.display(),
        plural(loaded.keys.len(), "key"),
        plural(loaded.rules.rules.len(), "rule")
    )];
    if !loaded.keys.is_empty() {
        lines.push(format!("keys: {}", loaded.keys.join(", ")));
    }
    for rule in &loaded.rules.rules {
        let spec = &rule.spec;
        let mut matches = Vec::new();
        let mut add = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                matches.push(format!("{key}={value}"));
            }
        };
        add("comm", spec.comm.as_ref().map(|g| g.text.clone()));
        add("exe", spec.exe.as_ref().map(|g| g.text.clone()));
        add("local_port", spec.local_port.map(|p| p.to_string()));
        add("peer_port", spec.peer_port.map(|p| p.to_string()));
        add("peer", spec.peer.map(|n| n.to_string()));
        add(
            "transport",
            spec.transport.map(|t| format!("{t:?}").to_lowercase()),
        );
        add("cgroup", spec.cgroup.as_ref().map(|g| g.text.clone()));
        add("request", spec.request.as_ref().map(|g| g.text.clone()));
        let action = if spec.ignore == Some(true) {
            "ignore (counted in status and metrics, not reported)".to_owned()
        } else {
            let mut parts = Vec::new();
            if let Some(after) = spec.stall_after {
                parts.push(format!("stall_after {after}"));
            }
            if let Some(severity) = spec.severity {
                parts.push(format!("severity {}", severity.as_str()));
            }
            parts.join(", ")
        };
        lines.push(format!(
            "rule {:?} (line {}): {} -> {action}",
            rule.name,
            rule.line,
            matches.join(" ")
        ));
    }
    if let Some(lowest) = loaded.rules.min_stall_after() {
        let default = loaded
            .file
            .stall_after
            .map_or(Duration::from_secs(5), |d| d.0);
        if lowest < default {
            lines.push(format!(
                "note: a rule's stall_after ({}) is below stall_after ({}): the kernel will run \
                 at {}, and stalls matching no such rule are held until {}",
                HumanDuration(lowest),
                HumanDuration(default),
                HumanDuration(lowest),
                HumanDuration(default)
            ));
        }
    }
    lines
}

/// Reads and checks `path`. Errors name the file, the line and the reason.
pub fn load(path: &Path) -> Result<Loaded> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if metadata.len() > MAX_FILE_BYTES {
        bail!(
            "{}: {} bytes, more than the {} a configuration file may have",
            path.display(),
            metadata.len(),
            MAX_FILE_BYTES
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
    parse(&text).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))
}

/// Parses and checks the text of a configuration file; errors give the line and the reason.
pub fn parse(text: &str) -> std::result::Result<Loaded, String> {
    let file: FileConfig = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
    if file.rule.len() > MAX_RULES {
        return Err(format!(
            "{} rules, more than the {MAX_RULES} allowed",
            file.rule.len()
        ));
    }
    let mut rules = Vec::with_capacity(file.rule.len());
    for (index, spanned) in file.rule.iter().enumerate() {
        let line = line_of(text, spanned.span());
        let spec = spanned.get_ref().clone();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("rule {}", index + 1));
        check_rule(&spec).map_err(|reason| format!("line {line}: [[rule]] {name:?}: {reason}"))?;
        rules.push(Rule { name, line, spec });
    }
    for key in [
        "events_file_mode",
        "events_file_max_size",
        "events_file_keep",
    ] {
        let given = match key {
            "events_file_mode" => file.events_file_mode.is_some(),
            "events_file_max_size" => file.events_file_max_size.is_some(),
            _ => file.events_file_keep.is_some(),
        };
        if given && file.events_file.is_none() {
            return Err(format!(
                "{key} applies to an events file: set events_file too"
            ));
        }
    }
    let keys = text
        .parse::<toml::Table>()
        .map(|table| table.keys().filter(|k| *k != "rule").cloned().collect())
        .unwrap_or_default();
    Ok(Loaded {
        file,
        rules: Rules { rules },
        keys,
    })
}

fn check_rule(spec: &RuleSpec) -> std::result::Result<(), String> {
    let matchers = [
        spec.comm.is_some(),
        spec.exe.is_some(),
        spec.local_port.is_some(),
        spec.peer_port.is_some(),
        spec.peer.is_some(),
        spec.transport.is_some(),
        spec.path.is_some(),
        spec.cgroup.is_some(),
        spec.request.is_some(),
    ];
    if !matchers.contains(&true) {
        return Err(
            "matches every stall: give at least one of comm, exe, local_port, peer_port, \
             peer, transport, path, cgroup, request (for every stall, set stall_after itself)"
                .into(),
        );
    }
    if spec.stall_after.is_none() && spec.ignore.is_none() && spec.severity.is_none() {
        return Err("does nothing: set stall_after, ignore = true or severity".into());
    }
    if spec.ignore == Some(true) && (spec.stall_after.is_some() || spec.severity.is_some()) {
        return Err(
            "ignore = true reports nothing, so stall_after and severity cannot apply".into(),
        );
    }
    if spec
        .comm
        .as_ref()
        .is_some_and(|g| g.text.len() > 15 && !g.text.contains('*'))
    {
        return Err("comm is at most 15 characters (the kernel truncates names)".into());
    }
    Ok(())
}

impl FileConfig {
    /// Takes the file's values for the flags not given on the command line (`given(id)`:
    /// whether flag `id` was).
    pub fn apply(
        self,
        args: &mut cli::DaemonArgs,
        socket: &mut PathBuf,
        given: impl Fn(&str) -> bool,
    ) {
        macro_rules! take {
            ($($key:ident),+ $(,)?) => {$(
                if let Some(value) = self.$key {
                    if !given(stringify!($key)) {
                        args.$key = value;
                    }
                }
            )+};
        }
        macro_rules! take_some {
            ($($key:ident),+ $(,)?) => {$(
                if let Some(value) = self.$key {
                    if !given(stringify!($key)) {
                        args.$key = Some(value);
                    }
                }
            )+};
        }
        take!(
            stall_after,
            events_file_mode,
            events_file_keep,
            events_buffer,
            max_conns,
            ring_buffer_size,
            capture_bytes,
            capture_raw,
            bpf_stats,
            log_level,
            capture_preview,
            no_path_templates,
            metrics_labels,
            hooks,
            libssl,
        );
        take_some!(
            events_file,
            events_file_max_size,
            socket_group,
            metrics_address,
            btf
        );
        if let Some(path) = self.socket {
            if !given("socket") {
                *socket = path;
            }
        }
    }
}

/// A TOML error as `line L, column C: reason`.
fn toml_error(text: &str, err: &toml::de::Error) -> String {
    let reason = err.message().trim_end();
    match err.span() {
        Some(span) => {
            let line = line_of(text, span.clone());
            let column = text[..span.start.min(text.len())]
                .rsplit('\n')
                .next()
                .map_or(1, |l| l.chars().count() + 1);
            format!("line {line}, column {column}: {reason}")
        }
        None => reason.to_owned(),
    }
}

/// The 1-based line where `span` starts.
fn line_of(text: &str, span: Range<usize>) -> usize {
    text.as_bytes()[..span.start.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A string or a number, as size and mode values may be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    String(String),
    Integer(i64),
}

fn parsed<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    parse: fn(&str) -> std::result::Result<T, String>,
    integers: bool,
) -> std::result::Result<Option<T>, D::Error> {
    let text = match Text::deserialize(deserializer)? {
        Text::String(text) => text,
        Text::Integer(n) if integers => n.to_string(),
        Text::Integer(n) => {
            return Err(D::Error::custom(format!(
                "write this as a string (\"{n}\"), with its unit"
            )))
        }
    };
    parse(&text).map(Some).map_err(D::Error::custom)
}

fn threshold<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<HumanDuration>, D::Error> {
    parsed(d, cli::parse_threshold, false)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    parsed(d, cli::parse_size, true)
}

fn ring_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    parsed(d, cli::parse_ring_size, true)
}

fn mode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    parsed(d, cli::parse_mode, false)
}

fn in_range<'de, D: Deserializer<'de>, const MIN: u32, const MAX: u32>(
    d: D,
) -> std::result::Result<Option<u32>, D::Error> {
    let n = i64::deserialize(d)?;
    if n < i64::from(MIN) || n > i64::from(MAX) {
        return Err(D::Error::custom(format!(
            "{n} is out of range: {MIN} to {MAX}"
        )));
    }
    Ok(Some(n as u32))
}

fn glob<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Glob>, D::Error> {
    let text = String::deserialize(d)?;
    let pattern = glob::Pattern::new(&text)
        .map_err(|err| D::Error::custom(format!("invalid pattern {text:?}: {}", err.msg)))?;
    Ok(Some(Glob { text, pattern }))
}

fn network<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<ipnet::IpNet>, D::Error> {
    let text = String::deserialize(d)?;
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        // `10.1.2.3/8` is most likely a typo for `10.0.0.0/8`.
        if net.trunc() != net {
            return Err(D::Error::custom(format!(
                "{text} has host bits set: did you mean {}?",
                net.trunc()
            )));
        }
        return Ok(Some(net));
    }
    text.parse::<IpAddr>()
        .map(|ip| Some(ipnet::IpNet::from(ip.to_canonical())))
        .map_err(|_| {
            D::Error::custom(format!(
                "{text:?} is not an address or network (e.g. 10.0.0.7, 10.0.0.0/8, fd00::/8)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn subject<'a>(
        comm: &'a str,
        local_port: u16,
        peer_port: u16,
        request: Option<&'a str>,
    ) -> Subject<'a> {
        Subject {
            transport: Transport::Tcp,
            comm,
            local_port,
            peer: "10.1.2.3".parse().unwrap(),
            peer_port,
            path: None,
            request,
            exe: Some("/usr/bin/python3.11"),
            cgroup: Some("/system.slice/app.service"),
        }
    }

    #[test]
    fn every_daemon_flag_is_a_key_and_every_key_a_flag() {
        let command = cli::Cli::command();
        let daemon = command.find_subcommand("daemon").unwrap();
        // The daemon's own flags and the global ones (--socket).
        let global = command.get_arguments().filter(|arg| arg.is_global_set());
        let mut flags: Vec<String> = daemon
            .get_arguments()
            .chain(global)
            .map(|arg| arg.get_id().to_string())
            .filter(|id| !["config", "help", "version"].contains(&id.as_str()))
            .collect();
        flags.sort();
        let mut keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(flags, keys);
        // Each key is known to the file's parser (an unknown key would be refused).
        for key in KEYS {
            let err = parse(&format!("{key} = {{}}\n")).err().unwrap_or_default();
            assert!(!err.contains("unknown field"), "{key}: {err}");
        }
    }

    #[test]
    fn keys_take_the_flags_values() {
        let loaded = parse(
            "stall_after = \"2s\"\nevents_file = \"/var/log/s.ndjson\"\n\
             events_file_max_size = \"100MiB\"\nevents_file_mode = \"0640\"\nmax_conns = 1000\n\
             ring_buffer_size = 8388608\nlog_level = \"debug\"\ncapture_raw = true\n\
             metrics_address = \"127.0.0.1:9464\"\nmetrics_labels = [\"comm\", \"port\"]\n",
        )
        .unwrap();
        let file = loaded.file;
        assert_eq!(file.stall_after.unwrap().0, Duration::from_secs(2));
        assert_eq!(file.events_file_max_size, Some(100 << 20));
        assert_eq!(file.events_file_mode, Some(0o640));
        assert_eq!(file.max_conns, Some(1000));
        assert_eq!(file.ring_buffer_size, Some(8 << 20));
        assert_eq!(file.log_level, Some(LogLevel::Debug));
        assert_eq!(file.capture_raw, Some(true));
        assert_eq!(
            file.metrics_labels,
            Some(vec![MetricsLabel::Comm, MetricsLabel::Port])
        );
    }

    #[test]
    fn errors_give_the_line_and_the_reason() {
        let cases = [
            (
                "stall_after = \"2s\"\nstall_afer = \"3s\"\n",
                "line 2",
                "unknown field `stall_afer`",
            ),
            ("stall_after = \"soon\"\n", "line 1", "examples"),
            ("stall_after = \"0s\"\n", "line 1", "greater than zero"),
            ("max_conns = 0\n", "line 1", "out of range"),
            ("events_file_mode = 640\n", "line 1", "as a string"),
            (
                "\n\n[[rule]]\ncomm = \"redis-server\"\n",
                "line 3",
                "does nothing",
            ),
            (
                "[[rule]]\nstall_after = \"1m\"\n",
                "line 1",
                "matches every stall",
            ),
            (
                "[[rule]]\npeer = \"10.1.2.3/8\"\nignore = true\n",
                "line 2",
                "did you mean 10.0.0.0/8",
            ),
            (
                "[[rule]]\npeer = \"example.com\"\nignore = true\n",
                "line 2",
                "not an address",
            ),
            (
                "[[rule]]\nlocal_port = 70000\nignore = true\n",
                "line 2",
                "",
            ),
            (
                "[[rule]]\ncomm = \"a\"\nignore = true\nseverity = \"info\"\n",
                "line 1",
                "cannot apply",
            ),
            (
                "[[rule]]\ncomm = \"a\"\nseverity = \"panic\"\n",
                "line 3",
                "unknown variant",
            ),
            (
                "[[rule]]\nrequest = \"[\"\nignore = true\n",
                "line 2",
                "invalid pattern",
            ),
            ("events_file_keep = 3\n", "", "set events_file too"),
            ("stall_after = \n", "line 1", ""),
        ];
        for (text, line, reason) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.contains(line) && err.contains(reason),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let loaded = parse(
            "[[rule]]\nname = \"queue workers\"\ncomm = \"worker*\"\nrequest = \"redis BLPOP\"\n\
             stall_after = \"45s\"\n\n\
             [[rule]]\nname = \"consul watches\"\npeer_port = 8500\nrequest = \"GET /v1/*\"\n\
             ignore = true\n\n\
             [[rule]]\npeer = \"10.0.0.0/8\"\nseverity = \"critical\"\n",
        )
        .unwrap();
        let rules = loaded.rules;
        assert_eq!(rules.rules[1].line, 7);
        let blpop = rules.decide(&subject("worker-3", 40000, 6379, Some("redis BLPOP")));
        assert_eq!(blpop.rule, Some(0));
        assert_eq!(blpop.stall_after_ns, Some(45_000_000_000));
        assert!(!blpop.ignore);
        // Same worker, another command: the next matching rule (by peer network).
        let get = rules.decide(&subject("worker-3", 40000, 6379, Some("redis GET")));
        assert_eq!(get.rule, Some(2));
        assert_eq!(get.severity, Some(Severity::Critical));
        let consul = rules.decide(&subject("app", 40000, 8500, Some("GET /v1/kv/config")));
        assert!(consul.ignore);
        // No request captured: a rule on the request does not match.
        assert_eq!(
            rules.decide(&subject("worker", 1, 6379, None)).rule,
            Some(2)
        );
        let elsewhere = Subject {
            peer: "192.168.1.1".parse().unwrap(),
            ..subject("app", 1, 2, None)
        };
        assert_eq!(rules.decide(&elsewhere), Decision::default());
        assert_eq!(rules.min_stall_after(), Some(Duration::from_secs(45)));
    }

    #[test]
    fn exe_matches_the_executable_path_once_known() {
        let loaded = parse("[[rule]]\nexe = \"/usr/bin/python3*\"\nignore = true\n").unwrap();
        let rules = loaded.rules;
        assert!(rules.decide(&subject("app", 1, 2, None)).ignore);
        let elsewhere = Subject {
            exe: Some("/opt/app/bin/server"),
            ..subject("app", 1, 2, None)
        };
        assert!(!rules.decide(&elsewhere).ignore);
        let unknown = Subject {
            exe: None,
            ..subject("app", 1, 2, None)
        };
        assert!(
            !rules.decide(&unknown).ignore,
            "an executable not known (no first look in time) matches no exe rule"
        );
    }

    #[test]
    fn cgroup_and_transport_match() {
        let loaded = parse(
            "[[rule]]\ncomm = \"app\"\ntransport = \"udp\"\nignore = true\n\
             [[rule]]\ncomm = \"app\"\ncgroup = \"/system.slice/*\"\ntransport = \"tcp\"\n\
             ignore = true\n[[rule]]\ncomm = \"app\"\ntransport = \"unix\"\nignore = true\n",
        )
        .unwrap();
        let rules = loaded.rules;
        // Each transport's rule applies to its stalls only.
        let over_udp = Subject {
            transport: Transport::Udp,
            ..subject("app", 1, 53, Some("dns A example.com"))
        };
        assert_eq!(rules.decide(&over_udp).rule, Some(0));
        let over_unix = Subject {
            transport: Transport::Unix,
            ..subject("app", 0, 0, None)
        };
        assert_eq!(rules.decide(&over_unix).rule, Some(2));
        assert_eq!(rules.decide(&subject("app", 1, 2, None)).rule, Some(1));
        let in_docker = Subject {
            cgroup: Some("/docker/3f2a9c"),
            ..subject("app", 1, 2, None)
        };
        assert_eq!(rules.decide(&in_docker).rule, None);
    }

    #[test]
    fn unix_rules_match_the_socket_path() {
        let loaded = parse(
            "[[rule]]\npath = \"/run/systemd/journal/*\"\nignore = true\n\
             [[rule]]\ntransport = \"unix\"\nseverity = \"info\"\n\
             [[rule]]\npeer = \"::/0\"\nseverity = \"critical\"\n",
        )
        .unwrap();
        let rules = loaded.rules;
        let unix = |path| Subject {
            transport: Transport::Unix,
            path: Some(path),
            local_port: 0,
            peer_port: 0,
            peer: "::1".parse().unwrap(),
            ..subject("app", 0, 0, None)
        };
        assert_eq!(
            rules.decide(&unix("/run/systemd/journal/stdout")).rule,
            Some(0)
        );
        assert_eq!(rules.decide(&unix("/run/php/fpm.sock")).rule, Some(1));
        // A TCP stall has no path; a Unix one has no peer address for `peer` to match.
        let tcp = Subject {
            peer: "::1".parse().unwrap(),
            ..subject("app", 1, 2, None)
        };
        assert_eq!(rules.decide(&tcp).rule, Some(2));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/config.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/config.md has a TOML example");
        let loaded = parse(example).unwrap();
        assert_eq!(loaded.rules.rules.len(), 4);
        let lines = describe(Path::new("/etc/stalltrace/stalltrace.toml"), &loaded);
        // The doc shows what check-config prints for it.
        for line in &lines {
            assert!(doc.contains(line.as_str()), "docs/config.md lacks {line:?}");
        }
    }

    #[test]
    fn files_are_checked_before_they_are_read() {
        let err = load(Path::new("/nonexistent/stalltrace.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/stalltrace.toml"));
        let err = load(Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
