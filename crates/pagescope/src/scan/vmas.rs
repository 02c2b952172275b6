//! Scanning a set of VMAs of one process: cut into chunks of at most
//! 1 GiB (aligned to the PMD size, so no huge page is split), scanned on
//! worker threads (`crate::parallel`), each with its own backend. The
//! pagemap fd is shared: `pread` and `PAGEMAP_SCAN` carry their own offsets
//! and only take the target's mmap lock for reading.

use std::os::fd::{AsFd, OwnedFd};

use super::backend::BackendPlan;
use super::kpage::KpageFlags;
use super::{ScanContext, ScanError, ScanJob, ScanOptions};
use crate::addr::{PageSize, VirtRange};
use crate::kernel::KernelCaps;
use crate::page::{PageRun, RunBuilder};
use crate::proc::Target;
use crate::vma::Vma;

/// Bytes per chunk: large enough that per-chunk overhead vanishes, small
/// enough that a big VMA spreads over all workers.
const CHUNK_BYTES: u64 = 1 << 30;

/// Address space below which one thread is faster than starting more.
const PARALLEL_THRESHOLD_BYTES: u64 = 256 << 20;

/// A piece of one selected VMA, scanned as a unit.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    /// Index into the selected VMAs.
    vma: usize,
    range: VirtRange,
}

/// What the page-table scan of one process needs, opened once.
#[derive(Debug)]
pub struct Scanner<'c> {
    pid: u32,
    pagemap: OwnedFd,
    kpageflags: Option<KpageFlags>,
    caps: &'c KernelCaps,
    plan: BackendPlan,
    opts: ScanOptions,
}

impl<'c> Scanner<'c> {
    /// Opens the target's pagemap (the kernel decides at open whether it
    /// shows PFNs) and `/proc/kpageflags` (root), and picks the backend.
    pub fn new(
        target: &Target,
        caps: &'c KernelCaps,
        opts: &ScanOptions,
    ) -> Result<Self, ScanError> {
        let plan = BackendPlan::choose(opts, caps)?;
        Ok(Self {
            pid: target.pid(),
            pagemap: target.pagemap()?,
            kpageflags: if caps.privileged_pagemap {
                KpageFlags::open()
            } else {
                None
            },
            caps,
            plan,
            opts: opts.clone(),
        })
    }

    /// The backend in use.
    pub fn plan(&self) -> BackendPlan {
        self.plan
    }

    /// Scans `selected` (VMAs with the part of each to scan). Per VMA:
    /// its runs, or `None` where the target exited during the scan. Other
    /// errors end the scan.
    pub fn scan(
        &self,
        selected: &[(Vma, VirtRange)],
    ) -> Result<Vec<Option<Vec<PageRun>>>, ScanError> {
        let page = self.caps.page_size;
        let ctx = ScanContext {
            pid: self.pid,
            pagemap: self.pagemap.as_fd(),
            page,
            privileged: self.caps.privileged_pagemap,
            caps: self.caps,
            kpageflags: self.kpageflags.as_ref(),
        };
        let chunks = chunks(selected, page);
        let total: u64 = chunks.iter().map(|c| c.range.len()).sum();
        let workers = if total < PARALLEL_THRESHOLD_BYTES {
            1
        } else {
            crate::parallel::workers(self.opts.threads, chunks.len())
        };
        let results = crate::parallel::run(
            chunks.len(),
            workers,
            || self.plan.build(self.caps),
            |backend, i| {
                let c = chunks[i];
                let mut out = RunBuilder::new(page, self.opts.swap_detail);
                let job = ScanJob {
                    ctx: &ctx,
                    vma: &selected[c.vma].0,
                    range: c.range,
                };
                backend.scan(&job, &mut out)?;
                Ok(out.finish())
            },
            |e| !matches!(e, ScanError::TargetExited { .. }),
        );
        let mut per_vma: Vec<Option<RunBuilder>> = (0..selected.len())
            .map(|_| Some(RunBuilder::new(page, self.opts.swap_detail)))
            .collect();
        for (c, r) in chunks.iter().zip(results) {
            match r {
                Some(Ok(runs)) => {
                    if let Some(b) = &mut per_vma[c.vma] {
                        runs.iter().for_each(|r| b.push_run(r));
                    }
                }
                Some(Err(ScanError::TargetExited { .. })) | None => per_vma[c.vma] = None,
                Some(Err(e)) => return Err(e),
            }
        }
        Ok(per_vma
            .into_iter()
            .map(|b| b.map(RunBuilder::finish))
            .collect())
    }
}

/// Cuts the selected VMAs into chunks of at most [`CHUNK_BYTES`], aligned
/// to the PMD size so no huge page is split between two chunks.
fn chunks(selected: &[(Vma, VirtRange)], page: PageSize) -> Vec<Chunk> {
    let align = page.pmd().get();
    let mut out = Vec::new();
    for (i, (_, range)) in selected.iter().enumerate() {
        let mut start = range.start();
        while start < range.end() {
            let next = start
                .saturating_add(CHUNK_BYTES)
                .align_down(align)
                .min(range.end());
            let end = if next <= start { range.end() } else { next };
            out.push(Chunk {
                vma: i,
                range: VirtRange::new(start, end).unwrap_or(*range),
            });
            start = end;
        }
    }
    out
}
