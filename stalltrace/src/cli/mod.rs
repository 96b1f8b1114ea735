//! Command-line interface: `stalltrace daemon` runs the tracer; every other command is a client
//! of its API. Clients only render what the daemon answers: they must not compute verdicts.
pub mod client;
pub mod generate;
mod items;
pub mod table;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use stalltrace_core::{api, duration::HumanDuration};

#[derive(Parser, Debug)]
#[command(
    name = "stalltrace",
    version,
    about = "Find requests that never complete: eBPF tracing of TCP, UDP and Unix socket \
             connections that go quiet with a request outstanding",
    long_about = "stalltrace follows every TCP connection, UDP exchange and Unix stream socket on \
                  the host from the kernel (eBPF on socket tracepoints) and flags the ones that \
                  go quiet without closing while a request is outstanding: a server that read a \
                  request and never answered (unanswered_request), a client that sent one and \
                  never heard back (awaiting_response), a connect() that never completes \
                  (connect_pending), an HTTP/1.x response that stopped short of its \
                  Content-Length or last chunk (response_incomplete). Idle keep-alive \
                  connections, streams and one-way messages are never flagged.\n\n\
                  Start the daemon as root, then query it from any user allowed on its socket.",
    after_help = "Examples:\n  \
        sudo stalltrace daemon --stall-after 2s --events-file /var/log/stalltrace.ndjson\n  \
        stalltrace stalls                  # open stalls, oldest first\n  \
        stalltrace stalls --older-than 30s -o json\n  \
        stalltrace stalls --fail-if-any    # exit status 2 when a stall is open (scripts)\n  \
        stalltrace conns --comm nginx      # live connections of nginx\n  \
        stalltrace watch --port 5432       # live NDJSON events touching port 5432\n  \
        stalltrace watch -o table          # one readable line per event\n  \
        stalltrace check-config /etc/stalltrace/stalltrace.toml\n\n\
        Text output is coloured only on a terminal, never with NO_COLOR set; tables wrap to \
        the terminal's width.\n\n\
        Exit status:\n  \
        0  success\n  \
        1  error: the daemon is unreachable, refused the request, or failed to start; an \
        invalid configuration file\n  \
        2  usage error: unknown command or flag, bad value, flag that does not apply; or \
        `stalls --fail-if-any` found open stalls"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the tracer (needs root): load the eBPF programs, track connections, stream events.
    #[command(
        after_help = "Events are NDJSON, one object per line (see docs/events.md): \
        conn.open, conn.close, stall.start, stall.update, stall.end, and loss whenever anything \
        was dropped.\n\
        Stop with SIGINT or SIGTERM: the programs are detached and the events file flushed. \
        SIGHUP reopens the events file (for log rotation) and reloads the rules of --config \
        (and its stall_after), keeping every connection and stall; it never stops the daemon.\n\
        Every flag is also a key of the --config file (same name, with underscores); a flag \
        given on the command line overrides the file. See docs/config.md."
    )]
    Daemon(DaemonArgs),
    /// Show the daemon's hooks, uptime, connections tracked, events seen and events lost.
    Status(OutputArgs),
    /// List live connections and their state: active (request outstanding or response under
    /// way), idle, stalled, stream (one-way messages), peer_closed, closing, unknown (adopted,
    /// its exchange not known yet), or the rule state of a held or ignored stall.
    Conns {
        #[command(flatten)]
        filter: api::Filter,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List open stalls with their kind and age, oldest first.
    Stalls {
        /// Only stalls quiet for at least this long (e.g. 30s, 2m).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<HumanDuration>,
        /// Exit with status 2 when any stall is listed (after printing them): for scripts
        /// and health checks.
        #[arg(long)]
        fail_if_any: bool,
        #[command(flatten)]
        filter: api::Filter,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Stream the daemon's events until interrupted: NDJSON lines as the daemon writes them,
    /// one readable line per event (`-o table`), or YAML documents.
    Watch {
        #[command(flatten)]
        filter: api::Filter,
        /// Output format: the NDJSON lines (json), one line per event (table), or one YAML
        /// document per event (yaml).
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// One connection in detail: identity, counters, its open stall with the full diagnosis
    /// (thread, blame chain, TCP signals, request) and its stall timeline.
    Show {
        /// The connection id (`conn.id` in events, the ID column of `conns` and `stalls`).
        id: u64,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// What is different about the requests that stall: request groups (process, endpoint,
    /// signature) ranked by their share of stalls against their share of completed requests.
    #[command(
        after_help = "Groups count requests per executable name across processes (and their \
        restarts): select them with --comm or --port; --pid is refused."
    )]
    Why {
        #[command(flatten)]
        filter: WhyFilter,
        /// Rows shown in the table, at least 1 (all with -o json).
        #[arg(long, default_value = "15")]
        limit: std::num::NonZeroUsize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print a shell completion script to stdout (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:\n  \
        stalltrace completions bash > /etc/bash_completion.d/stalltrace\n  \
        stalltrace completions zsh > /usr/local/share/zsh/site-functions/_stalltrace\n  \
        stalltrace completions fish > ~/.config/fish/completions/stalltrace.fish\n\
        The Debian package installs the bash, zsh and fish scripts already.")]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Validate a configuration file (TOML) without starting the daemon: every key and rule,
    /// with the line and the reason of the first error. Exit status 0 when it is valid.
    #[command(name = "check-config")]
    CheckConfig {
        /// The file, e.g. /etc/stalltrace/stalltrace.toml.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Read settings and `[[rule]]`s from this TOML file (see docs/config.md). Flags given on
    /// the command line override its keys. An invalid file is refused at start with the line
    /// and the reason; SIGHUP reloads its rules.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (off by default). ADDR is an IP
    /// address: use loopback (127.0.0.1:9464, [::1]:9464) unless the network in front of it is
    /// trusted, as the metrics say what stalls on this host.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Extra labels on the stall metrics, comma-separated: `comm` (executable name) and
    /// `port` (the server's port: local for servers, peer for clients). Each adds a series per
    /// value; past 500 label sets per metric, new values are labelled `other`.
    #[arg(long, value_name = "LABELS", value_delimiter = ',', value_enum)]
    pub metrics_labels: Vec<MetricsLabel>,

    /// How long a connection with a request outstanding may stay quiet before it is a stall.
    /// Rules of --config may set another threshold for the stalls they match.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_threshold)]
    pub stall_after: HumanDuration,

    /// Append events to this file instead of writing them to stdout. It is reopened on SIGHUP
    /// and, within a second, when renamed or deleted (logrotate `create`); truncation in place
    /// (`copytruncate`) needs nothing.
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,

    /// Permissions (octal) of the events file when the daemon creates it, also on rotation
    /// and reopening. Only applies on creation: an existing file keeps its mode.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode,
          requires = "events_file")]
    pub events_file_mode: u32,

    /// Rotate the events file before it grows past this size (e.g. 100MiB): PATH becomes
    /// PATH.1, PATH.1 becomes PATH.2…
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "events_file")]
    pub events_file_max_size: Option<u64>,

    /// Rotated events files kept with --events-file-max-size (PATH.1 … PATH.N).
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000), requires = "events_file")]
    pub events_file_keep: u32,

    /// Event bytes queued for a slow stdout or events file; beyond it lines are dropped and
    /// counted as loss (output_blocked) rather than holding up tracing.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub events_buffer: u64,

    /// Give the API socket this group (its members may query the daemon: mode 0660).
    #[arg(long, value_name = "NAME")]
    pub socket_group: Option<String>,

    /// Connections the kernel tracks at once (both ends of a local connection count); beyond
    /// it the least recently used are evicted, which is counted as loss.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 262_144,
        value_parser = clap::value_parser!(u32).range(1..=16_777_216)
    )]
    pub max_conns: u32,

    /// Size of the kernel → daemon ring buffer: a power of two, at least 4KiB (e.g. 8MiB). Larger
    /// absorbs bigger bursts of new connections; the daemon maps it twice, so it counts double
    /// in its RSS.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// Bytes of each request captured in the kernel to name it (HTTP method and path, Redis
    /// command, SQL keyword…); 0 turns capture off, and with it the per-protocol rules that read
    /// bytes (HTTP/2 and TLS housekeeping, streams, HTTP/1.x response framing). Only the
    /// signature leaves the daemon.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub capture_bytes: u32,

    /// Also report the captured request bytes (hex), not only their signature. They may hold
    /// credentials or personal data.
    #[arg(long)]
    pub capture_raw: bool,

    /// Enable the kernel's per-program run count and run time statistics, shown by `status`
    /// (costs two clock reads per program run: for measuring overhead).
    #[arg(long)]
    pub bpf_stats: bool,

    /// Log verbosity on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// How to hook the data transfers (every TCP send and receive). `auto` takes the first that
    /// works on this kernel, in this order: `tracepoint` (sock_send_length/sock_recv_length,
    /// Linux 6.3+, cheapest), `fentry` (fexit on tcp_sendmsg/tcp_recvmsg: BTF trampolines,
    /// 5.5+), `kprobe` (kprobe/kretprobe pairs on the same functions), `syscall` (the
    /// read/write/send/recv syscall tracepoints: the last resort, since every syscall of every
    /// process then takes the kernel's slower traced path and file I/O runs our programs too).
    /// Events and verdicts are the same whichever is used; `status` shows it. Forcing one that
    /// the kernel lacks is an error naming the missing kernel feature.
    #[arg(long, value_enum, default_value_t = HooksArg::Auto, env = "STALLTRACE_HOOKS")]
    pub hooks: HooksArg,

    /// Hook the system's libssl (off by default: it costs every process using OpenSSL). The
    /// daemon then attaches uprobes to `SSL_read` and `SSL_read_ex` of libssl.so.3 (every
    /// process that links it dynamically), so that a TLS client's reply counts when OpenSSL
    /// returns its plaintext, and a TLS server's request is named from it (`GET /path`).
    /// Without them, a TLS 1.3 client's first request on a fresh connection is not flagged
    /// when it stalls (the server's session tickets pass for the reply; its server is).
    /// Cost: two uprobe traps per SSL_read call, measured at 11-14 µs on a VM
    /// (docs/performance.md).
    #[arg(long)]
    pub libssl: bool,

    /// Read the kernel's BTF from this file instead of /sys/kernel/btf/vmlinux: for kernels
    /// built without CONFIG_DEBUG_INFO_BTF, with a BTF file made for that exact kernel build
    /// (e.g. from BTFHub). It gives the socket offsets (adoption, connections found by their
    /// traffic) and the shape of tcp_recvmsg for the kprobe hooks; the fentry hooks still need
    /// the kernel's own BTF.
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,

    /// Name unrecognized requests (not HTTP, Redis, PostgreSQL or MySQL) with a printable
    /// preview of their first 24 bytes, in events, `stalls`, `show` and `why`, instead of
    /// `(unrecognized)`. The preview exposes whatever those bytes hold: credentials, tokens,
    /// personal data.
    #[arg(long)]
    pub capture_preview: bool,

    /// Report HTTP paths as captured, instead of with identifier-like segments (numbers, hex
    /// of 8+ digits, UUIDs) replaced by `{id}`. Exposes the ids in paths, and makes one `why`
    /// group per distinct path.
    #[arg(long)]
    pub no_path_templates: bool,
}

