//! Page states, flags and runs: the vocabulary of every pagescope report.
//!
//! Every page gets exactly one [`PageState`] plus [`PageFlags`]; adjacent
//! pages with equal state, flags, reason and (if requested) consecutive swap
//! slots are merged into one [`PageRun`] by [`RunBuilder`].

use std::fmt;

use bitflags::bitflags;
use serde::{Serialize, Serializer};

use crate::addr::{PageSize, VirtAddr, VirtRange};

/// The state of one page. Exactly one applies to every page of a VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// Mapped in this process's page tables (not the zero page).
    Present,
    /// Mapped to the shared zero page or the huge zero page.
    Zero,
    /// On a swap device only (anon: a real swap entry in the page table;
    /// shmem: a swap entry in the object whose folio is not in RAM).
    Swapped,
    /// Shmem: in RAM in the swap cache and also on a swap device.
    #[serde(rename = "swapcache")]
    SwapCache,
    /// In the page cache (resident), not mapped by this process.
    Resident,
    /// Shmem: allocated by `fallocate`, never written (reads as zeros,
    /// uses RAM).
    Fallocated,
    /// File data on disk, not in the page cache.
    NotResident,
    /// Nothing there: never touched, dropped, or a hole in the object.
    Hole,
    /// A guard region (`MADV_GUARD_INSTALL`): access faults.
    Guard,
    /// Cannot be told apart with the current privileges; the run's
    /// [`UnknownReason`] says why.
    Unknown,
}

impl PageState {
    /// Every state, in report column order.
    pub const ALL: [PageState; 10] = [
        Self::Present,
        Self::Zero,
        Self::Resident,
        Self::SwapCache,
        Self::Swapped,
        Self::Fallocated,
        Self::NotResident,
        Self::Hole,
        Self::Guard,
        Self::Unknown,
    ];

    /// The JSON / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Present => "present",
            Self::Zero => "zero",
            Self::Swapped => "swapped",
            Self::SwapCache => "swapcache",
            Self::Resident => "resident",
            Self::Fallocated => "fallocated",
            Self::NotResident => "not_resident",
            Self::Hole => "hole",
            Self::Guard => "guard",
            Self::Unknown => "unknown",
        }
    }

    /// Parses a JSON / CLI name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.name() == s)
    }
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

bitflags! {
    /// Per-page flags that qualify the state.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
    pub struct PageFlags: u8 {
        /// `PM_MMAP_EXCLUSIVE`: mapped exactly once (present pages only).
        const EXCLUSIVE = 1 << 0;
        /// Part of a PMD-mapped transparent huge page (or hugetlb page).
        const HUGE = 1 << 1;
        /// Write-protected by userfaultfd (a uffd-wp PTE bit or marker).
        const UFFD_WP = 1 << 2;
        /// Soft-dirty (only on kernels with `CONFIG_MEM_SOFT_DIRTY`).
        const SOFT_DIRTY = 1 << 3;
        /// The kernel's file/shared bit (`PM_FILE`), corrected so the huge
        /// zero page does not carry it.
        const FILE = 1 << 4;
        /// A poison PTE marker (`UFFDIO_POISON`): access raises SIGBUS.
        const POISONED = 1 << 5;
    }
}

impl PageFlags {
    const NAMES: [(PageFlags, &'static str); 6] = [
        (Self::EXCLUSIVE, "exclusive"),
        (Self::HUGE, "huge"),
        (Self::UFFD_WP, "uffd_wp"),
        (Self::SOFT_DIRTY, "soft_dirty"),
        (Self::FILE, "file"),
        (Self::POISONED, "poisoned"),
    ];

    /// The JSON / CLI names of the set flags, in a fixed order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .into_iter()
            .filter(move |(f, _)| self.contains(*f))
            .map(|(_, n)| n)
    }

    /// Parses one flag name.
    pub fn from_flag_name(s: &str) -> Option<Self> {
        Self::NAMES
            .into_iter()
            .find(|(_, n)| *n == s)
            .map(|(f, _)| f)
    }
}

impl Serialize for PageFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

