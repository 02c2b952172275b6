//! `mincore(2)` on a private, never-touched, read-only shared mapping of a
//! file: which pages of the *object* are in the page cache or swap cache.
//!
//! The mapping exists only for the duration of the call and is never read or
//! written, so nothing is faulted in (no fault-around, no hole allocation:
//! see kernel-interfaces.md traps 5 and 7). Mapping an object does not change
//! the mapcount of its pages, so the target's later `MADV_PAGEOUT` is
//! unaffected.
//!
//! # References
//! - `mincore(2)`; since 5.2 the page-cache state of file mappings is only
//!   reported to callers that own the file or may write it.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// Fills `out[i]` with bit 0 = "page `offset/page + i` of `fd` is in core".
///
/// `offset` must be page aligned; `out.len()` pages are examined.
pub fn mincore_file(
    fd: BorrowedFd<'_>,
    offset: u64,
    page_size: u64,
    out: &mut [u8],
) -> Result<(), Errno> {
    if out.is_empty() {
        return Ok(());
    }
    let len = usize::try_from(page_size)
        .ok()
        .and_then(|p| p.checked_mul(out.len()))
        .ok_or(Errno::OVERFLOW)?;
    // SAFETY: a fresh mapping chosen by the kernel (null hint) cannot alias
    // any Rust object; it is only passed to mincore and munmap below and is
    // never dereferenced.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED | MapFlags::NORESERVE,
            fd,
            offset,
        )
    }?;
    // SAFETY: `map..map+len` is the mapping created above and `out` holds one
    // byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(map, len, out.as_mut_ptr()) };
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(super::last_errno())
    };
    // SAFETY: unmaps exactly the mapping created above; nothing refers to it.
    unsafe { rustix::mm::munmap(map, len) }?;
    result
}

/// `mincore(addr, len, vec)` on the *caller's own* address space.
///
/// Used by the fixture to verify its own layout (swap cache vs. swapped out
/// for its own anonymous pages). Returns `ENOMEM` for unmapped ranges.
pub fn mincore_self(addr: *const c_void, len: usize, out: &mut [u8]) -> Result<(), Errno> {
    let page = rustix::param::page_size();
    if out.len() < len.div_ceil(page) {
        return Err(Errno::INVAL);
    }
    // SAFETY: mincore only inspects page tables; it never dereferences `addr`.
    // The kernel writes ceil(len / page) bytes to `out`, sized just above.
    let rc = unsafe { libc::mincore(addr.cast_mut(), len, out.as_mut_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(super::last_errno())
    }
}
