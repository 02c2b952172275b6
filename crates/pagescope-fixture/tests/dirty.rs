//! Dirty tracking of another process (uffd-wp async, created inside the
//! fixture by syscall injection), against the fixture's record of what it
//! wrote. Over-reporting is allowed; a missed write fails the test.

mod common;

use std::os::unix::fs::FileExt;

use common::{caps, fixture, skip};
use pagescope::dirty::{
    DirtyReport, DirtyTracker, TrackOptions, TrackerBackend, WriteSource, attach_owned,
};
use pagescope::{Target, VirtAddr};
use pagescope_fixture::{FixtureProcess, Truth};

fn tracker(fx: &FixtureProcess) -> Option<Box<dyn DirtyTracker>> {
    if !common::is_root() {
        skip(
            "tracking another process needs ptrace rights and userfaultfd (root or CAP_SYS_PTRACE)",
        );
        return None;
    }
    if !caps().has_uffd_wp_async() {
        skip("kernel lacks userfaultfd WP_ASYNC or PAGEMAP_SCAN (Linux 6.7+)");
        return None;
    }
    let t = attach_owned(
        Target::open(fx.pid()).unwrap(),
        caps(),
        &TrackOptions::default(),
    )
    .expect("attach");
    assert_eq!(
        t.backend(),
        TrackerBackend::UffdWpAsync,
        "notes: {:?}",
        t.notes()
    );
    Some(t)
}

/// Whether `region` of the fixture was built as asked (else it is skipped
/// with the fixture's reason: no THP, no swap device, ...).
fn built(fx: &FixtureProcess, region: &str) -> bool {
    match fx.truth().region(region).and_then(|r| r.skip.clone()) {
        Some(why) => {
            skip(&format!("region {region}: {why}"));
            false
        }
        None => true,
    }
}

fn addr(truth: &Truth, region: &str, page: u64) -> VirtAddr {
    VirtAddr::new(
        truth
            .region(region)
            .unwrap_or_else(|| panic!("no region {region}"))
            .page_addr(page, truth.page_size),
    )
}

/// The pages of `region` the report names, as indices.
fn reported(truth: &Truth, region: &str, r: &DirtyReport) -> Vec<u64> {
    let reg = truth.region(region).unwrap();
    (0..reg.pages)
        .filter(|&i| r.contains(VirtAddr::new(reg.page_addr(i, truth.page_size))))
        .collect()
}

fn cmd(fx: &mut FixtureProcess, c: &str) -> String {
    fx.command(c).unwrap_or_else(|e| panic!("{c}: {e}"))
}

#[test]
fn reports_exactly_the_written_anon_pages() {
    let mut fx = fixture(&["anon"]);
    let Some(mut t) = tracker(&fx) else { return };
    let quiet = t.collect().unwrap();
    assert!(
        reported(fx.truth(), "anon_present", &quiet).is_empty(),
        "nothing written yet"
    );
    cmd(&mut fx, "write anon_present 2 3");
    let r = t.collect().unwrap();
    assert_eq!(reported(fx.truth(), "anon_present", &r), vec![2, 3, 4]);
    assert!(
        r.written
            .iter()
            .filter(|w| w.range.contains(addr(fx.truth(), "anon_present", 2)))
            .all(|w| w.source == WriteSource::Tracked)
    );
    let again = t.collect().unwrap();
    assert!(
        reported(fx.truth(), "anon_present", &again).is_empty(),
        "reset after reporting"
    );
    // Writes into untouched pages (markers) and onto the zero page count too.
    cmd(&mut fx, "write anon_untouched 0 2");
    cmd(&mut fx, "write anon_zero 5 1");
    let r = t.collect().unwrap();
    assert_eq!(reported(fx.truth(), "anon_untouched", &r), vec![0, 1]);
    assert_eq!(reported(fx.truth(), "anon_zero", &r), vec![5]);
}

#[test]
fn thp_writes_are_reported_per_4k_page() {
    let mut fx = fixture(&["thp"]);
    let Some(mut t) = tracker(&fx) else { return };
    if !built(&fx, "thp_present") {
        return;
    }
    t.collect().unwrap();
    cmd(&mut fx, "write thp_present 7 1");
    cmd(&mut fx, "write thp_present 600 1");
    let r = t.collect().unwrap();
    assert_eq!(reported(fx.truth(), "thp_present", &r), vec![7, 600]);
}

/// `MADV_DONTNEED` of a write-protected THP leaves a PMD hole: its content
/// changed (now zeros), so every page must be reported.
#[test]
fn dontneed_of_protected_thp_is_reported() {
    let mut fx = fixture(&["thp"]);
    let Some(mut t) = tracker(&fx) else { return };
    if !built(&fx, "thp_present") {
        return;
    }
    t.collect().unwrap();
    cmd(&mut fx, "dontneed thp_present 0 512");
    let r = t.collect().unwrap();
    assert_eq!(
        reported(fx.truth(), "thp_present", &r),
        (0..512).collect::<Vec<_>>()
    );
}

