//! userfaultfd write-protect, in two modes that are two types:
//!
//! * [`Userfaultfd`]: *async* (`UFFD_FEATURE_WP_ASYNC`), with
//!   `PAGEMAP_SCAN` arming and get-and-reset on top of it (the only type
//!   with those operations);
//! * [`SyncUserfaultfd`]: *synchronous*: every first write to a protected
//!   page is a fault message a reader must answer with
//!   `UFFDIO_WRITEPROTECT` (the only type with those operations; a
//!   `PAGEMAP_SCAN` collect would find nothing on it).
//!
//! With `UFFD_FEATURE_WP_ASYNC` (Linux 6.7) the kernel resolves write
//! faults on protected pages by itself (no fault reader is needed) and
//! clears the page's uffd-wp bit; `PAGEMAP_SCAN` with `WP_MATCHING` then
//! reports those pages as `PAGE_IS_WRITTEN` and re-protects them in the
//! same page-table walk. `WP_UNPOPULATED` (6.4, implied by WP_ASYNC on
//! 6.18) makes empty slots protected too, via PTE markers.
//!
//! A userfaultfd only tracks the mm of the process that created it; to
//! track another process, the fd must be created inside it (see
//! [`crate::dirty`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;

use crate::addr::VirtRange;
use crate::error::ErrorKind;
use crate::sys::pagemap_scan::{
    RegionBuf, ScanCategories, ScanRequest, pagemap_scan, pagemap_scan_all,
};
use crate::sys::uffd as raw;

