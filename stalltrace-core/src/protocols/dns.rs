//! DNS queries (RFC 1035 §4.1): `A example.com` from the first bytes of a query datagram.
//!
//! The bytes are untrusted and often cut short by the capture length (64 bytes by default):
//! a name cut short ends in `…` with its type unknown (`?`). Compression pointers (§4.1.4),
//! which a query's question has no reason to use, are followed within the captured bytes, at
//! most [`MAX_POINTERS`] times (a loop ends there, never hangs). Label bytes outside printable
//! ASCII, and `.` inside a label, show as `?`; names are lowercased (resolvers randomize the
//! case, RFC 0x20 draft), so they group.
use super::{Signature, MAX_TOKEN};

/// The size of the DNS header.
const HEADER: usize = 12;
/// Compression pointers followed in one name.
const MAX_POINTERS: usize = 8;

/// The signature of a DNS query: its first question's type and name.
pub(super) fn query(bytes: &[u8]) -> Option<Signature> {
    if !stalltrace_common::udp::looks_like_dns_query(bytes) || bytes.len() <= HEADER {
        return None;
    }
    let (name, end) = name(bytes, HEADER);
    let text = match end.and_then(|at| bytes.get(at..at + 2)) {
        Some(qtype) => format!(
            "{} {name}",
            type_name(u16::from_be_bytes([qtype[0], qtype[1]]))
        ),
        None => format!("? {name}…"),
    };
    Some(Signature::new("dns", text))
}

/// The name at `start`, and the offset just past it in the message (where the question's type
/// follows), or `None` when it runs past the captured bytes or is malformed.
fn name(bytes: &[u8], start: usize) -> (String, Option<usize>) {
    let mut out = String::new();
    let mut at = start;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let Some(&len) = bytes.get(at) else {
            return (shown(out), None);
        };
        match len {
            0 => {
                let end = end.unwrap_or(at + 1);
                return (
                    if out.is_empty() {
                        ".".into()
                    } else {
                        shown(out)
                    },
                    Some(end),
                );
            }
            1..=63 => {
                let Some(label) = bytes.get(at + 1..at + 1 + usize::from(len)) else {
                    // Cut short: keep what was captured of the label.
                    let partial = bytes.get(at + 1..).unwrap_or_default();
                    push_label(&mut out, partial);
                    return (shown(out), None);
                };
                push_label(&mut out, label);
                at += 1 + usize::from(len);
            }
            0xc0..=0xff => {
                let Some(&low) = bytes.get(at + 1) else {
                    return (shown(out), None);
                };
                end.get_or_insert(at + 2);
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return (shown(out), None);
                }
                at = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            }
            // Extended label types (0x40, 0x80): obsolete or reserved.
            _ => return (shown(out), None),
        }
        if out.len() > MAX_TOKEN {
            return (shown(out), None);
        }
    }
}

fn push_label(out: &mut String, label: &[u8]) {
    if !out.is_empty() {
        out.push('.');
    }
    out.extend(label.iter().map(|&b| match b {
        b'.' => '?',
        b if b.is_ascii_graphic() => char::from(b.to_ascii_lowercase()),
        _ => '?',
    }));
}

/// Bounded to [`MAX_TOKEN`] characters (all ASCII, so any cut is at a character boundary).
fn shown(mut name: String) -> String {
    name.truncate(MAX_TOKEN);
    name
}

/// The mnemonic of a query type (IANA DNS parameters), else `TYPE<n>` (RFC 3597).
fn type_name(qtype: u16) -> String {
    let name = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        46 => "RRSIG",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        257 => "CAA",
        other => return format!("TYPE{other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_bytes(id: u16, labels: &[&[u8]], qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in labels {
            q.push(label.len() as u8);
            q.extend(*label);
        }
        q.push(0);
        q.extend(qtype.to_be_bytes());
        q.extend([0, 1]);
        q
    }

    fn text(bytes: &[u8]) -> Option<String> {
        query(bytes).map(|s| s.display())
    }

    #[test]
    fn a_query_is_named_by_type_and_name() {
        let q = query_bytes(0xabcd, &[b"Example", b"COM"], 1);
        assert_eq!(text(&q).as_deref(), Some("dns A example.com"));
        let q = query_bytes(1, &[b"_http", b"_tcp", b"svc"], 33);
        assert_eq!(text(&q).as_deref(), Some("dns SRV _http._tcp.svc"));
        assert_eq!(text(&query_bytes(2, &[], 2)).as_deref(), Some("dns NS ."));
        assert_eq!(
            text(&query_bytes(3, &[b"x"], 4242)).as_deref(),
            Some("dns TYPE4242 x")
        );
    }

    #[test]
    fn a_query_cut_short_keeps_what_was_captured() {
        let q = query_bytes(
            7,
            &[b"a-very-long-label-for-a-service", b"example", b"org"],
            28,
        );
        let cut = &q[..50];
        assert_eq!(
            text(cut).as_deref(),
            Some("dns ? a-very-long-label-for-a-service.examp…")
        );
        // The name complete, the type cut.
        let q = query_bytes(7, &[b"ab"], 28);
        assert_eq!(text(&q[..q.len() - 3]).as_deref(), Some("dns ? ab…"));
    }

    #[test]
    fn pointers_are_followed_within_bounds_and_loops_end() {
        let mut q = query_bytes(9, &[b"www"], 1);
        // Replace the root label with a pointer to "www" itself: a loop.
        let root = q.len() - 5;
        q.splice(root..root + 1, [0xc0, 12]);
        let shown = text(&q).unwrap();
        assert!(shown.starts_with("dns ? www.www"), "{shown}");
        assert!(shown.len() <= 4 + 2 + MAX_TOKEN + 3, "{shown}");
        // A pointer past the end.
        let mut q = query_bytes(9, &[b"a"], 1);
        let root = q.len() - 5;
        q.splice(root..root + 1, [0xff, 0xff]);
        assert_eq!(text(&q).as_deref(), Some("dns ? a…"));
    }

    #[test]
    fn odd_bytes_in_labels_are_masked_and_non_queries_refused() {
        let q = query_bytes(1, &[b"a.b", b"\x1b[31m"], 1);
        assert_eq!(text(&q).as_deref(), Some("dns A a?b.?[31m"));
        let mut answer = query_bytes(1, &[b"a"], 1);
        answer[2] |= 0x80;
        assert_eq!(text(&answer), None);
        assert_eq!(text(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(text(&[]), None);
    }
}
