//! Per-interval write statistics (`pagescope watch`): pages written,
//! dirty rate, the hottest mappings and objects, and whether pre-copy
//! migration at a given bandwidth would converge. With `follow_forks`,
//! the children the process forks are attached and sampled too.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::{
    DirtyReport, DirtyTracker, ObjectWrites, TrackError, TrackEvent, TrackOptions, TrackerBackend,
    WriteSource, attach_owned,
};
use crate::addr::{PageSize, VirtAddr};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::rangeset::RangeSet;

/// `CLOCK_MONOTONIC` now, in seconds.
fn monotonic_s() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

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

/// One followed child's writes during an interval.
#[derive(Clone, Debug, Serialize)]
pub struct ChildWrites {
    /// The child.
    pub pid: u32,
    /// Distinct pages written (all of its memory in its first interval).
    pub written_pages: u64,
    /// Pages per reason.
    pub sources: Vec<(WriteSource, u64)>,
    /// Why its tracking is not exact, if it is not.
    pub degraded: Option<String>,
}

/// One interval of `watch`.
#[derive(Clone, Debug, Serialize)]
pub struct WatchInterval {
    /// The process.
    pub pid: u32,
    /// Seconds since watching started.
    pub t: f64,
    /// Length of this interval in seconds.
    pub interval_s: f64,
    /// `CLOCK_MONOTONIC` when the interval's collect began, in seconds (to
    /// line intervals up with other tools' timestamps): a write before it
    /// is reported in this interval or an earlier one; a collect takes
    /// milliseconds, and a write during it may fall on either side.
    pub clock_monotonic_s: f64,
    /// Distinct pages written.
    pub written_pages: u64,
    /// `written_pages` in bytes.
    pub written_bytes: u64,
    /// Written bytes per second, in MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Distinct pages written since watching started.
    pub unique_pages: u64,
    /// Pages per reason (tracked, shared writer, new mapping, ...).
    pub sources: Vec<(WriteSource, u64)>,
    /// Mappings with writes, most written first.
    pub vmas: Vec<VmaWrites>,
    /// Shared objects with writes (object pages, writers, causes).
    pub objects: Vec<ObjectWrites>,
    /// The page-table tracking mechanism.
    pub backend: TrackerBackend,
    /// Why tracking reports more than was written (`null` when exact up
    /// to the named sources).
    pub degraded: Option<String>,
    /// Exec, forks, sharers attached or gone.
    pub events: Vec<TrackEvent>,
    /// The process's live children.
    pub children: Vec<u32>,
    /// Forks by the process and its descendants during the interval
    /// (every one counted; `events` lists at most 256 `fork` events per
    /// interval, those whose PID is known: alive at the collect, or named
    /// by a write).
    pub forks: u64,
    /// Whether shared memory is tracked across fork, synchronously (every
    /// write of every descendant seen, however short-lived); `false`: see
    /// the notes.
    pub forks_tracked: bool,
    /// Followed children's writes (`--follow-forks`).
    pub followed: Vec<ChildWrites>,
    /// Link bandwidth assumed for the pre-copy estimate, MiB/s.
    pub precopy_bandwidth_mib_s: f64,
    /// Whether pre-copy at that bandwidth outpaces this interval's dirty
    /// rate (the remaining set shrinks every round).
    pub precopy_converges: bool,
    /// Pages reported only by an over-reporting source (a whole object or
    /// mapping with a named cause, `degraded` tracking): what was
    /// possibly, not certainly, written.
    pub conservative_pages: u64,
    /// Why those pages are reported (one line each).
    pub conservative_reasons: Vec<String>,
    /// `converges`, `does_not_converge`, or `unknown` when conservative
    /// pages outnumber the pages seen written page by page (the rate is
    /// then mostly a bound, not a measure).
    pub precopy_verdict: &'static str,
    /// Why the verdict is `unknown`.
    pub precopy_unknown_reason: Option<String>,
    /// A partial interval: the last one, cut short by the target's exit
    /// (then only the writes to its shared memory are known) or by
    /// detaching. Left out of the peak and the mean.
    pub partial: bool,
}

impl WatchInterval {
    /// Marks the interval partial (cut short by exit or detach).
    pub fn mark_partial(&mut self) {
        self.partial = true;
    }
}

/// Pages only over-reporting sources report, and their causes.
fn conservative(report: &DirtyReport, degraded: Option<&str>) -> (u64, Vec<String>) {
    let exact: RangeSet = report
        .written
        .iter()
        .filter(|w| w.source.is_exact())
        .map(|w| w.range)
        .collect();
    let mut over = RangeSet::new();
    for w in report.written.iter().filter(|w| !w.source.is_exact()) {
        over.extend(exact.subtract_from(w.range));
    }
    let pages = over.pages(report.page_size);
    let mut why: Vec<String> = Vec::new();
    if pages > 0 {
        for (src, n) in report.pages_by_source() {
            if !src.is_exact() && n > 0 {
                let name = serde_json::to_value(src)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                why.push(format!("{name}: {n} pages"));
            }
        }
        for o in &report.objects {
            why.extend(o.causes.iter().map(|c| format!("{}: {c}", o.path)));
        }
        why.extend(degraded.map(str::to_owned));
    }
    why.dedup();
    (pages, why)
}