/// Why a run is [`PageState::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum UnknownReason {
    /// Present, not exclusive, not file: the shared zero page or a
    /// COW-shared anonymous page. Needs PFNs (CAP_SYS_ADMIN) or
    /// PAGEMAP_SCAN's `PAGE_IS_PFNZERO` to tell.
    ZeroOrShared,
    /// A uffd-wp PTE marker on an empty slot, or a write-protected real swap
    /// entry: needs the swap type (CAP_SYS_ADMIN), and smaps' `Swap:` count
    /// did not settle it.
    MarkerOrSwap,
    /// A non-present entry that is not a swap device's: migration,
    /// device-private or hwpoison (transient or exotic).
    SpecialEntry,
    /// A swap entry whose type cannot be read (no CAP_SYS_ADMIN) and that
    /// smaps' `Swap:` count could not confirm as real swap.
    UnconfirmedSwap,
    /// The vsyscall page lies outside the user address space; pagemap does
    /// not report it.
    OutsidePagemap,
    /// The backing object could not be opened (see the VMA's
    /// `object_error`).
    ObjectUnavailable,
}

impl UnknownReason {
    /// A one-line explanation for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ZeroOrShared => {
                "zero page or COW-shared page: needs CAP_SYS_ADMIN (PFNs) or PAGEMAP_SCAN (PAGE_IS_PFNZERO)"
            }
            Self::MarkerOrSwap => {
                "uffd-wp marker or write-protected swap entry: needs CAP_SYS_ADMIN (swap type)"
            }
            Self::SpecialEntry => "migration, device-private or hwpoison entry",
            Self::UnconfirmedSwap => {
                "swap entry or special (poison/migration) entry: needs CAP_SYS_ADMIN (swap type)"
            }
            Self::OutsidePagemap => "outside the user address space (not reported by pagemap)",
            Self::ObjectUnavailable => {
                "backing object cannot be opened (see the mapping's object_error)"
            }
        }
    }

    /// A short machine-readable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ZeroOrShared => "zero_or_shared",
            Self::MarkerOrSwap => "marker_or_swap",
            Self::SpecialEntry => "special_entry",
            Self::UnconfirmedSwap => "unconfirmed_swap",
            Self::OutsidePagemap => "outside_pagemap",
            Self::ObjectUnavailable => "object_unavailable",
        }
    }
}

/// Where a swapped page lives: the swap type (index of the device in the
/// kernel's swap table) and the page offset on it. Root only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SwapSlot {
    /// Swap type.
    pub ty: u8,
    /// Offset on the device, in pages.
    pub offset: u64,
}

/// A run of adjacent pages with the same state and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// First page.
    pub start: VirtAddr,
    /// Number of pages.
    pub pages: u64,
    /// State of every page in the run.
    pub state: PageState,
    /// Flags of every page in the run.
    pub flags: PageFlags,
    /// Swap slot of the first page (only when swap detail was asked for;
    /// the run's slots are then consecutive).
    pub swap: Option<SwapSlot>,
    /// Why the state is unknown (only for [`PageState::Unknown`]).
    pub reason: Option<UnknownReason>,
}

impl PageRun {
    /// The addresses the run covers.
    pub fn range(&self, page: PageSize) -> VirtRange {
        VirtRange::from_start_len(self.start, page.bytes(self.pages)).unwrap_or_default()
    }
}

/// What one page (or a run of identical pages) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// State.
    pub state: PageState,
    /// Flags.
    pub flags: PageFlags,
    /// Swap slot, if known.
    pub swap: Option<SwapSlot>,
    /// Reason, for unknown pages.
    pub reason: Option<UnknownReason>,
}

impl PageInfo {
    /// A state with no flags.
    pub(crate) const fn of(state: PageState) -> Self {
        Self {
            state,
            flags: PageFlags::empty(),
            swap: None,
            reason: None,
        }
    }

    /// A state with flags.
    pub(crate) const fn with(state: PageState, flags: PageFlags) -> Self {
        Self {
            state,
            flags,
            swap: None,
            reason: None,
        }
    }

    /// An unknown page.
    pub(crate) const fn unknown(reason: UnknownReason, flags: PageFlags) -> Self {
        Self {
            state: PageState::Unknown,
            flags,
            swap: None,
            reason: Some(reason),
        }
    }

