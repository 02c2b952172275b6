//! Shared memory and files, seen through their objects: every shmem kind
//! page by page against the fixture's ground truth, the kernel's own
//! accounting (smaps `Swap:`, `cachestat`) as oracles, and the per-object
//! view across processes.

mod common;

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use common::{caps, fixture, skip};
use pagescope::object::ObjectsOptions;
use pagescope::objects_view;
use pagescope::{BackendChoice, PageState, ProcessReport, Target};

const SHMEM: [&str; 4] = ["memfd", "tmpfs", "shared_anon", "sysv"];

fn check_scenario(scenario: &str) {
    common::check_scenario(
        scenario,
        "map_files (every shmem kind) needs CAP_SYS_ADMIN; tests/unprivileged.rs covers the rest",
    );
}

#[test]
fn memfd_pages_swapdev() {
    check_scenario("memfd");
}

#[test]
fn tmpfs_pages_swapdev() {
    check_scenario("tmpfs");
}

#[test]
fn shared_anonymous_pages_swapdev() {
    check_scenario("shared_anon");
}

#[test]
fn sysv_pages_swapdev() {
    check_scenario("sysv");
}

#[test]
fn memfd_private_view_swapdev() {
    check_scenario("memfd_private");
}

/// Pages per state among the report's VMAs of one object.
fn object_counts(report: &ProcessReport, dev: &str, inode: u64) -> BTreeMap<PageState, u64> {
    let mut c = BTreeMap::new();
    for v in report
        .vmas
        .iter()
        .filter(|v| v.vma.inode == inode && v.vma.dev.to_string() == dev)
    {
        for r in &v.runs {
            *c.entry(r.state).or_default() += r.pages;
        }
    }
    c
}

/// smaps counts shmem swap of a mapping (swap cache included) in `Swap:`:
/// it must equal what pagescope reports as swapped + swapcache there.
#[test]
fn smaps_swap_equals_swapped_plus_swapcache_swapdev() {
    if !common::is_root() {
        skip("needs map_files (CAP_SYS_ADMIN) for SysV and shared anonymous objects");
        return;
    }
    let fx = fixture(&SHMEM);
    if fx.truth().swap == "none" {
        skip("no active swap device: nothing to compare with smaps Swap:");
        return;
    }
    let report = common::scan(fx.pid(), BackendChoice::Auto);
    let smaps = Target::open(fx.pid()).unwrap().smaps().unwrap();
    let mut checked = 0;
    for v in report
        .vmas
        .iter()
        .filter(|v| v.vma.backing == pagescope::Backing::Shmem && v.vma.is_shared())
    {
        let s = smaps
            .iter()
            .find(|s| s.vma.range == v.vma.range)
            .expect("smaps entry");
        let swap_pages = s.field_kb("Swap").unwrap() / 4;
        let ours: u64 = v
            .runs
            .iter()
            .filter(|r| matches!(r.state, PageState::Swapped | PageState::SwapCache))
            .map(|r| r.pages)
            .sum();
        assert_eq!(ours, swap_pages, "{} {}", v.vma.range, v.vma.path.display());
        checked += u64::from(swap_pages > 0);
    }
    for r in common::checkable(fx.truth(), None) {
        assert!(
            r.expect.iter().any(|e| e.state.starts_with("swap")),
            "{} has no paged-out pages",
            r.name
        );
    }
    assert!(
        checked >= 4,
        "only {checked} shmem mappings had swap to compare"
    );
}

/// cachestat over the whole object: `nr_cache` counts page-cache folios,
/// fallocated ones included, so mapped + resident = nr_cache - fallocated;
/// `nr_evicted` counts every swap entry, so swapped + swapcache = nr_evicted.
#[test]
fn cachestat_agrees_with_object_pages_swapdev() {
    if !common::is_root() {
        skip("needs map_files (CAP_SYS_ADMIN) to open every object");
        return;
    }
    let fx = fixture(&SHMEM);
    if fx.truth().swap == "none" {
        skip("no active swap device: nothing to compare with smaps Swap:");
        return;
    }
    let report = common::scan(fx.pid(), BackendChoice::Auto);
    let target = Target::open(fx.pid()).unwrap();
    for region in common::checkable(fx.truth(), None) {
        let obj = region.object.as_ref().expect("object identity");
        let v = report
            .vmas
            .iter()
            .find(|v| v.vma.inode == obj.inode)
            .expect("vma");
        let fd = target.map_file(v.vma.range).expect("map_files");
        let cs = pagescope::raw::cachestat::cachestat(fd.as_fd(), 0, 0).expect("cachestat");
        let c = object_counts(&report, &obj.dev, obj.inode);
        let get = |s| c.get(&s).copied().unwrap_or(0);
        let cached = get(PageState::Present) + get(PageState::Resident);
        assert_eq!(
            cached,
            cs.nr_cache - get(PageState::Fallocated),
            "{}: {c:?} vs {cs:?}",
            region.name
        );
        assert_eq!(
            get(PageState::Swapped) + get(PageState::SwapCache),
            cs.nr_evicted,
            "{}: {c:?} vs {cs:?}",
            region.name
        );
        assert_eq!(
            c.values().sum::<u64>(),
            region.pages,
            "{} not fully covered",
            region.name
        );
    }
}

