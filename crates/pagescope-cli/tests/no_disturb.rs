//! Scanning must not disturb the target: nothing swapped in, nothing
//! faulted in, nothing mapped into it. This is the only test in its binary
//! so that no other test's activity moves the global swap counters.

mod common;

use std::collections::BTreeMap;

use common::{caps, cli, fixture};
use pagescope::BackendChoice;

fn vmstat() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| ["pswpin", "pswpout", "swap_ra", "zswpin", "swpin_zero"].contains(k))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// The target's minor and major fault counts (`/proc/PID/stat` fields 10
/// and 12): any page faulted into the target moves one of them.
fn faults(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    (f[7].parse().unwrap(), f[9].parse().unwrap())
}

/// The target's whole pagemap, VMA by VMA, plus its maps (a mapping added
/// to the target would show there).
fn pagemap_snapshot(pid: u32) -> (String, Vec<Vec<u8>>) {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let range = line.split(' ').next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        if a >= 0xffff_8000_0000_0000 {
            continue; // [vsyscall]: outside pagemap
        }
        let mut buf = vec![0u8; ((b - a) / 4096 * 8) as usize];
        pm.read_exact_at(&mut buf, a / 4096 * 8).unwrap();
        out.push(buf);
    }
    (maps, out)
}

/// cachestat of every object the fixture maps (root: through map_files).
fn object_cachestats(pid: u32) -> Vec<(String, pagescope::raw::cachestat::cachestat)> {
    use std::os::fd::AsFd;
    let t = pagescope::Target::open(pid).unwrap();
    let mut out = Vec::new();
    for e in t.maps().unwrap().iter().filter(|e| e.inode != 0) {
        if let Ok(fd) = t.map_file(e.range) {
            if let Ok(cs) = pagescope::raw::cachestat::cachestat(fd.as_fd(), 0, 0) {
                out.push((e.path.display(), cs));
            }
        }
    }
    out
}

#[test]
fn scanning_changes_nothing_in_the_target_swapdev() {
    let mut fx = fixture(&["all"]);
    let pid = fx.pid();
    let view_before = fx.command("selfview").unwrap();
    let cache_before = object_cachestats(pid);
    let (maps_before, pm_before) = pagemap_snapshot(pid);
    let faults_before = faults(pid);
    let vm_before = vmstat();

    for backend in [BackendChoice::Pagemap, BackendChoice::PagemapScan] {
        if backend == BackendChoice::PagemapScan && !caps().has_pagemap_scan() {
            continue;
        }
        let r = common::scan_with(
            pid,
            &pagescope::ScanOptions {
                backend,
                objects: true,
                smaps: true,
                swap_detail: true,
                ..Default::default()
            },
        );
        assert!(r.complete());
    }
    let pid_s = pid.to_string();
    for args in [["map", &pid_s, "--json"], ["pages", &pid_s, "--json"]] {
        assert!(cli(&args).status.success());
    }

    let vm_after = vmstat();
    let faults_after = faults(pid);
    let (maps_after, pm_after) = pagemap_snapshot(pid);
    let view_after = fx.command("selfview").unwrap();
    let cache_after = object_cachestats(pid);
    if common::is_root() {
        assert!(
            cache_before.len() >= 8,
            "objects opened: {}",
            cache_before.len()
        );
    } else {
        common::skip("cachestat of every object needs map_files (CAP_SYS_ADMIN)");
    }
    assert_eq!(
        cache_before, cache_after,
        "an object's page cache or swap changed"
    );
    assert_eq!(vm_before, vm_after, "swap counters moved during the scans");
    assert_eq!(
        faults_before, faults_after,
        "the target took page faults during the scans"
    );
    assert_eq!(maps_before, maps_after, "the target's mappings changed");
    assert!(pm_before == pm_after, "the target's pagemap changed");
    assert_eq!(
        view_before, view_after,
        "the target's own mincore/pagemap view changed"
    );
}
