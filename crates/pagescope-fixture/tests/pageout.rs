//! `pageout` against the real kernel: the fixture's exclusive anonymous
//! pages leave RAM, an mlocked part and COW pages shared with a forked
//! child stay (with those reasons), shmem pages no process maps are paged
//! out through pagescope's own mapping, and every count in the report
//! matches an independent re-scan. Names contain `swapdev`: run on zram
//! and on a swap file.

mod common;

use common::{caps, fixture, is_root, scan, skip};
use pagescope::pageout::{PageoutOptions, PageoutReport, Refusal, pageout};
use pagescope::{BackendChoice, PageState, ProcessReport, Target};
use pagescope_fixture::FixtureProcess;

fn states(report: &ProcessReport, fx: &FixtureProcess, region: &str, pages: u64) -> Vec<PageState> {
    let page = caps().page_size.get();
    let r = fx.truth().region(region).unwrap();
    (0..pages)
        .map(|i| {
            let a = r.start + i * page;
            report
                .vmas
                .iter()
                .flat_map(|v| &v.runs)
                .find(|run| run.start.get() <= a && a < run.start.get() + run.pages * page)
                .map_or(PageState::Unknown, |run| run.state)
        })
        .collect()
}

fn reason_at(report: &PageoutReport, addr: u64) -> Option<Refusal> {
    let page = caps().page_size.get();
    report
        .stayed
        .iter()
        .find(|s| s.start.get() <= addr && addr < s.start.get() + s.pages * page)
        .map(|s| s.reason)
}

#[test]
fn pageout_reports_match_a_rescan_swapdev() {
    if !is_root() {
        skip("pageout of another process needs CAP_SYS_NICE and root for the reasons");
        return;
    }
    let mut fx = fixture(&["anon", "fork_shared", "memfd"]);
    if fx.truth().swap == "none" {
        skip("no active swap device");
        return;
    }
    fx.command("lock anon_present 0 4").unwrap();
    let page = caps().page_size.get();
    let target = Target::open(fx.pid()).unwrap();
    let report = pageout(&target, caps(), &PageoutOptions::default()).expect("pageout");
    let after = scan(fx.pid(), BackendChoice::Auto);

    // Exclusive anonymous pages left; the locked ones stayed, as locked.
    let anon = states(&after, &fx, "anon_present", 16);
    assert!(
        anon[..4].iter().all(|s| *s == PageState::Present),
        "{anon:?}"
    );
    assert!(
        anon[4..].iter().all(|s| *s == PageState::Swapped),
        "{anon:?}"
    );
    let start = fx.truth().region("anon_present").unwrap().start;
    assert_eq!(
        reason_at(&report, start),
        Some(Refusal::Locked),
        "{:?}",
        report.stayed
    );
    assert_eq!(reason_at(&report, start + 4 * page), None);

    // COW pages shared with the forked child stayed: mapped twice.
    let shared = states(&after, &fx, "fork_shared", 16);
    assert!(
        shared.iter().all(|s| *s == PageState::Present),
        "{shared:?}"
    );
    let fs = fx.truth().region("fork_shared").unwrap().start;
    assert_eq!(
        reason_at(&report, fs),
        Some(Refusal::SharedMapping),
        "{:?}",
        report.stayed
    );

    // memfd pages 16..24 were in the page cache, mapped by no one: out
    // (or, on an asynchronous device, in the swap cache, said so).
    let memfd = states(&after, &fx, "memfd", 24);
    let mf = fx.truth().region("memfd").unwrap().start;
    for (i, s) in memfd.iter().enumerate().skip(16) {
        match s {
            PageState::Swapped => {}
            PageState::SwapCache => assert_eq!(
                reason_at(&report, mf + i as u64 * page),
                Some(Refusal::SwapCacheAsync)
            ),
            other => panic!("memfd page {i} is {other:?} after pageout; report {report:?}"),
        }
    }
    assert!(
        report.shmem_unmapped.requested >= 8,
        "{:?}",
        report.shmem_unmapped
    );

    // Every count matches the re-scan: pages reported gone are gone,
    // pages reported stayed are still in RAM.
    for s in &report.stayed {
        for k in 0..s.pages {
            let a = s.start.get() + k * page;
            let now = after
                .vmas
                .iter()
                .flat_map(|v| &v.runs)
                .find(|run| run.start.get() <= a && a < run.start.get() + run.pages * page)
                .map(|run| run.state);
            assert_eq!(now, Some(s.after), "page {a:#x}: report says {:?}", s.after);
        }
    }
    let stayed: u64 = report.stayed.iter().map(|s| s.pages).sum();
    assert_eq!(stayed, report.total.stayed);
    assert_eq!(
        report.total.requested,
        report.total.left_ram + report.total.stayed
    );
    fx.command("unlock anon_present 0 4").unwrap();
}
