//! The tracked connections and their indexes: by kernel sock address (the key of every kernel
//! record), by connection id (API queries, blame links), by endpoints (blame chains, sock_diag
//! and /proc joins) and the set of open stalls. Only the methods here insert or remove a
//! connection, so the indexes cannot fall out of step; nobody scans the table to find one.
use std::{
    collections::{hash_map::RandomState, HashMap, HashSet},
    hash::{BuildHasher as _, BuildHasherDefault, Hasher},
};

use stalltrace_common::ConnState;

use super::{model::Endpoints, Conn, Detail, Event};

/// Hashes `struct sock` addresses. The kernel chooses them, so SipHash's protection against
/// chosen keys buys nothing, and it cost 5 % of the event pipeline; the 64-bit finalizer mix
/// the kernel side uses for its capture slots spreads the addresses' aligned low bits.
#[derive(Default, Clone, Copy)]
pub struct SockHasher(u64);

impl Hasher for SockHasher {
    fn finish(&self) -> u64 {
        stalltrace_common::mix_sock(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A map keyed by `struct sock` address (or by connection id: both are kernel- or
/// daemon-chosen integers).
pub(super) type BySock<V> = HashMap<u64, V, BuildHasherDefault<SockHasher>>;

/// The indexes cost 2 × 16 bytes (plus the hash tables' slack) per connection: 200 000
/// connections add about 8 MiB.
#[derive(Default)]
pub(super) struct Table {
    /// Connections the kernel tracks, by `struct sock` address. Boxed: growing the table
    /// moves 8 bytes per connection, not the whole record (a burst's growth from 131 072 to
    /// 262 144 slots moved 30 MB in one step and held the loop 40 ms, 180 ms with both cores
    /// busy), and its empty slots cost 8 bytes.
    kernel: BySock<Box<Conn>>,
    /// Connections found in /proc that the kernel has not reported yet (a start-up affair).
    adopted: HashMap<Endpoints, Conn>,
    /// Connection id → sock address, for kernel-tracked connections.
    by_id: BySock<u64>,
    /// Connection id → endpoints, for adopted connections.
    adopted_ids: HashMap<u64, Endpoints>,
    /// Hash of the endpoints → sock address, for kernel-tracked connections. Lookups compare
    /// the endpoints, so a hash collision is a miss, never a wrong answer. Two records may
    /// briefly share endpoints (a 4-tuple reused before the old record's close was seen): the
    /// newer one is indexed.
    by_endpoints: BySock<u64>,
    /// Unix socket inode → sock address, for Unix connections (a thread blocked on a Unix
    /// socket fd is joined to its connection by the fd's inode).
    unix_inodes: BySock<u64>,
    /// Keys the endpoint hash, so that peers cannot choose colliding endpoints.
    endpoint_hasher: RandomState,
    /// Ids of connections with an open stall, kept from the stall events themselves.
    stalled: HashSet<u64, BuildHasherDefault<SockHasher>>,
}

impl Table {
    pub(super) fn len(&self) -> usize {
        self.kernel.len() + self.adopted.len()
    }

    pub(super) fn get(&self, sock: u64) -> Option<&Conn> {
        self.kernel.get(&sock).map(|conn| &**conn)
    }

    pub(super) fn get_mut(&mut self, sock: u64) -> Option<&mut Conn> {
        self.kernel.get_mut(&sock).map(|conn| &mut **conn)
    }

    pub(super) fn contains(&self, sock: u64) -> bool {
        self.kernel.contains_key(&sock)
    }

    pub(super) fn has_adopted(&self) -> bool {
        !self.adopted.is_empty()
    }

    /// Every connection, with its kernel key when the kernel knows it.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Option<u64>, &Conn)> {
        let tracked = self
            .kernel
            .iter()
            .map(|(sock, conn)| (Some(*sock), &**conn));
        tracked.chain(self.adopted.values().map(|conn| (None, conn)))
    }

    pub(super) fn socks(&self) -> impl Iterator<Item = u64> + '_ {
        self.kernel.keys().copied()
    }

    fn endpoint_key(&self, endpoints: &Endpoints) -> u64 {
        self.endpoint_hasher.hash_one(endpoints)
    }

    pub(super) fn insert(&mut self, sock: u64, conn: Conn) {
        self.by_id.insert(conn.id, sock);
        if let Some(inodes) = conn.endpoints.unix_inodes() {
            self.unix_inodes.insert(inodes.local, sock);
        }
        self.by_endpoints
            .insert(self.endpoint_key(&conn.endpoints), sock);
        if let Some(old) = self.kernel.insert(sock, Box::new(conn)) {
            self.forget(sock, &old);
        }
    }

    pub(super) fn remove(&mut self, sock: u64) -> Option<Conn> {
        let conn = self.kernel.remove(&sock)?;
        self.forget(sock, &conn);
        Some(*conn)
    }

    pub(super) fn insert_adopted(&mut self, conn: Conn) {
        self.adopted_ids.insert(conn.id, conn.endpoints);
        self.adopted.insert(conn.endpoints, conn);
    }

    /// Takes an adopted connection out (the kernel now reports it, or it closed). An open
    /// stall stays noted: the caller keeps the connection under the same id or ends it.
    pub(super) fn remove_adopted(&mut self, endpoints: &Endpoints) -> Option<Conn> {
        let conn = self.adopted.remove(endpoints)?;
        self.adopted_ids.remove(&conn.id);
        Some(conn)
    }

    /// The id of the adopted connection with these endpoints.
    pub(super) fn adopted_id(&self, endpoints: &Endpoints) -> Option<u64> {
        self.adopted.get(endpoints).map(|conn| conn.id)
    }

    pub(super) fn adopted_by_id_mut(&mut self, id: u64) -> Option<&mut Conn> {
        let endpoints = self.adopted_ids.get(&id)?;
        self.adopted.get_mut(endpoints)
    }

    /// Drops the index entries of a record that left `kernel` (unless a newer record took them).
    fn forget(&mut self, sock: u64, conn: &Conn) {
        if self.by_id.get(&conn.id) == Some(&sock) {
            self.by_id.remove(&conn.id);
            self.stalled.remove(&conn.id);
        }
        self.unindex_endpoints(sock, &conn.endpoints);
        if let Some(inodes) = conn.endpoints.unix_inodes() {
            if self.unix_inodes.get(&inodes.local) == Some(&sock) {
                self.unix_inodes.remove(&inodes.local);
            }
        }
    }

    fn unindex_endpoints(&mut self, sock: u64, endpoints: &Endpoints) {
        let key = self.endpoint_key(endpoints);
        if self.by_endpoints.get(&key) == Some(&sock) {
            self.by_endpoints.remove(&key);
        }
    }

    /// Takes what a newer kernel snapshot of `sock` knows better, keeping the endpoint index
    /// in step (a `connect()` gets its local port after the first snapshot).
    pub(super) fn refresh(&mut self, sock: u64, state: &ConnState) {
        let Some(conn) = self.kernel.get_mut(&sock) else {
            return;
        };
        let before = conn.endpoints;
        conn.refresh(state);
        let after = conn.endpoints;
        if before != after {
            self.unindex_endpoints(sock, &before);
            self.by_endpoints.insert(self.endpoint_key(&after), sock);
        }
    }

    /// Completes the identity of two Unix ends, `sock` and its peer `peer_sock`: an end first
    /// seen before its peer was accepted could not read the peer's inode (an accepted socket
    /// has none until `accept()`), which the peer's own entry has. Both must agree on the
    /// inode they know.
    pub(super) fn link_unix_peers(&mut self, sock: u64, peer_sock: u64) {
        let ends = |table: &Self, sock| {
            let conn = table.kernel.get(&sock)?;
            conn.endpoints.unix_inodes()
        };
        let (Some(mine), Some(theirs)) = (ends(self, sock), ends(self, peer_sock)) else {
            return;
        };
        for (sock, own, other, expected_other) in [
            (sock, mine.local, theirs.local, mine.peer),
            (peer_sock, theirs.local, mine.local, theirs.peer),
        ] {
            // Only a missing inode is filled, and only between ends that name each other.
            let pair_agrees = mine.peer == theirs.local || theirs.peer == mine.local;
            if expected_other == 0 && own != 0 && other != 0 && pair_agrees {
                self.set_endpoints(sock, Endpoints::unix(own, other));
            }
        }
    }

    fn set_endpoints(&mut self, sock: u64, endpoints: Endpoints) {
        let Some(conn) = self.kernel.get_mut(&sock) else {
            return;
        };
        let before = std::mem::replace(&mut conn.endpoints, endpoints);
        self.unindex_endpoints(sock, &before);
        self.by_endpoints
            .insert(self.endpoint_key(&endpoints), sock);
    }

    /// A connection by id, with its kernel key.
    pub(super) fn by_id(&self, id: u64) -> Option<(Option<u64>, &Conn)> {
        if let Some(&sock) = self.by_id.get(&id) {
            return self.kernel.get(&sock).map(|conn| (Some(sock), &**conn));
        }
        let endpoints = self.adopted_ids.get(&id)?;
        self.adopted.get(endpoints).map(|conn| (None, conn))
    }

    /// A Unix connection end by its socket's inode, with its kernel key.
    pub(super) fn by_unix_inode(&self, inode: u64) -> Option<(Option<u64>, &Conn)> {
        let sock = *self.unix_inodes.get(&inode)?;
        let conn = self.kernel.get(&sock)?;
        (conn.endpoints.unix_inodes()?.local == inode).then_some((Some(sock), conn))
    }

    /// A connection by its endpoints, with its kernel key.
    pub(super) fn by_endpoints(&self, endpoints: &Endpoints) -> Option<(Option<u64>, &Conn)> {
        let key = self.endpoint_key(endpoints);
        if let Some(&sock) = self.by_endpoints.get(&key) {
            let found = self.kernel.get(&sock).filter(|c| &c.endpoints == endpoints);
            if let Some(conn) = found {
                return Some((Some(sock), conn));
            }
        }
        self.adopted.get(endpoints).map(|conn| (None, conn))
    }

    /// Takes note of the stalls that `events` open and end.
    pub(super) fn note_stalls(&mut self, events: &[Event]) {
        for event in events {
            match event.detail {
                Detail::StallStart { .. } => {
                    self.stalled.insert(event.conn.id);
                }
                Detail::StallEnd { .. } | Detail::Close(_) => {
                    self.stalled.remove(&event.conn.id);
                }
                _ => {}
            }
        }
    }

    /// Connections with an open stall, in no particular order.
    pub(super) fn stalled(&self) -> impl Iterator<Item = &Conn> {
        self.stalled
            .iter()
            .filter_map(|id| self.by_id(*id))
            .map(|(_, conn)| conn)
    }

    pub(super) fn stalled_count(&self) -> usize {
        self.stalled.len()
    }

    /// Gives back the capacity a burst of connections left behind. True when it did.
    pub(super) fn compact(&mut self) -> bool {
        let live = self.kernel.len().max(1024);
        if self.kernel.capacity() <= 4 * live {
            return false;
        }
        self.kernel.shrink_to(2 * live);
        self.by_id.shrink_to(2 * live);
        self.by_endpoints.shrink_to(2 * live);
        self.unix_inodes.shrink_to(2 * live);
        true
    }
}
