//! Dirty-page tracking: which pages were written since the last look, at a
//! cost proportional to the pages that changed.
//!
//! A tracker ([`attach`], [`track_self`]) is two layers:
//!
//! * a **page-table backend** (`pagetable`) that reports the writes the
//!   tracked process's own page tables record, chosen at run time and
//!   named by [`DirtyTracker::backend`]:
//!   * [`TrackerBackend::UffdWpAsync`]: userfaultfd write-protect in async
//!     mode (Linux 6.7+), read and re-armed atomically per page with
//!     `PAGEMAP_SCAN` (`WP_MATCHING`). For another process the userfaultfd
//!     is created inside it (`inject`). PTE markers keep the protection
//!     across swap-out of anon *and* shmem pages.
//!   * [`TrackerBackend::SoftDirty`]: `clear_refs` "4" and pagemap bit 55,
//!     where the kernel has `CONFIG_MEM_SOFT_DIRTY`.
//!   * [`TrackerBackend::AllDirty`]: every page, every time (a fallback
//!     that is never silent: [`DirtyTracker::degraded`] says why).
//! * the **shared-object layer** (`objects`), the same for every
//!   backend: a write to a shared object (memfd, tmpfs, SysV,
//!   `MAP_SHARED|MAP_ANONYMOUS`, shared files) changes the memory of every
//!   process that maps it, whoever wrote it. Writes are joined in object
//!   space (object, page offset): the tracked process's own writes through
//!   a shared mapping, and those of every other process that maps the
//!   object writable, each tracked with its own injected userfaultfd
//!   (`sharers`). Writes no page table records (`write()`, `fallocate()`,
//!   hole punching) are found through the object itself (`notify`).
//!   Where the userfaultfds may be synchronous (not `UFFD_USER_MODE_ONLY`),
//!   shared memory is write-protected synchronously and followed across
//!   fork (`family`): a write is recorded before the writer can go on, so
//!   no short-lived child or exiting sharer is ever missed.
//!
//! Over-reporting is allowed where nothing better exists, and every
//! over-reported range carries its cause ([`WriteSource`]); missing a write
//! is not allowed.

pub(crate) mod family;
pub(crate) mod notify;
pub(crate) mod objects;
pub(crate) mod pagetable;
mod process;
pub(crate) mod sharers;
pub(crate) mod stats;
pub(crate) mod target_uffd;

use std::collections::BTreeMap;

use rustix::io::Errno;
use serde::Serialize;

pub use process::{Adopt, TrackOptions, attach, attach_owned, track_self};
pub use stats::{ChildWrites, VmaWrites, WatchInterval, Watcher};
pub use target_uffd::Device;

use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::error::ErrorKind;
use crate::proc::ProcError;
use crate::rangeset::RangeSet;
use crate::uffd::UffdError;
use crate::vma::ObjectId;

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
    /// Reading the page tables failed.
    #[error(transparent)]
    Scan(#[from] crate::scan::ScanError),
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
    /// Another userfaultfd already write-protects (or otherwise
    /// registers) the target's memory.
    #[error(
        "process {pid} is already tracked by another userfaultfd (another pagescope watch or dump, a VMM's live migration or snapshot, or the program's own); {range} cannot be registered"
    )]
    AlreadyTracked {
        /// The target.
        pid: u32,
        /// The first mapping that is taken.
        range: VirtRange,
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
            Self::Scan(e) => e.kind(),
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
            Self::AlreadyTracked { .. } => ErrorKind::Busy,
            Self::Inject { .. } | Self::Io { .. } => ErrorKind::Other,
        }
    }
}

/// The mechanism behind a tracker's page-table layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// Why a range is reported written. Everything but [`Tracked`] and
/// [`SharedWriter`] is an over-report with a named cause (documented in
/// `docs/json.md`).
///
/// [`Tracked`]: WriteSource::Tracked
/// [`SharedWriter`]: WriteSource::SharedWriter
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteSource {
    /// The kernel saw this process write the page (uffd-wp or soft-dirty),
    /// or the same object page through another of its mappings.
    Tracked,
    /// Another process wrote this object page through its own mapping
    /// (tracked in that process, page by page).
    SharedWriter,
    /// A mapping that appeared, grew or moved since the last collect (or
    /// the process executed a new program): all of it, since its earlier
    /// contents are unknown.
    NewMapping,
    /// A mapping that cannot be tracked (see the notes): every time.
    Untracked,
    /// Object pages that became holes (`fallocate` punch, `MADV_REMOVE`):
    /// exactly those pages, found by comparing the object's data extents.
    ObjectPunched,
    /// Object pages that were holes and now hold data with no tracked
    /// write: written by a process that mapped the object and went away
    /// between two collects, or read-faulted (an over-report). Exactly
    /// those pages.
    ObjectFilled,
    /// The object was written by a system call (`write`, `pwrite`,
    /// `fallocate`, `truncate`, `copy_file_range`, `splice`), seen through
    /// fsnotify: all its pages.
    ObjectSyscall,
    /// A memfd whose descriptors fsnotify cannot see (Linux 6.14+ pseudo
    /// files): a process holding one made write system calls and the
    /// memfd's mtime moved: all its pages.
    ObjectDescriptorWrite,
    /// A process started mapping the object writable since the last
    /// collect; its writes before it was tracked are unknown: all pages.
    ObjectNewSharer,
    /// A tracked writer exited, executed a new program or unmapped the
    /// object; its last writes are unknown: all pages.
    ObjectSharerGone,
    /// A process maps the object writable but cannot be tracked (no
    /// privilege, already tracked by another userfaultfd): all pages.
    ObjectSharerUntracked,
    /// `--no-sharers`: another process maps the object writable and is
    /// not tracked: all pages.
    ObjectForeignWriter,
    /// The object could not be opened, so system-call writes to it cannot
    /// be seen: all pages.
    ObjectUnopened,
    /// `strict_shared`: every shared object, every time.
    ObjectStrict,
}

