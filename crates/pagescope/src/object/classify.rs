//! Classifying the pages of a shmem or regular-file object from the object
//! itself, without swapping in, faulting in or mapping anything (the
//! approach the kernel community pointed user space to when the pagemap
//! patches for shmem swap were rejected).
//!
//! Per chunk of up to 64K pages:
//!
//! 1. `mincore` on a never-touched read-only shared mapping → C: in the
//!    page cache or (shmem) the swap cache. Pages some process maps (the
//!    caller passes them as `known`) are in the page cache already and are
//!    not asked: mincore costs about 100 ns per page (an xarray lookup and
//!    a folio reference, or a swap-cache lookup), the bulk of the time.
//! 2. `lseek(SEEK_DATA/SEEK_HOLE)` → D: data (shmem: page cache *or* swap
//!    entry; file: allocated blocks), only over the pages not in core (an
//!    in-core page is data). Swaps nothing in. The walk holds the inode
//!    lock, so it is also the part that does not run in parallel.
//! 3. shmem: `D && !C` is swapped out. `cachestat` over a range gives
//!    `nr_cache` (page cache incl. fallocated-unwritten) and `nr_evicted`
//!    (every swap entry incl. swap-cache ones); with the known D/C counts
//!    that yields *how many* swap-cache and fallocated pages the range
//!    holds. Ranges that hold neither (the common case) are done with one
//!    call; the others are bisected down to the pages.
//!    file: `C` is resident, `D && !C` not resident, `!D && !C` a hole.
//!
//! This improves on the measured baseline algorithm by locating
//! fallocated pages (not only counting them) and by settling swap cache
//! and fallocation in one bisection.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use crate::addr::{PageSize, PageSpan};
use crate::rangeset::RangeSet;
use crate::sys;

/// The state of one page of an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectState {
    /// In the page cache.
    Resident,
    /// shmem: in the swap cache (RAM) and on a swap device.
    SwapCache,
    /// shmem: on a swap device only.
    Swapped,
    /// shmem: fallocated, never written.
    Fallocated,
    /// file: on disk, not in the page cache.
    NotResident,
    /// No data.
    Hole,
}

/// A run of object pages in one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectRun {
    /// First page (index in the object).
    pub first: u64,
    /// Number of pages.
    pub count: u64,
    /// State.
    pub state: ObjectState,
}

pub use crate::vma::ObjectClass;

/// Pages per classification chunk (bounds the mincore buffer).
const CHUNK_PAGES: u64 = 64 * 1024;

/// What a classification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classified {
    /// The pages, in runs of equal state.
    pub runs: Vec<ObjectRun>,
    /// Whether swap-cache and fallocated pages were told apart (`false`
    /// without `cachestat`: they read as resident and hole).
    pub precise: bool,
}

/// Classifies the pages `span` of the object behind `fd`.
///
/// `size_pages` is the object's size; pages beyond it are holes. `known`
/// holds object pages known to be in the page cache because a process
/// maps them (present in its page table, not a private copy); they are
/// reported resident without being examined. Chunks of the span run on
/// worker threads (`crate::parallel`).
pub fn classify(
    fd: BorrowedFd<'_>,
    class: ObjectClass,
    size_pages: u64,
    span: PageSpan,
    page: PageSize,
    known: &RangeSet<PageSpan>,
) -> Result<Classified, Errno> {
    let chunks: Vec<PageSpan> = (span.start()..span.end())
        .step_by(usize::try_from(CHUNK_PAGES).unwrap_or(usize::MAX))
        .map(|lo| PageSpan::new(lo, (lo + CHUNK_PAGES).min(span.end())).unwrap_or_default())
        .collect();
    let results = crate::parallel::run(
        chunks.len(),
        crate::parallel::workers(0, chunks.len()),
        || (),
        |(), i| {
            let mut precise = true;
            let chunk = Chunk {
                span: chunks[i],
                known: known_parts(known, chunks[i]),
            };
            classify_chunk(fd, class, size_pages, &chunk, page.get(), &mut precise)
                .map(|s| (s, precise))
        },
        |_| true,
    );
    let mut out = Classified {
        runs: Vec::new(),
        precise: true,
    };
    for (c, r) in chunks.iter().zip(results) {
        let (states, p) = r.unwrap_or(Err(Errno::INTR))?;
        out.precise &= p;
        push_states(&mut out.runs, c.start(), &states);
    }
    Ok(out)
}

