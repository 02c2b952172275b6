//! Every fixture scenario, scanned by every backend, page by page against
//! the fixture's ground truth; and the backends against each other.

mod common;

use common::{assert_matches_truth, caps, fixture, skip};
use pagescope::ProcessReport;

fn check_scenario(scenario: &str) {
    common::check_scenario(
        scenario,
        "ground-truth checks of zero pages, THPs and swap slots need root (PFNs, kpageflags)",
    );
}

#[test]
fn anon_present_zero_untouched_swapdev() {
    check_scenario("anon");
}

#[test]
fn thp_and_huge_zero_page() {
    check_scenario("thp");
}

#[test]
fn fork_shared_pages_are_not_exclusive() {
    check_scenario("fork_shared");
}

#[test]
fn guard_region_is_guard_not_swapped() {
    check_scenario("guard");
}

#[test]
fn uffd_wp_markers_are_holes_not_swapped() {
    check_scenario("uffd_wp");
}

#[test]
fn private_and_shared_file_mappings() {
    check_scenario("file");
}

/// Big enough for the adaptive strategy to switch from walking to reading
/// and back, with a THP, zero, swapped, guard and hole pages in the blocks
/// it reads directly; every strategy must give the ground truth.
#[test]
fn dense_and_sparse_blocks_every_strategy_swapdev() {
    check_scenario("dense_mixed");
}

/// Whether two scans taken one after the other must agree on `v`: not for
/// the executable and libraries, which other processes (concurrent tests)
/// map and unmap meanwhile, changing mapcounts and so `exclusive`; the
/// fixture's own data files (`pagescope-fixture-PID-...`) only it maps.
fn stable(v: &pagescope::VmaReport) -> bool {
    v.vma.backing != pagescope::Backing::File
        || v.vma
            .path
            .as_bytes()
            .windows(18)
            .any(|w| w == b"pagescope-fixture-")
}

/// Compares two reports VMA by VMA, run by run.
fn assert_same(a: &ProcessReport, b: &ProcessReport) {
    assert_eq!(a.vmas.len(), b.vmas.len(), "different VMA counts");
    for (va, vb) in a.vmas.iter().zip(&b.vmas).filter(|(va, _)| stable(va)) {
        assert_eq!(va.vma.range, vb.vma.range);
        if va.runs != vb.runs {
            let first = va.runs.iter().zip(&vb.runs).find(|(x, y)| x != y);
            panic!(
                "backends disagree on {} ({}): {} vs {} runs, first difference {:?}",
                va.vma.range,
                va.vma.path.display(),
                a.backend,
                b.backend,
                first
            );
        }
    }
}

/// The kernel selftests check pagemap reads against PAGEMAP_SCAN; we check
/// both backends (PAGEMAP_SCAN with every strategy) against each other over the whole fixture process (its
/// libraries, heap and stack included), with swap detail.
#[test]
fn backends_agree_on_every_page_swapdev() {
    if !common::is_root() {
        skip("backend agreement is defined with privileges (both see PFNs)");
        return;
    }
    if !caps().has_pagemap_scan() {
        skip("kernel has no PAGEMAP_SCAN (Linux 6.7+)");
        return;
    }
    let fx = fixture(&["all"]);
    let reports: Vec<ProcessReport> = common::backends()
        .into_iter()
        .map(|o| {
            let opts = pagescope::ScanOptions {
                swap_detail: true,
                ..o
            };
            common::scan_with(fx.pid(), &opts)
        })
        .collect();
    assert!(reports.iter().all(ProcessReport::complete));
    for other in &reports[1..] {
        assert_same(&reports[0], other);
    }
    // And they agree with the ground truth (so agreement is not vacuous).
    assert_matches_truth(fx.truth(), &reports[0], None);
}

/// Swapped anonymous pages carry their swap slot and device when asked.
#[test]
fn swap_detail_names_device_and_consecutive_offsets_swapdev() {
    if !common::is_root() {
        skip("swap type and offset are visible to root only");
        return;
    }
    let fx = fixture(&["anon"]);
    let truth = fx.truth();
    let region = truth.region("anon_swapped").expect("anon_swapped region");
    if let Some(why) = &region.skip {
        skip(why);
        return;
    }
    let opts = pagescope::ScanOptions {
        swap_detail: true,
        ..Default::default()
    };
    let report = common::scan_with(fx.pid(), &opts);
    let addr = pagescope::VirtAddr::new(region.start);
    let run = report.run_at(addr).expect("run");
    let slot = run.swap.expect("swap slot with --swap-detail");
    let dev = report
        .swaps
        .device(slot.ty, slot.offset, 4096)
        .expect("device for the slot");
    assert!(report.swaps.devices().iter().any(|d| d.path == dev.path));
    // The 16 pages were paged out together: their slots are consecutive or
    // split into a few runs, but every page is covered by a swapped run.
    let covered: u64 = report
        .runs()
        .filter(|(_, r)| r.state == pagescope::PageState::Swapped)
        .filter(|(_, r)| r.start >= addr && r.start < addr.saturating_add(16 * 4096))
        .map(|(_, r)| r.pages)
        .sum();
    assert_eq!(covered, 16);
}

/// `skip_exclusive` drops only the exclusive flag, never changes a state.
#[test]
fn skip_exclusive_changes_only_the_exclusive_flag() {
    if !caps().has_pagemap_scan() {
        skip("kernel has no PAGEMAP_SCAN (Linux 6.7+)");
        return;
    }
    let fx = fixture(&["anon", "thp", "file", "uffd_wp"]);
    let full = common::scan_with(fx.pid(), &pagescope::ScanOptions::default());
    let fast = common::scan_with(
        fx.pid(),
        &pagescope::ScanOptions {
            skip_exclusive: true,
            ..Default::default()
        },
    );
    assert!(full.exclusive_known && !fast.exclusive_known);
    for (a, b) in full.vmas.iter().zip(&fast.vmas).filter(|(a, _)| stable(a)) {
        let strip = |runs: &[pagescope::PageRun]| {
            let mut out = pagescope::raw::RunBuilder::new(full.page_size, false);
            for r in runs {
                let mut r = *r;
                if a.vma.backing == pagescope::Backing::Anon || a.vma.is_shared() {
                    r.flags.remove(pagescope::PageFlags::EXCLUSIVE);
                }
                out.push_run(&r);
            }
            out.finish()
        };
        assert_eq!(strip(&a.runs), strip(&b.runs), "{}", a.vma.path.display());
        if a.vma.backing == pagescope::Backing::Anon {
            assert!(
                b.runs
                    .iter()
                    .all(|r| !r.flags.contains(pagescope::PageFlags::EXCLUSIVE))
            );
        }
    }
}
