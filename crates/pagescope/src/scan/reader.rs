//! Batched `/proc/PID/pagemap` reads into a reusable buffer.
//!
//! Entries come back as raw `u64`; wrap each in
//! [`PagemapEntry`](crate::pagemap::PagemapEntry) to decode.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use super::ScanError;
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::sys;

/// Entries per `pread` (512 KiB of pagemap, like page-types' 64K batches).
pub const BATCH_ENTRIES: usize = 64 * 1024;

/// Reads pagemap entries for address ranges, `BATCH_ENTRIES` at a time.
#[derive(Debug)]
pub struct PagemapReader<'a, 'b> {
    fd: BorrowedFd<'a>,
    pid: u32,
    page: PageSize,
    buf: &'b mut Vec<u64>,
}

impl<'a, 'b> PagemapReader<'a, 'b> {
    /// A reader of `fd` (the pagemap of process `pid`) using `buf` (grown
    /// as needed, up to [`BATCH_ENTRIES`]).
    pub fn new(fd: BorrowedFd<'a>, pid: u32, page: PageSize, buf: &'b mut Vec<u64>) -> Self {
        Self { fd, pid, page, buf }
    }

    /// Calls `f(first_page_addr, raw_entries)` for consecutive batches
    /// covering `range`. Batches end on multiples of [`BATCH_ENTRIES`]
    /// pages, so no 2 MiB-aligned block is ever split between two batches.
    pub fn for_each_batch(
        &mut self,
        range: VirtRange,
        mut f: impl FnMut(VirtAddr, &[u64]) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        let mut addr = range.start();
        while addr < range.end() {
            let left = range.end().checked_offset_from(addr).unwrap_or(0) / self.page.get();
            let idx = addr.page_index(self.page);
            let to_boundary = BATCH_ENTRIES as u64 - idx % BATCH_ENTRIES as u64;
            let n = usize::try_from(left.min(to_boundary)).unwrap_or(BATCH_ENTRIES);
            let batch = VirtRange::from_start_len(addr, self.page.bytes(n as u64)).unwrap_or(range);
            let entries = self.read(batch)?;
            f(addr, entries)?;
            addr = batch.end();
        }
        Ok(())
    }

    /// Reads the entries of `range` (at most [`BATCH_ENTRIES`] pages).
    /// Raw `u64`s; wrap each in [`PagemapEntry`] to decode (a free newtype).
    pub fn read(&mut self, range: VirtRange) -> Result<&[u64], ScanError> {
        let n = usize::try_from(range.pages(self.page)).unwrap_or(usize::MAX);
        assert!(
            n <= BATCH_ENTRIES,
            "pagemap batch of {n} entries exceeds {BATCH_ENTRIES}"
        );
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        let first = range.start().page_index(self.page);
        let got = sys::pagemap::pread_u64s(self.fd, &mut self.buf[..n], first)
            .map_err(|e| self.error(range, e))?;
        if got < n {
            // Pagemap reads end early only when the mm is gone.
            return Err(ScanError::TargetExited { pid: self.pid });
        }
        Ok(&self.buf[..n])
    }

    fn error(&self, range: VirtRange, e: Errno) -> ScanError {
        if e == Errno::SRCH {
            ScanError::TargetExited { pid: self.pid }
        } else {
            ScanError::Pagemap {
                pid: self.pid,
                range,
                source: e.into(),
            }
        }
    }
}
