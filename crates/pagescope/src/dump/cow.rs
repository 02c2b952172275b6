//! `--snapshot cow`: a point-in-time image of a running process, copied
//! while it runs, copy-before-write.
//!
//! 1. A userfaultfd is created inside the target (syscall injection; the
//!    target keeps no copy of it) and set up for *synchronous*
//!    write-protect (`UFFDIO_API` without `WP_ASYNC`, with
//!    `WP_UNPOPULATED` and shmem support).
//! 2. Every thread is stopped (ptrace interrupt); every writable mapping
//!    that can be is registered and write-protected (`UFFDIO_REGISTER`
//!    `MODE_WP`, `UFFDIO_WRITEPROTECT`); the pages of writable mappings
//!    the kernel refuses (private file mappings: sync write-protect covers
//!    anonymous, shmem and hugetlb memory only) are captured right there.
//!    Then the target runs again. That stop is the snapshot's moment.
//! 3. A handler thread reads the write faults: it captures the page (its
//!    bytes are still those of the snapshot), then lifts that page's
//!    protection, which lets the write proceed. Meanwhile the copy goes
//!    through every page, using the handler's capture where there is one,
//!    and lifts the protection of what it copied.
//! 4. At the end every range is unregistered (which lifts what is left and
//!    wakes any waiter) and the userfaultfd is closed.
//!
//! The fd lives only in pagescope: if pagescope dies at any point, the
//! kernel releases the userfaultfd, unregisters the ranges and wakes every
//! blocked thread, so the target is never left write-protected.
//! Not covered: writes by *other* processes to shared memory the target
//! maps, and pages the target discards or unmaps during the copy
//! (`MADV_DONTNEED`, `munmap`): they are copied as they are then.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::copy::pread_page;
use super::model::VmaModel;
use super::passes::Dump;
use super::remote::RemoteMem;
use super::stop::Stopped;
use super::{DumpError, DumpEvent, Iteration};
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::image::format::PageKind;
use crate::image::write::Store;
use crate::proc::Target;
use crate::proc::maps::MapsEntry;
use crate::sys::inject::UffdOrigin;
use crate::uffd::SyncUserfaultfd;
use crate::vma::ObjectId;

/// Pages copied (and then unprotected) per batch.
const BATCH_PAGES: usize = 256;

/// What the snapshot cost the target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CowStats {
    /// The stop that write-protected everything, seconds.
    pub stop_s: f64,
    /// Writes that waited for their page to be copied.
    pub faults: u64,
    /// The longest such wait, seconds (handler side: from reading the
    /// fault to lifting the protection).
    pub longest_stall_s: f64,
    /// All waits together, seconds.
    pub total_stall_s: f64,
    /// Mappings write-protected.
    pub protected_mappings: usize,
    /// Writable mappings the kernel would not write-protect (private file
    /// mappings), captured during the stop.
    pub captured_while_stopped: usize,
}

/// A page captured before it could change.
enum Captured {
    /// Its bytes at the snapshot.
    Bytes(Box<[u8]>),
    /// Nothing there (reads as zeros).
    Hole,
    /// A private file page not copied yet: the file's.
    FilePage,
}

/// Captures by page address.
type Side = Mutex<HashMap<u64, Captured>>;

/// A mapping as the handler sees it.
#[derive(Clone, Copy)]
struct Region {
    range: VirtRange,
    shared: bool,
}

/// Unregisters every range on drop (lifts all protection, wakes waiters).
struct Registration<'u> {
    uffd: &'u SyncUserfaultfd,
    ranges: Vec<VirtRange>,
}