/// The filters of `why`. Its groups count requests per executable name, endpoint and request
/// over the daemon's life, across processes: a process id cannot select among them, so
/// `--pid` is refused rather than accepted and ignored.
#[derive(Args, Debug, Default)]
pub struct WhyFilter {
    /// Only groups of processes with this executable name (comm, at most 15 characters).
    #[arg(long, value_name = "NAME", value_parser = stalltrace_core::api::parse_comm)]
    pub comm: Option<String>,
    /// Only groups whose endpoint has this port: the port a server serves, or the port a client
    /// calls.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only groups of Unix connections whose path matches this shell pattern.
    #[arg(long, value_name = "GLOB", value_parser = api::PathGlob::parse)]
    pub path: Option<api::PathGlob>,
    /// Refused with an explanation (groups are per executable name, not per process).
    #[arg(long, value_name = "PID", hide = true, value_parser = refuse_pid_for_why)]
    pub pid: Option<u32>,
}

impl WhyFilter {
    pub fn into_filter(self) -> api::Filter {
        api::Filter {
            comm: self.comm,
            port: self.port,
            path: self.path,
            ..api::Filter::default()
        }
    }
}

fn refuse_pid_for_why(_: &str) -> Result<u32, String> {
    Err(
        "`why` groups requests by executable name across processes, not by process id: \
         select with --comm NAME or --port PORT"
            .into(),
    )
}

