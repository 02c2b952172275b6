//! A plain-text table: columns sized to their contents, numbers right
//! aligned, sortable by any column, the last column (a path) shortened in
//! the middle to fit a width.

use std::cmp::Ordering;
use std::io::{self, Write};

/// One column.
#[derive(Clone, Debug)]
pub struct Column {
    /// Header text (also the name `--sort` and `--columns` take).
    pub name: String,
    /// Right aligned (numbers) or left aligned (text).
    pub right: bool,
}

impl Column {
    /// A right-aligned (numeric) column.
    pub fn num(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            right: true,
        }
    }

    /// A left-aligned (text) column.
    pub fn text(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            right: false,
        }
    }
}

/// What a cell sorts by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A number (sorted largest first).
    Num(u64),
    /// Text (sorted alphabetically).
    Text(String),
}

/// One cell: its text and its sort key.
#[derive(Clone, Debug)]
pub struct Cell {
    /// What is printed.
    pub text: String,
    /// What it sorts by.
    pub key: Key,
}

impl Cell {
    /// A number printed as `text`.
    pub fn num(value: u64, text: String) -> Self {
        Self {
            text,
            key: Key::Num(value),
        }
    }

    /// Text that sorts as itself.
    pub fn text(text: impl Into<String>) -> Self {
        let text = text.into();
        Self {
            key: Key::Text(text.clone()),
            text,
        }
    }
}

/// Rows under columns, then footer rows (totals) that never sort.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// The columns.
    pub columns: Vec<Column>,
    /// Body rows, one cell per column.
    pub rows: Vec<Vec<Cell>>,
    /// Rows printed last, unsorted.
    pub footer: Vec<Vec<Cell>>,
}

impl Table {
    /// A table with these columns and no rows.
    pub fn new(columns: Vec<Column>) -> Self {
        Self {
            columns,
            ..Self::default()
        }
    }

    /// The index of the column named `name` (case-insensitive).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// Sorts the body by column `col`: numbers largest first, text
    /// alphabetically; ties keep their order.
    pub fn sort_by(&mut self, col: usize) {
        self.rows.sort_by(|a, b| match (&a[col].key, &b[col].key) {
            (Key::Num(x), Key::Num(y)) => y.cmp(x),
            (Key::Text(x), Key::Text(y)) => x.cmp(y),
            (Key::Num(_), Key::Text(_)) => Ordering::Less,
            (Key::Text(_), Key::Num(_)) => Ordering::Greater,
        });
    }

    /// Writes the header, the body and the footer. With `max_width`, the
    /// last column is shortened in the middle (`...`) so lines fit.
    pub fn write(&self, w: &mut dyn Write, max_width: Option<usize>) -> io::Result<()> {
        let widths = self.widths();
        let header: Vec<Cell> = self.columns.iter().map(|c| Cell::text(&c.name)).collect();
        for row in std::iter::once(&header)
            .chain(&self.rows)
            .chain(&self.footer)
        {
            let line = self.line(row, &widths, max_width);
            writeln!(w, "{}", line.trim_end())?;
        }
        Ok(())
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.name.len()).collect();
        for row in self.rows.iter().chain(&self.footer) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.text.chars().count());
            }
        }
        widths
    }

    fn line(&self, row: &[Cell], widths: &[usize], max_width: Option<usize>) -> String {
        let last = self.columns.len() - 1;
        let mut line = String::new();
        for (i, (cell, col)) in row.iter().zip(&self.columns).enumerate() {
            if i > 0 {
                line.push(' ');
            }
            if i == last && !col.right {
                let room = max_width.map(|m| m.saturating_sub(line.chars().count()));
                line.push_str(&elide(&cell.text, room));
            } else if col.right {
                line.push_str(&format!("{:>w$}", cell.text, w = widths[i]));
            } else {
                line.push_str(&format!("{:<w$}", cell.text, w = widths[i]));
            }
        }
        line
    }
}

/// `text` shortened in the middle to `room` characters (at least 12).
pub(crate) fn elide(text: &str, room: Option<usize>) -> String {
    let n = text.chars().count();
    let room = match room {
        Some(r) if n > r.max(12) => r.max(12),
        _ => return text.to_owned(),
    };
    let tail = (room - 3) * 2 / 3;
    let head = room - 3 - tail;
    let chars: Vec<char> = text.chars().collect();
    let mut s: String = chars[..head].iter().collect();
    s.push_str("...");
    s.extend(&chars[n - tail..]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::new(vec![Column::num("SIZE"), Column::text("PATH")]);
        for (n, p) in [
            (5, "/b"),
            (700, "/a/very/long/path/to/a/library.so.6"),
            (5, "/a"),
        ] {
            t.rows
                .push(vec![Cell::num(n, n.to_string()), Cell::text(p)]);
        }
        t.footer
            .push(vec![Cell::num(710, "710".into()), Cell::text("total")]);
        t
    }

    #[test]
    fn columns_fit_their_widest_cell_and_sort() {
        let mut t = table();
        t.sort_by(0);
        let mut out = Vec::new();
        t.write(&mut out, None).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "SIZE PATH");
        assert_eq!(lines[1], " 700 /a/very/long/path/to/a/library.so.6");
        assert_eq!(lines[2], "   5 /b", "ties keep their order");
        assert_eq!(lines[4], " 710 total", "the footer stays last");
        t.sort_by(1);
        assert_eq!(t.rows[0][1].text, "/a");
    }

    #[test]
    fn the_last_column_is_shortened_to_fit() {
        let mut out = Vec::new();
        table().write(&mut out, Some(25)).unwrap();
        let text = String::from_utf8(out).unwrap();
        for l in text.lines() {
            assert!(l.chars().count() <= 25, "{l:?}");
        }
        assert!(
            text.contains("...") && text.contains("brary.so.6\n"),
            "{text}"
        );
    }
}
