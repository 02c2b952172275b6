//! `pagescope pageout`: reclaim chosen pages of a process now, then say
//! exactly which left RAM and, for the others, why.
//!
//! `MADV_PAGEOUT` (through `process_madvise(2)`, 5.10+, CAP_SYS_NICE for
//! another process) returns success even for the pages it skips: pages
//! mapped by several processes, locked, not on an LRU list, THPs it could
//! not split; without swap space anonymous and shmem pages cannot go, and
//! on an asynchronous swap device (a swap file) a page waits in the swap
//! cache until written. So the pages are scanned before and after, and
//! each page that stayed gets the reason the kernel's state shows
//! ([`Refusal`]). shmem pages in the page cache that the process does not
//! map are paged out through pagescope's own mapping of the object
//! (`object`).

pub(crate) mod object;
mod reasons;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

pub use reasons::Refusal;

use crate::addr::{VirtAddr, VirtRange};
use crate::error::ErrorKind;
use crate::kernel::KernelCaps;
use crate::page::PageState;
use crate::proc::smaps::VmFlags;
use crate::proc::{ProcError, Target};
use crate::rangeset::RangeSet;
use crate::report::{ProcessReport, VmaReport};
use crate::scan::ScanError;
use crate::sys::mm::Advice;
use crate::vma::{Backing, ObjectId};

/// Errors of `pageout`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageoutError {
    /// Scanning failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// A `/proc` file failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// `process_madvise` failed.
    #[error("process_madvise(MADV_PAGEOUT) on process {pid}")]
    Advise {
        /// The process.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl PageoutError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Scan(e) => e.kind(),
            Self::Proc(e) => e.kind(),
            Self::Advise { source, .. } => match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => ErrorKind::PermissionDenied,
                Some(libc::ESRCH) => ErrorKind::TargetExited,
                Some(libc::ENOSYS) => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
        }
    }
}

/// What to page out.
#[derive(Clone, Debug)]
pub struct PageoutOptions {
    /// Only this part of the address space.
    pub range: Option<VirtRange>,
    /// Only pages in these states (`present`: mapped by the process;
    /// `resident`: shmem pages in the page cache the process does not map).
    pub states: Vec<PageState>,
}

impl Default for PageoutOptions {
    fn default() -> Self {
        Self {
            range: None,
            states: vec![PageState::Present, PageState::Resident],
        }
    }
}

/// Pages of one class: asked, gone, stayed.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ClassCounts {
    /// Pages asked to leave.
    pub requested: u64,
    /// Left RAM.
    pub left_ram: u64,
    /// Still in RAM.
    pub stayed: u64,
}

/// A run of pages that stayed in RAM, with why.
#[derive(Clone, Debug, Serialize)]
pub struct StayedRun {
    /// First address.
    #[serde(serialize_with = "crate::report::ser_display")]
    pub start: VirtAddr,
    /// Pages.
    pub pages: u64,
    /// State before.
    pub before: PageState,
    /// State after.
    pub after: PageState,
    /// Why the kernel kept them.
    pub reason: Refusal,
}

/// What `pageout` did.
#[derive(Clone, Debug, Serialize)]
pub struct PageoutReport {
    /// The process.
    pub pid: u32,
    /// Every class together.
    pub total: ClassCounts,
    /// Private anonymous pages (and private copies of file pages).
    pub anon: ClassCounts,
    /// shmem pages the process maps.
    pub shmem_mapped: ClassCounts,
    /// shmem pages in the page cache the process does not map.
    pub shmem_unmapped: ClassCounts,
    /// Pages of regular-file mappings (page cache, or private copies).
    pub file: ClassCounts,
    /// Pages that stayed, per reason.
    pub reasons: BTreeMap<Refusal, u64>,
    /// The runs that stayed.
    pub stayed: Vec<StayedRun>,
    /// Seconds from the first `madvise` to the end of the re-scan.
    pub seconds: f64,
    /// What limited the operation.
    pub notes: Vec<String>,
}

/// The pages chosen in one mapping.
struct Chosen {
    vma: usize,
    range: VirtRange,
    state: PageState,
}

/// Pages out `opts` of `target` and reports, from a re-scan, what left.
pub fn pageout(
    target: &Target,
    caps: &KernelCaps,
    opts: &PageoutOptions,
) -> Result<PageoutReport, PageoutError> {
    pageout_within(target, caps, opts, None)
}

