//! The pre-copy engine over one set of pinned processes: the full pass,
//! pre-copy passes of what the trackers report written (until the
//! written set stops shrinking, a limit is hit, or the rest fits in
//! `max_downtime`), and the stopped final pass (ptrace interrupt of every
//! thread, and of the other writers of the dumped shared memory). Each
//! pass collects the trackers, re-reads the layouts (`/proc/PID/maps`,
//! a fresh scan where it changed), asks the planner what to copy, and
//! copies it into the [`PageSink`] (`copy.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abort::Cancel;
use super::attach::{self, AttachWith, Pinned, Proc};
use super::converge::{self, Decision, LastPass, Limits, PrecopyEnd};
use super::copy::{self, Copied, Copier, Frames, Out, Progress};
use super::model::VmaModel;
use super::objects::Objects;
use super::planner::{self, FromParent, LayoutCheck, LayoutFingerprint, Plan};
use super::scope;
use super::sink::{PageSink, PassStart};
use super::stop::Stopped;
use super::swap::{SwapIo, SwapPolicy};
use super::{DumpError, DumpEvent, DumpOptions, Iteration};
use crate::addr::PageSize;
use crate::dirty::{DirtyReport, TrackerBackend, WriteSource};
use crate::error::ErrorKind;
use crate::image::Image;
use crate::image::format::RseqRec;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::report::VmaReport;

/// Everything a dump works with.
pub(super) struct Dump<'t, 'c, 'p> {
    pub caps: &'c KernelCaps,
    pub opts: DumpOptions,
    pub page: PageSize,
    pub sink: Box<dyn PageSink>,
    pub parent: Option<Image>,
    /// Borrowing their targets from [`Pinned`].
    pub procs: Vec<Proc<'t>>,
    pub objects: Objects,
    frames: Option<Frames>,
    pub progress: &'p mut dyn FnMut(DumpEvent<'_>),
    /// The caller's: right before the final pass (`send --qmp`: the VM
    /// paused), right after the commit (the VM migrated).
    pub hooks: super::Hooks<'p>,
    pub cancel: Cancel,
    last_collect: Instant,
    /// Copy throughput of the full pass, bytes/s.
    rate: f64,
    pub notes: Vec<String>,
    pub swap: Arc<SwapIo>,
    /// Per process, its threads' rseq areas (read while stopped).
    pub rseq: BTreeMap<u32, Vec<RseqRec>>,
    /// Other writers of the shared memory in the final pass.
    pub shared_writers: super::SharedWriters,
    /// Why pre-copy ended.
    pub precopy_end: PrecopyEnd,
}

