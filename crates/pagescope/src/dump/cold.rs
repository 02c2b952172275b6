//! Paging back out what a dump swapped in (`--swap keep-cold`, and the
//! pages `--swap direct` had to read normally), and checking that it left
//! RAM: `MADV_PAGEOUT` returns success even for pages it skips.

use super::remote::RemoteMem;
use crate::addr::PageSize;
use crate::proc::Target;
use crate::sys::mm::Advice;

pub use crate::pageout::object::{Outcome, object};

/// `process_madvise(MADV_PAGEOUT)` on the target's pages `addrs` (sorted),
/// then their pagemap entries: a swap entry means the page left the
/// process (on an asynchronous device it may sit in the swap cache until
/// its write completes).
pub fn anon(
    target: &Target,
    mem: &RemoteMem,
    addrs: &[u64],
    page: PageSize,
) -> std::io::Result<Outcome> {
    if addrs.is_empty() {
        return Ok(Outcome::default());
    }
    let p = page.as_usize();
    let ranges = merge(addrs, p);
    crate::sys::mm::drain_lru_batches()?;
    crate::sys::process_madvise::advise(target.pidfd(), &ranges, Advice::PageOut.raw())?;
    let entries = mem
        .entries_at(addrs)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let out = entries.iter().filter(|e| e.is_swap()).count() as u64;
    Ok(Outcome {
        out,
        still: addrs.len() as u64 - out,
        swap_cache: 0,
    })
}

/// Sorted page addresses as (address, length) ranges.
pub(crate) fn merge(addrs: &[u64], p: usize) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &a in addrs {
        match out.last_mut() {
            Some((s, len)) if *s + *len as u64 == a => *len += p,
            _ => out.push((a, p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_pages() {
        assert_eq!(
            merge(&[0x1000, 0x2000, 0x4000], 0x1000),
            vec![(0x1000, 0x2000), (0x4000, 0x1000)]
        );
    }
}