/// Errors from userfaultfd operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// The fd could not be created.
    #[error("cannot create a userfaultfd (needs root, CAP_SYS_PTRACE, or UFFD_USER_MODE_ONLY)")]
    Create {
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// `UFFDIO_API` refused the features.
    #[error("userfaultfd API handshake refused features {features:#x}")]
    Api {
        /// Requested features.
        features: u64,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks write-protect async mode.
    #[error("the kernel lacks userfaultfd WP_ASYNC (Linux 6.7+)")]
    NoWpAsync,
    /// `UFFDIO_REGISTER` failed.
    #[error("cannot register {range} for uffd write-protect")]
    Register {
        /// The range.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("cannot unregister {range} from userfaultfd")]
    Unregister {
        /// The range.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("cannot change the write protection of {range}")]
    WriteProtect {
        /// The range.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Reading fault messages failed.
    #[error("cannot read userfaultfd messages")]
    Read {
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// `PAGEMAP_SCAN` (arming or get-and-reset) failed.
    #[error("PAGEMAP_SCAN write-protect of {range} failed")]
    Scan {
        /// The range.
        range: VirtRange,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

impl UffdError {
    /// The errno behind the error, if any.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::NoWpAsync => None,
            Self::Create { source }
            | Self::Api { source, .. }
            | Self::Register { source, .. }
            | Self::Unregister { source, .. }
            | Self::WriteProtect { source, .. }
            | Self::Read { source }
            | Self::Scan { source, .. } => Errno::from_io_error(source),
        }
    }

    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        if matches!(self, Self::NoWpAsync) {
            return ErrorKind::Unsupported;
        }
        match self.errno() {
            Some(Errno::PERM | Errno::ACCESS) => ErrorKind::PermissionDenied,
            Some(Errno::NOSYS | Errno::NOTTY) => ErrorKind::Unsupported,
            Some(Errno::SRCH) => ErrorKind::TargetExited,
            _ => ErrorKind::Other,
        }
    }
}

/// A userfaultfd after its handshake: what both modes share.
#[derive(Debug)]
struct Handshaken {
    fd: OwnedFd,
    features: u64,
}

impl Handshaken {
    fn register_wp(&self, range: VirtRange) -> Result<(), UffdError> {
        raw::uffdio_register(
            self.fd.as_fd(),
            range.start().get(),
            range.len(),
            raw::UFFDIO_REGISTER_MODE_WP,
        )
        .map_err(|e| UffdError::Register {
            range,
            source: e.into(),
        })
    }

    fn unregister(&self, range: VirtRange) -> Result<(), UffdError> {
        raw::uffdio_unregister(self.fd.as_fd(), range.start().get(), range.len()).map_err(|e| {
            UffdError::Unregister {
                range,
                source: e.into(),
            }
        })
    }
}

/// A userfaultfd set up for write-protect *async* tracking: writes are
/// resolved by the kernel and found later with `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Userfaultfd(Handshaken);

/// A userfaultfd set up for *synchronous* write-protect: every write to a
/// protected page blocks the writer until [`Self::write_protect`] lifts the
/// protection.
#[derive(Debug)]
pub struct SyncUserfaultfd(Handshaken);

/// The features pagescope asks for.
fn wanted_features(available: u64) -> u64 {
    raw::UFFD_FEATURE_WP_ASYNC
        | raw::UFFD_FEATURE_WP_UNPOPULATED
        | (available & raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
}

impl Userfaultfd {
    /// Creates a userfaultfd for the calling process in WP-async mode
    /// (`userfaultfd(2)`, falling back to `UFFD_USER_MODE_ONLY` and
    /// `/dev/userfaultfd`).
    pub fn new_wp_async() -> Result<Self, UffdError> {
        let available = probe_features()?;
        let fd = raw::userfaultfd(false)
            .or_else(|_| raw::userfaultfd(true))
            .map_err(|e| UffdError::Create { source: e.into() })?;
        Self::handshake(fd, available)
    }

    /// Takes a userfaultfd that already went through the handshake (one an
    /// earlier tracker set up and left in a target). Its features are
    /// assumed to be what pagescope asks for on this kernel.
    pub fn adopt(fd: OwnedFd) -> Result<Self, UffdError> {
        let available = probe_features()?;
        Ok(Self(Handshaken {
            fd,
            features: wanted_features(available),
        }))
    }

    /// Takes a userfaultfd created elsewhere (e.g. inside another process)
    /// and performs the API handshake in WP-async mode.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, UffdError> {
        let available = probe_features()?;
        Self::handshake(fd, available)
    }

    fn handshake(fd: OwnedFd, available: u64) -> Result<Self, UffdError> {
        if available & raw::UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(UffdError::NoWpAsync);
        }
        let want = wanted_features(available);
        let features = raw::uffdio_api(fd.as_fd(), want).map_err(|e| UffdError::Api {
            features: want,
            source: e.into(),
        })?;
        Ok(Self(Handshaken { fd, features }))
    }

    /// Write-protects every page of `range` (arming; see [`wp_arm`]).
    /// `pagemap` is the pagemap of the process that created this uffd.
    pub fn arm(&self, pagemap: BorrowedFd<'_>, range: VirtRange) -> Result<(), UffdError> {
        wp_arm(pagemap, range)
    }

    /// The pages of `range` written since they were last protected,
    /// protected again (see [`wp_get_and_reset`]).
    pub fn get_and_reset(
        &self,
        pagemap: BorrowedFd<'_>,
        range: VirtRange,
        buf: &mut RegionBuf,
        sink: impl FnMut(VirtRange),
    ) -> Result<(), UffdError> {
        wp_get_and_reset(pagemap, range, buf, sink)
    }

    /// Empty slots of `range` in uffd-wp async VMAs that carry no protection
    /// (no marker) and are not reported written: what kernels before the 2026
    /// PMD-hole fix leave after `MADV_DONTNEED` of a write-protected THP.
    /// Read only: nothing is re-armed.
    pub fn unprotected_holes(
        &self,
        pagemap: BorrowedFd<'_>,
        range: VirtRange,
        buf: &mut RegionBuf,
    ) -> Result<Vec<VirtRange>, UffdError> {
        let c = ScanCategories::PRESENT | ScanCategories::SWAPPED | ScanCategories::WRITTEN;
        let req = ScanRequest::new(range)
            .inverted(c)
            .all_of(c | ScanCategories::WPALLOWED)
            .returning(ScanCategories::WPALLOWED);
        let mut holes = Vec::new();
        scan_ranges(pagemap, &req, buf, |h| holes.push(h))?;
        Ok(holes)
    }
}

/// What both modes offer: the features, registration, the fd.
macro_rules! common_ops {
    ($t:ty) => {
        impl $t {
            /// The features enabled on this fd.
            pub fn features(&self) -> u64 {
                self.0.features
            }

            /// Whether shmem and hugetlbfs VMAs can be write-protected.
            pub fn supports_shmem(&self) -> bool {
                self.0.features & raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0
            }

            /// `UFFDIO_REGISTER` with `MODE_WP` on `range`.
            pub fn register_wp(&self, range: VirtRange) -> Result<(), UffdError> {
                self.0.register_wp(range)
            }

            /// `UFFDIO_UNREGISTER` of `range`.
            pub fn unregister(&self, range: VirtRange) -> Result<(), UffdError> {
                self.0.unregister(range)
            }

            /// The raw fd.
            pub fn as_fd(&self) -> BorrowedFd<'_> {
                self.0.fd.as_fd()
            }
        }
    };
}
common_ops!(Userfaultfd);
common_ops!(SyncUserfaultfd);

impl SyncUserfaultfd {
    /// Takes a userfaultfd created elsewhere and performs the handshake
    /// for *synchronous* write-protect: every write to a protected page
    /// blocks the writer until [`Self::write_protect`] lifts the
    /// protection of that page (what a copy-before-write snapshot needs).
    /// Unpopulated pages are protected too (`WP_UNPOPULATED`, 6.4+), and
    /// shmem when the kernel can (`WP_HUGETLBFS_SHMEM`, 5.19+).
    pub fn from_fd_sync_wp(fd: OwnedFd) -> Result<Self, UffdError> {
        let available = probe_features()?;
        let want =
            raw::UFFD_FEATURE_WP_UNPOPULATED | (available & raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        let features = raw::uffdio_api(fd.as_fd(), want).map_err(|e| UffdError::Api {
            features: want,
            source: e.into(),
        })?;
        Ok(Self(Handshaken { fd, features }))
    }

    /// Takes a userfaultfd created inside a tracked process and performs
    /// the handshake for *synchronous* write-protect of its shared
    /// mappings, followed across fork: `UFFD_FEATURE_EVENT_FORK` (4.11)
    /// gives every child its own copy of the registration (and the reader
    /// the child's uffd), `EVENT_REMAP` (4.11) keeps it across `mremap`,
    /// `THREAD_ID` (4.14) names the faulting thread, `WP_UNPOPULATED`
    /// (6.4) protects empty slots, `WP_HUGETLBFS_SHMEM` (5.19) shmem.
    pub fn from_fd_sync_family(fd: OwnedFd) -> Result<Self, UffdError> {
        let available = probe_features()?;
        let need = raw::UFFD_FEATURE_EVENT_FORK
            | raw::UFFD_FEATURE_EVENT_REMAP
            | raw::UFFD_FEATURE_THREAD_ID
            | raw::UFFD_FEATURE_WP_UNPOPULATED
            | raw::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        if available & need != need {
            return Err(UffdError::Api {
                features: need & !available,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let features = raw::uffdio_api(fd.as_fd(), need).map_err(|e| UffdError::Api {
            features: need,
            source: e.into(),
        })?;
        Ok(Self(Handshaken { fd, features }))
    }

    /// A child's userfaultfd received in a `UFFD_EVENT_FORK` message: the
    /// kernel copied its parent's features, no handshake is needed.
    pub fn forked(fd: OwnedFd, features: u64) -> Self {
        Self(Handshaken { fd, features })
    }

    /// Reads the pending messages (none if nothing is pending).
    pub fn read_msgs(&self, out: &mut Vec<raw::FaultMsg>) -> Result<(), UffdError> {
        raw::read_msgs(self.0.fd.as_fd(), out).map_err(|e| UffdError::Read { source: e.into() })
    }

    /// `UFFDIO_WRITEPROTECT` of `range`: protect, or unprotect and wake
    /// the writers waiting in it.
    pub fn write_protect(&self, range: VirtRange, protect: bool) -> Result<(), UffdError> {
        raw::uffdio_writeprotect(self.0.fd.as_fd(), range.start().get(), range.len(), protect)
            .map_err(|e| UffdError::WriteProtect {
                range,
                source: e.into(),
            })
    }

    /// Waits up to `timeout` for fault messages and returns the addresses
    /// of the write-protect faults among them.
    pub fn wp_faults(&self, timeout: std::time::Duration) -> Result<Vec<u64>, UffdError> {
        let mut pfd = [rustix::event::PollFd::new(
            &self.0.fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => return Ok(Vec::new()),
            Ok(_) => {}
            Err(e) => return Err(UffdError::Read { source: e.into() }),
        }
        let mut msgs = Vec::new();
        raw::read_msgs(self.0.fd.as_fd(), &mut msgs)
            .map_err(|e| UffdError::Read { source: e.into() })?;
        Ok(msgs
            .into_iter()
            .filter(|m| {
                m.event == raw::UFFD_EVENT_PAGEFAULT && m.flags & raw::UFFD_PAGEFAULT_FLAG_WP != 0
            })
            .map(|m| m.address)
            .collect())
    }
}

/// Features the kernel supports (a throwaway fd's `UFFDIO_API` with 0).
fn probe_features() -> Result<u64, UffdError> {
    let fd = raw::userfaultfd(false)
        .or_else(|_| raw::userfaultfd(true))
        .map_err(|e| UffdError::Create { source: e.into() })?;
    raw::uffdio_api(fd.as_fd(), 0).map_err(|e| UffdError::Api {
        features: 0,
        source: e.into(),
    })
}

// The bare `PAGEMAP_SCAN` calls below are hidden: the API is the methods
// of [`Userfaultfd`] (async mode only); benchmarks call them directly.

/// Write-protects every page of `range` (arming): `PAGEMAP_SCAN` with
/// `WP_MATCHING|CHECK_WPASYNC` and no output buffer. `pagemap` is the
/// pagemap of the process whose uffd registered the range.
///
/// With `CHECK_WPASYNC`, a range touching an unregistered VMA fails with
/// `EPERM`; earlier VMAs may already be protected (the call is not atomic).
#[doc(hidden)]
pub fn wp_arm(pagemap: BorrowedFd<'_>, range: VirtRange) -> Result<(), UffdError> {
    let req = ScanRequest::new(range).write_protect();
    pagemap_scan(pagemap, &req, None).map_err(|e| UffdError::Scan {
        range,
        source: e.into(),
    })?;
    Ok(())
}

/// Reports the pages of `range` written since they were last protected,
/// and protects them again, atomically per page (`PAGEMAP_SCAN` with
/// `WP_MATCHING|CHECK_WPASYNC`, `category_mask = return_mask = WRITTEN`).
/// `buf` is scratch space; larger means fewer calls.
#[doc(hidden)]
pub fn wp_get_and_reset(
    pagemap: BorrowedFd<'_>,
    range: VirtRange,
    buf: &mut RegionBuf,
    sink: impl FnMut(VirtRange),
) -> Result<(), UffdError> {
    let req = ScanRequest::new(range)
        .write_protect()
        .all_of(ScanCategories::WRITTEN)
        .returning(ScanCategories::WRITTEN);
    scan_ranges(pagemap, &req, buf, sink)
}

/// `PAGEMAP_SCAN` of `req`, every region reported to `sink` as a range.
fn scan_ranges(
    pagemap: BorrowedFd<'_>,
    req: &ScanRequest,
    buf: &mut RegionBuf,
    mut sink: impl FnMut(VirtRange),
) -> Result<(), UffdError> {
    pagemap_scan_all(pagemap, req, buf, |r| sink(r.range)).map_err(|e| UffdError::Scan {
        range: req.range(),
        source: e.into(),
    })
}
