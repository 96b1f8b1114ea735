//! The running kernel's BTF (`/sys/kernel/btf/vmlinux`) and the member offsets the kernel
//! programs need from it. The parser itself is pure and fuzzed: `stalltrace_core::btf`.
use anyhow::{Context as _, Result};
use stalltrace_common::{FdOffsets, Offsets};
pub(crate) use stalltrace_core::btf::Btf;

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads and parses the running kernel's BTF.
pub(crate) fn from_kernel() -> Result<Btf> {
    let data = std::fs::read(VMLINUX_BTF).with_context(|| {
        format!(
            "reading {VMLINUX_BTF} (needs a kernel built with CONFIG_DEBUG_INFO_BTF=y, or the \
             kernel's BTF from a file with --btf)"
        )
    })?;
    Btf::parse(data).with_context(|| format!("parsing {VMLINUX_BTF}"))
}

/// Reads and parses BTF for the running kernel from a file (`--btf`, e.g. from BTFHub for a
/// kernel built without BTF). It must describe the exact kernel build that runs.
pub(crate) fn from_file(path: &std::path::Path) -> Result<Btf> {
    let data =
        std::fs::read(path).with_context(|| format!("reading the BTF file {}", path.display()))?;
    Btf::parse(data).with_context(|| format!("parsing the BTF file {}", path.display()))
}

/// Expected size of a member whose size varies (a struct, a flexible array).
const ANY_SIZE: u32 = u32::MAX;

/// The offsets the kernel programs use; members that cannot be found (or have an unexpected
/// size) stay unknown, which disables the feature that needs them. `missing` names them.
pub(crate) fn resolve_offsets(btf: &Btf) -> (Offsets, Vec<&'static str>) {
    let mut offsets = Offsets::unknown();
    let mut missing = Vec::new();
    let wanted: [Wanted; 28] = [
        (
            &mut offsets.skc_family,
            "sock",
            &["__sk_common", "skc_family"],
            2,
            "sock.skc_family",
        ),
        (
            &mut offsets.sk_protocol,
            "sock",
            &["sk_protocol"],
            2,
            "sock.sk_protocol",
        ),
        (
            &mut offsets.skc_daddr,
            "sock",
            &["__sk_common", "skc_daddr"],
            4,
            "sock.skc_daddr",
        ),
        (
            &mut offsets.skc_rcv_saddr,
            "sock",
            &["__sk_common", "skc_rcv_saddr"],
            4,
            "sock.skc_rcv_saddr",
        ),
        (
            &mut offsets.skc_dport,
            "sock",
            &["__sk_common", "skc_dport"],
            2,
            "sock.skc_dport",
        ),
        (
            &mut offsets.skc_num,
            "sock",
            &["__sk_common", "skc_num"],
            2,
            "sock.skc_num",
        ),
        (
            &mut offsets.skc_v6_daddr,
            "sock",
            &["__sk_common", "skc_v6_daddr"],
            16,
            "sock.skc_v6_daddr",
        ),
        (
            &mut offsets.skc_v6_rcv_saddr,
            "sock",
            &["__sk_common", "skc_v6_rcv_saddr"],
            16,
            "sock.skc_v6_rcv_saddr",
        ),
        (
            &mut offsets.skc_state,
            "sock",
            &["__sk_common", "skc_state"],
            1,
            "sock.skc_state",
        ),
        (
            &mut offsets.tcp_rcv_nxt,
            "tcp_sock",
            &["rcv_nxt"],
            4,
            "tcp_sock.rcv_nxt",
        ),
        (
            &mut offsets.tcp_copied_seq,
            "tcp_sock",
            &["copied_seq"],
            4,
            "tcp_sock.copied_seq",
        ),
        (
            &mut offsets.tcp_bytes_received,
            "tcp_sock",
            &["bytes_received"],
            8,
            "tcp_sock.bytes_received",
        ),
        (
            &mut offsets.skc_net,
            "sock",
            &["__sk_common", "skc_net", "net"],
            8,
            "sock.skc_net",
        ),
        (
            &mut offsets.net_ns_inum,
            "net",
            &["ns", "inum"],
            4,
            "net.ns.inum",
        ),
        // Unix domain sockets (docs/design.md, "Unix domain sockets").
        (
            &mut offsets.sk_type,
            "sock",
            &["sk_type"],
            2,
            "sock.sk_type",
        ),
        (
            &mut offsets.sk_socket,
            "sock",
            &["sk_socket"],
            8,
            "sock.sk_socket",
        ),
        (
            &mut offsets.sk_peer_pid,
            "sock",
            &["sk_peer_pid"],
            8,
            "sock.sk_peer_pid",
        ),
        (
            &mut offsets.unix_peer,
            "unix_sock",
            &["peer"],
            8,
            "unix_sock.peer",
        ),
        (
            &mut offsets.unix_addr,
            "unix_sock",
            &["addr"],
            8,
            "unix_sock.addr",
        ),
        (
            &mut offsets.unix_address_len,
            "unix_address",
            &["len"],
            4,
            "unix_address.len",
        ),
        // A flexible array member: no size.
        (
            &mut offsets.unix_address_name,
            "unix_address",
            &["name"],
            ANY_SIZE,
            "unix_address.name",
        ),
        (
            &mut offsets.socket_inode,
            "socket_alloc",
            &["vfs_inode"],
            ANY_SIZE,
            "socket_alloc.vfs_inode",
        ),
        (
            &mut offsets.inode_ino,
            "inode",
            &["i_ino"],
            8,
            "inode.i_ino",
        ),
        (
            &mut offsets.pid_numbers,
            "pid",
            &["numbers"],
            ANY_SIZE,
            "pid.numbers",
        ),
        (&mut offsets.upid_nr, "upid", &["nr"], 4, "upid.nr"),
        (
            &mut offsets.sk_receive_queue_qlen,
            "sock",
            &["sk_receive_queue", "qlen"],
            4,
            "sock.sk_receive_queue.qlen",
        ),
        (
            &mut offsets.sk_shutdown,
            "sock",
            &["sk_shutdown"],
            1,
            "sock.sk_shutdown",
        ),
        (
            &mut offsets.unix_address_refcnt,
            "unix_address",
            &["refcnt"],
            4,
            "unix_address.refcnt",
        ),
    ];
    resolve(btf, wanted, &mut missing);
    (offsets, missing)
}

