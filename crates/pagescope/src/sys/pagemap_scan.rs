//! `ioctl(pagemap_fd, PAGEMAP_SCAN, &pm_scan_arg)` (since Linux 6.7).
//!
//! Walks a range of the target's page tables and returns run-length
//! `page_region`s whose categories match the masks; with
//! `PM_SCAN_WP_MATCHING` it also write-protects the matching pages in the
//! same walk (the uffd-wp async get-and-reset).
//!
//! # References
//! - <https://docs.kernel.org/admin-guide/mm/pagemap.html> ("PAGEMAP_SCAN")
//! - `include/uapi/linux/fs.h`

use std::ffi::c_void;
use std::os::fd::BorrowedFd;

use bitflags::bitflags;
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

use crate::addr::{VirtAddr, VirtRange};

bitflags! {
    /// `PAGE_IS_*` categories of `PAGEMAP_SCAN` (`<linux/fs.h>`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ScanCategories: u64 {
        /// `PAGE_IS_WPALLOWED`: VMA registered for uffd-wp async.
        const WPALLOWED = 1 << 0;
        /// `PAGE_IS_WRITTEN`: not write-protected (meaningful only in
        /// uffd-wp VMAs; set for every slot elsewhere).
        const WRITTEN = 1 << 1;
        /// `PAGE_IS_FILE`: file-backed page (costs a page lookup).
        const FILE = 1 << 2;
        /// `PAGE_IS_PRESENT`.
        const PRESENT = 1 << 3;
        /// `PAGE_IS_SWAPPED`: swap entries *and* PTE markers.
        const SWAPPED = 1 << 4;
        /// `PAGE_IS_PFNZERO`: the zero page or huge zero page.
        const PFNZERO = 1 << 5;
        /// `PAGE_IS_HUGE`: PMD-mapped THP or hugetlb.
        const HUGE = 1 << 6;
        /// `PAGE_IS_SOFT_DIRTY`.
        const SOFT_DIRTY = 1 << 7;
        /// `PAGE_IS_GUARD` (6.15+).
        const GUARD = 1 << 8;
    }
}

/// `struct page_region` from `<linux/fs.h>`: one run of pages with equal
/// (masked) categories.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct page_region {
    start: u64,
    end: u64,
    categories: u64,
}

/// One run of pages with equal (masked) categories, as the ioctl reports
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The pages.
    pub range: VirtRange,
    /// Their categories, masked by the request's `returning`.
    pub categories: ScanCategories,
}

impl page_region {
    /// The one place a kernel region becomes a typed one (the kernel
    /// never returns `end < start`; such a region would read as empty).
    fn typed(&self) -> Region {
        Region {
            range: VirtRange::new(VirtAddr::new(self.start), VirtAddr::new(self.end))
                .unwrap_or_default(),
            categories: ScanCategories::from_bits_retain(self.categories),
        }
    }
}

/// The output buffer of `PAGEMAP_SCAN`: more regions per call means fewer
/// calls.
#[derive(Clone, Debug)]
pub struct RegionBuf {
    regions: Vec<page_region>,
}

impl RegionBuf {
    /// Room for `len` regions (at least one).
    pub fn new(len: usize) -> Self {
        Self {
            regions: vec![page_region::default(); len.max(1)],
        }
    }

    /// The first `n` regions the last call filled in.
    pub fn filled(&self, n: usize) -> impl Iterator<Item = Region> + '_ {
        self.regions[..n.min(self.regions.len())]
            .iter()
            .map(page_region::typed)
    }
}

/// `struct pm_scan_arg` from `<linux/fs.h>`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct pm_scan_arg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<pm_scan_arg>() == 96);
const _: () = assert!(std::mem::size_of::<page_region>() == 24);

/// `PM_SCAN_WP_MATCHING`: write-protect the pages that match.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on VMAs not registered WP-async.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// The request half of `pm_scan_arg` (everything but the output buffer),
/// built from a range and named category masks.
#[derive(Clone, Copy, Debug)]
pub struct ScanRequest {
    range: VirtRange,
    flags: u64,
    max_pages: u64,
    inverted: ScanCategories,
    all_of: ScanCategories,
    any_of: ScanCategories,
    returning: ScanCategories,
}

impl ScanRequest {
    /// Every page of `range` (page aligned; the kernel rounds `end` up),
    /// no conditions, no categories returned.
    pub fn new(range: VirtRange) -> Self {
        Self {
            range,
            flags: 0,
            max_pages: 0,
            inverted: ScanCategories::empty(),
            all_of: ScanCategories::empty(),
            any_of: ScanCategories::empty(),
            returning: ScanCategories::empty(),
        }
    }

    /// Categories to invert before matching (`category_inverted`).
    pub fn inverted(self, c: ScanCategories) -> Self {
        Self {
            inverted: c,
            ..self
        }
    }

