//! Address newtypes: [`VirtAddr`], [`VirtRange`] and [`PageSize`].
//!
//! Arithmetic goes through named, checked methods; there are deliberately no
//! `Add`/`Sub` operators, so a byte count can never be mistaken for a page
//! count (the same rule as `vm-memory`'s `GuestAddress`).

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A virtual address in some process's address space.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(u64);

impl VirtAddr {
    /// Wraps a raw address.
    pub const fn new(addr: u64) -> Self {
        Self(addr)
    }

    /// The raw address.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Self> {
        self.0.checked_add(bytes).map(Self)
    }

    /// `self + bytes`, saturating at the top of the address space.
    pub fn saturating_add(self, bytes: u64) -> Self {
        Self(self.0.saturating_add(bytes))
    }

    /// Bytes from `earlier` to `self`, or `None` if `earlier` is above `self`.
    pub fn checked_offset_from(self, earlier: VirtAddr) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Index of the page holding this address.
    pub const fn page_index(self, page: PageSize) -> u64 {
        self.0 / page.get()
    }

    /// Whether the address is a multiple of `align` bytes (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }

    /// Rounds down to a multiple of `align` bytes (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        Self(self.0 & !(align - 1))
    }

    /// Rounds up to a multiple of `align` bytes (a power of two), saturating.
    pub fn align_up(self, align: u64) -> Self {
        Self(self.0.saturating_add(align - 1) & !(align - 1))
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl Serialize for VirtAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for VirtAddr {
    type Err = ParseAddrError;

    /// Parses hex, with or without a `0x` prefix (as `/proc/PID/maps` and
    /// `pmap` print addresses).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        u64::from_str_radix(digits, 16)
            .map(Self)
            .map_err(|_| ParseAddrError(s.to_owned()))
    }
}

/// A string that is not a hex address or `START-END` range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a hex address or START-END range: {0:?}")]
pub struct ParseAddrError(pub String);

/// A half-open range of virtual addresses, `start..end`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl VirtRange {
    /// `start..end`; `None` if `end < start`.
    pub fn new(start: VirtAddr, end: VirtAddr) -> Option<Self> {
        (start <= end).then_some(Self { start, end })
    }

    /// `start..start+len`; `None` on overflow.
    pub fn from_start_len(start: VirtAddr, len: u64) -> Option<Self> {
        start.checked_add(len).map(|end| Self { start, end })
    }

    /// First address in the range.
    pub const fn start(&self) -> VirtAddr {
        self.start
    }

    /// First address after the range.
    pub const fn end(&self) -> VirtAddr {
        self.end
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Whether the range holds no bytes.
    pub const fn is_empty(&self) -> bool {
        self.end.0 == self.start.0
    }

    /// Number of pages the range spans (start and end are expected to be
    /// page aligned).
    pub const fn pages(&self, page: PageSize) -> u64 {
        self.len() / page.get()
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The overlap of two ranges, if it is not empty.
    pub fn intersect(&self, other: &VirtRange) -> Option<VirtRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(VirtRange { start, end })
    }

    /// Whether both ranges share at least one byte.
    pub fn overlaps(&self, other: &VirtRange) -> bool {
        self.intersect(other).is_some()
    }

    /// Whether the range starts and ends on `page` boundaries.
    pub const fn is_page_aligned(&self, page: PageSize) -> bool {
        self.start.is_aligned(page.get()) && self.end.is_aligned(page.get())
    }
}

impl fmt::Debug for VirtRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start.0, self.end.0)
    }
}

impl fmt::Display for VirtRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start.0, self.end.0)
    }
}

impl FromStr for VirtRange {
    type Err = ParseAddrError;

    /// Parses `START-END` in hex (the `/proc/PID/maps` form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseAddrError(s.to_owned());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let start: VirtAddr = a.trim().parse().map_err(|_| bad())?;
        let end: VirtAddr = b.trim().parse().map_err(|_| bad())?;
        VirtRange::new(start, end).ok_or_else(bad)
    }
}

