//! Page-table backends: the writes one mm's page tables record, and
//! nothing else (shared objects are the [`objects`](super::objects)
//! layer's job).
//!
//! Every backend is given the VMAs to look at on each collect; a VMA seen
//! for the first time (or grown, or moved) is reported whole as
//! [`WriteSource::NewMapping`] and tracked from then on; one that cannot
//! be tracked is reported whole every time ([`WriteSource::Untracked`],
//! with a note).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use rustix::io::Errno;

use super::target_uffd::UffdOrigin;
use super::{TrackError, TrackerBackend, WriteSource, Written};
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::scan::ScanError;
use crate::scan::reader::PagemapReader;
use crate::sys::pagemap_scan::RegionBuf;
use crate::uffd::{UffdError, Userfaultfd};
use crate::vma::{Backing, Vma};

/// A mechanism that records writes in one mm's page tables.
pub trait PageTableTracker {
    /// The mechanism.
    fn backend(&self) -> TrackerBackend;

    /// Writes in `vmas` since the last call, re-armed; VMAs not seen
    /// before are reported whole and tracked from now on.
    fn collect(&mut self, target: &Target, vmas: &[Vma]) -> Result<Vec<Written>, TrackError>;

    /// What the backend cannot see (as of the last collect).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// The fd number of a userfaultfd the target keeps for later.
    fn kept_in_target(&self) -> Option<i32> {
        None
    }
}

/// Whether the mm a pagemap fd was opened on is gone (the process exited
/// or executed a new program): reads of it then return end of file,
/// while a live mm answers every user address.
pub fn mm_gone(pagemap: &OwnedFd) -> bool {
    let mut one = [0u64; 1];
    matches!(
        crate::sys::pagemap::pread_u64s(pagemap.as_fd(), &mut one, 0),
        Ok(0) | Err(_)
    )
}

fn whole(range: VirtRange, source: WriteSource) -> Written {
    Written { range, source }
}

/// userfaultfd write-protect in async mode + `PAGEMAP_SCAN`
/// get-and-reset (Linux 6.7+). The uffd must have been created by the
/// tracked mm (by the process itself, or injected into it).
#[derive(Debug)]
pub struct UffdWp {
    pid: u32,
    uffd: Userfaultfd,
    origin: UffdOrigin,
    pagemap: OwnedFd,
    tracked: RangeSet,
    /// Read-only mappings the kernel will not register (shared mappings
    /// of regular files): nothing can write through them, so they are
    /// reported once, when they appear, and left to the object layer.
    read_only: RangeSet,
    vec: RegionBuf,
    untracked: Vec<String>,
    collects: u64,
    kept: Option<i32>,
}

impl UffdWp {
    /// A backend for the mm of `target`, whose userfaultfd `uffd` is
    /// (created inside it).
    pub fn new(target: &Target, uffd: Userfaultfd, origin: UffdOrigin) -> Result<Self, TrackError> {
        Ok(Self {
            pid: target.pid(),
            uffd,
            origin,
            pagemap: target.pagemap()?,
            tracked: RangeSet::new(),
            read_only: RangeSet::new(),
            vec: RegionBuf::new(16 * 1024),
            untracked: Vec::new(),
            collects: 0,
            kept: None,
        })
    }

    /// Notes that the target keeps its own copy of the uffd as fd `fd`.
    pub fn kept_at(mut self, fd: Option<i32>) -> Self {
        self.kept = fd;
        self
    }

