//! Entry points of the commands that act on the pages they inspect:
//! `dump`, `verify` and `pageout` get their page states and their objects
//! here, never from `scan/` or `object/` directly.
//!
//! * `verify` (`dump/verify/`): [`scan_page_tables`] for the live states
//!   it compares the image with, [`open_object`] for each shared object.
//! * `pageout` (`pageout/`): [`scan_for_pageout`] before and after the
//!   advice, [`open_object`] for shmem pages the process does not map.
//! * the dump (`dump/`): the same two as `verify`, so an image and its
//!   verification see a process the same way. A full pass models every
//!   mapping from [`scan_page_tables`] (`Dump::build_models`, today a
//!   `scan_process` with `objects: false`) and opens the object behind a
//!   shared or file mapping once with [`open_object`] (`Dump::add_object`,
//!   today `object::open_object`): the dump reads objects itself (by
//!   `pread` of pagescope's own fd), so the scan has no object stage.
//!   Later passes ask the dirty tracker, not the page tables.

use super::objects;
use crate::addr::VirtRange;
use crate::kernel::KernelCaps;
use crate::object::{ObjectError, OpenObject};
use crate::proc::Target;
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
