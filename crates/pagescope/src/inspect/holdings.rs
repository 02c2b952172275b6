//! What one process holds that other processes may hold too, and nothing
//! else: the swap slots of its private memory and the pages of the
//! shared-memory objects it maps, the input of dividing swap and shared
//! memory among holders ([`crate::render::summary::summarize`]) for a
//! whole machine at a fraction of a full scan (the exporter).
//!
//! Compared with [`super::scan_process`]: smaps is not read, file
//! mappings are not classified, and private mappings are walked for
//! swap-type entries only (`scan::swapped`). Shared-memory mappings get
//! the full treatment (page tables joined with their object), since which
//! object pages someone maps decides who holds the unmapped ones.

use super::objects;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::report::{ProcessReport, VmaReport};
use crate::scan::{ScanError, ScanOptions, Scanner, swapped};
use crate::vma::{Backing, MountTable, Vma};

/// The holdings of `target` as a partial [`ProcessReport`] (needs
/// `PAGEMAP_SCAN`, Linux 6.7+, and root for the swap slots): every
/// shared-memory VMA with runs covering it, joined with its object; every
/// other private VMA with runs of its swap-type entries only (none when
/// `private_swap` is false: the caller knows from `smaps_rollup` that the
/// process has no swap). Not for rendering: private VMAs are not covered
/// page by page. `mounts` is the target's mount table (the same for every
/// process of a mount namespace, so the caller reads it once per
/// namespace).
pub fn scan_holdings(
    target: &Target,
    caps: &KernelCaps,
    mounts: &MountTable,
    private_swap: bool,
) -> Result<ProcessReport, ScanError> {
    let vmas: Vec<Vma> = target
        .maps()?
        .iter()
        .map(|e| Vma::classify(e, mounts, None))
        .collect();
    let (mut shmem, private): (Vec<Vma>, Vec<Vma>) = vmas
        .into_iter()
        .filter(|v| v.backing != Backing::Special)
        .filter(|v| v.backing == Backing::Shmem || v.may_hold_anon())
        .partition(|v| v.backing == Backing::Shmem);
    let mut report = ProcessReport {
        pid: target.pid(),
        comm: String::new(),
        page_size: caps.page_size,
        privileged: caps.privileged_pagemap,
        backend: "pagemap_scan",
        exclusive_known: false,
        kernel: caps.release.clone(),
        vmas: Vec::new(),
        skipped: Vec::new(),
        notes: Vec::new(),
        swaps: caps.swaps.clone(),
    };
    if private_swap && !private.is_empty() {
        let pagemap = target.pagemap()?;
        let refs: Vec<&Vma> = private.iter().collect();
        let runs = swapped::swapped_runs(
            std::os::fd::AsFd::as_fd(&pagemap),
            target.pid(),
            caps,
            &refs,
        )?;
        for (vma, runs) in private.into_iter().zip(runs) {
            if !runs.is_empty() {
                report.vmas.push(vma_report(vma, runs));
            }
        }
    }
    if shmem.is_empty() {
        return Ok(report);
    }
    let opened = objects::open_all(target, caps, &mut shmem);
    let opts = ScanOptions {
        swap_detail: true,
        skip_exclusive: true,
        threads: 1,
        ..ScanOptions::default()
    };
    let selected: Vec<_> = shmem.into_iter().map(|v| (v.clone(), v.range)).collect();
    let scanned = Scanner::new(target, caps, &opts)?.scan(&selected)?;
    for ((vma, _), runs) in selected.into_iter().zip(scanned) {
        let runs = runs.ok_or(ScanError::TargetExited { pid: target.pid() })?;
        report.vmas.push(vma_report(vma, runs));
    }
    report.vmas.sort_by_key(|v| v.vma.range.start());
    objects::apply(&opened, caps, &mut report);
    Ok(report)
}

fn vma_report(vma: Vma, runs: Vec<crate::page::PageRun>) -> VmaReport {
    VmaReport {
        scanned: vma.range,
        vma,
        runs,
        object: None,
        object_error: None,
    }
}
