//! Scanning a whole process: layout, backend, races.
//!
//! The layout (maps, or smaps when VmFlags are needed) is read once, every
//! selected VMA is scanned, and then maps is read again: a VMA that changed
//! or appeared meanwhile is dropped from the report and listed as skipped,
//! and a target that exits mid-scan leaves the rest skipped. The report says
//! `complete: false` in both cases; it never passes off a partial result as
//! whole.

use std::os::fd::AsFd;

use super::{
    KpageFlags, ScanContext, ScanError, ScanOptions, backend_identity, parallel, unprivileged,
};
use crate::addr::{PageSize, VirtRange};
use crate::kernel::KernelCaps;
use crate::page::RunBuilder;
use crate::proc::{ProcError, Target};
use crate::report::{ProcessReport, Skipped, VmaReport};
use crate::vma::{MountTable, Vma};

/// Reads the target's VMAs, classified. With `smaps`, VmFlags and the
/// `Swap:` field are filled in (this walks the target's page tables).
pub fn read_layout(target: &Target, smaps: bool) -> Result<Vec<Vma>, ProcError> {
    let mounts = target
        .mountinfo()
        .map(|m| MountTable::new(&m))
        .unwrap_or_default();
    if smaps {
        let entries = target.smaps()?;
        Ok(entries
            .iter()
            .map(|s| {
                let mut v = Vma::classify(&s.vma, &mounts, Some(s.vm_flags));
                v.smaps_swap_kb = s.field_kb("Swap");
                v
            })
            .collect())
    } else {
        Ok(target
            .maps()?
            .iter()
            .map(|e| Vma::classify(e, &mounts, None))
            .collect())
    }
}

/// Scans every page of `target` (or of `opts.range`).
pub fn scan_process(
    target: &Target,
    caps: &KernelCaps,
    opts: &ScanOptions,
) -> Result<ProcessReport, ScanError> {
    target.require_address_space()?;
    let page = caps.page_size;
    let pagemap = target.pagemap()?;
    let privileged = caps.privileged_pagemap;
    let vmas = read_layout(target, opts.smaps || !privileged || caps.soft_dirty)?;
    let selected = select(target.pid(), &vmas, opts.range, page)?;
    let kpageflags = if privileged { KpageFlags::open() } else { None };
    let ctx = ScanContext {
        pid: target.pid(),
        pagemap: pagemap.as_fd(),
        page,
        privileged,
        caps,
        kpageflags: kpageflags.as_ref(),
    };
    let (backend, exclusive_known) = backend_identity(opts.backend, caps, opts.skip_exclusive)?;
    let mut report = ProcessReport {
        pid: target.pid(),
        page_size: page,
        privileged,
        backend,
        exclusive_known,
        kernel: caps.release.clone(),
        vmas: Vec::with_capacity(selected.len()),
        skipped: Vec::new(),
        notes: notes(caps, privileged),
        swaps: caps.swaps.clone(),
    };
    let chunks = chunks(&selected, page);
    let results = parallel::scan_chunks(&ctx, opts, &selected, &chunks)?;
    let mut exited = false;
    for (i, (vma, range)) in selected.iter().enumerate() {
        let mut out = RunBuilder::new(page, opts.swap_detail);
        let mut ok = !exited;
        for (_, result) in chunks.iter().zip(&results).filter(|(c, _)| c.vma == i) {
            match result {
                Some(runs) if ok => runs.iter().for_each(|r| out.push_run(r)),
                _ => ok = false,
            }
        }
        if ok {
            report.vmas.push(vma_report(vma, *range, out));
        } else {
            exited = true;
            report.skipped.push(Skipped {
                range: *range,
                reason: "the process exited during the scan".into(),
            });
        }
    }
    if exited {
        return Ok(report);
    }
    if opts.objects {
        crate::object::apply_objects(target, caps, &mut report);
    }
    if !privileged {
        settle_unprivileged(&mut report, opts);
    }
    verify_layout(target, &vmas, opts.range, &mut report);
    Ok(report)
}

fn vma_report(vma: &Vma, range: VirtRange, out: RunBuilder) -> VmaReport {
    VmaReport {
        vma: vma.clone(),
        scanned: range,
        runs: out.finish(),
        object: None,
        object_error: None,
    }
}

/// Settles swap-type entries whose type was hidden from us (after the
/// object pass, which the settling of private shmem views needs).
fn settle_unprivileged(report: &mut ProcessReport, opts: &ScanOptions) {
    for v in &mut report.vmas {
        let runs = std::mem::take(&mut v.runs);
        v.runs = unprivileged::resolve(
            &v.vma,
            runs,
            report.page_size,
            opts.swap_detail,
            v.object.is_some(),
        );
    }
}

