//! A tracker of one process: the page-table backend chosen at attach, the
//! shared-object layer over it, and the process's life (exec, forks).

use std::borrow::Borrow;
use std::collections::BTreeSet;

use super::family::Family;
use super::objects::{ObjectLayer, ObjectOptions};
use super::pagetable::{AllDirty, PageTableTracker, SoftDirty, UffdWp};
use super::target_uffd::{self, Device, UffdOrigin};
use super::{DirtyReport, DirtyTracker, TrackError, TrackEvent, TrackerBackend};
use crate::addr::{PageSize, VirtRange};
use crate::kernel::KernelCaps;
use crate::proc::{ProcError, Target};
use crate::rangeset::RangeSet;
use crate::uffd::{SyncUserfaultfd, Userfaultfd};
use crate::vma::{Backing, Vma};

/// Options for [`attach`].
#[derive(Clone, Debug, Default)]
pub struct TrackOptions {
    /// Use this backend or fail (default: the best available).
    pub backend: Option<TrackerBackend>,
    /// Report every shared object (shmem, shared files) the target maps as
    /// written on every collect.
    pub strict_shared: bool,
    /// Do not track the other processes that map the target's shared
    /// objects writable; report those objects whole every collect
    /// instead.
    pub no_sharers: bool,
    /// Return the attach-time report (everything, as
    /// [`WriteSource::NewMapping`](super::WriteSource::NewMapping)) from
    /// the first [`collect`](DirtyTracker::collect) instead of starting
    /// clean: for a process whose earlier writes matter (a child followed
    /// across fork).
    pub keep_baseline: bool,
    /// Leave the userfaultfd open inside the target too, so write tracking
    /// outlives this tracker (`dump --keep-tracking`);
    /// [`DirtyTracker::kept_in_target`] gives its fd number there.
    pub keep_in_target: bool,
    /// When the process exits, return one last report (flagged
    /// [`DirtyReport::partial`]) with what can still be collected, the
    /// writes to its shared memory, before [`TrackError::TargetExited`].
    pub report_exit: bool,
    /// Take over a userfaultfd an earlier tracker left in the target: its
    /// fd number there, and the ranges registered with it. The first
    /// collect then reports the writes since that tracker's last collect.
    pub adopt: Option<Adopt>,
    /// Whether pagescope (as root) hands its own `/dev/userfaultfd` to a
    /// target or sharer that may not create a full userfaultfd itself
    /// (default: yes; with [`Device::Keep`] an unprivileged process gets a
    /// `UFFD_USER_MODE_ONLY` one and its shared memory is tracked
    /// asynchronously).
    pub device: Device,
}

/// A userfaultfd left in the target by an earlier tracker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopt {
    /// Its fd number in the target.
    pub fd: i32,
    /// The ranges it has registered (and armed).
    pub registered: RangeSet,
}

/// What is tracked.
#[derive(Debug)]
enum Scope {
    /// Every VMA of the process (a remote target, or `watch`).
    Process,
    /// These ranges of the calling process.
    Ranges(RangeSet),
}

impl Scope {
    /// The layout as the inspection driver reads it (maps and the mount
    /// table; no smaps: a collect must stay cheap).
    fn layout(&self, target: &Target) -> Result<Vec<Vma>, TrackError> {
        let gone = |e| match e {
            ProcError::Exited { pid } | ProcError::NoAddressSpace { pid, .. } => {
                TrackError::TargetExited { pid }
            }
            e => TrackError::Proc(e),
        };
        let all = crate::inspect::read_layout(target, false).map_err(gone)?;
        if all.is_empty() {
            // A zombie has no address space left: it has exited.
            target.require_address_space().map_err(gone)?;
        }
        let all = all.into_iter();
        Ok(match self {
            Scope::Process => all.filter(|v| v.backing != Backing::Special).collect(),
            Scope::Ranges(set) => all
                .flat_map(|v| {
                    set.intersect(v.range)
                        .into_iter()
                        .map(move |r| clip(&v, r))
                        .collect::<Vec<_>>()
                })
                .collect(),
        })
    }
}

