//! What a pass copies, decided from the models alone (no process, no
//! kernel interface): the pages of every mapping for the full pass, the
//! pages the tracker reports written for a pre-copy or the stopped pass,
//! every page of a mapping that is new or was replaced; and how the
//! models are carried over when a fresh scan (`/proc/PID/maps`) shows the
//! layout changed. The engine (`passes.rs`) resolves a [`Plan`]'s
//! [`ObjectScan`]s (`SEEK_DATA` on the object) and copies the rest.
//!
//! The models are kept between passes: a pass re-reads the layout only
//! when the [`LayoutFingerprint`] of `/proc/PID/maps` changed or the
//! tracker reported a mapping replaced ([`check_layout`]), and the first
//! pass of a dump whose tracker was kept since the parent image takes
//! the parent's models when the layout is the parent's
//! ([`models_from_parent`]) instead of scanning the page tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use xxhash_rust::xxh3::xxh3_64;

use super::model::{VmaModel, pages_in};
use crate::addr::{PageSize, PageSpan};
use crate::image::format::{PageKind, VmaRec};
use crate::proc::maps::{MappingKey, MapsEntry};
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

/// A cheap fingerprint of a process's layout: the xxh3 of its
/// `/proc/PID/maps` text, read before the models were built from it.
///
/// It changes with any mapping added, removed, moved, resized or
/// re-protected, and with a path that changed. It cannot see a mapping
/// replaced by one with the same line (an anonymous `MAP_FIXED` mapping
/// of the same size at the same place: its offset is its address): maps
/// cannot tell them apart, the tracker can (the new mapping is not
/// write-protected; it reports it as [`WriteSource::NewMapping`]), so
/// [`check_layout`] asks both.
///
/// [`WriteSource::NewMapping`]: crate::dirty::WriteSource::NewMapping
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LayoutFingerprint(u64);

impl LayoutFingerprint {
    /// The fingerprint of the maps text `maps`.
    pub fn of(maps: &[u8]) -> Self {
        Self(xxh3_64(maps))
    }
}

/// What a pass does with the models it kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LayoutCheck {
    /// Same maps text, nothing replaced: the models (the plan's base) are
    /// kept as they are; maps is not parsed, the page tables not scanned.
    Kept,
    /// The maps text changed or a mapping was replaced: the layout is
    /// read again and reconciled ([`needs_rebuild`], [`reconcile`]).
    Changed,
}

/// Whether the models built from the layout `kept` still hold, now that
/// maps reads `now` and the tracker reports `replaced` as new mappings.
pub(super) fn check_layout(
    kept: Option<LayoutFingerprint>,
    now: LayoutFingerprint,
    replaced: &RangeSet,
) -> LayoutCheck {
    if kept == Some(now) && replaced.is_empty() {
        LayoutCheck::Kept
    } else {
        LayoutCheck::Changed
    }
}

/// Whether `maps` still lists exactly the mappings modelled in `old`
/// ([`MapsEntry::same_mapping`], in order).
pub(super) fn same_layout(maps: &[MapsEntry], old: &[VmaModel]) -> bool {
    maps.len() == old.len() && maps.iter().zip(old).all(|(e, m)| e.same_mapping(&m.vma))
}

/// A mapping of a process whose tracker was kept since the parent image,
/// as [`models_from_parent`] finds it.
#[derive(Debug)]
pub(super) enum FromParent {
    /// The parent recorded the same mapping: its model, without a scan.
    Kept(VmaModel),
    /// The parent has no such mapping (new, moved, resized), its record
    /// is malformed, or it read a shared object through the mapping
    /// (then the object's pages were the mapping's own): to scan, and
    /// copy whole.
    Scan(Vma),
}

/// The models of a process whose tracker was kept since the parent image,
/// from its mappings now (`layout`) and those `recorded` in the parent:
/// a mapping the parent recorded ([`MappingKey`]s equal) keeps each page
/// as the parent recorded it, a page with content of its own
/// [`PageKind::InParent`] (what was written since, the tracker reports:
/// the pass copies those); the others are to be scanned.
///
/// [`MappingKey`]: crate::proc::maps::MappingKey
pub(super) fn models_from_parent(
    layout: Vec<Vma>,
    recorded: &[VmaRec],
    page: PageSize,
) -> Vec<FromParent> {
    let by_key: HashMap<MappingKey, &VmaRec> = recorded
        .iter()
        .filter_map(|r| Some((r.mapping_key()?, r)))
        .collect();
    layout
        .into_iter()
        .map(|vma| {
            let kinds = by_key
                .get(&vma.mapping_key())
                .filter(|rec| rec.object.is_some() || !is_object_view(&vma))
                .and_then(|rec| kinds_from_parent(rec, vma.range.pages(page)));
            match kinds {
                Some(kinds) => FromParent::Kept(VmaModel::new(vma, kinds)),
                None => FromParent::Scan(vma),
            }
        })
        .collect()
}

/// Whether the pages of `vma` live in its object (a shared mapping of
/// one), unless the object cannot be opened.
fn is_object_view(vma: &Vma) -> bool {
    vma.is_shared() && vma.object_id().is_some()
}

