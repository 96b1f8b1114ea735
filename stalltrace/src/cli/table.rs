//! Aligned text tables and human formatting for the CLI.
use std::fmt::Write as _;

pub struct Table {
    headers: Vec<&'static str>,
    /// Right-align these columns (numbers).
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns`: header and whether the column is numeric.
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            numeric: columns.iter().map(|(_, n)| *n).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; every cell is made [`terminal_safe`].
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows
            .push(row.into_iter().map(|cell| terminal_safe(&cell)).collect());
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                if self.numeric[i] {
                    let _ = write!(line, "{}{cell}", " ".repeat(pad));
                } else if i + 1 < row.len() {
                    let _ = write!(line, "{cell}{}", " ".repeat(pad));
                } else {
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `text` safe to print on a terminal: control characters (C0 including newlines and ESC,
/// DEL, C1 including CSI) and bidirectional-override characters each become `?`, so that a
/// process name, path, symbol, request signature or error message chosen by a local user cannot
/// move the cursor, rewrite the screen, forge lines or reorder what is shown. Every text
/// renderer of the CLI goes through it (JSON output is escaped by the serializer instead).
pub fn terminal_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Makes every string of a JSON answer (keys included) [`terminal_safe`], before a text
/// renderer sees it.
pub fn sanitize_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(text) => *text = terminal_safe(text),
        Value::Array(items) => items.iter_mut().for_each(sanitize_json),
        Value::Object(members) => {
            let taken = std::mem::take(members);
            for (key, mut member) in taken {
                sanitize_json(&mut member);
                members.insert(terminal_safe(&key), member);
            }
        }
        _ => {}
    }
}

/// `1.5KiB`, `12B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `127.0.0.1:8080`, `[::1]:8080`.
pub fn endpoint(address: &std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(*address, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut table = Table::new(&[("ID", true), ("NAME", false), ("PEER", false)]);
        table.push(vec!["7".into(), "nginx".into(), "a".into()]);
        table.push(vec!["1234".into(), "x".into(), "bbb".into()]);
        assert_eq!(
            table.render(),
            "  ID  NAME   PEER\n   7  nginx  a\n1234  x      bbb\n"
        );
    }

    #[test]
    fn strips_control_and_escape_characters() {
        assert_eq!(terminal_safe("nginx"), "nginx");
        assert_eq!(terminal_safe("GET /caf\u{e9}"), "GET /caf\u{e9}");
        assert_eq!(terminal_safe("\x1b[2J\x1b]0;pwned\x07x"), "?[2J?]0;pwned?x");
        assert_eq!(terminal_safe("a\nb\rc\td\x7f\u{9b}31m"), "a?b?c?d??31m");
        assert_eq!(terminal_safe("evil\u{202e}txt.exe"), "evil?txt.exe");

        let mut answer = serde_json::json!({"comm\x1b": ["\x1b[31mred", 3, {"s": "ok\n"}]});
        sanitize_json(&mut answer);
        assert_eq!(
            answer,
            serde_json::json!({"comm?": ["?[31mred", 3, {"s": "ok?"}]})
        );

        let mut table = Table::new(&[("NAME", false)]);
        table.push(vec!["a\x1b[1mb".into()]);
        assert_eq!(table.render(), "NAME\na?[1mb\n");
    }

    #[test]
    fn formats_bytes_and_endpoints() {
        assert_eq!(bytes(12), "12B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(5 << 30), "5.0GiB");
        assert_eq!(endpoint(&"::1".parse().unwrap(), 80), "[::1]:80");
        assert_eq!(endpoint(&"10.0.0.1".parse().unwrap(), 80), "10.0.0.1:80");
    }
}
