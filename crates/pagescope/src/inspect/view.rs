//! Building the objects view ([`objects_view`], `pagescope objects`) for a
//! set of processes: per process, stage 1 of the pipeline (the layout from
//! `/proc/PID/maps`) and stage 2 (the object behind each shared or file
//! mapping, opened through `/proc/PID/map_files` or an fd the process
//! holds, the first time a process maps it), plus only the present ranges
//! of each mapping (`PAGEMAP_SCAN`, else pagemap reads:
//! [`present_ranges`]), not a full scan. Once every sharer is known, each
//! object is classified whole, once ([`object::classify_spans`]:
//! `SEEK_DATA`, `mincore`, `cachestat`). The types it fills in are in
//! [`crate::object::view`].

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use super::layout;
use crate::addr::{PageSize, PageSpan};
use crate::kernel::KernelCaps;
use crate::object::view::{
    ObjectReport, ObjectsOptions, ObjectsReport, Sharer, SharerMapping, SkippedProcess,
};
use crate::object::{self, OpenObject};
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::report::Counts;
use crate::scan::{ScanError, present_ranges};
use crate::vma::{ObjectId, Vma};

/// One object while the view is built.
struct Entry {
    report: ObjectReport,
    opened: Option<OpenObject>,
    /// Object pages some sharer maps.
    present: RangeSet<PageSpan>,
    /// Object pages mapped shared and present: in the page cache (a
    /// private mapping's present page may be a private copy instead).
    known: RangeSet<PageSpan>,
    errors: Vec<String>,
}

/// Lists the shared objects mapped by `pids`, each once. A process that
/// cannot be examined is listed in `skipped` with the class of the
/// failure.
pub fn objects_view(pids: &[u32], caps: &KernelCaps, opts: &ObjectsOptions) -> ObjectsReport {
    let page = caps.page_size;
    let mut objects: BTreeMap<ObjectId, Entry> = BTreeMap::new();
    let mut skipped = Vec::new();
    for &pid in pids {
        if let Err(e) = add_process(pid, caps, opts, &mut objects) {
            skipped.push(SkippedProcess {
                pid,
                kind: e.kind(),
                reason: e.to_string(),
            });
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

fn add_process(
    pid: u32,
    caps: &KernelCaps,
    opts: &ObjectsOptions,
    objects: &mut BTreeMap<ObjectId, Entry>,
) -> Result<(), ScanError> {
    let page = caps.page_size;
    let target = Target::open(pid)?;
    target.require_address_space()?;
    let comm = target
        .stat()
        .map(|s| String::from_utf8_lossy(&s.comm).into_owned())
        .unwrap_or_default();
    let vmas = layout::read(&target, false)?;
    let pagemap = target.pagemap()?;
    for mut vma in vmas.into_iter().filter(|v| opts.wants(v)) {
        let Some(id) = vma.object_id() else { continue };
        let entry = objects.entry(id).or_insert_with(|| new_entry(&vma, id));
        if entry.opened.is_none() {
            match super::objects::open_one(&target, caps, &vma) {
                Ok(o) => entry.opened = Some(o),
                Err(e) => entry.errors.push(format!("via process {pid}: {e}")),
            }
        }
        if let Some(o) = &entry.opened {
            vma.refine_with_fstype(o.fs_type);
            entry.report.backing = vma.backing;
        }
        let present = present_ranges(pagemap.as_fd(), pid, vma.range, caps)?;
        let mut present_pages = 0;
        for r in &present {
            let span = vma.object_span(*r, page);
            entry.present.insert(span);
            if vma.is_shared() {
                entry.known.insert(span);
            }
            present_pages += span.count();
        }
        let mapping = SharerMapping {
            range: vma.range,
            perms: vma.perms,
            first_page: vma.object_page(vma.range.start(), page),
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

fn new_entry(vma: &Vma, id: ObjectId) -> Entry {
    Entry {
        report: ObjectReport {
            id,
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
        present: RangeSet::new(),
        known: RangeSet::new(),
        errors: Vec::new(),
    }
}

/// Classifies the whole object once its sharers are known.
fn finish(mut e: Entry, page: PageSize) -> ObjectReport {
    e.report.mapped_pages = e.present.count();
    let Some(o) = &e.opened else {
        e.report.error = Some(e.errors.join("; "));
        return e.report;
    };
    let size_pages = o.size.div_ceil(page.get());
    e.report.size_pages = size_pages;
    let class = e.report.object_class();
    let whole: RangeSet<PageSpan> = PageSpan::new(0, size_pages).into_iter().collect();
    match object::classify_spans(o, class, &whole, &e.known, page) {
        Ok(c) => {
            for r in &c.runs {
                e.report.counts.add(r.state.into(), r.count);
            }
            e.report.runs = c.runs;
        }
        Err(err) => e.report.error = Some(err.describe()),
    }
    e.report
}
