//! How `pagescope watch` shows intervals: a full-screen live view on a
//! terminal (redrawn in place, like `top`), one line per interval when the
//! output is a pipe or file, NDJSON with `--json`.

use std::collections::VecDeque;
use std::io::Write;

use anyhow::Result;
use pagescope::dirty::stats::Interval;

/// Intervals kept for the rate history.
const HISTORY: usize = 60;
/// Mappings listed in the live view.
const TOP_VMAS: usize = 10;
/// Sparkline glyphs, lowest to highest.
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The output mode.
pub enum View {
    /// One JSON object per interval.
    Json,
    /// One text line per interval.
    Lines,
    /// A screen redrawn every interval.
    Live(Live),
}

impl View {
    /// The mode for these flags and this stdout.
    pub fn choose(json: bool, lines: bool, pid: u32, header: Vec<String>) -> Self {
        use std::io::IsTerminal;
        if json {
            Self::Json
        } else if lines || !std::io::stdout().is_terminal() {
            Self::Lines
        } else {
            Self::Live(Live {
                pid,
                header,
                rates: VecDeque::with_capacity(HISTORY),
            })
        }
    }

    /// Shows one interval.
    pub fn show(&mut self, out: &mut dyn Write, s: &Interval) -> Result<()> {
        match self {
            Self::Json => {
                serde_json::to_writer(&mut *out, s)?;
                writeln!(out)?;
            }
            Self::Lines => writeln!(out, "{}", line(s))?,
            Self::Live(live) => live.draw(out, s)?,
        }
        out.flush()?;
        Ok(())
    }
}

/// State of the live view.
pub struct Live {
    pid: u32,
    header: Vec<String>,
    rates: VecDeque<f64>,
}

impl Live {
    fn draw(&mut self, out: &mut dyn Write, s: &Interval) -> Result<()> {
        if self.rates.len() == HISTORY {
            self.rates.pop_front();
        }
        self.rates.push_back(s.dirty_rate_mib_s);
        let peak = self.rates.iter().copied().fold(0.0, f64::max);
        // Home, clear screen.
        write!(out, "\x1b[H\x1b[2J")?;
        writeln!(
            out,
            "pagescope watch: process {}  t={:.1}s  (Ctrl-C detaches)",
            self.pid, s.t
        )?;
        for h in &self.header {
            writeln!(out, "{h}")?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "dirty rate  {:>10.2} MiB/s   {:>9} pages in {:.2} s   peak {:.2} MiB/s",
            s.dirty_rate_mib_s, s.written_pages, s.interval_s, peak
        )?;
        writeln!(
            out,
            "history     {}",
            sparkline(self.rates.iter().copied(), peak)
        )?;
        writeln!(
            out,
            "written since start: {} distinct pages ({:.1} MiB)",
            s.unique_pages,
            mib(s.unique_pages * page_bytes(s))
        )?;
        writeln!(
            out,
            "pre-copy at {} MiB/s: {}",
            s.precopy_bandwidth_mib_s,
            verdict(s)
        )?;
        if !s.sources.is_empty() {
            let sources: Vec<String> = s
                .sources
                .iter()
                .map(|(src, n)| format!("{src:?} {n}"))
                .collect();
            writeln!(out, "sources: {}", sources.join(", "))?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:<29} {:>10} {:>10} {:>6}  mapping",
            "hottest mappings", "pages", "MiB/s", "share"
        )?;
        for v in s.vmas.iter().take(TOP_VMAS) {
            let share = if s.written_pages > 0 {
                100.0 * v.written_pages as f64 / s.written_pages as f64
            } else {
                0.0
            };
            let rate = mib(v.written_pages * page_bytes(s)) / s.interval_s.max(1e-9);
            writeln!(
                out,
                "{:<29} {:>10} {:>10.2} {:>5.1}%  {}",
                format!("{}-{}", v.start, v.end),
                v.written_pages,
                rate,
                share,
                if v.path.is_empty() { "[anon]" } else { &v.path }
            )?;
        }
        if s.vmas.len() > TOP_VMAS {
            writeln!(out, "... and {} more", s.vmas.len() - TOP_VMAS)?;
        }
        Ok(())
    }
}

/// Bytes per page, from the interval's own numbers.
fn page_bytes(s: &Interval) -> u64 {
    s.written_bytes
        .checked_div(s.written_pages)
        .unwrap_or_else(|| pagescope::PageSize::current().get())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn verdict(s: &Interval) -> &'static str {
    if s.precopy_converges {
        "converges"
    } else {
        "DOES NOT CONVERGE"
    }
}

/// One glyph per value, scaled to `peak`.
fn sparkline(values: impl Iterator<Item = f64>, peak: f64) -> String {
    values
        .map(|v| {
            let level = if peak > 0.0 {
                v / peak * (SPARKS.len() - 1) as f64
            } else {
                0.0
            };
            // The highest glyph whose level the value reaches (rounded).
            let i = (0..SPARKS.len())
                .rev()
                .find(|&k| level + 0.5 >= k as f64)
                .unwrap_or(0);
            SPARKS[i]
        })
        .collect()
}

/// The one-line form of an interval.
fn line(s: &Interval) -> String {
    let top: Vec<String> = s
        .vmas
        .iter()
        .take(3)
        .map(|v| format!("{} {}", short(&v.path, v.start), v.written_pages))
        .collect();
    format!(
        "t={:7.2}s  {:>9} pages {:>9.2} MiB  {:>9.2} MiB/s  pre-copy@{}MiB/s: {}  | {}",
        s.t,
        s.written_pages,
        mib(s.written_bytes),
        s.dirty_rate_mib_s,
        s.precopy_bandwidth_mib_s,
        verdict(s),
        top.join(", ")
    )
}

fn short(path: &str, start: pagescope::VirtAddr) -> String {
    if path.is_empty() {
        format!("anon@{start}")
    } else {
        path.rsplit('/').next().unwrap_or(path).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_peak() {
        assert_eq!(sparkline([0.0, 5.0, 10.0].into_iter(), 10.0), "▁▅█");
        assert_eq!(sparkline([0.0, 0.0].into_iter(), 0.0), "▁▁");
    }
}
