//! Decisions shared by every backend: what a pagemap entry's bits mean.
//!
//! Backends differ in how they learn *where* pages are and whether a
//! present page is the zero page or part of a PMD-mapped THP; once that is
//! known, the remaining bits mean the same thing whichever backend read
//! them, so this module decides them once.

use crate::page::{PageFlags, PageInfo, PageState, SwapSlot, UnknownReason};
use crate::pagemap::{MarkerBits, PagemapEntry, PagemapFlags, SwapEntryKind};
use crate::proc::swaps::SwapTable;

/// The flags a present or swapped entry carries by itself.
fn entry_flags(e: PagemapEntry) -> PageFlags {
    let f = e.flags();
    let mut out = PageFlags::empty();
    out.set(PageFlags::UFFD_WP, f.contains(PagemapFlags::UFFD_WP));
    out.set(PageFlags::SOFT_DIRTY, f.contains(PagemapFlags::SOFT_DIRTY));
    out
}

/// A present entry, once the backend knows whether it is a zero page and
/// whether it is PMD-mapped.
pub fn present(e: PagemapEntry, zero: bool, huge: bool) -> PageInfo {
    let mut flags = entry_flags(e);
    flags.set(PageFlags::HUGE, huge);
    if zero {
        // The huge zero page carries PM_FILE (kernel quirk) and no zero
        // page is ever exclusive: report neither.
        return PageInfo::with(PageState::Zero, flags);
    }
    let f = e.flags();
    flags.set(PageFlags::EXCLUSIVE, f.contains(PagemapFlags::EXCLUSIVE));
    flags.set(PageFlags::FILE, f.contains(PagemapFlags::FILE));
    PageInfo::with(PageState::Present, flags)
}

/// A swap-type entry (bit 62): a real swap entry, a PTE marker (uffd-wp,
/// guard, poison) or a migration/hwpoison entry.
///
/// With privileges the swap type decides. Without, the type is hidden:
/// guard regions still show bit 58, and the rest is left as provisional
/// `unknown` for [`super::unprivileged::resolve`] to settle per VMA.
pub fn swap(e: PagemapEntry, privileged: bool, swaps: &SwapTable) -> PageInfo {
    let flags = entry_flags(e);
    if e.flags().contains(PagemapFlags::GUARD) {
        return PageInfo::of(PageState::Guard);
    }
    match e.swap_kind(privileged) {
        Some(SwapEntryKind::Marker(bits)) => marker(bits),
        Some(SwapEntryKind::Typed { ty, offset }) if swaps.is_plausible_device(ty) => PageInfo {
            swap: Some(SwapSlot { ty, offset }),
            ..PageInfo::with(PageState::Swapped, flags)
        },
        Some(SwapEntryKind::Typed { .. }) => PageInfo::unknown(UnknownReason::SpecialEntry, flags),
        None if flags.contains(PageFlags::UFFD_WP) => {
            PageInfo::unknown(UnknownReason::MarkerOrSwap, flags)
        }
        None => PageInfo::unknown(UnknownReason::UnconfirmedSwap, flags),
    }
}

/// A PTE marker: never a swapped page.
fn marker(bits: MarkerBits) -> PageInfo {
    if bits.contains(MarkerBits::GUARD) {
        PageInfo::of(PageState::Guard)
    } else if bits.contains(MarkerBits::POISONED) {
        PageInfo::with(PageState::Hole, PageFlags::POISONED)
    } else if bits.contains(MarkerBits::UFFD_WP) {
        PageInfo::with(PageState::Hole, PageFlags::UFFD_WP)
    } else {
        PageInfo::unknown(UnknownReason::SpecialEntry, PageFlags::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::swaps::parse_swaps;

    fn swaps() -> SwapTable {
        parse_swaps(b"Filename Type Size Used Priority\n/dev/zram0 partition 1048572 0 100\n")
    }

    #[test]
    fn markers_are_never_swapped() {
        let wp_marker = PagemapEntry((1 << 62) | (1 << 57) | (1 << 5) | 31);
        assert_eq!(
            swap(wp_marker, true, &swaps()),
            PageInfo::with(PageState::Hole, PageFlags::UFFD_WP)
        );
        let guard = PagemapEntry((1 << 62) | (1 << 58) | (4 << 5) | 31);
        assert_eq!(swap(guard, true, &swaps()).state, PageState::Guard);
        assert_eq!(swap(guard, false, &swaps()).state, PageState::Guard);
        let hidden_wp = PagemapEntry((1 << 62) | (1 << 57));
        assert_eq!(
            swap(hidden_wp, false, &swaps()).reason,
            Some(UnknownReason::MarkerOrSwap)
        );
        let migration = PagemapEntry((1 << 62) | (0x1234 << 5) | 29);
        assert_eq!(
            swap(migration, true, &swaps()).reason,
            Some(UnknownReason::SpecialEntry)
        );
    }

    #[test]
    fn real_swap_keeps_slot_and_wp() {
        let e = PagemapEntry((1 << 62) | (1 << 57) | (77 << 5));
        let info = swap(e, true, &swaps());
        assert_eq!(info.state, PageState::Swapped);
        assert_eq!(info.swap, Some(SwapSlot { ty: 0, offset: 77 }));
        assert_eq!(info.flags, PageFlags::UFFD_WP);
    }

    #[test]
    fn huge_zero_page_loses_file_bit() {
        let e = PagemapEntry((1 << 63) | (1 << 61) | 0x20000);
        let info = present(e, true, true);
        assert_eq!(info, PageInfo::with(PageState::Zero, PageFlags::HUGE));
        let anon = present(PagemapEntry((1 << 63) | (1 << 56) | 5), false, false);
        assert_eq!(anon.flags, PageFlags::EXCLUSIVE);
    }
}
