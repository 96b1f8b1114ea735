//! TLS clients: bytes that sat unread in the receive queue when a request was sent cannot be
//! its reply (`transfer::received_before_request`). A pre-warmed TLS 1.3 pool connection holds
//! the server's NewSessionTickets, unread, until its first request's first read: by their
//! record headers they look like the reply. Needs no libssl: it holds for any TLS library.
//! (The tickets of a connection whose first request follows the handshake at once usually
//! arrive after the request: `libssl.rs` covers those for OpenSSL clients.)
//!
//! Cost: at a TLS client's request start, two reads of the socket's sequence numbers, and a
//! map insert when something was queued (rare); at each of its receives while a request is
//! outstanding, one map lookup.
use aya_ebpf::{macros::map, maps::LruHashMap};
use stalltrace_common::{transfer::received_before_request, ConnState};

use crate::{kernel_read::unread_sequence, maps::OFFSETS};

/// Per TLS client connection (`struct sock` address) whose request found bytes queued: that
/// request's number (`ConnState::requests`, truncated) and the queued bytes not yet read. LRU:
/// an entry evicted, or left by a closed socket, costs only that rule (its number no longer
/// matches).
#[map]
static TLS_QUEUED: LruHashMap<u64, [u32; 2]> = LruHashMap::with_max_entries(65536, 0);

/// A request is starting on TLS client connection `sock` (it will be counted next): remembers
/// what was queued unread.
#[inline(always)]
pub(crate) fn mark(sock: u64, conn: &ConnState) {
    match unread_sequence(sock, &OFFSETS.load()) {
        Some(queued) if queued > 0 => {
            let request = conn.requests.wrapping_add(1) as u32;
            let _ = TLS_QUEUED.insert(sock, [request, queued], 0);
        }
        _ => {}
    }
}

/// Whether a receive of `bytes` on TLS client connection `sock`, whose request is outstanding,
/// read only bytes queued before that request.
#[inline(always)]
pub(crate) fn received_before(sock: u64, conn: &ConnState, bytes: u64) -> bool {
    let Some(entry) = TLS_QUEUED.get_ptr_mut(sock) else {
        return false;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let entry = unsafe { &mut *entry };
    entry[0] == conn.requests as u32 && received_before_request(&mut entry[1], bytes)
}