    /// Takes over the userfaultfd the target keeps as fd `fd` (left by an
    /// earlier tracker), with `registered` the ranges it covers. Checks it
    /// is a userfaultfd.
    pub fn adopt(target: &Target, fd: i32, registered: RangeSet) -> Result<Self, TrackError> {
        let pid = target.pid();
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(TrackError::Inject {
                pid,
                step: "find the userfaultfd an earlier dump left in the process",
                source: Errno::BADF,
            });
        }
        let ours = rustix::process::pidfd_getfd(
            target.pidfd(),
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )
        .map_err(|source| TrackError::Inject {
            pid,
            step: "copy the kept userfaultfd out of the process (pidfd_getfd)",
            source,
        })?;
        let uffd = Userfaultfd::adopt(ours)?;
        let mut me = Self::new(target, uffd, UffdOrigin::Syscall)?;
        me.tracked = registered;
        me.collects = 1;
        me.kept = Some(fd);
        Ok(me)
    }

    /// Get-and-reset over `r`; `Ok(false)` means the VMA changed under us
    /// (it is then re-registered as new).
    fn written(&mut self, r: VirtRange, out: &mut Vec<Written>) -> Result<bool, TrackError> {
        let tracked = |range| whole(range, WriteSource::Tracked);
        if pmd_hole_bug() {
            // Zapped PMDs carry neither protection nor WRITTEN here: report
            // and re-protect them before the get-and-reset.
            let found = self
                .uffd
                .unprotected_holes(self.pagemap.as_fd(), r, &mut self.vec);
            for h in self.gone(found)? {
                self.gone(self.uffd.arm(self.pagemap.as_fd(), h))?;
                out.push(tracked(h));
            }
        }
        let mark = out.len();
        let scan = self
            .uffd
            .get_and_reset(self.pagemap.as_fd(), r, &mut self.vec, |w| {
                out.push(tracked(w))
            });
        match self.gone(scan) {
            Ok(()) => Ok(true),
            Err(TrackError::TargetExited { pid }) => Err(TrackError::TargetExited { pid }),
            Err(_) => {
                out.truncate(mark);
                Ok(false)
            }
        }
    }

    /// Turns "the mm is gone" (exit or exec) into [`TrackError::TargetExited`].
    fn gone<T>(&self, r: Result<T, UffdError>) -> Result<T, TrackError> {
        r.map_err(|e| match e.kind() {
            crate::error::ErrorKind::TargetExited => TrackError::TargetExited { pid: self.pid },
            _ => TrackError::Uffd(e),
        })
    }

    /// Registers and arms a (new) VMA.
    fn start_tracking(&mut self, v: &Vma) -> Result<(), TrackError> {
        if let Err(e) = self.uffd.register_wp(v.range) {
            return Err(match e.errno() {
                Some(Errno::BUSY) if self.collects == 0 => TrackError::AlreadyTracked {
                    pid: self.pid,
                    range: v.range,
                },
                Some(Errno::SRCH) => TrackError::TargetExited { pid: self.pid },
                _ => TrackError::Uffd(e),
            });
        }
        self.gone(self.uffd.arm(self.pagemap.as_fd(), v.range))
    }

    fn needs_feature(&self, v: &Vma) -> bool {
        matches!(v.backing, Backing::Shmem | Backing::Hugetlb) && !self.uffd.supports_shmem()
    }

    fn untrack(&mut self, v: &Vma, why: &str, out: &mut Vec<Written>) {
        self.untracked.push(format!(
            "{} {} cannot be write-protected ({why}): reported written every time",
            v.range,
            v.path.display()
        ));
        out.push(whole(v.range, WriteSource::Untracked));
    }
}

