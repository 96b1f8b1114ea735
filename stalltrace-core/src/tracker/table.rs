//! The tracked connections and their indexes: by kernel sock address (the key of every kernel
//! record), by connection id (API queries, blame links), by endpoints (blame chains, sock_diag
//! and /proc joins) and the set of open stalls. Only the methods here insert or remove a
//! connection, so the indexes cannot fall out of step; nobody scans the table to find one.
use std::{
    collections::{hash_map::RandomState, HashMap, HashSet},
    hash::{BuildHasher as _, BuildHasherDefault, Hasher},
};

use hashbrown::HashTable;

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

/// An index of the connections in [`Table::kernel`] by a key of their records (id,
/// endpoints): it holds only their sock addresses (8 bytes a slot, where a map would hold the
/// key too), hashed by the key the record holds and compared through the record. So every
/// sock in it must be in `kernel`, its record's key unchanged since it was indexed: entries
/// are removed before a record leaves `kernel` or its key changes.
#[derive(Default)]
struct Index(HashTable<u64>);

impl Index {
    /// The sock of the record at `hash` that `is_it` accepts.
    fn get(&self, hash: u64, mut is_it: impl FnMut(u64) -> bool) -> Option<u64> {
        self.0.find(hash, |&sock| is_it(sock)).copied()
    }

    /// Indexes `sock` at `hash`, in place of the entry `same_key` accepts if there is one;
    /// `rehash` gives an indexed sock's hash when the table grows.
    fn insert(
        &mut self,
        hash: u64,
        sock: u64,
        mut same_key: impl FnMut(u64) -> bool,
        rehash: impl Fn(u64) -> u64,
    ) {
        match self.0.find_mut(hash, |&other| same_key(other)) {
            Some(slot) => *slot = sock,
            None => {
                self.0.insert_unique(hash, sock, |&other| rehash(other));
            }
        }
    }

    /// Drops `sock`'s entry at `hash`; false when it was not indexed there.
    fn remove(&mut self, hash: u64, sock: u64) -> bool {
        match self.0.find_entry(hash, |&other| other == sock) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }
}