/// Written pages that were swapped out (and maybe back in) must be
/// reported: a PRESENT-only scan misses them (wasmtime#14357).
#[test]
fn written_then_swapped_out_and_back_swapdev() {
    let mut fx = fixture(&["anon"]);
    let Some(mut t) = tracker(&fx) else { return };
    if !built(&fx, "anon_swapped") {
        return;
    }
    t.collect().unwrap();
    cmd(&mut fx, "write anon_present 0 4");
    cmd(&mut fx, "pageout anon_present 0 2");
    cmd(&mut fx, "pageout anon_present 2 2");
    cmd(&mut fx, "read anon_present 2 2");
    let r = t.collect().unwrap();
    assert_eq!(reported(fx.truth(), "anon_present", &r), vec![0, 1, 2, 3]);
    // Protected (unwritten) pages swapped out and back are not written.
    cmd(&mut fx, "pageout anon_present 8 4");
    cmd(&mut fx, "read anon_present 8 4");
    let r = t.collect().unwrap();
    assert!(reported(fx.truth(), "anon_present", &r).is_empty());
}

/// shmem written through the mapping, then reclaimed: the PTE is gone, and
/// the page must still be reported.
#[test]
fn shmem_written_then_reclaimed_swapdev() {
    let mut fx = fixture(&["memfd", "sysv"]);
    let Some(mut t) = tracker(&fx) else { return };
    if !built(&fx, "memfd") || !built(&fx, "sysv") {
        return;
    }
    if fx.truth().swap == "none" {
        skip("no active swap device: shmem pages cannot be reclaimed");
        return;
    }
    t.collect().unwrap();
    for kind in ["memfd", "sysv"] {
        cmd(&mut fx, &format!("write {kind} 0 4"));
        cmd(&mut fx, &format!("pageout {kind} 0 4"));
    }
    let r = t.collect().unwrap();
    for kind in ["memfd", "sysv"] {
        let got = reported(fx.truth(), kind, &r);
        assert!((0..4).all(|p| got.contains(&p)), "{kind}: {got:?}");
    }
}

#[test]
fn new_moved_unmapped_and_reprotected_mappings() {
    let mut fx = fixture(&["anon"]);
    let Some(mut t) = tracker(&fx) else { return };
    t.collect().unwrap();
    cmd(&mut fx, "mmap fresh 16");
    fx.refresh_truth().unwrap();
    let r = t.collect().unwrap();
    assert_eq!(
        reported(fx.truth(), "fresh", &r).len(),
        16,
        "a new mapping is reported whole"
    );
    assert!(
        t.collect()
            .map(|r| reported(fx.truth(), "fresh", &r).is_empty())
            .unwrap()
    );
    cmd(&mut fx, "write fresh 3 1");
    assert_eq!(
        reported(fx.truth(), "fresh", &t.collect().unwrap()),
        vec![3]
    );

    cmd(&mut fx, "mremap fresh 24");
    fx.refresh_truth().unwrap();
    assert_eq!(
        reported(fx.truth(), "fresh", &t.collect().unwrap()).len(),
        24,
        "a moved mapping is reported whole"
    );
    cmd(&mut fx, "write fresh 20 1");
    assert_eq!(
        reported(fx.truth(), "fresh", &t.collect().unwrap()),
        vec![20]
    );

    cmd(&mut fx, "ro anon_present 0 8");
    t.collect().unwrap();
    cmd(&mut fx, "rw anon_present 0 8");
    cmd(&mut fx, "write anon_present 1 1");
    assert_eq!(
        reported(fx.truth(), "anon_present", &t.collect().unwrap()),
        vec![1]
    );

    cmd(&mut fx, "munmap fresh");
    let r = t.collect().expect("collect after munmap");
    assert!(!r.tracked.is_empty());
}

#[test]
fn fork_of_the_target_keeps_tracking_the_parent() {
    let mut fx = fixture(&["anon"]);
    let Some(mut t) = tracker(&fx) else { return };
    t.collect().unwrap();
    cmd(&mut fx, "fork");
    cmd(&mut fx, "write anon_present 6 2");
    cmd(&mut fx, "write anon_untouched 1 1");
    let r = t.collect().unwrap();
    assert_eq!(reported(fx.truth(), "anon_present", &r), vec![6, 7]);
    assert_eq!(reported(fx.truth(), "anon_untouched", &r), vec![1]);
}