impl Registration<'_> {
    /// Unregisters everything now.
    fn release(&mut self) {
        for r in self.ranges.drain(..) {
            let _ = self.uffd.unregister(r);
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Dump<'_, '_, '_> {
    /// Takes the snapshot of the (only) process: returns the pass and
    /// what it cost the target.
    pub(super) fn cow_snapshot(
        &mut self,
        target: &Target,
    ) -> Result<(Iteration, CowStats), DumpError> {
        let t0 = Instant::now();
        let pid = target.pid();
        let injected = crate::dirty::inject::userfaultfd_in(target, false)?;
        if injected.origin == UffdOrigin::UserModeOnly {
            return Err(DumpError::Refused {
                pid,
                what: "only a user-mode-only userfaultfd could be created in the process (vm.unprivileged_userfaultfd = 0): its kernel-mode writes would fail with EFAULT during a snapshot; run as root".into(),
            });
        }
        let uffd = SyncUserfaultfd::from_fd_sync_wp(injected.fd)
            .map_err(|source| DumpError::Protect { pid, source })?;
        let hmem = RemoteMem::open(target, self.page, std::sync::Arc::clone(&self.swap))?;
        let mut stats = CowStats::default();
        let handler = Handler::default();
        let mut registration = Registration {
            uffd: &uffd,
            ranges: Vec::new(),
        };
        let copied = std::thread::scope(|s| {
            let h = s.spawn(|| handler.run(&uffd, &hmem));
            let result = self
                .protect(
                    target,
                    &uffd,
                    &mut registration,
                    &hmem,
                    &handler,
                    &mut stats,
                )
                .and_then(|()| self.copy_all(&uffd, &registration.ranges, &handler.side));
            registration.release();
            handler.done.store(true, Ordering::Release);
            let _ = h.join();
            result
        })?;
        let f = handler
            .stats
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        stats.faults = f.faults;
        stats.longest_stall_s = f.longest.as_secs_f64();
        stats.total_stall_s = f.total.as_secs_f64();
        let it = self.iteration(0, false, t0, copied, 0, Duration::ZERO);
        (self.progress)(DumpEvent::Iteration(&it));
        Ok((it, stats))
    }

    /// Write-protects every writable mapping in two phases, so the stop
    /// lasts only as long as the pages written meanwhile take:
    ///
    /// 1. while the process runs: register and protect everything (for a
    ///    large process this takes a while); a write meanwhile is let
    ///    through at once and its page remembered;
    /// 2. stopped (the snapshot's moment): protect again the pages let
    ///    through, register and protect mappings that appeared, capture
    ///    the writable mappings the kernel refuses; resume.
    fn protect(
        &mut self,
        target: &Target,
        uffd: &SyncUserfaultfd,
        registration: &mut Registration<'_>,
        hmem: &RemoteMem,
        handler: &Handler,
        stats: &mut CowStats,
    ) -> Result<(), DumpError> {
        let pid = target.pid();
        let protect_err = |source| DumpError::Protect { pid, source };
        let mut refused = Vec::new();
        for m in target
            .maps()?
            .iter()
            .filter(|m| m.perms.write && !is_special(m))
        {
            if uffd.register_wp(m.range).is_ok() {
                registration.ranges.push(m.range);
                uffd.write_protect(m.range, true).map_err(protect_err)?;
            } else {
                refused.push(m.range);
            }
        }
        let stopped = Stopped::stop(target).map_err(|source| DumpError::Stop { pid, source })?;
        self.rseq.insert(pid, stopped.rseq_areas());
        let maps = target.maps()?;
        let let_through = handler.moment(regions_of(&maps));
        for a in let_through {
            if let Some(r) = VirtRange::from_start_len(VirtAddr::new(a), self.page.get()) {
                // A page unmapped meanwhile has nothing to protect.
                let _ = uffd.write_protect(r, true);
            }
        }
        for m in maps.iter().filter(|m| m.perms.write && !is_special(m)) {
            let known = registration.ranges.contains(&m.range) || refused.contains(&m.range);
            if known {
                continue;
            }
            if uffd.register_wp(m.range).is_ok() {
                registration.ranges.push(m.range);
                uffd.write_protect(m.range, true).map_err(protect_err)?;
            } else {
                refused.push(m.range);
            }
        }
        for r in refused
            .iter()
            .filter(|r| maps.iter().any(|m| m.range == **r))
        {
            capture_range(hmem, *r, self.page, &handler.side)?;
        }
        stats.protected_mappings = registration.ranges.len();
        stats.captured_while_stopped = refused.len();
        stats.stop_s = stopped.resume().as_secs_f64();
        Ok(())
    }

    /// Scans (after the resume: every write since then was captured
    /// first), then copies every page with content, capture first.
    fn copy_all(
        &mut self,
        uffd: &SyncUserfaultfd,
        protected: &[VirtRange],
        side: &Side,
    ) -> Result<super::copy::Copied, DumpError> {
        let mut copied = super::copy::Copied::default();
        let mut vmas = self.build_models(0)?;
        let total: u64 = vmas.iter().map(|m| m.own_pages().len() as u64).sum();
        let mut done = 0;
        for m in &mut vmas {
            let pages = m.own_pages();
            for batch in pages.chunks(BATCH_PAGES) {
                self.cancelled()?;
                copied += self.own_batch(m, batch, side)?;
                unprotect(uffd, protected, m, batch, self.page);
                done += batch.len() as u64;
                (self.progress)(DumpEvent::Progress {
                    pass: 0,
                    done,
                    total,
                });
            }
        }
        let ids: Vec<ObjectId> = self.objects.keys().copied().collect();
        for id in ids {
            let pages = self.object_data(id, None)?;
            copied += self.object_pages(id, &pages, &vmas, side)?;
            for m in vmas
                .iter()
                .filter(|m| m.is_object_view() && m.vma.object_id() == Some(id))
            {
                if protected.contains(&m.vma.range) {
                    let _ = uffd.write_protect(m.vma.range, false);
                }
            }
        }
        self.procs[0].vmas = vmas;
        Ok(copied)
    }

    /// Copies own pages `batch` of `m`: captures first, else the memory
    /// now (still protected, so still the snapshot's).
    fn own_batch(
        &mut self,
        m: &mut VmaModel,
        batch: &[u64],
        side: &Side,
    ) -> Result<super::copy::Copied, DumpError> {
        let p = self.page.as_usize();
        let store = self.store_for(m)?;
        let addrs: Vec<u64> = batch.iter().map(|&i| m.addr(i, self.page).get()).collect();
        let mut buf = vec![0u8; batch.len() * p];
        let reads = self.procs[0].mem.read(&addrs, &mut buf)?;
        // What the handler captured overrides what was read (it may have
        // lifted the protection before this read). The lock is held only
        // to take the captures, so a waiting writer is not held up by the
        // stores below.
        let mut took: Vec<Option<PageKind>> = vec![None; batch.len()];
        {
            let side = side.lock().unwrap_or_else(|e| e.into_inner());
            for (k, a) in addrs.iter().enumerate() {
                match side.get(a) {
                    Some(Captured::Bytes(b)) => {
                        buf[k * p..(k + 1) * p].copy_from_slice(b);
                        took[k] = Some(PageKind::Data);
                    }
                    Some(Captured::Hole) => took[k] = Some(PageKind::Hole),
                    Some(Captured::FilePage) => took[k] = Some(PageKind::Object),
                    None => {}
                }
            }
        }
        let mut copied = super::copy::Copied::default();
        for (k, &i) in batch.iter().enumerate() {
            match took[k] {
                Some(PageKind::Data) => {}
                Some(kind) => {
                    set_kind(m, i, kind, &store);
                    continue;
                }
                None if reads[k].skipped => {
                    let (ty, offset) = reads[k].entry.swap_raw();
                    m.swap_slots.insert(i, (ty, offset));
                    set_kind(m, i, PageKind::Swapped, &store);
                    continue;
                }
                None if !reads[k].ok => {
                    set_kind(m, i, PageKind::Hole, &store);
                    continue;
                }
                None => {}
            }
            let bytes = &buf[k * p..(k + 1) * p];
            copied.pages += 1;
            if bytes.iter().all(|&b| b == 0) {
                set_kind(m, i, PageKind::Zero, &store);
            } else {
                store.write(i, bytes)?;
                copied.stored += 1;
                set_kind(m, i, PageKind::Data, &store);
            }
        }
        Ok(copied)
    }

    /// Copies pages `pages` of shared object `id` (`pread` of pagescope's
    /// fd), using the handler's capture through any of the target's
    /// mappings of a page.
    fn object_pages(
        &mut self,
        id: ObjectId,
        pages: &[u64],
        vmas: &[VmaModel],
        side: &Side,
    ) -> Result<super::copy::Copied, DumpError> {
        let page = self.page;
        let p = page.as_usize();
        let views: Vec<&VmaModel> = vmas
            .iter()
            .filter(|m| m.is_object_view() && m.vma.object_id() == Some(id))
            .collect();
        let Some(o) = self.objects.get_mut(&id) else {
            return Ok(super::copy::Copied::default());
        };
        if o.file.is_some() || pages.is_empty() {
            return Ok(super::copy::Copied::default());
        }
        let store = match &o.store {
            Some(s) => s.clone(),
            None => {
                let name = format!("o{}-{}", o.id.dev.to_string().replace(':', "_"), o.id.inode);
                let s = self.writer.new_store(&name, o.pages)?;
                o.store = Some(s.clone());
                s
            }
        };
        let mut buf = vec![0u8; p];
        let mut copied = super::copy::Copied::default();
        for &i in pages {
            let Some(kind) = o.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) else {
                continue;
            };
            let n = pread_page(o.fd.as_fd(), &mut buf, page.bytes(i)).map_err(|source| {
                DumpError::ObjectRead {
                    inode: id.inode,
                    source,
                }
            })?;
            buf[n..].fill(0);
            {
                let side = side.lock().unwrap_or_else(|e| e.into_inner());
                let captured = views.iter().find_map(|m| {
                    let first = m.vma.object_page(m.vma.range.start(), page);
                    let last = first + m.vma.range.pages(page);
                    (first..last)
                        .contains(&i)
                        .then(|| side.get(&(m.vma.range.start().get() + (i - first) * page.get())))
                        .flatten()
                });
                if let Some(Captured::Bytes(b)) = captured {
                    buf.copy_from_slice(b);
                }
            }
            let bytes: &[u8] = &buf;
            copied.pages += 1;
            if bytes.iter().all(|&b| b == 0) {
                *kind = PageKind::Zero;
                store.forget(i, 1);
            } else {
                store.write(i, bytes)?;
                copied.stored += 1;
                *kind = PageKind::Data;
            }
        }
        Ok(copied)
    }

    /// The store of `m`'s own pages (created on first use).
    fn store_for(&self, m: &mut VmaModel) -> Result<std::sync::Arc<Store>, DumpError> {
        if let Some(s) = &m.store {
            return Ok(s.clone());
        }
        let name = format!("p{}-{:x}", self.procs[0].pid, m.vma.range.start().get());
        let s = self.writer.new_store(&name, m.kinds.len() as u64)?;
        m.store = Some(s.clone());
        Ok(s)
    }
}

