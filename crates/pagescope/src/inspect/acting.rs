//! Entry points of the commands that act on the pages they inspect:
//! `dump`, `verify` and `pageout` get their page states and their objects
//! here, never from `scan/` or `object/` directly.
//!
//! * `verify` (`dump/verify/`): [`scan_page_tables`] for the live states
//!   it compares the image with, [`open_object`] for each shared object.
//! * `pageout` (`pageout/`): [`scan_for_pageout`] before and after the
//!   advice, [`open_object`] for shmem pages the process does not map.
//! * the dump's swap policies (`dump/swap/shmem.rs`): [`shmem_page_states`]
//!   for the shmem pages they copy (a shmem swap entry lives in the
//!   object, not in a page table).
//! * the dump (`dump/`): the same two as `verify`, so an image and its
//!   verification see a process the same way. A full pass models every
//!   mapping from [`scan_page_tables`] (`Dump::build_models` in
//!   `dump/passes.rs`) and opens the object behind a shared or file
//!   mapping once with [`open_object`] (`Objects::add` in
//!   `dump/objects.rs`): the dump reads objects itself (by `pread` of
//!   pagescope's own fd), so the scan has no object stage.
//!   Later passes, and the first pass of a dump whose tracker was kept
//!   since its parent, ask the dirty tracker, not the page tables, and
//!   scan again only where the layout (`/proc/PID/maps`) changed: the
//!   whole process, or the new mappings with [`scan_page_tables_in`].

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

use super::objects;
use crate::addr::{PageSize, PageSpan, VirtRange};
use crate::kernel::KernelCaps;
use crate::object::{Classified, ObjectClass, ObjectError, OpenObject};
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::report::ProcessReport;
use crate::scan::{ScanError, ScanOptions};
use crate::vma::Vma;

/// The state of every page of `target` as its page tables tell it, without
/// the object stage (a page a shared or file mapping does not map keeps
/// the page tables' answer: the object is not asked), the layout
/// re-checked: what a copy of the process's memory (`dump`) plans with
/// and what `verify` compares with.
pub fn scan_page_tables(target: &Target, caps: &KernelCaps) -> Result<ProcessReport, ScanError> {
    super::scan_process(
        target,
        caps,
        &ScanOptions {
            objects: false,
            ..ScanOptions::default()
        },
    )
}

/// [`scan_page_tables`] of the mappings in `range` only: what a dump that
/// kept its models scans of a mapping that is new or changed.
pub fn scan_page_tables_in(
    target: &Target,
    caps: &KernelCaps,
    range: VirtRange,
) -> Result<ProcessReport, ScanError> {
    super::scan_process(
        target,
        caps,
        &ScanOptions {
            range: Some(range),
            objects: false,
            ..ScanOptions::default()
        },
    )
}

/// The state of every page of `range` (the whole process without one),
/// objects joined and smaps read (its `VmFlags` say which mappings refuse
/// `MADV_PAGEOUT`): what `pageout` chooses pages from and counts them
/// again with.
pub fn scan_for_pageout(
    target: &Target,
    caps: &KernelCaps,
    range: Option<VirtRange>,
) -> Result<ProcessReport, ScanError> {
    super::scan_process(
        target,
        caps,
        &ScanOptions {
            range,
            objects: true,
            smaps: true,
            ..ScanOptions::default()
        },
    )
}

/// Opens the object behind `vma` (a shared or file mapping of `target`)
/// the way the inspection does: through `map_files` when `caps` allow it,
/// else an fd the target holds, else its path; checked against the
/// device and inode maps names.
pub fn open_object(
    target: &Target,
    caps: &KernelCaps,
    vma: &Vma,
) -> Result<OpenObject, ObjectError> {
    objects::open_one(target, caps, vma)
}

/// The state of pages `span` of the shared memory object open as `fd`
/// (`size_pages` long), as its page cache and swap tell it (`mincore`,
/// `cachestat`): resident, in the swap cache, swapped out, or a hole.
pub fn shmem_page_states(
    fd: BorrowedFd<'_>,
    size_pages: u64,
    span: PageSpan,
    page: PageSize,
) -> Result<Classified, Errno> {
    crate::object::classify::classify(
        fd,
        ObjectClass::Shmem,
        size_pages,
        span,
        page,
        &RangeSet::default(),
    )
}
