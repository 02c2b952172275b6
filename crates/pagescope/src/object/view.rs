//! The objects view's types ([`ObjectsReport`], `pagescope objects`): each
//! shared object once with its page states and its sharers, the processes
//! that map it and which parts. They answer what live migration and
//! checkpoint/restore need of shared memory: properties of the object for
//! all its sharers, not per-process page-table hints.
//!
//! `crate::inspect::objects_view` fills them in (the inspection driver
//! wires layout, objects and page tables); `object/render.rs` renders
//! them as text and JSON.

use super::classify::ObjectRun;
use crate::addr::{PageSize, VirtRange};
use crate::error::ErrorKind;
use crate::proc::maps::Perms;
use crate::report::{Counts, ObjectId};
use crate::vma::{Backing, Vma, VmaKind};

/// Options for the objects view (`crate::inspect::objects_view`).
#[derive(Clone, Debug, Default)]
pub struct ObjectsOptions {
    /// Also list regular files mapped only privately (libraries,
    /// executables); shmem objects and files mapped shared are always
    /// listed.
    pub private_files: bool,
}

/// One mapping of an object by a sharer.
#[derive(Clone, Debug)]
pub struct SharerMapping {
    /// The mapping's addresses in the sharer.
    pub range: VirtRange,
    /// Its permissions.
    pub perms: Perms,
    /// First object page it maps.
    pub first_page: u64,
    /// Pages it spans.
    pub pages: u64,
    /// Pages of it present in the sharer's page tables.
    pub present_pages: u64,
}

/// A process mapping an object.
#[derive(Clone, Debug)]
pub struct Sharer {
    /// PID.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// Its mappings of the object.
    pub mappings: Vec<SharerMapping>,
}

/// One object and its sharers.
#[derive(Clone, Debug)]
pub struct ObjectReport {
    /// Device and inode.
    pub id: ObjectId,
    /// Backing class (`shmem` or `file`).
    pub backing: Backing,
    /// Kind (`memfd`, `sysv`, ...).
    pub kind: VmaKind,
    /// A path it is mapped under.
    pub path: String,
    /// Size in pages (0 if it could not be opened).
    pub size_pages: u64,
    /// Object pages per state (`resident` includes pages some sharer maps).
    pub counts: Counts,
    /// Object pages mapped by at least one sharer.
    pub mapped_pages: u64,
    /// The object's pages as runs of equal state.
    pub runs: Vec<ObjectRun>,
    /// The processes mapping it.
    pub sharers: Vec<Sharer>,
    /// Why it could not be opened or classified (from every sharer tried).
    pub error: Option<String>,
}

/// A process that could not be examined.
#[derive(Clone, Debug)]
pub struct SkippedProcess {
    /// PID.
    pub pid: u32,
    /// The broad class of the failure (a process that exited, or never
    /// was, is normal with `--all`).
    pub kind: ErrorKind,
    /// Why, in words.
    pub reason: String,
}

/// The objects of a set of processes.
#[derive(Clone, Debug)]
pub struct ObjectsReport {
    /// Base page size.
    pub page_size: PageSize,
    /// Whether pagescope could open objects through map_files.
    pub privileged: bool,
    /// The objects, by device and inode.
    pub objects: Vec<ObjectReport>,
    /// Processes that could not be examined.
    pub skipped: Vec<SkippedProcess>,
}

impl ObjectsReport {
    /// Whether every process and object could be examined.
    pub fn complete(&self) -> bool {
        self.skipped.is_empty() && self.objects.iter().all(|o| o.error.is_none())
    }
}

impl ObjectReport {
    /// How the object is classified (hugetlbfs objects are not).
    pub fn object_class(&self) -> Option<super::ObjectClass> {
        match self.backing {
            Backing::Shmem => Some(super::ObjectClass::Shmem),
            Backing::File => Some(super::ObjectClass::File),
            _ => None,
        }
    }
}

impl ObjectsOptions {
    /// Whether the view lists the object behind `v`: shmem objects and
    /// files mapped shared always, privately mapped files on request.
    pub(crate) fn wants(&self, v: &Vma) -> bool {
        match v.object_class() {
            Some(super::ObjectClass::Shmem) => true,
            Some(super::ObjectClass::File) => v.is_shared() || self.private_files,
            None => false,
        }
    }
}
