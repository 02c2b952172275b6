//! Backing objects of shared and file mappings: the truth pagemap cannot
//! tell.
//!
//! For shmem (memfd, tmpfs and `/dev/shm` files, SysV segments,
//! `MAP_SHARED|MAP_ANONYMOUS`) a swapped-out page, a page in the swap
//! cache, a page resident but not mapped by this process and a hole all
//! read as an empty PTE; for files, cached and uncached pages do. pagescope
//! opens the object ([`open`]), classifies its pages from the object itself
//! ([`classify`]) once per object, and gives every page the target does not
//! map the object's state ([`apply_objects`]).
//!
//! [`view`] builds the per-object view across processes (`pagescope
//! objects`).

pub mod classify;
pub mod extents;
pub mod open;
mod render;
pub mod view;

use std::collections::HashMap;
use std::os::fd::AsFd;

pub use classify::{ObjectClass, ObjectRun, ObjectState};
pub use open::{OpenObject, OpenedVia, open_object};

use crate::kernel::KernelCaps;
use crate::page::{PageInfo, PageRun, PageState, RunBuilder, UnknownReason};
use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::report::{ObjectId, ProcessReport};
use crate::vma::{Backing, Vma};

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

/// The class of object behind a VMA, if pagescope can classify it.
pub fn class_of(vma: &Vma) -> Option<ObjectClass> {
    match vma.backing {
        Backing::Shmem => Some(ObjectClass::Shmem),
        Backing::File => Some(ObjectClass::File),
        _ => None,
    }
}

/// Why mincore/cachestat would not tell us the page-cache state of a file
/// (Linux 5.2+: only to its owner, writers, or the privileged).
fn page_cache_refused(obj: &OpenObject) -> Option<String> {
    if rustix::process::geteuid().is_root() {
        return None;
    }
    let st = rustix::fs::fstat(&obj.fd).ok()?;
    if st.st_uid == rustix::process::geteuid().as_raw() {
        return None;
    }
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&obj.fd));
    let writable = rustix::fs::access(path.as_str(), rustix::fs::Access::WRITE_OK).is_ok();
    (!writable).then(|| {
        "mincore and cachestat report a file's page cache only to its owner, writers or root (Linux 5.2+)".to_owned()
    })
}

/// An object opened for one scan, classified over the page ranges the
/// scanned VMAs need.
struct Classified {
    id: ObjectId,
    runs: Vec<ObjectRun>,
}

/// Gives every page of a shared or file mapping that the target does not
/// map the state of the object behind it. VMAs whose object cannot be
/// opened get `object_error` and `unknown` pages.
pub fn apply_objects(target: &Target, caps: &KernelCaps, report: &mut ProcessReport) {
    let page = report.page_size.get();
    let mut opened: HashMap<(DevId, u64), Result<OpenObject, String>> = HashMap::new();
    let mut needs: HashMap<(DevId, u64), Vec<(u64, u64)>> = HashMap::new();
    for v in &mut report.vmas {
        if class_of(&v.vma).is_none() || v.vma.inode == 0 {
            continue;
        }
        let key = (v.vma.dev, v.vma.inode);
        let obj = opened
            .entry(key)
            .or_insert_with(|| open_object(target, &v.vma, caps.map_files));
        if let Ok(o) = obj {
            v.vma.refine_with_fstype(o.fs_type);
        }
        if class_of(&v.vma).is_some() {
            needs
                .entry(key)
                .or_default()
                .push(object_span(v.scanned, &v.vma, page));
        }
    }
    let mut classified: HashMap<(DevId, u64), Result<Classified, String>> = HashMap::new();
    for (key, spans) in needs {
        let result = match opened.get(&key) {
            Some(Ok(o)) => classify_spans(
                o,
                report
                    .vmas
                    .iter()
                    .find(|v| (v.vma.dev, v.vma.inode) == key)
                    .map(|v| &v.vma),
                &spans,
                &mapped_object_pages(report, key),
                page,
            ),
            Some(Err(e)) => Err(e.clone()),
            None => continue,
        };
        classified.insert(key, result);
    }
    for v in &mut report.vmas {
        let Some(result) = classified.get(&(v.vma.dev, v.vma.inode)) else {
            continue;
        };
        if class_of(&v.vma).is_none() {
            continue;
        }
        match result {
            Ok(c) => {
                let (first, _) = object_span(v.scanned, &v.vma, page);
                v.runs = join(&v.runs, &c.runs, first, v.scanned.start(), report.page_size);
                v.object = Some(c.id);
            }
            Err(why) => {
                v.object_error = Some(why.clone());
                v.runs = mark_unknown(&v.runs, report.page_size);
            }
        }
    }
    if !caps.cachestat {
        report.notes.push("no cachestat (Linux 6.5+): shmem swap-cache pages read as resident, fallocated pages as holes".into());
    }
}