/// write()/pwrite() into the object and writes by a process that maps it
/// and is gone by the next collect never touch the tracked page tables;
/// they must still be reported (`shared.rs` covers every case in depth).
#[test]
fn writes_uffd_cannot_see_are_reported() {
    let mut fx = fixture(&["memfd", "memfd_private"]);
    let Some(mut t) = tracker(&fx) else { return };
    let truth = fx.truth().clone();
    // The fixture's helper maps memfd pages 48..56 writable: it is tracked
    // as a sharer, so the memfd is not reported while nobody writes.
    let r = t.collect().unwrap();
    assert!(reported(&truth, "memfd", &r).is_empty(), "{:?}", r.objects);
    // pwrite into the private view's memfd through its descriptor.
    cmd(&mut fx, "pwrite memfd_private 20 1");
    let r = t.collect().unwrap();
    let got = reported(&truth, "memfd_private", &r);
    assert!(got.contains(&20), "{got:?}");
    assert!(
        r.written
            .iter()
            .any(|w| w.source == WriteSource::ObjectDescriptorWrite)
    );
    assert!(
        reported(&truth, "memfd_private", &t.collect().unwrap()).is_empty(),
        "nothing new"
    );
    // A process that writes a hole of the object and exits at once.
    cmd(&mut fx, "helper_write memfd_private 28 1 exit");
    let got = reported(&truth, "memfd_private", &t.collect().unwrap());
    assert!(got.contains(&28), "{got:?}");
}

/// Racing writers on several threads while the tracker collects in a loop:
/// copying the reported pages after each collect must reproduce the final
/// memory exactly (a lost write would leave a stale copy).
#[test]
fn racing_writers_lose_no_write() {
    let mut fx = fixture(&["anon"]);
    let Some(mut t) = tracker(&fx) else { return };
    cmd(&mut fx, "mmap race 256");
    fx.refresh_truth().unwrap();
    let truth = fx.truth().clone();
    let region = truth.region("race").unwrap().clone();
    let mem = std::fs::File::open(format!("/proc/{}/mem", fx.pid())).unwrap();
    let page = truth.page_size as usize;
    let read_page = |i: u64| {
        let mut b = vec![0u8; page];
        mem.read_exact_at(&mut b, region.page_addr(i, truth.page_size))
            .unwrap();
        b
    };
    t.collect().unwrap();
    let mut copy: Vec<Vec<u8>> = (0..region.pages).map(read_page).collect();
    let pid = fx.pid();
    let mut collects = 0;
    std::thread::scope(|s| {
        let writer = s.spawn(|| cmd(&mut fx, "writers race 2 1500"));
        while !writer.is_finished() {
            let r = t.collect().unwrap();
            for i in reported(&truth, "race", &r) {
                copy[i as usize] = read_page(i);
            }
            collects += 1;
        }
        let writes: u64 = writer.join().unwrap().parse().unwrap();
        assert!(writes > 1000, "only {writes} writes");
    });
    let r = t.collect().unwrap();
    for i in reported(&truth, "race", &r) {
        copy[i as usize] = read_page(i);
    }
    let stale: Vec<u64> = (0..region.pages)
        .filter(|&i| copy[i as usize] != read_page(i))
        .collect();
    assert!(
        stale.is_empty(),
        "pid {pid}: {} stale pages after {collects} collects: {stale:?}",
        stale.len()
    );
    assert!(collects > 10, "only {collects} collects raced the writers");
}

#[test]
fn detaching_removes_the_protection() {
    let fx = fixture(&["anon"]);
    let Some(t) = tracker(&fx) else { return };
    let smaps = Target::open(fx.pid()).unwrap().smaps().unwrap();
    assert!(
        smaps
            .iter()
            .any(|s| { s.vm_flags.contains(pagescope::raw::VmFlags::UFFD_WP) })
    );
    drop(t);
    // The kernel lifts the registration when the last reference to the
    // userfaultfd goes: a process another test of this binary forks at
    // that moment (an injection helper, a spawned fixture) holds a copy
    // for the few microseconds before it closes or execs.
    let uw_left = || {
        Target::open(fx.pid())
            .unwrap()
            .smaps()
            .unwrap()
            .iter()
            .any(|s| s.vm_flags.contains(pagescope::raw::VmFlags::UFFD_WP))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while uw_left() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!uw_left(), "uw left behind");
    // No fd left behind in the target either.
    let fds = Target::open(fx.pid()).unwrap().fds().unwrap();
    for n in fds {
        let link = std::fs::read_link(format!("/proc/{}/fd/{n}", fx.pid())).unwrap_or_default();
        assert!(
            !link.to_string_lossy().contains("userfaultfd"),
            "fd {n} -> {link:?}"
        );
    }
}

#[test]
fn soft_dirty_backend_is_refused_without_kernel_support() {
    let fx = fixture(&[]);
    let opts = TrackOptions {
        backend: Some(TrackerBackend::SoftDirty),
        ..Default::default()
    };
    let r = attach_owned(Target::open(fx.pid()).unwrap(), caps(), &opts);
    match (caps().soft_dirty, r) {
        (false, Err(e)) => assert!(e.to_string().contains("soft-dirty"), "{e}"),
        (false, Ok(_)) => panic!("soft-dirty tracker on a kernel without soft-dirty"),
        (true, r) => assert_eq!(r.unwrap().backend(), TrackerBackend::SoftDirty),
    }
    let all = attach_owned(
        Target::open(fx.pid()).unwrap(),
        caps(),
        &TrackOptions {
            backend: Some(TrackerBackend::AllDirty),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(all.backend(), TrackerBackend::AllDirty);
}
