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

use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

/// `struct page_region` from `<linux/fs.h>`: one run of pages with equal
/// (masked) categories.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct page_region {
    /// First address of the run.
    pub start: u64,
    /// First address after the run.
    pub end: u64,
    /// `PAGE_IS_*` bits of the run, masked by `return_mask`.
    pub categories: u64,
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
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on VMAs not registered WP-async.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// The request half of `pm_scan_arg` (everything but the output buffer).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanRequest {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// First address (page aligned).
    pub start: u64,
    /// End address (rounded up by the kernel).
    pub end: u64,
    /// Stop after this many matching pages (0 = no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// All of these categories must be set.
    pub category_mask: u64,
    /// At least one of these must be set (0 = no condition).
    pub category_anyof_mask: u64,
    /// Categories reported (and merged on).
    pub return_mask: u64,
}

/// What one `PAGEMAP_SCAN` call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanReply {
    /// Regions written to the front of the buffer.
    pub filled: usize,
    /// Where the walk stopped; equal to `end` when the range was finished.
    pub walk_end: u64,
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

/// `ioctl(fd, PAGEMAP_SCAN, ...)` with `vec` as the output buffer.
///
/// `fd` must be a `/proc/PID/pagemap` fd. Returns the number of regions
/// written to `vec` and the `walk_end` address. `ENOTTY` means the kernel
/// has no PAGEMAP_SCAN (before 6.7); `EINVAL` an unknown category or flag;
/// `ESRCH` a target whose mm is gone; `EPERM` (with
/// `PM_SCAN_CHECK_WPASYNC`) a VMA not registered for uffd-wp async.
pub fn pagemap_scan(
    fd: BorrowedFd<'_>,
    req: &ScanRequest,
    vec: &mut [page_region],
) -> Result<ScanReply, Errno> {
    let mut arg = pm_scan_arg {
        size: std::mem::size_of::<pm_scan_arg>() as u64,
        flags: req.flags,
        start: req.start,
        end: req.end,
        walk_end: 0,
        vec: if vec.is_empty() {
            0
        } else {
            vec.as_mut_ptr() as u64
        },
        vec_len: vec.len() as u64,
        max_pages: req.max_pages,
        category_inverted: req.category_inverted,
        category_mask: req.category_mask,
        category_anyof_mask: req.category_anyof_mask,
        return_mask: req.return_mask,
    };
    // SAFETY: `arg.vec`/`arg.vec_len` describe `vec`, which is exclusively
    // borrowed for the call, and the kernel writes at most `vec_len` regions
    // of the correct layout into it.
    let filled = unsafe { rustix::ioctl::ioctl(fd, PagemapScan(&mut arg)) }?;
    Ok(ScanReply {
        filled,
        walk_end: arg.walk_end,
    })
}

/// Runs `PAGEMAP_SCAN` from `req.start` to `req.end`, resuming at
/// `walk_end` whenever `vec` fills, and calls `sink` for every region.
/// `vec` must not be empty.
pub fn pagemap_scan_all(
    fd: BorrowedFd<'_>,
    req: &ScanRequest,
    vec: &mut [page_region],
    mut sink: impl FnMut(&page_region),
) -> Result<(), Errno> {
    let mut req = *req;
    while req.start < req.end {
        let reply = pagemap_scan(fd, &req, vec)?;
        vec[..reply.filled].iter().for_each(&mut sink);
        if reply.walk_end <= req.start {
            break;
        }
        req.start = reply.walk_end;
    }
    Ok(())
}
