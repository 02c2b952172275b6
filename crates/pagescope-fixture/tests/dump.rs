//! Dump → restore → compare, against the fixture's memory read
//! independently (`/proc/PID/mem` of the stopped fixture), for every
//! scenario; forked trees; three-generation chains; corrupted images.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Scratch, can_dump, caps, fixture, skip};
use pagescope::Target;
use pagescope::dump::{DumpOptions, DumpReport, dump};
use pagescope::image::{Image, ImageError};
use pagescope::image::{PageKind, VmaRec};
use pagescope_fixture::FixtureProcess;

/// Lets stopped processes run again when the test ends (pass or fail).
struct Resume(Vec<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
                rustix::process::Signal::CONT,
            );
        }
    }
}

fn dump_to(pid: u32, out: &Path, f: impl FnOnce(&mut DumpOptions)) -> DumpReport {
    let mut opts = DumpOptions::new(out);
    opts.max_iterations = 2;
    f(&mut opts);
    let target = Target::open(pid).unwrap();
    dump(&target, caps(), &opts, &mut |_| {}).expect("dump")
}

/// `len` bytes at `addr` of `pid` through `/proc/PID/mem`; pages that
/// cannot be read (guard pages) read as zeros.
fn live(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let p = caps().page_size.get() as usize;
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(p).enumerate() {
        if mem.read_exact_at(chunk, addr + (i * p) as u64).is_err() {
            chunk.fill(0);
        }
    }
    out
}

/// `len` bytes at `addr` of `pid` from a restore directory (one file per
/// mapping; a region may span several).
fn restored(dir: &Path, pid: u32, addr: u64, len: usize) -> Vec<u8> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let Some(rest) = name
            .strip_prefix(&format!("pid-{pid}-"))
            .and_then(|r| r.strip_suffix(".mem"))
        else {
            continue;
        };
        let (s, e) = rest.split_once('-').unwrap();
        files.push((
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
            name,
        ));
    }
    let mut out = vec![0u8; len];
    let mut at = addr;
    while at < addr + len as u64 {
        let (s, e, name) = files
            .iter()
            .find(|(s, e, _)| *s <= at && at < *e)
            .unwrap_or_else(|| panic!("no restored mapping of process {pid} covers {at:#x}"));
        let n = (e.min(&(addr + len as u64)) - at) as usize;
        let from = (at - addr) as usize;
        File::open(dir.join(name))
            .unwrap()
            .read_exact_at(&mut out[from..from + n], at - s)
            .unwrap();
        at += n as u64;
    }
    out
}

/// The image's mapping of `pid` holding `addr`.
fn vma_at(image: &Image, pid: u32, addr: u64) -> VmaRec {
    image
        .process(pid)
        .unwrap()
        .vmas
        .iter()
        .find(|v| v.start <= addr && addr < v.end)
        .cloned()
        .unwrap()
}

/// Pages of `kind` in the image's record of `addr..addr+pages`.
fn kind_pages(image: &Image, pid: u32, addr: u64, pages: u64, kind: PageKind) -> u64 {
    let v = vma_at(image, pid, addr);
    let page = image.header().page_size;
    let first = (addr - v.start) / page;
    v.runs
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| {
            let a = r.first.max(first);
            let b = (r.first + r.count).min(first + pages);
            b.saturating_sub(a)
        })
        .sum()
}

/// Dumps the fixture built with `scenarios` (left stopped), restores the
/// image, and compares every region byte for byte with the memory.
fn round_trip(scenarios: &[&str]) -> Option<(FixtureProcess, Image, Scratch)> {
    if !can_dump() {
        return None;
    }
    let fx = fixture(scenarios);
    let dir = Scratch::new(&scenarios.join("_"));
    let pid = fx.pid();
    dump_to(pid, &dir.path("img"), |o| o.leave_stopped = true);
    let _resume = Resume(vec![pid]);
    let image = Image::open(&dir.path("img")).unwrap();
    image.restore_to_dir(&dir.path("restored")).unwrap();
    let page = caps().page_size.get();
    let mut compared = 0;
    for r in fx.truth().regions.iter().filter(|r| r.skip.is_none()) {
        let len = (r.pages * page) as usize;
        let want = live(pid, r.start, len);
        let got = restored(&dir.path("restored"), pid, r.start, len);
        let bad = want
            .chunks(page as usize)
            .zip(got.chunks(page as usize))
            .position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "region {}: page {} differs after restore",
            r.name,
            bad.unwrap_or(0)
        );
        compared += 1;
    }
    let skipped = fx
        .truth()
        .regions
        .iter()
        .filter(|r| r.skip.is_some())
        .count();
    assert!(
        compared > 0 || skipped > 0,
        "no region of {scenarios:?} was built"
    );
    for r in fx.truth().regions.iter().filter(|r| r.skip.is_some()) {
        skip(&format!(
            "region {}: {}",
            r.name,
            r.skip.clone().unwrap_or_default()
        ));
    }
    Some((fx, image, dir))
}

