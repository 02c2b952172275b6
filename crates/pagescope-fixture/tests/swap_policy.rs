//! `dump --swap read|skip|keep-cold|direct` against the real kernel: the
//! fixture pages out 32 anonymous and 16 shmem (memfd) pages, pagescope
//! dumps it with each policy, and the target's pagemap, its memfd's page
//! states and the global `pswpin` counter before and after prove what each
//! policy claims. Names contain `swapdev`: `scripts/test` runs them on
//! zram and again on a swap file.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{caps, fixture, is_root, scan, skip};
use pagescope::dump::{DumpOptions, DumpReport, SwapPolicy, dump};
use pagescope::image::Image;
use pagescope::image::PageKind;
use pagescope::{BackendChoice, PageState, Target};
use pagescope_fixture::FixtureProcess;

/// A scratch directory on tmpfs (no block I/O that could keep a swap
/// file's disk busy), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/pagescope-swap-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `pswpin` is global: the tests run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn pswpin() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("pswpin ")?.trim().parse().ok())
        .unwrap()
}

/// Raw pagemap entries of `pid` at `addrs`.
fn entries(pid: u32, addrs: &[u64]) -> Vec<u64> {
    let f = File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let page = caps().page_size.get();
    addrs
        .iter()
        .map(|&a| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, a / page * 8).unwrap();
            u64::from_ne_bytes(b)
        })
        .collect()
}

const PRESENT: u64 = 1 << 63;
const SWAP: u64 = 1 << 62;

/// The 32 anonymous pages the test pages out.
fn anon_pages(fx: &FixtureProcess) -> Vec<u64> {
    let page = caps().page_size.get();
    ["anon_present", "anon_swapped"]
        .iter()
        .flat_map(|r| {
            let r = fx.truth().region(r).unwrap();
            (0..16).map(move |i| r.start + i * page)
        })
        .collect()
}

