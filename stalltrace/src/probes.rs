//! Loading and attaching the kernel programs, and typed handles to their maps. The only module
//! that talks to aya; it must not interpret what the maps hold (that is the core's job).
//!
//! Required hooks (the daemon cannot work without them) fail the start with a message naming
//! the missing kernel feature; optional ones are skipped with a warning saying what is lost.
//!
//! The data transfers (every TCP send and receive) are hooked by the first rung of a ladder
//! that attaches on the running kernel: the sock tracepoints (Linux 6.3), fexit on the TCP
//! functions (BTF trampolines, 5.5), kprobes on them. All rungs run the same kernel logic.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::UProbeScope,
        CgroupAttachMode, CgroupSock, FExit, KProbe, PerfEvent, ProgramError, ProgramFd,
        RawTracePoint, RawTracePointRunOptions, TestRun as _, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use stalltrace_common::{
    capture_slot,
    clock::Fit,
    http1::{ReplyHead, RequestRun},
    loss, syscall_regs, unix_alive, Capture, ConnState, Control, FdOffsets, Offsets, StackKey,
};

use crate::sources::{cgroups, kernel_clock, libssl, tracefs};

/// The object built by build.rs from stalltrace-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stalltrace"));

/// Once the programs are loaded, the eBPF object's pages leave resident memory (aya keeps
/// what it parsed, not the object).
pub(crate) fn release_object() {
    crate::heap::release_image_pages(OBJECT);
}

/// A program and the tracepoint it attaches to, on every kernel.
pub(crate) struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// Without it the daemon cannot work; otherwise what is lost without it.
    pub optional: Option<&'static str>,
}

pub(crate) const HOOKS: &[Hook] = &[
    Hook {
        program: "stalltrace_tcp_state",
        category: "sock",
        name: "inet_sock_set_state",
        optional: None,
    },
    Hook {
        program: "stalltrace_retransmit",
        category: "tcp",
        name: "tcp_retransmit_skb",
        optional: Some("retransmits are not counted"),
    },
    Hook {
        program: "stalltrace_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        optional: Some("resets received are reported as plain closes"),
    },
];

/// How the data transfers are hooked: the rungs of the ladder, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rung {
    /// Raw tracepoints `sock_send_length` / `sock_recv_length` (Linux 6.3): fire for sockets
    /// only, cheapest.
    Tracepoint,
    /// fexit programs on `tcp_sendmsg` / `tcp_recvmsg` (BPF trampolines, Linux 5.5).
    Fentry,
    /// kprobe + kretprobe pairs on the same functions (CONFIG_KPROBES).
    Kprobe,
    /// The syscall tracepoints of the read/write family, descriptor resolved to its socket
    /// (kernel BTF): the last resort, since they run for file I/O too.
    Syscall,
}

impl Rung {
    pub const LADDER: [Rung; 4] = [Rung::Tracepoint, Rung::Fentry, Rung::Kprobe, Rung::Syscall];

    pub fn name(self) -> &'static str {
        match self {
            Rung::Tracepoint => "tracepoint",
            Rung::Fentry => "fentry",
            Rung::Kprobe => "kprobe",
            Rung::Syscall => "syscall",
        }
    }

    /// What the kernel must provide for this rung.
    fn needs(self) -> &'static str {
        match self {
            Rung::Tracepoint => {
                "the tracepoints sock/sock_send_length and sock/sock_recv_length (Linux 6.3)"
            }
            Rung::Fentry => {
                "fentry/fexit programs (BPF trampolines: kernel BTF with CONFIG_DEBUG_INFO_BTF, \
                 CONFIG_BPF_JIT and CONFIG_FUNCTION_TRACER, Linux 5.5)"
            }
            Rung::Kprobe => "kprobes (CONFIG_KPROBES)",
            Rung::Syscall => {
                "the syscall tracepoints (CONFIG_FTRACE_SYSCALLS) and kernel BTF for the path \
                 from a file descriptor to its socket"
            }
        }
    }

    /// The programs of this rung and what they attach to.
    fn hooks(self) -> &'static [TransferHook] {
        match self {
            Rung::Tracepoint => TRACEPOINT_TRANSFERS,
            Rung::Fentry => FENTRY_TRANSFERS,
            Rung::Kprobe => KPROBE_TRANSFERS,
            Rung::Syscall => SYSCALL_TRANSFERS,
        }
    }
}

/// A data transfer program and the tracepoint or kernel function it attaches to.
struct TransferHook {
    program: &'static str,
    target: &'static str,
    /// Only some kernels have it (checked in BTF); elsewhere its work is done by the others.
    only_if_present: bool,
}

const fn transfer(program: &'static str, target: &'static str) -> TransferHook {
    TransferHook {
        program,
        target,
        only_if_present: false,
    }
}

/// sendfile()/splice() sends bypass tcp_sendmsg before Linux 6.5, which removed this function.
const SENDPAGE: &str = "tcp_sendpage";

const TRACEPOINT_TRANSFERS: &[TransferHook] = &[
    transfer("stalltrace_send", "sock_send_length"),
    transfer("stalltrace_recv", "sock_recv_length"),
];
const FENTRY_TRANSFERS: &[TransferHook] = &[
    transfer("stalltrace_send_fexit", "tcp_sendmsg"),
    transfer("stalltrace_recv_fexit", "tcp_recvmsg"),
    TransferHook {
        program: "stalltrace_sendpage_fexit",
        target: SENDPAGE,
        only_if_present: true,
    },
];
const KPROBE_TRANSFERS: &[TransferHook] = &[
    transfer("stalltrace_send_kprobe", "tcp_sendmsg"),
    transfer("stalltrace_send_kretprobe", "tcp_sendmsg"),
    transfer("stalltrace_recv_kprobe", "tcp_recvmsg"),
    transfer("stalltrace_recv_kretprobe", "tcp_recvmsg"),
    TransferHook {
        program: "stalltrace_sendpage_kprobe",
        target: SENDPAGE,
        only_if_present: true,
    },
    TransferHook {
        program: "stalltrace_sendpage_kretprobe",
        target: SENDPAGE,
        only_if_present: true,
    },
];

/// One program per role, attached to every syscall of the family (each is loaded once).
const SYSCALL_TRANSFERS: &[TransferHook] = &[
    transfer("stalltrace_sys_enter_fd", "sys_enter_read"),
    transfer("stalltrace_sys_enter_fd", "sys_enter_readv"),
    transfer("stalltrace_sys_enter_recvfrom", "sys_enter_recvfrom"),
    transfer("stalltrace_sys_enter_recvmsg", "sys_enter_recvmsg"),
    transfer("stalltrace_sys_exit_recv", "sys_exit_read"),
    transfer("stalltrace_sys_exit_recv", "sys_exit_readv"),
    transfer("stalltrace_sys_exit_recv", "sys_exit_recvfrom"),
    transfer("stalltrace_sys_exit_recv", "sys_exit_recvmsg"),
    transfer("stalltrace_sys_enter_fd", "sys_enter_write"),
    transfer("stalltrace_sys_enter_fd", "sys_enter_writev"),
    transfer("stalltrace_sys_enter_fd", "sys_enter_sendto"),
    transfer("stalltrace_sys_enter_fd", "sys_enter_sendmsg"),
    transfer("stalltrace_sys_exit_send", "sys_exit_write"),
    transfer("stalltrace_sys_exit_send", "sys_exit_writev"),
    transfer("stalltrace_sys_exit_send", "sys_exit_sendto"),
    transfer("stalltrace_sys_exit_send", "sys_exit_sendmsg"),
];

/// (major, minor) of a kernel release such as "5.10.0-32-amd64"; (0, 0) if unreadable.
pub(crate) fn release_version(release: &str) -> (u32, u32) {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// The running kernel's (major, minor).
pub(crate) fn running_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    release_version(release.trim())
}

