//! The per-object view: every shared object once, its page states, and
//! which processes map which parts of it (`pagescope objects`).
//!
//! This answers what live migration and checkpoint/restore need for shared
//! memory: properties of the object for all its sharers, not per-process
//! page-table hints. Each object is opened and classified once, however
//! many processes map it.

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use super::classify::{self, ObjectClass, ObjectRun};
use super::open::{OpenObject, open_object};
use super::page_cache_refused;
use crate::addr::{PageSize, VirtRange};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::proc::maps::{DevId, Perms};
use crate::report::{Counts, ObjectId};
use crate::scan::{present_ranges, read_layout};
use crate::vma::{Backing, Vma, VmaKind};

/// Options for [`objects_view`].
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
    /// Why.
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

struct Entry {
    report: ObjectReport,
    opened: Option<OpenObject>,
    present: Vec<(u64, u64)>,
    /// Object pages mapped shared and present: in the page cache (a
    /// private mapping's present page may be a private copy instead).
    known: Vec<(u64, u64)>,
    errors: Vec<String>,
}

/// Lists the shared objects mapped by `pids`, each once.
pub fn objects_view(pids: &[u32], caps: &KernelCaps, opts: &ObjectsOptions) -> ObjectsReport {
    let page = caps.page_size;
    let mut objects: BTreeMap<(DevId, u64), Entry> = BTreeMap::new();
    let mut skipped = Vec::new();
    for &pid in pids {
        if let Err(reason) = add_process(pid, caps, opts, page, &mut objects) {
            skipped.push(SkippedProcess { pid, reason });
        }
    }
    let objects = objects.into_values().map(|e| finish(e, page)).collect();
    ObjectsReport {
        page_size: page,
        privileged: caps.map_files,
        objects,
        skipped,
    }
}

fn wanted(v: &Vma, opts: &ObjectsOptions) -> bool {
    v.inode != 0
        && match v.backing {
            Backing::Shmem => true,
            Backing::File => v.is_shared() || opts.private_files,
            _ => false,
        }
}

fn add_process(
    pid: u32,
    caps: &KernelCaps,
    opts: &ObjectsOptions,
    page: PageSize,
    objects: &mut BTreeMap<(DevId, u64), Entry>,
) -> Result<(), String> {
    let target = Target::open(pid).map_err(|e| e.to_string())?;
    target.require_address_space().map_err(|e| e.to_string())?;
    let comm = target
        .stat()
        .map(|s| String::from_utf8_lossy(&s.comm).into_owned())
        .unwrap_or_default();
    let vmas = read_layout(&target, false).map_err(|e| e.to_string())?;
    let pagemap = target.pagemap().map_err(|e| e.to_string())?;
    for mut vma in vmas.into_iter().filter(|v| wanted(v, opts)) {
        let key = (vma.dev, vma.inode);
        let entry = objects.entry(key).or_insert_with(|| new_entry(&vma));
        if entry.opened.is_none() {
            match open_object(&target, &vma, caps.map_files) {
                Ok(o) => entry.opened = Some(o),
                Err(e) => entry.errors.push(format!("via process {pid}: {e}")),
            }
        }
        if let Some(o) = &entry.opened {
            vma.refine_with_fstype(o.fs_type);
            entry.report.backing = vma.backing;
        }
        let first_page = vma.offset / page.get();
        let present =
            present_ranges(pagemap.as_fd(), pid, vma.range, caps).map_err(|e| e.to_string())?;
        let mut present_pages = 0;
        for r in &present {
            let off = r
                .start()
                .checked_offset_from(vma.range.start())
                .unwrap_or(0)
                / page.get();
            entry.present.push((first_page + off, r.pages(page)));
            if vma.is_shared() {
                entry.known.push((first_page + off, r.pages(page)));
            }
            present_pages += r.pages(page);
        }
        let mapping = SharerMapping {
            range: vma.range,
            perms: vma.perms,
            first_page,
            pages: vma.range.pages(page),
            present_pages,
        };
        match entry.report.sharers.iter_mut().find(|s| s.pid == pid) {
            Some(s) => s.mappings.push(mapping),
            None => entry.report.sharers.push(Sharer {
                pid,
                comm: comm.clone(),
                mappings: vec![mapping],
            }),
        }
    }
    Ok(())
}

fn new_entry(vma: &Vma) -> Entry {
    Entry {
        report: ObjectReport {
            id: ObjectId {
                dev: vma.dev,
                inode: vma.inode,
            },
            backing: vma.backing,
            kind: vma.kind,
            path: vma.path.display(),
            size_pages: 0,
            counts: Counts::default(),
            mapped_pages: 0,
            runs: Vec::new(),
            sharers: Vec::new(),
            error: None,
        },
        opened: None,
        present: Vec::new(),
        known: Vec::new(),
        errors: Vec::new(),
    }
}

fn finish(mut e: Entry, page: PageSize) -> ObjectReport {
    e.report.mapped_pages = union_len(&mut e.present);
    let Some(o) = &e.opened else {
        e.report.error = Some(e.errors.join("; "));
        return e.report;
    };
    let class = if e.report.backing == Backing::Shmem {
        ObjectClass::Shmem
    } else {
        ObjectClass::File
    };
    if class_of_backing(e.report.backing).is_none() {
        e.report.error = Some("hugetlbfs objects are not classified".into());
        return e.report;
    }
    if class == ObjectClass::File {
        if let Some(why) = page_cache_refused(o) {
            e.report.error = Some(why);
            return e.report;
        }
    }
    let size_pages = o.size.div_ceil(page.get());
    e.report.size_pages = size_pages;
    e.known.sort_unstable();
    let known = &e.known;
    match classify::classify(
        o.fd.as_fd(),
        class,
        size_pages,
        0,
        size_pages,
        page.get(),
        known,
    ) {
        Ok((runs, _)) => {
            for r in &runs {
                e.report.counts.add(r.state.into(), r.count);
            }
            e.report.runs = runs;
        }
        Err(err) => e.report.error = Some(format!("classifying failed: {err}")),
    }
    e.report
}

fn class_of_backing(b: Backing) -> Option<ObjectClass> {
    match b {
        Backing::Shmem => Some(ObjectClass::Shmem),
        Backing::File => Some(ObjectClass::File),
        _ => None,
    }
}

/// Total length of the union of `(first, count)` ranges.
fn union_len(v: &mut [(u64, u64)]) -> u64 {
    v.sort_unstable();
    let mut total = 0;
    let mut end = 0;
    for &(a, n) in v.iter() {
        let b = a + n;
        if b > end {
            total += b - a.max(end);
            end = b;
        }
    }
    total
}

pub use crate::proc::pids as all_pids;