#[test]
fn objects_view_lists_each_object_once_with_its_sharers_swapdev() {
    if !common::is_root() {
        skip("needs map_files (CAP_SYS_ADMIN) for SysV and shared anonymous objects");
        return;
    }
    let fx = fixture(&SHMEM);
    if fx.truth().swap == "none" {
        skip("no active swap device: the paged-out part of each object cannot be built");
        return;
    }
    let truth = fx.truth();
    let helper = *truth.children.last().expect("helper process");
    let view = objects_view(&[fx.pid(), helper], caps(), &ObjectsOptions::default());
    assert!(view.skipped.is_empty(), "{:?}", view.skipped);
    for region in common::checkable(truth, None) {
        let obj = region.object.as_ref().unwrap();
        let found: Vec<_> = view
            .objects
            .iter()
            .filter(|o| o.id.inode == obj.inode && o.id.dev.to_string() == obj.dev)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{} listed {} times",
            region.name,
            found.len()
        );
        let o = found[0];
        assert!(o.error.is_none(), "{}: {:?}", region.name, o.error);
        assert_eq!(o.size_pages, 64);
        // Object states: what the fixture's view shows, where pages mapped
        // by anyone are simply resident.
        let mut want: BTreeMap<PageState, u64> = BTreeMap::new();
        for e in &region.expect {
            let st = PageState::from_name(&e.state).unwrap();
            let st = if st == PageState::Present {
                PageState::Resident
            } else {
                st
            };
            *want.entry(st).or_default() += e.count;
        }
        let got: BTreeMap<PageState, u64> = o
            .counts
            .0
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (*s, *n))
            .collect();
        assert_eq!(got, want, "{}", region.name);
        // Pages 0..8 are mapped by the fixture, 48..56 by the helper.
        assert_eq!(o.mapped_pages, 16, "{}", region.name);
        let pids: Vec<u32> = o.sharers.iter().map(|s| s.pid).collect();
        assert!(
            pids.contains(&fx.pid()) && pids.contains(&helper),
            "{}: sharers {pids:?}",
            region.name
        );
        let h = o.sharers.iter().find(|s| s.pid == helper).unwrap();
        assert_eq!(h.mappings.len(), 1);
        assert_eq!(
            (
                h.mappings[0].first_page,
                h.mappings[0].pages,
                h.mappings[0].present_pages
            ),
            (48, 8, 8)
        );
    }
}

/// zram frees paged-out shmem at once (`swapped`); the asynchronous
/// swapfile leaves it in the swap cache (`swapcache`). Each phase of
/// `scripts/test` must see its device's state, not just agree with itself.
#[test]
fn paged_out_shmem_state_follows_the_swap_device_swapdev() {
    if !common::is_root() {
        skip("needs map_files (CAP_SYS_ADMIN)");
        return;
    }
    let fx = fixture(&["memfd"]);
    let truth = fx.truth();
    let region = truth.region("memfd").unwrap();
    if let Some(why) = &region.skip {
        skip(why);
        return;
    }
    let report = common::scan(fx.pid(), BackendChoice::Auto);
    let states: Vec<PageState> = (8..16)
        .map(|i| {
            report
                .run_at(pagescope::VirtAddr::new(
                    region.page_addr(i, truth.page_size),
                ))
                .unwrap()
                .state
        })
        .collect();
    match truth.swap.as_str() {
        "zram" => assert!(
            states.iter().all(|s| *s == PageState::Swapped),
            "{states:?}"
        ),
        "file" => assert!(states.contains(&PageState::SwapCache), "{states:?}"),
        other => skip(&format!("swap device kind {other}")),
    }
    common::assert_matches_truth(truth, &report, Some("memfd"));
}
