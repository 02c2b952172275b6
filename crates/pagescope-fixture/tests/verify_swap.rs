//! `verify` never swaps anything in: after `dump --swap keep-cold` of the
//! fixture with 32 anonymous and 16 memfd pages paged out, a verify
//! compares the swapped anonymous pages by reading the swap device (root)
//! and counts the swapped shmem pages as not compared (no swap slot is
//! exposed for them), while the global `pswpin`, the target's page table
//! and the memfd's page states stay as they were. Alone in its test
//! binary: `pswpin` is global. The name contains `swapdev`: `scripts/test`
//! runs it on zram and again on a swap file.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::{caps, fixture, is_root, scan, skip};
use pagescope::dump::{DumpOptions, SwapPolicy, dump, verify};
use pagescope::image::Image;
use pagescope::{BackendChoice, PageState, Target};
use pagescope_fixture::FixtureProcess;

fn pswpin() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("pswpin ")?.trim().parse().ok())
        .unwrap()
}

/// Raw pagemap entries of the 32 anonymous pages the test pages out.
fn anon_entries(fx: &FixtureProcess) -> Vec<u64> {
    let page = caps().page_size.get();
    let f = File::open(format!("/proc/{}/pagemap", fx.pid())).unwrap();
    ["anon_present", "anon_swapped"]
        .iter()
        .flat_map(|r| {
            let r = fx.truth().region(r).unwrap();
            (0..16).map(move |i| r.start + i * page)
        })
        .map(|a| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, a / page * 8).unwrap();
            u64::from_ne_bytes(b)
        })
        .collect()
}

/// pagescope's state of memfd pages 0..16.
fn memfd_states(fx: &FixtureProcess) -> Vec<PageState> {
    let page = caps().page_size.get();
    let r = fx.truth().region("memfd").unwrap();
    let report = scan(fx.pid(), BackendChoice::Auto);
    (0..16)
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

#[test]
fn verify_after_keep_cold_swaps_nothing_in_swapdev() {
    if !is_root() {
        skip("swap entries in pagemap, the swap device and ptrace need root");
        return;
    }
    let mut fx = fixture(&["anon", "memfd"]);
    if fx.truth().swap == "none" {
        skip("no active swap device");
        return;
    }
    for cmd in [
        "pageout anon_present 0 16",
        "pageout anon_swapped 0 16",
        "pageout memfd 0 8",
    ] {
        fx.command(cmd).unwrap();
    }
    let dir = std::path::PathBuf::from(format!(
        "/dev/shm/pagescope-verify-swap-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = DumpOptions::new(&dir);
    opts.max_iterations = 1;
    opts.swap = SwapPolicy::KeepCold;
    let target = Target::open(fx.pid()).unwrap();
    let report = dump(&target, caps(), &opts, &mut |_| {}).expect("dump");
    assert!(report.swap.anon.swapped >= 32, "{:?}", report.swap);
    let image = Image::open(&dir).unwrap();
    let anon_before = anon_entries(&fx);
    let shm_before = memfd_states(&fx);
    let swapped_anon = anon_before
        .iter()
        .filter(|e| *e & (1 << 62) != 0 && *e & (1 << 63) == 0)
        .count() as u64;
    let swapped_shm = shm_before
        .iter()
        .filter(|s| **s == PageState::Swapped)
        .count() as u64;
    assert!(
        swapped_anon + swapped_shm >= 16,
        "keep-cold left too little swapped to test: {anon_before:x?} {shm_before:?}"
    );
    let in0 = pswpin();
    let v = verify(&target, caps(), &image).expect("verify");
    let swapins = pswpin() - in0;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(swapins, 0, "verify swapped pages in: {v:?}");
    assert_eq!(anon_entries(&fx), anon_before, "the page table changed");
    let shm_after = memfd_states(&fx);
    for (i, (b, a)) in shm_before.iter().zip(&shm_after).enumerate() {
        if *b == PageState::Swapped {
            assert_eq!(*a, PageState::Swapped, "memfd page {i} was swapped in");
        }
    }
    assert!(v.matches(), "{v:#?}");
    let shm_not_compared: u64 = v
        .not_compared
        .iter()
        .filter(|n| n.reason.contains("shmem"))
        .map(|n| n.pages)
        .sum();
    assert_eq!(shm_not_compared, swapped_shm, "{v:#?}");
    // Anonymous swapped pages are compared from the swap device (or, when
    // the device could not be read, not compared with the reason).
    let anon_not_compared: u64 = v
        .not_compared
        .iter()
        .filter(|n| n.reason.starts_with("swapped out,"))
        .map(|n| n.pages)
        .sum();
    assert!(anon_not_compared < swapped_anon.max(1), "{v:#?}");
    assert_eq!(
        v.not_compared_pages,
        v.not_compared.iter().map(|n| n.pages).sum::<u64>()
    );
}