#[test]
fn dump_round_trip_swapdev_anon() {
    let Some((fx, image, _dir)) = round_trip(&["anon"]) else {
        return;
    };
    let pid = fx.pid();
    let t = fx.truth();
    let zero = t.region("anon_zero").unwrap();
    assert_eq!(
        kind_pages(&image, pid, zero.start, 16, PageKind::Data),
        0,
        "zero pages must not be stored"
    );
    let present = t.region("anon_present").unwrap();
    assert_eq!(
        kind_pages(&image, pid, present.start, 16, PageKind::Data),
        16
    );
}

#[test]
fn dump_round_trip_thp_guard_dense() {
    round_trip(&["thp", "guard", "dense_mixed"]);
}

#[test]
fn dump_round_trip_swapdev_shmem() {
    let Some((fx, image, _dir)) = round_trip(&["memfd", "tmpfs", "shared_anon", "sysv"]) else {
        return;
    };
    // Each object once, whatever the number of mappings.
    let objects = &image.meta().objects;
    let mut ids: Vec<_> = objects.iter().map(|o| (&o.dev, o.inode)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), objects.len());
    drop(fx);
}

#[test]
fn dump_round_trip_files_and_private_memfd() {
    round_trip(&["file", "memfd_private", "uffd_wp"]);
}

#[test]
fn dump_tree_stores_cow_shared_pages_once() {
    if !can_dump() {
        return;
    }
    let fx = fixture(&["fork_shared"]);
    let dir = Scratch::new("tree");
    let pid = fx.pid();
    let child = fx.truth().children[0];
    let report = dump_to(pid, &dir.path("img"), |o| {
        o.tree = true;
        o.leave_stopped = true;
    });
    let _resume = Resume(vec![pid, child]);
    assert!(
        report.pids.contains(&child),
        "children dumped: {:?}",
        report.pids
    );
    let image = Image::open(&dir.path("img")).unwrap();
    image.restore_to_dir(&dir.path("restored")).unwrap();
    let r = fx.truth().region("fork_shared").unwrap();
    let len = (r.pages * caps().page_size.get()) as usize;
    for p in [pid, child] {
        assert_eq!(
            live(p, r.start, len),
            restored(&dir.path("restored"), p, r.start, len),
            "process {p}"
        );
    }
    let stored = kind_pages(&image, pid, r.start, 16, PageKind::Data)
        + kind_pages(&image, child, r.start, 16, PageKind::Data);
    let dedup = kind_pages(&image, pid, r.start, 16, PageKind::Dedup)
        + kind_pages(&image, child, r.start, 16, PageKind::Dedup);
    assert_eq!((stored, dedup), (16, 16), "COW-shared pages stored once");
}

/// A target that writes between generations: the fixture's `write`
/// command.
fn chain(keep_tracking: bool) {
    if !can_dump() {
        return;
    }
    let mut fx = fixture(&["anon", "memfd"]);
    let pid = fx.pid();
    let dir = Scratch::new(if keep_tracking { "chain-kept" } else { "chain" });
    let present = fx.truth().region("anon_present").unwrap().clone();
    let g0 = dump_to(pid, &dir.path("g0"), |o| o.keep_tracking = keep_tracking);
    assert_eq!(g0.kept_tracking.is_some(), keep_tracking, "{:?}", g0.notes);
    fx.command("write anon_present 2 3").unwrap();
    let g1 = dump_to(pid, &dir.path("g1"), |o| {
        o.parent = Some(dir.path("g0"));
        o.keep_tracking = keep_tracking;
    });
    assert!(
        g1.stored_pages >= 3 && g1.stored_pages < 64,
        "g1 stored {} pages",
        g1.stored_pages
    );
    fx.command("write anon_present 9 1").unwrap();
    let g2 = dump_to(pid, &dir.path("g2"), |o| {
        o.parent = Some(dir.path("g1"));
        o.leave_stopped = true;
    });
    let _resume = Resume(vec![pid]);
    assert_eq!(g2.generation, 2);
    let image = Image::open(&dir.path("g2")).unwrap();
    let v = pagescope::dump::verify(&Target::open(pid).unwrap(), caps(), &image).unwrap();
    assert!(
        v.matches(),
        "{v:?}\n{}",
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
    );
    assert_eq!(
        kind_pages(&image, pid, present.start, 16, PageKind::Data),
        1
    );
    assert!(kind_pages(&image, pid, present.start, 16, PageKind::InParent) >= 14);
    let uffds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            std::fs::read_link(e.as_ref().unwrap().path())
                .is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
        })
        .count();
    assert_eq!(
        uffds, 0,
        "the last dump did not keep tracking: nothing left in the process"
    );
}

#[test]
fn three_generations_verify_with_kept_tracking() {
    chain(true);
}

#[test]
fn three_generations_verify_by_comparing_pages() {
    chain(false);
}

/// A small full image and its child, for corruption tests.
fn small_chain(dir: &Scratch) -> Option<FixtureProcess> {
    if !can_dump() {
        return None;
    }
    let mut fx = fixture(&["anon"]);
    dump_to(fx.pid(), &dir.path("g0"), |_| {});
    fx.command("write anon_present 0 2").unwrap();
    dump_to(fx.pid(), &dir.path("g1"), |o| {
        o.parent = Some(dir.path("g0"))
    });
    Some(fx)
}