/// [`pageout`] of only the pages of `opts` inside `only` (`send
/// --pageout-sent`: the pages that were sent).
pub(crate) fn pageout_within(
    target: &Target,
    caps: &KernelCaps,
    opts: &PageoutOptions,
    only: Option<&RangeSet>,
) -> Result<PageoutReport, PageoutError> {
    let before = crate::inspect::scan_for_pageout(target, caps, opts.range)?;
    let chosen = choose(&before, opts, only);
    let t0 = Instant::now();
    let mut notes = Vec::new();
    advise_mapped(target, &before, &chosen)?;
    page_out_unmapped(target, &before, &chosen, caps, &mut notes);
    let after = crate::inspect::scan_for_pageout(target, caps, opts.range)?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut report = PageoutReport {
        pid: target.pid(),
        total: ClassCounts::default(),
        anon: ClassCounts::default(),
        shmem_mapped: ClassCounts::default(),
        shmem_unmapped: ClassCounts::default(),
        file: ClassCounts::default(),
        reasons: BTreeMap::new(),
        stayed: Vec::new(),
        seconds,
        notes,
    };
    let judge = reasons::Judge::new(target, caps)?;
    for c in &chosen {
        tally(&mut report, &before.vmas[c.vma], c, &after, &judge, caps)?;
    }
    if !caps.privileged_pagemap {
        report.notes.push(
            "without CAP_SYS_ADMIN page frames are hidden: reasons that need /proc/kpageflags or /proc/kpagecount read `unknown`".into(),
        );
    }
    Ok(report)
}

/// The runs of `report` in the chosen states (their parts in `only`).
fn choose(report: &ProcessReport, opts: &PageoutOptions, only: Option<&RangeSet>) -> Vec<Chosen> {
    let page = report.page_size;
    let mut out = Vec::new();
    for (i, v) in report.vmas.iter().enumerate() {
        for r in &v.runs {
            let wanted = opts.states.contains(&r.state)
                && (r.state != PageState::Resident || v.vma.backing == Backing::Shmem);
            if !wanted {
                continue;
            }
            let ranges = only.map_or_else(|| vec![r.range(page)], |o| o.intersect(r.range(page)));
            out.extend(ranges.into_iter().map(|range| Chosen {
                vma: i,
                range,
                state: r.state,
            }));
        }
    }
    out
}

/// `process_madvise(MADV_PAGEOUT)` over the chosen mapped pages. Locked
/// (`VM_LOCKED`), `VM_PFNMAP` and hugetlb mappings refuse it with
/// `EINVAL` and end the call, so they are left out (their pages are then
/// reported with the reason), and after an `EINVAL` the ranges are advised
/// one by one.
fn advise_mapped(
    target: &Target,
    report: &ProcessReport,
    chosen: &[Chosen],
) -> Result<(), PageoutError> {
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    for c in chosen.iter().filter(|c| c.state != PageState::Resident) {
        let v = &report.vmas[c.vma].vma;
        let refuses = v
            .vm_flags
            .is_some_and(|f| f.intersects(VmFlags::LOCKED | VmFlags::PFNMAP | VmFlags::HUGETLB));
        if refuses {
            continue;
        }
        let (s, len) = (
            c.range.start().get(),
            usize::try_from(c.range.len()).unwrap_or(0),
        );
        match ranges.last_mut() {
            Some((a, l)) if *a + *l as u64 == s => *l += len,
            _ => ranges.push((s, len)),
        }
    }
    if ranges.is_empty() {
        return Ok(());
    }
    let advise_err = |source: std::io::Error| PageoutError::Advise {
        pid: target.pid(),
        source,
    };
    crate::sys::lru_drain::drain_all_cpus().map_err(|e| advise_err(e.into()))?;
    let advice = Advice::PageOut.raw();
    match crate::sys::process_madvise::advise(target.pidfd(), &ranges, advice) {
        Err(e) if e == rustix::io::Errno::INVAL => {
            for r in &ranges {
                match crate::sys::process_madvise::advise(
                    target.pidfd(),
                    std::slice::from_ref(r),
                    advice,
                ) {
                    Ok(_) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOMEM) => {}
                    Err(e) => return Err(advise_err(e.into())),
                }
            }
            Ok(())
        }
        Err(e) => Err(advise_err(e.into())),
        Ok(_) => Ok(()),
    }
}