/// What the fallback rungs need to know about the kernel's TCP functions, and request capture
/// about its syscall registers (from its BTF, or its version when there is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelFunctions {
    /// Parameters of `tcp_recvmsg`: 6 before Linux 5.19 (a `nonblock` before `flags`), 5
    /// after, 4 from 6.18 (no `addr_len`). `flags` is the fifth, else the fourth.
    pub tcp_recvmsg_args: u32,
    pub has_tcp_sendpage: bool,
    /// The members the syscall rung follows from a descriptor to its socket, or which the
    /// kernel's BTF lacks.
    pub fd_offsets: Result<FdOffsets, String>,
    /// `struct pt_regs` has the layout capture reads on this architecture
    /// ([`SYSCALL_REGS`]), or there is no BTF to tell (capture then fails to load and is
    /// dropped: it needs BTF).
    pub syscall_regs: Result<(), String>,
}

/// Where capture reads the syscall's registers on the architecture the daemon was built for;
/// `None` where it does not know them (capture off).
pub(crate) const SYSCALL_REGS: Option<syscall_regs::Layout> = if cfg!(target_arch = "x86_64") {
    Some(syscall_regs::X86_64)
} else if cfg!(target_arch = "aarch64") {
    Some(syscall_regs::AARCH64)
} else {
    None
};

impl KernelFunctions {
    /// From the kernel's BTF; `None` when the BTF has no `tcp_recvmsg` of a known shape.
    pub(crate) fn from_btf(btf: &crate::sources::btf::Btf) -> Option<Self> {
        let params = btf.function_params("tcp_recvmsg")?;
        let tcp_recvmsg_args = match params.as_slice() {
            [_, _, _, _, "flags", _] => 6,
            [_, _, _, "flags", _] => 5,
            [_, _, _, "flags"] => 4,
            _ => return None,
        };
        Some(Self {
            tcp_recvmsg_args,
            has_tcp_sendpage: btf.function_params(SENDPAGE).is_some(),
            fd_offsets: crate::sources::btf::resolve_fd_offsets(btf),
            syscall_regs: SYSCALL_REGS.map_or(Ok(()), |layout| check_syscall_regs(btf, &layout)),
        })
    }

    /// From the kernel release (e.g. "5.10.0-32-amd64") when there is no BTF to read.
    pub(crate) fn from_release(release: &str) -> Self {
        let version = release_version(release);
        Self {
            tcp_recvmsg_args: match version {
                v if v < (5, 19) => 6,
                v if v < (6, 18) => 5,
                _ => 4,
            },
            has_tcp_sendpage: version < (6, 5),
            fd_offsets: Err("no kernel BTF".into()),
            syscall_regs: Ok(()),
        }
    }
}

/// Whether the kernel's `struct pt_regs` holds each register capture reads where `layout`
/// says; the mismatch, named, if not.
fn check_syscall_regs(
    btf: &crate::sources::btf::Btf,
    layout: &syscall_regs::Layout,
) -> Result<(), String> {
    for wanted in [layout.nr, layout.arg1, layout.arg2, layout.arg4] {
        let name = wanted.path.join(".");
        let member = btf
            .member("pt_regs", wanted.path)
            .ok_or_else(|| format!("struct pt_regs has no member {name}"))?;
        let (start, end) = (
            member.offset as usize,
            (member.offset + member.size) as usize,
        );
        if wanted.offset < start || wanted.offset + wanted.size > end {
            return Err(format!(
                "struct pt_regs.{name} is at bytes {start}..{end}, capture reads {}..{}",
                wanted.offset,
                wanted.offset + wanted.size
            ));
        }
    }
    Ok(())
}

pub(crate) struct ProbeConfig {
    pub stall_after_ns: u64,
    pub max_conns: u32,
    pub ring_buffer_bytes: u32,
    pub offsets: Offsets,
    /// Enable the kernel's per-program run count and run time statistics.
    pub bpf_stats: bool,
    /// Request bytes captured at each request start (0: off).
    pub capture_bytes: u32,
    /// The transfer rung to use (`--hooks`); `None`: the first that attaches.
    pub hooks: Option<Rung>,
    /// Hook the system's libssl (`SSL_read`) for TLS clients' replies (`--libssl`).
    pub libssl: bool,
    pub functions: KernelFunctions,
}

/// Entries of the request capture array when capture is on: one per concurrently outstanding
/// request is plenty; a collision loses one signature, never a stall.
const CAPTURE_SLOTS: u32 = 1 << 16;
/// HTTP/1.x responses whose start is kept (1 112 bytes each, ~4.6 MiB preallocated): the
/// daemon reads each within a sweep of its start, so this bounds the responses starting per
/// sweep on distinct connections, not the connections.
const HTTP1_REPLY_HEADS: u32 = 4096;

/// An attached program and what the kernel counted for it, for `stalltrace status`.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Attached {
    pub program: &'static str,
    pub hook: String,
    /// How the hook is attached: tracepoint, fentry or kprobe.
    pub rung: Rung,
    /// Runs and time spent, counted only while BPF statistics are enabled (`--bpf-stats` or
    /// the sysctl kernel.bpf_stats_enabled).
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Loaded and attached programs; dropping this detaches them.
pub(crate) struct Probes {
    ebpf: Ebpf,
    attached: Vec<Attached>,
    pub maps: KernelMaps,
    /// Keeps BPF run-time statistics enabled while held.
    _stats: Option<std::os::fd::OwnedFd>,
    /// Request bytes captured (0 when off or unavailable).
    pub capture_bytes: u32,
    stacks: Option<StackSampling>,
    /// How the data transfers are hooked, and why the better rungs were passed over.
    pub transfers: TransferHooks,
    /// UDP sockets are traced (the tracepoint rung, and a cgroup v2 root for their closes).
    pub udp: bool,
    /// Whether Unix stream/seqpacket connections are traced, or why not.
    pub unix: Result<(), String>,
    /// HTTP/1.x responses are judged by their framing (capture on, and a rung that counts
    /// `sendfile`'s bytes: see `http1_framing`).
    pub http1_framing: bool,
    /// HTTP/2 connections (h2c) are judged per stream: the kernel walks their frames (capture
    /// on, the verdict extras: see `verdict_extras`, and the tracepoint rung, whose programs
    /// alone hold the walk).
    pub http2_streams: bool,
    /// The libssl whose `SSL_read` is hooked (TLS clients' replies counted at the plaintext),
    /// or why none is.
    pub libssl: Result<PathBuf, String>,
    /// Receives that bypass the transfer hooks (`splice`/`sendfile` from a TCP socket) are
    /// counted (`stalltrace_splice_recv`), or why not.
    pub splice_reads: Result<(), String>,
}

/// What to add to the stall threshold where it is compared with connection state times
/// (`stalltrace_common::clock::THRESHOLD_SLACK_NS`), with the coarse clock on or off.
pub(crate) fn threshold_slack_ns(coarse_clock: bool) -> u64 {
    if coarse_clock {
        stalltrace_common::clock::THRESHOLD_SLACK_NS
    } else {
        0
    }
}

/// The program the daemon runs (never attached) to ask whether a Unix socket still lives.
const UNIX_ALIVE_PROGRAM: &str = "stalltrace_unix_alive";

/// The rung the data transfers use, for the start-up line and `status`.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct TransferHooks {
    pub rung: Rung,
    /// True when `--hooks` chose it; false when probed.
    pub forced: bool,
    /// The better rungs that did not attach, each with the reason.
    pub passed_over: Vec<String>,
}

/// User-stack sampling of chosen threads (perf events), for spinning stalls.
struct StackSampling {
    counts: HashMap<MapData, StackKey, u64>,
    traces: StackTraceMap<MapData>,
    links: std::collections::HashMap<u32, PerfEventLinkId>,
}

/// Samples per second of a spinning thread.
const STACK_SAMPLE_HZ: u64 = 99;