/// Opening and restoring must fail, naming `file`, and leave nothing.
fn rejected(img: &Path, file: &Path, dir: &Scratch) {
    let out = dir.path("restore-out");
    let err = Image::open(img)
        .and_then(|i| i.restore_to_dir(&out))
        .expect_err("corrupt image accepted");
    let msg = format!("{err}");
    assert!(
        msg.contains(&file.file_name().unwrap().to_string_lossy().to_string()),
        "error {msg:?} does not name {}",
        file.display()
    );
    assert!(!out.exists(), "a rejected image was half-applied");
    assert_eq!(err.kind(), pagescope::ErrorKind::BadImage, "{msg}");
}

fn files_of(img: &Path) -> Vec<PathBuf> {
    let mut out = vec![img.join("HEADER"), img.join("meta.json")];
    for e in std::fs::read_dir(img.join("data")).unwrap() {
        out.push(e.unwrap().path());
    }
    out
}

#[test]
fn truncated_files_are_rejected() {
    let dir = Scratch::new("truncate");
    let Some(_fx) = small_chain(&dir) else {
        return;
    };
    for f in files_of(&dir.path("g1")) {
        let bytes = std::fs::read(&f).unwrap();
        let stored_pages =
            f.extension().is_some_and(|e| e == "pages") && bytes.iter().any(|&b| b != 0);
        if f.extension().is_some_and(|e| e == "pages") && !stored_pages {
            continue;
        }
        // Cut inside the last non-zero byte's page for data, in half otherwise.
        let cut = if stored_pages {
            bytes.iter().rposition(|&b| b != 0).unwrap()
        } else {
            bytes.len() / 2
        };
        std::fs::write(&f, &bytes[..cut]).unwrap();
        rejected(&dir.path("g1"), &f, &dir);
        std::fs::write(&f, &bytes).unwrap();
    }
    Image::open(&dir.path("g1")).unwrap().verify_data().unwrap();
}

#[test]
fn flipped_bits_are_rejected() {
    let dir = Scratch::new("flip");
    let Some(_fx) = small_chain(&dir) else {
        return;
    };
    for f in files_of(&dir.path("g1"))
        .into_iter()
        .chain(files_of(&dir.path("g0")))
    {
        let bytes = std::fs::read(&f).unwrap();
        // Where a flip matters: every byte of metadata, the stored pages of
        // data files (the rest is a hole nobody reads).
        let offsets: Vec<usize> = if f.extension().is_some_and(|e| e == "pages") {
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b != 0)
                .map(|(i, _)| i)
                .step_by(97)
                .collect()
        } else {
            (0..bytes.len()).step_by(bytes.len() / 40 + 1).collect()
        };
        for at in offsets {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            std::fs::write(&f, &b).unwrap();
            rejected(&dir.path("g1"), &f, &dir);
        }
        std::fs::write(&f, &bytes).unwrap();
    }
}

#[test]
fn wrong_or_missing_parents_and_foreign_data_files_are_rejected() {
    let dir = Scratch::new("parents");
    let Some(fx) = small_chain(&dir) else {
        return;
    };
    // Another full image of the same process: same store names.
    dump_to(fx.pid(), &dir.path("other"), |_| {});
    std::fs::rename(dir.path("g0"), dir.path("g0.away")).unwrap();
    let err = Image::open(&dir.path("g1")).unwrap_err();
    assert!(matches!(err, ImageError::ParentMissing { .. }), "{err}");
    assert_eq!(err.kind(), pagescope::ErrorKind::BadImage);
    copy_dir(&dir.path("other"), &dir.path("g0"));
    let err = Image::open(&dir.path("g1")).unwrap_err();
    assert!(matches!(err, ImageError::ParentMismatch { .. }), "{err}");
    std::fs::remove_dir_all(dir.path("g0")).unwrap();
    std::fs::rename(dir.path("g0.away"), dir.path("g0")).unwrap();
    Image::open(&dir.path("g1")).unwrap();
    // A data file (pages and sums) from the other image.
    let data = std::fs::read_dir(dir.path("g0").join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "pages")
                && dir.path("other/data").join(p.file_name().unwrap()).exists()
        })
        .expect("a store both images have");
    let name = data.file_name().unwrap().to_owned();
    let ours = std::fs::read(&data).unwrap();
    std::fs::copy(dir.path("other/data").join(&name), &data).unwrap();
    rejected(&dir.path("g1"), &data, &dir);
    std::fs::write(&data, ours).unwrap();
    let sums = data.with_extension("sums");
    std::fs::copy(
        dir.path("other/data").join(sums.file_name().unwrap()),
        &sums,
    )
    .unwrap();
    rejected(&dir.path("g1"), &sums, &dir);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("data")).unwrap();
    for f in ["HEADER", "meta.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    for e in std::fs::read_dir(from.join("data")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join("data").join(p.file_name().unwrap())).unwrap();
    }
}
