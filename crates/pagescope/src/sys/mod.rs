//! Raw kernel ABI, one module per kernel interface.
//!
//! This is the only place in the crate with `unsafe` code. Each module keeps
//! the kernel's struct and field names, checks struct sizes at compile time,
//! and exposes safe functions taking owned or borrowed fds and slices.
//! Everything above `sys` speaks in [`VirtRange`](crate::VirtRange),
//! [`ScanCategories`](crate::ScanCategories) and friends.
//!
//! Return values use [`rustix::io::Errno`] so callers can match on the
//! specific errno (`ENOTTY` means "no such ioctl", `EINVAL` an unknown flag).

#![allow(unsafe_code)]

pub mod bpf;
pub mod cachestat;
pub mod inject;
pub mod kcmp;
pub mod lru_drain;
pub mod mincore;
pub mod mm;
pub mod pagemap;
pub mod pagemap_scan;
pub mod pidfd;
pub mod process_madvise;
pub mod process_vm;
pub mod ptrace;
pub mod restart;
pub mod uffd;

use rustix::io::Errno;

/// The calling thread's `errno` as an [`Errno`].
pub(crate) fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}
