//! userfaultfd: creation and the `UFFDIO_API`, `UFFDIO_REGISTER` and
//! `UFFDIO_UNREGISTER` ioctls used for write-protect dirty tracking, and
//! `UFFDIO_COPY` / `UFFDIO_WAKE` for post-copy (missing-page faults).
//!
//! Async write-protect (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) lets the kernel
//! resolve write faults itself, so no fault-reading thread is needed; dirty
//! pages are then read and re-protected with `PAGEMAP_SCAN`.
//!
//! # References
//! - `userfaultfd(2)`, `ioctl_userfaultfd(2)`
//! - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html>

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater, opcode};
use rustix::mm::UserfaultfdFlags;

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (6.4).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (6.7).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_FEATURE_EVENT_FORK` (4.11): a fork by the uffd's mm copies the
/// registration into the child and hands the reader the child's uffd.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP` (4.11): `mremap` of a registered range keeps
/// the registration and is reported.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_THREAD_ID` (4.14): fault messages carry the faulting
/// thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_USER_MODE_ONLY` (5.11): only user-mode faults are handled.
pub const UFFD_USER_MODE_ONLY: u32 = 1;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages not present (post-copy).
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFD_FEATURE_MISSING_SHMEM` (4.11): missing-page faults of shmem.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct uffdio_api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct uffdio_range {
    start: u64,
    len: u64,
}

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct uffdio_register {
    range: uffdio_range,
    mode: u64,
    ioctls: u64,
}

const _: () = assert!(std::mem::size_of::<uffdio_api>() == 24);
const _: () = assert!(std::mem::size_of::<uffdio_register>() == 32);

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write to a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bytes of one `struct uffd_msg`.
pub const UFFD_MSG_BYTES: usize = 32;

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct uffdio_writeprotect {
    range: uffdio_range,
    mode: u64,
}

const _: () = assert!(std::mem::size_of::<uffdio_writeprotect>() == 24);

#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct uffdio_copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const _: () = assert!(std::mem::size_of::<uffdio_copy>() == 40);

const UFFDIO_WAKE: Opcode = opcode::read::<uffdio_range>(0xAA, 0x02);
const UFFDIO_COPY: Opcode = opcode::read_write::<uffdio_copy>(0xAA, 0x03);
const UFFDIO_WRITEPROTECT: Opcode = opcode::read_write::<uffdio_writeprotect>(0xAA, 0x06);
const UFFDIO_API: Opcode = opcode::read_write::<uffdio_api>(0xAA, 0x3F);
const UFFDIO_REGISTER: Opcode = opcode::read_write::<uffdio_register>(0xAA, 0x00);
const UFFDIO_UNREGISTER: Opcode = opcode::read::<uffdio_range>(0xAA, 0x01);
/// `USERFAULTFD_IOC_NEW` (`_IO(0xAA, 0x00)`): a new uffd from `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// Creates a userfaultfd for the calling process: `userfaultfd(2)`, and if
/// that is refused, `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` (6.1+).
///
/// `user_mode_only` adds `UFFD_USER_MODE_ONLY` (5.11+), which unprivileged
/// callers need when `vm.unprivileged_userfaultfd = 0`; write-protect
/// tracking works the same with it.
pub fn userfaultfd(user_mode_only: bool) -> Result<OwnedFd, Errno> {
    let mut flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    if user_mode_only {
        flags |= UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
    }
    // SAFETY: creating a userfaultfd is harmless by itself; the fd only gains
    // power once ranges are registered, which callers do explicitly.
    match unsafe { rustix::mm::userfaultfd(flags) } {
        Ok(fd) => Ok(fd),
        Err(first) => dev_userfaultfd(flags).map_err(|_| first),
    }
}

/// Opens `/dev/userfaultfd` (6.1+; root-only by default). A uffd made
/// from it with `USERFAULTFD_IOC_NEW` binds to the mm of the process that
/// calls the ioctl, not of the one that opened the device, and is never
/// limited to user mode: pagescope hands it to an unprivileged target
/// (`crate::sys::inject`).
pub fn open_device() -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        "/dev/userfaultfd",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

fn dev_userfaultfd(flags: UserfaultfdFlags) -> Result<OwnedFd, Errno> {
    let dev = open_device()?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the userfaultfd flags by value and
    // returns a new fd, which we take ownership of exactly once.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&dev),
            USERFAULTFD_IOC_NEW as libc::c_ulong,
            flags.bits(),
        )
    };
    if rc < 0 {
        return Err(super::last_errno());
    }
    // SAFETY: a non-negative return value is a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// `ioctl(uffd, UFFDIO_API, {UFFD_API, features})`: the handshake, once per
