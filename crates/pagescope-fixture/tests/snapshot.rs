//! `dump --snapshot cow` against the real kernel: four threads of the
//! fixture keep writing while the snapshot is copied, in a pattern that
//! makes any point-in-time copy self-checking (`cowwriters`: each thread's
//! control page says how far it had got, and every data page must hold
//! exactly what the thread had written there by then). The target must
//! have waited for some pages to be copied (the copy really raced the
//! writers) and must not be write-protected afterwards.

mod common;

use std::path::PathBuf;

use common::{caps, fixture, is_root, skip};
use pagescope::Target;
use pagescope::dump::{DumpOptions, dump};
use pagescope::image::Image;
use pagescope::image::PageFill;

const THREADS: u64 = 4;
const PAGES: u64 = 16384;

fn u64_at(page: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(page[off..off + 8].try_into().unwrap())
}

/// What data page `j` (1..=d) of a thread must hold when its control page
/// says `k_done`: the last k <= k_done with 1 + k % d == j, else 0; or
/// k_done + 1 when the copy caught the thread between its two stores.
fn expected(j: u64, k_done: u64, d: u64) -> (u64, Option<u64>) {
    let r = (j - 1) % d; // k ≡ r (mod d)
    let last = if k_done >= r {
        k_done - (k_done - r) % d
    } else {
        0
    };
    let next = k_done + 1;
    let alt = (1 + next % d == j).then_some(next);
    (last, alt)
}

fn uw_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        .count()
}

#[test]
fn cow_snapshot_is_the_memory_of_one_moment_under_concurrent_writers() {
    if !is_root() {
        skip("the snapshot injects a userfaultfd and stops the target (root)");
        return;
    }
    let mut fx = fixture(&["anon"]);
    let addr = u64::from_str_radix(
        fx.command(&format!("mmap big {PAGES}"))
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let pid = fx.pid();
    let writers = std::thread::spawn(move || {
        let r = fx.command(&format!("cowwriters big {THREADS} 2500"));
        (fx, r)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dir = PathBuf::from(format!("/dev/shm/pagescope-cow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut opts = DumpOptions::new(&dir);
    opts.cow = true;
    let target = Target::open(pid).unwrap();
    let report = dump(&target, caps(), &opts, &mut |_| {}).expect("snapshot");
    let (fx, done) = writers.join().unwrap();
    let total: u64 = done.expect("the writers ran to the end").parse().unwrap();
    let stats = report.snapshot.clone().expect("snapshot statistics");
    assert!(stats.faults > 0, "no write waited for the copy: {stats:?}");
    assert_eq!(uw_mappings(pid), 0, "the process is still write-protected");

    let img = Image::open(&dir).unwrap();
    let page = caps().page_size.get();
    let v = img
        .process(pid)
        .unwrap()
        .vmas
        .iter()
        .find(|v| v.start <= addr && addr < v.end)
        .unwrap()
        .clone();
    let mut buf = vec![0u8; page as usize];
    let read = |i: u64, buf: &mut Vec<u8>| {
        let idx = (addr - v.start) / page + i;
        match img.vma_page(pid, v.start, idx, buf).unwrap() {
            PageFill::Data => {}
            PageFill::Zero | PageFill::Hole => buf.fill(0),
            PageFill::NotCopied => panic!("page {i} not copied"),
        }
    };
    let per = PAGES / THREADS;
    let d = per - 1;
    let mut seen = 0;
    for t in 0..THREADS {
        read(t * per, &mut buf);
        let k_done = u64_at(&buf, 8);
        assert!(k_done > 0, "thread {t} had not started at the snapshot");
        seen += k_done;
        for j in 1..per {
            read(t * per + j, &mut buf);
            let got = u64_at(&buf, 8);
            let (want, alt) = expected(j, k_done, d);
            assert!(
                got == want || Some(got) == alt,
                "thread {t} data page {j}: {got} in the snapshot, {want} expected at control {k_done}"
            );
        }
    }
    assert!(total > seen, "the writers did not go on after the snapshot");
    drop(fx);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_expected_pattern_is_right() {
    // d = 3: k=1 -> page 2, k=2 -> page 3, k=3 -> page 1, k=4 -> page 2.
    assert_eq!(expected(2, 4, 3), (4, None));
    assert_eq!(expected(1, 4, 3), (3, None));
    assert_eq!(expected(3, 4, 3), (2, Some(5)));
    assert_eq!(expected(1, 0, 3), (0, None));
    assert_eq!(expected(2, 0, 3), (0, Some(1)));
}
