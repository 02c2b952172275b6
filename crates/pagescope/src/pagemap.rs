//! Decoding `/proc/PID/pagemap` entries: the flag bits, the PFN, and the
//! swap type and offset of a non-present entry, telling a PTE marker
//! (uffd-wp, guard, poison: the kernel's `SWP_PTE_MARKER` type) from a
//! real swap entry. Pure: the reads are in `sys/pagemap.rs`, and
//! `PAGEMAP_SCAN`'s categories in `sys/pagemap_scan.rs` (`ScanCategories`);
//! `scan/classify.rs` turns an entry into a page state.
//!
//! | bits  | meaning |
//! |-------|---------|
//! | 0-54  | PFN if present; swap type (0-4) and offset (5-54) if swapped; zeroed without CAP_SYS_ADMIN |
//! | 55    | soft-dirty (3.11+, needs `CONFIG_MEM_SOFT_DIRTY`) |
//! | 56    | exclusively mapped (4.2+) |
//! | 57    | uffd-wp (5.17+) |
//! | 58    | guard region (6.15+) |
//! | 61    | file page or shared anon (3.5+) |
//! | 62    | swapped (or a PTE marker / migration entry) |
//! | 63    | present |
//!
//! # References
//! - <https://docs.kernel.org/admin-guide/mm/pagemap.html>

use bitflags::bitflags;

use crate::proc::swaps::PTE_MARKER_TYPE;

bitflags! {
    /// The flag bits of a pagemap entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PagemapFlags: u64 {
        /// Bit 55: soft-dirty.
        const SOFT_DIRTY = 1 << 55;
        /// Bit 56: page exclusively mapped (mapcount 1).
        const EXCLUSIVE = 1 << 56;
        /// Bit 57: uffd-wp write-protected.
        const UFFD_WP = 1 << 57;
        /// Bit 58: guard region.
        const GUARD = 1 << 58;
        /// Bit 61: file page or shared anonymous.
        const FILE = 1 << 61;
        /// Bit 62: swap entry (or PTE marker, migration entry).
        const SWAP = 1 << 62;
        /// Bit 63: present.
        const PRESENT = 1 << 63;
    }
}

/// One pagemap entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PagemapEntry(pub u64);

const PFN_MASK: u64 = (1 << 55) - 1;

/// What a non-present, non-none entry is, decoded from its swap type (root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapEntryKind {
    /// A PTE marker (`SWP_PTE_MARKER`) with its marker bits.
    Marker(MarkerBits),
    /// Some other type: a real swap device, or migration/hwpoison/device.
    Typed {
        /// Swap type.
        ty: u8,
        /// Offset in pages.
        offset: u64,
    },
}

bitflags! {
    /// PTE marker bits (`include/linux/swapops.h`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MarkerBits: u64 {
        /// `PTE_MARKER_UFFD_WP`.
        const UFFD_WP = 1 << 0;
        /// `PTE_MARKER_POISONED`.
        const POISONED = 1 << 1;
        /// `PTE_MARKER_GUARD`.
        const GUARD = 1 << 2;
    }
}

impl PagemapEntry {
    /// The flag bits.
    pub fn flags(self) -> PagemapFlags {
        PagemapFlags::from_bits_truncate(self.0)
    }

    /// Bit 63.
    pub fn is_present(self) -> bool {
        self.0 & PagemapFlags::PRESENT.bits() != 0
    }

    /// Bit 62.
    pub fn is_swap(self) -> bool {
        self.0 & PagemapFlags::SWAP.bits() != 0 && !self.is_present()
    }

    /// Neither present nor swap: `pte_none` or no page table.
    pub fn is_none(self) -> bool {
        self.0 & (PagemapFlags::PRESENT.bits() | PagemapFlags::SWAP.bits()) == 0
    }

    /// The PFN of a present page; `None` if not present or hidden (0).
    pub fn pfn(self) -> Option<u64> {
        let pfn = self.0 & PFN_MASK;
        (self.is_present() && pfn != 0).then_some(pfn)
    }

    /// The raw type/offset of a swap entry (both 0 when hidden from
    /// unprivileged readers).
    pub fn swap_raw(self) -> (u8, u64) {
        let v = self.0 & PFN_MASK;
        ((v & 0x1f) as u8, v >> 5)
    }

    /// Decodes a swap entry's type as root sees it; `None` when the type and
    /// offset are hidden (all zero bits with no way to know).
    pub fn swap_kind(self, privileged: bool) -> Option<SwapEntryKind> {
        if !self.is_swap() || !privileged {
            return None;
        }
        let (ty, offset) = self.swap_raw();
        Some(if ty == PTE_MARKER_TYPE {
            SwapEntryKind::Marker(MarkerBits::from_bits_retain(offset))
        } else {
            SwapEntryKind::Typed { ty, offset }
        })
    }
}

impl std::fmt::Debug for PagemapEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PagemapEntry({:#018x} {:?})", self.0, self.flags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_markers_and_swap() {
        // uffd-wp marker as root: SWAP|UFFD_WP, type 31, offset 1.
        let wp_marker = PagemapEntry((1 << 62) | (1 << 57) | (1 << 5) | 31);
        assert!(wp_marker.is_swap());
        assert_eq!(
            wp_marker.swap_kind(true),
            Some(SwapEntryKind::Marker(MarkerBits::UFFD_WP))
        );
        assert_eq!(wp_marker.swap_kind(false), None);
        let guard = PagemapEntry((1 << 62) | (1 << 58) | (4 << 5) | 31);
        assert_eq!(
            guard.swap_kind(true),
            Some(SwapEntryKind::Marker(MarkerBits::GUARD))
        );
        let real = PagemapEntry((1 << 62) | (0x200 << 5) | 1);
        assert_eq!(
            real.swap_kind(true),
            Some(SwapEntryKind::Typed {
                ty: 1,
                offset: 0x200
            })
        );
        let present = PagemapEntry((1 << 63) | (1 << 56) | 0x3b34);
        assert_eq!(present.pfn(), Some(0x3b34));
        assert!(present.flags().contains(PagemapFlags::EXCLUSIVE));
        assert!(PagemapEntry(0).is_none());
    }
}
