//! [`RangeSet`]: a sorted set of disjoint address ranges.

use crate::addr::{PageSize, VirtAddr, VirtRange};

/// Disjoint, sorted, non-adjacent [`VirtRange`]s (adjacent ones merge).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<VirtRange>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[VirtRange] {
        &self.ranges
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `r` (merging overlaps and neighbours).
    pub fn insert(&mut self, r: VirtRange) {
        if r.is_empty() {
            return;
        }
        let i = self.ranges.partition_point(|x| x.end() < r.start());
        let mut start = r.start();
        let mut end = r.end();
        let mut j = i;
        while j < self.ranges.len() && self.ranges[j].start() <= end {
            start = start.min(self.ranges[j].start());
            end = end.max(self.ranges[j].end());
            j += 1;
        }
        let merged = VirtRange::new(start, end).unwrap_or(r);
        self.ranges.splice(i..j, std::iter::once(merged));
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: impl IntoIterator<Item = VirtRange>) {
        for r in other {
            self.insert(r);
        }
    }

    /// The parts of `r` inside the set.
    pub fn intersect(&self, r: VirtRange) -> Vec<VirtRange> {
        let i = self.ranges.partition_point(|x| x.end() <= r.start());
        self.ranges[i..]
            .iter()
            .take_while(|x| x.start() < r.end())
            .filter_map(|x| x.intersect(&r))
            .collect()
    }

    /// The parts of `r` outside the set.
    pub fn subtract_from(&self, r: VirtRange) -> Vec<VirtRange> {
        let mut out = Vec::new();
        let mut at = r.start();
        for x in self.intersect(r) {
            if at < x.start() {
                out.extend(VirtRange::new(at, x.start()));
            }
            at = x.end();
        }
        if at < r.end() {
            out.extend(VirtRange::new(at, r.end()));
        }
        out
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: VirtAddr) -> bool {
        let i = self.ranges.partition_point(|x| x.end() <= addr);
        self.ranges.get(i).is_some_and(|x| x.contains(addr))
    }

    /// Total pages.
    pub fn pages(&self, page: PageSize) -> u64 {
        self.ranges.iter().map(|r| r.pages(page)).sum()
    }
}

impl FromIterator<VirtRange> for RangeSet {
    fn from_iter<T: IntoIterator<Item = VirtRange>>(iter: T) -> Self {
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
}