/// A half-open range of page indices, `start..end`: pages of a backing
/// object (page offset = file offset / page size), or of anything else
/// counted in pages.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct PageSpan {
    start: u64,
    end: u64,
}

impl PageSpan {
    /// `start..end`; `None` if `end < start`.
    pub const fn new(start: u64, end: u64) -> Option<Self> {
        if start <= end {
            Some(Self { start, end })
        } else {
            None
        }
    }

    /// `start..start+count` (saturating at `u64::MAX`).
    pub const fn from_start_count(start: u64, count: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(count),
        }
    }

    /// First page.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// First page after the span.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// Number of pages.
    pub const fn count(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the span holds no page.
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether page `p` lies in the span.
    pub const fn contains(&self, p: u64) -> bool {
        self.start <= p && p < self.end
    }

    /// The overlap of two spans, if it is not empty.
    pub fn intersect(&self, other: &PageSpan) -> Option<PageSpan> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(PageSpan { start, end })
    }
}

impl fmt::Debug for PageSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pages {}..{}", self.start, self.end)
    }
}

impl fmt::Display for PageSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pages {}..{}", self.start, self.end)
    }
}

/// The base page size of the running kernel, in bytes (a power of two).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageSize(u64);

impl PageSize {
    /// The kernel's base page size (`sysconf(_SC_PAGESIZE)`).
    pub fn current() -> Self {
        Self(rustix::param::page_size() as u64)
    }

    /// A given page size; `None` unless a non-zero power of two.
    pub fn new(bytes: u64) -> Option<Self> {
        bytes.is_power_of_two().then_some(Self(bytes))
    }

    /// Bytes per page.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Bytes per page, as a buffer length.
    pub fn as_usize(self) -> usize {
        // A page size is a few KiB to a few MiB: it fits every usize.
        usize::try_from(self.0).unwrap_or(4096)
    }

    /// The size one page-middle-directory entry maps (a PMD-sized THP):
    /// a page-table page holds `page / 8` entries, so 2 MiB for 4 KiB
    /// pages, 32 MiB for 16 KiB, 512 MiB for 64 KiB.
    pub const fn pmd(self) -> Self {
        Self(self.0 / 8 * self.0)
    }

    /// Base pages in one PMD (512 for 4 KiB pages).
    pub const fn pages_per_pmd(self) -> u64 {
        self.0 / 8
    }

    /// Bytes in `pages` pages (saturating).
    pub const fn bytes(self, pages: u64) -> u64 {
        pages.saturating_mul(self.0)
    }
}

impl Serialize for PageSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_style_ranges() {
        let r: VirtRange = "7f12a0000000-7f12a0400000".parse().unwrap();
        assert_eq!(r.len(), 0x40_0000);
        assert_eq!(r.pages(PageSize::new(4096).unwrap()), 1024);
        let r: VirtRange = "0x1000-0x3000".parse().unwrap();
        assert_eq!(r.start().get(), 0x1000);
        assert!("3000-1000".parse::<VirtRange>().is_err());
        assert!("zz-1000".parse::<VirtRange>().is_err());
        let top: VirtRange = "ffffffffff600000-ffffffffff601000".parse().unwrap();
        assert_eq!(top.len(), 4096);
    }

    #[test]
    fn intersect_and_alignment() {
        let a = VirtRange::new(VirtAddr::new(0x1000), VirtAddr::new(0x5000)).unwrap();
        let b = VirtRange::new(VirtAddr::new(0x4000), VirtAddr::new(0x9000)).unwrap();
        assert_eq!(a.intersect(&b).unwrap().len(), 0x1000);
        let c = VirtRange::new(VirtAddr::new(0x5000), VirtAddr::new(0x6000)).unwrap();
        assert!(a.intersect(&c).is_none());
        assert_eq!(VirtAddr::new(0x1fff).align_down(0x1000).get(), 0x1000);
        assert_eq!(VirtAddr::new(0x1001).align_up(0x1000).get(), 0x2000);
        assert_eq!(VirtAddr::new(u64::MAX).align_up(0x1000).get(), !0xfff);
    }
}