/// The pre-copy verdict and, when unknown, why.
fn verdict(
    rate: f64,
    bandwidth: f64,
    conservative: u64,
    exact: u64,
) -> (&'static str, Option<String>) {
    if conservative > exact {
        return (
            "unknown",
            Some(format!(
                "{conservative} of the pages reported are a conservative bound (see conservative_reasons), more than the {exact} seen written page by page"
            )),
        );
    }
    if rate < bandwidth {
        ("converges", None)
    } else {
        ("does_not_converge", None)
    }
}

/// A child attached because the watched process forked it.
struct Followed {
    tracker: Box<dyn DirtyTracker>,
}

/// Samples a tracker at intervals.
pub struct Watcher<'t> {
    tracker: Box<dyn DirtyTracker + 't>,
    target: &'t Target,
    start: Instant,
    last: Instant,
    seen: RangeSet,
    bandwidth_mib_s: f64,
    follow: Option<(KernelCaps, TrackOptions)>,
    followed: BTreeMap<u32, Followed>,
}

impl std::fmt::Debug for Watcher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("pid", &self.target.pid())
            .field("backend", &self.tracker.backend())
            .finish()
    }
}

impl<'t> Watcher<'t> {
    /// Starts watching `target` with `tracker` (already attached to it).
    pub fn new(
        tracker: Box<dyn DirtyTracker + 't>,
        target: &'t Target,
        bandwidth_mib_s: f64,
    ) -> Self {
        let now = Instant::now();
        Self {
            tracker,
            target,
            start: now,
            last: now,
            seen: RangeSet::new(),
            bandwidth_mib_s,
            follow: None,
            followed: BTreeMap::new(),
        }
    }

    /// Also attach to (and sample) every child the process forks, with
    /// these options.
    pub fn follow_forks(&mut self, caps: &KernelCaps, opts: &TrackOptions) {
        let opts = TrackOptions {
            keep_baseline: true,
            ..opts.clone()
        };
        self.follow = Some((caps.clone(), opts));
    }

    /// The tracker's notes.
    pub fn notes(&self) -> Vec<String> {
        self.tracker.notes()
    }

    /// Why tracking is not exact, if it is not.
    pub fn degraded(&self) -> Option<String> {
        self.tracker.degraded()
    }

    /// The tracking mechanism.
    pub fn backend(&self) -> TrackerBackend {
        self.tracker.backend()
    }

    /// Whether the target still exists.
    pub fn target_alive(&self) -> bool {
        self.target.is_alive()
    }

    /// Restarts the interval clock (after a pause that should not count).
    pub fn restart_interval(&mut self) {
        self.last = Instant::now();
    }

    /// Collects the writes since the previous sample.
    pub fn sample(&mut self) -> Result<WatchInterval, TrackError> {
        let clock_monotonic_s = monotonic_s();
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
        let followed = self.sample_children(&report);
        let degraded = self.tracker.degraded();
        let (conservative_pages, conservative_reasons) = conservative(&report, degraded.as_deref());
        let (precopy_verdict, precopy_unknown_reason) = verdict(
            rate,
            self.bandwidth_mib_s,
            conservative_pages,
            written_pages.saturating_sub(conservative_pages),
        );
        Ok(WatchInterval {
            pid: self.target.pid(),
            t: now.duration_since(self.start).as_secs_f64(),
            interval_s,
            clock_monotonic_s,
            written_pages,
            written_bytes,
            dirty_rate_mib_s: rate,
            unique_pages: self.seen.pages(page),
            sources: report.pages_by_source(),
            vmas: self.per_vma(&ranges, page),
            objects: report.objects,
            backend: self.tracker.backend(),
            degraded,
            events: report.events,
            children: report.children,
            forks: report.forks,
            forks_tracked: report.forks_tracked,
            followed,
            precopy_bandwidth_mib_s: self.bandwidth_mib_s,
            precopy_converges: rate < self.bandwidth_mib_s,
            conservative_pages,
            conservative_reasons,
            precopy_verdict,
            precopy_unknown_reason,
            partial: report.partial,
        })
    }

    /// Attaches new children (when following) and samples all of them.
    fn sample_children(&mut self, report: &DirtyReport) -> Vec<ChildWrites> {
        let Some((caps, opts)) = &self.follow else {
            return Vec::new();
        };
        for e in &report.events {
            if let TrackEvent::Fork { child } = e {
                if let Ok(t) = Target::open(*child) {
                    if let Ok(tracker) = attach_owned(t, caps, opts) {
                        self.followed.insert(*child, Followed { tracker });
                    }
                }
            }
        }
        let mut out = Vec::new();
        self.followed.retain(|pid, f| match f.tracker.collect() {
            Ok(r) => {
                out.push(ChildWrites {
                    pid: *pid,
                    written_pages: r.pages(),
                    sources: r.pages_by_source(),
                    degraded: f.tracker.degraded(),
                });
                true
            }
            Err(_) => false,
        });
        out
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
                    path: super::objects::shared_label(&e.path.display(), e.perms.shared, e.inode)
                        .unwrap_or_else(|| e.path.display()),
                    written_pages: pages,
                })
            })
            .collect();
        out.sort_by_key(|v| std::cmp::Reverse(v.written_pages));
        out
    }
}