/// The part `r` of `v`, with the object offset moved along.
fn clip(v: &Vma, r: VirtRange) -> Vma {
    let skip = r.start().checked_offset_from(v.range.start()).unwrap_or(0);
    let mut part = v.clone();
    part.entry.range = r;
    part.entry.offset = v.offset + skip;
    part
}

/// Attaches to `target`, with the best backend available (or the one
/// asked for): uffd-wp async through a userfaultfd created inside the
/// target, else soft-dirty, else all-dirty (then
/// [`DirtyTracker::degraded`] says why). The tracker borrows the pinned
/// target, so the same [`Target`] can serve scanning and copying.
pub fn attach<'t>(
    target: &'t Target,
    caps: &KernelCaps,
    opts: &TrackOptions,
) -> Result<Box<dyn DirtyTracker + 't>, TrackError> {
    process_tracker(target, caps, opts)
}

/// [`attach`] for a tracker that owns its target (a child followed
/// across fork, say).
pub fn attach_owned(
    target: Target,
    caps: &KernelCaps,
    opts: &TrackOptions,
) -> Result<Box<dyn DirtyTracker>, TrackError> {
    process_tracker(target, caps, opts)
}

fn process_tracker<'t, T: Borrow<Target> + 't>(
    target: T,
    caps: &KernelCaps,
    opts: &TrackOptions,
) -> Result<Box<dyn DirtyTracker + 't>, TrackError> {
    let t = ProcessTracker::start(target, caps, opts, Scope::Process)?;
    Ok(Box::new(t))
}

/// Tracks `ranges` of the calling process with uffd-wp async (the library
/// API for VMMs and runtimes), or reports them all written every time if
/// the kernel cannot (then [`DirtyTracker::degraded`] says why).
pub fn track_self(
    ranges: &[VirtRange],
    caps: &KernelCaps,
) -> Result<Box<dyn DirtyTracker>, TrackError> {
    let scope = Scope::Ranges(ranges.iter().copied().collect());
    let opts = TrackOptions::default();
    Ok(Box::new(ProcessTracker::start(
        Target::current()?,
        caps,
        &opts,
        scope,
    )?))
}

/// The chosen backend, and why it is not the best one if it is not.
struct Chosen {
    backend: Box<dyn PageTableTracker>,
    degraded: Option<String>,
}

fn choose(target: &Target, caps: &KernelCaps, opts: &TrackOptions) -> Result<Chosen, TrackError> {
    let want = opts.backend;
    let page = page_of(caps);
    let mut why_not = Vec::new();
    if want.is_none_or(|b| b == TrackerBackend::UffdWpAsync) {
        match uffd_backend(target, caps, opts) {
            Ok(b) => {
                return Ok(Chosen {
                    backend: Box::new(b),
                    degraded: None,
                });
            }
            Err(e) if want.is_some() => return Err(e),
            Err(e) => why_not.push(format!("uffd-wp async unavailable: {e}")),
        }
    }
    if want.is_none_or(|b| b == TrackerBackend::SoftDirty) {
        if caps.soft_dirty {
            return Ok(Chosen {
                backend: Box::new(SoftDirty::new(target, page)?),
                degraded: None,
            });
        }
        let why = "the kernel has no soft-dirty (CONFIG_MEM_SOFT_DIRTY)";
        if want.is_some() {
            return Err(TrackError::Unsupported {
                backend: "soft_dirty",
                why: why.into(),
            });
        }
        why_not.push(why.to_owned());
    }
    if want == Some(TrackerBackend::AllDirty) {
        why_not.push("all_dirty was asked for".into());
    }
    Ok(Chosen {
        backend: Box::new(AllDirty),
        degraded: Some(format!(
            "every page is reported written every interval: {}",
            why_not.join("; ")
        )),
    })
}