pub(crate) struct KernelMaps {
    pub conns: HashMap<MapData, u64, ConnState>,
    pub control: Array<MapData, Control>,
    pub loss: PerCpuArray<MapData, u64>,
    pub events: Option<RingBuf<MapData>>,
    /// Keyed by `stalltrace_common::listen_key` (namespace, port).
    listen_ports: HashMap<MapData, u64, u32>,
    captures: Array<MapData, Capture>,
    capture_slots: u32,
    /// The start of each HTTP/1.x connection's latest response (`stalltrace_common::http1`).
    http1_reply_heads: HashMap<MapData, u64, ReplyHead>,
    http1_request_runs: Array<MapData, RequestRun>,
    request_run_slots: u32,
    /// The data transfer programs, for the kernel's count of runs it skipped.
    transfer_programs: Vec<ProgramFd>,
    /// The coarse clock's fit, written into `CONTROL` with every epoch, or why the programs
    /// read `bpf_ktime_get_ns`.
    pub clock: Result<Fit, String>,
}

/// What the kernel says of a Unix socket ([`Probes::unix_liveness`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnixLiveness {
    Open,
    /// Closed, or its memory now holds another socket.
    Released,
    /// Open, but its peer will send nothing more (released, or shut down for writing);
    /// `unread`: what the peer sent is still (partly) queued unread here, or that could not be
    /// read.
    PeerClosed {
        unread: bool,
    },
    /// The kernel's layout or the test run failed: nothing can be told.
    Unknown,
}

/// Kernel-side loss counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct KernelLoss {
    pub ringbuf_full: u64,
    pub conn_insert_failed: u64,
    /// Runs of the data transfer programs the kernel skipped (`recursion_misses`, 5.12+), and
    /// returns of hooked calls that ran none (`loss::RETURN_MISSED`: kretprobes out of
    /// instances).
    pub hook_missed: u64,
    /// HTTP/2 streams the kernel could not follow (`loss::HTTP2_UNTRACKED`).
    pub http2_untracked: u64,
    /// HTTP/2 connections whose framing the kernel lost (`loss::HTTP2_FRAMING_LOST`).
    pub http2_framing_lost: u64,
}

impl KernelMaps {
    pub(crate) fn lookup(&self, sock: u64) -> Option<ConnState> {
        self.conns.get(&sock, 0).ok()
    }

