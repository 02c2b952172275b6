//! Choosing, stretch by stretch, between walking with `PAGEMAP_SCAN` and
//! reading pagemap directly.
//!
//! The exclusive bit (`PM_MMAP_EXCLUSIVE`) exists only in pagemap entries,
//! so every populated page's entry must be read. Where most 2 MiB blocks
//! hold pages, the ioctl walk in front of those reads costs as much as the
//! reads themselves and finds nothing the entries do not say; there one
//! large read per step is cheaper. Where blocks are mostly empty, the walk
//! skips them at almost no cost and the reads go only where pages are.
//! [`StepPlan`] cuts a VMA into steps and picks the cheaper way for each
//! from what the previous step saw.
//!
//! Entries cannot tell everything the walk can: a PMD-mapped THP looks like
//! 512 present entries, and without PFNs (unprivileged) the zero page looks
//! like a COW-shared page. [`needs_walk`] finds the blocks where that
//! could be the case; those are walked with the ioctl anyway, so the result
//! is the same page for page whichever way a block was read.

use super::entries::PresentRules;
use super::{ScanContext, ScanStrategy};
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::pagemap::{PagemapEntry, PagemapFlags};

/// Pages in a PMD (2 MiB / 4 KiB).
/// Pages per direct-read step (32 MiB of address space, 64 KiB of entries).
const READ_STEP_PAGES: u64 = 8 * 1024;
/// First walk step, in pages; doubled while walks find nothing.
const MIN_WALK_STEP_PAGES: u64 = 8 * 1024;
/// Largest walk step, in pages (1 GiB).
const MAX_WALK_STEP_PAGES: u64 = 256 * 1024;

/// The steps over one VMA range and how each is scanned.
#[derive(Debug)]
pub(super) struct StepPlan {
    range: VirtRange,
    next: VirtAddr,
    page: PageSize,
    strategy: ScanStrategy,
    reading: bool,
    walk_step_pages: u64,
}

impl StepPlan {
    /// Steps over `range`: with [`ScanStrategy::Walk`] the whole range is
    /// one walk, with [`ScanStrategy::Read`] every step is read.
    pub(super) fn new(range: VirtRange, page: PageSize, strategy: ScanStrategy) -> Self {
        Self {
            range,
            next: range.start(),
            page,
            strategy,
            reading: strategy == ScanStrategy::Read,
            walk_step_pages: MIN_WALK_STEP_PAGES,
        }
    }

    /// Whether the current step is read directly (else walked).
    pub(super) fn reading(&self) -> bool {
        self.reading
    }

    /// The next step, ending on a 2 MiB boundary (or the range's end).
    pub(super) fn next_step(&mut self) -> Option<VirtRange> {
        if self.next >= self.range.end() {
            return None;
        }
        let end = if self.strategy != ScanStrategy::Walk {
            let pages = if self.reading {
                READ_STEP_PAGES
            } else {
                self.walk_step_pages
            };
            let end = self
                .next
                .saturating_add(self.page.bytes(pages))
                .align_down(self.page.pmd().get());
            if end <= self.next {
                self.range.end()
            } else {
                end.min(self.range.end())
            }
        } else {
            self.range.end()
        };
        let step = VirtRange::new(self.next, end)?;
        self.next = end;
        Some(step)
    }

    /// Picks the way for the next step from what `step` held: read
    /// directly where at least half the blocks hold pages and at most half
    /// of those would need the walk anyway; walk otherwise, in growing
    /// steps while nothing is found.
    pub(super) fn observe(&mut self, step: VirtRange, seen: BlockCounts) {
        if self.strategy != ScanStrategy::Adaptive {
            return;
        }
        let blocks = blocks_spanned(step, self.page);
        self.reading = seen.populated * 2 >= blocks && seen.walked * 2 < seen.populated;
        self.walk_step_pages = if seen.populated == 0 {
            (self.walk_step_pages * 2).min(MAX_WALK_STEP_PAGES)
        } else {
            MIN_WALK_STEP_PAGES
        };
    }
}

/// How many 2 MiB blocks of a step held pages, and how many of those could
/// only be told apart by the ioctl.
#[derive(Debug)]
pub(super) struct BlockCounts {
    block_bytes: u64,
    populated: u64,
    walked: u64,
    last_populated: Option<u64>,
    last_walked: Option<u64>,
}

impl BlockCounts {
    /// No blocks yet.
    pub(super) fn new(page: PageSize) -> Self {
        Self {
            block_bytes: page.pmd().get(),
            populated: 0,
            walked: 0,
            last_populated: None,
            last_walked: None,
        }
    }

    /// Counts the blocks `r` touches (each block once, ranges come in
    /// address order); `walk` when they need the ioctl.
    pub(super) fn add(&mut self, r: VirtRange, walk: bool) {
        if r.is_empty() {
            return;
        }
        let first = r.start().get() / self.block_bytes;
        let last = (r.end().get() - 1) / self.block_bytes;
        self.populated += count_new(&mut self.last_populated, first, last);
        if walk {
            self.walked += count_new(&mut self.last_walked, first, last);
        }
    }
}