#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Output format: an aligned table (text for status and show), or JSON or YAML (a list
    /// for lists, a mapping for status and show).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Opt-in labels of the stall metrics (`--metrics-labels`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsLabel {
    /// The executable name (comm) of the stalled connection's process.
    Comm,
    /// The server's port: the local port of a server connection, the peer port of a client's.
    Port,
}

/// `--hooks`: a rung of the data transfer hooks, or `auto`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HooksArg {
    Auto,
    Tracepoint,
    Fentry,
    Kprobe,
    /// The syscall tracepoints: the last resort (runs for file I/O too).
    Syscall,
}

impl HooksArg {
    /// The rung forced, if any.
    pub fn rung(self) -> Option<crate::Rung> {
        match self {
            HooksArg::Auto => None,
            HooksArg::Tracepoint => Some(crate::Rung::Tracepoint),
            HooksArg::Fentry => Some(crate::Rung::Fentry),
            HooksArg::Kprobe => Some(crate::Rung::Kprobe),
            HooksArg::Syscall => Some(crate::Rung::Syscall),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
        }
    }
}

/// A stall threshold: a duration above zero (`0` alone is refused as that, not for its unit).
pub(crate) fn parse_threshold(text: &str) -> Result<HumanDuration, String> {
    let zero = || "the threshold must be greater than zero (e.g. 500ms, 5s)".to_owned();
    if !text.is_empty() && text.trim().chars().all(|c| c == '0') {
        return Err(zero());
    }
    let duration: HumanDuration = text.parse().map_err(|e| format!("{e}"))?;
    if duration.0.is_zero() {
        return Err(zero());
    }
    Ok(duration)
}

