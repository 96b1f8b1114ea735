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

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
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
    fn formats_bytes_and_endpoints() {
        assert_eq!(bytes(12), "12B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(5 << 30), "5.0GiB");
        assert_eq!(endpoint(&"::1".parse().unwrap(), 80), "[::1]:80");
        assert_eq!(endpoint(&"10.0.0.1".parse().unwrap(), 80), "10.0.0.1:80");
    }
}