fn uffd_backend(
    target: &Target,
    caps: &KernelCaps,
    opts: &TrackOptions,
) -> Result<UffdWp, TrackError> {
    if !caps.has_pagemap_scan() {
        return Err(TrackError::Unsupported {
            backend: "uffd_wp_async",
            why: "the kernel lacks PAGEMAP_SCAN (Linux 6.7+)".into(),
        });
    }
    if let Some(a) = &opts.adopt {
        return UffdWp::adopt(target, a.fd, a.registered.clone());
    }
    let (uffd, origin) = if target.pid() == std::process::id() {
        let u = Userfaultfd::new_wp_async()?;
        let origin = if caps.uffd.is_some_and(|u| u.user_mode_only) {
            UffdOrigin::UserModeOnly
        } else {
            UffdOrigin::Syscall
        };
        (u, origin)
    } else {
        let i = target_uffd::userfaultfd_in_with(target, opts.keep_in_target, opts.device)?;
        let uffd = Userfaultfd::from_fd(i.fd)?;
        return Ok(UffdWp::new(target, uffd, i.origin)?.kept_at(i.target_fd));
    };
    UffdWp::new(target, uffd, origin)
}

fn page_of(caps: &KernelCaps) -> PageSize {
    caps.page_size
}

/// A tracker of one process.
struct ProcessTracker<T: Borrow<Target>> {
    target: T,
    caps: KernelCaps,
    opts: TrackOptions,
    backend: Box<dyn PageTableTracker>,
    degraded: Option<String>,
    objects: ObjectLayer,
    scope: Scope,
    page: PageSize,
    children: BTreeSet<u32>,
    events: Vec<TrackEvent>,
    baseline: Option<DirtyReport>,
    /// Shared mappings tracked synchronously across fork, if possible.
    family: Option<Family>,
    /// Why they are not, if they are not.
    family_note: Option<String>,
    /// Children already listed in a `Fork` event.
    announced: BTreeSet<u32>,
    /// The layout of the last collect (for the last report at exit).
    last_layout: Vec<Vma>,
    /// The last report at exit was given.
    exited: bool,
    /// Without a family: the target's `cminflt` (minor faults of its
    /// reaped children) at the last collect.
    reaped_faults: Option<u64>,
}

/// `cminflt` of `pid` and how many of its children are zombies.
fn reaped_children(pid: u32, children: Vec<u32>) -> Option<(u64, usize)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the command: state ppid pgrp session tty tpgid flags
    // minflt cminflt (fields 3..11 of proc_pid_stat(5)).
    let cminflt = rest.split_whitespace().nth(8)?.parse().ok()?;
    let zombies = children
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat")).is_ok_and(|s| {
                s.rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next())
                    .is_some_and(|st| st == "Z")
            })
        })
        .count();
    Some((cminflt, zombies))
}

/// Fork events listed per collect at most (all are counted in `forks`).
pub const FORKS_LISTED: usize = 256;

/// Whether a mapping is tracked by the family (synchronous write-protect):
/// shared memory mapped shared. SysV segments are refused by
/// `UFFDIO_WRITEPROTECT` (measured on 6.18): they stay with the async
/// backend.
pub(super) fn syncable(v: &Vma) -> bool {
    v.is_shared()
        && matches!(v.backing, Backing::Shmem | Backing::Hugetlb)
        && v.kind != crate::vma::VmaKind::Sysv
        && v.object_id().is_some()
}

/// Sets up the family of `target` (a second userfaultfd injected into it,
/// synchronous, following forks), or says why not.
fn start_family(
    target: &Target,
    backend: TrackerBackend,
    page: PageSize,
    device: Device,
) -> Result<Family, String> {
    if backend != TrackerBackend::UffdWpAsync {
        return Err("no userfaultfd tracking".into());
    }
    let i = target_uffd::userfaultfd_in_with(target, false, device).map_err(|e| e.to_string())?;
    if i.origin.user_mode_only() {
        return Err("the process may only create a UFFD_USER_MODE_ONLY userfaultfd, with which synchronous write-protect would make kernel-mode writes (read() into shared memory) fail".into());
    }
    let uffd = SyncUserfaultfd::from_fd_sync_family(i.fd).map_err(|e| e.to_string())?;
    Family::start(uffd, target.pid(), page).map_err(|e| e.to_string())
}

