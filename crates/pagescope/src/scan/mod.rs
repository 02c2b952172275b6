//! Page-state scanning: one [`PageScanner`] trait, two backends.
//!
//! * [`PagemapScanBackend`]: the `PAGEMAP_SCAN` ioctl (Linux 6.7+) finds
//!   populated pages and tells zero pages and PMD-mapped THPs; pagemap reads
//!   add what the ioctl does not report (exclusivity, the file bit, swap
//!   type/offset), only for the pages that need them; where memory is
//!   dense it reads pagemap directly and walks only ambiguous 2 MiB blocks
//!   ([`ScanStrategy`]).
//! * [`PagemapReadBackend`]: plain `/proc/PID/pagemap` reads in 64K-entry
//!   batches, with PFN comparisons and `/proc/kpageflags` (root) for zero
//!   pages and THPs. Works on any kernel.
//!
//! Both must produce identical runs on every fixture scenario; the test
//! suite checks that, as the kernel's selftests check pagemap against
//! PAGEMAP_SCAN. [`Scanner`] runs the chosen backend ([`BackendPlan`](backend::BackendPlan))
//! over a set of VMAs; the inspection driver (`crate::inspect`) decides
//! which.

mod backend;
mod classify;
mod dense;
mod entries;
mod kpage;
mod pagemap_read;
mod pagemap_scan;
pub(crate) mod reader;
pub(crate) mod swapped;
pub(crate) mod unprivileged;
mod vmas;

use std::os::fd::BorrowedFd;

pub(crate) use kpage::KpageFlags;
/// The `/proc/kpageflags` bits pagescope reads.
pub(crate) mod kpage_bits {
    pub(crate) use super::kpage::{KPF_DIRTY, KPF_LRU, KPF_THP_ANY, KPF_UNEVICTABLE};
}
pub(crate) use vmas::Scanner;

use crate::addr::{PageSize, VirtRange};
use crate::error::ErrorKind;
use crate::kernel::KernelCaps;
use crate::page::RunBuilder;
use crate::proc::ProcError;
use crate::vma::Vma;

/// Errors while scanning a process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// Reading a `/proc` file failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN of {range} in process {pid} failed")]
    Ioctl {
        /// The target.
        pid: u32,
        /// The range being scanned.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Reading pagemap failed.
    #[error("reading pagemap of {range} in process {pid} failed")]
    Pagemap {
        /// The target.
        pid: u32,
        /// The range being read.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The requested range is malformed or overlaps no mapping.
    #[error("range {range} is {what} in process {pid}")]
    BadRange {
        /// The target.
        pid: u32,
        /// The range asked for.
        range: VirtRange,
        /// `"not page aligned"` or `"not mapped"`.
        what: &'static str,
    },
    /// The `--range` text does not parse.
    #[error("process {pid}: range {text:?} is malformed: {why}")]
    MalformedRange {
        /// The target.
        pid: u32,
        /// The text given.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// The requested backend is not available on this kernel.
    #[error("scan backend {backend} is unavailable: {why}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What is missing.
        why: &'static str,
    },
    /// The target exited while it was being scanned.
    #[error("process {pid} exited during the scan")]
    TargetExited {
        /// The target.
        pid: u32,
    },
}

impl ScanError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Proc(e) => e.kind(),
            Self::BadRange { .. } | Self::MalformedRange { .. } => ErrorKind::BadRange,
            Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::TargetExited { .. } => ErrorKind::TargetExited,
            Self::Ioctl { source, .. } | Self::Pagemap { source, .. } => {
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    ErrorKind::PermissionDenied
                } else {
                    ErrorKind::Other
                }
            }
        }
    }
}

/// Everything a backend needs about the target and the kernel.
#[derive(Debug)]
pub struct ScanContext<'a> {
    /// The target's PID (for error messages).
    pub pid: u32,
    /// The target's pagemap.
    pub pagemap: BorrowedFd<'a>,
    /// Base page size.
    pub page: PageSize,
    /// Whether the pagemap fd shows PFNs and swap entries.
    pub privileged: bool,
    /// Kernel capabilities (zero PFN, scan categories, swap devices).
    pub caps: &'a KernelCaps,
    /// `/proc/kpageflags`, when readable (root).
    pub kpageflags: Option<&'a KpageFlags>,
}

/// One VMA, or a part of it, to scan.
#[derive(Clone, Copy, Debug)]
pub struct ScanJob<'a> {
    /// The target and the kernel.
    pub ctx: &'a ScanContext<'a>,
    /// The VMA.
    pub vma: &'a Vma,
    /// The part of it to scan.
    pub range: VirtRange,
}

