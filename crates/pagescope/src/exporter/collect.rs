//! One collection of the machine: every process's `smaps_rollup` (the
//! smaps view, and the ranking for the top N), a full scan of the
//! processes that get their own series, a holdings scan
//! ([`crate::inspect::scan_holdings`]) of every other process that holds
//! swap or maps shared memory, `top`'s division over all of them, the
//! objects view of the shared-memory objects they map, and
//! `/proc/meminfo` to reconcile with.
//!
//! A process that exits, is denied or fails is counted by reason and left
//! out; it never fails the collection.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{ExporterOptions, Selection};
use crate::ErrorKind;
use crate::inspect::{scan_holdings, scan_process};
use crate::kernel::KernelCaps;
use crate::object::view::{ObjectsOptions, ObjectsReport};
use crate::page::PageState;
use crate::proc::Target;
use crate::proc::rollup::{Rollup, field_bytes};
use crate::render::summary::{ProcessSummary, summarize};
use crate::report::ProcessReport;
use crate::scan::{ScanError, ScanOptions};
use crate::vma::{Backing, MountTable, ObjectClass, ObjectId, VmaKind};

/// A process with its own series.
#[derive(Clone, Debug)]
pub struct ProcessSample {
    /// PID.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// Its `smaps_rollup`.
    pub rollup: Rollup,
    /// `top`'s line: smaps Rss and Pss (special mappings left out), swap
    /// and shared memory divided among holders.
    pub divided: ProcessSummary,
    /// Bytes of its address space per backing and page state (special
    /// mappings left out, as in `map`'s totals).
    pub states: BTreeMap<(&'static str, PageState), u64>,
}

/// Sums over the processes without their own series.
#[derive(Clone, Debug, Default)]
pub struct Aggregate {
    /// How many.
    pub processes: u64,
    /// smaps_rollup `Rss:`, bytes.
    pub rss: u64,
    /// smaps_rollup `Pss:`, bytes.
    pub pss: u64,
    /// smaps_rollup `Swap:` (charged to every holder), bytes.
    pub smaps_swap: u64,
    /// Divided private swap, bytes.
    pub swap: f64,
    /// Divided shmem swap, bytes.
    pub shmem_swap: f64,
    /// Divided shmem in RAM that no one maps, bytes.
    pub unmapped: f64,
}

/// A shared object, or the sum of those below the size threshold.
#[derive(Clone, Debug, Default)]
pub struct ObjectSample {
    /// Device and inode (none for the sum).
    pub id: Option<ObjectId>,
    /// `memfd`, `sysv`, `shared_anon`, `tmpfs`, `file`, ...
    pub kind: String,
    /// A path it is mapped under.
    pub path: String,
    /// Its size, bytes.
    pub size: u64,
    /// Bytes per state: `mapped` (in RAM, some process maps it),
    /// `unmapped` (in RAM, mapped by no one), `swapcache`, `swapped`,
    /// `fallocated`.
    pub states: BTreeMap<&'static str, u64>,
    /// Processes mapping it.
    pub sharers: u64,
    /// How many objects (1, or the count below the threshold).
    pub objects: u64,
}

/// A machine total: what the kernel says and what pagescope found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reconciled {
    /// `/proc/meminfo`, bytes.
    pub kernel: u64,
    /// Found in the processes' memory and the objects they map, bytes.
    pub explained: f64,
}

/// The machine totals, by `/proc/meminfo` field (`Shmem`, `SwapCached`,
/// `SwapUsed` = `SwapTotal - SwapFree`).
pub type Machine = BTreeMap<&'static str, Reconciled>;