/// A member to resolve: where its offset goes, its struct and path, its size (bytes), its name.
type Wanted<'a> = (
    &'a mut u32,
    &'static str,
    &'static [&'static str],
    u32,
    &'static str,
);

/// Fills each wanted member's offset; those absent or of another size are named in `missing`.
fn resolve<'a>(
    btf: &Btf,
    wanted: impl IntoIterator<Item = Wanted<'a>>,
    missing: &mut Vec<&'static str>,
) {
    for (slot, struct_name, path, size, label) in wanted {
        match btf.member(struct_name, path) {
            Some(member) if member.size == size || size == ANY_SIZE => *slot = member.offset,
            _ => missing.push(label),
        }
    }
}

/// The members the syscall rung follows from a file descriptor to its socket; the missing
/// ones, named, if any is.
pub(crate) fn resolve_fd_offsets(btf: &Btf) -> Result<FdOffsets, String> {
    let mut offsets = FdOffsets::unknown();
    let mut missing = Vec::new();
    let wanted: [Wanted; 8] = [
        (
            &mut offsets.task_files,
            "task_struct",
            &["files"],
            8,
            "task_struct.files",
        ),
        (
            &mut offsets.files_fdt,
            "files_struct",
            &["fdt"],
            8,
            "files_struct.fdt",
        ),
        (
            &mut offsets.fdtable_max_fds,
            "fdtable",
            &["max_fds"],
            4,
            "fdtable.max_fds",
        ),
        (&mut offsets.fdtable_fd, "fdtable", &["fd"], 8, "fdtable.fd"),
        (
            &mut offsets.file_inode,
            "file",
            &["f_inode"],
            8,
            "file.f_inode",
        ),
        (
            &mut offsets.file_private_data,
            "file",
            &["private_data"],
            8,
            "file.private_data",
        ),
        (
            &mut offsets.inode_mode,
            "inode",
            &["i_mode"],
            2,
            "inode.i_mode",
        ),
        (&mut offsets.socket_sk, "socket", &["sk"], 8, "socket.sk"),
    ];
    resolve(btf, wanted, &mut missing);
    if missing.is_empty() {
        Ok(offsets)
    } else {
        Err(format!("kernel BTF lacks {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_layout_resolves() {
        // A kernel without BTF fails this test, loudly: the daemon loses adoption there.
        let btf = from_kernel().unwrap_or_else(|err| {
            panic!("this kernel's BTF ({VMLINUX_BTF}) is unreadable: {err:#}")
        });
        let (offsets, missing) = resolve_offsets(&btf);
        assert!(missing.is_empty(), "missing members: {missing:?}");
        // These have been stable in sock_common forever; a wrong parse would move them.
        assert_eq!(offsets.skc_daddr, 0);
        assert_eq!(offsets.skc_rcv_saddr, 4);
        assert_eq!(offsets.skc_dport, 12);
        assert_eq!(offsets.skc_num, 14);
        assert!(offsets.can_read_unix() && offsets.can_read_peer_pid());
        // `struct socket_alloc { struct socket socket; struct inode vfs_inode; }`.
        assert!(offsets.socket_inode > 0);
        let fd = resolve_fd_offsets(&btf).unwrap();
        // `struct socket` starts with its state and type, and fdtable with max_fds.
        assert!(fd.socket_sk > 0 && fd.fdtable_max_fds == 0, "{fd:?}");
    }
}