/// A way to find the state of every page of a VMA.
pub trait PageScanner {
    /// Appends runs covering every page of the job's range to `out`, in
    /// address order.
    fn scan(&mut self, job: &ScanJob<'_>, out: &mut RunBuilder) -> Result<(), ScanError>;
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// `PAGEMAP_SCAN` when the kernel has it, else pagemap reads.
    #[default]
    Auto,
    /// Force `PAGEMAP_SCAN` (fails before Linux 6.7).
    PagemapScan,
    /// Force plain pagemap reads.
    Pagemap,
}

/// How the `PAGEMAP_SCAN` backend covers a VMA. Every strategy gives the
/// same result page for page (the test suite checks it); they differ in
/// cost. See `scan/dense.rs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanStrategy {
    /// Walk with the ioctl where 2 MiB blocks are mostly empty, read
    /// pagemap directly where they are mostly populated, deciding step by
    /// step (32 MiB) from what the previous step held.
    #[default]
    Adaptive,
    /// Always walk with the ioctl first, then read entries where needed.
    Walk,
    /// Always read pagemap directly, walking only the 2 MiB blocks whose
    /// entries cannot tell a PMD-mapped THP or a zero page.
    Read,
}

/// Options for a scan (`crate::inspect::scan_process`).
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Backend selection.
    pub backend: BackendChoice,
    /// Only scan this part of the address space (page aligned).
    pub range: Option<VirtRange>,
    /// Keep swap type/offset per run (splitting runs on non-consecutive
    /// offsets).
    pub swap_detail: bool,
    /// Read smaps even when not needed (VmFlags and Swap: in the report).
    pub smaps: bool,
    /// Classify the backing objects of shared and file mappings (pages the
    /// process does not map: resident, swapped, swap cache, hole, ...).
    pub objects: bool,
    /// Skip the per-page `exclusive` bit where only pagemap reads could
    /// give it (PAGEMAP_SCAN has no such category): present pages of
    /// private anonymous and shared mappings are then reported from the
    /// ioctl alone, without `exclusive`. Reports say so
    /// ([`ProcessReport::exclusive_known`](crate::ProcessReport)).
    pub skip_exclusive: bool,
    /// How the `PAGEMAP_SCAN` backend covers populated memory (results are
    /// the same page for page; only the cost differs).
    pub strategy: ScanStrategy,
    /// Worker threads (0: one per CPU, at most 8). Large address spaces are
    /// cut into chunks scanned in parallel; pagemap reads and PAGEMAP_SCAN
    /// only take the target's mmap lock for reading.
    pub threads: usize,
}

/// The present parts of `range` in the process behind `pagemap`
/// (PAGEMAP_SCAN with `anyof = PRESENT` when available, else pagemap
/// reads).
pub fn present_ranges(
    pagemap: BorrowedFd<'_>,
    pid: u32,
    range: VirtRange,
    caps: &KernelCaps,
) -> Result<Vec<VirtRange>, ScanError> {
    let page = caps.page_size;
    let mut out: Vec<VirtRange> = Vec::new();
    let mut add = |r: VirtRange| match out.last_mut() {
        Some(last) if last.end() == r.start() => {
            *last = VirtRange::new(last.start(), r.end()).unwrap_or(*last)
        }
        _ => out.push(r),
    };
    if caps.has_pagemap_scan() {
        use crate::sys::pagemap_scan::{RegionBuf, ScanCategories, ScanRequest, pagemap_scan_all};
        let mut buf = RegionBuf::new(4096);
        let req = ScanRequest::new(range)
            .any_of(ScanCategories::PRESENT)
            .returning(ScanCategories::PRESENT);
        pagemap_scan_all(pagemap, &req, &mut buf, |r| add(r.range)).map_err(|e| match e {
            rustix::io::Errno::SRCH => ScanError::TargetExited { pid },
            e => ScanError::Ioctl {
                pid,
                range,
                source: e.into(),
            },
        })?;
        return Ok(out);
    }
    let mut buf = Vec::new();
    let mut reader = reader::PagemapReader::new(pagemap, pid, page, &mut buf);
    reader.for_each_batch(range, |addr, raw| {
        for (i, &e) in raw.iter().enumerate() {
            if crate::pagemap::PagemapEntry(e).is_present() {
                let a = addr.saturating_add(i as u64 * page.get());
                add(VirtRange::from_start_len(a, page.get()).unwrap_or_default());
            }
        }
        Ok(())
    })?;
    Ok(out)
}
