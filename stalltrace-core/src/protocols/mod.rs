//! Request signatures: the first bytes of a request, captured in the kernel, turned into a
//! short name for the kind of request — the thing to group by when asking "what is different
//! about the requests that stall?".
//!
//! Recognizers are pure functions over untrusted bytes (possibly truncated at the capture
//! length): they never panic, whatever the input (fuzzed with cargo fuzz, see fuzz/).

mod dbus;
mod dns;
pub mod http1;

/// A recognized request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Signature {
    /// `http`, `redis`, `postgresql`, `mysql`, `tls` (encrypted), `dns`, `dbus`, or `bytes`
    /// (unrecognized: a printable preview).
    pub protocol: &'static str,
    /// E.g. `GET /coupon/apply`, `GET` (Redis), `Query SELECT`, `Query UPDATE` (MySQL),
    /// `A example.com` (DNS: query type and name).
    pub text: String,
}

impl Signature {
    fn new(protocol: &'static str, text: impl Into<String>) -> Self {
        Self {
            protocol,
            text: text.into(),
        }
    }

    /// `GET /coupon/apply`, `redis GET`, `postgresql Query SELECT`: protocol-qualified
    /// except for HTTP, whose method and path speak for themselves.
    pub fn display(&self) -> String {
        match self.protocol {
            "http" => self.text.clone(),
            "bytes" if self.text == UNRECOGNIZED => self.text.clone(),
            protocol => format!("{protocol} {}", self.text),
        }
    }
}

/// What a signature may reveal of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privacy {
    /// Unrecognized requests get a printable preview of their first bytes (else they are all
    /// `(unrecognized)`): the preview may show anything the request carries.
    pub preview: bool,
    /// HTTP path segments that look like identifiers (numbers, hex of 8+ digits, UUIDs)
    /// become `{id}`: no user or object ids leave the daemon, and `why` groups stay few.
    pub path_templates: bool,
}

impl Default for Privacy {
    /// Private by default: no preview, templated paths.
    fn default() -> Self {
        Self {
            preview: false,
            path_templates: true,
        }
    }
}

/// The signature text of unrecognized requests when previews are off.
pub const UNRECOGNIZED: &str = "(unrecognized)";

/// Longest preview of unrecognized bytes, in characters.
const PREVIEW_CHARS: usize = 24;
/// Longest keyword or path segment kept, so that signatures stay short and few.
const MAX_TOKEN: usize = 64;

/// The signature of a request starting with `bytes`, as private as [`Privacy::default`];
/// `None` when nothing was captured.
pub fn recognize(bytes: &[u8]) -> Option<Signature> {
    recognize_with(bytes, Privacy::default())
}

/// The signature of a request starting with `bytes`, revealing what `privacy` allows.
pub fn recognize_with(bytes: &[u8], privacy: Privacy) -> Option<Signature> {
    if bytes.is_empty() {
        return None;
    }
    let found = http(bytes, privacy.path_templates)
        .or_else(|| redis(bytes))
        .or_else(|| postgresql(bytes))
        .or_else(|| mysql(bytes))
        .or_else(|| tls(bytes))
        .or_else(|| dns::query(bytes))
        .or_else(|| dbus::call(bytes));
    Some(found.unwrap_or_else(|| {
        if privacy.preview {
            preview(bytes)
        } else {
            Signature::new("bytes", UNRECOGNIZED)
        }
    }))
}