/// One collection.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// How long it took.
    pub duration: Duration,
    /// Processes with their own series.
    pub processes: Vec<ProcessSample>,
    /// Every other process, summed.
    pub others: Aggregate,
    /// Processes left out of the per-process series by `--top` only.
    pub truncated: u64,
    /// Objects at or above the size threshold.
    pub objects: Vec<ObjectSample>,
    /// The other objects, summed.
    pub small_objects: ObjectSample,
    /// Machine totals.
    pub machine: Machine,
    /// Processes left out, by reason (`permission`, `exited`, `error`).
    pub skipped: BTreeMap<&'static str, u64>,
    /// Processes named by `--pid` that could not be reported, and why.
    pub missing: Vec<(u32, &'static str)>,
    /// Every process read (PID, comm), for `--watch` globs.
    pub seen: Vec<(u32, String)>,
    /// Failures that are not a process's normal churn (meminfo unreadable,
    /// a scan failing for another reason than exit or permission).
    pub errors: u64,
}

/// A process found in `/proc`, with its rollup.
struct Candidate {
    target: Target,
    comm: String,
    rollup: Rollup,
}

/// The reason label of a failure.
fn reason(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::PermissionDenied => "permission",
        ErrorKind::NoSuchProcess | ErrorKind::TargetExited | ErrorKind::NoAddressSpace => "exited",
        _ => "error",
    }
}

/// Collects one snapshot.
pub fn collect(opts: &ExporterOptions, caps: &KernelCaps) -> Snapshot {
    let start = Instant::now();
    let mut snap = Snapshot {
        ..Snapshot::default()
    };
    let cands = candidates(&mut snap);
    snap.seen = cands
        .iter()
        .map(|c| (c.target.pid(), c.comm.clone()))
        .collect();
    let selected = select(&cands, &opts.selection, opts.top, &mut snap);
    let (reports, rows) = scan_all(cands, &selected, caps, &mut snap);
    let sums = summarize(&reports);
    let mut shmem_pids = BTreeSet::new();
    for ((report, row), sum) in reports.iter().zip(rows).zip(sums) {
        if report.vmas.iter().any(|v| v.vma.backing == Backing::Shmem) {
            shmem_pids.insert(report.pid);
        }
        account(report, row, sum, &mut snap);
    }
    // Failures were noted for every process; keep those of named PIDs.
    snap.missing
        .retain(|(pid, _)| opts.selection.pids.contains(pid));
    for &pid in &opts.selection.pids {
        if !snap.processes.iter().any(|p| p.pid == pid) && !snap.missing.iter().any(|m| m.0 == pid)
        {
            snap.missing.push((pid, "exited"));
        }
    }
    let shmem_pids: Vec<u32> = shmem_pids.into_iter().collect();
    let objects = crate::inspect::objects_view(&shmem_pids, caps, &ObjectsOptions::default());
    objects_and_machine(&objects, opts.object_min_bytes, &mut snap);
    snap.duration = start.elapsed();
    snap
}

/// Every process with an address space, with its rollup; kernel threads
/// and processes without one are left out silently, others that cannot
/// be read are counted.
fn candidates(snap: &mut Snapshot) -> Vec<Candidate> {
    let me = std::process::id();
    let mut out = Vec::new();
    for pid in crate::proc::pids().into_iter().filter(|&p| p != me) {
        let read = Target::open(pid).and_then(|t| {
            let stat = t.stat()?;
            if stat.is_kernel_thread() || stat.is_zombie() {
                return Ok(None);
            }
            let text = t.read_file("smaps_rollup")?;
            let comm = String::from_utf8_lossy(&stat.comm).into_owned();
            Ok(Rollup::parse(&text).map(|rollup| Candidate {
                target: t,
                comm,
                rollup,
            }))
        });
        match read {
            Ok(Some(c)) => out.push(c),
            Ok(None) => {}
            Err(e) => note_failure(snap, pid, e.kind()),
        }
    }
    out
}

fn note_failure(snap: &mut Snapshot, pid: u32, kind: ErrorKind) {
    let why = reason(kind);
    *snap.skipped.entry(why).or_default() += 1;
    snap.errors += u64::from(why == "error");
    snap.missing.push((pid, why));
}

