//! D-Bus method calls (D-Bus specification, "Message Format"): `call org.example.Slow.Wait`
//! from the first bytes of a message, behind the `BEGIN` line that may precede a client's
//! first call.
//!
//! The bytes are untrusted and often cut short by the capture length (64 bytes by default):
//! the header fields are walked within the captured bytes only, and what they name is kept —
//! the interface and member when both are captured, else the object path (templated like an
//! HTTP path), else nothing. Only method calls are requests: signals, returns and errors never
//! start one (`stalltrace_common::message`).
use super::{template_path, Signature, MAX_TOKEN};

/// The fixed part of a message header: endianness, type, flags, version, body length, serial,
/// header fields length.
const FIXED: usize = 16;
const METHOD_CALL: u8 = 1;
/// Header field codes.
const PATH: u8 = 1;
const INTERFACE: u8 = 2;
const MEMBER: u8 = 3;
/// Header fields walked, at most (a message has about six).
const MAX_FIELDS: usize = 8;

/// The signature of a D-Bus method call.
pub(super) fn call(bytes: &[u8]) -> Option<Signature> {
    let message = bytes.strip_prefix(b"BEGIN\r\n").unwrap_or(bytes);
    let (little, kind) = match message {
        [b'l', kind, _, 1, ..] => (true, *kind),
        [b'B', kind, _, 1, ..] => (false, *kind),
        _ => return None,
    };
    if kind != METHOD_CALL {
        return None;
    }
    let u32_at = |at: usize| {
        let b: [u8; 4] = message.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let fields_end = FIXED.saturating_add(usize::try_from(u32_at(12)?).ok()?);
    let (mut path, mut interface, mut member) = (None, None, None);
    let mut at = FIXED;
    for _ in 0..MAX_FIELDS {
        at = at.next_multiple_of(8);
        if at >= fields_end {
            break;
        }
        // A field: its code, then a variant: a one-letter signature, then the value.
        let Some(&[code, 1, letter, 0]) = message.get(at..at + 4) else {
            break;
        };
        at += 4;
        let value = match letter {
            b'o' | b's' => {
                let Some(len) = u32_at(at).and_then(|len| usize::try_from(len).ok()) else {
                    break;
                };
                let text = message
                    .get(at + 4..)
                    .map(|rest| &rest[..len.min(rest.len())]);
                at = at.saturating_add(len).saturating_add(4 + 1);
                text
            }
            b'g' => {
                let Some(&len) = message.get(at) else {
                    break;
                };
                at += 1 + usize::from(len) + 1;
                None
            }
            b'u' => {
                at = at.next_multiple_of(4) + 4;
                None
            }
            _ => break,
        };
        // A value cut short by the capture is not a name.
        let whole = value.filter(|_| at <= message.len()).map(printable);
        match code {
            PATH => path = whole,
            INTERFACE => interface = whole,
            MEMBER => member = whole,
            _ => {}
        }
        if at > message.len() {
            break;
        }
    }
    let text = match (interface, member, path) {
        (Some(interface), Some(member), _) => format!("call {interface}.{member}"),
        (None, Some(member), _) => format!("call {member}"),
        (_, None, Some(path)) => format!("call {}", template_path(&path)),
        _ => "call".to_owned(),
    };
    Some(Signature::new("dbus", text))
}

/// A name as shown: at most [`MAX_TOKEN`] bytes, anything but printable ASCII as `?`.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(MAX_TOKEN)
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian method call with these header fields (code, letter, value).
    fn message(kind: u8, fields: &[(u8, u8, &str)]) -> Vec<u8> {
        let mut out = vec![b'l', kind, 0, 1, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0];
        for &(code, letter, value) in fields {
            while out.len() % 8 != 0 {
                out.push(0);
            }
            out.extend_from_slice(&[code, 1, letter, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        let fields_len = (out.len() - FIXED) as u32;
        out[12..16].copy_from_slice(&fields_len.to_le_bytes());
        out
    }

    #[test]
    fn a_call_is_named_by_interface_and_member_else_by_path() {
        let call_bytes = message(
            METHOD_CALL,
            &[
                (PATH, b'o', "/org/example/Slow"),
                (INTERFACE, b's', "org.example.Slow"),
                (MEMBER, b's', "Wait"),
                (6, b's', "org.example.Slow"),
            ],
        );
        assert_eq!(
            call(&call_bytes).unwrap().display(),
            "dbus call org.example.Slow.Wait"
        );
        assert_eq!(
            super::super::recognize(&call_bytes).unwrap().protocol,
            "dbus",
            "no other recognizer takes it"
        );
        let mut begun = b"BEGIN\r\n".to_vec();
        begun.extend_from_slice(&call_bytes);
        assert_eq!(call(&begun), call(&call_bytes));
        // What a 64-byte capture holds of it: the path, then the interface cut short.
        assert_eq!(
            call(&call_bytes[..64]).unwrap().text,
            "call /org/example/Slow"
        );
        let numbered = message(METHOD_CALL, &[(PATH, b'o', "/org/login1/session/42")]);
        assert_eq!(
            call(&numbered).unwrap().text,
            "call /org/login1/session/{id}"
        );
        assert_eq!(call(&call_bytes[..20]).unwrap().text, "call");
    }

    #[test]
    fn only_method_calls_are_named_and_nothing_panics() {
        let signal = message(4, &[(PATH, b'o', "/org/example/Events")]);
        assert_eq!(call(&signal), None);
        assert_eq!(call(b"AUTH EXTERNAL 30\r\n"), None);
        let mut big_endian = message(METHOD_CALL, &[]);
        big_endian[0] = b'B';
        assert_eq!(call(&big_endian).unwrap().text, "call");
        let mut huge = message(METHOD_CALL, &[(PATH, b'o', "/a")]);
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(call(&huge).is_some());
        for len in 0..80 {
            for fill in [0u8, 1, b'l', b's', 0xff] {
                let mut bytes = vec![fill; len];
                if len >= 4 {
                    bytes[..4].copy_from_slice(&[b'l', METHOD_CALL, 0, 1]);
                }
                let _ = call(&bytes);
            }
        }
    }
}