    /// A second handle on the connection map (its fd duplicated), for a thread of its own.
    pub(crate) fn conns_handle(&self) -> Result<HashMap<MapData, u64, ConnState>> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let fd = self
            .conns
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the CONNS map's fd")?;
        let map = MapData::from_fd(fd).context("opening the CONNS map")?;
        HashMap::try_from(aya::maps::Map::LruHashMap(map)).context("opening the CONNS map")
    }

    /// The kernel's copy of the start of `sock`'s latest HTTP/1.x response.
    pub(crate) fn reply_head(&self, sock: u64) -> Option<ReplyHead> {
        self.http1_reply_heads.get(&sock, 0).ok()
    }

    /// The kernel's copy of the start of an HTTP/1.x connection's latest request-direction run.
    pub(crate) fn request_run(&self, sock: u64) -> Option<RequestRun> {
        let slot = capture_slot(sock, self.request_run_slots);
        let run = self.http1_request_runs.get(&slot, 0).ok()?;
        (run.sock == sock).then_some(run)
    }

    /// Drops the entry of a connection that ended without the kernel seeing it end (a
    /// released Unix socket).
    pub(crate) fn forget(&mut self, sock: u64) {
        let _ = self.conns.remove(&sock);
    }

    /// The captured start of the request in flight on `sock`, if its slot still holds it (the
    /// kernel forgets a slot's copy when a new connection opens at its address).
    pub(crate) fn capture(&self, sock: u64) -> Option<Capture> {
        let slot = capture_slot(sock, self.capture_slots);
        let capture = self.captures.get(&slot, 0).ok()?;
        (capture.sock == sock && capture.len > 0).then_some(capture)
    }

    pub(crate) fn set_epoch(&mut self, epoch: u32) -> Result<()> {
        let (clock_tick_ns, clock_base_ns) = self
            .clock
            .as_ref()
            .map_or((0, 0), |f| (f.tick_ns, f.base_ns));
        let control = Control {
            epoch,
            _pad: 0,
            clock_tick_ns,
            clock_base_ns,
        };
        self.control
            .set(0, control, 0)
            .context("writing the sweep epoch to the CONTROL map")
    }

    pub(crate) fn loss(&self) -> KernelLoss {
        KernelLoss {
            ringbuf_full: self.lost(loss::RINGBUF_FULL),
            conn_insert_failed: self.lost(loss::CONN_INSERT_FAILED),
            hook_missed: self
                .transfer_programs
                .iter()
                .map(recursion_misses)
                .sum::<u64>()
                + self.lost(loss::RETURN_MISSED),
            http2_untracked: self.lost(loss::HTTP2_UNTRACKED),
            http2_framing_lost: self.lost(loss::HTTP2_FRAMING_LOST),
        }
    }

    /// Records lost to a full ring buffer, in all (one map read).
    pub(crate) fn ringbuf_full(&self) -> u64 {
        self.lost(loss::RINGBUF_FULL)
    }

    /// A per-CPU loss counter, summed.
    fn lost(&self, slot: u32) -> u64 {
        self.loss
            .get(&slot, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

impl Probes {
    /// Loads the programs, seeds their maps, then attaches them. `listening` are the
    /// (network namespace, port) pairs with a listener already (their role decides how pre-existing connections are read).
    ///
    /// A missing required tracepoint fails at once, naming it. Request capture is dropped (with
    /// a warning) only when loading fails with it and succeeds without it.
    pub(crate) fn load(
        tracefs_root: &Path,
        config: &ProbeConfig,
        listening: &[(u32, u16)],
    ) -> Result<Self> {
        check_required_hooks(tracefs_root)?;
        let capture_bytes = match (SYSCALL_REGS, &config.functions.syscall_regs) {
            _ if config.capture_bytes == 0 => 0,
            (None, _) => {
                log::warn!(
                    "request capture reads syscall registers it knows on x86-64 and arm64 only, \
                     so it is off on {}: stalls are reported without request signatures",
                    std::env::consts::ARCH
                );
                0
            }
            (Some(_), Err(mismatch)) => {
                log::warn!(
                    "request capture is off: {mismatch} on this kernel (from its BTF); stalls \
                     are reported without request signatures"
                );
                0
            }
            (Some(_), Ok(())) => config.capture_bytes,
        };
        // Only the sock tracepoints see UDP: without them (older kernels, where the verifier
        // is slowest) the UDP code is left out of the programs (a constant the verifier
        // prunes), and no cgroup is needed.
        let sock_tracepoints = TRACEPOINT_TRANSFERS
            .iter()
            .all(|hook| tracefs::check_layout(tracefs_root, "sock", hook.target).is_ok());
        let udp_cgroup = if !sock_tracepoints {
            log::warn!(
                "UDP is not traced: it needs the sock_send_length/sock_recv_length tracepoints \
                 (Linux 6.3)"
            );
            None
        } else {
            cgroups::open_root()
                .inspect_err(|err| {
                    log::warn!(
                        "UDP is not traced: its closes are seen through a cgroup/sock_release \
                         program on the cgroup v2 root, and there is none ({err:#})"
                    )
                })
                .ok()
        };
        let libssl = if !config.libssl {
            Err("not asked for: --libssl turns it on".to_owned())
        } else if capture_bytes == 0 || !verdict_extras(&config.functions) {
            Err(
                "it needs request capture and Linux 6.5 or later (older verifiers refuse the \
                 programs with the TLS rules)"
                    .to_owned(),
            )
        } else {
            libssl::find()
        };
        let (mut probes, capture_error) = with_capture_fallback(capture_bytes, |bytes| {
            let hooks = Features {
                udp: udp_cgroup.is_some(),
                libssl: libssl.is_ok(),
            };
            Self::load_once(tracefs_root, config, listening, bytes, hooks)
        })?;
        probes.libssl = libssl.and_then(|path| {
            let hooks = attach_libssl(&mut probes.ebpf, &path)?;
            probes.attached.extend(hooks);
            Ok(path)
        });
        if let (true, Err(why)) = (config.libssl, &probes.libssl) {
            log::warn!(
                "TLS through libssl is not followed ({why}): TLS clients' replies are judged \
                 from their records, so a TLS 1.3 client's first request is not flagged when it \
                 stalls (the server's session tickets pass for the reply; its server is flagged)"
            );
        }
        probes.udp = match (&udp_cgroup, probes.transfers.rung) {
            (Some(root), Rung::Tracepoint) => match attach_sock_release(&mut probes.ebpf, root) {
                Ok(hook) => {
                    probes.attached.push(hook);
                    true
                }
                Err(err) => {
                    log::warn!(
                        "UDP is traced without its closes ({err:#}): a UDP socket stays listed \
                         until its entry is evicted"
                    );
                    true
                }
            },
            (Some(_), Rung::Syscall) => {
                log::warn!(
                    "UDP is not traced on the syscall rung: it does not see sendmmsg, which \
                     resolvers use to send their queries (UDP is traced with the \
                     sock_send_length/sock_recv_length tracepoints of Linux 6.3+)"
                );
                false
            }
            (Some(_), rung) => {
                log::warn!(
                    "UDP is not traced on the {} rung, which hooks TCP functions only (it is \
                     with the sock_send_length/sock_recv_length tracepoints of Linux 6.3+)",
                    rung.name()
                );
                false
            }
            (None, _) => false,
        };
        if let Some(err) = capture_error {
            log::debug!("loading with request capture failed: {err:#}");
            let why = if format!("{err:#}").contains("too large") {
                "the kernel's verifier gave up on the programs with it (1M instructions)"
            } else {
                "it needs the BPF helpers bpf_get_current_task_btf and bpf_task_pt_regs, Linux \
                 5.15"
            };
            log::warn!(
                "request capture is unavailable on this kernel ({why}; --log-level debug shows \
                 the kernel's refusal); stalls are reported without request signatures and \
                 protocol rules"
            );
        }
        Ok(probes)
    }

    fn load_once(
        tracefs_root: &Path,
        config: &ProbeConfig,
        listening: &[(u32, u16)],
        capture_bytes: u32,
        features: Features,
    ) -> Result<Self> {
        let capture_slots = if capture_bytes > 0 { CAPTURE_SLOTS } else { 1 };
        // Decided by kernel version, not by trying: a start is the same on every run.
        let extras = capture_bytes > 0 && verdict_extras(&config.functions);
        // Response heads and request runs are read from user memory like request bytes: not
        // without capture.
        let reply_heads = if capture_bytes > 0 {
            HTTP1_REPLY_HEADS
        } else {
            1
        };
        let load = |coarse_clock: u32| {
            EbpfLoader::new()
            // The programs carry no CO-RE relocations (offsets come from our own BTF read), so
            // aya need not parse the kernel's BTF: that saves ~25 MiB of peak memory.
            .btf(None)
            .override_global(
                "STALL_AFTER_NS",
                &(config.stall_after_ns + threshold_slack_ns(coarse_clock != 0)),
                true,
            )
            .override_global("OFFSETS", &config.offsets, true)
            .override_global(
                "FD_OFFSETS",
                config
                    .functions
                    .fd_offsets
                    .as_ref()
                    .unwrap_or(&FdOffsets::unknown()),
                true,
            )
            .map_max_entries("CONNS", config.max_conns)
            .map_max_entries("EVENTS", config.ring_buffer_bytes)
            .override_global("SELF_TGID", &std::process::id(), true)
            .override_global(
                "EPHEMERAL_PORTS",
                &crate::sources::procfs::ephemeral_ports(),
                true,
            )
            .override_global("CAPTURE_BYTES", &capture_bytes, true)
            .override_global("CAPTURE_SLOTS", &capture_slots, true)
            .map_max_entries("CAPTURES", capture_slots)
            .map_max_entries("HTTP1_REPLY_HEADS", reply_heads)
            .map_max_entries("HTTP1_REQUEST_RUNS", reply_heads)
            .override_global("REQUEST_RUN_SLOTS", &reply_heads, true)
            .override_global("TCP_RECVMSG_ARGS", &config.functions.tcp_recvmsg_args, true)
            .override_global("UDP_TRACED", &u32::from(features.udp), true)
            .override_global("LIBSSL_TRACED", &u32::from(features.libssl), true)
            .override_global(
                "SPLICE_READS",
                &u32::from(
                    splice_reads_possible(
                        tracefs_root,
                        &config.functions.syscall_regs,
                        &config.offsets,
                    )
                    .is_ok(),
                ),
                true,
            )
            .override_global("VERDICT_EXTRAS", &u32::from(extras), true)
            .override_global("COARSE_CLOCK", &coarse_clock, true)
            .load(OBJECT)
            .context(
                "loading the eBPF maps and programs failed; stalltrace needs Linux >= 5.8 with \
                 BPF ring buffers and tracepoints (CONFIG_BPF_SYSCALL, CONFIG_BPF_EVENTS), run \
                 as root",
            )
        };
        // The clock is fitted before any program is verified, so reloading without it costs
        // only the maps.
        let mut ebpf = load(1)?;
        let clock = kernel_clock::fit(&mut ebpf);
        if let Err(why) = &clock {
            log::warn!(
                "connection state is timed with bpf_ktime_get_ns, ~50 ns more per transfer on \
                 some machines, as jiffies could not be used: {why}"
            );
            ebpf = load(0)?;
        }
        if let Err(err) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_kernel_logger) {
            log::warn!("kernel-side log messages unavailable: {err}");
        }
        let mut maps = KernelMaps {
            conns: take_map(&mut ebpf, "CONNS")?,
            control: take_map(&mut ebpf, "CONTROL")?,
            loss: take_map(&mut ebpf, "LOSS")?,
            events: Some(take_map(&mut ebpf, "EVENTS")?),
            listen_ports: take_map(&mut ebpf, "LISTEN_PORTS")?,
            captures: take_map(&mut ebpf, "CAPTURES")?,
            capture_slots,
            http1_reply_heads: take_map(&mut ebpf, "HTTP1_REPLY_HEADS")?,
            http1_request_runs: take_map(&mut ebpf, "HTTP1_REQUEST_RUNS")?,
            request_run_slots: reply_heads,
            transfer_programs: Vec::new(),
            clock,
        };
        // Epoch 0 is what a fresh kernel entry carries: start above it so that every entry's
        // first request start is reported.
        maps.set_epoch(1)?;
        for &(netns, port) in listening {
            maps.listen_ports
                .insert(stalltrace_common::listen_key(netns, port), 1, 0)
                .with_context(|| {
                    format!("seeding listening port {port} of network namespace {netns}")
                })?;
        }
        let mut attached = attach_all(&mut ebpf, tracefs_root)?;
        let transfers = attach_transfers(&mut ebpf, tracefs_root, config, &mut attached)?;
        for hook in attached.iter().filter(|a| {
            transfers
                .rung
                .hooks()
                .iter()
                .any(|h| h.program == a.program)
        }) {
            let fd = ebpf
                .program(hook.program)
                .map(|p| p.fd().map(|fd| fd.try_clone()));
            if let Some(Ok(Ok(fd))) = fd {
                maps.transfer_programs.push(fd);
            }
        }
        let splice_reads = splice_reads_possible(
            tracefs_root,
            &config.functions.syscall_regs,
            &config.offsets,
        )
        .and_then(|()| attach_splice_reads(&mut ebpf))
        .map(|hook| {
            // Its runs skipped by the kernel's recursion guard are lost receives too.
            let fd = ebpf
                .program(hook.program)
                .map(|p| p.fd().map(|fd| fd.try_clone()));
            if let Some(Ok(Ok(fd))) = fd {
                maps.transfer_programs.push(fd);
            }
            attached.push(hook);
        });
        if let Err(why) = &splice_reads {
            log::warn!(
                "{why}: bytes a process reads from a TCP socket with splice() or sendfile() (as \
                 haproxy forwards bodies) are not counted, so such a connection's verdict may be \
                 wrong (docs/events.md, \"Bytes moved by splice\")"
            );
        }
        let stacks = match load_stack_sampling(&mut ebpf) {
            Ok(stacks) => Some(stacks),
            Err(err) => {
                log::warn!("{err:#}: spinning threads are reported without their stack");
                None
            }
        };
        let framing = capture_bytes > 0 && http1_framing(transfers.rung, &config.functions);
        // The frame walk is in the sock tracepoints' programs only (`transfer.rs`).
        let http2_streams = extras && transfers.rung == Rung::Tracepoint;
        if framing {
            let mut framed: Array<MapData, u32> = take_map(&mut ebpf, "HTTP1_FRAMED")?;
            framed
                .set(0, 1, 0)
                .context("enabling HTTP/1.x response framing in the HTTP1_FRAMED map")?;
        }
        let unix = unix_tracing(&mut ebpf, transfers.rung, &config.offsets);
        if unix.is_ok() {
            let mut traced: Array<MapData, u32> = take_map(&mut ebpf, "UNIX_TRACED")?;
            traced
                .set(0, 1, 0)
                .context("enabling Unix sockets in the UNIX_TRACED map")?;
        }
        let stats = config
            .bpf_stats
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
            .transpose()
            .context("enabling BPF run-time statistics (needs Linux >= 5.8)")?;
        Ok(Self {
            ebpf,
            attached,
            maps,
            _stats: stats,
            capture_bytes,
            stacks,
            transfers,
            udp: false,
            unix,
            http1_framing: framing,
            http2_streams,
            libssl: Err("not attached yet".to_owned()),
            splice_reads,
        })
    }

    /// Whether the Unix socket at `sock` with inode `inode` was released (closed) or its
    /// memory now holds another socket, and, if `ask_peer`, whether its peer closed: one
    /// `BPF_PROG_TEST_RUN` of `stalltrace_unix_alive` (~1 µs). [`UnixLiveness::Unknown`] when
    /// that cannot be told.
    pub(crate) fn unix_liveness(&self, sock: u64, inode: u64, ask_peer: bool) -> UnixLiveness {
        if self.unix.is_err() {
            return UnixLiveness::Unknown;
        }
        let Some(Ok(program)) = self
            .ebpf
            .program(UNIX_ALIVE_PROGRAM)
            .map(<&RawTracePoint>::try_from)
        else {
            return UnixLiveness::Unknown;
        };
        let mut options = RawTracePointRunOptions::new();
        options.args[0] = sock;
        options.args[1] = inode;
        options.args[2] = u64::from(ask_peer);
        match program.test_run(options).map(|result| result.return_value) {
            Ok(0) => UnixLiveness::Released,
            Ok(1) => UnixLiveness::Open,
            Ok(unix_alive::PEER_CLOSED_NOTHING_UNREAD) => {
                UnixLiveness::PeerClosed { unread: false }
            }
            Ok(unix_alive::PEER_CLOSED_DATA_UNREAD) => UnixLiveness::PeerClosed { unread: true },
            _ => UnixLiveness::Unknown,
        }
    }

    /// Starts sampling the user stack of thread `tid`; false when perf events are unavailable.
    pub(crate) fn sample_stacks(&mut self, tid: u32) -> bool {
        let Some(stacks) = self.stacks.as_mut() else {
            return false;
        };
        if stacks.links.contains_key(&tid) {
            return true;
        }
        let Some(program) = self.ebpf.program_mut(STACK_PROGRAM) else {
            return false;
        };
        let Ok(program) = <&mut PerfEvent>::try_from(program) else {
            return false;
        };
        match program.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::OneProcess {
                pid: tid,
                cpu: None,
            },
            SamplePolicy::Frequency(STACK_SAMPLE_HZ),
            false,
        ) {
            Ok(link) => {
                stacks.links.insert(tid, link);
                true
            }
            Err(err) => {
                log::debug!("sampling thread {tid}: {err}");
                false
            }
        }
    }

    /// Stops sampling thread `tid` and forgets its samples.
    pub(crate) fn stop_stacks(&mut self, tid: u32) {
        let Some(stacks) = self.stacks.as_mut() else {
            return;
        };
        if let Some(link) = stacks.links.remove(&tid) {
            if let Some(Ok(program)) = self
                .ebpf
                .program_mut(STACK_PROGRAM)
                .map(<&mut PerfEvent>::try_from)
            {
                let _ = program.detach(link);
            }
        }
        let keys: Vec<StackKey> = stacks
            .counts
            .keys()
            .flatten()
            .filter(|k| k.tid == tid)
            .collect();
        for key in keys {
            let _ = stacks.counts.remove(&key);
        }
    }

    /// Threads being sampled.
    pub(crate) fn sampled_threads(&self) -> Vec<u32> {
        self.stacks
            .as_ref()
            .map(|s| s.links.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The most sampled user stack of `tid`: instruction addresses, innermost first.
    pub(crate) fn top_stack(&self, tid: u32) -> Option<Vec<u64>> {
        let stacks = self.stacks.as_ref()?;
        let (key, _) = stacks
            .counts
            .iter()
            .flatten()
            .filter(|(key, _)| key.tid == tid)
            .max_by_key(|(_, count)| *count)?;
        let trace = stacks.traces.get(&key.stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|frame| frame.ip).collect())
    }

    /// The attached programs with their current kernel statistics.
    pub(crate) fn attached(&self) -> Vec<Attached> {
        let mut attached = self.attached.clone();
        for entry in &mut attached {
            let info = self.ebpf.program(entry.program).and_then(|p| p.info().ok());
            if let Some(info) = info {
                entry.run_count = info.run_count();
                entry.run_time_ns = info.run_time().as_nanos() as u64;
            }
        }
        attached
    }

    pub(crate) fn attached_count(&self) -> usize {
        self.attached.len()
    }
}

/// How many runs the kernel skipped for a program, from its fdinfo (`recursion_misses`, Linux
/// 5.12+; 0 where the kernel does not count them).
fn recursion_misses(program: &ProgramFd) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let path = format!("/proc/self/fdinfo/{}", program.as_fd().as_raw_fd());
    std::fs::read_to_string(path)
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("recursion_misses:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Checks, before anything is loaded, that the tracepoints of the required hooks exist with
/// the layout the programs expect; the error names every one that does not.
fn check_required_hooks(tracefs_root: &Path) -> Result<()> {
    let problems: Vec<String> = HOOKS
        .iter()
        .filter(|hook| hook.optional.is_none())
        .filter_map(|hook| tracefs::check_layout(tracefs_root, hook.category, hook.name).err())
        .map(|err| format!("{err:#}"))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "stalltrace cannot run on this kernel: {}\n\
         hint: it needs the tracepoint sock/inet_sock_set_state (Linux 4.16)",
        problems.join("; ")
    )
}

/// Attaches the data transfer programs of the first rung that works (or of the forced one),
/// adding them to `attached`. A rung that fails half-way is unloaded before the next is tried.
fn attach_transfers(
    ebpf: &mut Ebpf,
    tracefs_root: &Path,
    config: &ProbeConfig,
    attached: &mut Vec<Attached>,
) -> Result<TransferHooks> {
    let candidates = match config.hooks {
        Some(rung) => vec![rung],
        None => Rung::LADDER.to_vec(),
    };
    let mut passed_over = Vec::new();
    for rung in candidates {
        match attach_rung(ebpf, tracefs_root, rung, &config.functions) {
            Ok(hooks) => {
                attached.extend(hooks);
                return Ok(TransferHooks {
                    rung,
                    forced: config.hooks.is_some(),
                    passed_over,
                });
            }
            Err(err) => {
                for hook in rung.hooks() {
                    unload(ebpf, hook.program);
                }
                passed_over.push(format!("{}: {err:#}", rung.name()));
            }
        }
    }
    match config.hooks {
        Some(rung) => bail!(
            "--hooks {}: cannot hook the data transfers this way on this kernel: it needs {}; {}",
            rung.name(),
            rung.needs(),
            passed_over.join("; ")
        ),
        None => bail!(
            "stalltrace cannot hook the data transfers on this kernel; it needs one of: {}. {}",
            Rung::LADDER.map(Rung::needs).join("; or "),
            passed_over.join("; ")
        ),
    }
}

/// Loads and attaches the programs of one rung; the first failure is the error.
fn attach_rung(
    ebpf: &mut Ebpf,
    tracefs_root: &Path,
    rung: Rung,
    functions: &KernelFunctions,
) -> Result<Vec<Attached>> {
    let btf = match rung {
        Rung::Fentry => Some(aya::Btf::from_sys_fs().with_context(|| {
            format!(
                "no usable kernel BTF ({}; needs CONFIG_DEBUG_INFO_BTF)",
                crate::sources::btf::VMLINUX_BTF
            )
        })?),
        Rung::Kprobe if !kprobes_available(tracefs_root) => bail!(
            "this kernel has no kprobes (no {} and no kprobe PMU; CONFIG_KPROBES is off)",
            tracefs_root.join("kprobe_events").display()
        ),
        Rung::Syscall => {
            if let Err(missing) = &functions.fd_offsets {
                bail!("{missing}");
            }
            None
        }
        _ => None,
    };
    let mut attached = Vec::new();
    let mut loaded = Vec::new();
    for hook in rung.hooks() {
        if hook.only_if_present && !functions.has_tcp_sendpage {
            continue;
        }
        let program = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("the eBPF object has no program {}", hook.program))?;
        let label = match rung {
            Rung::Tracepoint => {
                tracefs::check_layout(tracefs_root, "sock", hook.target)?;
                let program: &mut RawTracePoint = program.try_into()?;
                load_program(hook.program, program.load())?;
                program.attach(hook.target)?;
                format!("raw_tracepoint/{}", hook.target)
            }
            Rung::Fentry => {
                let program: &mut FExit = program.try_into()?;
                let btf = btf.as_ref().expect("parsed for this rung");
                load_program(hook.program, program.load(hook.target, btf))?;
                program.attach()?;
                format!("fexit/{}", hook.target)
            }
            Rung::Syscall => {
                tracefs::check_layout(tracefs_root, "syscalls", hook.target)?;
                let program: &mut TracePoint = program.try_into()?;
                if !loaded.contains(&hook.program) {
                    load_program(hook.program, program.load())?;
                    loaded.push(hook.program);
                }
                program.attach("syscalls", hook.target)?;
                format!("tracepoint/syscalls/{}", hook.target)
            }
            Rung::Kprobe => {
                let program: &mut KProbe = program.try_into()?;
                load_program(hook.program, program.load())?;
                program.attach(hook.target, 0)?;
                let kind = if hook.program.ends_with("kretprobe") {
                    "kretprobe"
                } else {
                    "kprobe"
                };
                format!("{kind}/{}", hook.target)
            }
        };
        attached.push(Attached {
            program: hook.program,
            hook: label,
            rung,
            run_count: 0,
            run_time_ns: 0,
        });
    }
    Ok(attached)
}

