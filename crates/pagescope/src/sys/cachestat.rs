//! `cachestat(fd, &cstat_range, &cstat, 0)` (syscall 451, since Linux 6.5).
//!
//! Page-cache statistics of a file range without touching any page. For
//! shmem, `nr_evicted` counts swap entries (whether or not the folio is still
//! in the swap cache) and `nr_cache` includes fallocated-unwritten folios.
//!
//! # References
//! - `cachestat(2)`; commit "cachestat: implement cachestat syscall" (6.5)

use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;

#[allow(non_camel_case_types)]
#[repr(C)]
struct cachestat_range {
    off: u64,
    len: u64,
}

/// `struct cachestat` from `<linux/mman.h>`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct cachestat {
    /// Folios in the page cache (shmem: including fallocated-unwritten).
    pub nr_cache: u64,
    /// Dirty folios (always 0 for shmem).
    pub nr_dirty: u64,
    /// Folios under writeback (always 0 for shmem).
    pub nr_writeback: u64,
    /// Evicted pages: shadow entries, or shmem swap entries.
    pub nr_evicted: u64,
    /// Evicted pages whose shadow is recent.
    pub nr_recently_evicted: u64,
}

const _: () = assert!(std::mem::size_of::<cachestat>() == 40);

const SYS_CACHESTAT: libc::c_long = 451;

/// `cachestat(fd, {off, len}, &cs, 0)`; `len == 0` means up to EOF.
///
/// `ENOSYS` before 6.5; `EPERM` for an unprivileged caller on a file it
/// neither owns nor may write (6.14+).
pub fn cachestat(fd: BorrowedFd<'_>, off: u64, len: u64) -> Result<cachestat, Errno> {
    let range = cachestat_range { off, len };
    let mut cs = cachestat::default();
    // SAFETY: both pointers refer to live, correctly laid out structs; the
    // kernel reads `range` and writes `cs`.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &raw const range,
            &raw mut cs,
            0u32,
        )
    };
    if rc == 0 {
        Ok(cs)
    } else {
        Err(super::last_errno())
    }
}
