//! The plain pagemap backend: `/proc/PID/pagemap` in 64K-entry batches.
//!
//! Works on every kernel since 4.2. Zero pages are recognised by PFN (root)
//! or by the huge zero page's `PM_FILE` quirk; PMD-mapped THPs by a run of
//! 512 consecutive, aligned PFNs whose head `/proc/kpageflags` marks as a
//! THP head (root; private anonymous VMAs only). A fully PTE-mapped but
//! unsplit anon THP is indistinguishable this way and is reported `huge`,
//! and PMD-mapped file or shmem THPs are not flagged; PAGEMAP_SCAN has
//! neither limitation.

use super::entries::{PresentRules, classify_batch};
use super::reader::PagemapReader;
use super::{PageScanner, ScanError, ScanJob};
use crate::page::{PageInfo, RunBuilder, UnknownReason};

/// Plain pagemap reads.
#[derive(Debug, Default)]
pub struct PagemapReadBackend {
    buf: Vec<u64>,
}

impl PagemapReadBackend {
    /// A new backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PageScanner for PagemapReadBackend {
    fn scan(&mut self, job: &ScanJob<'_>, out: &mut RunBuilder) -> Result<(), ScanError> {
        let ScanJob { ctx, vma, range } = *job;
        if vma.outside_pagemap() {
            let info = PageInfo::unknown(UnknownReason::OutsidePagemap, Default::default());
            out.push(range.start(), range.pages(ctx.page), info);
            return Ok(());
        }
        let rules = PresentRules::new(ctx, vma);
        let mut reader = PagemapReader::new(ctx.pagemap, ctx.pid, ctx.page, &mut self.buf);
        reader.for_each_batch(range, |addr, raw| {
            classify_batch(ctx, &rules, addr, raw, out);
            Ok(())
        })
    }
}