/// Attaches the UDP close program to the cgroup v2 root. As a BPF link (Linux 5.7+; UDP
/// needs 6.3) it shares the cgroup with other programs and runs for every cgroup below; link
/// creation takes no flags (`Single` is 0), multiple attachment is implied.
fn attach_sock_release(ebpf: &mut Ebpf, root: &std::fs::File) -> Result<Attached> {
    const PROGRAM: &str = "stalltrace_sock_release";
    let program: &mut CgroupSock = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("the eBPF object has no program {PROGRAM}"))?
        .try_into()?;
    load_program(PROGRAM, program.load())?;
    program
        .attach(root, CgroupAttachMode::Single)
        .context("attaching cgroup/sock_release to the cgroup v2 root")?;
    Ok(Attached {
        program: PROGRAM,
        hook: "cgroup/sock_release".to_owned(),
        rung: Rung::Tracepoint,
        run_count: 0,
        run_time_ns: 0,
    })
}

/// Optional code the programs are loaded with (constants the verifier prunes).
#[derive(Clone, Copy)]
struct Features {
    /// UDP sockets are traced.
    udp: bool,
    /// A libssl was found: receives look up whether they are inside `SSL_read`.
    libssl: bool,
}

/// libssl's functions that hand the application the plaintext it receives, and their entry
/// programs (the same return program serves both).
const SSL_READ_FUNCTIONS: [(&str, &str); 2] = [
    ("SSL_read", "stalltrace_ssl_read"),
    ("SSL_read_ex", "stalltrace_ssl_read_ex"),
];
const SSL_READ_RETURN_PROGRAM: &str = "stalltrace_ssl_read_return";

