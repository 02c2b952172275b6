//! Live progress on stderr for long commands (`dump` today; `send`'s
//! transferred / remaining / dirty rate / downtime line next): one
//! `indicatif` bar, redrawn at most ten times a second, shown only when
//! stderr is a terminal and the command's output is not `--json`, and
//! cleared before anything else is printed.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