/// `100MiB`, `512KiB`, `1G`, `4096`: a size in bytes, above zero.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("invalid size `{text}` (examples: 100MiB, 512KiB)"))
}

/// `600`, `0640`: permission bits in octal.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|&mode| mode <= 0o7777)
        .ok_or_else(|| format!("invalid mode `{text}`: octal permission bits, e.g. 600 or 0640"))
}

/// `8MiB`, `512KiB`, `4096`: a power of two of at least one page.
pub(crate) fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text)?;
    if bytes < 4096 || !bytes.is_power_of_two() || bytes > 1 << 30 {
        return Err(format!(
            "ring buffer size must be a power of two between 4KiB and 1GiB, got {bytes} bytes"
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_is_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from(["stalltrace", "stalls", "--socket", "/tmp/s", "--pid", "3"])
            .unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let Command::Stalls { filter, .. } = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(filter.pid, Some(3));
    }

    #[test]
    fn why_refuses_pid_and_filters_by_comm_and_port() {
        let err = Cli::try_parse_from(["stalltrace", "why", "--pid", "1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(
            text.contains("--pid") && text.contains("--comm NAME or --port PORT"),
            "{text}"
        );
        let cli =
            Cli::try_parse_from(["stalltrace", "why", "--comm", "shop", "--port", "80"]).unwrap();
        let Command::Why { filter, .. } = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            filter.into_filter(),
            api::Filter {
                comm: Some("shop".into()),
                port: Some(80),
                ..api::Filter::default()
            }
        );
        // The other listing commands do filter by pid.
        for command in ["conns", "stalls", "watch"] {
            Cli::try_parse_from(["stalltrace", command, "--pid", "1"]).unwrap();
        }
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("2  usage error"), "{help}");
    }

    #[test]
    fn bad_durations_are_rejected_with_examples() {
        let err = Cli::try_parse_from(["stalltrace", "daemon", "--stall-after", "soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("examples"), "{err}");
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("512K"), Ok(512 << 10));
        assert!(parse_ring_size("3MiB")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_ring_size("1KiB").is_err());
        assert!(parse_ring_size("8XB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_ring_size("lots").is_err());
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("300"), Ok(300));
        assert!(parse_size("0").is_err());
        assert!(parse_size("9XB").is_err());
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0640"), Ok(0o640));
        assert!(parse_mode("8").is_err());
        assert!(parse_mode("rw").is_err());
    }

    #[test]
    fn events_file_options_need_an_events_file() {
        let cli = Cli::try_parse_from(["stalltrace", "daemon"]).unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(args.events_file_mode, 0o600);
        assert_eq!(args.events_file_keep, 5);
        assert!(Cli::try_parse_from(["stalltrace", "daemon", "--events-file-keep", "3"]).is_err());
        assert!(Cli::try_parse_from([
            "stalltrace",
            "daemon",
            "--events-file",
            "/tmp/e",
            "--events-file-max-size",
            "1MiB"
        ])
        .is_ok());
    }

    #[test]
    fn values_that_could_only_mislead_are_usage_errors() {
        let usage = |args: &[&str]| {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            err.to_string()
        };
        for zero in ["0", "0s", "0ms"] {
            let text = usage(&["stalltrace", "daemon", "--stall-after", zero]);
            assert!(text.contains("greater than zero"), "{text}");
        }
        usage(&["stalltrace", "daemon", "--max-conns", "0"]);
        usage(&["stalltrace", "daemon", "--max-conns", "4294967295"]);
        usage(&["stalltrace", "stalls", "--pid", "0"]);
        let text = usage(&["stalltrace", "conns", "--comm", "python3.11-very-long-name"]);
        assert!(text.contains("15"), "{text}");
        usage(&["stalltrace", "why", "--comm", "python3.11-very-long-name"]);
        assert!(Cli::try_parse_from(["stalltrace", "daemon", "--stall-after", "250ms"]).is_ok());
    }
}
