//! The trackers and how one is chosen.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use super::watch::{ObjectWatch, alias_writes};
use super::{DirtyReport, DirtyTracker, TrackError, TrackerBackend, WriteSource, Written, inject};
use crate::addr::{PageSize, VirtRange};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::sys::pagemap_scan::page_region;
use crate::uffd::{Userfaultfd, unprotected_holes, wp_arm, wp_get_and_reset};
use crate::vma::{Backing, Vma};

/// Options for [`attach`].
#[derive(Clone, Debug, Default)]
pub struct TrackOptions {
    /// Use this backend or fail (default: the best available).
    pub backend: Option<TrackerBackend>,
    /// Report every shared object (shmem, shared files) the target maps as
    /// written on every collect, closing the one gap of the object watch
    /// (a transient process overwriting allocated pages between collects).
    pub strict_shared: bool,
}

/// What is tracked.
#[derive(Debug)]
enum Scope {
    /// Every VMA of the process (a remote target, or `watch`).
    Process,
    /// These ranges of the calling process.
    Ranges(RangeSet),
}

/// The part of the layout a tracker looks at, read afresh each collect.
struct Layout {
    vmas: Vec<Vma>,
}

impl Scope {
    /// Reads maps only (no mountinfo, no smaps: a collect must stay cheap;
    /// a tmpfs file classified as a plain file is watched all the same).
    fn layout(&self, target: &Target) -> Result<Layout, TrackError> {
        let mounts = crate::vma::MountTable::default();
        let all: Vec<Vma> = target
            .maps()
            .map_err(|e| match e {
                crate::ProcError::Exited { pid } => TrackError::TargetExited { pid },
                e => TrackError::Proc(e),
            })?
            .iter()
            .map(|e| Vma::classify(e, &mounts, None))
            .collect();
        let vmas = match self {
            Scope::Process => all.into_iter().filter(trackable).collect(),
            Scope::Ranges(set) => all
                .into_iter()
                .flat_map(|v| {
                    set.intersect(v.range).into_iter().map(move |r| Vma {
                        range: r,
                        offset: clipped_offset(&v, r),
                        ..v.clone()
                    })
                })
                .collect(),
        };
        Ok(Layout { vmas })
    }
}

fn clipped_offset(v: &Vma, r: VirtRange) -> u64 {
    v.offset + r.start().checked_offset_from(v.range.start()).unwrap_or(0)
}

/// VMAs write tracking applies to: not kernel-provided or device memory.
fn trackable(v: &Vma) -> bool {
    v.backing != Backing::Special
}

/// Attaches to `target`, with the best backend available (or the one
/// asked for): uffd-wp async through a userfaultfd created inside the
/// target, else soft-dirty, else all-dirty.
pub fn attach(
    target: Target,
    caps: &KernelCaps,
    opts: &TrackOptions,
) -> Result<Box<dyn DirtyTracker>, TrackError> {
    let own = target.pid() == std::process::id();
    let want = opts.backend;
    let mut notes = Vec::new();
    if want.is_none_or(|b| b == TrackerBackend::UffdWpAsync) {
        let uffd = if own {
            Userfaultfd::new_wp_async().map_err(TrackError::from)
        } else {
            inject::userfaultfd_in(&target).and_then(|i| Ok(Userfaultfd::from_fd(i.fd)?))
        };
        match uffd {
            Ok(uffd) if caps.has_pagemap_scan() => {
                return Ok(Box::new(UffdTracker::new(
                    target,
                    uffd,
                    Scope::Process,
                    caps,
                    opts.strict_shared,
                )?));
            }
            Ok(_) => notes.push("uffd-wp async needs PAGEMAP_SCAN (Linux 6.7+)".to_owned()),
            Err(e) if want.is_some() => return Err(e),
            Err(e) => notes.push(format!("uffd-wp async unavailable: {e}")),
        }
    }
    if want.is_none_or(|b| b == TrackerBackend::SoftDirty) {
        if caps.soft_dirty {
            return Ok(Box::new(SoftDirtyTracker::new(target, caps, notes)?));
        }
        let why = "the kernel has no soft-dirty (CONFIG_MEM_SOFT_DIRTY)";
        if want.is_some() {
            return Err(TrackError::Unsupported {
                backend: "soft_dirty",
                why: why.into(),
            });
        }
        notes.push(why.to_owned());
    }
    Ok(Box::new(AllDirtyTracker::new(
        target,
        Scope::Process,
        caps,
        notes,
    )?))
}