/// `/users/1234/orders/9f86d081884c7d65` → `/users/{id}/orders/{id}`: segments that are
/// decimal numbers, hex strings of 8 or more digits, or UUIDs become `{id}`.
/// The start of an id cut short: hex digits and dashes, with a digit among them.
fn is_partial_id(segment: &str) -> bool {
    segment.bytes().any(|b| b.is_ascii_digit())
        && segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

pub fn template_path(path: &str) -> String {
    path.split('/')
        .map(|segment| if is_id(segment) { "{id}" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

fn is_id(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let hex = |b: &[u8]| b.iter().all(u8::is_ascii_hexdigit);
    let uuid = bytes.len() == 36
        && [8, 13, 18, 23].iter().all(|&at| bytes[at] == b'-')
        && bytes
            .split(|&b| b == b'-')
            .map(<[u8]>::len)
            .eq([8, 4, 4, 4, 12])
        && bytes.split(|&b| b == b'-').all(hex);
    !bytes.is_empty()
        && (bytes.iter().all(u8::is_ascii_digit) || (bytes.len() >= 8 && hex(bytes)) || uuid)
}

const HTTP_METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// HTTP/1.x request line: method, then the path without query string or fragment
/// (templated when `templates`).
fn http(bytes: &[u8], templates: bool) -> Option<Signature> {
    let space = bytes.iter().take(8).position(|&b| b == b' ')?;
    let method = std::str::from_utf8(&bytes[..space]).ok()?;
    if !HTTP_METHODS.contains(&method) {
        return None;
    }
    let target = &bytes[space + 1..];
    let end = target
        .iter()
        .position(|&b| matches!(b, b' ' | b'?' | b'#' | b'\r' | b'\n'))
        .unwrap_or(target.len());
    // Cut short by the capture or the token bound: the last segment may be part of an id.
    let cut = end == target.len() || end > MAX_TOKEN;
    let path = &target[..end.min(MAX_TOKEN)];
    let plausible = path.first().is_some_and(|&b| b == b'/' || b == b'*')
        || path.starts_with(b"http://")
        || path.starts_with(b"https://")
        || (method == "CONNECT" && !path.is_empty());
    if !plausible || !path.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let path = std::str::from_utf8(path).ok()?;
    let path = if templates {
        // `{id}` is longer than a one-digit segment: keep the signature short.
        let mut templated = template_path(path);
        if cut {
            // A UUID or a number cut short is still an id: template what is left of it.
            if let Some((head, last)) = templated.rsplit_once('/') {
                if is_partial_id(last) {
                    templated = format!("{head}/{{id}}");
                }
            }
        }
        templated.truncate(2 * MAX_TOKEN);
        templated
    } else {
        path.to_owned()
    };
    Some(Signature::new("http", format!("{method} {path}")))
}

/// RESP array of bulk strings: `*<n>\r\n$<len>\r\n<COMMAND>\r\n…` → the command name.
fn redis(bytes: &[u8]) -> Option<Signature> {
    let rest = bytes.strip_prefix(b"*")?;
    let (count, rest) = resp_number(rest)?;
    if count == 0 {
        return None;
    }
    let rest = rest.strip_prefix(b"$")?;
    let (len, rest) = resp_number(rest)?;
    if len == 0 || len > 32 {
        return None;
    }
    let name = rest.get(..len.min(rest.len()))?;
    if name.is_empty() || !name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?.to_ascii_uppercase();
    Some(Signature::new("redis", name))
}

/// `123\r\n` → (123, rest).
fn resp_number(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let end = bytes.iter().take(11).position(|&b| b == b'\r')?;
    let digits = std::str::from_utf8(&bytes[..end]).ok()?;
    let value = digits.parse::<usize>().ok()?;
    let rest = bytes[end..].strip_prefix(b"\r\n")?;
    Some((value, rest))
}

/// PostgreSQL frontend messages: a type byte and a big-endian length, or the untyped start-up
/// and SSL/GSS requests.
fn postgresql(bytes: &[u8]) -> Option<Signature> {
    if bytes.len() >= 8 {
        let length = u32::from_be_bytes(bytes[0..4].try_into().ok()?);
        let code = u32::from_be_bytes(bytes[4..8].try_into().ok()?);
        let untyped = match code {
            196_608 => Some("Startup"),
            80_877_103 => Some("SSLRequest"),
            80_877_104 => Some("GSSENCRequest"),
            80_877_102 => Some("CancelRequest"),
            _ => None,
        };
        if let Some(name) = untyped.filter(|_| (8..=10_000).contains(&length)) {
            return Some(Signature::new("postgresql", name));
        }
    }
    let (&kind, rest) = bytes.split_first()?;
    let length = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    if !(4..=1 << 30).contains(&length) {
        return None;
    }
    let body = &rest[4..];
    let name = match kind {
        b'Q' => return sql("postgresql", "Query", body.split(|&b| b == 0).next()?),
        b'P' => {
            // Parse: statement name, NUL, query.
            let query = body.splitn(2, |&b| b == 0).nth(1)?;
            return sql("postgresql", "Parse", query);
        }
        b'B' => "Bind",
        b'E' => "Execute",
        b'S' if length == 4 => "Sync",
        b'X' if length == 4 => "Terminate",
        b'H' if length == 4 => "Flush",
        b'D' => "Describe",
        b'C' => "Close",
        b'F' => "FunctionCall",
        _ => return None,
    };
    Some(Signature::new("postgresql", name))
}

/// `<label> <FIRST KEYWORD>` of an SQL text, if it starts like SQL.
fn sql(protocol: &'static str, label: &str, text: &[u8]) -> Option<Signature> {
    let text = std::str::from_utf8(text)
        .or_else(|e| std::str::from_utf8(&text[..e.valid_up_to()]))
        .ok()?;
    let keyword: String = text
        .trim_start_matches(|c: char| c.is_whitespace() || c == '(')
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .take(MAX_TOKEN)
        .collect();
    if keyword.is_empty() {
        return None;
    }
    Some(Signature::new(
        protocol,
        format!("{label} {}", keyword.to_ascii_uppercase()),
    ))
}

/// A TLS application_data record (`17 03 0x`): encrypted, so named by what it is; the
/// request itself is not visible without the plaintext.
fn tls(bytes: &[u8]) -> Option<Signature> {
    match bytes {
        [0x17, 0x03, 0..=4, ..] => Some(Signature::new("tls", "application data (encrypted)")),
        _ => None,
    }
}

/// MySQL client command packets: 3-byte little-endian length, sequence id 0, command byte.
fn mysql(bytes: &[u8]) -> Option<Signature> {
    let header = bytes.get(..5)?;
    let length = u32::from_le_bytes([header[0], header[1], header[2], 0]);
    if length == 0 || header[3] != 0 {
        return None;
    }
    let body = &bytes[5..];
    let name = match header[4] {
        0x03 => return sql("mysql", "Query", body),
        0x16 => return sql("mysql", "Prepare", body),
        0x01 if length == 1 => "Quit",
        0x02 => "InitDB",
        0x0e if length == 1 => "Ping",
        0x17 => "Execute",
        0x19 => "CloseStatement",
        0x1a => "ResetStatement",
        0x1f if length == 1 => "ResetConnection",
        _ => return None,
    };
    Some(Signature::new("mysql", name))
}

/// Unrecognized: the first characters, non-printables shown as `.`.
fn preview(bytes: &[u8]) -> Signature {
    let text: String = bytes
        .iter()
        .take(PREVIEW_CHARS)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    Signature::new("bytes", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(bytes: &[u8]) -> (&'static str, String) {
        let s = recognize_with(bytes, OPEN).unwrap();
        (s.protocol, s.text)
    }

    /// Everything shown: the recognizers' raw output.
    const OPEN: Privacy = Privacy {
        preview: true,
        path_templates: false,
    };

    #[test]
    fn http_method_and_path_without_query() {
        assert_eq!(
            sig(b"GET /coupon/apply?code=XMAS&u=42 HTTP/1.1\r\nHost: shop\r\n\r\n"),
            ("http", "GET /coupon/apply".into())
        );
        assert_eq!(
            sig(b"POST /api/v1/orders HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            ("http", "POST /api/v1/orders".into())
        );
        assert_eq!(sig(b"OPTIONS * HTTP/1.1\r\n"), ("http", "OPTIONS *".into()));
        // Truncated by the capture length mid-path: what was captured.
        assert_eq!(
            sig(b"GET /very/long/path/that/goes/on"),
            ("http", "GET /very/long/path/that/goes/on".into())
        );
        assert_eq!(recognize(b"GET").unwrap().protocol, "bytes");
        assert_eq!(recognize(b"GETX /a HTTP/1.1").unwrap().protocol, "bytes");
    }

    #[test]
    fn tls_application_data_is_named_as_encrypted() {
        assert_eq!(
            sig(&[0x17, 0x03, 0x03, 0x00, 0x40, 0xaa]),
            ("tls", "application data (encrypted)".into())
        );
        assert_eq!(
            recognize_with(&[0x17, 0x03, 0x03], Privacy::default())
                .unwrap()
                .display(),
            "tls application data (encrypted)"
        );
    }

    #[test]
    fn redis_command_names() {
        assert_eq!(
            sig(b"*2\r\n$3\r\nget\r\n$5\r\nmykey\r\n"),
            ("redis", "GET".into())
        );
        assert_eq!(
            sig(b"*3\r\n$4\r\nHSET\r\n$1\r\nh\r\n$1\r\nf\r\n"),
            ("redis", "HSET".into())
        );
        assert_eq!(sig(b"*1\r\n$4\r\nPING\r\n"), ("redis", "PING".into()));
        assert_eq!(recognize(b"*0\r\n").unwrap().protocol, "bytes");
        assert_eq!(recognize(b"*1\r\n$99999\r\nX").unwrap().protocol, "bytes");
    }

    #[test]
    fn postgresql_messages() {
        let mut query = vec![b'Q'];
        let text = b"  select * from coupons where code = $1\0";
        query.extend_from_slice(&(4 + text.len() as u32).to_be_bytes());
        query.extend_from_slice(text);
        assert_eq!(sig(&query), ("postgresql", "Query SELECT".into()));

        let mut parse = vec![b'P'];
        let body = b"s1\0UPDATE carts SET n = 1\0\0\0";
        parse.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        parse.extend_from_slice(body);
        assert_eq!(sig(&parse), ("postgresql", "Parse UPDATE".into()));

        let mut startup = Vec::new();
        startup.extend_from_slice(&41u32.to_be_bytes());
        startup.extend_from_slice(&196_608u32.to_be_bytes());
        startup.extend_from_slice(b"user\0app\0database\0shop\0\0");
        assert_eq!(sig(&startup), ("postgresql", "Startup".into()));

        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(sig(&ssl), ("postgresql", "SSLRequest".into()));
        assert_eq!(sig(&[b'S', 0, 0, 0, 4]), ("postgresql", "Sync".into()));
    }

    #[test]
    fn mysql_commands() {
        let mut query = vec![0, 0, 0, 0, 0x03];
        query.extend_from_slice(b"SELECT id FROM coupons");
        let len = (query.len() - 4) as u32;
        query[..3].copy_from_slice(&len.to_le_bytes()[..3]);
        assert_eq!(sig(&query), ("mysql", "Query SELECT".into()));
        assert_eq!(sig(&[1, 0, 0, 0, 0x0e]), ("mysql", "Ping".into()));
        assert_eq!(sig(&[1, 0, 0, 0, 0x01]), ("mysql", "Quit".into()));
        // Sequence id 1 is not a command.
        assert_eq!(recognize(&[1, 0, 0, 1, 0x0e]).unwrap().protocol, "bytes");
    }

    #[test]
    fn unknown_bytes_get_a_printable_preview() {
        assert_eq!(
            sig(b"HELO mail.example.com\r\nMAIL FROM"),
            ("bytes", "HELO mail.example.com..M".into())
        );
        assert_eq!(sig(&[0xff, 0x00, b'a']), ("bytes", "..a".into()));
        assert_eq!(recognize(b""), None);
    }

    #[test]
    fn private_by_default_no_preview_and_templated_paths() {
        let unknown = recognize(b"HELO mail.example.com\r\n").unwrap();
        assert_eq!(
            (unknown.protocol, unknown.display()),
            ("bytes", UNRECOGNIZED.into())
        );
        assert_eq!(
            recognize(b"GET /users/1234/orders/9f86d081884c7d65?token=s3cret HTTP/1.1")
                .unwrap()
                .display(),
            "GET /users/{id}/orders/{id}"
        );
        assert_eq!(
            recognize_with(
                b"GET /users/1234 HTTP/1.1",
                Privacy {
                    path_templates: false,
                    ..Privacy::default()
                }
            )
            .unwrap()
            .display(),
            "GET /users/1234"
        );
        // Recognized protocols are unaffected.
        assert_eq!(
            recognize(b"*1\r\n$4\r\nPING\r\n").unwrap().display(),
            "redis PING"
        );
    }

    #[test]
    fn templates_id_segments_only() {
        assert_eq!(template_path("/coupon/apply"), "/coupon/apply");
        assert_eq!(template_path("/v1/items/42"), "/v1/items/{id}");
        assert_eq!(
            template_path("/o/123e4567-e89b-12d3-a456-426614174000/x"),
            "/o/{id}/x"
        );
        assert_eq!(template_path("/blob/DEADBEEF00"), "/blob/{id}");
        // Short hex and words that merely contain digits stay.
        assert_eq!(template_path("/cafe/v2/abc123"), "/cafe/v2/abc123");
        assert_eq!(template_path("/beefcafe"), "/{id}");
        assert_eq!(template_path("/"), "/");
        assert_eq!(template_path("*"), "*");
        assert_eq!(template_path("/a//7/"), "/a//{id}/");
        // Found by the fuzzer: many one-digit segments grow; the signature stays short.
        let many = format!("PUT {} HTTP/1.1", "/1".repeat(32));
        let shown = recognize(many.as_bytes()).unwrap().display();
        assert!(shown.len() <= 4 + 2 * MAX_TOKEN, "{shown}");
        assert!(shown.starts_with("PUT /{id}/{id}/"), "{shown}");
        // A UUID with misplaced dashes is not one (and not all hex either).
        assert_eq!(
            template_path("/123e4567e-89b-12d3-a456-426614174000"),
            "/123e4567e-89b-12d3-a456-426614174000"
        );
    }

    #[test]
    fn an_id_cut_short_by_the_capture_is_still_templated() {
        let request = b"POST /api/v2/item/0123456789abcdef/550e8400-e29b-41d4-a716-44665";
        let found = recognize_with(request, Privacy::default()).unwrap();
        assert_eq!(found.display(), "POST /api/v2/item/{id}/{id}");
        // A word cut short is not an id.
        let found = recognize_with(b"GET /api/v2/ite", Privacy::default()).unwrap();
        assert_eq!(found.display(), "GET /api/v2/ite");
        // Complete requests are unchanged.
        let found = recognize_with(b"GET /v1/x12 HTTP/1.1\r\n", Privacy::default()).unwrap();
        assert_eq!(found.display(), "GET /v1/x12");
    }

    #[test]
    fn display_qualifies_all_but_http() {
        assert_eq!(recognize(b"GET /a HTTP/1.1").unwrap().display(), "GET /a");
        assert_eq!(
            recognize(b"*1\r\n$4\r\nPING\r\n").unwrap().display(),
            "redis PING"
        );
    }

    /// A fast stand-in for the fuzzer in every `cargo test`: random and mutated inputs never
    /// panic (cargo fuzz runs the same property with coverage guidance in CI).
    #[test]
    fn arbitrary_input_never_panics() {
        let seeds: &[&[u8]] = &[
            b"GET /a?b HTTP/1.1\r\n",
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            &[b'Q', 0, 0, 0, 9, b's', b'e', b'l', 0],
            &[0, 0, 0, 8, 4, 210, 22, 47],
            &[5, 0, 0, 0, 3, b'S', b'E', b'L'],
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..50_000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            let len = (next() % 80) as usize;
            input.resize(len, 0);
            for _ in 0..(next() % 6) {
                if !input.is_empty() {
                    let at = (next() as usize) % input.len();
                    input[at] = next() as u8;
                }
            }
            let _ = recognize(&input);
            let _ = recognize_with(&input, OPEN);
        }
    }
}
