//! Paging out shmem pages that no process maps (resident but unmapped:
//! in the page cache only), through pagescope's own shared mapping of the
//! object, where each page is mapped once. `MADV_PAGEOUT` only reclaims
//! pages it finds in the caller's page tables, and skips pages mapped by
//! several processes.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::addr::{PageSize, PageSpan};
use crate::object::classify::{ObjectClass, ObjectState, classify};
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
}

/// Pages `pages` (sorted object page indices) of the shmem object `fd`,
/// read into its page cache by the dump, paged back out through
/// pagescope's own shared mapping of each run (where each page is mapped
/// once: `MADV_PAGEOUT` skips pages mapped by several processes), then
/// asked of the object (`mincore` + `cachestat`): a page still in the
/// page cache is tried again (at most [`ROUNDS`] times: a page whose
/// earlier swap-out write is still in flight cannot be reclaimed yet); one
/// in the swap cache is on its way out (an asynchronous device writing it).
pub fn object(fd: BorrowedFd<'_>, pages: &[u64], page: PageSize) -> std::io::Result<Outcome> {
    let mut todo = pages.to_vec();
    let mut outcome = Outcome::default();
    let start = Instant::now();
    let mut attempts = 0;
    let mut last_attempt = start;
    while !todo.is_empty() {
        if attempts < ROUNDS && (attempts == 0 || last_attempt.elapsed() >= RETRY_AFTER) {
            for &(first, count) in &runs(&todo) {
                page_out_run(fd, first, count, page)?;
            }
            attempts += 1;
            last_attempt = Instant::now();
        }
        let states = object_states(fd, &todo, page)?;
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
        if start.elapsed() >= SETTLE {
            break;
        }
        if !todo.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    outcome.still += todo.len() as u64;
    Ok(outcome)
}

/// Attempts at paging a shmem page out.
pub const ROUNDS: usize = 3;
/// A page still in the page cache this long after an attempt is tried
/// again. (A page whose earlier swap-out write was still in flight when
/// the dump read it leaves the page cache only once that write ends.)
const RETRY_AFTER: Duration = Duration::from_millis(300);
/// How long pages are watched for leaving the page cache.
const SETTLE: Duration = Duration::from_secs(2);

/// One run of object pages: map, fault each page in (it is in the page
/// cache: the dump just read it), drain the LRU batches, `MADV_PAGEOUT`.
fn page_out_run(
    fd: BorrowedFd<'_>,
    first: u64,
    count: usize,
    page: PageSize,
) -> std::io::Result<()> {
    let p = page.as_usize();
    let len = count * p;
    let m = OwnedMapping::file(fd, first * page.get(), len, false, true)?;
    for k in 0..count {
        m.read_byte(k * p)?;
    }
    crate::sys::lru_drain::drain_all_cpus()?;
    m.madvise(0, len, Advice::PageOut)?;
    Ok(())
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
}
