//! Settling swap-type entries without CAP_SYS_ADMIN.
//!
//! Unprivileged pagemap readers see bit 62 but a zeroed swap type, so a
//! uffd-wp PTE marker on an empty slot reads exactly like a write-protected
//! page that was swapped out, and a poison marker or migration entry like a
//! plain swap entry. Per VMA, smaps settles most of it:
//!
//! * a shared mapping has no anonymous pages, so its swap-type PTEs are
//!   markers (bit 57 set: uffd-wp) or transient migration entries;
//! * in a private anonymous or private file mapping, smaps' `Swap:` counts
//!   exactly the real swap entries. If it equals the unmarked entries, the
//!   write-protected ones are markers; if it equals all of them, they are
//!   all real swap. Anything else stays `unknown`: never a guess.
//! * VmFlags: without `uw` no entry can carry a uffd-wp marker; with `gu`
//!   and no swap at all in the VMA, unmarked entries are guard markers
//!   (kernels 6.13/6.14 have guard regions but no pagemap bit 58).
//! * in a private view of shmem, `Swap:` also counts the object's swap
//!   under empty PTEs; once the object was classified (those pages are the
//!   only `swapped`/`swapcache` runs so far) it is subtracted first.

use crate::addr::PageSize;
use crate::page::{PageFlags, PageInfo, PageRun, PageState, RunBuilder, UnknownReason};
use crate::proc::smaps::VmFlags;
use crate::vma::{Backing, Vma};

/// Rewrites provisional unknown swap runs of `vma` where smaps settles them.
pub fn resolve(
    vma: &Vma,
    runs: Vec<PageRun>,
    page: PageSize,
    swap_detail: bool,
    object_known: bool,
) -> Vec<PageRun> {
    let count = |reason| {
        runs.iter()
            .filter(|r| r.reason == Some(reason))
            .map(|r| r.pages)
            .sum::<u64>()
    };
    let unmarked = count(UnknownReason::UnconfirmedSwap);
    let marked = count(UnknownReason::MarkerOrSwap);
    if unmarked + marked == 0 {
        return runs;
    }
    let object_swap = runs
        .iter()
        .filter(|r| matches!(r.state, PageState::Swapped | PageState::SwapCache))
        .map(|r| r.pages)
        .sum::<u64>();
    let Some(verdict) = verdict(
        vma,
        unmarked,
        marked,
        page,
        object_known.then_some(object_swap),
    ) else {
        return runs;
    };
    let mut out = RunBuilder::new(page, swap_detail);
    for r in &runs {
        let info = match r.reason {
            Some(UnknownReason::UnconfirmedSwap) => verdict.unmarked,
            Some(UnknownReason::MarkerOrSwap) => verdict.marked,
            _ => None,
        };
        let info = info.map_or(
            PageInfo {
                state: r.state,
                flags: r.flags,
                swap: r.swap,
                reason: r.reason,
            },
            |state| settled(state, r.flags),
        );
        out.push(r.start, r.pages, info);
    }
    out.finish()
}

/// What the unmarked and the uffd-wp-marked swap-type entries are.
struct Verdict {
    unmarked: Option<PageState>,
    marked: Option<PageState>,
}

fn verdict(
    vma: &Vma,
    unmarked: u64,
    marked: u64,
    page: PageSize,
    object_swap: Option<u64>,
) -> Option<Verdict> {
    if vma.is_shared() {
        return Some(Verdict {
            unmarked: None,
            marked: Some(PageState::Hole),
        });
    }
    let smaps = vma.smaps_swap_kb? * 1024 / page.get();
    let guard_vma = vma.vm_flags.is_some_and(|f| f.contains(VmFlags::GUARD));
    if smaps == 0 && guard_vma && vma.backing == Backing::Anon {
        return Some(Verdict {
            unmarked: Some(PageState::Guard),
            marked: Some(PageState::Hole),
        });
    }
    let swapped = match vma.backing {
        Backing::Anon | Backing::File => smaps,
        Backing::Shmem => smaps.checked_sub(object_swap?)?,
        _ => return None,
    };
    if swapped == unmarked {
        Some(Verdict {
            unmarked: Some(PageState::Swapped),
            marked: Some(PageState::Hole),
        })
    } else if swapped == unmarked + marked {
        Some(Verdict {
            unmarked: Some(PageState::Swapped),
            marked: Some(PageState::Swapped),
        })
    } else {
        None
    }
}

fn settled(state: PageState, flags: PageFlags) -> PageInfo {
    // A guard marker carries no other flag.
    if state == PageState::Guard {
        return PageInfo::of(state);
    }
    PageInfo::with(state, flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::maps::parse_line;
    use crate::vma::MountTable;

    fn vma(swap_kb: u64, flags: VmFlags) -> Vma {
        let e = parse_line(b"1000-9000 rw-p 00000000 00:00 0").unwrap();
        let mut v = Vma::classify(&e, &MountTable::default(), Some(flags));
        v.smaps_swap_kb = Some(swap_kb);
        v
    }

    fn run(start: u64, pages: u64, reason: UnknownReason, flags: PageFlags) -> PageRun {
        PageRun {
            start: crate::addr::VirtAddr::new(start),
            pages,
            state: PageState::Unknown,
            flags,
            swap: None,
            reason: Some(reason),
        }
    }

    #[test]
    fn smaps_counts_settle_markers_and_swap() {
        let page = PageSize::new(4096).unwrap();
        let runs = vec![
            run(
                0x1000,
                2,
                UnknownReason::UnconfirmedSwap,
                PageFlags::empty(),
            ),
            run(0x3000, 3, UnknownReason::MarkerOrSwap, PageFlags::UFFD_WP),
        ];
        // Swap: 8 kB = the two unmarked entries: the marked ones are markers.
        let out = resolve(&vma(8, VmFlags::UFFD_WP), runs.clone(), page, false, false);
        assert_eq!(out[0].state, PageState::Swapped);
        assert_eq!(
            (out[1].state, out[1].flags),
            (PageState::Hole, PageFlags::UFFD_WP)
        );
        // Swap: 20 kB = all five: all real, write-protected swap.
        let out = resolve(&vma(20, VmFlags::UFFD_WP), runs.clone(), page, false, false);
        assert_eq!(
            (out[1].state, out[1].flags),
            (PageState::Swapped, PageFlags::UFFD_WP)
        );
        // Anything else stays unknown.
        let out = resolve(&vma(12, VmFlags::UFFD_WP), runs.clone(), page, false, false);
        assert!(out.iter().all(|r| r.state == PageState::Unknown));
        // A guard VMA without swap: the unmarked entries are guard markers.
        let out = resolve(
            &vma(0, VmFlags::GUARD),
            runs[..1].to_vec(),
            page,
            false,
            false,
        );
        assert_eq!(out[0].state, PageState::Guard);
    }
}
