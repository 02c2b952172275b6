//! Dirty-page tracking: which pages were written since the last look, at a
//! cost proportional to the pages that changed.
//!
//! [`DirtyTracker`] has three backends, chosen at run time ([`attach`],
//! [`track_self`]) and reported by [`DirtyTracker::backend`]:
//!
//! * [`TrackerBackend::UffdWpAsync`]: userfaultfd write-protect in async
//!   mode (Linux 6.7+), read and re-armed atomically per page with
//!   `PAGEMAP_SCAN` (`WP_MATCHING`). For another process the userfaultfd
//!   is created inside it by syscall injection ([`inject`]). PTE markers
//!   keep the protection across swap-out of anon *and* shmem pages.
//! * [`TrackerBackend::SoftDirty`]: `clear_refs` "4" and pagemap bit 55,
//!   where the kernel has `CONFIG_MEM_SOFT_DIRTY`.
//! * [`TrackerBackend::AllDirty`]: every page, every time.
//!
//! Writes no page-table bit can see are caught conservatively
//! (module `watch`): a `write()`/`pwrite()`/`fallocate()` on a mapped object
//! changes its mtime, and an object another process maps writable is
//! reported whole. Over-reporting is allowed; missing a write is not.

pub mod inject;
pub mod stats;
mod track;
mod watch;

use rustix::io::Errno;

pub use track::{TrackOptions, attach, track_self};

use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::error::ErrorKind;
use crate::proc::ProcError;
use crate::rangeset::RangeSet;
use crate::uffd::UffdError;

/// Errors while tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// Reading the target's `/proc` files failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Running a system call inside the target failed.
    #[error("cannot {step} in process {pid}")]
    Inject {
        /// The target.
        pid: u32,
        /// What was being done.
        step: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// An I/O step failed.
    #[error("cannot {what} for process {pid}")]
    Io {
        /// The target.
        pid: u32,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A backend was forced that this kernel or caller cannot use.
    #[error("dirty tracking backend {backend} is unavailable: {why}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Why.
        why: String,
    },
    /// The target exited.
    #[error("process {pid} exited")]
    TargetExited {
        /// The target.
        pid: u32,
    },
}

impl TrackError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Proc(e) => e.kind(),
            Self::Uffd(e) => e.kind(),
            Self::Inject {
                source: Errno::PERM | Errno::ACCESS,
                ..
            } => ErrorKind::PermissionDenied,
            Self::Inject {
                source: Errno::SRCH,
                ..
            }
            | Self::TargetExited { .. } => ErrorKind::TargetExited,
            Self::Inject {
                source: Errno::NOSYS,
                ..
            }
            | Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::Inject { .. } | Self::Io { .. } => ErrorKind::Other,
        }
    }
}

/// The mechanism behind a tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackerBackend {
    /// userfaultfd WP_ASYNC + PAGEMAP_SCAN get-and-reset.
    UffdWpAsync,
    /// Soft-dirty bits and `clear_refs`.
    SoftDirty,
    /// No tracking: everything is reported written.
    AllDirty,
}

impl TrackerBackend {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::UffdWpAsync => "uffd_wp_async",
            Self::SoftDirty => "soft_dirty",
            Self::AllDirty => "all_dirty",
        }
    }
}

/// Why a range is reported written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteSource {
    /// The kernel saw the page written (uffd-wp or soft-dirty), or it is
    /// the same object page seen through another mapping of this process.
    Tracked,
    /// A mapping that appeared, grew or moved since the last collect: all
    /// of it, since its earlier contents are unknown.
    NewMapping,
    /// A mapping that cannot be tracked: reported every time.
    Untracked,
    /// The mapped object changed by `write()`/`pwrite()`/`fallocate()`/
    /// truncate (its mtime or ctime moved): its whole mapped range.
    ObjectSyscall,
    /// Another process maps the object writable: its whole mapped range.
    ObjectForeignWriter,
}

/// A range reported written, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The addresses.
    pub range: VirtRange,
    /// Why.
    pub source: WriteSource,
}

/// What one collect found.
#[derive(Clone, Debug)]
pub struct DirtyReport {
    /// Every range reported, with its source (ranges of different sources
    /// may overlap).
    pub written: Vec<Written>,
    /// Base page size.
    pub page_size: PageSize,
    /// The ranges that were tracked (whatever their result).
    pub tracked: RangeSet,
}

impl DirtyReport {
    /// The written ranges, merged.
    pub fn ranges(&self) -> RangeSet {
        self.written.iter().map(|w| w.range).collect()
    }

    /// The number of distinct written pages.
    pub fn pages(&self) -> u64 {
        self.ranges().pages(self.page_size)
    }

    /// Whether the page holding `addr` is reported written.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.written.iter().any(|w| w.range.contains(addr))
    }

    /// Pages per source.
    pub fn pages_by_source(&self) -> Vec<(WriteSource, u64)> {
        let mut by: std::collections::BTreeMap<WriteSource, RangeSet> = Default::default();
        for w in &self.written {
            by.entry(w.source).or_default().insert(w.range);
        }
        by.into_iter()
            .map(|(s, r)| (s, r.pages(self.page_size)))
            .collect()
    }
}

/// Reports which pages were written since the previous call.
pub trait DirtyTracker {
    /// The mechanism in use.
    fn backend(&self) -> TrackerBackend;

    /// Pages written since the last collect (since attaching, for the
    /// first), and re-arms tracking for them. A page written while the
    /// collect runs is reported now or next time, never lost.
    fn collect(&mut self) -> Result<DirtyReport, TrackError>;

    /// Notes on what the tracker cannot see or had to fall back on.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}