impl WriteSource {
    /// Whether the range was seen written page by page (no over-report).
    pub fn is_exact(self) -> bool {
        matches!(
            self,
            Self::Tracked | Self::SharedWriter | Self::ObjectPunched
        )
        // ObjectFilled is page-exact too, but may include pages that were
        // only read.
    }
}

/// A range reported written, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The addresses.
    pub range: VirtRange,
    /// Why.
    pub source: WriteSource,
}

/// Writes into one shared object during a collect, in object space.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectWrites {
    /// The object.
    pub object: ObjectId,
    /// Its path as the tracked process's maps show it.
    pub path: String,
    /// Distinct object pages reported written (what the tracked process
    /// sees change, over-reports included).
    pub written_pages: u64,
    /// Object pages written per writer PID, page by page (the tracked
    /// process included when it wrote through a shared mapping).
    pub writers: BTreeMap<u32, u64>,
    /// Object pages per source.
    pub sources: Vec<(WriteSource, u64)>,
    /// Why any over-report happened (one line each).
    pub causes: Vec<String>,
}

/// Something that happened to the tracked process or its sharers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrackEvent {
    /// The process executed a new program; tracking was set up again on
    /// the new image and all its memory is reported once.
    Exec {
        /// The process.
        pid: u32,
        /// Whether tracking is back (`false`: see `degraded`).
        reattached: bool,
    },
    /// The process forked a child (listed once, when first seen).
    Fork {
        /// The new child.
        child: u32,
    },
    /// Another process that maps a watched object writable is now
    /// tracked.
    SharerAttached {
        /// The other process.
        pid: u32,
    },
    /// A tracked sharer went away.
    SharerGone {
        /// The other process.
        pid: u32,
    },
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
    /// Writes per shared object the process maps (objects with none are
    /// left out).
    pub objects: Vec<ObjectWrites>,
    /// What happened since the last collect.
    pub events: Vec<TrackEvent>,
    /// The process's live children.
    pub children: Vec<u32>,
    /// Forks by the process and its descendants since the last collect,
    /// counted from `UFFD_EVENT_FORK` (0 when shared mappings are not
    /// tracked synchronously: then only `children` and `Fork` events).
    pub forks: u64,
    /// Whether shared mappings are tracked synchronously across fork
    /// (every write by every descendant seen, however short-lived).
    pub forks_tracked: bool,
    /// The process exited since the last collect: this is what could
    /// still be collected (the writes to its shared memory, by it and by
    /// others; its private writes since the last collect are lost with its
    /// page tables). Only with [`TrackOptions::report_exit`].
    pub partial: bool,
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

    /// The sources that report the page holding `addr`.
    pub fn sources_at(&self, addr: VirtAddr) -> Vec<WriteSource> {
        let mut v: Vec<_> = self
            .written
            .iter()
            .filter(|w| w.range.contains(addr))
            .map(|w| w.source)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Pages per source.
    pub fn pages_by_source(&self) -> Vec<(WriteSource, u64)> {
        let mut by: BTreeMap<WriteSource, RangeSet> = BTreeMap::new();
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
    /// The page-table mechanism in use.
    fn backend(&self) -> TrackerBackend;

    /// Pages written since the last collect (since attaching, for the
    /// first), and re-arms tracking for them. A page written while the
    /// collect runs is reported now or next time, never lost.
    fn collect(&mut self) -> Result<DirtyReport, TrackError>;

    /// Why the tracker reports more than was written, if it has fallen
    /// back to a mechanism that cannot tell (`None`: tracking is exact up
    /// to the named over-reports).
    fn degraded(&self) -> Option<String>;

    /// Notes on what the tracker cannot see or had to fall back on.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// The fd number of the userfaultfd the target keeps open for the
    /// next tracker ([`TrackOptions::keep_in_target`]), if it does.
    fn kept_in_target(&self) -> Option<i32> {
        None
    }
}