fn push_states(out: &mut Vec<ObjectRun>, first: u64, states: &[ObjectState]) {
    for (i, &state) in states.iter().enumerate() {
        let p = first + i as u64;
        match out.last_mut() {
            Some(r) if r.state == state && r.first + r.count == p => r.count += 1,
            _ => out.push(ObjectRun {
                first: p,
                count: 1,
                state,
            }),
        }
    }
}

/// Object pages of one chunk, with the parts known resident as index
/// ranges relative to its start.
struct Chunk {
    span: PageSpan,
    known: Vec<std::ops::Range<usize>>,
}

/// The parts of `known` inside `chunk`, relative to its start.
fn known_parts(known: &RangeSet<PageSpan>, chunk: PageSpan) -> Vec<std::ops::Range<usize>> {
    let at = |p: u64| usize::try_from(p - chunk.start()).unwrap_or(usize::MAX);
    known
        .intersect(chunk)
        .into_iter()
        .map(|s| at(s.start())..at(s.end()))
        .collect()
}

/// The complement of sorted `parts` within `0..n`.
fn gaps(parts: &[std::ops::Range<usize>], n: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    for p in parts {
        let start = p.start.min(n);
        if start > at {
            out.push(at..start);
        }
        at = at.max(p.end);
    }
    if at < n {
        out.push(at..n);
    }
    out
}

/// In-core pages separating two stretches of not-in-core pages that are
/// walked with one SEEK_DATA/SEEK_HOLE pass anyway (a pass per stretch
/// costs a few syscalls; walking a short in-core gap costs less).
const SEEK_MERGE_GAP: usize = 256;

/// The stretches of pages not in core, merged over short in-core gaps.
fn not_incore_runs(incore: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut i = 0;
    while i < incore.len() {
        if incore[i] & 1 != 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < incore.len() && incore[i] & 1 == 0 {
            i += 1;
        }
        match out.last_mut() {
            Some(last) if start - last.end <= SEEK_MERGE_GAP => last.end = i,
            _ => out.push(start..i),
        }
    }
    out
}

fn classify_chunk(
    fd: BorrowedFd<'_>,
    class: ObjectClass,
    size_pages: u64,
    chunk: &Chunk,
    page: u64,
    precise: &mut bool,
) -> Result<Vec<ObjectState>, Errno> {
    let lo = chunk.span.start();
    let n = usize::try_from(chunk.span.count()).unwrap_or(usize::MAX);
    let inside = size_pages.clamp(lo, chunk.span.end()) - lo;
    let mut states = vec![ObjectState::Hole; n];
    if inside == 0 {
        return Ok(states);
    }
    let m = inside as usize;
    let mut incore = vec![0u8; m];
    for k in &chunk.known {
        incore[k.start.min(m)..k.end.min(m)].fill(1);
    }
    let unknown = gaps(&chunk.known, m);
    sys::mincore::mincore_file_parts(fd, lo * page, page, &mut incore, &unknown)?;
    // An in-core page is data; SEEK only where pages are not in core.
    let mut data = vec![true; m];
    for r in not_incore_runs(&incore) {
        let d = data_map(fd, lo + r.start as u64, r.len() as u64, page)?;
        data[r].copy_from_slice(&d);
    }
    let c = |i: usize| incore[i] & 1 != 0;
    for i in 0..m {
        states[i] = match (class, data[i], c(i)) {
            (ObjectClass::File, true, false) => ObjectState::NotResident,
            (ObjectClass::Shmem, true, false) => ObjectState::Swapped,
            (_, _, true) => ObjectState::Resident,
            (_, false, false) => ObjectState::Hole,
        };
    }
    if class == ObjectClass::Shmem {
        let mut split = Splitter {
            fd,
            page,
            data: &data,
            incore: &incore,
            states: &mut states[..m],
            base: lo,
        };
        if split.refine_runs(m).is_err() {
            *precise = false;
        }
    }
    Ok(states)
}

/// D for pages `lo..lo+n`: whether `SEEK_DATA` counts each as data.
fn data_map(fd: BorrowedFd<'_>, lo: u64, n: u64, page: u64) -> Result<Vec<bool>, Errno> {
    let mut data = vec![false; n as usize];
    let page = PageSize::new(page).ok_or(Errno::INVAL)?;
    let extents = super::extents::data_extents(fd, PageSpan::from_start_count(lo, n), page)?;
    for e in extents.ranges() {
        let (a, b) = ((e.start() - lo) as usize, (e.end() - lo) as usize);
        data[a..b.min(n as usize)]
            .iter_mut()
            .for_each(|x| *x = true);
    }
    Ok(data)
}

