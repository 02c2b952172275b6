//! What a pass copies, decided from the models alone (no process, no
//! kernel interface): the pages of every mapping for the full pass, the
//! pages the tracker reports written for a pre-copy or the stopped pass,
//! every page of a mapping that is new or was replaced; and how the
//! models are carried over when a fresh scan (`/proc/PID/maps`) shows the
//! layout changed. The engine (`passes.rs`) resolves a [`Plan`]'s
//! [`ObjectScan`]s (`SEEK_DATA` on the object) and copies the rest.
//!
//! A plan is a value: a later pass could keep it and add to it instead of
//! planning again.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{VmaModel, pages_in};
use crate::addr::{PageSize, PageSpan};
use crate::image::format::PageKind;
use crate::proc::maps::MapsEntry;
use crate::rangeset::RangeSet;
use crate::vma::{Backing, ObjectId, Vma};

/// Own pages of one mapping to copy (read from the process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OwnPages {
    /// The process (index in the dump's processes).
    pub proc: usize,
    /// The mapping (index in that process's models).
    pub vma: usize,
    /// Page indices in the mapping, sorted.
    pub pages: Vec<u64>,
}

/// Object pages whose data extents (`SEEK_DATA`) are to be found and
/// copied: all of the object (`span` `None`), or what a new mapping shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ObjectScan {
    /// The object.
    pub id: ObjectId,
    /// Its pages to look at.
    pub span: Option<PageSpan>,
}

/// Pages to copy in one pass.
#[derive(Clone, Debug, Default)]
pub(super) struct Plan {
    /// Own pages, per mapping.
    pub own: Vec<OwnPages>,
    /// Object pages, per object (read with `pread` of the object).
    pub objects: BTreeMap<ObjectId, BTreeSet<u64>>,
    /// Object spans to look at before copying.
    pub scans: Vec<ObjectScan>,
}

impl Plan {
    /// Pages the plan copies (once its scans are resolved).
    pub fn pages(&self) -> u64 {
        let own: usize = self.own.iter().map(|o| o.pages.len()).sum();
        let obj: usize = self.objects.values().map(BTreeSet::len).sum();
        (own + obj) as u64
    }

    /// Adds object pages.
    pub fn add_object_pages(&mut self, id: ObjectId, pages: impl IntoIterator<Item = u64>) {
        self.objects.entry(id).or_default().extend(pages);
    }

    /// Adds the own pages of mapping `vma` of process `proc`.
    fn add_own(&mut self, proc: usize, vma: usize, pages: Vec<u64>) {
        self.own.push(OwnPages { proc, vma, pages });
    }
}

/// The key a mapping keeps across passes while it is the same mapping.
pub(super) fn same_mapping(a: &Vma, b: &Vma) -> bool {
    a.range == b.range && a.offset == b.offset && a.inode == b.inode && a.dev == b.dev
}

/// Whether `maps` still lists exactly the mappings modelled in `old`.
pub(super) fn same_layout(maps: &[MapsEntry], old: &[VmaModel]) -> bool {
    maps.len() == old.len()
        && maps.iter().zip(old).all(|(e, m)| {
            e.range == m.vma.range && e.offset == m.vma.offset && e.inode == m.vma.inode
        })
}

/// Whether a mapping was reported replaced (a new mapping at its place).
fn touched(m: &VmaModel, replaced: &RangeSet) -> bool {
    !replaced.intersect(m.vma.range).is_empty()
}

/// Whether the models `old` must be rebuilt from a fresh scan: the layout
/// in `maps` differs, or a mapping was replaced.
pub(super) fn needs_rebuild(maps: &[MapsEntry], old: &[VmaModel], replaced: &RangeSet) -> bool {
    !same_layout(maps, old) || old.iter().any(|m| touched(m, replaced))
}

/// Carries over into `fresh_scan` (models of a new scan) every model of
/// `old` that is still the same mapping and was not replaced; returns the
/// indices of the mappings that are new (all their pages must be copied).
pub(super) fn reconcile(
    mut old: Vec<VmaModel>,
    fresh_scan: &mut [VmaModel],
    replaced: &RangeSet,
) -> BTreeSet<usize> {
    let mut new = BTreeSet::new();
    for (k, m) in fresh_scan.iter_mut().enumerate() {
        let kept = old
            .iter()
            .position(|o| same_mapping(&o.vma, &m.vma) && !touched(o, replaced))
            .map(|at| old.swap_remove(at));
        match kept {
            Some(o) => *m = o,
            None => {
                new.insert(k);
            }
        }
    }
    new
}

/// The full pass of process `proc`: every own page of every mapping.
pub(super) fn plan_all(plan: &mut Plan, proc: usize, vmas: &[VmaModel]) {
    for (k, m) in vmas.iter().enumerate() {
        plan.add_own(proc, k, m.own_pages());
    }
}

