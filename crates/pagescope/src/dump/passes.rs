//! The passes of a dump over one set of pinned processes: the full pass,
//! pre-copy rounds of what the trackers report written, the stopped final
//! pass, and the commit. Layout changes between passes (a mapping added,
//! removed or replaced) are reconciled from a fresh scan.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::cold;
use super::copy::{self, Copied, Frames, Parent, Sink};
use super::model::{ObjectModel, VmaModel, pages_in};
use super::remote::RemoteMem;
use super::stop::Stopped;
use super::swap::{SwapIo, SwapPolicy, SwapReport};
use super::{DumpError, DumpEvent, DumpOptions, DumpReport, Iteration};
use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};
use crate::dirty::{
    Adopt, DirtyReport, DirtyTracker, TrackOptions, TrackerBackend, WriteSource, attach,
    attach_owned,
};
use crate::error::ErrorKind;
use crate::image::format::{DedupRef, KeptTracking, Meta, PageKind, ProcessRec};
use crate::image::{Image, ImageWriter};
use crate::kernel::KernelCaps;
use crate::object::classify::ObjectState;
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::scan::ScanOptions;
use crate::vma::{Backing, ObjectClass, ObjectId};

/// One process being dumped.
pub(super) struct Proc<'t> {
    pub(super) pid: u32,
    pub(super) target: ProcTarget<'t>,
    pub(super) tracker: Box<dyn DirtyTracker + 't>,
    pub(super) mem: RemoteMem,
    pub(super) vmas: Vec<VmaModel>,
    pub(super) adopted: Option<i32>,
    /// Tracked since the parent image (a kept userfaultfd): pages reported
    /// written are stored without comparing them with the parent.
    tracked_since_parent: bool,
}

pub(super) enum ProcTarget<'t> {
    Borrowed(&'t Target),
    Owned(Box<Target>),
}

impl ProcTarget<'_> {
    pub(super) fn get(&self) -> &Target {
        match self {
            Self::Borrowed(t) => t,
            Self::Owned(t) => t,
        }
    }
}

/// The key a mapping keeps across passes while it is the same mapping.
fn same_mapping(a: &crate::vma::Vma, b: &crate::vma::Vma) -> bool {
    a.range == b.range && a.offset == b.offset && a.inode == b.inode && a.dev == b.dev
}

/// Pages to copy in one pass: own pages per (process, mapping), object
/// pages per object.
#[derive(Default)]
struct Plan {
    own: Vec<(usize, usize, Vec<u64>)>,
    objects: BTreeMap<ObjectId, BTreeSet<u64>>,
}

impl Plan {
    fn pages(&self) -> u64 {
        let own: usize = self.own.iter().map(|(_, _, p)| p.len()).sum();
        let obj: usize = self.objects.values().map(BTreeSet::len).sum();
        (own + obj) as u64
    }
}

/// Everything a dump works with.
pub(super) struct Dump<'t, 'c, 'p> {
    caps: &'c KernelCaps,
    pub(super) opts: DumpOptions,
    pub(super) page: PageSize,
    pub(super) writer: ImageWriter,
    parent: Option<Image>,
    pub(super) procs: Vec<Proc<'t>>,
    pub(super) objects: BTreeMap<ObjectId, ObjectModel>,
    frames: Option<Frames>,
    pub(super) progress: &'p mut dyn FnMut(DumpEvent<'_>),
    last_collect: Instant,
    /// Copy throughput of the full pass, bytes/s.
    rate: f64,
    pub(super) notes: Vec<String>,
    pub(super) swap: Arc<SwapIo>,
    /// Per process, its threads' rseq areas (read while stopped).
    pub(super) rseq: BTreeMap<u32, Vec<crate::image::format::RseqRec>>,
    /// Objects copied through the process's mappings (not openable).
    unopened: super::unopened::UnopenedObjects,
    /// Other writers of the shared memory in the final pass.
    pub(super) shared_writers: super::SharedWriters,
}