/// Tracks `ranges` of the calling process with uffd-wp async (the library
/// API for VMMs and runtimes), or reports them all written every time if
/// the kernel cannot.
pub fn track_self(
    ranges: &[VirtRange],
    caps: &KernelCaps,
) -> Result<Box<dyn DirtyTracker>, TrackError> {
    let scope = Scope::Ranges(ranges.iter().copied().collect());
    let target = Target::current()?;
    match Userfaultfd::new_wp_async() {
        Ok(uffd) if caps.has_pagemap_scan() => Ok(Box::new(UffdTracker::new(
            target, uffd, scope, caps, false,
        )?)),
        Ok(_) => Ok(Box::new(AllDirtyTracker::new(
            target,
            scope,
            caps,
            vec!["no PAGEMAP_SCAN".into()],
        )?)),
        Err(e) => Ok(Box::new(AllDirtyTracker::new(
            target,
            scope,
            caps,
            vec![format!("uffd-wp async unavailable: {e}")],
        )?)),
    }
}

fn page_of(caps: &KernelCaps) -> PageSize {
    PageSize::new(caps.page_size).unwrap_or_else(PageSize::current)
}

/// uffd-wp async + PAGEMAP_SCAN get-and-reset.
struct UffdTracker {
    uffd: Userfaultfd,
    target: Target,
    pagemap: OwnedFd,
    scope: Scope,
    page: PageSize,
    tracked: RangeSet,
    watch: ObjectWatch,
    map_files: bool,
    vec: Vec<page_region>,
    untracked_note: Vec<String>,
    strict_shared: bool,
}

impl UffdTracker {
    fn new(
        target: Target,
        uffd: Userfaultfd,
        scope: Scope,
        caps: &KernelCaps,
        strict_shared: bool,
    ) -> Result<Self, TrackError> {
        let pagemap = target.pagemap()?;
        let mut t = Self {
            uffd,
            target,
            pagemap,
            scope,
            page: page_of(caps),
            tracked: RangeSet::new(),
            watch: ObjectWatch::default(),
            map_files: caps.map_files,
            vec: vec![page_region::default(); 16 * 1024],
            untracked_note: Vec::new(),
            strict_shared,
        };
        // The first collect reports everything (nothing was tracked before):
        // run it now so collects start from "clean".
        t.collect()?;
        Ok(t)
    }

    /// Get-and-reset over `r`; an error means the VMA changed under us.
    fn written(&mut self, r: VirtRange, out: &mut Vec<Written>) -> Result<bool, TrackError> {
        let tracked = |range| Written {
            range,
            source: WriteSource::Tracked,
        };
        if pmd_hole_bug() {
            // Zapped PMDs carry neither protection nor WRITTEN here: report
            // and re-protect them before the get-and-reset.
            let mut holes = Vec::new();
            let _ = unprotected_holes(self.pagemap.as_fd(), r, &mut self.vec, |h| holes.push(h));
            for h in holes {
                let _ = wp_arm(self.pagemap.as_fd(), h);
                out.push(tracked(h));
            }
        }
        let mark = out.len();
        match wp_get_and_reset(self.pagemap.as_fd(), r, &mut self.vec, |w| {
            out.push(tracked(w))
        }) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == crate::ErrorKind::TargetExited => Err(TrackError::TargetExited {
                pid: self.target.pid(),
            }),
            Err(_) => {
                out.truncate(mark);
                Ok(false)
            }
        }
    }

    /// Registers and arms a (new) VMA. Returns false if it cannot be
    /// tracked.
    fn start_tracking(&mut self, v: &Vma) -> bool {
        if self.uffd.register_wp(v.range).is_err() {
            return false;
        }
        wp_arm(self.pagemap.as_fd(), v.range).is_ok()
    }

    fn needs_feature(&self, v: &Vma) -> bool {
        matches!(v.backing, Backing::Shmem | Backing::Hugetlb) && !self.uffd.supports_shmem()
    }
}

