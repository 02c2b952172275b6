//! Paging out shmem pages that no process maps (resident but unmapped:
//! in the page cache only), through pagescope's own shared mapping of the
//! object, where each page is mapped once. `MADV_PAGEOUT` only reclaims
//! pages it finds in the caller's page tables, and skips pages mapped by
//! several processes: those are told apart by the exclusive bit of
//! `/proc/self/pagemap` (bit 56, "page exclusively mapped") over
//! pagescope's mapping, and not waited for.

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::addr::{PageSize, PageSpan};
use crate::object::classify::{ObjectClass, ObjectState, classify};
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::rangeset::RangeSet;
use crate::sys::mm::{Advice, OwnedMapping};

/// Pages paged out and confirmed gone, and pages still in RAM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Left RAM (on the swap device only).
    pub out: u64,
    /// Still there (in the page cache, or in the swap cache while an
    /// asynchronous device writes them).
    pub still: u64,
    /// Of `still`: in the swap cache.
    pub swap_cache: u64,
    /// Of `still`: in the page cache and mapped by another process too
    /// (a VMM's guest RAM): `MADV_PAGEOUT` leaves them alone.
    pub mapped_elsewhere: u64,
    /// Of `still`: in the page cache, mapped by pagescope alone, after
    /// every attempt (locked, pinned, not on an LRU list).
    pub resident_other: u64,
    /// How many times the pages' states were read (one per 20 ms of
    /// waiting, at most [`SETTLE`]'s worth).
    pub settle_rounds: u32,
}

impl Outcome {
    /// Why pages stayed in RAM, one note per cause, about `what`.
    pub fn notes(&self, what: &str) -> Vec<String> {
        let mut notes = Vec::new();
        if self.mapped_elsewhere > 0 {
            notes.push(format!(
                "{what}: {} pages stay in RAM: mapped by another process too (MADV_PAGEOUT skips those)",
                self.mapped_elsewhere
            ));
        }
        if self.resident_other > 0 {
            notes.push(format!(
                "{what}: {} pages stay in RAM after {ROUNDS} attempts (locked, pinned or off the LRU lists)",
                self.resident_other
            ));
        }
        if self.swap_cache > 0 {
            notes.push(format!(
                "{what}: {} pages are in the swap cache, written by an asynchronous swap device (the next reclaim frees them)",
                self.swap_cache
            ));
        }
        notes
    }
}

/// Pages `pages` (sorted object page indices) of the shmem object `fd`,
/// read into its page cache by the dump, paged back out through
/// pagescope's own shared mapping of each run (where each page is mapped
/// once: `MADV_PAGEOUT` skips pages mapped by several processes), then
/// asked of the object (`mincore` + `cachestat`). A page in the swap cache
/// is on its way out (an asynchronous device writing it). A page still in
/// the page cache is tried again, [`RETRY_AFTER`] later, at most
/// [`ROUNDS`] times in all, unless another process maps it too: nothing
/// is in flight for it, so waiting would not change it. The wait ends as
/// soon as no page is left to try again (or after [`SETTLE`]).
pub fn object(fd: BorrowedFd<'_>, pages: &[u64], page: PageSize) -> std::io::Result<Outcome> {
    let mut todo = pages.to_vec();
    let mut outcome = Outcome::default();
    let start = Instant::now();
    let mut attempts = 0;
    let mut last_attempt = start;
    let mut shared = BTreeSet::new();
    while !todo.is_empty() {
        if attempts < ROUNDS && (attempts == 0 || last_attempt.elapsed() >= RETRY_AFTER) {
            shared.clear();
            for &(first, count) in &runs(&todo) {
                shared.extend(page_out_run(fd, first, count, page)?);
            }
            attempts += 1;
            last_attempt = Instant::now();
        }
        let states = object_states(fd, &todo, page)?;
        outcome.settle_rounds += 1;
        let mut again = Vec::new();
        for (&p, st) in todo.iter().zip(states) {
            match st {
                ObjectState::Swapped => outcome.out += 1,
                ObjectState::SwapCache => {
                    outcome.still += 1;
                    outcome.swap_cache += 1;
                }
                _ => again.push(p),
            }
        }
        todo = again;
        let retry = attempts < ROUNDS && todo.iter().any(|p| !shared.contains(p));
        if !retry || start.elapsed() >= SETTLE {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outcome.still += todo.len() as u64;
    outcome.mapped_elsewhere = todo.iter().filter(|p| shared.contains(p)).count() as u64;
    outcome.resident_other = todo.len() as u64 - outcome.mapped_elsewhere;
    Ok(outcome)
}

/// Attempts at paging a shmem page out.
pub const ROUNDS: usize = 3;
/// A page still in the page cache this long after an attempt is tried
/// again. (A page whose earlier swap-out write was still in flight when
/// the dump read it leaves the page cache only once that write ends.)
const RETRY_AFTER: Duration = Duration::from_millis(300);
/// How long pages are watched for leaving the page cache at most.
pub const SETTLE: Duration = Duration::from_secs(2);

/// One run of object pages: map, fault each page in (it is in the page
/// cache: the dump just read it), drain the LRU batches, `MADV_PAGEOUT`.
/// Returns the pages another process maps too (`MADV_PAGEOUT` skips
/// them).
fn page_out_run(
    fd: BorrowedFd<'_>,
    first: u64,
    count: usize,
    page: PageSize,
) -> std::io::Result<Vec<u64>> {
    let p = page.as_usize();
    let len = count * p;
    let m = OwnedMapping::file(fd, first * page.get(), len, false, true)?;
    for k in 0..count {
        m.read_byte(k * p)?;
    }
    let shared = not_exclusive(m.addr(), count, page)?;
    crate::sys::lru_drain::drain_all_cpus()?;
    m.madvise(0, len, Advice::PageOut)?;
    Ok(shared.into_iter().map(|k| first + k).collect())
}

/// Of `count` pages mapped at `addr` in this process, the indices of those
/// present but not exclusively mapped (`/proc/self/pagemap`).
fn not_exclusive(addr: u64, count: usize, page: PageSize) -> std::io::Result<Vec<u64>> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; count * 8];
    pagemap.read_exact_at(&mut raw, addr / page.get() * 8)?;
    let shared = raw.chunks_exact(8).enumerate().filter_map(|(k, b)| {
        let e = PagemapEntry(u64::from_ne_bytes(b.try_into().unwrap_or_default()));
        (e.is_present() && !e.flags().contains(PagemapFlags::EXCLUSIVE)).then_some(k as u64)
    });
    Ok(shared.collect())
}