/// Every page of every object in `ids`: the full pass.
pub(super) fn plan_objects(plan: &mut Plan, ids: impl IntoIterator<Item = ObjectId>) {
    plan.scans
        .extend(ids.into_iter().map(|id| ObjectScan { id, span: None }));
}

/// Adds to `plan` the pages of process `proc` (mappings `vmas`) that the
/// `written` ranges cover (own pages, or object pages for a shared object
/// mapping) and every page of the `new` mappings.
pub(super) fn plan_written(
    plan: &mut Plan,
    proc: usize,
    vmas: &[VmaModel],
    written: &RangeSet,
    new: &BTreeSet<usize>,
    page: PageSize,
) {
    for (k, m) in vmas.iter().enumerate() {
        if m.vma.backing == Backing::Special {
            continue;
        }
        let object = m.vma.object_id().filter(|_| m.is_object_view());
        if new.contains(&k) {
            if let Some(id) = object {
                let span = Some(m.vma.object_span(m.vma.range, page));
                plan.scans.push(ObjectScan { id, span });
            }
            plan.add_own(proc, k, m.own_pages());
            continue;
        }
        let parts = written.intersect(m.vma.range);
        if parts.is_empty() {
            continue;
        }
        if let Some(id) = object {
            let set = plan.objects.entry(id).or_default();
            for r in parts {
                let span = m.vma.object_span(r, page);
                set.extend(span.start()..span.end());
            }
            continue;
        }
        let pages = parts
            .into_iter()
            .flat_map(|r| pages_in(&m.vma, r, page))
            .collect();
        plan.add_own(proc, k, pages);
    }
}