    /// All of these must be set (`category_mask`).
    pub fn all_of(self, c: ScanCategories) -> Self {
        Self { all_of: c, ..self }
    }

    /// At least one of these must be set (`category_anyof_mask`).
    pub fn any_of(self, c: ScanCategories) -> Self {
        Self { any_of: c, ..self }
    }

    /// Categories reported, and merged on (`return_mask`).
    pub fn returning(self, c: ScanCategories) -> Self {
        Self {
            returning: c,
            ..self
        }
    }

    /// Stop after this many matching pages (`max_pages`; 0: no limit).
    pub fn max_pages(self, n: u64) -> Self {
        Self {
            max_pages: n,
            ..self
        }
    }

    /// Write-protect the matching pages in the same walk
    /// (`PM_SCAN_WP_MATCHING`), failing with `EPERM` on a VMA not
    /// registered for uffd-wp async (`PM_SCAN_CHECK_WPASYNC`).
    pub fn write_protect(self) -> Self {
        Self {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            ..self
        }
    }

    /// The range asked for.
    pub fn range(&self) -> VirtRange {
        self.range
    }

    /// The same request from `at` on (to resume at `walk_end`).
    fn from(self, at: VirtAddr) -> Self {
        Self {
            range: VirtRange::new(at, self.range.end()).unwrap_or(self.range),
            ..self
        }
    }
}

/// What one `PAGEMAP_SCAN` call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanReply {
    /// Regions written to the front of the buffer.
    pub filled: usize,
    /// Where the walk stopped; the request's end when the range was
    /// finished.
    pub walk_end: VirtAddr,
}

const PAGEMAP_SCAN: Opcode = opcode::read_write::<pm_scan_arg>(b'f', 16);

struct PagemapScan<'a>(&'a mut pm_scan_arg);

// SAFETY: PAGEMAP_SCAN takes a pointer to a `pm_scan_arg` (which we pass),
// writes `walk_end` into it and up to `vec_len` regions into `vec`, and
// returns the number of regions filled, which is the output.
unsafe impl Ioctl for PagemapScan<'_> {
    type Output = usize;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        PAGEMAP_SCAN
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::from_mut(self.0).cast()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<usize> {
        usize::try_from(out).map_err(|_| Errno::INVAL)
    }
}

/// `ioctl(fd, PAGEMAP_SCAN, ...)` with `buf` as the output buffer (`None`:
/// no output, the "write-protect only" call).
///
/// `fd` must be a `/proc/PID/pagemap` fd. `ENOTTY` means the kernel has no
/// PAGEMAP_SCAN (before 6.7); `EINVAL` an unknown category or flag;
/// `ESRCH` a target whose mm is gone; `EPERM` (with
/// [`ScanRequest::write_protect`]) a VMA not registered for uffd-wp async.
pub fn pagemap_scan(
    fd: BorrowedFd<'_>,
    req: &ScanRequest,
    buf: Option<&mut RegionBuf>,
) -> Result<ScanReply, Errno> {
    let (vec, vec_len) = match buf {
        Some(b) => (b.regions.as_mut_ptr() as u64, b.regions.len() as u64),
        None => (0, 0),
    };
    let mut arg = pm_scan_arg {
        size: std::mem::size_of::<pm_scan_arg>() as u64,
        flags: req.flags,
        start: req.range.start().get(),
        end: req.range.end().get(),
        walk_end: 0,
        vec,
        vec_len,
        max_pages: req.max_pages,
        category_inverted: req.inverted.bits(),
        category_mask: req.all_of.bits(),
        category_anyof_mask: req.any_of.bits(),
        return_mask: req.returning.bits(),
    };
    // SAFETY: `arg.vec`/`arg.vec_len` describe the buffer's regions (or
    // nothing), exclusively borrowed for the call; the kernel writes at
    // most `vec_len` regions of the correct layout into it.
    let filled = unsafe { rustix::ioctl::ioctl(fd, PagemapScan(&mut arg)) }?;
    Ok(ScanReply {
        filled,
        walk_end: VirtAddr::new(arg.walk_end),
    })
}

/// Runs `PAGEMAP_SCAN` over the whole request, resuming at `walk_end`
/// whenever `buf` fills, and calls `sink` for every region.
pub fn pagemap_scan_all(
    fd: BorrowedFd<'_>,
    req: &ScanRequest,
    buf: &mut RegionBuf,
    mut sink: impl FnMut(Region),
) -> Result<(), Errno> {
    let mut req = *req;
    while !req.range.is_empty() {
        let reply = pagemap_scan(fd, &req, Some(buf))?;
        buf.filled(reply.filled).for_each(&mut sink);
        if reply.walk_end <= req.range.start() {
            break;
        }
        req = req.from(reply.walk_end);
    }
    Ok(())
}
