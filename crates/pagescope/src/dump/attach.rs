//! Attaching to the processes of a dump: [`Pinned`] owns the set of
//! pinned processes (pidfd-pinned [`Target`]s: the target, and with
//! `--tree` its descendants, listed from `/proc/PID/task/*/children`);
//! everything else borrows from it. Each gets a dirty tracker (a
//! write-protect userfaultfd, or the soft-dirty bits; one that cannot be
//! had leaves the dump with one stopped pass) attached to that same
//! pinned `Target`, and its memory opened for copying
//! (`/proc/PID/mem`, `pagemap`). A userfaultfd an earlier dump left in
//! the target (`--keep-tracking`) is adopted when the parent image names
//! it and the process is still the one it was taken of.

use std::sync::Arc;

use super::model::VmaModel;
use super::planner::LayoutFingerprint;
use super::remote::RemoteMem;
use super::swap::SwapIo;
use super::{DumpError, DumpOptions};
use crate::addr::{VirtAddr, VirtRange};
use crate::dirty::{Adopt, DirtyTracker, TrackError, TrackOptions, TrackerBackend, attach};
use crate::error::ErrorKind;
use crate::image::Image;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::vma::Backing;

/// The pinned processes of a dump: the one owner of their [`Target`]s.
pub(super) struct Pinned<'t> {
    first: &'t Target,
    descendants: Vec<Target>,
}

impl<'t> Pinned<'t> {
    /// Pins `target` and, with `tree`, its descendants (depth first; one
    /// that exited since it was listed is left out).
    pub(super) fn pin(target: &'t Target, tree: bool) -> Self {
        let mut pids = Vec::new();
        if tree {
            descendants(target, &mut pids);
        }
        Self {
            first: target,
            descendants: pids
                .into_iter()
                .filter_map(|p| Target::open(p).ok())
                .collect(),
        }
    }

    /// The target first, then its descendants.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Target> {
        std::iter::once(self.first).chain(&self.descendants)
    }
}

/// One process being dumped.
pub(super) struct Proc<'t> {
    pub pid: u32,
    /// Borrowed from [`Pinned`].
    pub target: &'t Target,
    pub tracker: Box<dyn DirtyTracker + 't>,
    pub mem: RemoteMem,
    /// Its mappings as the image will record them.
    pub vmas: Vec<VmaModel>,
    /// The layout `vmas` were built from (kept while it does not change).
    pub layout: Option<LayoutFingerprint>,
    /// The userfaultfd an earlier dump left in it, adopted.
    pub adopted: Option<i32>,
    /// Tracked since the parent image (a kept userfaultfd): pages reported
    /// written are stored without comparing them with the parent.
    pub tracked_since_parent: bool,
}

/// What attaching needs besides the processes.
pub(super) struct AttachWith<'a> {
    pub caps: &'a KernelCaps,
    pub opts: &'a DumpOptions,
    pub parent: Option<&'a Image>,
    pub swap: &'a Arc<SwapIo>,
}

/// Attaches a tracker to every pinned process and opens its memory,
/// before anything is copied; what limits the dump goes to `notes`.
pub(super) fn attach_all<'t>(
    pinned: &'t Pinned<'_>,
    with: &AttachWith<'_>,
    notes: &mut Vec<String>,
) -> Result<Vec<Proc<'t>>, DumpError> {
    let mut procs = Vec::new();
    for (i, t) in pinned.iter().enumerate() {
        let first = i == 0;
        let adopt = if first {
            adoptable(with.parent, t)?
        } else {
            None
        };
        let opts = TrackOptions {
            keep_in_target: first && with.opts.keep_tracking,
            adopt: adopt.clone(),
            // A copy-before-write snapshot tracks nothing between passes:
            // it has one.
            backend: with.opts.cow.then_some(TrackerBackend::AllDirty),
            ..TrackOptions::default()
        };
        let tracker = tracker(t, with, &opts, notes)?;
        if let Some(why) = tracker.degraded().filter(|_| !with.opts.cow) {
            notes.push(format!("process {}: {why}", t.pid()));
        }
        let mem = RemoteMem::open(t, with.caps.page_size, Arc::clone(with.swap))?;
        procs.push(Proc {
            pid: t.pid(),
            target: t,
            tracker,
            mem,
            vmas: Vec::new(),
            layout: None,
            tracked_since_parent: adopt.is_some(),
            adopted: adopt.map(|a| a.fd),
        });
    }
    Ok(procs)
}

/// The tracker of `t`: as `opts` asks, or, where tracking is refused or
/// unsupported, one that reports everything written (one stopped pass
/// still makes a consistent image).
fn tracker<'t>(
    t: &'t Target,
    with: &AttachWith<'_>,
    opts: &TrackOptions,
    notes: &mut Vec<String>,
) -> Result<Box<dyn DirtyTracker + 't>, DumpError> {
    match attach(t, with.caps, opts) {
        Ok(tr) => Ok(tr),
        Err(e) if degradable(&e) => {
            notes.push(format!(
                "process {}: no write tracking ({e}): no pre-copy",
                t.pid()
            ));
            let all = TrackOptions {
                backend: Some(TrackerBackend::AllDirty),
                ..TrackOptions::default()
            };
            Ok(attach(t, with.caps, &all)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn degradable(e: &TrackError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Busy | ErrorKind::Unsupported | ErrorKind::PermissionDenied
    )
}

/// The userfaultfd the parent image says the target keeps, if the target
/// is still the process that image was taken of.
fn adoptable(parent: Option<&Image>, t: &Target) -> Result<Option<Adopt>, DumpError> {
    let Some(parent) = parent else {
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

/// Without `keep_tracking`, closes the userfaultfd an earlier dump left
/// in the target (pagescope's copy keeps tracking to the end). Done before
/// the final pass: running code in the target may touch its memory (a
/// restarted system call), which that pass then copies.
pub(super) fn release_adopted(procs: &mut [Proc<'_>], keep: bool) -> Result<(), DumpError> {
    if keep {
        return Ok(());
    }
    if let Some(first) = procs.first_mut() {
        if let Some(fd) = first.adopted.take() {
            crate::dirty::target_uffd::close_in_target(first.target, fd)?;
        }
    }
    Ok(())
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
