//! Baselines: the bare kernel interfaces, with no processing beyond what a
//! loop needs to make progress.

#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use pagescope::VirtRange;
use pagescope::raw::ScanCategories as C;
use pagescope::raw::pagemap::pread_u64s;
use pagescope::raw::pagemap_scan::{RegionBuf, ScanRequest, pagemap_scan};

/// PAGEMAP_SCAN over `ranges` with the categories pagescope asks for;
/// returns the number of regions.
pub fn pagemap_scan_loop(fd: BorrowedFd<'_>, ranges: &[VirtRange], vec: &mut RegionBuf) -> u64 {
    let anyof = C::PRESENT | C::SWAPPED | C::GUARD;
    let ret = anyof | C::PFNZERO | C::HUGE | C::WRITTEN;
    let mut regions = 0;
    for r in ranges {
        let mut start = r.start();
        while start < r.end() {
            let Some(rest) = VirtRange::new(start, r.end()) else {
                break;
            };
            let req = ScanRequest::new(rest).any_of(anyof).returning(ret);
            let Ok(reply) = pagemap_scan(fd, &req, Some(&mut *vec)) else {
                break;
            };
            regions += reply.filled as u64;
            if reply.walk_end <= start {
                break;
            }
            start = reply.walk_end;
        }
    }
    regions
}

/// `ranges` cut into pieces of at most 1 GiB (as the library cuts them
/// for its workers).
pub fn gib_pieces(ranges: &[VirtRange]) -> Vec<VirtRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut start = r.start();
        while start < r.end() {
            let end = start
                .saturating_add(1 << 30)
                .align_down(1 << 30)
                .min(r.end());
            let end = if end <= start { r.end() } else { end };
            out.extend(VirtRange::new(start, end));
            start = end;
        }
    }
    out
}

/// Runs `f` over `pieces` on `threads` threads, each piece once, each
/// thread with its own state from `init`.
pub fn on_threads<S>(
    threads: usize,
    pieces: &[VirtRange],
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &VirtRange) + Sync,
) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut state = init();
                while let Some(p) =
                    pieces.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    f(&mut state, p);
                }
            });
        }
    });
}

/// pagemap `pread` of 64K entries at a time over `ranges`; returns the
/// number of present entries (so the reads cannot be optimised away).
pub fn pread_loop(fd: BorrowedFd<'_>, ranges: &[VirtRange], buf: &mut [u64]) -> u64 {
    let mut present = 0;
    for r in ranges {
        let mut page = r.start().get() / 4096;
        let end = r.end().get() / 4096;
        while page < end {
            let n = ((end - page) as usize).min(buf.len());
            let Ok(got) = pread_u64s(fd, &mut buf[..n], page) else {
                break;
            };
            present += buf[..got].iter().filter(|&&e| e >> 63 != 0).count() as u64;
            page += n as u64;
        }
    }
    present
}

/// The procfs crate's pagemap API over `ranges`; returns present pages.
pub fn procfs_loop(pid: u32, ranges: &[VirtRange]) -> anyhow::Result<u64> {
    let p = procfs::process::Process::new(i32::try_from(pid)?)?;
    let mut pm = p.pagemap()?;
    let mut present = 0;
    for r in ranges {
        let info =
            pm.get_range_info((r.start().get() / 4096) as usize..(r.end().get() / 4096) as usize)?;
        present += info
            .iter()
            .filter(|i| matches!(i, procfs::process::PageInfo::MemoryPage(f) if f.contains(procfs::process::MemoryPageFlags::PRESENT)))
            .count() as u64;
    }
    Ok(present)
}

/// Object classes of the bare algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Bare {
    Hole,
    Resident,
    SwapCache,
    Swapped,
}

/// The measured baseline algorithm for shmem objects (kernel-interfaces.md
/// §12, as in probe p05), with no library around it: SEEK_DATA/SEEK_HOLE,
/// one mincore over the whole object, cachestat bisection per 512 pages,
/// then a fallocated-count pass. Returns counts per class.
pub fn bare_shmem_classify(fd: BorrowedFd<'_>, pages: u64) -> anyhow::Result<[u64; 5]> {
    use pagescope::raw::cachestat::cachestat;
    use rustix::fs::SeekFrom;
    let page = 4096u64;
    let mut cls = vec![Bare::Hole; pages as usize];
    let mut pos = 0;
    while pos < pages * page {
        let Ok(d) = rustix::fs::seek(fd, SeekFrom::Data(pos)) else {
            break;
        };
        let h = rustix::fs::seek(fd, SeekFrom::Hole(d)).unwrap_or(pages * page);
        for p in d / page..h.div_ceil(page).min(pages) {
            cls[p as usize] = Bare::Resident;
        }
        pos = h;
    }
    let mut vec = vec![0u8; pages as usize];
    pagescope::raw::mincore::mincore_file(fd, 0, page, &mut vec)?;
    for (c, v) in cls.iter_mut().zip(&vec) {
        if *c == Bare::Resident && v & 1 == 0 {
            *c = Bare::Swapped;
        }
    }
    fn bisect(fd: BorrowedFd<'_>, cls: &mut [Bare], lo: usize, hi: usize) -> anyhow::Result<()> {
        let known = cls[lo..hi].iter().filter(|c| **c == Bare::Swapped).count() as u64;
        let ev =
            pagescope::raw::cachestat::cachestat(fd, lo as u64 * 4096, (hi - lo) as u64 * 4096)?
                .nr_evicted;
        if ev == known {
            return Ok(());
        }
        if hi - lo == 1 {
            cls[lo] = Bare::SwapCache;
            return Ok(());
        }
        let mid = lo + (hi - lo) / 2;
        bisect(fd, cls, lo, mid)?;
        bisect(fd, cls, mid, hi)
    }
    for c in (0..pages as usize).step_by(512) {
        let e = (c + 512).min(pages as usize);
        if cls[c..e].contains(&Bare::Resident) {
            bisect(fd, &mut cls, c, e)?;
        }
    }
    let mut fallocated = 0;
    for c in (0..pages).step_by(512) {
        let e = (c + 512).min(pages);
        let cs = cachestat(fd, c * page, (e - c) * page)?;
        let resident = cls[c as usize..e as usize]
            .iter()
            .filter(|x| **x == Bare::Resident)
            .count() as u64;
        fallocated += cs.nr_cache.saturating_sub(resident);
    }
    let count = |b| cls.iter().filter(|c| **c == b).count() as u64;
    Ok([
        count(Bare::Hole) - fallocated,
        count(Bare::Resident),
        count(Bare::SwapCache),
        count(Bare::Swapped),
        fallocated,
    ])
}
