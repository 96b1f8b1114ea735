//! stalltrace's kernel programs, one concern per file. Tracepoints wherever the kernel has them;
//! the data transfers fall back to fexit or kprobes on kernels older than their tracepoints.
//!
//! - `tcp_state`: connection open/close and listening ports (`sock/inet_sock_set_state`);
//! - `transfer`: bytes each way and request/reply turns (`sock/sock_{send,recv}_length`);
//! - `transfer_functions`: the same from `tcp_sendmsg`/`tcp_recvmsg` (Linux < 6.3);
//! - `syscall_transfers`: the same from the syscall tracepoints (the last resort);
//! - `tcp_signals`: retransmits and received resets (`tcp/*`);
//! - `udp`: UDP request/response flows (the same transfer hooks; closes from
//!   `cgroup/sock_release`).
//! - `tls_queue`: TLS clients: bytes queued before a request are no reply.
//! - `libssl`: TLS clients' replies counted when libssl's `SSL_read` returns plaintext
//!   (uprobes on the system's libssl).
//! - `unix`: Unix stream/seqpacket connections, found through the same transfer tracepoints.
//! - `splice`: TCP receives those hooks miss (`splice`/`sendfile` from a socket), from
//!   `tcp/tcp_rcv_space_adjust`.
//! - `http2`: per-stream accounting of HTTP/2 connections (called from `transfer`).
//! - `clock`: the coarse clock of connection state, and its samples for the daemon.
//!
//! Per-connection state lives in the `CONNS` LRU map; the ring buffer carries only lifecycle
//! events and request starts: a connection's first, then at most one per sweep epoch (see
//! `transfer.rs`).
//! Logic userspace also needs (the transfer accounting) lives in `stalltrace_common`, not here.
//! Every instruction here runs on someone else's syscall: do the least that keeps the daemon
//! correct, and leave interpretation to userspace.
#![no_std]
#![no_main]

mod capture;
mod clock;
mod conn;
mod http1;
mod http2;
mod kernel_read;
mod libssl;
mod maps;
mod splice;
mod stacks;
mod syscall_transfers;
mod tcp_signals;
mod tcp_state;
mod tls_queue;
mod transfer;
mod transfer_functions;
mod udp;
mod unix;
mod words;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
