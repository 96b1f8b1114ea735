//! Text tables (comfy-table), terminal detection and human formatting for the CLI.
use std::io::IsTerminal as _;

use comfy_table::{CellAlignment, ContentArrangement, TableComponent};

/// How text output may look on this stdout: colour only on a terminal and without `NO_COLOR`
/// (<https://no-color.org>), tables fitted to the terminal's width only on a terminal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Terminal {
    /// ANSI colours and bold.
    pub colour: bool,
    /// The terminal's width in columns: wide tables wrap their cells to fit.
    pub width: Option<u16>,
}

impl Terminal {
    /// What stdout is: a terminal (its width; colour unless `NO_COLOR` is set to anything
    /// non-empty), or a pipe or file (plain text at full width).
    pub fn stdout() -> Self {
        if !std::io::stdout().is_terminal() {
            return Self::plain();
        }
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            colour: !no_color,
            // A pty without a size (0 columns) is no width to fit.
            width: comfy_table::Table::new().width().filter(|&w| w >= 20),
        }
    }

    /// No colour, no width limit (pipes, files, tests).
    pub fn plain() -> Self {
        Self::default()
    }

    /// `text` in `style` when colour is on.
    pub fn paint(&self, text: &str, style: anstyle::Style) -> String {
        if self.colour {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }
}

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

    /// Plain text: columns two spaces apart, numbers right-aligned, no trailing spaces.
    pub fn render(&self) -> String {
        self.render_for(&Terminal::plain())
    }

    /// As [`Self::render`], with a bold header when `terminal` has colour, and cells wrapped
    /// so that the table fits `terminal`'s width when it has one.
    pub fn render_for(&self, terminal: &Terminal) -> String {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        for border in [
            TableComponent::LeftBorder,
            TableComponent::RightBorder,
            TableComponent::TopBorder,
            TableComponent::BottomBorder,
            TableComponent::LeftHeaderIntersection,
            TableComponent::HeaderLines,
            TableComponent::MiddleHeaderIntersections,
            TableComponent::RightHeaderIntersection,
            TableComponent::LeftBorderIntersections,
            TableComponent::HorizontalLines,
            TableComponent::MiddleIntersections,
            TableComponent::RightBorderIntersections,
            TableComponent::TopBorderIntersections,
            TableComponent::BottomBorderIntersections,
            TableComponent::TopLeftCorner,
            TableComponent::TopRightCorner,
            TableComponent::BottomLeftCorner,
            TableComponent::BottomRightCorner,
        ] {
            table.remove_style(border);
        }
        // One space of padding and the (blank) vertical line: columns two spaces apart.
        table.set_style(TableComponent::VerticalLines, ' ');
        match terminal.width {
            Some(width) => {
                table.set_width(width);
                table.set_content_arrangement(ContentArrangement::Dynamic);
            }
            None => {
                table.set_content_arrangement(ContentArrangement::Disabled);
            }
        }
        if terminal.colour {
            table.enforce_styling();
        } else {
            table.force_no_tty();
        }
        let header = self.headers.iter().map(|h| {
            let cell = comfy_table::Cell::new(h);
            if terminal.colour {
                cell.add_attribute(comfy_table::Attribute::Bold)
            } else {
                cell
            }
        });
        table.set_header(header);
        for row in &self.rows {
            table.add_row(row.iter().map(String::as_str));
        }
        for (index, column) in table.column_iter_mut().enumerate() {
            column.set_padding((0, 1));
            if self.numeric[index] {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        let mut out = String::new();
        for line in table.lines() {
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

/// `127.0.0.1:8080`, `[::1]:8080`; a Unix socket's name (`/run/app.sock`, `@abstract`, `-`
/// for an unbound one), with the peer's pid when the kernel gave it.
pub fn endpoint(end: &stalltrace_core::api::schema::EndpointJson) -> String {
    match (end.port, end.address.parse::<std::net::IpAddr>()) {
        (Some(port), Ok(address)) => std::net::SocketAddr::new(address, port).to_string(),
        (Some(port), Err(_)) => format!("{}:{port}", end.address),
        (None, _) => {
            let name = if end.address.is_empty() {
                "-"
            } else {
                &end.address
            };
            match end.pid {
                Some(pid) => format!("{name} (pid {pid})"),
                None => name.to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_show_addresses_and_unix_names() {
        use stalltrace_core::api::schema::EndpointJson;
        let end = |address: &str, port, pid| EndpointJson {
            address: address.into(),
            port,
            inode: None,
            pid,
        };
        assert_eq!(endpoint(&end("::1", Some(80), None)), "[::1]:80");
        assert_eq!(endpoint(&end("10.0.0.1", Some(80), None)), "10.0.0.1:80");
        assert_eq!(endpoint(&end("", None, None)), "-");
        assert_eq!(
            endpoint(&end("/run/php/fpm.sock", None, Some(42))),
            "/run/php/fpm.sock (pid 42)"
        );
    }

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
    fn formats_bytes() {
        assert_eq!(bytes(12), "12B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(5 << 30), "5.0GiB");
    }
}
