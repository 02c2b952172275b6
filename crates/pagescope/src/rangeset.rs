//! [`RangeSet`]: a sorted set of disjoint ranges, of addresses
//! ([`VirtRange`], the default) or of page indices ([`PageSpan`]).

use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};

/// A half-open interval a [`RangeSet`] can hold.
pub trait Interval: Copy + Eq {
    /// The points the interval is made of.
    type Point: Copy + Ord;

    /// First point.
    fn lo(&self) -> Self::Point;
    /// First point after the interval.
    fn hi(&self) -> Self::Point;
    /// `lo..hi`, `None` if `hi < lo`.
    fn between(lo: Self::Point, hi: Self::Point) -> Option<Self>;
}

impl Interval for VirtRange {
    type Point = VirtAddr;

    fn lo(&self) -> VirtAddr {
        self.start()
    }
    fn hi(&self) -> VirtAddr {
        self.end()
    }
    fn between(lo: VirtAddr, hi: VirtAddr) -> Option<Self> {
        VirtRange::new(lo, hi)
    }
}

impl Interval for PageSpan {
    type Point = u64;

    fn lo(&self) -> u64 {
        self.start()
    }
    fn hi(&self) -> u64 {
        self.end()
    }
    fn between(lo: u64, hi: u64) -> Option<Self> {
        PageSpan::new(lo, hi)
    }
}

/// Disjoint, sorted, non-adjacent intervals (adjacent ones merge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet<R = VirtRange> {
    ranges: Vec<R>,
}

impl<R> Default for RangeSet<R> {
    fn default() -> Self {
        Self { ranges: Vec::new() }
    }
}

impl<R: Interval> RangeSet<R> {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The intervals, sorted.
    pub fn ranges(&self) -> &[R] {
        &self.ranges
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `r` (merging overlaps and neighbours).
    pub fn insert(&mut self, r: R) {
        if r.lo() >= r.hi() {
            return;
        }
        let i = self.ranges.partition_point(|x| x.hi() < r.lo());
        let mut lo = r.lo();
        let mut hi = r.hi();
        let mut j = i;
        while j < self.ranges.len() && self.ranges[j].lo() <= hi {
            lo = lo.min(self.ranges[j].lo());
            hi = hi.max(self.ranges[j].hi());
            j += 1;
        }
        let merged = R::between(lo, hi).unwrap_or(r);
        self.ranges.splice(i..j, std::iter::once(merged));
    }

    /// Adds every interval of `other`.
    pub fn extend(&mut self, other: impl IntoIterator<Item = R>) {
        for r in other {
            self.insert(r);
        }
    }

    /// The parts of `r` inside the set.
    pub fn intersect(&self, r: R) -> Vec<R> {
        let i = self.ranges.partition_point(|x| x.hi() <= r.lo());
        self.ranges[i..]
            .iter()
            .take_while(|x| x.lo() < r.hi())
            .filter_map(|x| R::between(x.lo().max(r.lo()), x.hi().min(r.hi())))
            .filter(|x| x.lo() < x.hi())
            .collect()
    }

    /// The parts of `r` outside the set.
    pub fn subtract_from(&self, r: R) -> Vec<R> {
        let mut out = Vec::new();
        let mut at = r.lo();
        for x in self.intersect(r) {
            if at < x.lo() {
                out.extend(R::between(at, x.lo()));
            }
            at = x.hi();
        }
        if at < r.hi() {
            out.extend(R::between(at, r.hi()));
        }
        out
    }

    /// Whether `p` is in the set.
    pub fn contains(&self, p: R::Point) -> bool {
        let i = self.ranges.partition_point(|x| x.hi() <= p);
        self.ranges
            .get(i)
            .is_some_and(|x| x.lo() <= p && p < x.hi())
    }
}

impl RangeSet<VirtRange> {
    /// Total pages.
    pub fn pages(&self, page: PageSize) -> u64 {
        self.ranges.iter().map(|r| r.pages(page)).sum()
    }
}

impl RangeSet<PageSpan> {
    /// Total pages.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(PageSpan::count).sum()
    }
}

impl<R: Interval> FromIterator<R> for RangeSet<R> {
    fn from_iter<T: IntoIterator<Item = R>>(iter: T) -> Self {
        let mut s = Self::new();
        s.extend(iter);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> VirtRange {
        VirtRange::new(VirtAddr::new(a), VirtAddr::new(b)).unwrap()
    }

    #[test]
    fn merges_and_subtracts() {
        let mut s = RangeSet::new();
        s.insert(r(0x3000, 0x5000));
        s.insert(r(0x1000, 0x2000));
        s.insert(r(0x2000, 0x3000));
        assert_eq!(s.ranges(), &[r(0x1000, 0x5000)]);
        s.insert(r(0x8000, 0x9000));
        assert_eq!(
            s.subtract_from(r(0, 0xa000)),
            vec![r(0, 0x1000), r(0x5000, 0x8000), r(0x9000, 0xa000)]
        );
        assert_eq!(
            s.intersect(r(0x4000, 0x8800)),
            vec![r(0x4000, 0x5000), r(0x8000, 0x8800)]
        );
        assert!(s.contains(VirtAddr::new(0x8fff)) && !s.contains(VirtAddr::new(0x9000)));
        assert_eq!(s.pages(PageSize::new(4096).unwrap()), 5);
    }

    #[test]
    fn page_spans_merge_the_same_way() {
        let p = |a, b| PageSpan::new(a, b).unwrap();
        let s: RangeSet<PageSpan> = [p(4, 8), p(0, 2), p(2, 3), p(8, 9)].into_iter().collect();
        assert_eq!(s.ranges(), &[p(0, 3), p(4, 9)]);
        assert_eq!(s.count(), 8);
        assert_eq!(s.intersect(p(2, 5)), vec![p(2, 3), p(4, 5)]);
        assert_eq!(s.subtract_from(p(0, 10)), vec![p(3, 4), p(9, 10)]);
        assert!(s.contains(8) && !s.contains(3));
    }
}
