//! Live progress on stderr for long commands (`dump`, `send`): one
//! `indicatif` bar, redrawn at most ten times a second, shown only when
//! stderr is a terminal and the command's output is not `--json`, and
//! cleared before anything else is printed. `send`'s bar carries what was
//! transferred, the bandwidth, the dirty rate and the expected downtime
//! ([`SendOutput`]); with `--json` the same goes to stdout as NDJSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagescope::transfer::{SendEvent, SendPass, SendProgress};

/// `send --json` progress lines at most this often (each pass's first
/// is printed at once).
const NDJSON_EVERY: Duration = Duration::from_millis(250);
/// Redraws per second at most.
const REDRAWS_PER_SECOND: u8 = 10;
/// `[######      ]  42% pass 1: 420/1000 pages`, then the caller's detail.
const TEMPLATE: &str = "[{bar:30}] {percent:>3}% pass {prefix}: {pos}/{len} pages{msg}";

/// The progress of a command's passes over pages.
#[derive(Debug)]
pub struct Progress {
    /// Whether anything is drawn at all.
    on: bool,
    /// The bar on screen, from the first [`show`](Self::show) after a
    /// [`clear`](Self::clear).
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar on stderr if it is a terminal and `json` is false; nothing
    /// (every call a no-op) otherwise.
    pub fn passes(json: bool) -> Self {
        Self {
            on: !json && std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// `done` of `total` pages in pass `pass`; `detail` (e.g. `send`'s
    /// rates and expected downtime) follows the page counts.
    pub fn show(&mut self, pass: u32, done: u64, total: u64, detail: &str) {
        if !self.on {
            return;
        }
        let done = done.min(total);
        let Some(bar) = &self.bar else {
            // Built complete, so its first frame is right.
            self.bar = Some(new_bar(total, done, pass, detail));
            return;
        };
        // Only what changed: every change is a (rate-limited) redraw.
        if bar.prefix() != pass.to_string() {
            bar.set_prefix(pass.to_string());
        }
        if bar.message() != detail {
            bar.set_message(detail.to_owned());
        }
        if bar.length() != Some(total) {
            bar.set_length(total);
        }
        bar.set_position(done);
    }

    /// Erases the bar (before a line is printed); the next
    /// [`show`](Self::show) draws a fresh one.
    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(total: u64, done: u64, pass: u32, detail: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(TEMPLATE)
        .expect("the template is valid")
        .progress_chars("# ");
    let target = ProgressDrawTarget::stderr_with_hz(REDRAWS_PER_SECOND);
    let bar = ProgressBar::with_draw_target(Some(total), target)
        .with_style(style)
        .with_prefix(pass.to_string())
        .with_message(detail.to_owned())
        .with_position(done);
    bar.tick();
    bar
}

/// `send`'s output as it goes: the bar and a line per pass on stderr;
/// with `--json`, NDJSON on stdout: updates (`"event": "progress"`, at
/// most four a second), one object per pass (`"pass"`), then the report
/// (`"report"`).
#[derive(Debug)]
pub struct SendOutput {
    bar: Progress,
    ndjson: bool,
    /// When the last progress line was printed (`None`: none this pass).
    printed: Option<Instant>,
}

impl SendOutput {
    /// The bar unless `json`; NDJSON on stdout if `ndjson`.
    pub fn new(json: bool, ndjson: bool) -> Self {
        Self {
            bar: Progress::passes(json),
            ndjson,
            printed: None,
        }
    }

    /// The send told `e`.
    pub fn event(&mut self, e: SendEvent<'_>) {
        match e {
            SendEvent::Progress(p) => {
                self.bar.show(
                    p.pass,
                    p.pass_pages_done,
                    p.pass_pages_total,
                    &send_detail(p),
                );
                let now = Instant::now();
                if self.printed.is_none_or(|t| now >= t + NDJSON_EVERY) {
                    self.printed = Some(now);
                    self.ndjson_line("progress", p);
                }
            }
            SendEvent::Pass(p) => {
                self.bar.clear();
                let _ = writeln!(std::io::stderr(), "{}", pass_line(p));
                self.ndjson_line("pass", p);
                self.printed = None;
            }
        }
    }

    /// The final report (NDJSON); the bar cleared.
    pub fn report(&mut self, r: &impl serde::Serialize) {
        self.bar.clear();
        self.ndjson_line("report", r);
    }

    /// Erases the bar.
    pub fn clear(&mut self) {
        self.bar.clear();
    }

    fn ndjson_line(&self, event: &str, v: &impl serde::Serialize) {
        if !self.ndjson {
            return;
        }
        let mut v = serde_json::to_value(v).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), event.into());
        }
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &v);
        let _ = writeln!(out);
        let _ = out.flush();
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}

/// After the page counts: transferred, bandwidth, dirty rate, expected
/// downtime.
fn send_detail(p: &SendProgress) -> String {
    format!(
        ", {} left | {:.1} MiB sent, {:.1} MiB/s | dirty {:.1} MiB/s | downtime ~{:.0} ms",
        p.remaining_pages,
        mib(p.bytes_sent as f64),
        mib(p.bandwidth_bytes_s),
        p.dirty_rate_mib_s,
        p.expected_downtime_s * 1e3
    )
}

/// One line per pass of `send`.
fn pass_line(p: &SendPass) -> String {
    let it = &p.iteration;
    let mut s = format!(
        "pass {}{}: {} pages read, {} sent ({:.1} MiB) in {:.1} ms, {:.1} MiB/s",
        it.n,
        if it.stopped { " (stopped)" } else { "" },
        it.pages,
        p.pages_sent,
        mib(p.bytes_sent as f64),
        it.seconds * 1e3,
        mib(it.bandwidth_bytes_s)
    );
    if it.n > 0 && !it.stopped {
        s += &format!(
            "; {} pages written since ({:.1} MiB/s), expected downtime {:.1} ms",
            it.written_pages,
            it.dirty_rate_mib_s,
            it.predicted_downtime_s * 1e3
        );
    }
    s
}
