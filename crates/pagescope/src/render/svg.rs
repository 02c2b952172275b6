//! `pagescope map --svg`: the address space as one row per mapping, each
//! row a band of page states.
//!
//! Every row has the same width whatever the mapping's size, and within a
//! row each run of pages is as wide as the logarithm of its page count
//! (plus one), so a 4 KiB page in a 1 GiB reservation stays visible. Each
//! band carries `data-state`, `data-start` and `data-pages` (and a
//! `<title>` with the exact numbers) so the picture can be checked against
//! the scan.

use std::fmt::Write as _;

use crate::page::PageState;
use crate::report::{ProcessReport, VmaReport};

const LABEL_W: f64 = 460.0;
const BAND_W: f64 = 640.0;
const ROW_H: f64 = 16.0;
const PAD: f64 = 8.0;

/// The fill colour of a state.
pub fn colour(s: PageState) -> &'static str {
    match s {
        PageState::Present => "#2b7bba",
        PageState::Zero => "#9ecae1",
        PageState::Resident => "#31a354",
        PageState::SwapCache => "#fdae6b",
        PageState::Swapped => "#d94801",
        PageState::Fallocated => "#9e9ac8",
        PageState::NotResident => "#bdbdbd",
        PageState::Hole => "#f4f4f4",
        PageState::Guard => "#252525",
        PageState::Unknown => "#e7298a",
    }
}

/// A band: consecutive runs of one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Band {
    /// First address.
    pub start: u64,
    /// Pages.
    pub pages: u64,
    /// State.
    pub state: PageState,
}

/// The bands of a mapping: its runs with neighbours of equal state joined.
pub fn bands(v: &VmaReport, page: u64) -> Vec<Band> {
    let mut out: Vec<Band> = Vec::new();
    for r in &v.runs {
        match out.last_mut() {
            Some(b) if b.state == r.state && b.start + b.pages * page == r.start.get() => {
                b.pages += r.pages
            }
            _ => out.push(Band {
                start: r.start.get(),
                pages: r.pages,
                state: r.state,
            }),
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The SVG document for `reports` (one block of rows per process).
pub fn render(reports: &[&ProcessReport]) -> String {
    let rows: usize = reports.iter().map(|r| r.vmas.len() + 2).sum();
    let legend_h = 2.0 * ROW_H;
    let height = PAD * 2.0 + legend_h + rows as f64 * ROW_H;
    let width = PAD * 2.0 + LABEL_W + BAND_W;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    legend(&mut s);
    let mut y = PAD + legend_h;
    for r in reports {
        let _ = writeln!(
            s,
            r#"<text x="{PAD}" y="{}" font-weight="bold">process {} ({}) - band widths grow with log(pages); hover for exact counts</text>"#,
            y + ROW_H - 4.0,
            r.pid,
            esc(&r.comm)
        );
        y += ROW_H;
        let _ = writeln!(s, r#"<g class="process" data-pid="{}">"#, r.pid);
        for v in &r.vmas {
            row(&mut s, v, r.page_size.get(), y);
            y += ROW_H;
        }
        let _ = writeln!(s, "</g>");
        y += ROW_H;
    }
    s.push_str("</svg>\n");
    s
}

fn legend(s: &mut String) {
    let mut x = PAD;
    for st in PageState::ALL {
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{PAD}" width="12" height="12" fill="{}" stroke="#666" stroke-width="0.5"/><text x="{}" y="{}">{}</text>"##,
            colour(st),
            x + 16.0,
            PAD + 10.0,
            st.name()
        );
        x += 24.0 + 7.0 * st.name().len() as f64;
    }
}

/// `path` cut to `max` characters in the middle, keeping the file name.
fn shorten(path: &str, max: usize) -> String {
    let chars: Vec<char> = path.chars().collect();
    if chars.len() <= max {
        return path.to_owned();
    }
    let tail = (max - 3) * 2 / 3;
    let head = max - 3 - tail;
    let mut s: String = chars[..head].iter().collect();
    s.push_str("...");
    s.extend(&chars[chars.len() - tail..]);
    s
}

fn row(s: &mut String, v: &VmaReport, page: u64, y: f64) {
    let vma = &v.vma;
    let kib = vma.range.len() / 1024;
    let label = format!(
        "{:x} {} {:>9} KiB {:<7} {}",
        vma.range.start().get(),
        vma.perms,
        kib,
        vma.backing.name(),
        shorten(&vma.path.display(), 36)
    );
    let _ = writeln!(
        s,
        r#"<g class="vma" data-start="{}" data-end="{}"><text x="{PAD}" y="{}" xml:space="preserve">{}</text>"#,
        vma.range.start().get(),
        vma.range.end().get(),
        y + ROW_H - 4.0,
        esc(&label)
    );
    let bands = bands(v, page);
    let weight = |b: &Band| 1.0 + (b.pages as f64).log2();
    let total: f64 = bands.iter().map(weight).sum();
    let mut x = PAD + LABEL_W;
    for b in &bands {
        let w = BAND_W * weight(b) / total;
        let _ = writeln!(
            s,
            r##"<rect class="band" x="{x:.2}" y="{}" width="{w:.2}" height="{}" fill="{}" stroke="#fff" stroke-width="0.3" data-state="{}" data-start="{}" data-pages="{}"><title>{:#x}: {} pages {}</title></rect>"##,
            y + 2.0,
            ROW_H - 4.0,
            colour(b.state),
            b.state.name(),
            b.start,
            b.pages,
            b.start,
            b.pages,
            b.state.name()
        );
        x += w;
    }
    let _ = writeln!(s, "</g>");
}
