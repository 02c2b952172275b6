//! How `pagescope watch` shows intervals: a full-screen live view on a
//! terminal (redrawn in place like `top`, fitted to the terminal's size and
//! redrawn when it changes), one line per interval when the output is a
//! pipe or file, NDJSON with `--json`.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsFd;

use anyhow::Result;
use pagescope::dirty::stats::Interval;
use pagescope::render::SizeUnit;

/// Intervals kept for the rate history.
const HISTORY: usize = 60;
/// Sparkline glyphs, lowest to highest.
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Clears the screen and homes the cursor: starts every frame.
const NEW_FRAME: &str = "\x1b[H\x1b[2J";

/// The output mode.
pub enum View {
    /// One JSON object per interval.
    Json,
    /// One text line per interval.
    Lines(Vec<String>, SizeUnit),
    /// A screen redrawn every interval.
    Live(Box<Live>),
}

impl View {
    /// Whether this is the live view (which reads keys).
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Live(_))
    }

    /// The mode for these flags and this stdout.
    pub fn choose(
        json: bool,
        lines: bool,
        pid: u32,
        header: Vec<String>,
        unit: SizeUnit,
    ) -> Result<Self> {
        use std::io::IsTerminal;
        Ok(if json {
            Self::Json
        } else if lines || !std::io::stdout().is_terminal() {
            Self::Lines(header, unit)
        } else {
            Self::Live(Box::new(Live {
                pid,
                unit,
                header,
                rates: VecDeque::with_capacity(HISTORY),
                last: None,
                size: terminal_size(),
            }))
        })
    }

    /// Shows what there is before the first interval (the live view draws
    /// its first frame at once).
    pub fn start(&mut self, out: &mut dyn Write) -> Result<()> {
        match self {
            Self::Json => {}
            Self::Lines(header, _) => {
                for h in header.iter() {
                    writeln!(out, "{h}")?;
                }
            }
            Self::Live(live) => live.draw(out)?,
        }
        out.flush()?;
        Ok(())
    }

    /// Called between intervals: redraws the live view if the terminal
    /// was resized.
    pub fn tick(&mut self, out: &mut dyn Write) -> Result<()> {
        if let Self::Live(live) = self {
            let now = terminal_size();
            if now != live.size {
                live.size = now;
                live.draw(out)?;
            }
        }
        Ok(())
    }

    /// Shows one interval.
    pub fn show(&mut self, out: &mut dyn Write, s: &Interval) -> Result<()> {
        match self {
            Self::Json => {
                serde_json::to_writer(&mut *out, s)?;
                writeln!(out)?;
            }
            Self::Lines(_, unit) => writeln!(out, "{}", line(s, *unit))?,
            Self::Live(live) => {
                live.push(s.clone());
                live.draw(out)?;
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Leaves the screen ready for the summary line.
    pub fn finish(&mut self, out: &mut dyn Write) -> Result<()> {
        if let Self::Live(_) = self {
            writeln!(out)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// The terminal's (columns, rows), or 120 x 40 if unknown.
fn terminal_size() -> (usize, usize) {
    rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map_or((120, 40), |w| {
            (usize::from(w.ws_col), usize::from(w.ws_row))
        })
}

/// State of the live view.
pub struct Live {
    pid: u32,
    unit: SizeUnit,
    header: Vec<String>,
    rates: VecDeque<f64>,
    last: Option<Interval>,
    size: (usize, usize),
}

impl Live {
    fn push(&mut self, s: Interval) {
        // A partial interval is shown, not counted in the peak.
        if !s.partial {
            if self.rates.len() == HISTORY {
                self.rates.pop_front();
            }
            self.rates.push_back(s.dirty_rate_mib_s);
        }
        self.last = Some(s);
    }

    /// Draws the frame fitted to the terminal: lines cut at its width;
    /// the header always shown, the tables cut to the rows left.
    fn draw(&self, out: &mut dyn Write) -> Result<()> {
        let (cols, rows) = self.size;
        let (head, body) = self.frame();
        let room = rows.saturating_sub(1);
        let mut lines: Vec<&str> = head.iter().map(String::as_str).take(room).collect();
        let left = room.saturating_sub(lines.len());
        lines.extend(body.iter().map(String::as_str).take(left));
        write!(out, "{NEW_FRAME}")?;
        for l in lines {
            writeln!(out, "{}", fit(l, cols.saturating_sub(1)))?;
        }
        Ok(())
    }

    /// The frame's fixed part (title, header, rates) and its tables.
    fn frame(&self) -> (Vec<String>, Vec<String>) {
        let mut head = vec![format!(
            "pagescope watch: process {}  t={:.1}s  (q or Ctrl-C detaches)",
            self.pid,
            self.last.as_ref().map_or(0.0, |s| s.t)
        )];
        head.extend(self.header.iter().cloned());
        head.push(String::new());
        let Some(s) = &self.last else {
            head.push("waiting for the first interval...".into());
            return (head, Vec::new());
        };
        let peak = self.rates.iter().copied().fold(0.0, f64::max);
        let u = self.unit;
        head.push(format!(
            "dirty rate  {:>12}   {:>9} pages in {:.2} s   peak {}",
            rate(u, s.dirty_rate_mib_s),
            s.written_pages,
            s.interval_s,
            rate(u, peak)
        ));
        head.push(format!(
            "history     {}",
            sparkline(self.rates.iter().copied(), peak)
        ));
        head.push(format!(
            "written since start: {} distinct pages ({})",
            s.unique_pages,
            u.format(s.unique_pages * page_bytes(s))
        ));
        head.push(format!(
            "pre-copy at {} MiB/s: {}",
            s.precopy_bandwidth_mib_s,
            verdict(s)
        ));
        if !s.sources.is_empty() {
            let sources: Vec<String> = s
                .sources
                .iter()
                .map(|(src, n)| format!("{} {n}", source_name(*src)))
                .collect();
            head.push(format!("sources: {}", sources.join(", ")));
        }
        (head, body(s, self.unit))
    }
}

/// The tables: hottest mappings, shared objects, followed children.
fn body(s: &Interval, unit: SizeUnit) -> Vec<String> {
    let mut b = vec![
        String::new(),
        format!(
            "{:<29} {:>10} {:>12} {:>6}  mapping",
            "hottest mappings", "pages", "rate", "share"
        ),
    ];
    for v in &s.vmas {
        let share = if s.written_pages > 0 {
            100.0 * v.written_pages as f64 / s.written_pages as f64
        } else {
            0.0
        };
        let bytes_s = (v.written_pages * page_bytes(s)) as f64 / s.interval_s.max(1e-9);
        b.push(format!(
            "{:<29} {:>10} {:>12} {:>5.1}%  {}",
            format!("{}-{}", v.start, v.end),
            v.written_pages,
            unit.format_rate(bytes_s),
            share,
            if v.path.is_empty() { "[anon]" } else { &v.path }
        ));
    }
    if !s.objects.is_empty() {
        b.push(String::new());
        b.push(format!(
            "{:<40} {:>10}  writers (pid:pages)",
            "shared objects", "pages"
        ));
        for o in &s.objects {
            let writers: Vec<String> = o.writers.iter().map(|(p, n)| format!("{p}:{n}")).collect();
            b.push(format!(
                "{:<40} {:>10}  {}",
                o.path,
                o.written_pages,
                writers.join(" ")
            ));
        }
    }
    for c in &s.followed {
        b.push(format!("child {}: {} pages", c.pid, c.written_pages));
    }
    b
}

/// `s` cut to `width` characters.
fn fit(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

/// Bytes per page, from the interval's own numbers.
fn page_bytes(s: &Interval) -> u64 {
    s.written_bytes
        .checked_div(s.written_pages)
        .unwrap_or_else(|| pagescope::PageSize::current().get())
}

/// A rate given in MiB/s, in `unit`.
fn rate(unit: SizeUnit, mib_s: f64) -> String {
    unit.format_rate(mib_s * 1024.0 * 1024.0)
}

fn verdict(s: &Interval) -> String {
    match s.precopy_verdict {
        "converges" => "converges".into(),
        "unknown" => format!("unknown ({} conservative pages)", s.conservative_pages),
        _ => "DOES NOT CONVERGE".into(),
    }
}

fn source_name(s: pagescope::dirty::WriteSource) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
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
fn line(s: &Interval, unit: SizeUnit) -> String {
    let top: Vec<String> = s
        .vmas
        .iter()
        .take(3)
        .map(|v| format!("{} {}", short(&v.path, v.start), v.written_pages))
        .collect();
    let degraded = match (s.degraded.is_some(), s.partial) {
        (true, _) => "  DEGRADED",
        (false, true) => "  (partial)",
        _ => "",
    };
    // Forks are counted where children are tracked from birth.
    let forks = match s.forks {
        0 => String::new(),
        n => format!("  {n} forks"),
    };
    format!(
        "t={:7.2}s  {:>9} pages {:>9}  {:>12}  pre-copy@{}MiB/s: {}{degraded}{forks}  | {}",
        s.t,
        s.written_pages,
        unit.format(s.written_bytes),
        rate(unit, s.dirty_rate_mib_s),
        s.precopy_bandwidth_mib_s,
        verdict(s),
        top.join(", ")
    )
}

fn short(path: &str, start: pagescope::VirtAddr) -> String {
    if path.is_empty() {
        format!("anon@{start}")
    } else if path.starts_with("shared anon") || path.starts_with("SysV ") {
        path.to_owned()
    } else {
        path.rsplit('/').next().unwrap_or(path).to_owned()
    }
}

/// Keys typed on the terminal (`q` quits): stdin in non-canonical,
/// no-echo mode while watching, restored on drop. Nothing when stdin is
/// not a terminal.
pub struct Keys {
    saved: Option<rustix::termios::Termios>,
}

impl Keys {
    /// No key handling.
    pub fn none() -> Self {
        Self { saved: None }
    }

    /// Puts a terminal stdin into key-at-a-time mode.
    pub fn new() -> Self {
        use rustix::termios::{
            LocalModes, OptionalActions, SpecialCodeIndex, tcgetattr, tcsetattr,
        };
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        raw.local_modes
            .remove(LocalModes::ICANON | LocalModes::ECHO);
        raw.special_codes[SpecialCodeIndex::VMIN] = 0;
        raw.special_codes[SpecialCodeIndex::VTIME] = 0;
        if tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw).is_err() {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }

    /// Whether `q` was typed since the last call.
    pub fn quit_pressed(&mut self) -> bool {
        if self.saved.is_none() {
            return false;
        }
        let mut buf = [0u8; 64];
        match rustix::io::read(std::io::stdin().as_fd(), &mut buf) {
            Ok(n) => buf[..n].iter().any(|&b| b == b'q' || b == b'Q'),
            Err(_) => false,
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
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

    #[test]
    fn lines_are_cut_to_the_width() {
        assert_eq!(fit("ñandú▁▂▃", 5), "ñandú");
        assert_eq!(fit("ab", 5), "ab");
    }
}