/// Which candidates get their own series: the PIDs named and the
/// processes whose comm matches the glob (at most `top` of those,
/// largest Rss + Swap first), or else the `top` largest.
fn select(cands: &[Candidate], sel: &Selection, top: usize, snap: &mut Snapshot) -> Vec<bool> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    let size = |i: &usize| {
        let r = cands[*i].rollup;
        std::cmp::Reverse(r.rss + r.swap)
    };
    order.sort_by_key(size);
    let mut chosen = vec![false; cands.len()];
    let mut by_rank = 0;
    let mut cut = 0;
    for i in order {
        let c = &cands[i];
        let pid = c.target.pid();
        if sel.pids.contains(&pid) {
            chosen[i] = true;
            continue;
        }
        let ranked = match &sel.name {
            Some(g) => g.matches(&c.comm),
            None => sel.pids.is_empty(),
        };
        if ranked && by_rank < top {
            chosen[i] = true;
            by_rank += 1;
        } else if ranked {
            cut += 1;
        }
    }
    snap.truncated = cut;
    chosen
}

/// How a candidate was scanned.
enum Row {
    Selected(Rollup, String),
    /// Its rollup, and the swap it holds alone (not in its report).
    Other(Rollup, u64),
}

/// Mount tables by mount namespace (every process of a namespace has the
/// same; reading it per process would cost as much as its maps).
#[derive(Default)]
struct Mounts(std::collections::HashMap<u64, MountTable>);

impl Mounts {
    fn of(&mut self, target: &Target) -> &MountTable {
        let ns = target.stat_file("ns/mnt").map_or(0, |s| s.st_ino);
        self.0.entry(ns).or_insert_with(|| {
            target
                .mountinfo()
                .map(|m| MountTable::new(&m))
                .unwrap_or_default()
        })
    }
}

/// Scans every candidate: selected ones fully (as `map` and `top` do),
/// others for their holdings only, where they may hold anything shared.
fn scan_all(
    cands: Vec<Candidate>,
    selected: &[bool],
    caps: &KernelCaps,
    snap: &mut Snapshot,
) -> (Vec<ProcessReport>, Vec<Row>) {
    let full = ScanOptions {
        smaps: true,
        swap_detail: true,
        objects: true,
        skip_exclusive: true,
        threads: 1,
        ..ScanOptions::default()
    };
    let holdings_work = caps.privileged_pagemap && caps.has_pagemap_scan();
    let mut mounts = Mounts::default();
    let mut reports = Vec::with_capacity(cands.len());
    let mut rows = Vec::with_capacity(cands.len());
    for (c, &sel) in cands.into_iter().zip(selected) {
        // SwapPss below Swap: some slot has other holders, or shmem swap
        // is in the mappings. Otherwise every swap entry is this
        // process's alone (swap count 1): its share is all of smaps Swap,
        // no one else's share changes, and its page tables need no walk.
        let shared_swap = c.rollup.swap > c.rollup.swap_pss;
        let result: Result<ProcessReport, ScanError> = if sel || !holdings_work {
            scan_process(&c.target, caps, &full)
        } else {
            scan_holdings(&c.target, caps, mounts.of(&c.target), shared_swap)
        };
        match result {
            // A mapping that changed during the scan is left out of the
            // report (as `top` keeps it); a process that exited is gone.
            Ok(mut r) if !exited(&r) => {
                r.comm.clone_from(&c.comm);
                reports.push(r);
                rows.push(match (sel, holdings_work && !shared_swap) {
                    (true, _) => Row::Selected(c.rollup, c.comm),
                    (false, true) => Row::Other(c.rollup, c.rollup.swap),
                    (false, false) => Row::Other(c.rollup, 0),
                });
            }
            Ok(_) => note_failure(snap, c.target.pid(), ErrorKind::TargetExited),
            Err(e) => note_failure(snap, c.target.pid(), e.kind()),
        }
    }
    (reports, rows)
}

