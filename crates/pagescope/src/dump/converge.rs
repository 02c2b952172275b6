//! When pre-copy stops (pure: no process, no kernel interface), as QEMU's
//! migration decides it: pre-copy passes go on while the pages left
//! (those the tracker reported written since the previous pass) would
//! take longer than the downtime target to send at the measured
//! bandwidth, bounded by a number of passes and a time. The bandwidth is
//! the sink's own measured rate where it has one (a stream: the bytes it
//! pushed into the connection per second, `transfer`), else the copy's
//! rate of the full pass (`dump` into an image directory). Without a
//! downtime target (`dump`'s default), pre-copy also stops once the
//! written set stops shrinking.

use std::time::Duration;

use serde::Serialize;

/// Why pre-copy ended (before the stopped final pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrecopyEnd {
    /// Converged: nothing was written since the previous pass.
    NothingWritten,
    /// Converged: what is left fits in the downtime target.
    FitsDowntime,
    /// No downtime target, and the written set stopped shrinking.
    Stalled,
    /// Did not converge: the written set stopped shrinking while what is
    /// left still exceeds the downtime target (post-copy's cue to switch).
    StalledAboveDowntime,
    /// Did not converge: `max_iterations` pre-copy passes were run.
    MaxIterations,
    /// Did not converge: `max_time` passed.
    MaxTime,
    /// No pre-copy at all: the process has no write tracking, or the dump
    /// is a copy-before-write snapshot.
    NoPrecopy,
}

impl PrecopyEnd {
    /// Whether pre-copy converged (the final pass has at most what the
    /// target allows, or the written set settled).
    pub fn converged(self) -> bool {
        matches!(
            self,
            Self::NothingWritten | Self::FitsDowntime | Self::Stalled
        )
    }

    /// In words, for a report line.
    pub fn text(self) -> &'static str {
        match self {
            Self::NothingWritten => "converged (nothing written)",
            Self::FitsDowntime => "converged (the rest fits in the downtime target)",
            Self::Stalled => "stopped (the written set stopped shrinking)",
            Self::StalledAboveDowntime => {
                "did not converge (the written set stopped shrinking above the downtime target)"
            }
            Self::MaxIterations => "did not converge (--max-iterations reached)",
            Self::MaxTime => "did not converge (--max-time reached)",
            Self::NoPrecopy => "no pre-copy",
        }
    }
}

/// The bounds of pre-copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Limits {
    /// Pre-copy passes at most.
    pub max_iterations: u32,
    /// Pre-copy time at most.
    pub max_time: Duration,
    /// The downtime target (QEMU's `downtime-limit`).
    pub max_downtime: Option<Duration>,
    /// With a target too, stop once the written set shrinks by less than
    /// a tenth from one pass to the next (the writer keeps up with the
    /// link, pre-copy cannot converge: post-copy's switch).
    pub stop_when_stalled: bool,
}

/// What the last pre-copy pass saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LastPass {
    /// Pages written since the pass before it (what it copied): the pages
    /// left, as the last measurement of the written set.
    pub written_pages: u64,
    /// The same for the pass before it (`None`: it was the first).
    pub previous_written: Option<u64>,
    /// Page size in bytes.
    pub page_size: u64,
    /// Bytes per second the pages would go out at (0: not measured).
    pub bandwidth: f64,
}

impl LastPass {
    /// Seconds sending what is left would take, stopped (infinite with
    /// pages left and no measured bandwidth).
    pub fn expected_downtime_s(&self) -> f64 {
        expected_downtime_s(self.written_pages, self.page_size, self.bandwidth)
    }
}

/// Seconds sending `pages` pages of `page_size` bytes takes at
/// `bandwidth` bytes/s (infinite with pages and no bandwidth).
pub(super) fn expected_downtime_s(pages: u64, page_size: u64, bandwidth: f64) -> f64 {
    if pages == 0 {
        0.0
    } else if bandwidth > 0.0 {
        (pages * page_size) as f64 / bandwidth
    } else {
        f64::INFINITY
    }
}

/// Whether to run another pre-copy pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Run pre-copy pass number `passes_done + 1`.
    Continue,
    /// Stop pre-copy: the final pass comes next.
    Stop(PrecopyEnd),
}

