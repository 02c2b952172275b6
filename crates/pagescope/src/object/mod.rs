//! Backing objects of shared and file mappings: the truth pagemap cannot
//! tell.
//!
//! For shmem (memfd, tmpfs and `/dev/shm` files, SysV segments,
//! `MAP_SHARED|MAP_ANONYMOUS`) a swapped-out page, a page in the swap
//! cache, a page resident but not mapped by this process and a hole all
//! read as an empty PTE; for files, cached and uncached pages do. pagescope
//! opens the object (`open`), classifies its pages from the object itself
//! (`classify`, `classify_spans`) once per object, and gives every page
//! the target does not map the object's state (`join`). The inspection
//! driver (`crate::inspect`) decides which objects and pages.
//!
//! `view` holds the per-object view across processes (`pagescope
//! objects`) and its renderings.

pub(crate) mod classify;
pub(crate) mod extents;
pub(crate) mod open;
mod render;
pub(crate) mod view;

use std::os::fd::AsFd;

pub(crate) use classify::Classified;
pub use classify::{ObjectClass, ObjectRun, ObjectState};
pub(crate) use open::{OpenObject, open_object};
use rustix::io::Errno;
pub use view::{
    ObjectReport, ObjectsOptions, ObjectsReport, Sharer, SharerMapping, SkippedProcess,
};

use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};
use crate::error::ErrorKind;
use crate::page::{PageInfo, PageRun, PageState, RunBuilder, UnknownReason};
use crate::rangeset::RangeSet;

impl From<ObjectState> for PageState {
    fn from(s: ObjectState) -> Self {
        match s {
            ObjectState::Resident => PageState::Resident,
            ObjectState::SwapCache => PageState::SwapCache,
            ObjectState::Swapped => PageState::Swapped,
            ObjectState::Fallocated => PageState::Fallocated,
            ObjectState::NotResident => PageState::NotResident,
            ObjectState::Hole => PageState::Hole,
        }
    }
}

/// Why an object could not be examined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// No way of opening it worked.
    #[error("{tried}")]
    Open {
        /// The process whose mapping was followed.
        pid: u32,
        /// The mapping.
        range: VirtRange,
        /// The object's inode.
        inode: u64,
        /// Every way tried, and why it failed.
        tried: String,
        /// The broad class of the failure.
        kind: ErrorKind,
    },
    /// mincore and cachestat refuse to tell the page cache of a file the
    /// caller neither owns nor may write.
    #[error(
        "mincore and cachestat report a file's page cache only to its owner, writers or root (Linux 5.2+)"
    )]
    PageCacheRefused {
        /// The object's inode.
        inode: u64,
    },
    /// hugetlbfs objects are not classified.
    #[error("hugetlbfs objects are not classified")]
    Hugetlb {
        /// The object's inode.
        inode: u64,
    },
    /// A system call of the classification failed.
    #[error("classifying inode {inode} failed")]
    Classify {
        /// The object's inode.
        inode: u64,
        /// The errno.
        #[source]
        source: Errno,
    },
}

impl ObjectError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Open { kind, .. } => *kind,
            Self::PageCacheRefused { .. } => ErrorKind::PermissionDenied,
            Self::Hugetlb { .. } => ErrorKind::Unsupported,
            Self::Classify { .. } => ErrorKind::Other,
        }
    }

    /// The message with its cause, on one line (reports carry it).
    pub fn describe(&self) -> String {
        match self {
            Self::Classify { source, .. } => format!("{self}: {source}"),
            _ => self.to_string(),
        }
    }
}

/// Why mincore/cachestat would not tell us the page-cache state of a file
/// (Linux 5.2+: only to its owner, writers, or the privileged).
fn page_cache_refused(obj: &OpenObject) -> bool {
    if rustix::process::geteuid().is_root() {
        return false;
    }
    let Ok(st) = rustix::fs::fstat(&obj.fd) else {
        return false;
    };
    if st.st_uid == rustix::process::geteuid().as_raw() {
        return false;
    }
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&obj.fd));
    rustix::fs::access(path.as_str(), rustix::fs::Access::WRITE_OK).is_err()
}

/// Classifies the pages `spans` of an opened object of class `class`;
/// `known` are object pages some process maps (in the page cache).
pub(crate) fn classify_spans(
    o: &OpenObject,
    class: Option<ObjectClass>,
    spans: &RangeSet<PageSpan>,
    known: &RangeSet<PageSpan>,
    page: PageSize,
) -> Result<Classified, ObjectError> {
    let inode = o.id.inode;
    let class = class.ok_or(ObjectError::Hugetlb { inode })?;
    if class == ObjectClass::File && page_cache_refused(o) {
        return Err(ObjectError::PageCacheRefused { inode });
    }
    let size_pages = o.size.div_ceil(page.get());
    let mut out = Classified {
        runs: Vec::new(),
        precise: true,
    };
    for span in spans.ranges() {
        let c = classify::classify(o.fd.as_fd(), class, size_pages, *span, page, known)
            .map_err(|source| ObjectError::Classify { inode, source })?;
        out.runs.extend(c.runs);
        out.precise &= c.precise;
    }
    Ok(out)
}

/// Replaces the page-table holes of `runs` with the object's states.
/// `first` is the object page at `start`.
pub(crate) fn join(
    runs: &[PageRun],
    obj: &[ObjectRun],
    first: u64,
    start: VirtAddr,
    page: PageSize,
) -> Vec<PageRun> {
    let mut out = RunBuilder::new(page, true);
    for r in runs {
        if r.state != PageState::Hole {
            out.push_run(r);
            continue;
        }
        let idx = first + r.start.checked_offset_from(start).unwrap_or(0) / page.get();
        let end = idx + r.pages;
        let mut i = obj.partition_point(|o| o.first + o.count <= idx);
        let mut at = idx;
        while at < end {
            let Some(o) = obj.get(i).filter(|o| o.first <= at) else {
                // Not classified (cannot happen for covered spans): hole.
                push_part(&mut out, r, idx, at, end, PageState::Hole, page);
                break;
            };
            let part_end = (o.first + o.count).min(end);
            push_part(&mut out, r, idx, at, part_end, o.state.into(), page);
            at = part_end;
            i += 1;
        }
    }
    out.finish()
}

fn push_part(
    out: &mut RunBuilder,
    r: &PageRun,
    idx: u64,
    from: u64,
    to: u64,
    state: PageState,
    page: PageSize,
) {
    let addr = r.start.saturating_add((from - idx) * page.get());
    out.push(addr, to - from, PageInfo::with(state, r.flags));
}

/// Page-table holes become `unknown`: the object could not be examined.
pub(crate) fn mark_unknown(runs: &[PageRun], page: PageSize) -> Vec<PageRun> {
    let mut out = RunBuilder::new(page, true);
    for r in runs {
        if r.state == PageState::Hole {
            out.push(
                r.start,
                r.pages,
                PageInfo::unknown(UnknownReason::ObjectUnavailable, r.flags),
            );
        } else {
            out.push_run(r);
        }
    }
    out.finish()
}