/// The indexes by id and endpoints cost 8 bytes a slot: with 200 000 connections (262 144
/// slots each, and a control byte a slot), 4.5 MiB for the two.
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
    by_id: Index,
    /// Connection id → endpoints, for adopted connections.
    adopted_ids: HashMap<u64, Endpoints>,
    /// Endpoints → sock address, for kernel-tracked connections. Two records may briefly
    /// share endpoints (a 4-tuple reused before the old record's close was seen): the newer
    /// one is indexed.
    by_endpoints: Index,
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

    fn id_key(id: u64) -> u64 {
        BuildHasherDefault::<SockHasher>::default().hash_one(id)
    }

    pub(super) fn insert(&mut self, sock: u64, conn: Conn) {
        // The record it replaces leaves the indexes first: they hash through the records.
        self.remove(sock);
        let (id, endpoints) = (conn.id, conn.endpoints);
        if let Some(inodes) = endpoints.unix_inodes() {
            self.unix_inodes.insert(inodes.local, sock);
        }
        self.kernel.insert(sock, Box::new(conn));
        let kernel = &self.kernel;
        self.by_id.insert(
            Self::id_key(id),
            sock,
            |_| false,
            |other| kernel.get(&other).map_or(0, |conn| Self::id_key(conn.id)),
        );
        self.index_endpoints(sock, &endpoints);
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

    pub(super) fn adopted_endpoints(&self) -> impl Iterator<Item = &Endpoints> {
        self.adopted.keys()
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
        if self.by_id.remove(Self::id_key(conn.id), sock) {
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
        self.by_endpoints.remove(self.endpoint_key(endpoints), sock);
    }

    /// Indexes `sock` (in `kernel`) by `endpoints`, its record's, in place of an older record
    /// with the same.
    fn index_endpoints(&mut self, sock: u64, endpoints: &Endpoints) {
        let (kernel, hasher) = (&self.kernel, &self.endpoint_hasher);
        self.by_endpoints.insert(
            hasher.hash_one(endpoints),
            sock,
            |other| {
                kernel
                    .get(&other)
                    .is_some_and(|c| c.endpoints == *endpoints)
            },
            |other| {
                kernel
                    .get(&other)
                    .map_or(0, |c| hasher.hash_one(c.endpoints))
            },
        );
    }

    /// Takes what a newer kernel snapshot of `sock` knows better, keeping the endpoint index
    /// in step (a `connect()` gets its local port after the first snapshot). True when the
    /// endpoints changed.
    pub(super) fn refresh(&mut self, sock: u64, state: &ConnState) -> bool {
        let Some(conn) = self.kernel.get_mut(&sock) else {
            return false;
        };
        let before = conn.endpoints;
        conn.refresh(state);
        let after = conn.endpoints;
        if before != after {
            self.unindex_endpoints(sock, &before);
            self.index_endpoints(sock, &after);
        }
        before != after
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
        self.index_endpoints(sock, &endpoints);
    }

    /// A connection by id, with its kernel key.
    pub(super) fn by_id(&self, id: u64) -> Option<(Option<u64>, &Conn)> {
        let kernel = &self.kernel;
        let found = self.by_id.get(Self::id_key(id), |sock| {
            kernel.get(&sock).is_some_and(|conn| conn.id == id)
        });
        if let Some(sock) = found {
            return kernel.get(&sock).map(|conn| (Some(sock), &**conn));
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
        let kernel = &self.kernel;
        let key = self.endpoint_key(endpoints);
        let found = self.by_endpoints.get(key, |sock| {
            kernel
                .get(&sock)
                .is_some_and(|conn| conn.endpoints == *endpoints)
        });
        if let Some(sock) = found {
            return kernel.get(&sock).map(|conn| (Some(sock), &**conn));
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
        let (kernel, hasher) = (&self.kernel, &self.endpoint_hasher);
        self.by_id.0.shrink_to(2 * live, |sock| {
            kernel.get(sock).map_or(0, |c| Self::id_key(c.id))
        });
        self.by_endpoints.0.shrink_to(2 * live, |sock| {
            kernel.get(sock).map_or(0, |c| hasher.hash_one(c.endpoints))
        });
        self.unix_inodes.shrink_to(2 * live);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::super::model::{Owner, Role, Transport};
    use super::*;

    fn endpoints(port: u16) -> Endpoints {
        Endpoints {
            transport: Transport::Tcp,
            local: IpAddr::V4(Ipv4Addr::LOCALHOST),
            local_port: port,
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            peer_port: 5432,
            netns: 1,
        }
    }

    fn conn(id: u64, port: u16) -> Conn {
        Conn::new(id, Role::Client, endpoints(port), Owner::default(), 1)
    }

    fn found(table: &Table, id: u64, port: u16) -> (Option<u64>, Option<u64>) {
        let by_id = table.by_id(id).map(|(sock, c)| (sock.unwrap(), c.id));
        let by_endpoints = table.by_endpoints(&endpoints(port));
        assert!(by_id.is_none_or(|(_, found)| found == id));
        (
            by_id.map(|(sock, _)| sock),
            by_endpoints.map(|(s, _)| s.unwrap()),
        )
    }

    #[test]
    fn indexes_follow_inserts_replacements_moves_and_removals_through_growth() {
        let mut table = Table::default();
        // Enough records to grow the indexes many times (each growth rehashes through them).
        for i in 0..20_000u64 {
            table.insert(0x1000 + i, conn(i + 1, 10_000 + i as u16 % 40_000));
        }
        for i in (0..20_000u64).step_by(997) {
            let port = 10_000 + i as u16 % 40_000;
            assert_eq!(
                found(&table, i + 1, port),
                (Some(0x1000 + i), Some(0x1000 + i))
            );
        }
        // A reused sock address: the old record leaves both indexes.
        table.insert(0x1000, conn(50_001, 60_000));
        assert_eq!(found(&table, 1, 10_000), (None, None));
        assert_eq!(found(&table, 50_001, 60_000), (Some(0x1000), Some(0x1000)));
        // A 4-tuple reused before the old record's close: the newer record is indexed; its
        // removal leaves the older one unindexed, and the older one's removal changes nothing.
        table.insert(0x9_0000, conn(50_002, 10_001));
        assert_eq!(found(&table, 50_002, 10_001).1, Some(0x9_0000));
        assert_eq!(found(&table, 2, 10_001).0, Some(0x1001));
        assert!(table.remove(0x9_0000).is_some());
        assert_eq!(found(&table, 2, 10_001), (Some(0x1001), None));
        // Endpoints that change (a connect()'s local port, a Unix peer's inode).
        table.set_endpoints(0x1003, endpoints(61_000));
        assert_eq!(found(&table, 4, 61_000), (Some(0x1003), Some(0x1003)));
        assert_eq!(table.by_endpoints(&endpoints(10_003)).map(|(s, _)| s), None);
        // Most leave: the indexes shrink and still find the rest.
        for i in 10..20_000u64 {
            assert!(table.remove(0x1000 + i).is_some());
        }
        assert!(table.compact());
        assert_eq!(found(&table, 5, 10_004), (Some(0x1004), Some(0x1004)));
        assert_eq!(found(&table, 11, 10_010), (None, None));
        assert_eq!(table.len(), 10);
    }
}