impl<'t, 'c, 'p> Dump<'t, 'c, 'p> {
    pub(super) fn new(
        caps: &'c KernelCaps,
        opts: DumpOptions,
        writer: ImageWriter,
        parent: Option<Image>,
        progress: &'p mut dyn FnMut(DumpEvent<'_>),
    ) -> Self {
        Self {
            caps,
            page: caps.page_size,
            frames: opts.tree.then(Frames::default),
            writer,
            parent,
            procs: Vec::new(),
            objects: BTreeMap::new(),
            progress,
            last_collect: Instant::now(),
            rate: 0.0,
            notes: Vec::new(),
            unopened: super::unopened::UnopenedObjects::default(),
            shared_writers: super::SharedWriters::default(),
            swap: Arc::new(SwapIo::new(
                opts.swap,
                caps.privileged_pagemap,
                caps.page_size,
            )),
            rseq: BTreeMap::new(),
            opts,
        }
    }

    /// Pins every process (the target, its descendants with `tree`) and
    /// attaches a tracker to each before anything is copied.
    pub(super) fn attach_all(&mut self, target: &'t Target) -> Result<(), DumpError> {
        let mut pids = vec![target.pid()];
        if self.opts.tree {
            descendants(target, &mut pids);
        }
        for (i, pid) in pids.into_iter().enumerate() {
            let t = if i == 0 {
                ProcTarget::Borrowed(target)
            } else {
                match Target::open(pid) {
                    Ok(t) => ProcTarget::Owned(Box::new(t)),
                    Err(_) => continue, // exited since it was listed
                }
            };
            let adopt = if i == 0 {
                self.adoptable(t.get())?
            } else {
                None
            };
            let opts = TrackOptions {
                keep_in_target: i == 0 && self.opts.keep_tracking,
                adopt: adopt.clone(),
                // A copy-before-write snapshot tracks nothing between
                // passes: it has one.
                backend: self.opts.cow.then_some(TrackerBackend::AllDirty),
                ..TrackOptions::default()
            };
            let tracker = match self.tracker(&t, &opts) {
                Ok(tr) => tr,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Busy | ErrorKind::Unsupported | ErrorKind::PermissionDenied
                    ) =>
                {
                    // One stopped pass still makes a consistent image.
                    self.notes.push(format!(
                        "process {pid}: no write tracking ({e}): no pre-copy"
                    ));
                    let all = TrackOptions {
                        backend: Some(TrackerBackend::AllDirty),
                        ..TrackOptions::default()
                    };
                    self.tracker(&t, &all)?
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(why) = tracker.degraded().filter(|_| !self.opts.cow) {
                self.notes.push(format!("process {pid}: {why}"));
            }
            let mem = RemoteMem::open(t.get(), self.page, Arc::clone(&self.swap))?;
            self.procs.push(Proc {
                pid,
                target: t,
                tracker,
                mem,
                vmas: Vec::new(),
                tracked_since_parent: adopt.is_some(),
                adopted: adopt.map(|a| a.fd),
            });
        }
        self.last_collect = Instant::now();
        Ok(())
    }

    fn tracker(
        &self,
        t: &ProcTarget<'t>,
        opts: &TrackOptions,
    ) -> Result<Box<dyn DirtyTracker + 't>, crate::dirty::TrackError> {
        match t {
            ProcTarget::Borrowed(b) => attach(b, self.caps, opts),
            ProcTarget::Owned(o) => attach_owned(
                Target::open(o.pid()).map_err(crate::dirty::TrackError::from)?,
                self.caps,
                opts,
            ),
        }
    }

    /// The userfaultfd the parent image says the target keeps, if the
    /// target is still the process that image was taken of.
    fn adoptable(&self, t: &Target) -> Result<Option<Adopt>, DumpError> {
        let Some(parent) = &self.parent else {
            return Ok(None);
        };
        let Some(k) = &parent.meta().kept_tracking else {
            return Ok(None);
        };
        if k.pid != t.pid() || t.stat()?.start_time != k.start_time {
            return Ok(None);
        }
        let Some(p) = parent.process(k.pid) else {
            return Ok(None);
        };
        let registered = p
            .vmas
            .iter()
            .filter(|v| v.backing != Backing::Special.name())
            .filter_map(|v| VirtRange::new(VirtAddr::new(v.start), VirtAddr::new(v.end)))
            .collect();
        Ok(Some(Adopt {
            fd: k.fd,
            registered,
        }))
    }

    /// Copies everything: with an adopted tracker, only what changed since
    /// the parent image; with a parent, pages equal to it are recorded as
    /// in the parent.
    pub(super) fn full_pass(&mut self) -> Result<Iteration, DumpError> {
        let t0 = Instant::now();
        let mut plan = Plan::default();
        for i in 0..self.procs.len() {
            let since = match self.procs[i].adopted {
                Some(_) => Some(self.procs[i].tracker.collect()?.ranges()),
                None => None,
            };
            self.procs[i].vmas = self.build_models(i)?;
            for k in 0..self.procs[i].vmas.len() {
                let pages = self.first_copy_pages(i, k, since.as_ref());
                plan.own.push((i, k, pages));
            }
        }
        let ids: Vec<ObjectId> = self.objects.keys().copied().collect();
        for id in ids {
            let pages = self.object_data(id, None)?;
            plan.objects.entry(id).or_default().extend(pages);
        }
        let copied = self.run(0, &plan)?;
        let it = self.iteration(0, false, t0, copied, 0, Duration::ZERO);
        if it.seconds > 0.0 && it.bytes > 0 {
            self.rate = it.bytes as f64 / it.seconds;
        }
        (self.progress)(DumpEvent::Iteration(&it));
        Ok(it)
    }

    /// Pre-copy rounds: copy what was written, until the written set stops
    /// shrinking, a limit is hit, or the rest fits in `max_downtime`.
    pub(super) fn precopy(&mut self, its: &mut Vec<Iteration>) -> Result<(), DumpError> {
        if let Some(p) = self
            .procs
            .iter()
            .find(|p| p.tracker.backend() == TrackerBackend::AllDirty)
        {
            self.notes.push(format!(
                "process {}: no write tracking, so no pre-copy (every page would count as written)",
                p.pid
            ));
            return Ok(());
        }
        let start = Instant::now();
        let mut previous = u64::MAX;
        for n in 1..=self.opts.max_iterations {
            self.cancelled()?;
            if start.elapsed() >= self.opts.max_time {
                break;
            }
            let it = self.copy_written(n, false)?;
            (self.progress)(DumpEvent::Iteration(&it));
            let written = it.written_pages;
            let fits = self
                .opts
                .max_downtime
                .is_some_and(|d| it.predicted_downtime_s <= d.as_secs_f64());
            its.push(it);
            if written == 0 || fits || written >= previous {
                break;
            }
            previous = written;
        }
        Ok(())
    }

    /// Without `keep_tracking`, closes the userfaultfd an earlier dump
    /// left in the target (pagescope's copy keeps tracking to the end).
    /// Done before the final pass: running code in the target may touch
    /// its memory (a restarted system call), which that pass then copies.
    pub(super) fn release_adopted(&mut self) -> Result<(), DumpError> {
        if self.opts.keep_tracking {
            return Ok(());
        }
        if let Some(first) = self.procs.first_mut() {
            if let Some(fd) = first.adopted.take() {
                crate::dirty::inject::close_in_target(first.target.get(), fd)?;
            }
        }
        Ok(())
    }

    /// The stopped pass: every thread of every process interrupted, what
    /// was written since the last pass copied, then resumed (or left
    /// stopped). Returns the pass and how long the processes were stopped.
    pub(super) fn final_pass(&mut self, n: u32) -> Result<(Iteration, f64), DumpError> {
        let t0 = Instant::now();
        let mut stopped = Vec::with_capacity(self.procs.len());
        for p in &self.procs {
            let s = Stopped::stop(p.target.get())
                .map_err(|source| DumpError::Stop { pid: p.pid, source })?;
            stopped.push(s);
        }
        for (p, s) in self.procs.iter().zip(&stopped) {
            self.rseq.insert(p.pid, s.rseq_areas());
        }
        let dumped: Vec<&Target> = self.procs.iter().map(|p| p.target.get()).collect();
        let (others, writers) = super::sharers::stop_writers(&dumped, self.opts.stop_sharers);
        stopped.extend(others);
        self.shared_writers = writers;
        let it = self.copy_written(n, true)?;
        for s in &mut stopped {
            if self.opts.leave_stopped {
                s.leave_stopped();
            }
        }
        drop(stopped.into_iter().map(Stopped::resume).collect::<Vec<_>>());
        let stopped_s = t0.elapsed().as_secs_f64();
        (self.progress)(DumpEvent::Iteration(&it));
        Ok((it, stopped_s))
    }

    /// One tracked pass: collect every tracker, reconcile the layouts,
    /// copy the written pages.
    fn copy_written(&mut self, n: u32, stopped: bool) -> Result<Iteration, DumpError> {
        let t0 = Instant::now();
        let interval = self.last_collect.elapsed();
        self.last_collect = t0;
        let mut plan = Plan::default();
        let mut written_pages = 0;
        for i in 0..self.procs.len() {
            let pid = self.procs[i].pid;
            let report = self.procs[i]
                .tracker
                .collect()
                .map_err(|e| match e.kind() {
                    crate::error::ErrorKind::TargetExited => DumpError::Exited { pid },
                    _ => DumpError::Track(e),
                })?;
            written_pages += report.pages();
            let fresh = self.reconcile(i, &report)?;
            self.route(i, &report.ranges(), &fresh, &mut plan)?;
        }
        let copied = self.run(n, &plan)?;
        Ok(self.iteration(n, stopped, t0, copied, written_pages, interval))
    }

    /// Rebuilds the models of process `i` if its layout changed or a
    /// mapping was replaced (reported as new); the indices of mappings
    /// whose pages must all be copied.
    fn reconcile(&mut self, i: usize, report: &DirtyReport) -> Result<BTreeSet<usize>, DumpError> {
        let replaced: RangeSet = report
            .written
            .iter()
            .filter(|w| w.source == WriteSource::NewMapping)
            .map(|w| w.range)
            .collect();
        let maps = self.procs[i].target.get().maps()?;
        let old = &self.procs[i].vmas;
        let same_layout = maps.len() == old.len()
            && maps.iter().zip(old).all(|(e, m)| {
                e.range == m.vma.range && e.offset == m.vma.offset && e.inode == m.vma.inode
            });
        let touched = |m: &VmaModel| !replaced.intersect(m.vma.range).is_empty();
        if same_layout && !old.iter().any(touched) {
            return Ok(BTreeSet::new());
        }
        let mut old = std::mem::take(&mut self.procs[i].vmas);
        let mut models = self.build_models(i)?;
        let mut fresh = BTreeSet::new();
        for (k, m) in models.iter_mut().enumerate() {
            let kept = old
                .iter()
                .position(|o| same_mapping(&o.vma, &m.vma) && !touched(o))
                .map(|at| old.swap_remove(at));
            match kept {
                Some(o) => *m = o,
                None => {
                    fresh.insert(k);
                }
            }
        }
        self.procs[i].vmas = models;
        Ok(fresh)
    }

    /// Adds to `plan` the pages of process `i` the written ranges cover
    /// (own pages, or object pages for a shared object mapping) and every
    /// page of the `fresh` mappings.
    fn route(
        &mut self,
        i: usize,
        written: &RangeSet,
        fresh: &BTreeSet<usize>,
        plan: &mut Plan,
    ) -> Result<(), DumpError> {
        let page = self.page;
        for k in 0..self.procs[i].vmas.len() {
            let m = &self.procs[i].vmas[k];
            if m.vma.backing == Backing::Special {
                continue;
            }
            if fresh.contains(&k) {
                if let Some(id) = m.vma.object_id().filter(|_| m.is_object_view()) {
                    let span = m.vma.object_span(m.vma.range, page);
                    let pages = self.object_data(id, Some(span))?;
                    plan.objects.entry(id).or_default().extend(pages);
                }
                let own = self.procs[i].vmas[k].own_pages();
                plan.own.push((i, k, own));
                continue;
            }
            let parts = written.intersect(m.vma.range);
            if parts.is_empty() {
                continue;
            }
            if let Some(id) = m.vma.object_id().filter(|_| m.is_object_view()) {
                let set = plan.objects.entry(id).or_default();
                for r in parts {
                    let span = m.vma.object_span(r, page);
                    set.extend(span.start()..span.end());
                }
                continue;
            }
            let pages: Vec<u64> = parts
                .into_iter()
                .flat_map(|r| pages_in(&m.vma, r, page))
                .collect();
            plan.own.push((i, k, pages));
        }
        Ok(())
    }

    /// Copies `plan`, then pages whose dedup source was rewritten.
    fn run(&mut self, pass: u32, plan: &Plan) -> Result<Copied, DumpError> {
        let total = plan.pages();
        let mut done = 0;
        let mut copied = Copied::default();
        for (i, k, pages) in &plan.own {
            self.cancelled()?;
            copied += self.copy_own(*i, *k, pages, pass, total, &mut done)?;
        }
        for (id, pages) in &plan.objects {
            self.cancelled()?;
            let pages: Vec<u64> = pages.iter().copied().collect();
            copied += self.copy_object(*id, &pages, pass, total, &mut done)?;
        }
        copied += self.recopy_invalidated(pass)?;
        Ok(copied)
    }

    /// Copies again the pages deduplicated against a page that was
    /// rewritten since.
    fn recopy_invalidated(&mut self, pass: u32) -> Result<Copied, DumpError> {
        let mut copied = Copied::default();
        loop {
            let Some(f) = self.frames.as_mut() else {
                return Ok(copied);
            };
            let stale = std::mem::take(&mut f.invalidated);
            if stale.is_empty() {
                return Ok(copied);
            }
            let mut by_vma: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
            for DedupRef {
                pid,
                vma_start,
                page,
            } in stale
            {
                by_vma.entry((pid, vma_start)).or_default().push(page);
            }
            for ((pid, start), mut pages) in by_vma {
                let Some(i) = self.procs.iter().position(|p| p.pid == pid) else {
                    continue;
                };
                let Some(k) = self.procs[i]
                    .vmas
                    .iter()
                    .position(|m| m.vma.range.start().get() == start)
                else {
                    continue;
                };
                pages.sort_unstable();
                pages.dedup();
                let total = pages.len() as u64;
                copied += self.copy_own(i, k, &pages, pass, total, &mut 0)?;
            }
        }
    }

    /// Scans process `i` and models its mappings; opens (or grows) the
    /// objects behind them.
    pub(super) fn build_models(&mut self, i: usize) -> Result<Vec<VmaModel>, DumpError> {
        let report = crate::inspect::scan_process(
            self.procs[i].target.get(),
            self.caps,
            &ScanOptions {
                objects: false,
                ..ScanOptions::default()
            },
        )?;
        let mut models: Vec<VmaModel> = report
            .vmas
            .iter()
            .map(|v| VmaModel::from_report(v, self.page))
            .collect();
        for (m, v) in models.iter_mut().zip(&report.vmas) {
            if !self.add_object(i, m)? {
                m.read_through_mapping(v, self.page);
            }
        }
        Ok(models)
    }

    /// The own pages of mapping `k` of process `i` the first pass copies:
    /// all, or (adopted tracker, mapping unchanged since the parent) only
    /// the written ones; the others are in the parent.
    fn first_copy_pages(&mut self, i: usize, k: usize, since: Option<&RangeSet>) -> Vec<u64> {
        let page = self.page;
        let pid = self.procs[i].pid;
        let m = &mut self.procs[i].vmas[k];
        let own = m.own_pages();
        let (Some(since), Some(parent)) = (since, &self.parent) else {
            return own;
        };
        if find_parent_vma(parent, pid, m).is_none() {
            return own;
        }
        let written: RangeSet<PageSpan> = since
            .intersect(m.vma.range)
            .into_iter()
            .filter_map(|r| {
                let p = pages_in(&m.vma, r, page);
                PageSpan::new(p.start, p.end)
            })
            .collect();
        let (copy, keep): (Vec<u64>, Vec<u64>) =
            own.into_iter().partition(|&p| written.contains(p));
        for p in keep {
            if let Some(k) = m.kinds.get_mut(usize::try_from(p).unwrap_or(usize::MAX)) {
                *k = PageKind::InParent;
            }
        }
        copy
    }

    /// Opens (once) the object behind `m`, growing it to cover `m`;
    /// `false` if it cannot be opened (then `m` is read through the
    /// process's mapping, and a note says what that leaves out).
    fn add_object(&mut self, i: usize, m: &VmaModel) -> Result<bool, DumpError> {
        let Some(id) = m.vma.object_id() else {
            return Ok(true);
        };
        let span = m.vma.object_span(m.vma.range, self.page);
        if !self.objects.contains_key(&id) {
            let o = match crate::object::open_object(
                self.procs[i].target.get(),
                &m.vma,
                self.caps.map_files,
            ) {
                Ok(o) => o,
                Err(e) if e.kind() != ErrorKind::TargetExited => {
                    let why = match &e {
                        crate::object::ObjectError::Open { tried, .. } => tried.clone(),
                        other => other.to_string(),
                    };
                    self.unopened.add(id, &m.vma, why, self.page);
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
            let written_through = m.vma.is_shared() && m.vma.perms.write;
            let by_identity = !self.opts.copy_files
                && !written_through
                && m.vma.object_class() == Some(ObjectClass::File);
            // A deleted file has no identity to reopen: copied instead.
            let file = if by_identity {
                crate::image::identity::of_fd(o.fd.as_fd())
            } else {
                None
            };
            self.objects.insert(
                id,
                ObjectModel {
                    id,
                    path: m.vma.path.display(),
                    kind: m.vma.kind,
                    pages: 0,
                    fd: o.fd,
                    kinds: Vec::new(),
                    store: None,
                    file,
                    cold: Vec::new(),
                },
            );
        }
        let Some(o) = self.objects.get_mut(&id) else {
            return Ok(true);
        };
        if span.end() > o.pages {
            let fill = if o.file.is_some() {
                PageKind::File
            } else {
                PageKind::Hole
            };
            o.kinds
                .resize(usize::try_from(span.end()).unwrap_or(0), fill);
            o.pages = span.end();
            if let Some(s) = &o.store {
                s.grow(o.pages)?;
            }
        }
        Ok(true)
    }

    /// The data pages (`SEEK_DATA`) of copied object `id` within `span`
    /// (all of it by default); its other pages there become holes.
    pub(super) fn object_data(
        &mut self,
        id: ObjectId,
        span: Option<PageSpan>,
    ) -> Result<Vec<u64>, DumpError> {
        let page = self.page;
        let Some(o) = self.objects.get_mut(&id) else {
            return Ok(Vec::new());
        };
        if o.file.is_some() {
            return Ok(Vec::new());
        }
        let span = span.unwrap_or_else(|| PageSpan::new(0, o.pages).unwrap_or_default());
        let data = crate::object::extents::data_extents(o.fd.as_fd(), span, page).map_err(|e| {
            DumpError::ObjectRead {
                inode: id.inode,
                source: e.into(),
            }
        })?;
        for p in span.start()..span.end().min(o.pages) {
            o.kinds[usize::try_from(p).unwrap_or(0)] = PageKind::Hole;
        }
        Ok(data
            .ranges()
            .iter()
            .flat_map(|r| r.start()..r.end())
            .collect())
    }

    /// Copies own pages `pages` of mapping `k` of process `i`.
    fn copy_own(
        &mut self,
        i: usize,
        k: usize,
        pages: &[u64],
        pass: u32,
        total: u64,
        done: &mut u64,
    ) -> Result<Copied, DumpError> {
        if pages.is_empty() {
            return Ok(Copied::default());
        }
        let page = self.page;
        let pid = self.procs[i].pid;
        let dedup = self.procs[i].vmas[k].vma.backing == Backing::Anon;
        let compare = !self.procs[i].tracked_since_parent;
        let Self {
            procs,
            writer,
            parent,
            frames,
            progress,
            ..
        } = self;
        let Proc { vmas, mem, .. } = &mut procs[i];
        let m = &mut vmas[k];
        for &p in pages {
            if let Some(kind) = m.kinds.get_mut(usize::try_from(p).unwrap_or(usize::MAX)) {
                *kind = PageKind::Data;
            }
        }
        let parent = match parent
            .as_ref()
            .filter(|p| compare && find_parent_vma(p, pid, m).is_some())
        {
            Some(p) => Parent::Vma(p, pid, m.vma.range.start().get()),
            None => Parent::None,
        };
        let mut tick = |n: u64| {
            *done += n;
            progress(DumpEvent::Progress {
                pass,
                done: *done,
                total,
            });
        };
        let mut sink = Sink {
            writer,
            page,
            tick: &mut tick,
        };
        let frames = frames.as_mut().filter(|_| dedup);
        copy::own(pid, m, pages, &mut sink, &parent, frames, mem)
    }

    /// Copies object pages `pages` of object `id`.
    fn copy_object(
        &mut self,
        id: ObjectId,
        pages: &[u64],
        pass: u32,
        total: u64,
        done: &mut u64,
    ) -> Result<Copied, DumpError> {
        let parent_index = self.parent_object(id);
        let page = self.page;
        let skip = if pass == 0 {
            self.swapped_object_pages(id, pages)?
        } else {
            BTreeSet::new()
        };
        let Self {
            objects,
            writer,
            parent,
            progress,
            ..
        } = self;
        let Some(o) = objects.get_mut(&id) else {
            return Ok(Copied::default());
        };
        if o.file.is_some() {
            return Ok(Copied::default());
        }
        let parent = match (parent.as_ref(), parent_index) {
            (Some(p), Some(ix)) => Parent::Object(p, ix),
            _ => Parent::None,
        };
        let mut tick = |n: u64| {
            *done += n;
            progress(DumpEvent::Progress {
                pass,
                done: *done,
                total,
            });
        };
        let mut sink = Sink {
            writer,
            page,
            tick: &mut tick,
        };
        copy::object(o, pages, &skip, &mut sink, &parent)
    }

    /// With a swap policy other than `read`, the pages of `pages` of
    /// object `id` that are swapped out (asked of the object: `mincore`
    /// and `cachestat` on pagescope's own fd): counted, remembered for
    /// `keep-cold`, and returned if `skip` leaves them alone.
    fn swapped_object_pages(
        &mut self,
        id: ObjectId,
        pages: &[u64],
    ) -> Result<BTreeSet<u64>, DumpError> {
        let policy = self.swap.policy();
        let (Some(&lo), Some(&hi)) = (pages.first(), pages.last()) else {
            return Ok(BTreeSet::new());
        };
        let Some(o) = self.objects.get_mut(&id).filter(|o| o.file.is_none()) else {
            return Ok(BTreeSet::new());
        };
        if policy == SwapPolicy::Read {
            return Ok(BTreeSet::new());
        }
        let size = rustix::fs::fstat(&o.fd).map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0));
        let span = PageSpan::new(lo, hi + 1).unwrap_or_default();
        let classified = crate::object::classify::classify(
            o.fd.as_fd(),
            ObjectClass::Shmem,
            size.div_ceil(self.page.get()),
            span,
            self.page,
            &RangeSet::default(),
        )
        .map_err(|e| DumpError::ObjectRead {
            inode: id.inode,
            source: e.into(),
        })?;
        let wanted: BTreeSet<u64> = pages.iter().copied().collect();
        let mut swapped = BTreeSet::new();
        let mut skip = BTreeSet::new();
        for r in &classified.runs {
            for p in r.first..r.first + r.count {
                if !wanted.contains(&p) {
                    continue;
                }
                match r.state {
                    // On the device only: `skip` leaves it there.
                    ObjectState::Swapped => {
                        swapped.insert(p);
                        if policy == SwapPolicy::Skip {
                            skip.insert(p);
                        }
                    }
                    // In RAM too: read (no I/O), paged back out by keep-cold.
                    ObjectState::SwapCache => {
                        swapped.insert(p);
                    }
                    _ => {}
                }
            }
        }
        self.swap
            .count_shmem(swapped.len() as u64, skip.len() as u64);
        if policy != SwapPolicy::Skip {
            o.cold.extend(swapped.iter().copied());
        }
        Ok(skip)
    }

    /// The index of object `id` in the parent image.
    fn parent_object(&self, id: ObjectId) -> Option<usize> {
        let p = self.parent.as_ref()?;
        let dev = id.dev.to_string();
        p.meta()
            .objects
            .iter()
            .position(|o| o.dev == dev && o.inode == id.inode)
    }

    /// The statistics of a pass that started at `t0`.
    pub(super) fn iteration(
        &self,
        n: u32,
        stopped: bool,
        t0: Instant,
        copied: Copied,
        written_pages: u64,
        interval: Duration,
    ) -> Iteration {
        let page = self.page.get();
        let written_bytes = (written_pages * page) as f64;
        let secs = interval.as_secs_f64();
        Iteration {
            n,
            stopped,
            pages: copied.pages,
            stored: copied.stored,
            bytes: copied.pages * page,
            seconds: t0.elapsed().as_secs_f64(),
            written_pages,
            dirty_rate_mib_s: if secs > 0.0 {
                written_bytes / secs / f64::from(1 << 20)
            } else {
                0.0
            },
            predicted_downtime_s: if self.rate > 0.0 {
                written_bytes / self.rate
            } else {
                0.0
            },
        }
    }

    /// Writes the metadata and commits the image; closes a kept
    /// userfaultfd that is not wanted any more.
    pub(super) fn finish(
        mut self,
        iterations: Vec<Iteration>,
        stopped_s: f64,
        snapshot: Option<super::CowStats>,
    ) -> Result<DumpReport, DumpError> {
        let mut index = BTreeMap::new();
        let objects = self
            .objects
            .values()
            .enumerate()
            .map(|(ix, o)| {
                index.insert(o.id, ix);
                o.record()
            })
            .collect();
        let mut processes = Vec::with_capacity(self.procs.len());
        let (mut stored, mut covered) = (0, 0);
        for p in &self.procs {
            let st = p.target.get().stat()?;
            for m in &p.vmas {
                stored += m.store.as_ref().map_or(0, |s| s.stored());
                covered += m.kinds.len() as u64;
            }
            processes.push(ProcessRec {
                pid: p.pid,
                ppid: st.ppid,
                comm: String::from_utf8_lossy(&st.comm).into_owned(),
                vmas: p
                    .vmas
                    .iter()
                    .map(|m| m.record(m.vma.object_id().and_then(|id| index.get(&id).copied())))
                    .collect(),
                rseq: self.rseq.get(&p.pid).cloned().unwrap_or_default(),
            });
        }
        for o in self.objects.values() {
            stored += o.store.as_ref().map_or(0, |s| s.stored());
            covered += o.pages;
        }
        let kept_tracking = self.kept_tracking()?;
        let unopened = self.unopened.notes(self.page);
        self.notes.extend(unopened);
        let swap = self.page_back_out();
        let meta = Meta {
            processes,
            objects,
            stores: Vec::new(),
            kept_tracking: kept_tracking.clone(),
            swap_devices: if self.swap.policy() == SwapPolicy::Skip {
                self.swap.device_paths()
            } else {
                Vec::new()
            },
        };
        let header = self.writer.commit(meta)?;
        Ok(DumpReport {
            dir: self.opts.out.clone(),
            image_id: header.image_id,
            generation: header.generation,
            pids: self.procs.iter().map(|p| p.pid).collect(),
            iterations,
            stopped_s,
            stored_pages: stored,
            covered_pages: covered,
            kept_tracking,
            swap,
            snapshot,
            notes: self.notes,
            shared_writers: self.shared_writers,
        })
    }

    /// `keep-cold` (and `direct`'s fallbacks): pages every swapped page the
    /// dump read back out, and counts what really left RAM.
    fn page_back_out(&mut self) -> SwapReport {
        let mut report = SwapReport {
            policy: self.swap.policy(),
            anon: self.swap.anon.report(),
            shmem: self.swap.shmem.report(),
            notes: self.swap.notes(),
        };
        if matches!(report.policy, SwapPolicy::Read | SwapPolicy::Skip) {
            return report;
        }
        for p in &self.procs {
            let cold = p.mem.take_cold();
            match cold::anon(p.target.get(), &p.mem, &cold, self.page) {
                Ok(o) => {
                    report.anon.paged_out += o.out;
                    report.anon.still_in_ram += o.still;
                }
                Err(e) => {
                    report.anon.still_in_ram += cold.len() as u64;
                    report.notes.push(format!(
                        "process {}: cannot page {} pages back out: {e}",
                        p.pid,
                        cold.len()
                    ));
                }
            }
        }
        for o in self.objects.values_mut() {
            let cold = std::mem::take(&mut o.cold);
            match cold::object(o.fd.as_fd(), &cold, self.page) {
                Ok(r) => {
                    report.shmem.paged_out += r.out;
                    report.shmem.still_in_ram += r.still;
                }
                Err(e) => {
                    report.shmem.still_in_ram += cold.len() as u64;
                    report.notes.push(format!(
                        "object inode {}: cannot page {} pages back out: {e}",
                        o.id.inode,
                        cold.len()
                    ));
                }
            }
        }
        if report.anon.still_in_ram + report.shmem.still_in_ram > 0 {
            report.notes.push(
                "pages still in RAM after MADV_PAGEOUT: on an asynchronous swap device (a swap file) a page stays in the swap cache until its write completes, and the next reclaim frees it; a page mapped by several processes or locked is not paged out".into(),
            );
        }
        report
    }

    /// The userfaultfd the target keeps for the next dump
    /// (`keep_tracking`).
    fn kept_tracking(&mut self) -> Result<Option<KeptTracking>, DumpError> {
        let Some(first) = self.procs.first() else {
            return Ok(None);
        };
        let target = first.target.get();
        if !self.opts.keep_tracking {
            return Ok(None);
        }
        match first.tracker.kept_in_target() {
            Some(fd) => Ok(Some(KeptTracking {
                pid: first.pid,
                start_time: target.stat()?.start_time,
                fd,
            })),
            None => {
                self.notes.push(format!(
                    "process {}: tracking could not be kept in the process ({}); the next incremental dump compares pages with this image",
                    first.pid,
                    first.tracker.backend().name()
                ));
                Ok(None)
            }
        }
    }
}

/// The parent's record of the mapping `m` of process `pid`, if it is the
/// same mapping.
fn find_parent_vma<'i>(
    parent: &'i Image,
    pid: u32,
    m: &VmaModel,
) -> Option<&'i crate::image::format::VmaRec> {
    parent.process(pid)?.vmas.iter().find(|v| {
        v.start == m.vma.range.start().get()
            && v.end == m.vma.range.end().get()
            && v.offset == m.vma.offset
            && v.inode == m.vma.inode
    })
}

/// The descendants of `t`, depth first.
fn descendants(t: &Target, out: &mut Vec<u32>) {
    for c in t.children() {
        if out.contains(&c) {
            continue;
        }
        out.push(c);
        if let Ok(ct) = Target::open(c) {
            descendants(&ct, out);
        }
    }
}