/// Object pages `(first, count)` the process maps from object `key`:
/// present pages with the file bit (page-cache pages, not private copies),
/// sorted. They are in the page cache, so classifying need not ask.
fn mapped_object_pages(report: &ProcessReport, key: (DevId, u64)) -> Vec<(u64, u64)> {
    let page = report.page_size.get();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for v in report
        .vmas
        .iter()
        .filter(|v| (v.vma.dev, v.vma.inode) == key)
    {
        let (first, _) = object_span(v.scanned, &v.vma, page);
        for r in &v.runs {
            if r.state == PageState::Present && r.flags.contains(crate::PageFlags::FILE) {
                let off = r.start.checked_offset_from(v.scanned.start()).unwrap_or(0) / page;
                out.push((first + off, r.pages));
            }
        }
    }
    out.sort_unstable();
    out
}

/// Object pages `(first, count)` behind the scanned part of `vma`.
fn object_span(scanned: crate::VirtRange, vma: &Vma, page: u64) -> (u64, u64) {
    let skip = scanned
        .start()
        .checked_offset_from(vma.range.start())
        .unwrap_or(0)
        / page;
    (vma.offset / page + skip, scanned.len() / page)
}

fn classify_spans(
    o: &OpenObject,
    vma: Option<&Vma>,
    spans: &[(u64, u64)],
    known: &[(u64, u64)],
    page: u64,
) -> Result<Classified, String> {
    let class = vma.and_then(class_of).ok_or("not a shmem or file object")?;
    if class == ObjectClass::File {
        if let Some(why) = page_cache_refused(o) {
            return Err(why);
        }
    }
    let mut merged: Vec<(u64, u64)> = spans.iter().map(|&(f, n)| (f, f + n)).collect();
    merged.sort_unstable();
    let mut union: Vec<(u64, u64)> = Vec::new();
    for (a, b) in merged {
        match union.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => union.push((a, b)),
        }
    }
    let size_pages = o.size.div_ceil(page);
    let mut runs = Vec::new();
    for (a, b) in union {
        let (r, _precise) =
            classify::classify(o.fd.as_fd(), class, size_pages, a, b - a, page, known)
                .map_err(|e| format!("classifying inode {} failed: {e}", o.inode))?;
        runs.extend(r);
    }
    Ok(Classified {
        id: ObjectId {
            dev: o.dev,
            inode: o.inode,
        },
        runs,
    })
}

/// Replaces the page-table holes of `runs` with the object's states.
/// `first` is the object page at `start`.
fn join(
    runs: &[PageRun],
    obj: &[ObjectRun],
    first: u64,
    start: crate::VirtAddr,
    page: crate::PageSize,
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
    page: crate::PageSize,
) {
    let addr = r.start.saturating_add((from - idx) * page.get());
    out.push(addr, to - from, PageInfo::with(state, r.flags));
}

/// Page-table holes become `unknown`: the object could not be examined.
fn mark_unknown(runs: &[PageRun], page: crate::PageSize) -> Vec<PageRun> {
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