    /// The hole every page-table-less slot is.
    pub const HOLE: Self = Self::of(PageState::Hole);
}

/// Builds merged [`PageRun`]s from pages pushed in address order.
#[derive(Debug)]
pub struct RunBuilder {
    runs: Vec<PageRun>,
    page: PageSize,
    swap_detail: bool,
}

impl RunBuilder {
    /// A builder; with `swap_detail`, swap slots are kept and runs split
    /// where slots are not consecutive.
    pub fn new(page: PageSize, swap_detail: bool) -> Self {
        Self {
            runs: Vec::new(),
            page,
            swap_detail,
        }
    }

    /// Appends `pages` pages starting at `start`, all described by `info`
    /// (for swapped pages, `info.swap` is the first page's slot and the rest
    /// follow consecutively).
    pub fn push(&mut self, start: VirtAddr, pages: u64, info: PageInfo) {
        if pages == 0 {
            return;
        }
        let swap = if self.swap_detail { info.swap } else { None };
        if let Some(last) = self.runs.last_mut() {
            let contiguous = last.start.saturating_add(self.page.bytes(last.pages)) == start;
            let same =
                last.state == info.state && last.flags == info.flags && last.reason == info.reason;
            let slots_follow = match (last.swap, swap) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.ty == b.ty && a.offset.checked_add(last.pages) == Some(b.offset)
                }
                _ => false,
            };
            if contiguous && same && slots_follow {
                last.pages += pages;
                return;
            }
        }
        self.runs.push(PageRun {
            start,
            pages,
            state: info.state,
            flags: info.flags,
            swap,
            reason: info.reason,
        });
    }

    /// Appends a run built elsewhere (merging it with the last one if they
    /// are equal and adjacent).
    pub fn push_run(&mut self, run: &PageRun) {
        let info = PageInfo {
            state: run.state,
            flags: run.flags,
            swap: run.swap,
            reason: run.reason,
        };
        self.push(run.start, run.pages, info);
    }

    /// The runs built so far.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// The finished runs.
    pub fn finish(self) -> Vec<PageRun> {
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> PageSize {
        PageSize::new(4096).unwrap()
    }

    #[test]
    fn merges_equal_adjacent_pages() {
        let mut b = RunBuilder::new(page(), false);
        let p = PageInfo::with(PageState::Present, PageFlags::EXCLUSIVE);
        b.push(VirtAddr::new(0x1000), 1, p);
        b.push(VirtAddr::new(0x2000), 2, p);
        b.push(VirtAddr::new(0x4000), 1, PageInfo::HOLE);
        b.push(VirtAddr::new(0x6000), 1, PageInfo::HOLE); // gap: new run
        let runs = b.finish();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].pages, 3);
        assert_eq!(runs[2].start.get(), 0x6000);
    }

    #[test]
    fn swap_detail_splits_on_offsets() {
        let swapped = |off| PageInfo {
            swap: Some(SwapSlot { ty: 1, offset: off }),
            ..PageInfo::of(PageState::Swapped)
        };
        let mut b = RunBuilder::new(page(), true);
        b.push(VirtAddr::new(0x1000), 2, swapped(10));
        b.push(VirtAddr::new(0x3000), 1, swapped(12));
        b.push(VirtAddr::new(0x4000), 1, swapped(40));
        assert_eq!(b.runs().len(), 2);
        assert_eq!(b.runs()[0].pages, 3);
        let mut b = RunBuilder::new(page(), false);
        b.push(VirtAddr::new(0x1000), 2, swapped(10));
        b.push(VirtAddr::new(0x3000), 1, swapped(40));
        assert_eq!(b.runs().len(), 1);
        assert_eq!(b.runs()[0].swap, None);
    }

    #[test]
    fn names_round_trip() {
        for s in PageState::ALL {
            assert_eq!(PageState::from_name(s.name()), Some(s));
        }
        let f = PageFlags::EXCLUSIVE | PageFlags::FILE;
        assert_eq!(f.names().collect::<Vec<_>>(), ["exclusive", "file"]);
        assert_eq!(
            PageFlags::from_flag_name("uffd_wp"),
            Some(PageFlags::UFFD_WP)
        );
    }
}
