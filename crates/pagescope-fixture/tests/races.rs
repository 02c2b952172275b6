//! A live target races the scanner: it may exit mid-scan or remap while
//! being scanned. Both are normal: the result says what was skipped and is
//! marked incomplete; never a panic, never a partial result passed off as
//! complete.

mod common;

use std::time::{Duration, Instant};

use common::{caps, fixture};
use pagescope::{ErrorKind, ProcessReport, ScanOptions, Target, scan_process};

/// Every scanned VMA is covered exactly by its runs.
fn assert_consistent(r: &ProcessReport) {
    for v in &r.vmas {
        let mut at = v.scanned.start();
        for run in &v.runs {
            assert_eq!(run.start, at, "gap in {}", v.vma.range);
            at = at.saturating_add(run.pages * 4096);
        }
        assert_eq!(at, v.scanned.end(), "runs do not cover {}", v.vma.range);
    }
    assert_eq!(r.complete(), r.skipped.is_empty());
}

#[test]
fn target_exiting_mid_scan_is_reported_incomplete() {
    let mut incomplete = 0;
    let mut attempts = 0;
    while incomplete == 0 && attempts < 30 {
        attempts += 1;
        let mut fx = fixture(&["bench", "--sparse-gib", "32", "--dense-gib", "0"]);
        let target = Target::open(fx.pid()).unwrap();
        // Time one full scan, then kill the target part-way through the next.
        let t0 = Instant::now();
        let full = scan_process(&target, caps(), &ScanOptions::default()).unwrap();
        let took = t0.elapsed();
        assert!(full.complete());
        let delay = took.mul_f64(0.1 + 0.8 * f64::from(attempts % 10) / 10.0);
        let scan = std::thread::scope(|s| {
            let h = s.spawn(|| scan_process(&target, caps(), &ScanOptions::default()));
            std::thread::sleep(delay);
            fx.kill();
            h.join().unwrap()
        });
        match scan {
            Ok(r) => {
                assert_consistent(&r);
                if !r.complete() {
                    incomplete += 1;
                    assert!(
                        r.skipped
                            .iter()
                            .all(|s| s.reason.describe().contains("exited")),
                        "{:?}",
                        r.skipped
                    );
                }
            }
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::TargetExited | ErrorKind::NoSuchProcess),
                "unexpected error {e}"
            ),
        }
    }
    assert!(
        incomplete > 0,
        "never caught the target exiting mid-scan in {attempts} attempts"
    );
}

#[test]
fn target_remapping_during_scan_lists_skipped_ranges() {
    let fx = fixture(&["anon", "--churn"]);
    let target = Target::open(fx.pid()).unwrap();
    let mut incomplete = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut scans = 0;
    while (incomplete < 3 || scans < 20) && Instant::now() < deadline {
        scans += 1;
        let r = scan_process(&target, caps(), &ScanOptions::default())
            .expect("a remapping target still scans");
        assert_consistent(&r);
        if !r.complete() {
            incomplete += 1;
            assert!(
                r.skipped
                    .iter()
                    .all(|s| s.reason.describe().contains("during the scan")),
                "{:?}",
                r.skipped
            );
        }
        // The stable regions are always reported correctly.
        if common::is_root() {
            common::assert_matches_truth(fx.truth(), &r, Some("anon"));
        }
    }
    assert!(
        incomplete > 0,
        "the churning target never changed during {scans} scans"
    );
}
