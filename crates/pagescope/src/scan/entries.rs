//! Reading raw pagemap entries of one VMA: runs of holes, runs of present
//! pages with equal flags, swap entries, and PMD-mapped THP blocks (by
//! PFN and `/proc/kpageflags`). Both backends use it, for the entries
//! they read.

use super::ScanContext;
use super::classify;
use crate::addr::VirtAddr;
use crate::page::{PageInfo, RunBuilder, UnknownReason};
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::vma::{Backing, Vma};

/// Bits 55..=63 of a pagemap entry: everything but the PFN/swap field.
pub(super) const FLAG_BITS: u64 = !((1 << 55) - 1);

/// How present entries of one VMA are read.
pub(super) struct PresentRules {
    anon_private: bool,
    hugetlb: bool,
    privileged: bool,
    zero_pfn: Option<u64>,
}

impl PresentRules {
    pub(super) fn new(ctx: &ScanContext<'_>, vma: &Vma) -> Self {
        Self {
            anon_private: vma.backing == Backing::Anon && !vma.is_shared(),
            hugetlb: vma.backing == Backing::Hugetlb,
            privileged: ctx.privileged,
            zero_pfn: ctx.caps.zero_pfn,
        }
    }

    /// Whether a present, non-exclusive entry of this VMA could be the
    /// zero page without its PFN saying so (private anonymous memory read
    /// without PFNs, or before the zero PFN is known).
    pub(super) fn zero_needs_walk(&self) -> bool {
        self.anon_private && (!self.privileged || self.zero_pfn.is_none())
    }

    /// A present entry; `in_thp` when it lies in a detected THP block.
    fn present(&self, e: PagemapEntry, in_thp: bool) -> PageInfo {
        let f = e.flags();
        if self.hugetlb {
            return classify::present(e, false, true);
        }
        // Only the huge zero page carries PM_FILE in a private anon VMA.
        if self.anon_private && f.contains(PagemapFlags::FILE) {
            return classify::present(e, true, true);
        }
        if self.zero_pfn.is_some() && e.pfn() == self.zero_pfn {
            return classify::present(e, true, false);
        }
        if !self.privileged
            && self.anon_private
            && !f.intersects(PagemapFlags::EXCLUSIVE | PagemapFlags::FILE)
        {
            let flags = classify::present(e, true, false).flags;
            return PageInfo::unknown(UnknownReason::ZeroOrShared, flags);
        }
        classify::present(e, false, in_thp)
    }
}

/// Classifies one batch of raw entries starting at `addr`.
pub(super) fn classify_batch(
    ctx: &ScanContext<'_>,
    rules: &PresentRules,
    addr: VirtAddr,
    raw: &[u64],
    out: &mut RunBuilder,
) {
    let page = ctx.page.get();
    let at = |i: usize| addr.saturating_add(i as u64 * page);
    let mut i = 0;
    while i < raw.len() {
        let e = PagemapEntry(raw[i]);
        if e.is_none() {
            let n = none_run(&raw[i..]);
            out.push(at(i), n as u64, PageInfo::HOLE);
            i += n;
            continue;
        }
        let pmd_pages = usize::try_from(ctx.page.pages_per_pmd()).unwrap_or(usize::MAX);
        if rules.anon_private && e.is_present() && at(i).is_aligned(ctx.page.pmd().get()) {
            if let Some(block) = raw.get(i..i + pmd_pages).filter(|b| is_thp_block(ctx, b)) {
                for (j, &r) in block.iter().enumerate() {
                    out.push(at(i + j), 1, rules.present(PagemapEntry(r), true));
                }
                i += pmd_pages;
                continue;
            }
        }
        if e.is_present() {
            let n = present_run(rules, ctx, &raw[i..], at(i));
            out.push(at(i), n as u64, rules.present(e, false));
            i += n;
        } else {
            out.push(at(i), 1, classify::swap(e, ctx.privileged, &ctx.caps.swaps));
            i += 1;
        }
    }
}

/// Length of the leading run of entries that are neither present nor swap
/// (eight at a time: sparse memory is mostly such runs).
pub(super) fn none_run(raw: &[u64]) -> usize {
    const POPULATED: u64 = PagemapFlags::PRESENT.bits() | PagemapFlags::SWAP.bits();
    let mut n = 0;
    for chunk in raw.chunks_exact(8) {
        if chunk.iter().fold(0, |acc, &r| acc | r) & POPULATED != 0 {
            break;
        }
        n += 8;
    }
    n + raw[n..].iter().take_while(|&&r| r & POPULATED == 0).count()
}

/// How many entries from the start of `raw` (at `addr`) classify exactly
/// like the first: equal flag bits, equally (not) the zero page, and not
/// crossing a 2 MiB boundary where a THP block check must happen.
fn present_run(rules: &PresentRules, ctx: &ScanContext<'_>, raw: &[u64], addr: VirtAddr) -> usize {
    let key = raw[0] & FLAG_BITS;
    let is_zero = |r: u64| rules.zero_pfn.is_some() && PagemapEntry(r).pfn() == rules.zero_pfn;
    let zero = is_zero(raw[0]);
    let page = ctx.page.get();
    let first_page = addr.get() / page;
    let thp_checks = rules.anon_private && ctx.kpageflags.is_some();
    let mut n = 1;
    while n < raw.len() {
        let r = raw[n];
        let aligned = (first_page + n as u64).is_multiple_of(ctx.page.pages_per_pmd());
        if r & FLAG_BITS != key || is_zero(r) != zero || (thp_checks && aligned) {
            break;
        }
        n += 1;
    }
    n
}

/// 512 present entries mapping one aligned, physically contiguous THP.
fn is_thp_block(ctx: &ScanContext<'_>, block: &[u64]) -> bool {
    let Some(kpf) = ctx.kpageflags else {
        return false;
    };
    let Some(head) = PagemapEntry(block[0]).pfn() else {
        return false;
    };
    if !head.is_multiple_of(ctx.page.pages_per_pmd()) || Some(head) == ctx.caps.zero_pfn {
        return false;
    }
    let contiguous = block
        .iter()
        .enumerate()
        .all(|(j, &r)| PagemapEntry(r).pfn() == Some(head + j as u64));
    contiguous && kpf.is_thp_head(head)
}

#[cfg(test)]
mod tests {
    use super::none_run;

    #[test]
    fn none_run_stops_at_the_first_present_or_swap_entry() {
        let mut raw = vec![0u64; 40];
        assert_eq!(none_run(&raw), 40);
        raw[19] = 1 << 62;
        assert_eq!(none_run(&raw), 19);
        raw[3] = (1 << 63) | 5;
        assert_eq!(none_run(&raw), 3);
        // Other bits (soft-dirty, exclusive) do not make an entry populated.
        assert_eq!(none_run(&[1 << 55, 1 << 56, 1 << 63]), 2);
        assert_eq!(none_run(&[]), 0);
    }
}
