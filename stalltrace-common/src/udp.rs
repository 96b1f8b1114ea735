//! The UDP request/response rule: what one datagram does to a UDP socket's [`ConnState`].
//!
//! Run by the kernel programs on every datagram of a tracked UDP socket, and by the tracker's
//! tests, like [`crate::transfer`] for TCP. A UDP socket's entry follows one peer: the one it is
//! connected to, or, for an unconnected socket, the first one it sends to. Only the client
//! side is judged (the socket that sent first, `role::CLIENT`), and only once the flow has
//! shown request/response behaviour ([`judged`]): a datagram came back from the peer after
//! one was sent to it, or the protocol answers every request (DNS). One-way traffic (syslog,
//! statsd, metrics) never gets there, so it is never outstanding and never a stall.
//!
//! While an exchange is outstanding (`last_dir` OUT), more datagrams to the peer do not
//! restart its quiet: a resent query is the same request, and the wait counts from the first
//! one. On DNS, each query's id is kept (two at a time: glibc sends A and AAAA together); a
//! datagram carrying an id already sent is a retry, and the exchange ends when every query
//! it carries was answered (a late answer to an earlier exchange ends nothing).
use crate::{direction, message::proto, role, transfer::Turn, ConnState};

/// Bits of [`ConnState::udp_flags`].
pub mod flags {
    /// A datagram came from the peer after one was sent to it: it answers.
    pub const ANSWERED: u8 = 1 << 0;
    /// The socket is connected (`connect()`): the peer is the kernel's, and every datagram
    /// received is from it. Otherwise the source of a received datagram is not known to the
    /// hooks, and it is taken to be the peer this entry follows.
    pub const CONNECTED: u8 = 1 << 1;
    /// The peer is a multicast or broadcast address: answers come from other addresses, so
    /// the flow is never judged.
    pub const ONE_TO_MANY: u8 = 1 << 2;
}

/// The flow's exchanges are judged: a client that has seen an answer from its peer, or that
/// speaks DNS, to a unicast peer.
#[inline(always)]
pub fn judged(conn: &ConnState) -> bool {
    conn.role == role::CLIENT
        && conn.udp_flags & flags::ONE_TO_MANY == 0
        && (conn.udp_flags & flags::ANSWERED != 0 || conn.proto == proto::DNS)
}

/// The 12-byte header of a DNS query as the first bytes of a datagram: QR 0, opcode QUERY,
/// one question, no answer or authority records, at most one additional (EDNS OPT), and a
/// first label length of 0–63. Bytes past the datagram are zeros (see `message::Head`), so a
/// short datagram fails the question count.
#[inline(always)]
pub fn looks_like_dns_query(head: &[u8]) -> bool {
    let byte = |i: usize| head.get(i).copied().unwrap_or(0xff);
    byte(2) & 0xf8 == 0
        && byte(4) == 0
        && byte(5) == 1
        && byte(6) == 0
        && byte(7) == 0
        && byte(8) == 0
        && byte(9) == 0
        && byte(10) == 0
        && byte(11) <= 1
        && byte(12) <= 63
}

/// The query id of a DNS message starting with `head` (its first two bytes, network order).
#[inline(always)]
pub fn dns_id(head: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*head.first()?, *head.get(1)?]))
}

/// The peer address (network order; IPv4 in the first 4 bytes) is multicast or broadcast.
#[inline(always)]
pub fn one_to_many(family: u16, addr: &[u8; 16]) -> bool {
    if family == crate::AF_INET6 {
        // ff00::/8, and IPv4-mapped multicast/broadcast.
        let mapped = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
        addr[0] == 0xff || (mapped && (addr[12] & 0xf0 == 0xe0 || addr[12..16] == [0xff; 4]))
    } else {
        addr[0] & 0xf0 == 0xe0 || addr[..4] == [0xff; 4]
    }
}