/// shmem pages in the page cache the process does not map: through
/// pagescope's own mapping of each object.
fn page_out_unmapped(
    target: &Target,
    report: &ProcessReport,
    chosen: &[Chosen],
    caps: &KernelCaps,
    notes: &mut Vec<String>,
) {
    let page = report.page_size;
    let mut by_object: BTreeMap<ObjectId, (usize, Vec<u64>)> = BTreeMap::new();
    for c in chosen.iter().filter(|c| c.state == PageState::Resident) {
        let v = &report.vmas[c.vma].vma;
        let Some(id) = v.object_id() else { continue };
        let first = v.object_page(c.range.start(), page);
        let e = by_object.entry(id).or_insert((c.vma, Vec::new()));
        e.1.extend(first..first + c.range.pages(page));
    }
    for (id, (vma, mut pages)) in by_object {
        pages.sort_unstable();
        pages.dedup();
        let opened = crate::inspect::open_object(target, caps, &report.vmas[vma].vma);
        let result = opened.map_err(|e| e.to_string()).and_then(|o| {
            object::object(std::os::fd::AsFd::as_fd(&o.fd), &pages, page).map_err(|e| e.to_string())
        });
        let what = format!("object {} inode {}", id.dev, id.inode);
        match result {
            Ok(o) => notes.extend(o.notes(&what)),
            Err(e) => notes.push(format!(
                "{what}: its unmapped pages could not be paged out: {e}"
            )),
        }
    }
}

/// Counts the pages of `c` by their state in `after`, and the reasons of
/// those that stayed.
fn tally(
    report: &mut PageoutReport,
    vma: &VmaReport,
    c: &Chosen,
    after: &ProcessReport,
    judge: &reasons::Judge,
    caps: &KernelCaps,
) -> Result<(), PageoutError> {
    let page = caps.page_size;
    let class = class_of(vma, c.state);
    let mut counts = ClassCounts::default();
    let mut at = c.range.start();
    while at < c.range.end() {
        let (state, until) = state_at(after, at, c.range.end(), page);
        let pages = until.checked_offset_from(at).unwrap_or(0) / page.get();
        counts.requested += pages;
        if left_ram(state) {
            counts.left_ram += pages;
        } else {
            counts.stayed += pages;
            for (start, n, reason) in judge.reasons(vma, at, pages, c.state, state)? {
                *report.reasons.entry(reason).or_default() += n;
                push_stayed(
                    &mut report.stayed,
                    start,
                    n,
                    c.state,
                    state,
                    reason,
                    page.get(),
                );
            }
        }
        at = until;
    }
    add(&mut report.total, counts);
    match class {
        Class::Anon => add(&mut report.anon, counts),
        Class::ShmemMapped => add(&mut report.shmem_mapped, counts),
        Class::ShmemUnmapped => add(&mut report.shmem_unmapped, counts),
        Class::File => add(&mut report.file, counts),
    }
    Ok(())
}

fn add(to: &mut ClassCounts, c: ClassCounts) {
    to.requested += c.requested;
    to.left_ram += c.left_ram;
    to.stayed += c.stayed;
}

/// Page classes of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Anon,
    ShmemMapped,
    ShmemUnmapped,
    File,
}

fn class_of(v: &VmaReport, state: PageState) -> Class {
    match v.vma.backing {
        Backing::Shmem if state == PageState::Resident => Class::ShmemUnmapped,
        Backing::Shmem if v.vma.is_shared() => Class::ShmemMapped,
        Backing::File => Class::File,
        _ => Class::Anon,
    }
}

/// Whether a page in `state` after the pageout has left RAM.
fn left_ram(state: PageState) -> bool {
    matches!(
        state,
        PageState::Swapped | PageState::NotResident | PageState::Hole
    )
}

/// The state at `at` in `after` and where that run (capped at `end`)
/// ends; an address the re-scan does not cover (unmapped meanwhile)
/// counts as a hole up to `end`.
fn state_at(
    after: &ProcessReport,
    at: VirtAddr,
    end: VirtAddr,
    page: crate::addr::PageSize,
) -> (PageState, VirtAddr) {
    for v in &after.vmas {
        if !v.vma.range.contains(at) {
            continue;
        }
        for r in &v.runs {
            let range = r.range(page);
            if range.contains(at) {
                return (r.state, range.end().min(end));
            }
        }
    }
    (PageState::Hole, end)
}

fn push_stayed(
    out: &mut Vec<StayedRun>,
    start: VirtAddr,
    pages: u64,
    before: PageState,
    after: PageState,
    reason: Refusal,
    page: u64,
) {
    if let Some(last) = out.last_mut() {
        let contiguous = last.start.saturating_add(last.pages * page) == start;
        if contiguous && last.before == before && last.after == after && last.reason == reason {
            last.pages += pages;
            return;
        }
    }
    out.push(StayedRun {
        start,
        pages,
        before,
        after,
        reason,
    });
}