fn set_kind(m: &mut VmaModel, i: u64, kind: PageKind, store: &Store) {
    if kind != PageKind::Data {
        store.forget(i, 1);
    }
    if let Some(k) = m.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
        *k = kind;
    }
}

/// `[vvar]`, `[vdso]`, `[vsyscall]` and other special mappings.
fn is_special(m: &MapsEntry) -> bool {
    matches!(
        m.path.display().as_str(),
        "[vvar]" | "[vvar_vclock]" | "[vdso]" | "[vsyscall]" | "[uprobes]"
    )
}

/// Lifts the protection of the pages `batch` of `m` (if it is protected),
/// in runs.
fn unprotect(
    uffd: &SyncUserfaultfd,
    protected: &[VirtRange],
    m: &VmaModel,
    batch: &[u64],
    page: PageSize,
) {
    if !protected.contains(&m.vma.range) {
        return;
    }
    let mut run: Option<(u64, u64)> = None;
    let flush = |r: Option<(u64, u64)>| {
        if let Some((first, n)) = r {
            let start = m.addr(first, page);
            if let Some(range) = VirtRange::from_start_len(start, page.bytes(n)) {
                let _ = uffd.write_protect(range, false);
            }
        }
    };
    for &i in batch {
        run = match run {
            Some((f, n)) if f + n == i => Some((f, n + 1)),
            other => {
                flush(other);
                Some((i, 1))
            }
        };
    }
    flush(run);
}