/// Blocks `first..=last` not counted yet, given the last one counted.
fn count_new(last_counted: &mut Option<u64>, first: u64, last: u64) -> u64 {
    let from = match *last_counted {
        Some(l) if l >= first => l + 1,
        _ => first,
    };
    *last_counted = Some(last_counted.map_or(last, |l| l.max(last)));
    if last >= from { last - from + 1 } else { 0 }
}

/// 2 MiB blocks that `r` touches.
fn blocks_spanned(r: VirtRange, page: PageSize) -> u64 {
    let bytes = page.pmd().get();
    if r.is_empty() {
        return 0;
    }
    (r.end().get() - 1) / bytes - r.start().get() / bytes + 1
}

/// `step` cut at 2 MiB boundaries, each piece with its entries from `raw`
/// (the entries of the whole step).
pub(super) fn blocks<'a>(
    step: VirtRange,
    page: PageSize,
    raw: &'a [u64],
) -> impl Iterator<Item = (VirtRange, &'a [u64])> + 'a {
    let block = page.pmd().get();
    let mut at = step.start();
    let mut used = 0usize;
    std::iter::from_fn(move || {
        if at >= step.end() {
            return None;
        }
        let end = at.saturating_add(1).align_up(block).min(step.end());
        let r = VirtRange::new(at, end)?;
        let n = usize::try_from(r.pages(page)).ok()?;
        let entries = raw.get(used..used + n)?;
        used += n;
        at = end;
        Some((r, entries))
    })
}

/// Whether the entries of one block (at `addr`, within one 2 MiB-aligned
/// block) leave open what only the ioctl can tell: a PMD-mapping (all
/// present and, as far as PFNs show, one aligned contiguous folio) or a
/// zero page that PFNs cannot reveal.
pub(super) fn needs_walk(
    ctx: &ScanContext<'_>,
    rules: &PresentRules,
    addr: VirtAddr,
    entries: &[u64],
) -> bool {
    let present = |r: &u64| PagemapEntry(*r).is_present();
    if entries.iter().all(present) && may_be_pmd_mapped(ctx, addr, entries) {
        return true;
    }
    rules.zero_needs_walk()
        && entries.iter().any(|&r| {
            let e = PagemapEntry(r);
            e.is_present()
                && !e
                    .flags()
                    .intersects(PagemapFlags::EXCLUSIVE | PagemapFlags::FILE)
        })
}

/// All-present entries that one PMD could map: without PFNs, any; with
/// them, an aligned physically contiguous run.
fn may_be_pmd_mapped(ctx: &ScanContext<'_>, addr: VirtAddr, entries: &[u64]) -> bool {
    let Some(head) = entries.first().and_then(|&r| PagemapEntry(r).pfn()) else {
        return true;
    };
    let pmd_pages = ctx.page.pages_per_pmd();
    let offset = addr.page_index(ctx.page) % pmd_pages;
    head % pmd_pages == offset
        && entries
            .iter()
            .enumerate()
            .all(|(j, &r)| PagemapEntry(r).pfn() == Some(head + j as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;

    fn range(start: u64, end: u64) -> VirtRange {
        VirtRange::new(VirtAddr::new(start), VirtAddr::new(end)).unwrap()
    }

    #[test]
    fn counts_each_block_once() {
        let mut c = BlockCounts::new(PageSize::new(PAGE).unwrap());
        c.add(range(0, PAGE), false);
        c.add(range(PAGE * 3, PAGE * 4), true);
        c.add(range(MIB, 5 * MIB), false);
        c.add(range(5 * MIB, 5 * MIB + PAGE), true);
        assert_eq!(c.populated, 3);
        assert_eq!(c.walked, 2);
    }

    #[test]
    fn steps_end_on_pmd_boundaries_and_grow_while_empty() {
        let page = PageSize::new(PAGE).unwrap();
        let mut plan = StepPlan::new(range(MIB, 4096 * MIB), page, ScanStrategy::Adaptive);
        let first = plan.next_step().unwrap();
        assert_eq!(first, range(MIB, 32 * MIB));
        plan.observe(first, BlockCounts::new(page));
        let second = plan.next_step().unwrap();
        assert_eq!(second.len(), 64 * MIB);
        let mut dense = BlockCounts::new(page);
        dense.add(second, false);
        plan.observe(second, dense);
        assert!(plan.reading());
        assert_eq!(plan.next_step().unwrap().len(), 32 * MIB);
        let mut whole = StepPlan::new(range(MIB, 4096 * MIB), page, ScanStrategy::Walk);
        assert_eq!(whole.next_step(), Some(range(MIB, 4096 * MIB)));
        assert_eq!(whole.next_step(), None);
    }

    #[test]
    fn blocks_split_at_pmd_boundaries() {
        let page = PageSize::new(PAGE).unwrap();
        let step = range(MIB, 5 * MIB);
        let raw: Vec<u64> = (0..step.pages(page)).collect();
        let got: Vec<_> = blocks(step, page, &raw)
            .map(|(r, e)| (r, e.len(), e[0]))
            .collect();
        assert_eq!(
            got,
            vec![
                (range(MIB, 2 * MIB), 256, 0),
                (range(2 * MIB, 4 * MIB), 512, 256),
                (range(4 * MIB, 5 * MIB), 256, 768),
            ]
        );
    }
}
