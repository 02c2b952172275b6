//! `/proc/PID/pagemap`, `/proc/kpageflags` and `/proc/kpagecount`: arrays of
//! little-endian `u64`, one per page (or per PFN), read with `pread`.
//!
//! # References
//! - <https://docs.kernel.org/admin-guide/mm/pagemap.html>
//! - `proc_pid_pagemap(5)`

use std::os::fd::BorrowedFd;

use rustix::io::Errno;

/// `pread(fd, buf, 8 * buf.len(), 8 * index)`: reads entries `index..` into
/// `buf`. Returns how many whole entries were read; fewer than `buf.len()`
/// means end of file (for pagemap: the target's mm is gone).
pub fn pread_u64s(fd: BorrowedFd<'_>, buf: &mut [u64], index: u64) -> Result<usize, Errno> {
    let offset = index.checked_mul(8).ok_or(Errno::OVERFLOW)?;
    // SAFETY: every bit pattern is a valid u64, the byte view covers exactly
    // the memory of `buf`, and `buf` is not otherwise borrowed while the byte
    // view lives.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(buf))
    };
    let mut done = 0;
    while done < bytes.len() {
        match rustix::io::pread(fd, &mut bytes[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done / 8)
}