impl DirtyTracker for UffdTracker {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::UffdWpAsync
    }

    fn collect(&mut self) -> Result<DirtyReport, TrackError> {
        let layout = self.scope.layout(&self.target)?;
        let mut out = Vec::new();
        let mut now = RangeSet::new();
        self.untracked_note.clear();
        for v in &layout.vmas {
            if self.needs_feature(v) {
                out.push(Written {
                    range: v.range,
                    source: WriteSource::Untracked,
                });
                continue;
            }
            let mut intact = true;
            for c in self.tracked.intersect(v.range) {
                intact &= self.written(c, &mut out)?;
            }
            let fresh = if intact {
                self.tracked.subtract_from(v.range)
            } else {
                vec![v.range]
            };
            if !fresh.is_empty() {
                if !self.start_tracking(v) {
                    self.untracked_note.push(format!(
                        "{} {} cannot be write-protected",
                        v.range,
                        v.path.display()
                    ));
                    out.push(Written {
                        range: v.range,
                        source: WriteSource::Untracked,
                    });
                    continue;
                }
                out.extend(fresh.into_iter().map(|range| Written {
                    range,
                    source: WriteSource::NewMapping,
                }));
            }
            now.insert(v.range);
        }
        self.tracked = now;
        out.extend(alias_writes(&layout.vmas, &out, self.page));
        self.watch
            .refresh(&self.target, &layout.vmas, self.map_files);
        self.watch.syscall_writes(&layout.vmas, &mut out);
        self.watch
            .foreign_writes(self.target.pid(), &layout.vmas, &mut out);
        if self.strict_shared {
            self.watch.strict_writes(&layout.vmas, &mut out);
        }
        Ok(DirtyReport {
            written: out,
            page_size: self.page,
            tracked: self.tracked.clone(),
        })
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.untracked_note.clone();
        if pmd_hole_bug() {
            n.push("this kernel's PAGEMAP_SCAN misses PMD holes (MADV_DONTNEED of write-protected THPs); pagescope finds unprotected empty pages itself".into());
        }
        if self.watch.unopened() > 0 {
            n.push(format!("{} mapped objects could not be opened; shared ones are reported written every time", self.watch.unopened()));
        }
        n
    }
}

/// Whether this kernel's PAGEMAP_SCAN misses PMD holes left by
/// `MADV_DONTNEED` of a write-protected THP (fixed in 2026, "fs/proc/
/// task_mmu: fix PAGEMAP_SCAN written state for PMD holes"). Probed once on
/// our own memory; without THP the case cannot arise.
pub fn pmd_hole_bug() -> bool {
    static BUG: OnceLock<bool> = OnceLock::new();
    *BUG.get_or_init(|| probe_pmd_hole_bug().unwrap_or(false))
}