/// The decision after `passes_done` pre-copy passes (`last`: what the
/// last one saw; `None` before the first), `elapsed` since pre-copy began.
/// Convergence is checked first, then the bounds.
pub(super) fn decide(
    limits: &Limits,
    passes_done: u32,
    last: Option<&LastPass>,
    elapsed: Duration,
) -> Decision {
    if let Some(l) = last {
        if l.written_pages == 0 {
            return Decision::Stop(PrecopyEnd::NothingWritten);
        }
        match limits.max_downtime {
            Some(d) if l.expected_downtime_s() <= d.as_secs_f64() => {
                return Decision::Stop(PrecopyEnd::FitsDowntime);
            }
            Some(_) if !limits.stop_when_stalled => {}
            Some(_)
                if l.previous_written
                    .is_some_and(|p| l.written_pages * 10 >= p * 9) =>
            {
                return Decision::Stop(PrecopyEnd::StalledAboveDowntime);
            }
            None if l.previous_written.is_some_and(|p| l.written_pages >= p) => {
                return Decision::Stop(PrecopyEnd::Stalled);
            }
            _ => {}
        }
    }
    if passes_done >= limits.max_iterations {
        Decision::Stop(PrecopyEnd::MaxIterations)
    } else if elapsed >= limits.max_time {
        Decision::Stop(PrecopyEnd::MaxTime)
    } else {
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    fn limits(downtime_ms: Option<u64>) -> Limits {
        Limits {
            max_iterations: 5,
            max_time: Duration::from_secs(10),
            max_downtime: downtime_ms.map(Duration::from_millis),
            stop_when_stalled: false,
        }
    }

    fn last(written: u64, previous: Option<u64>, bandwidth: f64) -> LastPass {
        LastPass {
            written_pages: written,
            previous_written: previous,
            page_size: 4096,
            bandwidth,
        }
    }

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_pass_runs_unless_a_bound_forbids_it() {
        let l = limits(Some(300));
        assert_eq!(decide(&l, 0, None, at(0)), Decision::Continue);
        let none = Limits {
            max_iterations: 0,
            ..l
        };
        let stop = Decision::Stop(PrecopyEnd::MaxIterations);
        assert_eq!(decide(&none, 0, None, at(0)), stop);
        assert_eq!(
            decide(&l, 0, None, at(10)),
            Decision::Stop(PrecopyEnd::MaxTime)
        );
    }

    #[test]
    fn pages_left_over_the_measured_bandwidth_are_compared_with_the_target() {
        let l = limits(Some(300));
        // 256 pages = 1 MiB at 4 MiB/s: 250 ms, fits in 300 ms.
        let fits = last(256, Some(1000), 4.0 * MIB);
        assert!((fits.expected_downtime_s() - 0.25).abs() < 1e-9);
        let stop = Decision::Stop(PrecopyEnd::FitsDowntime);
        assert_eq!(decide(&l, 1, Some(&fits), at(1)), stop);
        // The same pages at 2 MiB/s: 500 ms, another pass.
        let slow = last(256, Some(1000), 2.0 * MIB);
        assert_eq!(decide(&l, 1, Some(&slow), at(1)), Decision::Continue);
        // Exactly at the target fits (QEMU: pending <= threshold).
        let edge = last(300, None, 300.0 * 4096.0 / 0.3);
        assert_eq!(decide(&l, 1, Some(&edge), at(1)), stop);
    }

    #[test]
    fn a_downtime_target_keeps_passes_going_though_the_set_grows_until_a_bound() {
        let l = limits(Some(300));
        // A writer faster than the link: the set grows, pre-copy goes on.
        let growing = last(5000, Some(4000), 4.0 * MIB);
        assert_eq!(decide(&l, 2, Some(&growing), at(3)), Decision::Continue);
        assert_eq!(
            decide(&l, 5, Some(&growing), at(3)),
            Decision::Stop(PrecopyEnd::MaxIterations)
        );
        assert_eq!(
            decide(&l, 3, Some(&growing), at(11)),
            Decision::Stop(PrecopyEnd::MaxTime)
        );
        // Convergence wins over a bound reached at the same pass.
        let fits = last(10, Some(5000), 4.0 * MIB);
        assert_eq!(
            decide(&l, 5, Some(&fits), at(11)),
            Decision::Stop(PrecopyEnd::FitsDowntime)
        );
    }

    #[test]
    fn post_copy_switches_once_the_written_set_stops_shrinking() {
        let l = Limits {
            stop_when_stalled: true,
            ..limits(Some(300))
        };
        let growing = last(5000, Some(4000), 4.0 * MIB);
        let stalled = Decision::Stop(PrecopyEnd::StalledAboveDowntime);
        assert_eq!(decide(&l, 2, Some(&growing), at(3)), stalled);
        let barely = last(3700, Some(4000), 4.0 * MIB);
        assert_eq!(decide(&l, 2, Some(&barely), at(3)), stalled);
        let shrinking = last(3000, Some(4000), 4.0 * MIB);
        assert_eq!(decide(&l, 2, Some(&shrinking), at(3)), Decision::Continue);
        let fits = last(10, Some(5), 4.0 * MIB);
        let fit = Decision::Stop(PrecopyEnd::FitsDowntime);
        assert_eq!(decide(&l, 2, Some(&fits), at(3)), fit);
    }

    #[test]
    fn an_unmeasured_bandwidth_never_fits_unless_nothing_is_left() {
        let l = limits(Some(300));
        assert_eq!(last(1, None, 0.0).expected_downtime_s(), f64::INFINITY);
        assert_eq!(
            decide(&l, 1, Some(&last(1, None, 0.0)), at(0)),
            Decision::Continue
        );
        assert_eq!(
            decide(&l, 1, Some(&last(0, None, 0.0)), at(0)),
            Decision::Stop(PrecopyEnd::NothingWritten)
        );
    }

    #[test]
    fn without_a_target_pre_copy_stops_when_the_set_stops_shrinking() {
        let l = limits(None);
        let shrinking = last(100, Some(200), 0.0);
        assert_eq!(decide(&l, 2, Some(&shrinking), at(1)), Decision::Continue);
        let first = last(100, None, 0.0);
        assert_eq!(decide(&l, 1, Some(&first), at(1)), Decision::Continue);
        for written in [200, 300] {
            assert_eq!(
                decide(&l, 2, Some(&last(written, Some(200), 0.0)), at(1)),
                Decision::Stop(PrecopyEnd::Stalled)
            );
        }
    }

    #[test]
    fn converged_ends_are_told_apart_from_bounds() {
        assert!(PrecopyEnd::FitsDowntime.converged());
        assert!(PrecopyEnd::NothingWritten.converged());
        assert!(!PrecopyEnd::MaxIterations.converged());
        assert!(!PrecopyEnd::MaxTime.converged());
        assert!(!PrecopyEnd::NoPrecopy.converged());
        assert!(!PrecopyEnd::StalledAboveDowntime.converged());
    }
}
