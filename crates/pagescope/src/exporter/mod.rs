//! A Prometheus exporter of true page states (`pagescope exporter`).
//!
//! Per process (the PIDs and comm glob asked for, or the top N by
//! Rss + Swap): smaps' Rss, Pss, Swap and SwapPss beside swap and shared
//! memory divided among the processes holding it (`top`'s division), and
//! bytes per backing and page state; every other process summed. Per
//! shared-memory object above a size threshold: mapped, unmapped,
//! swap-cache, swapped and fallocated bytes. Machine totals beside
//! `/proc/meminfo` (`Shmem`, `SwapCached`, swap used) with what pagescope
//! could not explain. For `--watch`ed processes, a counter of written
//! bytes from the dirty tracker. Scrape duration, errors, and which
//! processes were left out and why.
//!
//! * `collect`: one collection (`Snapshot`).
//! * `metrics`: the metric families, encoded by `prometheus-client` in
//!   the Prometheus text format (0.0.4) or OpenMetrics ([`Format`]).
//! * `watch`: the `--watch` trackers.
//! * [`Exporter`]: the cache. A collection runs at most every
//!   `min_interval`; scrapes in between are served the cached snapshot,
//!   so concurrent or frequent scrapes do not multiply the work.
//! * [`serve::Background`]: the exporter on a collector thread, for a
//!   server: a slow collection never holds a scrape past its deadline.

pub(crate) mod collect;
pub(crate) mod metrics;
pub(crate) mod serve;
pub(crate) mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use collect::Snapshot;
pub use serve::Background;
pub use watch::WatchSpec;

use crate::kernel::KernelCaps;
use crate::render::Glob;

/// Which processes get their own series.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// These PIDs (never cut by `top`).
    pub pids: Vec<u32>,
    /// Processes whose comm matches (at most `top` of them).
    pub name: Option<Glob>,
}

/// The exporter's options.
#[derive(Clone, Debug)]
pub struct ExporterOptions {
    /// Processes with their own series (none named: the `top` largest).
    pub selection: Selection,
    /// At most this many processes by rank (largest Rss + Swap first).
    pub top: usize,
    /// A collection runs at most this often.
    pub min_interval: Duration,
    /// Processes to track writes of.
    pub watch: Vec<WatchSpec>,
    /// Objects using less (RAM + swap) are summed, not listed.
    pub object_min_bytes: u64,
}

impl Default for ExporterOptions {
    fn default() -> Self {
        Self {
            selection: Selection::default(),
            top: 20,
            min_interval: Duration::from_secs(5),
            watch: Vec::new(),
            object_min_bytes: 1 << 20,
        }
    }
}

/// The exposition formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an HTTP `Accept` header asks for: OpenMetrics when it
    /// names `application/openmetrics-text` (what Prometheus sends first),
    /// else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Counters over the exporter's life.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Totals {
    /// Collections run.
    pub collections: u64,
    /// Failures counted in [`Snapshot::errors`], summed.
    pub errors: u64,
    /// Scrapes served (from a fresh or a cached snapshot).
    pub scrapes: u64,
    /// Scrapes served an older snapshot because the collection they asked
    /// for took longer than the deadline.
    pub late: u64,
}

/// The exporter: options, kernel capabilities, the cached snapshot and
/// the `--watch` trackers.
#[derive(Debug)]
pub struct Exporter {
    opts: ExporterOptions,
    caps: KernelCaps,
    cached: Option<(Instant, Arc<Snapshot>)>,
    watches: watch::Watches,
    totals: Totals,
}

impl Exporter {
    /// An exporter (nothing is collected until the first scrape).
    pub fn new(opts: ExporterOptions) -> Self {
        Self {
            watches: watch::Watches::new(opts.watch.clone()),
            opts,
            caps: KernelCaps::probe(),
            cached: None,
            totals: Totals::default(),
        }
    }

    /// The snapshot to serve: the cached one if younger than
    /// `min_interval`, else a new collection (which also collects the
    /// `--watch` trackers).
    pub(crate) fn snapshot(&mut self) -> Arc<Snapshot> {
        if let Some((at, snap)) = &self.cached {
            if at.elapsed() < self.opts.min_interval {
                return Arc::clone(snap);
            }
        }
        if let Ok(swaps) = crate::proc::read_swaps() {
            // Swap devices come and go; slots are checked against them.
            self.caps.swaps = swaps;
        }
        let snap = collect::collect(&self.opts, &self.caps);
        self.watches.refresh(&self.caps, &snap.seen);
        self.totals.collections += 1;
        self.totals.errors += snap.errors;
        let snap = Arc::new(snap);
        self.cached = Some((Instant::now(), Arc::clone(&snap)));
        snap
    }

    /// One scrape: the exposition of the current snapshot in `format`.
    pub fn scrape(&mut self, format: Format) -> String {
        let snap = self.snapshot();
        self.totals.scrapes += 1;
        let age = self
            .cached
            .as_ref()
            .map_or(0.0, |(at, _)| at.elapsed().as_secs_f64());
        let state = metrics::State {
            snapshot: &snap,
            totals: self.totals,
            age_seconds: age,
            written: self.watches.counters(),
            watch_failed: self.watches.failed(),
        };
        metrics::encode(&state, format)
    }
}
