//! pidfd helpers rustix does not cover: `pidfd_send_signal(pidfd, 0)`.
//!
//! # References
//! - `pidfd_open(2)`, `pidfd_send_signal(2)` (5.1+), `pidfd_getfd(2)` (5.6+)

use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;

/// `pidfd_send_signal(pidfd, 0, NULL, 0)`: `Ok` while the process exists
/// (including as a zombie), `ESRCH` once it has been reaped. `EPERM` (we
/// may not signal it) still proves it exists, so it counts as `Ok`.
pub fn pidfd_is_alive(pidfd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: signal 0 performs only the existence and permission checks;
    // the null siginfo pointer is explicitly allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    match rc {
        0 => Ok(()),
        _ => match super::last_errno() {
            Errno::PERM => Ok(()),
            e => Err(e),
        },
    }
}
