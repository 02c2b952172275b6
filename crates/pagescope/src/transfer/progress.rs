//! A send's live progress: what the stream pushed so far (counters the
//! sink updates with every frame, read without its lock), each pass as
//! the stream saw it, and [`SendEvent`]s built from the dump's own events
//! for the caller (the CLI's progress line and `--json` NDJSON).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::dump::{DumpEvent, Iteration};

/// What the stream sent in one pass.
#[derive(Clone, Debug, Serialize)]
pub struct PassSent {
    /// The pass (0: full; the last: stopped).
    pub n: u32,
    /// Whether the process was stopped.
    pub stopped: bool,
    /// Pages sent as data in it.
    pub pages_sent: u64,
    /// Bytes written to the stream in it (every record, framed).
    pub bytes_sent: u64,
    /// Seconds from its first record to its last one pushed out.
    pub seconds: f64,
    /// The measured bandwidth at its end, bytes/s (smoothed).
    pub bandwidth_bytes_s: f64,
}

/// Where a send stands (see [`SendEvent::Progress`]).
#[derive(Clone, Debug, Serialize)]
pub struct SendProgress {
    /// The pass running (0: full).
    pub pass: u32,
    /// Pages it read so far.
    pub pass_pages_done: u64,
    /// Pages it will read (about).
    pub pass_pages_total: u64,
    /// Pages of it still to read.
    pub remaining_pages: u64,
    /// Bytes written to the stream so far.
    pub bytes_sent: u64,
    /// Pages sent as data so far (a page sent in several passes counts
    /// each time).
    pub pages_sent: u64,
    /// The measured bandwidth, bytes/s (smoothed; 0: not yet measured).
    pub bandwidth_bytes_s: f64,
    /// The dirty rate the last pass saw, MiB/s.
    pub dirty_rate_mib_s: f64,
    /// The downtime the last pass predicted: its pages over the bandwidth.
    pub expected_downtime_s: f64,
    /// Seconds since the send began.
    pub elapsed_s: f64,
}

/// A pass that ended: the dump's view and the stream's.
#[derive(Clone, Debug, Serialize)]
pub struct SendPass {
    /// The pass as the dump saw it.
    #[serde(flatten)]
    pub iteration: Iteration,
    /// Pages sent as data in it.
    pub pages_sent: u64,
    /// Bytes written to the stream in it.
    pub bytes_sent: u64,
    /// Bytes written to the stream so far.
    pub total_bytes_sent: u64,
    /// Seconds since the send began.
    pub elapsed_s: f64,
}

/// Something a send tells its caller as it goes.
#[derive(Clone, Copy, Debug)]
pub enum SendEvent<'a> {
    /// Where the send stands: whenever the dump reports pages read (per
    /// batch of pages; a caller printing them throttles).
    Progress(&'a SendProgress),
    /// A pass ended.
    Pass(&'a SendPass),
}

/// What the sink counts as it writes, read by the progress.
#[derive(Debug, Default)]
pub(super) struct Counters {
    bytes: AtomicU64,
    pages: AtomicU64,
    /// The measured rate's `f64` bits.
    rate: AtomicU64,
    passes: Mutex<Vec<PassSent>>,
}

impl Counters {
    /// The totals so far and the measured rate.
    pub fn update(&self, bytes: u64, pages: u64, rate: f64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.pages.store(pages, Ordering::Relaxed);
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// A pass ended.
    pub fn pass_sent(&self, p: PassSent) {
        self.passes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p);
    }

    /// Every pass so far.
    pub fn passes(&self) -> Vec<PassSent> {
        self.passes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }
}

/// Turns the dump's events into [`SendEvent`]s.
pub(super) struct Live<'c, 'p> {
    counters: &'c Counters,
    started: Instant,
    /// The last pass's dirty rate and predicted downtime.
    last: (f64, f64),
    out: &'p mut dyn FnMut(SendEvent<'_>),
}

impl<'c, 'p> Live<'c, 'p> {
    /// Events for `out`, counting from now.
    pub fn new(counters: &'c Counters, out: &'p mut dyn FnMut(SendEvent<'_>)) -> Self {
        Self {
            counters,
            started: Instant::now(),
            last: (0.0, 0.0),
            out,
        }
    }

    /// The dump told `e`.
    pub fn dump_event(&mut self, e: DumpEvent<'_>) {
        match e {
            DumpEvent::Progress { pass, done, total } => {
                let p = SendProgress {
                    pass,
                    pass_pages_done: done,
                    pass_pages_total: total,
                    remaining_pages: total.saturating_sub(done),
                    bytes_sent: self.counters.bytes(),
                    pages_sent: self.counters.pages(),
                    bandwidth_bytes_s: self.counters.rate(),
                    dirty_rate_mib_s: self.last.0,
                    expected_downtime_s: self.last.1,
                    elapsed_s: self.started.elapsed().as_secs_f64(),
                };
                (self.out)(SendEvent::Progress(&p));
            }
            DumpEvent::Iteration(it) => {
                self.last = (it.dirty_rate_mib_s, it.predicted_downtime_s);
                let sent = self
                    .counters
                    .passes()
                    .into_iter()
                    .rfind(|p| p.n == it.n && p.stopped == it.stopped);
                let p = SendPass {
                    iteration: it.clone(),
                    pages_sent: sent.as_ref().map_or(0, |s| s.pages_sent),
                    bytes_sent: sent.as_ref().map_or(0, |s| s.bytes_sent),
                    total_bytes_sent: self.counters.bytes(),
                    elapsed_s: self.started.elapsed().as_secs_f64(),
                };
                (self.out)(SendEvent::Pass(&p));
            }
        }
    }
}
