//! Comparing a pagescope report with the fixture's ground truth, page by
//! page. Used by the tests and by `pagescope demo`.

use std::fmt;

use pagescope::{PageFlags, ProcessReport, VirtAddr};

use crate::truth::{Region, Truth};

/// One page whose reported state differs from the ground truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Region name.
    pub region: String,
    /// Page index in the region.
    pub page: u64,
    /// Expected `state [flags]`.
    pub expected: String,
    /// Reported `state [flags]`, or `missing`.
    pub got: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} page {}: expected {}, got {}",
            self.region, self.page, self.expected, self.got
        )
    }
}

/// Checks every page of `region` against `report`.
pub fn check_region(truth: &Truth, region: &Region, report: &ProcessReport) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for i in 0..region.pages {
        let Some(exp) = region.expected(i) else {
            out.push(mismatch(
                region,
                i,
                "an expectation".into(),
                "none in the truth".into(),
            ));
            continue;
        };
        let addr = VirtAddr::new(region.page_addr(i, truth.page_size));
        let expected = format!("{} {:?}", exp.state, exp.flags);
        let Some(run) = report.run_at(addr) else {
            out.push(mismatch(region, i, expected, "missing".into()));
            continue;
        };
        let ignore = exp
            .ignore_flags
            .iter()
            .filter_map(|f| PageFlags::from_flag_name(f))
            .fold(PageFlags::empty(), |a, f| a | f);
        let want = exp
            .flags
            .iter()
            .filter_map(|f| PageFlags::from_flag_name(f))
            .fold(PageFlags::empty(), |a, f| a | f);
        if run.state.name() != exp.state || (run.flags - ignore) != (want - ignore) {
            let got = format!("{} {:?}", run.state, run.flags.names().collect::<Vec<_>>());
            out.push(mismatch(region, i, expected, got));
        }
    }
    out
}

fn mismatch(region: &Region, page: u64, expected: String, got: String) -> Mismatch {
    Mismatch {
        region: region.name.clone(),
        page,
        expected,
        got,
    }
}

/// Checks every region that is not marked `skip`.
pub fn check_all(truth: &Truth, report: &ProcessReport) -> Vec<Mismatch> {
    truth
        .regions
        .iter()
        .filter(|r| r.skip.is_none())
        .flat_map(|r| check_region(truth, r, report))
        .collect()
}