/// The own pages of `m` a first pass copies when a tracker kept since the
/// parent image reports `since` written: those; the others are marked as
/// in the parent (the caller checked the parent has the same mapping).
pub(super) fn written_since_parent(m: &mut VmaModel, since: &RangeSet, page: PageSize) -> Vec<u64> {
    let written: RangeSet<PageSpan> = since
        .intersect(m.vma.range)
        .into_iter()
        .filter_map(|r| {
            let p = pages_in(&m.vma, r, page);
            PageSpan::new(p.start, p.end)
        })
        .collect();
    let (copy, keep): (Vec<u64>, Vec<u64>) = m
        .own_pages()
        .into_iter()
        .partition(|&p| written.contains(p));
    for p in keep {
        if let Some(k) = m.kinds.get_mut(usize::try_from(p).unwrap_or(usize::MAX)) {
            *k = PageKind::InParent;
        }
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{VirtAddr, VirtRange};
    use crate::proc::maps::parse_line;
    use crate::vma::VmaKind;

    const PAGE: u64 = 4096;

    fn page() -> PageSize {
        PageSize::new(PAGE).expect("4 KiB")
    }

    /// A model of the maps line `line`, `data` of its pages with content.
    fn model(line: &str, backing: Backing, kind: VmaKind, data: &[u64]) -> VmaModel {
        let entry = parse_line(line.as_bytes()).expect("a maps line");
        let n = usize::try_from(entry.range.pages(page())).expect("small");
        let shared_object = entry.perms.shared && entry.inode != 0;
        let mut kinds = vec![PageKind::Hole; n];
        if shared_object {
            kinds.fill(PageKind::Object);
        }
        for &p in data {
            kinds[usize::try_from(p).expect("small")] = PageKind::Data;
        }
        VmaModel {
            vma: Vma {
                entry,
                backing,
                kind,
                vm_flags: None,
                smaps_swap_kb: None,
                smaps_rss_pss_kb: None,
            },
            kinds,
            store: None,
            dedup: Vec::new(),
            swap_slots: BTreeMap::new(),
            through_mapping: false,
        }
    }

    fn anon(start: u64, pages: u64, data: &[u64]) -> VmaModel {
        let line = format!("{start:x}-{:x} rw-p 00000000 00:00 0", start + pages * PAGE);
        model(&line, Backing::Anon, VmaKind::Anon, data)
    }

    fn memfd(start: u64, pages: u64, offset_pages: u64) -> VmaModel {
        let line = format!(
            "{start:x}-{:x} rw-s {:08x} 00:01 77 /memfd:guest (deleted)",
            start + pages * PAGE,
            offset_pages * PAGE
        );
        model(&line, Backing::Shmem, VmaKind::Memfd, &[])
    }

    fn range(start: u64, pages: u64) -> VirtRange {
        VirtRange::from_start_len(VirtAddr::new(start), pages * PAGE).expect("a range")
    }

    fn written(ranges: &[VirtRange]) -> RangeSet {
        ranges.iter().copied().collect()
    }

    #[test]
    fn full_pass_copies_every_page_with_content_and_scans_every_object() {
        let vmas = vec![anon(0x10000, 8, &[0, 3, 7]), anon(0x40000, 2, &[])];
        let mut plan = Plan::default();
        plan_all(&mut plan, 0, &vmas);
        let id = memfd(0x80000, 4, 0).vma.object_id().expect("an object");
        plan_objects(&mut plan, [id]);
        assert_eq!(
            plan.own,
            vec![
                OwnPages {
                    proc: 0,
                    vma: 0,
                    pages: vec![0, 3, 7]
                },
                OwnPages {
                    proc: 0,
                    vma: 1,
                    pages: vec![]
                },
            ]
        );
        assert_eq!(plan.scans, vec![ObjectScan { id, span: None }]);
        assert_eq!(plan.pages(), 3);
    }

    #[test]
    fn written_ranges_become_own_pages_or_object_pages_at_the_mapping_offset() {
        let vmas = vec![anon(0x10000, 8, &[0, 1, 2, 3]), memfd(0x80000, 4, 10)];
        let w = written(&[range(0x12000, 2), range(0x81000, 2), range(0x200000, 1)]);
        let mut plan = Plan::default();
        plan_written(&mut plan, 3, &vmas, &w, &BTreeSet::new(), page());
        assert_eq!(
            plan.own,
            vec![OwnPages {
                proc: 3,
                vma: 0,
                pages: vec![2, 3]
            }]
        );
        let id = vmas[1].vma.object_id().expect("an object");
        let pages: Vec<u64> = plan.objects[&id].iter().copied().collect();
        assert_eq!(pages, vec![11, 12], "object pages = mapping offset + index");
        assert!(plan.scans.is_empty());
    }

    #[test]
    fn a_new_mapping_is_copied_whole_whatever_was_written() {
        let vmas = vec![anon(0x10000, 4, &[1, 2]), memfd(0x80000, 4, 2)];
        let new: BTreeSet<usize> = [0, 1].into();
        let mut plan = Plan::default();
        plan_written(&mut plan, 0, &vmas, &RangeSet::default(), &new, page());
        assert_eq!(plan.own[0].pages, vec![1, 2]);
        let id = vmas[1].vma.object_id().expect("an object");
        assert_eq!(
            plan.scans,
            vec![ObjectScan {
                id,
                span: PageSpan::new(2, 6)
            }]
        );
    }

    #[test]
    fn reconcile_keeps_unchanged_mappings_and_reports_new_and_replaced_ones() {
        let mut kept = anon(0x10000, 4, &[1]);
        kept.kinds[1] = PageKind::Zero; // what an earlier pass learned
        let old = vec![kept, anon(0x20000, 4, &[0]), anon(0x30000, 4, &[0])];
        // A fresh scan: the first is unchanged, the second replaced at the
        // same place, the third gone, a fourth added.
        let mut fresh = vec![
            anon(0x10000, 4, &[1]),
            anon(0x20000, 4, &[0, 1]),
            anon(0x50000, 2, &[0]),
        ];
        let replaced = written(&[range(0x20000, 4)]);
        let maps: Vec<MapsEntry> = fresh.iter().map(|m| m.vma.entry.clone()).collect();
        assert!(needs_rebuild(&maps, &old, &replaced));
        let new = reconcile(old, &mut fresh, &replaced);
        assert_eq!(new, [1, 2].into());
        assert_eq!(
            fresh[0].kinds[1],
            PageKind::Zero,
            "the model was carried over"
        );
        assert_eq!(fresh[1].own_pages(), vec![0, 1], "the replacement's scan");
    }

    #[test]
    fn an_unchanged_layout_needs_no_rebuild() {
        let old = vec![anon(0x10000, 4, &[1]), memfd(0x80000, 4, 0)];
        let maps: Vec<MapsEntry> = old.iter().map(|m| m.vma.entry.clone()).collect();
        assert!(!needs_rebuild(&maps, &old, &RangeSet::default()));
        assert!(needs_rebuild(&maps[..1], &old, &RangeSet::default()));
        let mut moved = maps.clone();
        moved[1].offset += PAGE;
        assert!(needs_rebuild(&moved, &old, &RangeSet::default()));
    }

    #[test]
    fn pages_not_written_since_the_parent_are_in_the_parent() {
        let mut m = anon(0x10000, 6, &[0, 1, 2, 5]);
        let copy = written_since_parent(&mut m, &written(&[range(0x11000, 2)]), page());
        assert_eq!(copy, vec![1, 2]);
        assert_eq!(m.kinds[0], PageKind::InParent);
        assert_eq!(m.kinds[5], PageKind::InParent);
        assert_eq!(m.kinds[3], PageKind::Hole, "no content: left alone");
    }
}