/// The `n` pages of `rec` as a dump tracked since it sees them before
/// it copies what was written: content of their own is in the parent,
/// zero pages, holes and object pages stay what they were.
fn kinds_from_parent(rec: &VmaRec, n: u64) -> Option<Vec<PageKind>> {
    let mut kinds = vec![PageKind::Hole; usize::try_from(n).ok()?];
    for r in &rec.runs {
        let from = usize::try_from(r.first).ok()?;
        let to = from.checked_add(usize::try_from(r.count).ok()?)?;
        let kind = match r.kind {
            PageKind::Data | PageKind::InParent | PageKind::Dedup | PageKind::Swapped => {
                PageKind::InParent
            }
            other => other,
        };
        kinds.get_mut(from..to)?.fill(kind);
    }
    Some(kinds)
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
            .position(|o| o.vma.same_mapping(&m.vma) && !touched(o, replaced))
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
    use crate::proc::maps::{parse_line, parse_maps};
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
    fn an_unchanged_fingerprint_keeps_the_plan_a_changed_one_reconciles() {
        let text = b"10000-14000 rw-p 00000000 00:00 0 \n";
        let kept = Some(LayoutFingerprint::of(text));
        let now = LayoutFingerprint::of(text);
        assert_eq!(
            check_layout(kept, now, &RangeSet::default()),
            LayoutCheck::Kept
        );
        // Re-protected: another text, the same mapping; re-read, nothing
        // to rebuild.
        let mprotected = b"10000-14000 r--p 00000000 00:00 0 \n";
        let now = LayoutFingerprint::of(mprotected);
        assert_eq!(
            check_layout(kept, now, &RangeSet::default()),
            LayoutCheck::Changed
        );
        let old = vec![anon(0x10000, 4, &[1])];
        let maps = parse_maps(mprotected).expect("maps");
        assert!(!needs_rebuild(&maps, &old, &RangeSet::default()));
        // Grown: re-read and reconciled, the grown mapping is new.
        let grown = b"10000-16000 rw-p 00000000 00:00 0 \n";
        let now = LayoutFingerprint::of(grown);
        assert_eq!(
            check_layout(kept, now, &RangeSet::default()),
            LayoutCheck::Changed
        );
        let maps = parse_maps(grown).expect("maps");
        assert!(needs_rebuild(&maps, &old, &RangeSet::default()));
        let mut fresh = vec![anon(0x10000, 6, &[1, 5])];
        let new = reconcile(old, &mut fresh, &RangeSet::default());
        assert_eq!(new, [0].into());
        // No models yet: nothing is kept.
        assert_eq!(
            check_layout(None, now, &RangeSet::default()),
            LayoutCheck::Changed
        );
    }

    #[test]
    fn a_mapping_replaced_by_the_same_line_is_not_kept() {
        // The fingerprint cannot see it; the tracker's report can.
        let text = b"10000-14000 rw-p 00000010 00:00 0 \n";
        let fp = LayoutFingerprint::of(text);
        let replaced = written(&[range(0x10000, 4)]);
        assert_eq!(check_layout(Some(fp), fp, &replaced), LayoutCheck::Changed);
        let old = vec![anon(0x10000, 4, &[1])];
        let maps = parse_maps(text).expect("maps");
        assert!(needs_rebuild(&maps, &old, &replaced));
    }

    #[test]
    fn the_parents_layout_gives_the_models_with_its_content_in_the_parent() {
        let mut a = anon(0x10000, 6, &[0, 1, 4]);
        a.kinds[2] = PageKind::Zero;
        a.kinds[4] = PageKind::InParent;
        let shm = memfd(0x80000, 4, 0);
        let recorded = vec![a.record(None), shm.record(Some(0))];
        let grown = anon(0x40000, 2, &[]).vma;
        let layout: Vec<Vma> = vec![a.vma.clone(), grown, shm.vma.clone()];
        let found = models_from_parent(layout.clone(), &recorded, page());
        let kept = |f: &FromParent| match f {
            FromParent::Kept(m) => Some(m.kinds.clone()),
            FromParent::Scan(_) => None,
        };
        use PageKind::{Hole, InParent, Object, Zero};
        assert_eq!(
            kept(&found[0]),
            Some(vec![InParent, InParent, Zero, Hole, InParent, Hole])
        );
        assert_eq!(kept(&found[1]), None, "not in the parent: scanned");
        assert_eq!(kept(&found[2]), Some(vec![Object; 4]));
        let models: Vec<VmaModel> = found
            .into_iter()
            .filter_map(|f| match f {
                FromParent::Kept(m) => Some(m),
                FromParent::Scan(_) => None,
            })
            .collect();
        let mut plan = Plan::default();
        let w = written(&[range(0x13000, 1), range(0x81000, 1)]);
        plan_written(&mut plan, 0, &models, &w, &BTreeSet::new(), page());
        assert_eq!(plan.own[0].pages, vec![3], "written since: copied");
        // The object read through the mapping in the parent: scanned.
        let through = vec![recorded[0].clone(), shm.record(None)];
        let found = models_from_parent(layout, &through, page());
        assert!(matches!(found[2], FromParent::Scan(_)));
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