/// pagescope's state of pages 0..24 of the memfd region (0..16 paged
/// out, 16..24 resident but unmapped; a scan never changes them:
/// `no_disturb.rs`).
fn memfd_states(fx: &FixtureProcess) -> Vec<PageState> {
    let page = caps().page_size.get();
    let r = fx.truth().region("memfd").unwrap();
    let report = scan(fx.pid(), BackendChoice::Auto);
    (0..24)
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

fn out_of_ram(s: PageState) -> bool {
    matches!(s, PageState::Swapped | PageState::SwapCache)
}

/// The fixture with 32 anonymous and 16 memfd pages paged out.
fn paged_out_fixture() -> Option<FixtureProcess> {
    if !is_root() {
        skip("swap policies need root (swap entries in pagemap, ptrace, process_madvise)");
        return None;
    }
    let mut fx = fixture(&["anon", "memfd"]);
    if fx.truth().swap == "none" {
        skip("no active swap device");
        return None;
    }
    for cmd in [
        "pageout anon_present 0 16",
        "pageout anon_swapped 0 16",
        "pageout memfd 0 8",
    ] {
        fx.command(cmd).unwrap();
    }
    Some(fx)
}

fn dump_with(fx: &FixtureProcess, dir: &Path, policy: SwapPolicy) -> DumpReport {
    let mut opts = DumpOptions::new(dir);
    opts.max_iterations = 1;
    opts.swap = policy;
    let target = Target::open(fx.pid()).unwrap();
    dump(&target, caps(), &opts, &mut |_| {}).expect("dump")
}

/// What one policy run saw.
struct Run {
    fx: FixtureProcess,
    report: DumpReport,
    anon_before: Vec<u64>,
    anon_after: Vec<u64>,
    shm_before: Vec<PageState>,
    shm_after: Vec<PageState>,
    swapins: u64,
    dir: Scratch,
}

fn run(policy: SwapPolicy) -> Option<Run> {
    let fx = paged_out_fixture()?;
    let dir = Scratch::new(policy.name());
    let anon = anon_pages(&fx);
    let anon_before = entries(fx.pid(), &anon);
    let shm_before = memfd_states(&fx);
    assert!(
        anon_before
            .iter()
            .all(|e| e & SWAP != 0 && e & PRESENT == 0),
        "the fixture's pageout left anonymous pages in RAM: {anon_before:x?}"
    );
    assert!(
        shm_before[..16].iter().all(|s| out_of_ram(*s)),
        "the fixture's pageout left memfd pages in RAM: {shm_before:?}"
    );
    let in0 = pswpin();
    let report = dump_with(&fx, &dir.0.join("img"), policy);
    let swapins = pswpin() - in0;
    let anon_after = entries(fx.pid(), &anon);
    let shm_after = memfd_states(&fx);
    Some(Run {
        fx,
        report,
        anon_before,
        anon_after,
        shm_before,
        shm_after,
        swapins,
        dir,
    })
}

/// Restores the image and compares the 32 anonymous pages and the memfd
/// region with the live memory (read last: it swaps pages in).
fn assert_content(r: &Run) {
    let img = Image::open(&r.dir.0.join("img")).unwrap();
    let out = r.dir.0.join("restored");
    img.restore_to_dir(&out).unwrap();
    let page = caps().page_size.get();
    let pid = r.fx.pid();
    for name in ["anon_present", "anon_swapped", "memfd"] {
        let reg = r.fx.truth().region(name).unwrap();
        let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
        for i in 0..16 {
            let a = reg.start + i * page;
            let mut want = vec![0u8; page as usize];
            mem.read_exact_at(&mut want, a).unwrap();
            let got = restored_page(&out, &img, pid, a, page);
            assert!(want == got, "{name} page {i}: restored bytes differ");
        }
    }
}

/// The restored bytes of page `a` of `pid`: its mapping's file, or for a
/// shared mapping its object's file.
fn restored_page(out: &Path, img: &Image, pid: u32, a: u64, page: u64) -> Vec<u8> {
    let v = img
        .process(pid)
        .unwrap()
        .vmas
        .iter()
        .find(|v| v.start <= a && a < v.end)
        .unwrap()
        .clone();
    let (file, off) = match v.object.filter(|_| v.perms.ends_with('s')) {
        Some(ix) => {
            let o = &img.meta().objects[ix];
            (
                out.join(format!(
                    "object-{}-{}.mem",
                    o.dev.replace(':', "_"),
                    o.inode
                )),
                v.offset + (a - v.start),
            )
        }
        None => (
            out.join(format!("pid-{pid}-{:x}-{:x}.mem", v.start, v.end)),
            a - v.start,
        ),
    };
    let mut buf = vec![0u8; page as usize];
    File::open(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

/// The memfd pages paged back out match the report: those it counts as
/// out are swapped, those in the swap cache or still resident are counted
/// as still in RAM; on zram (synchronous: nothing lingers in the swap
/// cache) every page must be out.
fn assert_shmem_report_matches(r: &Run, policy: &str) {
    let s = &r.report.swap.shmem;
    let swapped = r.shm_after[..16]
        .iter()
        .filter(|st| **st == PageState::Swapped)
        .count() as u64;
    let in_ram = 16 - swapped;
    assert_eq!(
        (s.paged_out, s.still_in_ram),
        (swapped, in_ram),
        "{policy}: report {s:?} does not match a re-scan {:?}",
        r.shm_after
    );
    if r.fx.truth().swap == "zram" {
        assert!(
            r.shm_after[..16].iter().all(|st| out_of_ram(*st)),
            "{policy}: memfd pages left in RAM on zram: {:?}; {:?}",
            r.shm_after,
            r.report.swap
        );
    }
}

#[test]
fn read_policy_swaps_in_and_copies_swapdev() {
    let _serial = serial();
    let Some(r) = run(SwapPolicy::Read) else {
        return;
    };
    assert!(
        r.anon_after.iter().all(|e| e & PRESENT != 0),
        "read: swapped anonymous pages must be swapped in: {:x?}",
        r.anon_after
    );
    assert!(
        r.shm_after[..16].iter().all(|s| !out_of_ram(*s)),
        "read: memfd pages must be in RAM: {:?}",
        r.shm_after
    );
    assert_content(&r);
}

#[test]
fn skip_policy_reads_nothing_swapped_swapdev() {
    let _serial = serial();
    let Some(r) = run(SwapPolicy::Skip) else {
        return;
    };
    assert_eq!(r.anon_after, r.anon_before, "skip: the page table changed");
    let before_swapped: Vec<bool> = r
        .shm_before
        .iter()
        .map(|s| *s == PageState::Swapped)
        .collect();
    for (i, (b, a)) in r.shm_before.iter().zip(&r.shm_after).enumerate() {
        if *b == PageState::Swapped {
            assert_eq!(
                *a,
                PageState::Swapped,
                "skip: memfd page {i} was swapped in"
            );
        }
    }
    assert!(r.report.swap.anon.skipped >= 32, "{:?}", r.report.swap);
    assert_eq!(
        r.report.swap.shmem.skipped,
        before_swapped.iter().filter(|s| **s).count() as u64,
        "{:?}",
        r.report.swap
    );
    assert!(
        r.swapins < 16,
        "skip: {} swap-ins during the dump",
        r.swapins
    );
    let img = Image::open(&r.dir.0.join("img")).unwrap();
    assert!(
        !img.meta().swap_devices.is_empty(),
        "skip: swap devices not recorded"
    );
    let page = caps().page_size.get();
    for a in anon_pages(&r.fx) {
        let v = img
            .process(r.fx.pid())
            .unwrap()
            .vmas
            .iter()
            .find(|v| v.start <= a && a < v.end)
            .unwrap();
        let i = (a - v.start) / page;
        let run = v
            .runs
            .iter()
            .find(|x| x.first <= i && i < x.first + x.count)
            .unwrap();
        assert_eq!(run.kind, PageKind::Swapped, "page {a:#x}");
    }
}

#[test]
fn direct_policy_swaps_nothing_in_swapdev() {
    let _serial = serial();
    let Some(r) = run(SwapPolicy::Direct) else {
        return;
    };
    let s = &r.report.swap.anon;
    assert!(s.swapped >= 32, "{:?}", r.report.swap);
    assert_eq!(
        s.direct + s.direct_fallback,
        s.swapped,
        "{:?}",
        r.report.swap
    );
    assert!(
        s.direct >= 32 - s.direct_fallback && s.direct > 0,
        "{:?}",
        r.report.swap
    );
    let changed = r
        .anon_before
        .iter()
        .zip(&r.anon_after)
        .filter(|(b, a)| b != a)
        .count() as u64;
    assert!(
        changed <= s.direct_fallback,
        "direct: {changed} anonymous page-table entries changed, {} fallbacks",
        s.direct_fallback
    );
    assert!(
        r.swapins <= s.direct_fallback + r.report.swap.shmem.read + 8,
        "direct: {} swap-ins",
        r.swapins
    );
    // shmem has no visible swap offset: read, then paged back out.
    assert_shmem_report_matches(&r, "direct");
    assert_content(&r);
}

#[test]
fn keep_cold_policy_pages_exactly_the_swapped_pages_back_out_swapdev() {
    let _serial = serial();
    let Some(r) = run(SwapPolicy::KeepCold) else {
        return;
    };
    let s = &r.report.swap;
    assert!(
        s.anon.swapped >= 32 && s.anon.read == s.anon.swapped,
        "{s:?}"
    );
    assert!(
        r.anon_after
            .iter()
            .all(|e| e & PRESENT == 0 && e & SWAP != 0),
        "keep-cold: anonymous pages left in RAM: {:x?}",
        r.anon_after
    );
    assert_eq!(s.anon.paged_out, s.anon.read, "{s:?}");
    assert_eq!(s.shmem.swapped, 16, "{s:?}");
    assert_eq!(s.shmem.paged_out + s.shmem.still_in_ram, 16, "{s:?}");
    assert_shmem_report_matches(&r, "keep-cold");
    // Exactly those: the memfd's resident pages stay resident.
    assert_eq!(
        r.shm_after[16..],
        r.shm_before[16..],
        "keep-cold paged out memfd pages that were not swapped"
    );
    assert_content(&r);
}

/// `verify` never swaps anything in: after `--swap keep-cold`, the
/// swapped anonymous pages are compared from the swap device (root) and
/// the swapped memfd pages (no swap slot exposed) are counted as not
/// compared; `pswpin`, the target's page table and the memfd's page
/// states stay as they were.
#[test]
fn verify_after_keep_cold_swaps_nothing_in_swapdev() {
    let _serial = serial();
    let Some(r) = run(SwapPolicy::KeepCold) else {
        return;
    };
    let image = Image::open(&r.dir.0.join("img")).unwrap();
    let anon_before = entries(r.fx.pid(), &anon_pages(&r.fx));
    let shm_before = memfd_states(&r.fx);
    let swapped_anon = anon_before
        .iter()
        .filter(|e| *e & SWAP != 0 && *e & PRESENT == 0)
        .count() as u64;
    let swapped_shm = shm_before
        .iter()
        .filter(|s| **s == PageState::Swapped)
        .count() as u64;
    assert!(
        swapped_anon + swapped_shm >= 16,
        "keep-cold left too little swapped to test: {anon_before:x?} {shm_before:?}"
    );
    let target = Target::open(r.fx.pid()).unwrap();
    let in0 = pswpin();
    let v = pagescope::dump::verify(&target, caps(), &image).expect("verify");
    assert_eq!(pswpin() - in0, 0, "verify swapped pages in: {v:?}");
    assert_eq!(
        entries(r.fx.pid(), &anon_pages(&r.fx)),
        anon_before,
        "the page table changed"
    );
    let shm_after = memfd_states(&r.fx);
    for (i, (b, a)) in shm_before.iter().zip(&shm_after).enumerate() {
        if *b == PageState::Swapped {
            assert_eq!(*a, PageState::Swapped, "memfd page {i} was swapped in");
        }
    }
    assert!(v.matches(), "{v:#?}");
    let not_compared = |prefix: &str| -> u64 {
        v.not_compared
            .iter()
            .filter(|n| n.reason.starts_with(prefix))
            .map(|n| n.pages)
            .sum()
    };
    assert_eq!(not_compared("swapped out (shmem)"), swapped_shm, "{v:#?}");
    // Anonymous ones come from the swap device (not compared only when
    // the device could not be read).
    assert!(not_compared("swapped out,") < swapped_anon.max(1), "{v:#?}");
}