/// Attaches the `SSL_read` uprobes to the library at `path`, for every process. All or
/// nothing: the returns first (an entry without its return would hold a receive back for
/// good), and on any failure every one of them is detached and unloaded.
fn attach_libssl(ebpf: &mut Ebpf, path: &Path) -> Result<Vec<Attached>, String> {
    let mut attach =
        |program: &'static str, kind: &str, functions: &[&str]| -> Result<Attached, String> {
            let probe: &mut UProbe = ebpf
                .program_mut(program)
                .ok_or_else(|| format!("the eBPF object has no program {program}"))?
                .try_into()
                .map_err(|err| format!("{program}: {err}"))?;
            probe
                .load()
                .map_err(|err| format!("loading {program}: {}", summarize_load_error(err)))?;
            for function in functions {
                probe
                    .attach(*function, path, UProbeScope::AllProcesses)
                    .map_err(|err| format!("attaching a {kind} to {function}: {err}"))?;
            }
            Ok(Attached {
                program,
                hook: format!("{kind}:{}:{}", path.display(), functions.join(",")),
                rung: Rung::Tracepoint,
                run_count: 0,
                run_time_ns: 0,
            })
        };
    let functions = SSL_READ_FUNCTIONS.map(|(function, _)| function);
    let mut hooks = Vec::new();
    let mut result =
        attach(SSL_READ_RETURN_PROGRAM, "uretprobe", &functions).map(|h| hooks.push(h));
    for (function, program) in SSL_READ_FUNCTIONS {
        result =
            result.and_then(|()| attach(program, "uprobe", &[function]).map(|h| hooks.push(h)));
    }
    if let Err(err) = result {
        unload(ebpf, SSL_READ_RETURN_PROGRAM);
        for (_, program) in SSL_READ_FUNCTIONS {
            unload(ebpf, program);
        }
        return Err(format!("{}: {err}", path.display()));
    }
    Ok(hooks)
}

/// kprobes can be created through the kprobe PMU or tracefs.
fn kprobes_available(tracefs_root: &Path) -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
        || tracefs_root.join("kprobe_events").exists()
}

