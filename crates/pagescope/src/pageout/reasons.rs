//! Why a page stayed in RAM after `MADV_PAGEOUT`: read from the page's
//! mapping (`VmFlags`), its pagemap entry (exclusive bit, PFN), and as
//! root `/proc/kpagecount` and `/proc/kpageflags` of that PFN, and the
//! swap devices' free space.

use std::os::fd::{AsFd, OwnedFd};

use serde::Serialize;

use super::PageoutError;
use crate::addr::VirtAddr;
use crate::kernel::KernelCaps;
use crate::page::PageState;
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::proc::Target;
use crate::proc::smaps::VmFlags;
use crate::report::VmaReport;
use crate::scan::KpageFlags;
use crate::scan::kpage_bits::{KPF_DIRTY, KPF_LRU, KPF_THP_ANY, KPF_UNEVICTABLE};
use crate::vma::Backing;

/// Why the kernel kept a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The shared zero page (takes no memory of its own).
    ZeroPage,
    /// The mapping is `mlock`ed (`VM_LOCKED`).
    Locked,
    /// Written to an asynchronous swap device and waiting in the swap
    /// cache until the write completes (freed by the next reclaim).
    SwapCacheAsync,
    /// Anonymous or shmem page and no swap space left (or no swap device).
    NoSwapSpace,
    /// Mapped by several processes (a COW page shared after `fork`, a
    /// shared mapping): `MADV_PAGEOUT` leaves such pages alone.
    SharedMapping,
    /// On the unevictable list (locked by another mapping, ramfs, ...).
    Unevictable,
    /// Part of a transparent huge page that could not be split.
    ThpSplitFailed,
    /// Not on an LRU list at the time (isolated by someone else, being
    /// migrated or just added).
    NotOnLru,
    /// A dirty page of a regular file: only the flusher or kswapd write
    /// those back.
    DirtyFile,
    /// None of the above could be seen (without root: most of them).
    Unknown,
}

impl Refusal {
    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ZeroPage => "the shared zero page (no memory of its own)",
            Self::Locked => "mapping is locked (mlock)",
            Self::SwapCacheAsync => "in the swap cache while an asynchronous swap device writes it",
            Self::NoSwapSpace => "no swap space",
            Self::SharedMapping => "mapped by several processes",
            Self::Unevictable => "unevictable",
            Self::ThpSplitFailed => "huge page could not be split",
            Self::NotOnLru => "not on an LRU list",
            Self::DirtyFile => "dirty file page (written back by the flusher)",
            Self::Unknown => "unknown",
        }
    }
}

/// What the reasons are read from.
pub struct Judge {
    pagemap: OwnedFd,
    flags: Option<KpageFlags>,
    counts: Option<KpageFlags>,
    swap_space: bool,
    page: u64,
}

impl Judge {
    /// Opens the target's pagemap and, as root, the kpage files.
    pub fn new(target: &Target, caps: &KernelCaps) -> Result<Self, PageoutError> {
        let swaps = crate::proc::read_swaps().unwrap_or_default();
        Ok(Self {
            pagemap: target.pagemap()?,
            flags: KpageFlags::open(),
            counts: KpageFlags::open_counts(),
            swap_space: swaps.devices().iter().any(|d| d.used_kb < d.size_kb),
            page: caps.page_size.get(),
        })
    }

    /// The reasons `pages` pages from `at` of `vma` stayed (state `before`,
    /// now `after`), as runs of equal reason.
    pub fn reasons(
        &self,
        vma: &VmaReport,
        at: VirtAddr,
        pages: u64,
        before: PageState,
        after: PageState,
    ) -> Result<Vec<(VirtAddr, u64, Refusal)>, PageoutError> {
        let mut out: Vec<(VirtAddr, u64, Refusal)> = Vec::new();
        let entries = self.entries(at, pages, after);
        for (k, e) in entries.iter().enumerate() {
            let addr = at.saturating_add(k as u64 * self.page);
            let r = self.reason(vma, *e, before, after);
            match out.last_mut() {
                Some((_, n, last)) if *last == r => *n += 1,
                _ => out.push((addr, 1, r)),
            }
        }
        Ok(out)
    }

    /// Pagemap entries of present pages (others: none needed).
    fn entries(&self, at: VirtAddr, pages: u64, after: PageState) -> Vec<Option<PagemapEntry>> {
        let n = usize::try_from(pages).unwrap_or(0);
        if after != PageState::Present {
            return vec![None; n];
        }
        let mut raw = vec![0u64; n];
        let got =
            crate::sys::pagemap::pread_u64s(self.pagemap.as_fd(), &mut raw, at.get() / self.page)
                .unwrap_or(0);
        raw.into_iter()
            .enumerate()
            .map(|(i, v)| (i < got).then_some(PagemapEntry(v)))
            .collect()
    }

    fn reason(
        &self,
        vma: &VmaReport,
        e: Option<PagemapEntry>,
        before: PageState,
        after: PageState,
    ) -> Refusal {
        let v = &vma.vma;
        if before == PageState::Zero || after == PageState::Zero {
            return Refusal::ZeroPage;
        }
        if v.vm_flags.is_some_and(|f| f.contains(VmFlags::LOCKED)) {
            return Refusal::Locked;
        }
        if after == PageState::SwapCache {
            return Refusal::SwapCacheAsync;
        }
        let file_page = e.is_some_and(|e| e.flags().contains(PagemapFlags::FILE));
        let swap_backed = match v.backing {
            Backing::Anon | Backing::Shmem => true,
            Backing::File => !file_page,
            _ => false,
        };
        if swap_backed && !self.swap_space {
            return Refusal::NoSwapSpace;
        }
        let Some(e) = e else {
            return Refusal::Unknown;
        };
        if !v.is_shared() && !file_page && !e.flags().contains(PagemapFlags::EXCLUSIVE) {
            return Refusal::SharedMapping;
        }
        let Some(pfn) = e.pfn() else {
            return Refusal::Unknown;
        };
        if self
            .counts
            .as_ref()
            .and_then(|c| c.flags(pfn))
            .is_some_and(|n| n > 1)
        {
            return Refusal::SharedMapping;
        }
        let Some(f) = self.flags.as_ref().and_then(|k| k.flags(pfn)) else {
            return Refusal::Unknown;
        };
        if f & KPF_UNEVICTABLE != 0 {
            Refusal::Unevictable
        } else if f & KPF_THP_ANY != 0 {
            Refusal::ThpSplitFailed
        } else if f & KPF_LRU == 0 {
            Refusal::NotOnLru
        } else if f & KPF_DIRTY != 0 && file_page {
            Refusal::DirtyFile
        } else {
            Refusal::Unknown
        }
    }
}