/// fd. Returns the features the kernel enabled (for `features == 0`, every
/// feature it supports). `EINVAL` if a requested feature is unknown.
pub fn uffdio_api(uffd: BorrowedFd<'_>, features: u64) -> Result<u64, Errno> {
    let mut api = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`.
    unsafe { rustix::ioctl::ioctl(uffd, Updater::<UFFDIO_API, uffdio_api>::new(&mut api)) }?;
    Ok(api.features)
}

/// `ioctl(uffd, UFFDIO_REGISTER, {start, len, mode})`.
pub fn uffdio_register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<(), Errno> {
    let mut reg = uffdio_register {
        range: uffdio_range { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`; it
    // affects the mm the uffd was created for, never our memory directly.
    unsafe {
        rustix::ioctl::ioctl(
            uffd,
            Updater::<UFFDIO_REGISTER, uffdio_register>::new(&mut reg),
        )
    }
}

/// `ioctl(uffd, UFFDIO_UNREGISTER, {start, len})`.
pub fn uffdio_unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut range = uffdio_range { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
    unsafe {
        rustix::ioctl::ioctl(
            uffd,
            Updater::<UFFDIO_UNREGISTER, uffdio_range>::new(&mut range),
        )
    }
}

/// `ioctl(uffd, UFFDIO_WRITEPROTECT, {start, len, mode})`: write-protect
/// the range (`protect`), or remove the protection and wake the threads
/// waiting on a fault in it (5.7+ anonymous, 5.19+ shmem).
pub fn uffdio_writeprotect(
    uffd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    protect: bool,
) -> Result<(), Errno> {
    let mut wp = uffdio_writeprotect {
        range: uffdio_range { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads one `uffdio_writeprotect`; it
    // changes the page tables of the uffd's mm, never our memory.
    unsafe {
        rustix::ioctl::ioctl(
            uffd,
            Updater::<UFFDIO_WRITEPROTECT, uffdio_writeprotect>::new(&mut wp),
        )
    }
}

/// One `uffd_msg`: the event, and for a page fault its flags and address.
/// The three argument words are kept raw: for `UFFD_EVENT_FORK` the low
/// half of `flags` is the child's uffd (installed in the reader's fd table
/// by the `read()`), for `UFFD_EVENT_REMAP` they are `from`, `to`, `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultMsg {
    /// `msg.event`.
    pub event: u8,
    /// `msg.arg.pagefault.flags` (`arg.fork.ufd`, `arg.remap.from`).
    pub flags: u64,
    /// `msg.arg.pagefault.address` (`arg.remap.to`).
    pub address: u64,
    /// `msg.arg.pagefault.feat.ptid` (`UFFD_FEATURE_THREAD_ID`;
    /// `arg.remap.len`).
    pub third: u64,
}

impl FaultMsg {
    /// For `UFFD_EVENT_FORK`: the child's userfaultfd, now owned by the
    /// caller of [`read_msgs`].
    pub fn take_fork_fd(&self) -> Option<OwnedFd> {
        if self.event != UFFD_EVENT_FORK {
            return None;
        }
        let fd = i32::try_from(self.flags & 0xffff_ffff).ok()?;
        // SAFETY: the kernel installed this fd in our table when the
        // message was read (`resolve_userfault_fork`); nobody else knows
        // it, and each message is taken once by its reader.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Reads the pending messages (`read(2)` of whole `uffd_msg`s) into
/// `out`; nothing when none is pending (`EAGAIN` on a non-blocking fd).
pub fn read_msgs(uffd: BorrowedFd<'_>, out: &mut Vec<FaultMsg>) -> Result<(), Errno> {
    let mut buf = [0u8; UFFD_MSG_BYTES * 64];
    let n = match rustix::io::read(uffd, &mut buf) {
        Ok(n) => n,
        Err(Errno::AGAIN | Errno::INTR) => return Ok(()),
        Err(e) => return Err(e),
    };
    for m in buf[..n].chunks_exact(UFFD_MSG_BYTES) {
        let u64_at = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().unwrap_or_default());
        out.push(FaultMsg {
            event: m[0],
            flags: u64_at(8),
            address: u64_at(16),
            third: u64_at(24),
        });
    }
    Ok(())
}

/// `ioctl(uffd, UFFDIO_COPY, {dst, src, len})`: fills the missing pages at
/// `dst` in the uffd's mm with `src` (our memory) and wakes the threads
/// waiting on them. `EEXIST` if a page there is already present (never
/// overwritten), `EAGAIN` while the mm's layout changes, `ENOENT`/`ESRCH`
/// once the range or the mm is gone.
pub fn uffdio_copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> Result<(), Errno> {
    let mut c = uffdio_copy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which `src` borrows
    // for the call, and writes only the `copy` field of `c`; the pages it
    // fills belong to the uffd's mm, never our memory.
    unsafe { rustix::ioctl::ioctl(uffd, Updater::<UFFDIO_COPY, uffdio_copy>::new(&mut c)) }
}

/// `ioctl(uffd, UFFDIO_WAKE, {start, len})`: wakes the threads waiting on
/// a fault in the range (a page filled another way).
pub fn uffdio_wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut range = uffdio_range { start, len };
    // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
    unsafe { rustix::ioctl::ioctl(uffd, Updater::<UFFDIO_WAKE, uffdio_range>::new(&mut range)) }
}