/// Detaches and unloads a program of a rung that failed; one never loaded is left as it is.
fn unload(ebpf: &mut Ebpf, program: &str) {
    use aya::programs::Program;
    let result = match ebpf.program_mut(program) {
        Some(Program::RawTracePoint(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::TracePoint(p)) => p.unload(),
        Some(Program::UProbe(p)) => p.unload(),
        _ => Ok(()),
    };
    if let Err(err) = result {
        log::debug!("unloading {program}: {err}");
    }
}

/// Runs `load` with `capture_bytes`; if that fails with capture on, runs it again with capture
/// off. The capture is to blame only if that succeeds: then the first error comes back with
/// the result, for a warning. Otherwise the error without capture is the one that matters.
fn with_capture_fallback<T>(
    capture_bytes: u32,
    mut load: impl FnMut(u32) -> Result<T>,
) -> Result<(T, Option<anyhow::Error>)> {
    match load(capture_bytes) {
        Ok(loaded) => Ok((loaded, None)),
        Err(err) if capture_bytes > 0 => load(0).map(|loaded| (loaded, Some(err))),
        Err(err) => Err(err),
    }
}

const STACK_PROGRAM: &str = "stalltrace_stack";

fn load_stack_sampling(ebpf: &mut Ebpf) -> Result<StackSampling> {
    let program: &mut PerfEvent = ebpf
        .program_mut(STACK_PROGRAM)
        .context("the eBPF object has no stack sampling program")?
        .try_into()?;
    program.load().map_err(|err| {
        anyhow::anyhow!("loading the stack sampler: {}", summarize_load_error(err))
    })?;
    Ok(StackSampling {
        counts: take_map(ebpf, "STACK_COUNTS")?,
        traces: take_map(ebpf, "STACKS")?,
        links: std::collections::HashMap::new(),
    })
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Whether HTTP/1.x responses can be framed on `rung`: their byte counts must include what
/// `sendfile` sends (nginx's static files), which goes through `sock_sendmsg` from Linux 6.5
/// (before, through `tcp_sendpage`); the syscall rung sees no `sendfile` at all. Before 6.5 the
/// code is not even loaded: 6.1's verifier gives up on the transfer programs with it.
fn http1_framing(rung: Rung, functions: &KernelFunctions) -> bool {
    verdict_extras(functions) && rung != Rung::Syscall
}

/// Whether the per-protocol accounting beyond the classifier (HTTP/1.x responses, HTTP/2
/// streams, TLS clients' queued bytes, libssl) is loaded (`VERDICT_EXTRAS`): from Linux 6.5 (no
/// `tcp_sendpage`), whose verifiers take the programs with it; 6.1's gives up (1M
/// instructions processed).
fn verdict_extras(functions: &KernelFunctions) -> bool {
    !functions.has_tcp_sendpage
}

/// The raw tracepoint whose program counts the receives the transfer hooks miss.
const SPLICE_READS_TRACEPOINT: &str = "tcp_rcv_space_adjust";
const SPLICE_READS_PROGRAM: &str = "stalltrace_splice_recv";

/// Whether `splice.rs` can run here: it tells the syscalls that read without the transfer
/// hooks by their number in the task's registers (capture's layout), and computes what the
/// application read from `tcp_sock` members. `Err` says what is missing.
fn splice_reads_possible(
    tracefs_root: &Path,
    syscall_regs: &Result<(), String>,
    offsets: &Offsets,
) -> Result<(), String> {
    if SYSCALL_REGS.is_none() {
        return Err(format!(
            "splice reads are not seen on {}: they are told by syscall registers known on \
             x86-64 and arm64 only",
            std::env::consts::ARCH
        ));
    }
    if let Err(mismatch) = syscall_regs {
        return Err(format!(
            "splice reads are not seen: {mismatch} on this kernel"
        ));
    }
    if !offsets.can_read_consumed() {
        return Err(
            "splice reads are not seen: the kernel's BTF lacks tcp_sock.bytes_received, \
                    rcv_nxt or copied_seq"
                .to_owned(),
        );
    }
    tracefs::check_layout(tracefs_root, "tcp", SPLICE_READS_TRACEPOINT)
        .map_err(|err| format!("splice reads are not seen: {err:#}"))
}

/// Loads and attaches `stalltrace_splice_recv` to `tcp/tcp_rcv_space_adjust` (a raw
/// tracepoint: Linux 4.17). Its register reads need `bpf_task_pt_regs` (Linux 5.15).
fn attach_splice_reads(ebpf: &mut Ebpf) -> Result<Attached, String> {
    let program = ebpf
        .program_mut(SPLICE_READS_PROGRAM)
        .ok_or_else(|| format!("the eBPF object has no program {SPLICE_READS_PROGRAM}"))
        .and_then(|p| <&mut RawTracePoint>::try_from(p).map_err(|e| e.to_string()))?;
    load_program(SPLICE_READS_PROGRAM, program.load()).map_err(|err| {
        log::debug!("{err:#}");
        "splice reads are not seen: their program needs the BPF helpers \
         bpf_get_current_task_btf and bpf_task_pt_regs (Linux 5.15; --log-level debug shows the \
         kernel's refusal)"
            .to_owned()
    })?;
    program
        .attach(SPLICE_READS_TRACEPOINT)
        .map_err(|err| format!("splice reads are not seen: attaching failed: {err}"))?;
    Ok(Attached {
        program: SPLICE_READS_PROGRAM,
        hook: format!("raw_tracepoint/{SPLICE_READS_TRACEPOINT}"),
        rung: Rung::Tracepoint,
        run_count: 0,
        run_time_ns: 0,
    })
}

/// Unix connections are found on the rungs that see every socket's transfers (the sock
/// tracepoints, the syscall tracepoints; not the TCP functions'), need their members in the
/// kernel's BTF, and need the liveness program (their closes are seen through it): then the
/// kernel is told to track them (`UNIX_TRACED`). `Err` says what is missing.
fn unix_tracing(ebpf: &mut Ebpf, rung: Rung, offsets: &Offsets) -> Result<(), String> {
    if !matches!(rung, Rung::Tracepoint | Rung::Syscall) {
        return Err(format!(
            "Unix domain sockets are not traced on the {} rung, which hooks TCP functions only \
             (they are with the sock_send_length/sock_recv_length tracepoints of Linux 6.3+)",
            rung.name()
        ));
    }
    if !offsets.can_read_unix() {
        return Err(
            "Unix domain sockets are not traced: the kernel's BTF lacks members they need \
             (sk_type, sk_socket, unix_sock.peer/addr, unix_address, socket_alloc.vfs_inode)"
                .into(),
        );
    }
    let program = ebpf
        .program_mut(UNIX_ALIVE_PROGRAM)
        .ok_or_else(|| format!("the eBPF object has no program {UNIX_ALIVE_PROGRAM}"))
        .and_then(|p| <&mut RawTracePoint>::try_from(p).map_err(|e| e.to_string()))?;
    load_program(UNIX_ALIVE_PROGRAM, program.load()).map_err(|err| {
        format!("Unix domain sockets are not traced: their closes could not be seen: {err:#}")
    })
}

fn attach_all(ebpf: &mut Ebpf, tracefs_root: &Path) -> Result<Vec<Attached>> {
    let mut attached = Vec::new();
    for hook in HOOKS {
        let label = format!("tracepoint/{}/{}", hook.category, hook.name);
        let result = tracefs::check_layout(tracefs_root, hook.category, hook.name)
            .and_then(|()| attach(ebpf, hook));
        match (result, hook.optional) {
            (Ok(()), _) => attached.push(Attached {
                program: hook.program,
                hook: label,
                rung: Rung::Tracepoint,
                run_count: 0,
                run_time_ns: 0,
            }),
            (Err(err), Some(lost)) => log::warn!("not attaching {label}: {err:#}; {lost}"),
            // Its tracepoint exists (checked before loading): no hint about kernel versions.
            (Err(err), None) => bail!("cannot attach {label}, which stalltrace needs: {err:#}"),
        }
    }
    Ok(attached)
}

fn attach(ebpf: &mut Ebpf, hook: &Hook) -> Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("the eBPF object has no program {}", hook.program))?;
    let program: &mut TracePoint = program.try_into()?;
    load_program(hook.program, program.load())?;
    program.attach(hook.category, hook.name)?;
    Ok(())
}

fn load_program(program: &str, result: Result<(), ProgramError>) -> Result<()> {
    result.map_err(|err| anyhow::anyhow!("loading {program} failed: {}", summarize_load_error(err)))
}

/// The verifier log can run to thousands of lines: keep its conclusion in the error, the whole
/// log at debug level.
fn summarize_load_error(err: ProgramError) -> String {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() {
                // Refused before verification: the program type or attach point is unsupported.
                return format!("the kernel refused the program before verifying it ({io_error})");
            }
            log::debug!("verifier log:\n{log}");
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(6)..].join("\n  ");
            format!(
                "the kernel refused the program ({io_error}); end of the verifier log (run with \
                 --log-level debug for all of it):\n  {tail}"
            )
        }
        other => other.to_string(),
    }
}

