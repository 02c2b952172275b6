//! Data extents of an object: `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`.
//!
//! For shmem (Linux 3.8+), data is every page-cache folio that is
//! uptodate **and every swap entry**: it does not tell resident from
//! swapped, and it swaps nothing in. A fallocated page never written is a
//! hole. For regular files, what the filesystem reports.
//!
//! # References
//! - `lseek(2)`

use std::os::fd::BorrowedFd;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::addr::{PageSize, PageSpan};
use crate::rangeset::RangeSet;

/// The pages of `span` that `SEEK_DATA` counts as data.
pub fn data_extents(
    fd: BorrowedFd<'_>,
    span: PageSpan,
    page: PageSize,
) -> Result<RangeSet<PageSpan>, Errno> {
    let p = page.get();
    let mut out = RangeSet::new();
    let (start, end) = (span.start() * p, span.end() * p);
    let mut pos = start;
    while pos < end {
        let d = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e),
        };
        if d >= end {
            break;
        }
        let h = match rustix::fs::seek(fd, SeekFrom::Hole(d)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(e),
        };
        out.extend(PageSpan::new(d / p, h.div_ceil(p)));
        pos = h.max(d + p);
    }
    Ok(out)
}