impl<'t, 'c, 'p> Dump<'t, 'c, 'p> {
    pub(super) fn new(
        caps: &'c KernelCaps,
        opts: DumpOptions,
        sink: Box<dyn PageSink>,
        parent: Option<Image>,
        progress: &'p mut dyn FnMut(DumpEvent<'_>),
        cancel: Cancel,
    ) -> Self {
        Self {
            cancel,
            caps,
            page: caps.page_size,
            frames: opts.tree.then(Frames::default),
            sink,
            parent,
            procs: Vec::new(),
            objects: Objects::new(caps, opts.copy_files),
            progress,
            hooks: super::Hooks::default(),
            last_collect: Instant::now(),
            rate: 0.0,
            notes: Vec::new(),
            shared_writers: super::SharedWriters::default(),
            swap: Arc::new(SwapIo::new(
                opts.swap,
                caps.privileged_pagemap,
                caps.page_size,
            )),
            rseq: BTreeMap::new(),
            precopy_end: PrecopyEnd::NoPrecopy,
            opts,
        }
    }

    /// Attaches a tracker to every pinned process before anything is
    /// copied.
    pub(super) fn attach_all(&mut self, pinned: &'t Pinned<'_>) -> Result<(), DumpError> {
        let with = AttachWith {
            caps: self.caps,
            opts: &self.opts,
            parent: self.parent.as_ref(),
            swap: &self.swap,
        };
        self.procs = attach::attach_all(pinned, &with, &mut self.notes)?;
        self.last_collect = Instant::now();
        Ok(())
    }

    /// The pre-copy engine: the full pass, pre-copy passes, the stopped
    /// final pass. Returns every pass and how long the processes were
    /// stopped.
    pub(super) fn precopy_and_stop(&mut self) -> Result<(Vec<Iteration>, f64), DumpError> {
        let mut iterations = vec![self.full_pass()?];
        self.precopy(&mut iterations)?;
        attach::release_adopted(&mut self.procs, self.opts.keep_tracking)?;
        let (last, stopped_s) = self.final_pass(iterations.len() as u32)?;
        iterations.push(last);
        self.cancel.check()?;
        Ok((iterations, stopped_s))
    }

    /// Copies everything: with an adopted tracker, only what changed since
    /// the parent image; with a parent, pages equal to it are recorded as
    /// in the parent.
    fn full_pass(&mut self) -> Result<Iteration, DumpError> {
        let t0 = Instant::now();
        let mut plan = Plan::default();
        for i in 0..self.procs.len() {
            if self.procs[i].adopted.is_none() {
                self.procs[i].vmas = self.build_models(i)?;
                planner::plan_all(&mut plan, i, &self.procs[i].vmas);
                continue;
            }
            let since = self.procs[i].tracker.collect()?;
            if !self.plan_from_parent(&mut plan, i, &since)? {
                self.procs[i].vmas = self.build_models(i)?;
                self.plan_since_parent(&mut plan, i, &since.ranges());
            }
        }
        planner::plan_objects(&mut plan, self.objects.ids());
        let pass = PassStart {
            n: 0,
            stopped: false,
        };
        let copied = self.run(pass, plan)?;
        let it = self.iteration(pass, t0, copied, 0, Duration::ZERO);
        if it.seconds > 0.0 && it.bytes > 0 {
            self.rate = it.bytes as f64 / it.seconds;
        }
        (self.progress)(DumpEvent::Iteration(&it));
        Ok(it)
    }

    /// The first pass of process `i`, tracked since the parent image
    /// (`since`: what was written since), without a scan of the whole
    /// process: a mapping the parent recorded keeps the parent's model
    /// ([`planner::models_from_parent`]) and its pages written since are
    /// planned; the others are scanned alone and copied whole. A mapping
    /// the tracker reports replaced (the same maps line, a new mapping)
    /// is written whole, so all its pages are copied. `false` (nothing
    /// planned) when the swap policy or `--tree` need the page tables'
    /// states, or an object cannot be opened: the caller scans.
    fn plan_from_parent(
        &mut self,
        plan: &mut Plan,
        i: usize,
        since: &DirtyReport,
    ) -> Result<bool, DumpError> {
        let (target, pid) = (self.procs[i].target, self.procs[i].pid);
        let recorded = match &self.parent {
            Some(p) if self.swap.policy() == SwapPolicy::Read && self.frames.is_none() => {
                p.process(pid).map(|p| &p.vmas)
            }
            _ => None,
        };
        let Some(recorded) = recorded else {
            return Ok(false);
        };
        let layout_read = LayoutFingerprint::of(&target.read_file("maps")?);
        let mut layout = crate::inspect::read_layout(target, false)?;
        layout.retain(|v| scope::in_scope(v, self.opts.only_object));
        let mut models = Vec::with_capacity(layout.len());
        let mut new = BTreeSet::new();
        for found in planner::models_from_parent(layout, recorded, self.page) {
            match found {
                FromParent::Kept(m) => {
                    if !self.objects.add(target, self.caps, &m, &*self.sink)? {
                        return Ok(false);
                    }
                    models.push(m);
                }
                FromParent::Scan(vma) => {
                    let report = crate::inspect::scan_page_tables_in(target, self.caps, vma.range);
                    let Ok(report) = report else {
                        return Ok(false);
                    };
                    for v in &report.vmas {
                        new.insert(models.len());
                        models.push(self.model_of(target, v)?);
                    }
                }
            }
        }
        let p = &mut self.procs[i];
        p.vmas = models;
        p.layout = Some(layout_read);
        planner::plan_written(plan, i, &p.vmas, &since.ranges(), &new, self.page);
        Ok(true)
    }

    /// The own pages of process `i` a first pass copies with a tracker kept
    /// since the parent image: the written ones where the parent has the
    /// same mapping (the others are in the parent), all elsewhere.
    fn plan_since_parent(&mut self, plan: &mut Plan, i: usize, since: &RangeSet) {
        let page = self.page;
        let pid = self.procs[i].pid;
        for (k, m) in self.procs[i].vmas.iter_mut().enumerate() {
            let in_parent = self
                .parent
                .as_ref()
                .is_some_and(|p| copy::parent_vma(p, pid, m).is_some());
            let pages = if in_parent {
                planner::written_since_parent(m, since, page)
            } else {
                m.own_pages()
            };
            plan.own.push(planner::OwnPages {
                proc: i,
                vma: k,
                pages,
            });
        }
    }

    /// Pre-copy passes: copy what was written while what is left would
    /// not send within `max_downtime` (or, without a target, until the
    /// written set stops shrinking), bounded by `max_iterations` and
    /// `max_time` ([`converge::decide`]).
    fn precopy(&mut self, its: &mut Vec<Iteration>) -> Result<(), DumpError> {
        if let Some(p) = self
            .procs
            .iter()
            .find(|p| p.tracker.backend() == TrackerBackend::AllDirty)
        {
            self.notes.push(format!(
                "process {}: no write tracking, so no pre-copy (every page would count as written)",
                p.pid
            ));
            self.precopy_end = PrecopyEnd::NoPrecopy;
            return Ok(());
        }
        let limits = Limits {
            max_iterations: self.opts.max_iterations,
            max_time: self.opts.max_time,
            max_downtime: self.opts.max_downtime,
            stop_when_stalled: self.opts.stop_when_stalled,
        };
        let start = Instant::now();
        let mut last: Option<LastPass> = None;
        for n in 1.. {
            self.cancel.check()?;
            match converge::decide(&limits, n - 1, last.as_ref(), start.elapsed()) {
                Decision::Continue => {}
                Decision::Stop(end) => {
                    self.precopy_end = end;
                    break;
                }
            }
            let it = self.copy_written(PassStart { n, stopped: false })?;
            (self.progress)(DumpEvent::Iteration(&it));
            last = Some(LastPass {
                written_pages: it.written_pages,
                previous_written: last.map(|l| l.written_pages),
                page_size: self.page.get(),
                bandwidth: it.bandwidth_bytes_s,
            });
            its.push(it);
        }
        Ok(())
    }

    /// The rate the pages left would go out at, bytes/s: the sink's own
    /// measured rate (a stream), else the copy's rate of the full pass.
    fn bandwidth(&self) -> f64 {
        self.sink.bandwidth().unwrap_or(self.rate)
    }

    /// The stopped pass: every thread of every process interrupted, what
    /// was written since the last pass copied, then resumed (or left
    /// stopped). Returns the pass and how long the processes were stopped.
    fn final_pass(&mut self, n: u32) -> Result<(Iteration, f64), DumpError> {
        if let Some(hook) = self.hooks.before_stop.as_mut() {
            hook()?;
        }
        let t0 = Instant::now();
        let mut stopped = Vec::with_capacity(self.procs.len());
        for p in &self.procs {
            let s =
                Stopped::stop(p.target).map_err(|source| DumpError::Stop { pid: p.pid, source })?;
            stopped.push(s);
        }
        for (p, s) in self.procs.iter().zip(&stopped) {
            self.rseq.insert(p.pid, s.rseq_areas());
        }
        let dumped: Vec<&crate::proc::Target> = self.procs.iter().map(|p| p.target).collect();
        let (others, writers) = super::sharers::stop_writers(&dumped, self.opts.stop_sharers);
        stopped.extend(others);
        self.shared_writers = writers;
        let it = self.copy_written(PassStart { n, stopped: true })?;
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
    fn copy_written(&mut self, pass: PassStart) -> Result<Iteration, DumpError> {
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
                    ErrorKind::TargetExited => DumpError::Exited { pid },
                    _ => DumpError::Track(e),
                })?;
            let new = self.reconcile(i, &report)?;
            let vmas = &self.procs[i].vmas;
            written_pages += match self.opts.only_object {
                None => report.pages(),
                Some(_) => scope::written_within(&report.ranges(), vmas, self.page),
            };
            planner::plan_written(&mut plan, i, vmas, &report.ranges(), &new, self.page);
        }
        let copied = self.run(pass, plan)?;
        Ok(self.iteration(pass, t0, copied, written_pages, interval))
    }

    /// Rebuilds the models of process `i` if its layout changed or a
    /// mapping was replaced (reported as new); the indices of mappings
    /// whose pages must all be copied. An unchanged maps text
    /// ([`LayoutFingerprint`]) keeps the models without parsing it.
    fn reconcile(&mut self, i: usize, report: &DirtyReport) -> Result<BTreeSet<usize>, DumpError> {
        let replaced = replaced(report);
        let now = LayoutFingerprint::of(&self.procs[i].target.read_file("maps")?);
        if planner::check_layout(self.procs[i].layout, now, &replaced) == LayoutCheck::Kept {
            return Ok(BTreeSet::new());
        }
        let mut maps = self.procs[i].target.maps()?;
        if let Some(id) = self.opts.only_object {
            // Only the object's mappings are modelled: a change elsewhere
            // in the layout (a VMM's thread stacks, its heap) rebuilds
            // nothing.
            maps.retain(|e| scope::entry_in_scope(e, id));
        }
        if !planner::needs_rebuild(&maps, &self.procs[i].vmas, &replaced) {
            self.procs[i].layout = Some(now);
            return Ok(BTreeSet::new());
        }
        let old = std::mem::take(&mut self.procs[i].vmas);
        let mut models = self.build_models(i)?;
        let new = planner::reconcile(old, &mut models, &replaced);
        self.procs[i].vmas = models;
        Ok(new)
    }

    /// Copies `plan` (its object scans resolved first) into the sink.
    fn run(&mut self, pass: PassStart, mut plan: Plan) -> Result<Copied, DumpError> {
        for scan in std::mem::take(&mut plan.scans) {
            let pages = self.objects.data(scan.id, scan.span)?;
            plan.add_object_pages(scan.id, pages);
        }
        self.sink.begin_pass(pass)?;
        let mut copier = Copier {
            procs: &mut self.procs,
            objects: &mut self.objects,
            parent: self.parent.as_ref(),
            frames: self.frames.as_mut(),
            swap: &self.swap,
            cancel: &self.cancel,
            out: Out {
                sink: &*self.sink,
                page: self.page,
                progress: Progress::new(&mut *self.progress, pass.n, plan.pages()),
            },
        };
        let copied = copier.copy(&plan)?;
        self.sink.end_pass(pass)?;
        Ok(copied)
    }

    /// Scans process `i` and models its mappings; opens (or grows) the
    /// objects behind them. The layout is fingerprinted before the scan,
    /// so a change during it shows in the next pass.
    pub(super) fn build_models(&mut self, i: usize) -> Result<Vec<VmaModel>, DumpError> {
        let target = self.procs[i].target;
        self.procs[i].layout = Some(LayoutFingerprint::of(&target.read_file("maps")?));
        let report = crate::inspect::scan_page_tables(target, self.caps)?;
        let mut models = Vec::with_capacity(report.vmas.len());
        let only = self.opts.only_object;
        for v in report.vmas.iter().filter(|v| scope::in_scope(&v.vma, only)) {
            models.push(self.model_of(target, v)?);
        }
        Ok(models)
    }

    /// The model of the scanned mapping `v` of `target`; opens (or grows)
    /// the object behind it.
    fn model_of(&mut self, target: &Target, v: &VmaReport) -> Result<VmaModel, DumpError> {
        let mut m = VmaModel::from_report(v, self.page);
        if !self.objects.add(target, self.caps, &m, &*self.sink)? {
            m.read_through_mapping(v, self.page);
        }
        Ok(m)
    }

    /// The statistics of a pass that started at `t0`.
    pub(super) fn iteration(
        &self,
        pass: PassStart,
        t0: Instant,
        copied: Copied,
        written_pages: u64,
        interval: Duration,
    ) -> Iteration {
        let page = self.page.get();
        let written_bytes = (written_pages * page) as f64;
        let secs = interval.as_secs_f64();
        let bandwidth = self.bandwidth();
        Iteration {
            n: pass.n,
            stopped: pass.stopped,
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
            // 0 while no bandwidth is measured (a finite number in JSON).
            predicted_downtime_s: Some(converge::expected_downtime_s(
                written_pages,
                page,
                bandwidth,
            ))
            .filter(|s| s.is_finite())
            .unwrap_or(0.0),
            bandwidth_bytes_s: bandwidth,
        }
    }
}

/// The ranges `report` says were mapped anew (a mapping replaced).
fn replaced(report: &DirtyReport) -> RangeSet {
    report
        .written
        .iter()
        .filter(|w| w.source == WriteSource::NewMapping)
        .map(|w| w.range)
        .collect()
}
