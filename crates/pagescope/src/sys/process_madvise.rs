//! `process_madvise(2)`: advice on another process's memory, here
//! `MADV_PAGEOUT` (reclaim the pages now).
//!
//! Linux 5.10+; for another process the caller needs ptrace read access
//! (`PTRACE_MODE_READ_FSCREDS`) and, since 5.12, `CAP_SYS_NICE`.
//! `MADV_PAGEOUT` returns success even for pages it skips (mapped by
//! several processes, locked, not on the LRU, no swap space): callers must
//! look at the pages afterwards.
//!
//! # References
//! - `process_madvise(2)`, `madvise(2)` (`MADV_PAGEOUT`, 5.4+)
//! - `mm/madvise.c`: `madvise_cold_or_pageout_pte_range`

use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;

use super::process_vm::{MAX_IOV, remote_iovecs};

/// Applies `advice` (a raw `MADV_*`) to the target's `ranges` (address,
/// length; page aligned) through its pidfd, in as many calls as `MAX_IOV`
/// and partial returns require. Returns the bytes advised.
pub fn advise(pidfd: BorrowedFd<'_>, ranges: &[(u64, usize)], advice: i32) -> Result<usize, Errno> {
    let mut done = 0;
    let mut rest: Vec<(u64, usize)> = ranges.to_vec();
    while !rest.is_empty() {
        let in_batch = rest.len().min(MAX_IOV);
        let iov = remote_iovecs(&rest[..in_batch]);
        // SAFETY: the iovecs name addresses in the *target's* address
        // space; the kernel only reads the iovec array (which lives until
        // the call returns) and never dereferences the ranges in ours.
        let n = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                advice,
                0u32,
            )
        };
        if n < 0 {
            return Err(Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ));
        }
        let mut n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            break;
        }
        done += n;
        // Drop what was advised; a partial return resumes mid-range.
        let mut consumed = 0;
        for r in rest.iter_mut().take(in_batch) {
            if n >= r.1 {
                n -= r.1;
                consumed += 1;
            } else {
                r.0 += n as u64;
                r.1 -= n;
                break;
            }
        }
        rest.drain(..consumed);
    }
    Ok(done)
}
