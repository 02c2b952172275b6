//! Only the swap-type entries of a set of private VMAs: one
//! `PAGEMAP_SCAN` walk (`anyof = SWAPPED`, Linux 6.7+) over the span they
//! cover finds them without looking at present pages, then pagemap reads
//! of just those pages give each entry's swap slot (root) or marker.
//!
//! This is what dividing swap among its holders needs and nothing more:
//! a page-table walk that reports no present page costs a fraction of
//! smaps (no per-page rmap lookups for Pss).

use std::os::fd::BorrowedFd;

use super::{ScanError, classify, reader::PagemapReader};
use crate::addr::VirtRange;
use crate::kernel::KernelCaps;
use crate::page::{PageRun, RunBuilder};
use crate::pagemap::PagemapEntry;
use crate::sys::pagemap_scan::{RegionBuf, ScanCategories, ScanRequest, pagemap_scan_all};
use crate::vma::Vma;

/// Per VMA of `vmas` (in address order), the runs of its swap-type
/// entries (swapped pages with their slots, PTE markers as what they
/// are); pages with no such entry are not in the runs. `Err` only for a
/// failed read; a process that exited gives [`ScanError::TargetExited`].
pub fn swapped_runs(
    pagemap: BorrowedFd<'_>,
    pid: u32,
    caps: &KernelCaps,
    vmas: &[&Vma],
) -> Result<Vec<Vec<PageRun>>, ScanError> {
    let page = caps.page_size;
    let mut out: Vec<RunBuilder> = vmas.iter().map(|_| RunBuilder::new(page, true)).collect();
    let (Some(first), Some(last)) = (vmas.first(), vmas.last()) else {
        return Ok(Vec::new());
    };
    let Some(span) = VirtRange::new(first.range.start(), last.range.end()) else {
        return Ok(Vec::new());
    };
    let mut regions = Vec::new();
    let req = ScanRequest::new(span)
        .any_of(ScanCategories::SWAPPED)
        .returning(ScanCategories::SWAPPED);
    let mut buf = RegionBuf::new(1024);
    pagemap_scan_all(pagemap, &req, &mut buf, |r| regions.push(r.range)).map_err(|e| match e {
        rustix::io::Errno::SRCH => ScanError::TargetExited { pid },
        e => ScanError::Ioctl {
            pid,
            range: span,
            source: e.into(),
        },
    })?;
    let mut entries = Vec::new();
    let mut reader = PagemapReader::new(pagemap, pid, page, &mut entries);
    for region in regions {
        for (i, vma) in vmas.iter().enumerate() {
            let Some(part) = vma.range.intersect(&region) else {
                continue;
            };
            let runs = &mut out[i];
            reader.for_each_batch(part, |addr, raw| {
                for (j, &e) in raw.iter().enumerate() {
                    let info =
                        classify::swap(PagemapEntry(e), caps.privileged_pagemap, &caps.swaps);
                    runs.push(addr.saturating_add(page.bytes(j as u64)), 1, info);
                }
                Ok(())
            })?;
        }
    }
    Ok(out.into_iter().map(RunBuilder::finish).collect())
}