/// Locates swap-cache and fallocated pages of a shmem chunk with
/// `cachestat`, bisecting only ranges that hold some.
struct Splitter<'a, 'b> {
    fd: BorrowedFd<'a>,
    page: u64,
    data: &'b [bool],
    incore: &'b [u8],
    states: &'b mut [ObjectState],
    base: u64,
}

impl Splitter<'_, '_> {
    /// Refines each maximal run of in-core data pages (resident or swap
    /// cache?) and of hole pages (hole or fallocated?). Runs of swapped-out
    /// pages are skipped: they are settled already, and `cachestat` over
    /// swap entries is the expensive part (a shadow lookup per entry).
    fn refine_runs(&mut self, m: usize) -> Result<(), Errno> {
        let kind = |i: usize| match (self.data[i], self.incore[i] & 1 != 0) {
            (true, false) => 0u8,
            (false, false) => 1,
            (_, true) => 2,
        };
        let mut i = 0;
        while i < m {
            let k = kind(i);
            let mut j = i + 1;
            while j < m && kind(j) == k {
                j += 1;
            }
            if k != 0 {
                self.refine(i, j)?;
            }
            i = j;
        }
        Ok(())
    }

    fn refine(&mut self, lo: usize, hi: usize) -> Result<(), Errno> {
        let (a, s, h) = self.counts(lo, hi);
        if a == 0 && h == 0 {
            return Ok(()); // all swapped out: nothing to split
        }
        let off = (self.base + lo as u64) * self.page;
        let cs = sys::cachestat::cachestat(self.fd, off, (hi - lo) as u64 * self.page)?;
        let swapcache = cs.nr_evicted.saturating_sub(s).min(a);
        let resident = a - swapcache;
        let fallocated = cs.nr_cache.saturating_sub(resident).min(h);
        if hi - lo == 1 {
            self.settle_page(lo, swapcache > 0, fallocated > 0);
            return Ok(());
        }
        if swapcache == 0 && fallocated == 0 {
            return Ok(());
        }
        if swapcache == a && fallocated == h {
            (lo..hi).for_each(|i| self.settle_page(i, true, true));
            return Ok(());
        }
        let mid = lo + (hi - lo) / 2;
        self.refine(lo, mid)?;
        self.refine(mid, hi)
    }

    /// (data in core, data not in core, not data) page counts.
    fn counts(&self, lo: usize, hi: usize) -> (u64, u64, u64) {
        let (mut a, mut s, mut h) = (0, 0, 0);
        for i in lo..hi {
            match (self.data[i], self.incore[i] & 1 != 0) {
                (_, true) => a += 1,
                (true, false) => s += 1,
                (false, false) => h += 1,
            }
        }
        (a, s, h)
    }

    fn settle_page(&mut self, i: usize, swapcache: bool, fallocated: bool) {
        let st = &mut self.states[i];
        match (self.data[i], self.incore[i] & 1 != 0) {
            (true, true) if swapcache => *st = ObjectState::SwapCache,
            (false, false) if fallocated => *st = ObjectState::Fallocated,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_parts_are_clipped_to_the_chunk() {
        let s = |a, n| PageSpan::from_start_count(a, n);
        let known: RangeSet<PageSpan> = [s(0, 10), s(20, 10), s(95, 10), s(200, 5)]
            .into_iter()
            .collect();
        let span = |a, b| PageSpan::new(a, b).unwrap();
        assert_eq!(
            known_parts(&known, span(5, 100)),
            vec![0..5, 15..25, 90..95]
        );
        assert_eq!(known_parts(&known, span(100, 200)), vec![0..5]);
        assert!(known_parts(&known, span(30, 95)).is_empty());
    }

    #[test]
    fn gaps_complement_the_parts() {
        assert_eq!(gaps(&[2..4, 6..8], 10), vec![0..2, 4..6, 8..10]);
        let all = 0..10;
        assert!(gaps(std::slice::from_ref(&all), 10).is_empty());
        assert_eq!(gaps(&[], 3), vec![0..3]);
    }

    #[test]
    fn not_incore_runs_merge_over_short_gaps() {
        let mut incore = vec![0u8; 1000];
        incore[10..20].fill(1);
        incore[500..900].fill(1);
        assert_eq!(not_incore_runs(&incore), vec![0..500, 900..1000]);
        assert!(not_incore_runs(&[1, 1, 1]).is_empty());
    }
}