/// Captures every page of `range` (a writable mapping the kernel would not
/// write-protect) during the stop: bytes of present and swapped pages, the
/// file's for the others.
fn capture_range(
    mem: &RemoteMem,
    range: VirtRange,
    page: PageSize,
    side: &Side,
) -> Result<(), DumpError> {
    let p = page.as_usize();
    let addrs: Vec<u64> = (0..range.pages(page))
        .map(|i| range.start().get() + i * page.get())
        .collect();
    let entries = mem.entries_at(&addrs)?;
    let with_content: Vec<u64> = addrs
        .iter()
        .zip(&entries)
        .filter(|(_, e)| e.is_present() || e.is_swap())
        .map(|(a, _)| *a)
        .collect();
    let mut buf = vec![0u8; with_content.len() * p];
    let reads = mem.read(&with_content, &mut buf)?;
    let mut side = side.lock().unwrap_or_else(|e| e.into_inner());
    for a in &addrs {
        side.insert(*a, Captured::FilePage);
    }
    for (k, a) in with_content.iter().enumerate() {
        let c = if reads[k].ok {
            Captured::Bytes(buf[k * p..(k + 1) * p].into())
        } else {
            Captured::Hole
        };
        side.insert(*a, c);
    }
    Ok(())
}

/// Fault statistics.
#[derive(Default)]
struct FaultStats {
    faults: u64,
    longest: Duration,
    total: Duration,
}

