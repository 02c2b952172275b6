//! How `pagescope watch` shows intervals: a full-screen live view on a
//! terminal (a [`Screen`]: ratatui on crossterm, redrawn in place like
//! `top`, fitted to the terminal's size and redrawn when it changes), one
//! line per interval when the output is a pipe or file, NDJSON with
//! `--json`.

use std::collections::VecDeque;
use std::io::Write;

use anyhow::Result;
use pagescope::dirty::WatchInterval;
use pagescope::render::SizeUnit;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Sparkline};

use crate::screen::Screen;

/// Intervals kept for the rate history.
const HISTORY: usize = 60;
/// Sparkline levels (eighths of a cell): 1 (the lowest bar, for zero) to
/// 8 (a full cell, the peak).
const SPARK_LEVELS: u64 = 8;
/// The label before the sparkline; the sparkline starts right after it.
const HISTORY_LABEL: &str = "history     ";

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
                screen: Some(Screen::enter()?),
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
            Self::Live(live) => live.draw()?,
        }
        out.flush()?;
        Ok(())
    }

    /// Called between intervals: redraws the live view if the terminal
    /// was resized, and tells whether `q` or Ctrl-C was typed in it.
    pub fn tick(&mut self) -> Result<bool> {
        let Self::Live(live) = self else {
            return Ok(false);
        };
        let Some(screen) = &mut live.screen else {
            return Ok(false);
        };
        let quit = screen.quit_pressed()?;
        if screen.resized() {
            live.draw()?;
        }
        Ok(quit)
    }

    /// Shows one interval.
    pub fn show(&mut self, out: &mut dyn Write, s: &WatchInterval) -> Result<()> {
        match self {
            Self::Json => {
                serde_json::to_writer(&mut *out, s)?;
                writeln!(out)?;
            }
            Self::Lines(_, unit) => writeln!(out, "{}", line(s, *unit))?,
            Self::Live(live) => {
                live.push(s.clone());
                live.draw()?;
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Leaves the full screen (the terminal as it was) for the summary
    /// line. Dropping the view does the same on the other ways out.
    pub fn finish(&mut self) {
        if let Self::Live(live) = self {
            live.screen = None;
        }
    }
}

/// State of the live view.
pub struct Live {
    pid: u32,
    unit: SizeUnit,
    header: Vec<String>,
    rates: VecDeque<f64>,
    last: Option<WatchInterval>,
    /// The terminal session; `None` once finished.
    screen: Option<Screen>,
}

impl Live {
    fn push(&mut self, s: WatchInterval) {
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
    fn draw(&mut self) -> Result<()> {
        let (head, body) = self.frame();
        let history_row = head.iter().position(|l| l.starts_with(HISTORY_LABEL));
        let peak = self.rates.iter().copied().fold(0.0, f64::max);
        let levels = spark_levels(self.rates.iter().copied(), peak);
        let lines: Vec<String> = head.into_iter().chain(body).collect();
        if let Some(screen) = &mut self.screen {
            screen.draw(|f| render(f, lines, history_row, &levels))?;
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
        // The sparkline is drawn after the label (see `render`).
        head.push(HISTORY_LABEL.to_owned());
        head.push(format!(
            "written since start: {} distinct pages ({})",
            s.unique_pages,
            u.format(s.unique_pages * page_bytes(s))
        ));
        head.push(format!(
            "pre-copy at {} MiB/s: {}{}",
            s.precopy_bandwidth_mib_s,
            verdict(s),
            flags(s)
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
fn body(s: &WatchInterval, unit: SizeUnit) -> Vec<String> {
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

/// Draws `lines` from the top (cut to the frame: lines at its width,
/// the last ones at its height) and the rate history as a sparkline after
/// the label on `history_row`.
fn render(f: &mut Frame<'_>, lines: Vec<String>, history_row: Option<usize>, levels: &[u64]) {
    let area = f.area();
    let text: Vec<Line<'_>> = lines.into_iter().map(Line::from).collect();
    f.render_widget(Paragraph::new(text), area);
    let label = u16::try_from(HISTORY_LABEL.len()).unwrap_or(u16::MAX);
    let Some(row) = history_row.and_then(|r| u16::try_from(r).ok()) else {
        return;
    };
    if row < area.height && label < area.width {
        let spark = Rect::new(area.x + label, area.y + row, area.width - label, 1);
        f.render_widget(sparkline(levels), spark);
    }
}

/// The history widget: one cell per level of [`spark_levels`].
fn sparkline(levels: &[u64]) -> Sparkline<'_> {
    Sparkline::default().data(levels).max(SPARK_LEVELS)
}

/// Bytes per page, from the interval's own numbers.
fn page_bytes(s: &WatchInterval) -> u64 {
    s.written_bytes
        .checked_div(s.written_pages)
        .unwrap_or_else(|| pagescope::PageSize::current().get())
}

/// A rate given in MiB/s, in `unit`.
fn rate(unit: SizeUnit, mib_s: f64) -> String {
    unit.format_rate(mib_s * 1024.0 * 1024.0)
}

fn verdict(s: &WatchInterval) -> String {
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

/// One sparkline level per value, scaled to `peak`: zero is the lowest
/// bar (1), the peak a full cell ([`SPARK_LEVELS`]).
fn spark_levels(values: impl Iterator<Item = f64>, peak: f64) -> Vec<u64> {
    let steps = SPARK_LEVELS - 1;
    values
        .map(|v| {
            let level = if peak > 0.0 {
                v / peak * steps as f64
            } else {
                0.0
            };
            // The highest level the value reaches (rounded).
            1 + (0..=steps)
                .rev()
                .find(|&k| level + 0.5 >= k as f64)
                .unwrap_or(0)
        })
        .collect()
}

/// The one-line form of an interval.
fn line(s: &WatchInterval, unit: SizeUnit) -> String {
    let top: Vec<String> = s
        .vmas
        .iter()
        .take(3)
        .map(|v| format!("{} {}", short(&v.path, v.start), v.written_pages))
        .collect();
    format!(
        "t={:7.2}s  {:>9} pages {:>9}  {:>12}  pre-copy@{}MiB/s: {}{}  | {}",
        s.t,
        s.written_pages,
        unit.format(s.written_bytes),
        rate(unit, s.dirty_rate_mib_s),
        s.precopy_bandwidth_mib_s,
        verdict(s),
        flags(s),
        top.join(", ")
    )
}

/// What is special about an interval: degraded tracking or a partial
/// interval, and the forks in it (counted where children are tracked
/// from birth); empty for a plain one.
fn flags(s: &WatchInterval) -> String {
    let degraded = match (s.degraded.is_some(), s.partial) {
        (true, _) => "  DEGRADED",
        (false, true) => "  (partial)",
        _ => "",
    };
    let forks = match s.forks {
        0 => String::new(),
        n => format!("  {n} forks"),
    };
    format!("{degraded}{forks}")
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

#[cfg(test)]
mod tests {
    use super::*;

    use ratatui::buffer::Buffer;
    use ratatui::widgets::Widget;

    /// The glyphs `widget` draws in one row of `width` cells, trailing
    /// blanks dropped.
    fn drawn(widget: impl Widget, width: u16) -> String {
        let area = Rect::new(0, 0, width, 1);
        let mut buf = Buffer::empty(area);
        widget.render(area, &mut buf);
        let row: String = (0..width).map(|x| buf[(x, 0)].symbol()).collect();
        row.trim_end().to_owned()
    }

    fn sparkline_of(values: &[f64], peak: f64) -> String {
        let levels = spark_levels(values.iter().copied(), peak);
        drawn(sparkline(&levels), 10)
    }

    #[test]
    fn sparkline_scales_to_peak() {
        assert_eq!(sparkline_of(&[0.0, 5.0, 10.0], 10.0), "▁▅█");
        assert_eq!(sparkline_of(&[0.0, 0.0], 0.0), "▁▁");
    }

    #[test]
    fn lines_are_cut_to_the_width() {
        assert_eq!(drawn(Paragraph::new("ñandú▁▂▃"), 5), "ñandú");
        assert_eq!(drawn(Paragraph::new("ab"), 5), "ab");
    }
}
