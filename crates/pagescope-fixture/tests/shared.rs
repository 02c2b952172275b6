//! Shared memory written by any process, tracked in object space: the
//! fixture and a second process (the fixture's `sharer`) map the same
//! memfd, tmpfs file, SysV segment and `MAP_SHARED|MAP_ANONYMOUS` region
//! and write known pages; a tracker of either must report exactly the
//! union. System-call writes, punched holes, writers that come and go.

mod common;

use common::{caps, fixture, skip};
use pagescope::dirty::{
    DirtyReport, DirtyTracker, TrackEvent, TrackOptions, TrackerBackend, WriteSource, attach_owned,
};
use pagescope::{Target, VirtAddr};
use pagescope_fixture::{FixtureProcess, Truth};

const KINDS: [&str; 4] = ["memfd", "tmpfs", "shared_anon", "sysv"];

fn usable() -> bool {
    if !common::is_root() {
        skip(
            "tracking other processes needs ptrace rights and userfaultfd (root or CAP_SYS_PTRACE)",
        );
        return false;
    }
    if !caps().has_uffd_wp_async() {
        skip("kernel lacks userfaultfd WP_ASYNC or PAGEMAP_SCAN (Linux 6.7+)");
        return false;
    }
    true
}

fn tracker(pid: u32, opts: &TrackOptions) -> Box<dyn DirtyTracker> {
    let t = attach_owned(Target::open(pid).unwrap(), caps(), opts).expect("attach");
    assert_eq!(t.backend(), TrackerBackend::UffdWpAsync, "{:?}", t.notes());
    assert_eq!(t.degraded(), None);
    t
}

/// The pages of `region` the report names, as indices.
fn reported(truth: &Truth, region: &str, r: &DirtyReport) -> Vec<u64> {
    let reg = truth.region(region).unwrap();
    (0..reg.pages)
        .filter(|&i| r.contains(VirtAddr::new(reg.page_addr(i, truth.page_size))))
        .collect()
}

fn sources(truth: &Truth, region: &str, page: u64, r: &DirtyReport) -> Vec<WriteSource> {
    let reg = truth.region(region).unwrap();
    r.sources_at(VirtAddr::new(reg.page_addr(page, truth.page_size)))
}

fn cmd(fx: &mut FixtureProcess, c: &str) -> String {
    fx.command(c).unwrap_or_else(|e| panic!("{c}: {e}"))
}

fn writers(r: &DirtyReport, truth: &Truth, region: &str) -> Vec<(u32, u64)> {
    let obj = truth.region(region).unwrap().object.as_ref().unwrap();
    r.objects
        .iter()
        .find(|o| o.object.inode == obj.inode)
        .map(|o| o.writers.iter().map(|(p, n)| (*p, *n)).collect())
        .unwrap_or_default()
}

/// Each of two processes writes known pages of each kind of shared
/// memory; a tracker of either reports exactly the union, attributed to
/// the writers.
#[test]
fn writes_by_either_process_are_reported_exactly() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&KINDS);
    let truth = fx.truth().clone();
    let sharer: u32 = cmd(&mut fx, "sharer start").parse().unwrap();
    for watched in [fx.pid(), sharer] {
        let mut t = tracker(watched, &TrackOptions::default());
        let quiet = t.collect().unwrap();
        for kind in KINDS {
            assert_eq!(
                reported(&truth, kind, &quiet),
                Vec::<u64>::new(),
                "{kind}: nothing written yet: {:?}",
                quiet.objects
            );
        }
        for kind in KINDS {
            cmd(&mut fx, &format!("write {kind} 2 2"));
            cmd(&mut fx, &format!("sharer write {kind} 40 3"));
        }
        let r = t.collect().unwrap();
        for kind in KINDS {
            assert_eq!(
                reported(&truth, kind, &r),
                vec![2, 3, 40, 41, 42],
                "{kind}, watching {watched}: {:?}",
                r.objects
            );
            for p in [2, 40] {
                let s = sources(&truth, kind, p, &r);
                assert!(s.iter().all(|s| s.is_exact()), "{kind} page {p}: {s:?}");
            }
            let w = writers(&r, &truth, kind);
            assert!(
                w.contains(&(fx.pid(), 2)) && w.contains(&(sharer, 3)),
                "{kind}: {w:?}"
            );
        }
        let again = t.collect().unwrap();
        for kind in KINDS {
            assert_eq!(
                reported(&truth, kind, &again),
                Vec::<u64>::new(),
                "{kind}: reset"
            );
        }
    }
}

/// `pwrite()` through the memfd's own descriptor raises no fsnotify event
/// (a pseudo file); the BPF counter sees it and the object is reported.
#[test]
fn pwrite_through_a_memfd_descriptor_is_reported() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&["memfd", "tmpfs"]);
    let truth = fx.truth().clone();
    let mut t = tracker(fx.pid(), &TrackOptions::default());
    t.collect().unwrap();
    for kind in ["memfd", "tmpfs"] {
        cmd(&mut fx, &format!("pwrite {kind} 20 1"));
        let r = t.collect().unwrap();
        let got = reported(&truth, kind, &r);
        assert!(got.contains(&20), "{kind}: {got:?}");
        let want = if kind == "memfd" {
            WriteSource::ObjectDescriptorWrite
        } else {
            WriteSource::ObjectSyscall
        };
        assert!(
            sources(&truth, kind, 20, &r).contains(&want),
            "{kind}: {:?}",
            r.objects
        );
        assert!(
            reported(&truth, kind, &t.collect().unwrap()).is_empty(),
            "{kind}: nothing new"
        );
    }
}

