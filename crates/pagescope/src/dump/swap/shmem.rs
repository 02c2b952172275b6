//! The swap policy for pages of shared memory objects, whose swap slots
//! the kernel does not show (a shmem swap entry lives in the object, not
//! in a page table): the object's page states come from the `inspect`
//! driver (`shmem_page_states`: `mincore` and `cachestat` through
//! pagescope's own fd), `skip` leaves swapped pages alone, every
//! other policy reads them (`pread`) and remembers them for paging back
//! out (`cold.rs`).

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use super::{SwapIo, SwapPolicy};
use crate::addr::{PageSize, PageSpan};
use crate::dump::DumpError;
use crate::dump::model::ObjectModel;
use crate::object::classify::ObjectState;

/// With a swap policy other than `read`, the pages of `pages` (sorted) of
/// object `o` that are swapped out: counted, remembered for `keep-cold`,
/// and returned if `skip` leaves them alone.
pub(in crate::dump) fn swapped_object_pages(
    swap: &SwapIo,
    o: &mut ObjectModel,
    pages: &[u64],
    page: PageSize,
) -> Result<BTreeSet<u64>, DumpError> {
    let policy = swap.policy();
    let (Some(&lo), Some(&hi)) = (pages.first(), pages.last()) else {
        return Ok(BTreeSet::new());
    };
    if o.file.is_some() || policy == SwapPolicy::Read {
        return Ok(BTreeSet::new());
    }
    let size = rustix::fs::fstat(&o.fd).map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0));
    let span = PageSpan::new(lo, hi + 1).unwrap_or_default();
    let classified =
        crate::inspect::shmem_page_states(o.fd.as_fd(), size.div_ceil(page.get()), span, page)
            .map_err(|e| DumpError::ObjectRead {
                inode: o.id.inode,
                source: e.into(),
            })?;
    let wanted: BTreeSet<u64> = pages.iter().copied().collect();
    let mut swapped = BTreeSet::new();
    let mut skip = BTreeSet::new();
    for r in &classified.runs {
        for p in (r.first..r.first + r.count).filter(|p| wanted.contains(p)) {
            match r.state {
                // On the device only: `skip` leaves it there.
                ObjectState::Swapped => {
                    swapped.insert(p);
                    if policy == SwapPolicy::Skip {
                        skip.insert(p);
                    }
                }
                // In RAM too: read (no I/O), paged back out by keep-cold.
                ObjectState::SwapCache => {
                    swapped.insert(p);
                }
                _ => {}
            }
        }
    }
    swap.count_shmem(swapped.len() as u64, skip.len() as u64);
    if policy != SwapPolicy::Skip {
        o.cold.extend(swapped.iter().copied());
    }
    Ok(skip)
}