/// The VMAs overlapping `range` (all without one), each with the part of
/// it to scan.
fn select(
    pid: u32,
    vmas: &[Vma],
    range: Option<VirtRange>,
    page: PageSize,
) -> Result<Vec<(Vma, VirtRange)>, ScanError> {
    let Some(range) = range else {
        return Ok(vmas.iter().map(|v| (v.clone(), v.range)).collect());
    };
    if !range.is_page_aligned(page) || range.is_empty() {
        return Err(ScanError::BadRange {
            pid,
            range,
            what: "not page aligned or empty",
        });
    }
    let out: Vec<_> = vmas
        .iter()
        .filter_map(|v| v.range.intersect(&range).map(|r| (v.clone(), r)))
        .collect();
    if out.is_empty() {
        return Err(ScanError::BadRange {
            pid,
            range,
            what: "not mapped",
        });
    }
    Ok(out)
}

/// A piece of one selected VMA, scanned as a unit.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunk {
    /// Index into the selected VMAs.
    pub vma: usize,
    /// The addresses.
    pub range: VirtRange,
}

/// Bytes per chunk: large enough that per-chunk overhead vanishes, small
/// enough that a big VMA spreads over all workers.
const CHUNK_BYTES: u64 = 1 << 30;

/// Cuts the selected VMAs into chunks of at most [`CHUNK_BYTES`], aligned
/// to 2 MiB so no huge page is split between two chunks.
fn chunks(selected: &[(Vma, VirtRange)], page: PageSize) -> Vec<Chunk> {
    let align = page.pmd().get();
    let mut out = Vec::new();
    for (i, (_, range)) in selected.iter().enumerate() {
        let mut start = range.start();
        while start < range.end() {
            let next = start
                .saturating_add(CHUNK_BYTES)
                .align_down(align)
                .min(range.end());
            let end = if next <= start { range.end() } else { next };
            out.push(Chunk {
                vma: i,
                range: VirtRange::new(start, end).unwrap_or(*range),
            });
            start = end;
        }
    }
    out
}

/// Drops VMAs that changed while they were scanned and lists VMAs that
/// appeared, both as skipped.
fn verify_layout(
    target: &Target,
    before: &[Vma],
    range: Option<VirtRange>,
    report: &mut ProcessReport,
) {
    let after = match target.maps() {
        Ok(a) => a,
        Err(_) if !target.is_alive() => {
            report.notes.push(
                "the process exited right after the scan; the layout could not be re-checked"
                    .into(),
            );
            return;
        }
        Err(e) => {
            report
                .notes
                .push(format!("the layout could not be re-checked: {e}"));
            return;
        }
    };
    let same = |v: &Vma| {
        after.iter().any(|e| {
            e.range == v.range
                && e.perms == v.perms
                && e.offset == v.offset
                && e.inode == v.inode
                && e.path == v.path
        })
    };
    let (kept, changed): (Vec<_>, Vec<_>) = std::mem::take(&mut report.vmas)
        .into_iter()
        .partition(|v| same(&v.vma));
    report.vmas = kept;
    for v in changed {
        report.skipped.push(Skipped {
            range: v.scanned,
            reason: "the mapping changed during the scan".into(),
        });
    }
    let wanted = |r: &VirtRange| range.is_none_or(|want| want.overlaps(r));
    for e in after.iter().filter(|e| wanted(&e.range)) {
        if !before.iter().any(|v| v.range == e.range) {
            let r = range
                .and_then(|want| want.intersect(&e.range))
                .unwrap_or(e.range);
            report.skipped.push(Skipped {
                range: r,
                reason: "the mapping appeared during the scan".into(),
            });
        }
    }
    report.skipped.sort_by_key(|s| s.range);
}

fn notes(caps: &KernelCaps, privileged: bool) -> Vec<String> {
    let mut n = Vec::new();
    if !privileged {
        n.push(
            "no CAP_SYS_ADMIN: swap type, offset and device are unknown; uffd-wp markers vs. \
             write-protected swap entries are settled from smaps Swap: counts where possible, \
             else reported unknown"
                .into(),
        );
        if !caps.has_pagemap_scan() {
            n.push("no PAGEMAP_SCAN and no PFNs: zero pages and COW-shared pages are unknown, THPs are not flagged".into());
        }
    }
    if !caps.soft_dirty {
        n.push("kernel without soft-dirty: the soft_dirty flag is never set".into());
    }
    n
}
