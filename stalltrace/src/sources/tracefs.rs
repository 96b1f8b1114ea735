//! tracefs: mounted if missing, and the source of truth for tracepoint record layouts, which
//! are checked against what the kernel programs were compiled for before anything attaches.
use std::{
    collections::HashMap,
    mem::{offset_of, size_of},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use stalltrace_common::tracepoint::{
    InetSockSetState, SysEnterFd, SysEnterRecvfrom, SysEnterRecvmsg, SysExit, TcpReceiveReset,
    TcpRetransmitSkb,
};

pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// The tracefs root, mounting tracefs at /sys/kernel/tracing when no tracefs is mounted.
pub(crate) fn ensure_mounted() -> Result<PathBuf> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    if let Err(err) = super::mount("tracefs", TRACEFS) {
        bail!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed: {err}; mount it with \
             `mount -t tracefs nodev {TRACEFS}` (needs a kernel with CONFIG_TRACING)"
        );
    }
    log::info!("mounted tracefs at {TRACEFS}");
    Ok(PathBuf::from(TRACEFS))
}

/// A field of a tracepoint record: (offset, size) in bytes.
pub(crate) type FieldLayout = (usize, usize);

/// Parses the `field:` lines of a tracepoint `format` file.
pub(crate) fn parse_format(text: &str) -> HashMap<String, FieldLayout> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let declaration = parts.next().unwrap_or("");
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        // "unsigned char saddr[4]" -> "saddr"
        let name = declaration
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        if let (false, Some(offset), Some(size)) = (name.is_empty(), offset, size) {
            fields.insert(name.to_owned(), (offset, size));
        }
    }
    fields
}

/// The fields a program reads from a tracepoint, as compiled into it; empty for raw
/// tracepoints (read by argument position, not through the record). `None` for a tracepoint
/// no program reads: every hook must have an arm here (a test checks the hook table).
pub(crate) fn expected_fields(
    category: &str,
    name: &str,
) -> Option<Vec<(&'static str, FieldLayout)>> {
    macro_rules! fields {
        ($ty:ty: $($field:ident),+) => {
            vec![$((
                stringify!($field),
                (offset_of!($ty, $field), size_of_field(|r: &$ty| &r.$field)),
            )),+]
        };
    }
    Some(match (category, name) {
        ("sock", "inet_sock_set_state") => fields!(InetSockSetState:
            skaddr, oldstate, newstate, sport, dport, family, protocol,
            saddr, daddr, saddr_v6, daddr_v6),
        ("tcp", "tcp_retransmit_skb") => fields!(TcpRetransmitSkb: skaddr, sport),
        ("tcp", "tcp_receive_reset") => fields!(TcpReceiveReset: skaddr),
        ("sock", "sock_send_length" | "sock_recv_length") | ("tcp", "tcp_rcv_space_adjust") => {
            Vec::new()
        }
        ("syscalls", "sys_enter_recvfrom") => fields!(SysEnterRecvfrom: fd, flags),
        ("syscalls", "sys_enter_recvmsg") => fields!(SysEnterRecvmsg: fd, flags),
        ("syscalls", name) if name.starts_with("sys_enter_") => fields!(SysEnterFd: fd),
        ("syscalls", name) if name.starts_with("sys_exit_") => fields!(SysExit: ret),
        _ => return None,
    })
}

fn size_of_field<T, F>(_: impl Fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Checks that the running kernel has `category/name` and lays out its record as the programs
/// expect (raw tracepoints, read by argument position, only need to exist).
pub(crate) fn check_layout(root: &Path, category: &str, name: &str) -> Result<()> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("tracepoint {category}/{name} is not available ({path:?})"))?;
    let actual = parse_format(&text);
    let Some(fields) = expected_fields(category, name) else {
        bail!(
            "no record layout is known for tracepoint {category}/{name}: add it to expected_fields"
        );
    };
    for (field, expected) in fields {
        match actual.get(field) {
            Some(found) if *found == expected => {}
            Some(found) => bail!(
                "tracepoint {category}/{name}: field `{field}` is at offset {} size {} on this \
                 kernel, the programs expect offset {} size {}",
                found.0,
                found.1,
                expected.0,
                expected.1
            ),
            None => bail!("tracepoint {category}/{name} has no field `{field}` on this kernel"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVE_RESET: &str = "name: tcp_receive_reset
ID: 2270
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:30;\tsize:16;\tsigned:0;
\tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;

print fmt: \"sport=%hu\", REC->sport
";

    #[test]
    fn parses_format_fields() {
        let fields = parse_format(RECEIVE_RESET);
        assert_eq!(fields["skaddr"], (8, 8));
        assert_eq!(fields["sport"], (16, 2));
        assert_eq!(fields["common_pid"], (4, 4));
        assert_eq!(fields["saddr_v6"], (30, 16));
        assert_eq!(fields["sock_cookie"], (64, 8));
    }

    #[test]
    fn compiled_layout_matches_the_documented_one() {
        let expected = expected_fields("tcp", "tcp_receive_reset").unwrap();
        assert!(!expected.is_empty());
        let fields = parse_format(RECEIVE_RESET);
        for (name, layout) in expected {
            assert_eq!(fields[name], layout, "{name}");
        }
    }

    #[test]
    fn a_moved_field_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("stalltrace-tracefs-{}", std::process::id()));
        let event = dir.join("events/tcp/tcp_receive_reset");
        std::fs::create_dir_all(&event).unwrap();
        std::fs::write(
            event.join("format"),
            RECEIVE_RESET.replace("offset:8;", "offset:24;"),
        )
        .unwrap();
        let err = check_layout(&dir, "tcp", "tcp_receive_reset")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`skaddr`") && err.contains("offset 24"),
            "{err}"
        );
        std::fs::write(event.join("format"), RECEIVE_RESET).unwrap();
        check_layout(&dir, "tcp", "tcp_receive_reset").unwrap();
        let missing = check_layout(&dir, "tcp", "tcp_retransmit_skb").unwrap_err();
        assert!(missing.to_string().contains("not available"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