/// Records a datagram of `bytes` in direction `dir` at `now` (ns). `from_peer`: a received
/// datagram comes from the peer this entry follows, or a sent one goes to it (false: counted,
/// nothing else). `id`: the DNS query id it carries, when the flow is DNS and its first bytes
/// were read. Returns what it did to the exchange ([`Turn::RequestStarted`] when an exchange
/// began, [`Turn::ReplyStarted`] when it was answered, else [`Turn::Continued`];
/// [`Turn::Unsolicited`] for a first answer that makes the flow judged).
#[inline(always)]
pub fn record_datagram(
    conn: &mut ConnState,
    dir: u8,
    bytes: u64,
    now: u64,
    from_peer: bool,
    id: Option<u16>,
) -> Turn {
    if dir == direction::IN {
        conn.bytes_recv += bytes;
        conn.recv_calls += 1;
        conn.last_recv_ns = now;
    } else {
        conn.bytes_sent += bytes;
        conn.send_calls += 1;
    }
    if !from_peer || conn.role != role::CLIENT {
        // Datagrams to another peer leave the exchange with this one, and its quiet, alone.
        if dir == direction::OUT && conn.last_dir != direction::OUT {
            conn.last_send_ns = now;
        }
        return Turn::Continued;
    }
    if dir == direction::OUT {
        if conn.last_dir == direction::OUT {
            // The exchange is outstanding: its quiet keeps counting from its first datagram.
            if let Some(id) = id {
                add_query(conn, id);
            } else {
                conn.retries += 1;
            }
            return Turn::Continued;
        }
        conn.last_send_ns = now;
        if !judged(conn) {
            return Turn::Continued;
        }
        conn.last_dir = direction::OUT;
        conn.dir_since_ns = now;
        conn.requests += 1;
        conn.retries = 0;
        conn.udp_pending = 0;
        if let Some(id) = id {
            add_query(conn, id);
        }
        return Turn::RequestStarted;
    }
    let first_answer = conn.udp_flags & flags::ANSWERED == 0;
    conn.udp_flags |= flags::ANSWERED;
    if conn.last_dir != direction::OUT {
        if conn.last_dir == direction::NONE && first_answer {
            if conn.send_calls > 0 {
                // The exchange that showed the flow answers: counted, though not judged.
                conn.requests += 1;
                conn.exchanges += 1;
            }
            conn.last_dir = direction::IN;
            conn.dir_since_ns = now;
            return Turn::Unsolicited;
        }
        return Turn::Continued;
    }
    if let Some(id) = id {
        if !answer_query(conn, id) {
            // Not an answer to this exchange (a late one to an earlier query).
            return Turn::Continued;
        }
        if conn.udp_pending != 0 {
            return Turn::Continued;
        }
    }
    conn.udp_pending = 0;
    conn.last_dir = direction::IN;
    conn.dir_since_ns = now;
    conn.exchanges += 1;
    Turn::ReplyStarted
}

/// A query with `id` went out during the exchange: a retry if it was sent before, else kept
/// (the newer replaces the older of two).
#[inline(always)]
fn add_query(conn: &mut ConnState, id: u16) {
    for slot in 0..2 {
        if conn.udp_pending & (1 << slot) != 0 && conn.query_ids[slot] == id {
            conn.retries += 1;
            return;
        }
    }
    let slot = if conn.udp_pending & 1 == 0 { 0 } else { 1 };
    conn.query_ids[slot] = id;
    conn.udp_pending |= 1 << slot;
}