fn exited(r: &ProcessReport) -> bool {
    r.skipped
        .iter()
        .any(|s| s.reason == crate::report::SkipReason::ProcessExited)
}

/// Adds one scanned process to the snapshot.
fn account(report: &ProcessReport, row: Row, sum: ProcessSummary, snap: &mut Snapshot) {
    match row {
        Row::Selected(rollup, comm) => {
            let page = report.page_size.get();
            let mut states = BTreeMap::new();
            for v in report
                .vmas
                .iter()
                .filter(|v| v.vma.backing != Backing::Special)
            {
                for run in &v.runs {
                    *states.entry((v.vma.backing.name(), run.state)).or_default() +=
                        run.pages * page;
                }
            }
            snap.processes.push(ProcessSample {
                pid: report.pid,
                comm,
                rollup,
                divided: sum,
                states,
            });
        }
        Row::Other(rollup, alone) => {
            let o = &mut snap.others;
            o.processes += 1;
            o.rss += rollup.rss;
            o.pss += rollup.pss;
            o.smaps_swap += rollup.swap;
            o.swap += sum.swap + alone as f64;
            o.shmem_swap += sum.shmem_swap;
            o.unmapped += sum.unmapped;
        }
    }
}

/// The objects (above the threshold each, the rest summed) and the
/// machine totals they and the processes explain.
fn objects_and_machine(view: &ObjectsReport, min_bytes: u64, snap: &mut Snapshot) {
    let page = view.page_size.get();
    let mut shmem = 0.0;
    let mut swap_cached = 0.0;
    let mut swap: f64 =
        snap.processes.iter().map(|p| p.divided.swap).sum::<f64>() + snap.others.swap;
    snap.small_objects.kind = "all".into();
    for o in &view.objects {
        let count = |s: PageState| o.counts.get(s) * page;
        let resident = count(PageState::Resident);
        let mapped = (o.mapped_pages * page).min(resident);
        let states = BTreeMap::from([
            ("mapped", mapped),
            ("unmapped", resident - mapped),
            ("swapcache", count(PageState::SwapCache)),
            ("swapped", count(PageState::Swapped)),
            ("fallocated", count(PageState::Fallocated)),
        ]);
        if o.object_class() == Some(ObjectClass::Shmem) {
            shmem += (resident + count(PageState::Fallocated)) as f64;
            swap_cached += count(PageState::SwapCache) as f64;
            swap += (count(PageState::SwapCache) + count(PageState::Swapped)) as f64;
        }
        let used: u64 = states.values().sum();
        if used >= min_bytes && used > 0 {
            snap.objects.push(ObjectSample {
                id: Some(o.id),
                kind: kind_name(o.kind),
                path: o.path.clone(),
                size: o.size_pages * page,
                states,
                sharers: o.sharers.len() as u64,
                objects: 1,
            });
        } else {
            let small = &mut snap.small_objects;
            small.objects += 1;
            small.size += o.size_pages * page;
            for (k, v) in states {
                *small.states.entry(k).or_default() += v;
            }
        }
    }
    let meminfo = std::fs::read("/proc/meminfo").unwrap_or_default();
    let field = |f| field_bytes(&meminfo, f);
    let (Some(total), Some(free), Some(cached), Some(sh)) = (
        field("SwapTotal"),
        field("SwapFree"),
        field("SwapCached"),
        field("Shmem"),
    ) else {
        snap.errors += 1;
        return;
    };
    let pair = |kernel, explained| Reconciled { kernel, explained };
    snap.machine.insert("Shmem", pair(sh, shmem));
    snap.machine.insert("SwapCached", pair(cached, swap_cached));
    snap.machine
        .insert("SwapUsed", pair(total.saturating_sub(free), swap));
}

/// The snake_case name of a kind (as in the JSON documents).
fn kind_name(k: VmaKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