/// Before the moment: the pages whose write was let through. After it:
/// the mappings (to tell shared from private).
enum Phase {
    Before(Vec<u64>),
    After(Vec<Region>),
}

impl Default for Phase {
    fn default() -> Self {
        Self::Before(Vec::new())
    }
}

/// The fault handler's state, shared with the copy.
#[derive(Default)]
struct Handler {
    phase: Mutex<Phase>,
    side: Side,
    done: AtomicBool,
    stats: Mutex<FaultStats>,
}

impl Handler {
    /// The snapshot's moment (the process is stopped): from now on faults
    /// capture before they let the write through. Returns the pages let
    /// through before.
    fn moment(&self, regions: Vec<Region>) -> Vec<u64> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *phase, Phase::After(regions)) {
            Phase::Before(pages) => pages,
            Phase::After(_) => Vec::new(),
        }
    }

    /// The handler thread: for every write fault, (after the moment)
    /// capture the page, then lift its protection, which lets the write
    /// proceed. Runs until `done`.
    fn run(&self, uffd: &SyncUserfaultfd, mem: &RemoteMem) {
        let page = mem.page_size();
        let p = page.as_usize();
        let mut buf = vec![0u8; p];
        while !self.done.load(Ordering::Acquire) {
            let Ok(faults) = uffd.wp_faults(Duration::from_millis(20)) else {
                return;
            };
            for addr in faults {
                let t = Instant::now();
                let a = addr / page.get() * page.get();
                // Held until the write is let through: the moment cannot
                // fall between the decision and the unprotect.
                let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
                match &mut *phase {
                    Phase::Before(pages) => pages.push(a),
                    Phase::After(regions) => {
                        let shared = regions
                            .iter()
                            .find(|r| r.range.contains(VirtAddr::new(a)))
                            .is_some_and(|r| r.shared);
                        let known = self
                            .side
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .contains_key(&a);
                        if !known {
                            let c = capture_page(mem, a, shared, &mut buf);
                            self.side
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(a)
                                .or_insert(c);
                        }
                    }
                }
                if let Some(r) = VirtRange::from_start_len(VirtAddr::new(a), page.get()) {
                    let _ = uffd.write_protect(r, false);
                }
                drop(phase);
                let d = t.elapsed();
                let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                s.faults += 1;
                s.total += d;
                s.longest = s.longest.max(d);
            }
        }
    }
}

/// The writable mappings of `maps`, as the handler needs them.
fn regions_of(maps: &[MapsEntry]) -> Vec<Region> {
    maps.iter()
        .filter(|m| m.perms.write && !is_special(m))
        .map(|m| Region {
            range: m.range,
            shared: m.perms.shared,
        })
        .collect()
}

/// The snapshot's bytes of page `a` (still write-protected): a page of a
/// private mapping with nothing in it is a hole (not read, so nothing is
/// mapped into the target); a shared mapping's page is read either way.
fn capture_page(mem: &RemoteMem, a: u64, shared: bool, buf: &mut [u8]) -> Captured {
    let entry = mem.entries_at(&[a]).ok().and_then(|e| e.first().copied());
    let has_content = entry.is_some_and(|e| e.is_present() || real_swap(e));
    if !shared && !has_content {
        return Captured::Hole;
    }
    match mem.read(&[a], buf) {
        Ok(r) if r.first().is_some_and(|r| r.ok) => {
            Captured::Bytes(buf.to_vec().into_boxed_slice())
        }
        _ => Captured::Hole,
    }
}

/// A swap entry that is a real swapped page, not a PTE marker (uffd-wp
/// markers are what `WP_UNPOPULATED` puts in empty slots). Without
/// CAP_SYS_ADMIN the type is hidden: counted as a page (read).
fn real_swap(e: crate::pagemap::PagemapEntry) -> bool {
    if !e.is_swap() {
        return false;
    }
    if e.swap_raw() == (0, 0) {
        return true;
    }
    matches!(
        e.swap_kind(true),
        Some(crate::pagemap::SwapEntryKind::Typed { .. })
    )
}