/// Forwards aya-log records from the kernel programs to the daemon's log.
fn spawn_kernel_logger<T: log::Log + Send + 'static>(logger: aya_log::EbpfLogger<T>) {
    // SAFETY: the logger owns its ring buffer fd and keeps it open for as long as the AsyncFd.
    let Ok(mut logger) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
        log::warn!("kernel-side log messages unavailable: cannot poll the log buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_a_known_record_layout() {
        // Classic tracepoints are read through fields, which the start-up check compares with
        // the running kernel's format files; raw ones by argument position.
        for hook in HOOKS {
            let fields = tracefs::expected_fields(hook.category, hook.name)
                .unwrap_or_else(|| panic!("{}/{}: no layout", hook.category, hook.name));
            assert!(!fields.is_empty(), "{}/{}", hook.category, hook.name);
        }
        for hook in Rung::Tracepoint.hooks() {
            let fields = tracefs::expected_fields("sock", hook.target)
                .unwrap_or_else(|| panic!("sock/{}: no layout", hook.target));
            assert!(fields.is_empty(), "sock/{}: raw", hook.target);
        }
        assert!(tracefs::expected_fields("sock", "no_such_tracepoint").is_none());
    }

    #[test]
    fn every_rung_hooks_both_directions_with_programs_of_its_own() {
        let mut owner = std::collections::HashMap::new();
        for rung in Rung::LADDER {
            let hooks = rung.hooks();
            assert!(hooks.iter().any(|h| h.program.contains("send")), "{rung:?}");
            assert!(hooks.iter().any(|h| h.program.contains("recv")), "{rung:?}");
            let mut pairs = std::collections::HashSet::new();
            for hook in hooks {
                assert_eq!(
                    *owner.entry(hook.program).or_insert(rung),
                    rung,
                    "{}",
                    hook.program
                );
                assert!(
                    pairs.insert((hook.program, hook.target)),
                    "{} twice",
                    hook.target
                );
                // Optional hooks are the sendpage path only: the rest is required.
                assert_eq!(hook.only_if_present, hook.target == SENDPAGE);
            }
        }
        // The syscall rung keeps each call's socket at its entry for its exit: both hooked,
        // and the exit's direction matches the call.
        let targets: Vec<&str> = Rung::Syscall.hooks().iter().map(|h| h.target).collect();
        for hook in Rung::Syscall.hooks() {
            let Some(call) = hook.target.strip_prefix("sys_exit_") else {
                continue;
            };
            assert!(
                targets.contains(&format!("sys_enter_{call}").as_str()),
                "{call}"
            );
            let receives = matches!(call, "read" | "readv" | "recvfrom" | "recvmsg");
            assert_eq!(hook.program.ends_with("recv"), receives, "{call}");
            assert!(
                tracefs::expected_fields("syscalls", hook.target).is_some_and(|f| !f.is_empty())
            );
        }
    }

    #[test]
    fn tcp_recvmsg_shape_follows_the_kernel() {
        let shape = |f: &KernelFunctions| (f.tcp_recvmsg_args, f.has_tcp_sendpage);
        for (release, expected) in [
            ("5.10.0-32-amd64", (6, true)),
            ("6.1.0-57-amd64", (5, true)),
            ("6.12.117+deb13-amd64", (5, false)),
        ] {
            let functions = KernelFunctions::from_release(release);
            assert_eq!(shape(&functions), expected, "{release}");
            assert!(functions.fd_offsets.is_err(), "no BTF, no syscall rung");
        }
        // The running kernel's BTF says the same as its version, has the path from a
        // descriptor to its socket, and its registers are where capture reads them.
        let btf = crate::sources::btf::from_kernel().unwrap();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let from_btf = KernelFunctions::from_btf(&btf).unwrap();
        assert_eq!(
            shape(&from_btf),
            shape(&KernelFunctions::from_release(release.trim()))
        );
        assert!(from_btf.fd_offsets.is_ok(), "{:?}", from_btf.fd_offsets);
        assert_eq!(from_btf.syscall_regs, Ok(()));
    }

    #[test]
    fn capture_is_refused_registers_the_kernel_does_not_have_there() {
        let btf = crate::sources::btf::from_kernel().unwrap();
        let mut layout = SYSCALL_REGS.expect("capture knows this architecture's registers");
        assert_eq!(check_syscall_regs(&btf, &layout), Ok(()));
        layout.nr.offset += 8;
        let mismatch = check_syscall_regs(&btf, &layout).unwrap_err();
        assert!(mismatch.contains("capture reads"), "{mismatch}");
        layout.nr.offset -= 8;
        layout.arg2.path = &["no_such_register"];
        let missing = check_syscall_regs(&btf, &layout).unwrap_err();
        assert!(missing.contains("no member no_such_register"), "{missing}");
    }

    /// A tracefs with a `format` file, in the layout the programs expect, for each of
    /// `tracepoints` (category/name).
    fn fake_tracefs(name: &str, tracepoints: &[&str]) -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("stalltrace-probes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for tracepoint in tracepoints {
            let (category, event) = tracepoint.split_once('/').unwrap();
            let mut format = format!("name: {event}\nformat:\n");
            for (field, (offset, size)) in tracefs::expected_fields(category, event).unwrap() {
                format.push_str(&format!(
                    "\tfield:int {field};\toffset:{offset};\tsize:{size};\tsigned:0;\n"
                ));
            }
            let dir = root.join("events").join(tracepoint);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("format"), format).unwrap();
        }
        root
    }

    #[test]
    fn splice_reads_need_their_tracepoint_the_registers_and_tcp_sock_members() {
        let btf = crate::sources::btf::from_kernel().unwrap();
        let (offsets, _) = crate::sources::btf::resolve_offsets(&btf);
        assert!(offsets.can_read_consumed(), "this kernel's BTF has them");
        let root = fake_tracefs("splice", &["tcp/tcp_rcv_space_adjust"]);
        assert_eq!(splice_reads_possible(&root, &Ok(()), &offsets), Ok(()));
        let why = splice_reads_possible(&root, &Ok(()), &Offsets::unknown()).unwrap_err();
        assert!(why.contains("tcp_sock.bytes_received"), "{why}");
        let why = splice_reads_possible(&root, &Err("no pt_regs".into()), &offsets).unwrap_err();
        assert!(why.contains("no pt_regs"), "{why}");
        std::fs::remove_dir_all(root).unwrap();
        let root = fake_tracefs("no-splice", &["sock/inet_sock_set_state"]);
        let why = splice_reads_possible(&root, &Ok(()), &offsets).unwrap_err();
        assert!(why.contains("tcp/tcp_rcv_space_adjust"), "{why}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_missing_required_tracepoint_is_named_before_anything_loads() {
        let root = fake_tracefs("missing", &["sock/sock_send_length"]);
        let err = format!("{:#}", check_required_hooks(&root).unwrap_err());
        assert!(
            err.contains("tracepoint sock/inet_sock_set_state is not available"),
            "{err}"
        );
        assert!(!err.contains("capture"), "{err}");
        std::fs::remove_dir_all(root).unwrap();

        // Optional hooks (tcp/*) may be missing, and so may the sock tracepoints of the
        // transfers (other rungs take over).
        let root = fake_tracefs("required", &["sock/inet_sock_set_state"]);
        check_required_hooks(&root).unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn capture_is_blamed_only_when_loading_without_it_works() {
        // Fails with capture, works without: capture dropped, with the reason.
        let mut tries = Vec::new();
        let (loaded, capture_error) = with_capture_fallback(64, |bytes| {
            tries.push(bytes);
            if bytes > 0 {
                anyhow::bail!("bpf_task_pt_regs unknown")
            }
            Ok("loaded")
        })
        .unwrap();
        assert_eq!((loaded, tries), ("loaded", vec![64, 0]));
        assert!(capture_error.unwrap().to_string().contains("pt_regs"));

        // Fails either way: the error without capture, and no capture warning to give.
        let err = with_capture_fallback(64, |bytes| -> Result<()> {
            anyhow::bail!("ring buffers unsupported (capture {bytes})")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "ring buffers unsupported (capture 0)");

        // Works at once: no warning.
        let (_, capture_error) = with_capture_fallback(64, |_| Ok(())).unwrap();
        assert!(capture_error.is_none());

        // Capture off and failing: one try, its error.
        let mut tries = 0;
        let err = with_capture_fallback(0, |_| -> Result<()> {
            tries += 1;
            anyhow::bail!("no BPF")
        })
        .unwrap_err();
        assert_eq!((err.to_string(), tries), ("no BPF".to_owned(), 1));
    }
}