impl PageTableTracker for UffdWp {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::UffdWpAsync
    }

    fn collect(&mut self, _target: &Target, vmas: &[Vma]) -> Result<Vec<Written>, TrackError> {
        if mm_gone(&self.pagemap) {
            return Err(TrackError::TargetExited { pid: self.pid });
        }
        let mut out = Vec::new();
        let mut now = RangeSet::new();
        let mut read_only = RangeSet::new();
        self.untracked.clear();
        for v in vmas {
            if self.needs_feature(v) {
                self.untrack(
                    v,
                    "the kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
                    &mut out,
                );
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
                match self.start_tracking(v) {
                    Ok(()) => {}
                    Err(
                        e @ (TrackError::AlreadyTracked { .. } | TrackError::TargetExited { .. }),
                    ) => {
                        return Err(e);
                    }
                    Err(_) if !v.perms.write => {
                        let new = self.read_only.subtract_from(v.range);
                        out.extend(new.into_iter().map(|r| whole(r, WriteSource::NewMapping)));
                        read_only.insert(v.range);
                        continue;
                    }
                    Err(e) => {
                        self.untrack(v, &e.to_string(), &mut out);
                        continue;
                    }
                }
                out.extend(fresh.into_iter().map(|r| whole(r, WriteSource::NewMapping)));
            }
            now.insert(v.range);
        }
        self.tracked = now;
        self.read_only = read_only;
        self.collects += 1;
        Ok(out)
    }

    fn kept_in_target(&self) -> Option<i32> {
        self.kept
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.untracked.clone();
        if self.origin == UffdOrigin::UserModeOnly {
            n.push(format!("process {}: userfaultfd created with UFFD_USER_MODE_ONLY (vm.unprivileged_userfaultfd = 0); write-protect async mode still sees kernel-mode writes", self.pid));
        }
        if self.origin == UffdOrigin::HandedDevice {
            n.push(format!("process {}: may not create a full userfaultfd itself; pagescope handed it /dev/userfaultfd to create one", self.pid));
        }
        if pmd_hole_bug() {
            n.push("this kernel's PAGEMAP_SCAN misses PMD holes (MADV_DONTNEED of write-protected THPs); pagescope finds unprotected empty pages itself".into());
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
    let page = PageSize::current();
    let huge = usize::try_from(page.pmd().get()).ok()?;
    let m = OwnedMapping::anonymous(huge, huge).ok()?;
    m.madvise(0, huge, Advice::HugePage).ok()?;
    (0..huge)
        .step_by(usize::try_from(page.get()).ok()?)
        .try_for_each(|o| m.write_byte(o, 1))
        .ok()?;
    let uffd = Userfaultfd::new_wp_async().ok()?;
    let range = VirtRange::from_start_len(VirtAddr::new(m.addr()), huge as u64)?;
    uffd.register_wp(range).ok()?;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    uffd.arm(pagemap.as_fd(), range).ok()?;
    m.madvise(0, huge, Advice::DontNeed).ok()?;
    let mut buf = RegionBuf::new(64);
    let mut pages = 0;
    uffd.get_and_reset(pagemap.as_fd(), range, &mut buf, |r| pages += r.pages(page))
        .ok()?;
    Some(pages < range.pages(page))
}

/// Soft-dirty bits (pagemap bit 55) and `clear_refs` "4".
///
/// Not atomic: a page written between reading the bits and clearing them
/// is lost unless the target is stopped; uffd-wp async has no such window.
#[derive(Debug)]
pub struct SoftDirty {
    pagemap: OwnedFd,
    page: PageSize,
    known: RangeSet,
    buf: Vec<u64>,
}

impl SoftDirty {
    /// Starts soft-dirty tracking of `target` (clears its bits).
    pub fn new(target: &Target, page: PageSize) -> Result<Self, TrackError> {
        let t = Self {
            pagemap: target.pagemap()?,
            page,
            known: RangeSet::new(),
            buf: Vec::new(),
        };
        Self::clear(target)?;
        Ok(t)
    }

    fn clear(target: &Target) -> Result<(), TrackError> {
        target
            .write_file("clear_refs", b"4")
            .map_err(TrackError::from)
    }

    /// The soft-dirty pages of `r`, read through the scan's pagemap
    /// reader.
    fn dirty_pages(
        &mut self,
        pid: u32,
        r: VirtRange,
        out: &mut Vec<Written>,
    ) -> Result<(), TrackError> {
        let page = self.page;
        let mut reader = PagemapReader::new(self.pagemap.as_fd(), pid, page, &mut self.buf);
        reader
            .for_each_batch(r, |addr, raw| {
                for (i, e) in raw.iter().enumerate() {
                    if PagemapEntry(*e).flags().contains(PagemapFlags::SOFT_DIRTY) {
                        let start = addr.saturating_add(page.bytes(i as u64));
                        out.extend(
                            VirtRange::from_start_len(start, page.get())
                                .map(|r| whole(r, WriteSource::Tracked)),
                        );
                    }
                }
                Ok(())
            })
            .map_err(|e| match e {
                ScanError::TargetExited { pid } => TrackError::TargetExited { pid },
                e => TrackError::Scan(e),
            })
    }
}

impl PageTableTracker for SoftDirty {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::SoftDirty
    }

    fn collect(&mut self, target: &Target, vmas: &[Vma]) -> Result<Vec<Written>, TrackError> {
        if mm_gone(&self.pagemap) {
            return Err(TrackError::TargetExited { pid: target.pid() });
        }
        let mut out = Vec::new();
        let mut now = RangeSet::new();
        for v in vmas {
            for fresh in self.known.subtract_from(v.range) {
                out.push(whole(fresh, WriteSource::NewMapping));
            }
            self.dirty_pages(target.pid(), v.range, &mut out)?;
            now.insert(v.range);
        }
        Self::clear(target)?;
        self.known = now;
        Ok(out)
    }

    fn notes(&self) -> Vec<String> {
        vec!["soft-dirty is not atomic: writes racing a collect may be lost unless the target is stopped".into()]
    }
}

/// No tracking mechanism: every page is reported written every time.
#[derive(Debug, Default)]
pub struct AllDirty;

impl PageTableTracker for AllDirty {
    fn backend(&self) -> TrackerBackend {
        TrackerBackend::AllDirty
    }

    fn collect(&mut self, _target: &Target, vmas: &[Vma]) -> Result<Vec<Written>, TrackError> {
        Ok(vmas
            .iter()
            .map(|v| whole(v.range, WriteSource::Untracked))
            .collect())
    }
}