/// The object states of `pages` (sorted).
fn object_states(
    fd: BorrowedFd<'_>,
    pages: &[u64],
    page: PageSize,
) -> std::io::Result<Vec<ObjectState>> {
    let (Some(&lo), Some(&hi)) = (pages.first(), pages.last()) else {
        return Ok(Vec::new());
    };
    let size = rustix::fs::fstat(fd).map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0));
    let span = PageSpan::new(lo, hi + 1).unwrap_or_default();
    let c = classify(
        fd,
        ObjectClass::Shmem,
        size.div_ceil(page.get()),
        span,
        page,
        &RangeSet::default(),
    )?;
    let mut out = Vec::with_capacity(pages.len());
    let mut runs = c.runs.iter().peekable();
    for &p in pages {
        while runs.peek().is_some_and(|r| r.first + r.count <= p) {
            runs.next();
        }
        out.push(
            runs.peek()
                .filter(|r| r.first <= p)
                .map_or(ObjectState::Hole, |r| r.state),
        );
    }
    Ok(out)
}

/// Sorted page indices as (first, count) runs.
fn runs(pages: &[u64]) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &i in pages {
        match out.last_mut() {
            Some((f, n)) if *f + *n as u64 == i => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_pages() {
        assert_eq!(runs(&[1, 2, 3, 7]), vec![(1, 3), (7, 1)]);
    }

    /// A page that another mapping (here: this process's own, standing for
    /// a VMM's) keeps mapped cannot leave: it is reported as such after one
    /// look, not watched for the whole settle time.
    #[test]
    fn a_page_mapped_elsewhere_is_not_waited_for() {
        use std::os::fd::AsFd;
        let page = PageSize::current();
        let p = page.as_usize();
        let fd = rustix::fs::memfd_create("pageout-settle", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd");
        rustix::fs::ftruncate(&fd, 2 * page.get()).expect("ftruncate");
        let vmm = OwnedMapping::file(fd.as_fd(), 0, 2 * p, true, true).expect("map");
        vmm.write_byte(0, 1).expect("write");
        vmm.write_byte(p, 2).expect("write");
        let o = object(fd.as_fd(), &[0, 1], page).expect("page out");
        assert_eq!((o.out + o.still, o.mapped_elsewhere), (2, 2), "{o:?}");
        assert_eq!(o.settle_rounds, 1, "{o:?}");
        let settle_looks = (SETTLE.as_millis() / 20) as u32;
        assert!(o.settle_rounds * 50 < settle_looks, "{o:?}");
        assert_eq!(o.notes("memfd").len(), 1, "{o:?}");
        drop(vmm);
    }
}
