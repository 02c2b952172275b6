//! The snapshot's fault handler: reads the write faults of the
//! synchronous write-protect userfaultfd (`UFFD_EVENT_PAGEFAULT` with
//! `UFFD_PAGEFAULT_FLAG_WP`), captures the page (its bytes are still the
//! snapshot's, read through `/proc/PID/mem`), then lifts that page's
//! protection, which lets the write proceed. Before the snapshot's
//! moment a write is let through at once and its page remembered (to
//! protect again while stopped).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::dump::DumpError;
use crate::dump::remote::RemoteMem;
use crate::proc::maps::MapsEntry;
use crate::uffd::SyncUserfaultfd;
use crate::vma::is_kernel_mapping;

/// A page captured before it could change.
pub(super) enum Captured {
    /// Its bytes at the snapshot.
    Bytes(Box<[u8]>),
    /// Nothing there (reads as zeros).
    Hole,
    /// A private file page not copied yet: the file's.
    FilePage,
}

/// Captures by page address.
pub(super) type Side = Mutex<HashMap<u64, Captured>>;

/// A mapping as the handler sees it.
#[derive(Clone, Copy)]
pub(super) struct Region {
    range: VirtRange,
    shared: bool,
}

/// Whether the snapshot write-protects `m`: a writable mapping that is
/// not one of the kernel's special mappings (`[vvar]`, `[vdso]`, ...:
/// [`is_kernel_mapping`]).
pub(super) fn protectable(m: &MapsEntry) -> bool {
    m.perms.write && !is_kernel_mapping(m)
}

/// Captures every page of `range` (a writable mapping the kernel would not
/// write-protect) during the stop: bytes of present and swapped pages, the
/// file's for the others.
pub(super) fn capture_range(
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
pub(super) struct FaultStats {
    pub faults: u64,
    pub longest: Duration,
    pub total: Duration,
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
pub(super) struct Handler {
    phase: Mutex<Phase>,
    /// What was captured, by page address.
    pub side: Side,
    /// Set to end [`Handler::run`].
    pub done: AtomicBool,
    /// The faults handled.
    pub stats: Mutex<FaultStats>,
}

impl Handler {
    /// The snapshot's moment (the process is stopped): from now on faults
    /// capture before they let the write through. Returns the pages let
    /// through before.
    pub(super) fn moment(&self, regions: Vec<Region>) -> Vec<u64> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *phase, Phase::After(regions)) {
            Phase::Before(pages) => pages,
            Phase::After(_) => Vec::new(),
        }
    }

    /// The handler thread: for every write fault, (after the moment)
    /// capture the page, then lift its protection, which lets the write
    /// proceed. Runs until `done`.
    pub(super) fn run(&self, uffd: &SyncUserfaultfd, mem: &RemoteMem) {
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
pub(super) fn regions_of(maps: &[MapsEntry]) -> Vec<Region> {
    maps.iter()
        .filter(|m| protectable(m))
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
