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
    let all = 0..out.len();
    mincore_file_parts(fd, offset, page_size, out, std::slice::from_ref(&all))
}

/// Like [`mincore_file`], but only the pages in `parts` (index ranges into
/// `out`, in order) are examined: one mapping of the whole span, one
/// `mincore` per part. Bytes outside `parts` are left as they are.
pub fn mincore_file_parts(
    fd: BorrowedFd<'_>,
    offset: u64,
    page_size: u64,
    out: &mut [u8],
    parts: &[std::ops::Range<usize>],
) -> Result<(), Errno> {
    let pages = parts.iter().map(|p| p.end).max().unwrap_or(0);
    if pages == 0 || pages > out.len() {
        return if pages > out.len() {
            Err(Errno::INVAL)
        } else {
            Ok(())
        };
    }
    let page = usize::try_from(page_size).map_err(|_| Errno::OVERFLOW)?;
    let len = page.checked_mul(pages).ok_or(Errno::OVERFLOW)?;
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
    let mut result = Ok(());
    for p in parts.iter().filter(|p| p.start < p.end) {
        // SAFETY: `p` lies inside `0..pages`, so `map + p.start * page` with
        // `(p.end - p.start) * page` bytes is inside the mapping created
        // above, and `out[p]` holds one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                map.cast::<u8>().add(p.start * page).cast(),
                (p.end - p.start) * page,
                out[p.clone()].as_mut_ptr(),
            )
        };
        if rc != 0 {
            result = Err(super::last_errno());
            break;
        }
    }
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