fn probe_pmd_hole_bug() -> Option<bool> {
    use crate::sys::mm::{Advice, OwnedMapping};
    const HUGE: usize = 2 << 20;
    let m = OwnedMapping::anonymous(HUGE, HUGE).ok()?;
    m.madvise(0, HUGE, Advice::HugePage).ok()?;
    (0..HUGE)
        .step_by(4096)
        .try_for_each(|o| m.write_byte(o, 1))
        .ok()?;
    let uffd = Userfaultfd::new_wp_async().ok()?;
    let range = VirtRange::from_start_len(crate::VirtAddr::new(m.addr()), HUGE as u64)?;
    uffd.register_wp(range).ok()?;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    wp_arm(pagemap.as_fd(), range).ok()?;
    m.madvise(0, HUGE, Advice::DontNeed).ok()?;
    let mut vec = Vec::new();
    let mut pages = 0;
    wp_get_and_reset(pagemap.as_fd(), range, &mut vec, |r| {
        pages += r.len() / 4096
    })
    .ok()?;
    Some(pages < (HUGE / 4096) as u64)
}

/// Soft-dirty bits (pagemap bit 55) and `clear_refs` "4".
///
/// Not atomic: a page written between reading the bits and clearing them
/// is lost unless the target is stopped; uffd-wp async has no such window.
struct SoftDirtyTracker {
    target: Target,
    page: PageSize,
    watch: ObjectWatch,
    map_files: bool,
    notes: Vec<String>,
    caps: KernelCaps,
}

impl SoftDirtyTracker {
    fn new(target: Target, caps: &KernelCaps, mut notes: Vec<String>) -> Result<Self, TrackError> {
        notes.push("soft-dirty is not atomic: writes racing a collect may be lost unless the target is stopped".into());
        let t = Self {
            target,
            page: page_of(caps),
            watch: ObjectWatch::default(),
            map_files: caps.map_files,
            notes,
            caps: caps.clone(),
        };
        t.clear()?;
        Ok(t)
    }

    fn clear(&self) -> Result<(), TrackError> {
        self.target
            .write_file("clear_refs", b"4")
            .map_err(TrackError::from)
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::SoftDirty
    }

    fn collect(&mut self) -> Result<DirtyReport, TrackError> {
        let layout = Scope::Process.layout(&self.target)?;
        let opts = crate::ScanOptions {
            objects: false,
            smaps: false,
            ..Default::default()
        };
        let report = crate::scan_process(&self.target, &self.caps, &opts).map_err(|e| match e {
            crate::ScanError::Proc(p) => TrackError::Proc(p),
            _ => TrackError::TargetExited {
                pid: self.target.pid(),
            },
        })?;
        self.clear()?;
        let mut out: Vec<Written> = report
            .runs()
            .filter(|(_, r)| r.flags.contains(crate::PageFlags::SOFT_DIRTY))
            .map(|(_, r)| Written {
                range: r.range(self.page),
                source: WriteSource::Tracked,
            })
            .collect();
        self.watch
            .refresh(&self.target, &layout.vmas, self.map_files);
        self.watch.syscall_writes(&layout.vmas, &mut out);
        self.watch
            .foreign_writes(self.target.pid(), &layout.vmas, &mut out);
        let tracked = layout.vmas.iter().map(|v| v.range).collect();
        Ok(DirtyReport {
            written: out,
            page_size: self.page,
            tracked,
        })
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

/// No tracking mechanism: every page is reported written every time.
struct AllDirtyTracker {
    target: Target,
    scope: Scope,
    page: PageSize,
    notes: Vec<String>,
}

impl AllDirtyTracker {
    fn new(
        target: Target,
        scope: Scope,
        caps: &KernelCaps,
        notes: Vec<String>,
    ) -> Result<Self, TrackError> {
        Ok(Self {
            target,
            scope,
            page: page_of(caps),
            notes,
        })
    }
}

impl DirtyTracker for AllDirtyTracker {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::AllDirty
    }

    fn collect(&mut self) -> Result<DirtyReport, TrackError> {
        let layout = self.scope.layout(&self.target)?;
        let written = layout
            .vmas
            .iter()
            .map(|v| Written {
                range: v.range,
                source: WriteSource::Untracked,
            })
            .collect();
        let tracked = layout.vmas.iter().map(|v| v.range).collect();
        Ok(DirtyReport {
            written,
            page_size: self.page,
            tracked,
        })
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}