/// A hole punched into shmem makes the write-protected PTEs markers and
/// uffd-wp reports nothing; the data-extent comparison reports exactly
/// the punched pages.
#[test]
fn punched_pages_are_reported_exactly() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&["shared_anon", "sysv", "memfd"]);
    let truth = fx.truth().clone();
    let mut t = tracker(fx.pid(), &TrackOptions::default());
    t.collect().unwrap();
    cmd(&mut fx, "remove shared_anon 4 2");
    let r = t.collect().unwrap();
    assert_eq!(
        reported(&truth, "shared_anon", &r),
        vec![4, 5],
        "{:?}",
        r.objects
    );
    assert_eq!(
        sources(&truth, "shared_anon", 4, &r),
        vec![WriteSource::ObjectPunched]
    );
    // MADV_REMOVE of SysV memory also raises fsnotify (its file is not a
    // pseudo file), which cannot be told from a pwrite() through
    // /proc/PID/map_files: the object is reported whole, the punched pages
    // with their own source.
    cmd(&mut fx, "remove sysv 4 2");
    let r = t.collect().unwrap();
    assert!(
        sources(&truth, "sysv", 4, &r).contains(&WriteSource::ObjectPunched),
        "{:?}",
        r.objects
    );
    assert!(!sources(&truth, "sysv", 6, &r).contains(&WriteSource::ObjectPunched));
    cmd(&mut fx, "punch memfd 2 2");
    let r = t.collect().unwrap();
    assert!(sources(&truth, "memfd", 2, &r).contains(&WriteSource::ObjectPunched));
}

/// A process that maps the object, writes a hole and exits between two
/// collects is never seen, but the hole turned into data: that page, and
/// only it, is reported.
#[test]
fn a_writer_that_came_and_went_is_caught_by_the_data_extents() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&["memfd_private"]);
    let truth = fx.truth().clone();
    let mut t = tracker(fx.pid(), &TrackOptions::default());
    t.collect().unwrap();
    cmd(&mut fx, "helper_write memfd_private 28 1 exit");
    let r = t.collect().unwrap();
    assert_eq!(
        reported(&truth, "memfd_private", &r),
        vec![28],
        "{:?}",
        r.objects
    );
    assert_eq!(
        sources(&truth, "memfd_private", 28, &r),
        vec![WriteSource::ObjectFilled]
    );
}

/// A child forked after attach inherits the synchronous write-protection
/// of the shared memory (`UFFD_EVENT_FORK`): it is tracked from birth, so
/// nothing is reported whole when it appears or goes; its writes are
/// reported page by page, attributed to it.
#[test]
fn children_are_tracked_from_birth() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&["shared_anon"]);
    let truth = fx.truth().clone();
    let mut t = tracker(fx.pid(), &TrackOptions::default());
    t.collect().unwrap();
    let sharer: u32 = cmd(&mut fx, "sharer start").parse().unwrap();
    let r = t.collect().unwrap();
    assert!(r.forks_tracked, "synchronous tracking across fork (root)");
    assert_eq!(r.forks, 1, "{:?}", r.events);
    assert!(
        reported(&truth, "shared_anon", &r).is_empty(),
        "{:?} {:?}",
        sources(&truth, "shared_anon", 0, &r),
        r.objects
    );
    assert!(
        r.events.contains(&TrackEvent::Fork { child: sharer }),
        "{:?}",
        r.events
    );
    assert!(r.children.contains(&sharer), "{:?}", r.children);
    cmd(&mut fx, "sharer write shared_anon 5 1");
    let r = t.collect().unwrap();
    assert_eq!(reported(&truth, "shared_anon", &r), vec![5]);
    assert_eq!(writers(&r, &truth, "shared_anon"), vec![(sharer, 1)]);
    assert!(
        sources(&truth, "shared_anon", 5, &r)
            .iter()
            .all(|s| s.is_exact())
    );
    cmd(&mut fx, "sharer write shared_anon 9 2");
    cmd(&mut fx, "sharer stop");
    let r = t.collect().unwrap();
    assert_eq!(
        reported(&truth, "shared_anon", &r),
        vec![9, 10],
        "its last writes, and nothing more: {:?}",
        r.objects
    );
    assert!(reported(&truth, "shared_anon", &t.collect().unwrap()).is_empty());
}

/// `no_sharers` keeps pagescope out of other processes: an object another
/// process maps writable is reported whole every time, with that cause.
#[test]
fn no_sharers_reports_objects_others_may_write() {
    if !usable() {
        return;
    }
    let fx = fixture(&["memfd"]);
    let truth = fx.truth().clone();
    let opts = TrackOptions {
        no_sharers: true,
        ..TrackOptions::default()
    };
    let mut t = tracker(fx.pid(), &opts);
    for _ in 0..2 {
        let r = t.collect().unwrap();
        assert_eq!(reported(&truth, "memfd", &r).len(), 64);
        assert_eq!(
            sources(&truth, "memfd", 0, &r),
            vec![WriteSource::ObjectForeignWriter]
        );
    }
}

/// Strict mode reports every shared object whole on every collect, even
/// with nothing written.
#[test]
fn strict_shared_reports_shared_objects_every_time() {
    if !usable() {
        return;
    }
    let fx = fixture(&["shared_anon", "anon"]);
    let truth = fx.truth().clone();
    let opts = TrackOptions {
        strict_shared: true,
        ..TrackOptions::default()
    };
    let mut t = tracker(fx.pid(), &opts);
    for _ in 0..2 {
        let r = t.collect().unwrap();
        assert_eq!(reported(&truth, "shared_anon", &r).len(), 64);
        assert_eq!(
            sources(&truth, "shared_anon", 0, &r),
            vec![WriteSource::ObjectStrict]
        );
        assert!(
            reported(&truth, "anon_present", &r).is_empty(),
            "private memory stays exact"
        );
    }
}
