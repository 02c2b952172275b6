//! Per-interval write statistics (`pagescope watch`): pages written,
//! dirty rate, the hottest mappings, and whether pre-copy migration at a
//! given bandwidth would converge.

use std::time::Instant;

use serde::Serialize;

use super::{DirtyTracker, TrackError, TrackerBackend, WriteSource};
use crate::addr::{PageSize, VirtAddr};
use crate::proc::Target;
use crate::rangeset::RangeSet;

/// Writes to one mapping during an interval.
#[derive(Clone, Debug, Serialize)]
pub struct VmaWrites {
    /// Start of the mapping.
    pub start: VirtAddr,
    /// End of the mapping.
    pub end: VirtAddr,
    /// Its path (as in maps).
    pub path: String,
    /// Pages written in it.
    pub written_pages: u64,
}

/// One interval of `watch`.
#[derive(Clone, Debug, Serialize)]
pub struct Interval {
    /// Seconds since watching started.
    pub t: f64,
    /// Length of this interval in seconds.
    pub interval_s: f64,
    /// Distinct pages written.
    pub written_pages: u64,
    /// `written_pages` in bytes.
    pub written_bytes: u64,
    /// Written bytes per second, in MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Distinct pages written since watching started.
    pub unique_pages: u64,
    /// Pages per reason (tracked, new mapping, object written, ...).
    pub sources: Vec<(WriteSource, u64)>,
    /// Mappings with writes, most written first.
    pub vmas: Vec<VmaWrites>,
    /// The tracking mechanism.
    pub backend: TrackerBackend,
    /// Link bandwidth assumed for the pre-copy estimate, MiB/s.
    pub precopy_bandwidth_mib_s: f64,
    /// Whether pre-copy at that bandwidth outpaces this interval's dirty
    /// rate (the remaining set shrinks every round).
    pub precopy_converges: bool,
}

/// Samples a tracker at intervals.
pub struct Watcher {
    tracker: Box<dyn DirtyTracker>,
    target: Target,
    start: Instant,
    last: Instant,
    seen: RangeSet,
    bandwidth_mib_s: f64,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("pid", &self.target.pid())
            .field("backend", &self.tracker.backend())
            .finish()
    }
}

impl Watcher {
    /// Starts watching `target` with `tracker` (already attached).
    pub fn new(tracker: Box<dyn DirtyTracker>, target: Target, bandwidth_mib_s: f64) -> Self {
        let now = Instant::now();
        Self {
            tracker,
            target,
            start: now,
            last: now,
            seen: RangeSet::new(),
            bandwidth_mib_s,
        }
    }

    /// The tracker's notes.
    pub fn notes(&self) -> Vec<String> {
        self.tracker.notes()
    }

    /// The tracking mechanism.
    pub fn backend(&self) -> TrackerBackend {
        self.tracker.backend()
    }

    /// Whether the target still exists.
    pub fn target_alive(&self) -> bool {
        self.target.is_alive()
    }

    /// Collects the writes since the previous sample.
    pub fn sample(&mut self) -> Result<Interval, TrackError> {
        let report = self.tracker.collect()?;
        let now = Instant::now();
        let interval_s = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let ranges = report.ranges();
        self.seen.extend(ranges.ranges().iter().copied());
        let page = report.page_size;
        let written_pages = ranges.pages(page);
        let written_bytes = page.bytes(written_pages);
        let rate = written_bytes as f64 / interval_s / (1024.0 * 1024.0);
        Ok(Interval {
            t: now.duration_since(self.start).as_secs_f64(),
            interval_s,
            written_pages,
            written_bytes,
            dirty_rate_mib_s: rate,
            unique_pages: self.seen.pages(page),
            sources: report.pages_by_source(),
            vmas: self.per_vma(&ranges, page),
            backend: self.tracker.backend(),
            precopy_bandwidth_mib_s: self.bandwidth_mib_s,
            precopy_converges: rate < self.bandwidth_mib_s,
        })
    }

    fn per_vma(&self, ranges: &RangeSet, page: PageSize) -> Vec<VmaWrites> {
        let Ok(maps) = self.target.maps() else {
            return Vec::new();
        };
        let mut out: Vec<VmaWrites> = maps
            .iter()
            .filter_map(|e| {
                let pages: u64 = ranges
                    .intersect(e.range)
                    .iter()
                    .map(|r| r.pages(page))
                    .sum();
                (pages > 0).then(|| VmaWrites {
                    start: e.range.start(),
                    end: e.range.end(),
                    path: e.path.display(),
                    written_pages: pages,
                })
            })
            .collect();
        out.sort_by_key(|v| std::cmp::Reverse(v.written_pages));
        out
    }
}