impl<T: Borrow<Target>> ProcessTracker<T> {
    fn start(
        target: T,
        caps: &KernelCaps,
        opts: &TrackOptions,
        scope: Scope,
    ) -> Result<Self, TrackError> {
        let chosen = choose(target.borrow(), caps, opts)?;
        let page = page_of(caps);
        let objects = ObjectLayer::new(
            ObjectOptions {
                no_sharers: opts.no_sharers,
                strict: opts.strict_shared,
                device: opts.device,
            },
            caps.map_files,
            page,
        );
        let remote = matches!(scope, Scope::Process) && target.borrow().pid() != std::process::id();
        let (family, family_note) = if remote && !opts.no_sharers {
            match start_family(target.borrow(), chosen.backend.backend(), page, opts.device) {
                Ok(f) => (Some(f), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        let mut t = Self {
            family,
            family_note,
            announced: BTreeSet::new(),
            last_layout: Vec::new(),
            exited: false,
            reaped_faults: None,
            target,
            caps: caps.clone(),
            opts: TrackOptions {
                adopt: None,
                ..opts.clone()
            },
            backend: chosen.backend,
            degraded: chosen.degraded,
            objects,
            scope,
            page,
            children: BTreeSet::new(),
            events: Vec::new(),
            baseline: None,
        };
        // The first collect reports everything (nothing was tracked
        // before): run it now so collects start from "clean".
        let first = t.collect()?;
        t.events.clear();
        if opts.keep_baseline || opts.adopt.is_some() {
            t.baseline = Some(first);
        }
        Ok(t)
    }

    /// The process executed a new program: its mm (and so the uffd and
    /// the pagemap fd) are gone. Sets tracking up again on the new image;
    /// if that fails, falls back to all-dirty and says so.
    fn reattach(&mut self) {
        let target = self.target.borrow();
        let pid = target.pid();
        self.family = None;
        match choose(target, &self.caps, &self.opts) {
            Ok(c) => {
                self.backend = c.backend;
                self.degraded = c.degraded;
                if self.family_note.is_none() {
                    match start_family(target, self.backend.backend(), self.page, self.opts.device)
                    {
                        Ok(f) => self.family = Some(f),
                        Err(why) => self.family_note = Some(why),
                    }
                }
                self.events.push(TrackEvent::Exec {
                    pid,
                    reattached: self.degraded.is_none(),
                });
            }
            Err(e) => {
                self.backend = Box::new(AllDirty);
                self.degraded = Some(format!(
                    "tracking was lost when process {pid} executed a new program: {e}"
                ));
                self.events.push(TrackEvent::Exec {
                    pid,
                    reattached: false,
                });
            }
        }
    }

    /// New children since the last look (from `/proc/PID/task/*/children`,
    /// and the family's children named by their first write, however
    /// short-lived), listed once each, at most [`FORKS_LISTED`] a collect.
    fn look_for_children(&mut self, family: &[u32]) -> Vec<u32> {
        let now: BTreeSet<u32> = self.target.borrow().children().into_iter().collect();
        let new: Vec<u32> = now
            .iter()
            .chain(family)
            .filter(|c| !self.announced.contains(c))
            .copied()
            .collect();
        let mut listed = 0;
        for c in new {
            if self.announced.insert(c) && listed < FORKS_LISTED {
                self.events.push(TrackEvent::Fork { child: c });
                listed += 1;
            }
        }
        // Forget children that are gone (their PIDs may be reused).
        let alive: BTreeSet<u32> = family.iter().chain(now.iter()).copied().collect();
        self.announced
            .retain(|p| alive.contains(p) || std::path::Path::new(&format!("/proc/{p}")).exists());
        self.children = now;
        self.children.iter().copied().collect()
    }

    /// Without a family, children are not tracked from birth: one that
    /// writes shared memory and exits between two collects leaves no
    /// trace in any page table. Its exit leaves one in the parent: the
    /// minor faults of reaped children add up in `cminflt`, and an
    /// unreaped one is a zombie child. Either makes the shared objects
    /// conservative (never under-reported).
    fn unseen_children(&mut self) {
        if self.family.is_some() || !matches!(self.scope, Scope::Process) {
            return;
        }
        let pid = self.target.borrow().pid();
        let children = self.target.borrow().children();
        let Some((cminflt, zombies)) = reaped_children(pid, children) else {
            return;
        };
        let before = self.reaped_faults.replace(cminflt);
        let reaped = before.is_some_and(|b| b != cminflt);
        if reaped || zombies > 0 {
            self.objects.children_unseen(format!(
                "children of process {pid} exited since the last collect ({}); shared memory is not tracked across fork here ({}), so their writes are unknown",
                if reaped { "its cminflt moved" } else { "zombie children" },
                self.family_note.as_deref().unwrap_or("no synchronous tracking")
            ));
        }
    }

    fn can_report_exit(&self) -> bool {
        self.opts.report_exit && !self.exited && !self.last_layout.is_empty()
    }

    /// The last report of a process that exited: the writes to its shared
    /// memory (its own, recorded synchronously, and every other writer's)
    /// over the layout it had.
    fn exit_report(&mut self) -> DirtyReport {
        self.exited = true;
        let layout = std::mem::take(&mut self.last_layout);
        let objects =
            self.objects
                .collect(self.target.borrow(), &layout, &[], self.family.as_ref());
        let mut events = std::mem::take(&mut self.events);
        events.extend(objects.events);
        DirtyReport {
            written: objects.written,
            page_size: self.page,
            tracked: layout.iter().map(|v| v.range).collect(),
            objects: objects.objects,
            events,
            children: Vec::new(),
            forks: objects.forks,
            forks_tracked: self.family.is_some(),
            partial: true,
        }
    }

    /// The target's writes through page tables: the async backend over
    /// its private mappings, the family over its shared ones.
    fn own_writes(&mut self, layout: &[Vma]) -> Result<Vec<super::Written>, TrackError> {
        let (mut fresh, rest): (Vec<super::Written>, Vec<Vma>) = match &self.family {
            Some(f) => {
                let shared: Vec<&Vma> = layout.iter().filter(|v| syncable(v)).collect();
                let (fresh, refused) = f.sync_target(&shared);
                let refused: Vec<VirtRange> = refused.iter().map(|v| v.range).collect();
                let rest = layout
                    .iter()
                    .filter(|v| !syncable(v) || refused.contains(&v.range))
                    .cloned()
                    .collect();
                (fresh, rest)
            }
            None => (Vec::new(), layout.to_vec()),
        };
        let mut own = self.backend.collect(self.target.borrow(), &rest)?;
        own.append(&mut fresh);
        Ok(own)
    }
}

impl<T: Borrow<Target>> DirtyTracker for ProcessTracker<T> {
    fn backend(&self) -> TrackerBackend {
        self.backend.backend()
    }

    fn collect(&mut self) -> Result<DirtyReport, TrackError> {
        if let Some(first) = self.baseline.take() {
            return Ok(first);
        }
        let mut layout = match self.scope.layout(self.target.borrow()) {
            Err(TrackError::TargetExited { .. }) if self.can_report_exit() => {
                return Ok(self.exit_report());
            }
            r => r?,
        };
        let own = match self.own_writes(&layout) {
            Err(TrackError::TargetExited { .. }) if self.target.borrow().is_alive() => {
                self.reattach();
                layout = self.scope.layout(self.target.borrow())?;
                self.own_writes(&layout)?
            }
            Err(TrackError::TargetExited { .. }) if self.can_report_exit() => {
                return Ok(self.exit_report());
            }
            r => r?,
        };
        self.unseen_children();
        let objects =
            self.objects
                .collect(self.target.borrow(), &layout, &own, self.family.as_ref());
        let forks = objects.forks;
        let children = self.look_for_children(&objects.children);
        let mut written = own;
        written.extend(objects.written);
        let mut events = std::mem::take(&mut self.events);
        events.extend(objects.events);
        Ok(DirtyReport {
            written,
            page_size: self.page,
            tracked: layout.iter().map(|v| v.range).collect(),
            objects: objects.objects,
            events,
            children,
            forks,
            forks_tracked: self.family.is_some(),
            partial: false,
        })
        .inspect(|_| self.last_layout = layout)
    }

    fn degraded(&self) -> Option<String> {
        self.degraded.clone()
    }

    fn kept_in_target(&self) -> Option<i32> {
        self.backend.kept_in_target()
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.backend.notes();
        n.extend(self.degraded.iter().cloned());
        if let Some(why) = &self.family_note {
            n.push(format!("shared memory is tracked in async mode, not across fork: children that write it and exit between two intervals are not seen ({why})"));
        }
        for u in self.objects.unopened() {
            n.push(format!("object not opened (system-call writes to it are reported as the whole object where they are possible): {u}"));
        }
        n
    }
}
