//! The inspection driver: the one place the layers are wired together, in
//! one direction.
//!
//! ```text
//!   proc (layout) ──► object (open, settle backing) ──► scan (page tables)
//!                                                          │
//!   layout re-check ◄── scan::unprivileged (settle) ◄── object (join states)
//! ```
//!
//! [`scan_process`] runs the pipeline for one process (`pages`, `map`,
//! the exporter's full scans); [`scan_page_tables`], [`scan_for_pageout`]
//! and [`open_object`] are what the commands that act on pages get their
//! page states and objects from (`dump`, `verify`, `pageout`: `acting.rs`);
//! [`objects_view`] runs the object half for a set of processes
//! (`objects`); [`scan_holdings`] reads only swap slots and shmem pages
//! (the exporter). `scan/` and `object/` do not know each other:
//! everything that needs both lives here.

mod acting;
mod holdings;
mod layout;
mod objects;
mod view;

pub use acting::{
    open_object, scan_for_pageout, scan_page_tables, scan_page_tables_in, shmem_page_states,
};
pub use holdings::scan_holdings;
pub use layout::read as read_layout;
pub use view::objects_view;

use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::report::{ProcessReport, SkipReason, Skipped, VmaReport};
use crate::scan::{ScanError, ScanOptions, Scanner, unprivileged};

/// Reports the state of every page of `target` (or of `opts.range`):
/// reads the layout, opens the backing objects, scans the page tables,
/// gives unmapped pages of shared and file mappings their object's state,
/// settles what an unprivileged scan could not tell, and re-checks the
/// layout (a VMA that changed meanwhile is dropped and listed as skipped).
pub fn scan_process(
    target: &Target,
    caps: &KernelCaps,
    opts: &ScanOptions,
) -> Result<ProcessReport, ScanError> {
    target.require_address_space()?;
    let page = caps.page_size;
    let privileged = caps.privileged_pagemap;
    let mut vmas = layout::read(target, opts.smaps || !privileged || caps.soft_dirty)?;
    let opened = if opts.objects {
        objects::open_all(target, caps, &mut vmas)
    } else {
        objects::Opened::default()
    };
    let selected = layout::select(target.pid(), &vmas, opts.range, page)?;
    let scanner = Scanner::new(target, caps, opts)?;
    let scanned = scanner.scan(&selected)?;
    let mut report = ProcessReport {
        pid: target.pid(),
        comm: target
            .stat()
            .map(|s| String::from_utf8_lossy(&s.comm).into_owned())
            .unwrap_or_default(),
        page_size: page,
        privileged,
        backend: scanner.plan().name(),
        exclusive_known: scanner.plan().exclusive_known(),
        kernel: caps.release.clone(),
        vmas: Vec::with_capacity(selected.len()),
        skipped: Vec::new(),
        notes: notes(caps, privileged),
        swaps: caps.swaps.clone(),
    };
    let mut exited = false;
    for ((vma, range), runs) in selected.into_iter().zip(scanned) {
        match runs.filter(|_| !exited) {
            Some(runs) => report.vmas.push(VmaReport {
                vma,
                scanned: range,
                runs,
                object: None,
                object_error: None,
            }),
            None => {
                exited = true;
                report.skipped.push(Skipped {
                    range,
                    reason: SkipReason::ProcessExited,
                });
            }
        }
    }
    if exited {
        return Ok(report);
    }
    if opts.objects {
        objects::apply(&opened, caps, &mut report);
    }
    if !privileged {
        settle_unprivileged(&mut report, opts);
    }
    layout::verify(target, &vmas, opts.range, &mut report);
    Ok(report)
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

/// What limits this scan, in the report's own words.
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
    n
}