/// An answer with `id` came: true if it answers a query of the exchange (now answered).
#[inline(always)]
fn answer_query(conn: &mut ConnState, id: u16) -> bool {
    if conn.udp_pending == 0 {
        // The exchange's queries were not read (capture off): any answer ends it.
        return true;
    }
    for slot in 0..2 {
        if conn.udp_pending & (1 << slot) != 0 && conn.query_ids[slot] == id {
            conn.udp_pending &= !(1 << slot);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::{is_outstanding, last_request_ns};

    fn client(proto_id: u8) -> ConnState {
        ConnState {
            role: role::CLIENT,
            proto: proto_id,
            ..Default::default()
        }
    }

    #[test]
    fn one_way_datagrams_are_never_outstanding() {
        let mut conn = client(proto::OTHER);
        for t in 0..1000 {
            let turn = record_datagram(&mut conn, direction::OUT, 20, t, true, None);
            assert_eq!(turn, Turn::Continued);
            assert!(!is_outstanding(&conn));
        }
        assert_eq!(
            (conn.send_calls, conn.bytes_sent, conn.requests),
            (1000, 20_000, 0)
        );
        assert_eq!(conn.last_send_ns, 999);
    }

    #[test]
    fn a_flow_is_judged_once_its_peer_answered() {
        let mut conn = client(proto::OTHER);
        record_datagram(&mut conn, direction::OUT, 10, 1, true, None);
        assert_eq!(
            record_datagram(&mut conn, direction::IN, 10, 2, true, None),
            Turn::Unsolicited
        );
        assert!(judged(&conn));
        assert_eq!((conn.requests, conn.exchanges), (1, 1));
        assert_eq!(
            record_datagram(&mut conn, direction::OUT, 10, 3, true, None),
            Turn::RequestStarted
        );
        assert!(is_outstanding(&conn));
        assert_eq!(
            record_datagram(&mut conn, direction::IN, 10, 9, true, None),
            Turn::ReplyStarted
        );
        assert!(!is_outstanding(&conn));
        assert_eq!((conn.requests, conn.exchanges), (2, 2));
    }

    #[test]
    fn dns_is_judged_from_its_first_query_and_retries_keep_the_quiet() {
        let mut conn = client(proto::DNS);
        let turn = record_datagram(&mut conn, direction::OUT, 40, 100, true, Some(0xbeef));
        assert_eq!(turn, Turn::RequestStarted);
        // AAAA in the same sendmmsg: another query of the same exchange, not a retry.
        record_datagram(&mut conn, direction::OUT, 40, 101, true, Some(0x1234));
        assert_eq!(conn.retries, 0);
        // Both resent after the resolver's timeout.
        record_datagram(&mut conn, direction::OUT, 40, 5_000, true, Some(0xbeef));
        record_datagram(&mut conn, direction::OUT, 40, 5_001, true, Some(0x1234));
        assert_eq!(conn.retries, 2);
        assert_eq!(
            last_request_ns(&conn),
            100,
            "the wait counts from the first query"
        );
        // A stray id answers nothing; A's answer leaves AAAA outstanding.
        record_datagram(&mut conn, direction::IN, 60, 5_100, true, Some(7));
        record_datagram(&mut conn, direction::IN, 60, 5_200, true, Some(0xbeef));
        assert!(is_outstanding(&conn));
        assert_eq!(
            record_datagram(&mut conn, direction::IN, 60, 5_300, true, Some(0x1234)),
            Turn::ReplyStarted
        );
        assert!(!is_outstanding(&conn));
        assert_eq!(conn.dir_since_ns, 5_300);
    }

    #[test]
    fn without_ids_any_answer_ends_the_exchange_and_resends_are_retries() {
        let mut conn = client(proto::DNS);
        record_datagram(&mut conn, direction::OUT, 40, 1, true, None);
        record_datagram(&mut conn, direction::OUT, 40, 2, true, None);
        assert_eq!(conn.retries, 1);
        let turn = record_datagram(&mut conn, direction::IN, 40, 3, true, Some(9));
        assert_eq!(turn, Turn::ReplyStarted);
    }

    #[test]
    fn servers_other_peers_and_multicast_are_never_judged() {
        let mut server = ConnState {
            role: role::SERVER,
            proto: proto::DNS,
            ..Default::default()
        };
        record_datagram(&mut server, direction::IN, 40, 1, true, Some(1));
        record_datagram(&mut server, direction::OUT, 40, 2, true, Some(1));
        record_datagram(&mut server, direction::IN, 40, 3, true, Some(2));
        assert!(!is_outstanding(&server) && server.last_dir == direction::NONE);

        let mut conn = client(proto::DNS);
        assert_eq!(
            record_datagram(&mut conn, direction::OUT, 4, 1, false, Some(1)),
            Turn::Continued
        );
        assert!(!is_outstanding(&conn));
        // Waiting on the followed peer, datagrams to another do not restart the quiet.
        record_datagram(&mut conn, direction::OUT, 4, 2, true, Some(1));
        record_datagram(&mut conn, direction::OUT, 4, 9, false, Some(2));
        assert!(is_outstanding(&conn));
        assert_eq!((last_request_ns(&conn), conn.retries), (2, 0));

        let mut mdns = client(proto::DNS);
        mdns.udp_flags = flags::ONE_TO_MANY;
        record_datagram(&mut mdns, direction::OUT, 40, 1, true, Some(1));
        assert!(!is_outstanding(&mdns));
    }

    #[test]
    fn dns_query_headers_are_told_from_other_payloads() {
        let query = [
            0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1, 7, b'e', b'x', b'a',
        ];
        assert!(looks_like_dns_query(&query));
        assert_eq!(dns_id(&query), Some(0xabcd));
        let mut answer = query;
        answer[2] = 0x81;
        assert!(!looks_like_dns_query(&answer));
        assert!(!looks_like_dns_query(b"app.requests:1|c"));
        assert!(!looks_like_dns_query(b"<13>Nov 30 hello"));
        assert!(!looks_like_dns_query(&query[..5]));
    }

    #[test]
    fn multicast_and_broadcast_peers_are_one_to_many() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[224, 0, 0, 251]);
        assert!(one_to_many(crate::AF_INET, &v4));
        v4[..4].copy_from_slice(&[255, 255, 255, 255]);
        assert!(one_to_many(crate::AF_INET, &v4));
        v4[..4].copy_from_slice(&[127, 0, 0, 53]);
        assert!(!one_to_many(crate::AF_INET, &v4));
        let mut v6 = [0u8; 16];
        v6[0] = 0xff;
        v6[1] = 0x02;
        assert!(one_to_many(crate::AF_INET6, &v6));
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[239, 1, 2, 3]);
        assert!(one_to_many(crate::AF_INET6, &mapped));
        mapped[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert!(!one_to_many(crate::AF_INET6, &mapped));
    }
}
