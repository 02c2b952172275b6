//! The object stages of the inspection: open the object behind every
//! shared or file mapping (before the scan, so each VMA's backing is
//! settled when the backend plans its walk), then give every page the
//! process does not map the object's state (after the scan, which says
//! which pages it maps).

use std::collections::HashMap;

use crate::addr::{PageSize, PageSpan};
use crate::kernel::KernelCaps;
use crate::object::{self, Classified, ObjectError, OpenObject};
use crate::page::{PageFlags, PageState};
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::report::{ProcessReport, VmaReport};
use crate::vma::{ObjectId, Vma};

/// The objects opened for one inspection.
#[derive(Debug, Default)]
pub struct Opened {
    objects: HashMap<ObjectId, Result<OpenObject, ObjectError>>,
}

/// Opens the object behind every VMA that has one (once per object) and
/// refines the VMA's backing from the object's filesystem (a hugetlb memfd
/// looks like any memfd in maps; a tmpfs file like a plain file).
pub fn open_all(target: &Target, caps: &KernelCaps, vmas: &mut [Vma]) -> Opened {
    let mut opened = Opened::default();
    for v in vmas.iter_mut() {
        let Some(id) = v.object_id() else { continue };
        let o = opened
            .objects
            .entry(id)
            .or_insert_with(|| open_one(target, caps, v));
        if let Ok(o) = o {
            v.refine_with_fstype(o.fs_type);
        }
    }
    opened
}

/// Opens the object behind `vma`: `map_files` only where `caps` say it
/// works (the one place that decides how the driver opens objects).
pub fn open_one(target: &Target, caps: &KernelCaps, vma: &Vma) -> Result<OpenObject, ObjectError> {
    object::open_object(target, vma, caps.map_files)
}

/// Gives every page-table hole of a shared or file mapping the state of
/// its object; VMAs whose object cannot be examined get `object_error`
/// and `unknown` pages.
pub fn apply(opened: &Opened, caps: &KernelCaps, report: &mut ProcessReport) {
    let page = report.page_size;
    let mut spans: HashMap<ObjectId, RangeSet<PageSpan>> = HashMap::new();
    for v in report
        .vmas
        .iter()
        .filter(|v| v.vma.object_class().is_some())
    {
        if let Some(id) = v.vma.object_id() {
            spans
                .entry(id)
                .or_default()
                .insert(v.vma.object_span(v.scanned, page));
        }
    }
    let mut results: HashMap<ObjectId, Result<Classified, String>> = HashMap::new();
    for (id, wanted) in &spans {
        let class = report
            .vmas
            .iter()
            .find(|v| v.vma.object_id() == Some(*id))
            .and_then(|v| v.vma.object_class());
        let r = match opened.objects.get(id) {
            Some(Ok(o)) => {
                object::classify_spans(o, class, wanted, &mapped_pages(report, *id), page)
                    .map_err(|e| e.describe())
            }
            Some(Err(e)) => Err(e.describe()),
            None => continue,
        };
        results.insert(*id, r);
    }
    let mut imprecise = false;
    for v in &mut report.vmas {
        let Some(r) = v.vma.object_id().and_then(|id| results.get(&id)) else {
            continue;
        };
        if v.vma.object_class().is_none() {
            continue;
        }
        imprecise |= r.as_ref().is_ok_and(|c| !c.precise);
        settle(v, r, page);
    }
    if imprecise {
        report.notes.push(note_without_cachestat(caps));
    }
}

/// Joins one VMA's runs with its object's states (or marks them unknown).
fn settle(v: &mut VmaReport, r: &Result<Classified, String>, page: PageSize) {
    match r {
        Ok(c) => {
            let first = v.vma.object_page(v.scanned.start(), page);
            v.runs = object::join(&v.runs, &c.runs, first, v.scanned.start(), page);
            v.object = v.vma.object_id();
        }
        Err(why) => {
            v.object_error = Some(why.clone());
            v.runs = object::mark_unknown(&v.runs, page);
        }
    }
}

/// Object pages of `id` the process maps shared (or present with the file
/// bit: page-cache pages, not private copies): they are in the page cache,
/// so classifying need not ask.
fn mapped_pages(report: &ProcessReport, id: ObjectId) -> RangeSet<PageSpan> {
    let page = report.page_size;
    report
        .vmas
        .iter()
        .filter(|v| v.vma.object_id() == Some(id))
        .flat_map(|v| {
            v.runs
                .iter()
                .filter(|r| r.state == PageState::Present && r.flags.contains(PageFlags::FILE))
                .map(move |r| v.vma.object_span(r.range(page), page))
        })
        .collect()
}

/// What the report says when the shmem split could not be made: why
/// `cachestat` was missing.
fn note_without_cachestat(caps: &KernelCaps) -> String {
    if caps.cachestat {
        "cachestat refused (it reports a file's page cache only to its owner, writers or root): shmem swap-cache pages read as resident, fallocated pages as holes".into()
    } else {
        "no cachestat (Linux 6.5+): shmem swap-cache pages read as resident, fallocated pages as holes".into()
    }
}
