//! What the image will say about every page, kept while the dump runs and
//! turned into records at commit.

use std::os::fd::OwnedFd;

use super::sink::StoreRef;
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::image::format::{FileIdentity, ObjectRec, PageKind, Run, SwapSlotRec, VmaRec};
use crate::page::{PageFlags, PageState};
use crate::report::VmaReport;
use crate::vma::{Backing, ObjectId, Vma, VmaKind};

/// One mapping of one process.
#[derive(Debug)]
pub struct VmaModel {
    /// The mapping.
    pub vma: Vma,
    /// What each page is (index: page in the VMA).
    pub kinds: Vec<PageKind>,
    /// Where its own pages go (created on first data).
    pub store: Option<StoreRef>,
    /// Where a deduplicated page's content is.
    pub dedup: Vec<(u64, crate::image::format::DedupRef)>,
    /// Pages left swapped out (`--swap skip`): page → (swap type, offset).
    pub swap_slots: std::collections::BTreeMap<u64, (u8, u64)>,
    /// Its object could not be opened (no descriptor, no privilege for
    /// `map_files`): its pages are copied through the process's mapping
    /// as if they were its own.
    pub through_mapping: bool,
}

impl VmaModel {
    /// The plan for `v` from its scanned runs: pages with content of their
    /// own are `Data` candidates (copied, then `Zero` if all zeros),
    /// object pages `Object`, the rest `Zero`/`Hole`.
    pub fn from_report(v: &VmaReport, page: PageSize) -> Self {
        let vma = v.vma.clone();
        let n = usize::try_from(vma.range.pages(page)).unwrap_or(0);
        let shared_object = vma.is_shared() && vma.object_id().is_some();
        let private_object = !vma.is_shared() && vma.object_id().is_some();
        let mut kinds = vec![PageKind::Hole; n];
        if shared_object {
            kinds.fill(PageKind::Object);
        } else if vma.backing != Backing::Special {
            for r in &v.runs {
                let at = r.start.checked_offset_from(vma.range.start()).unwrap_or(0) / page.get();
                let kind = own_kind(r.state, r.flags, private_object);
                let from = usize::try_from(at).unwrap_or(n).min(n);
                let to = usize::try_from(at + r.pages).unwrap_or(n).min(n);
                kinds[from..to].fill(kind);
            }
        }
        Self::new(vma, kinds)
    }

    /// A model of `vma` whose pages are `kinds` (nothing stored yet).
    pub fn new(vma: Vma, kinds: Vec<PageKind>) -> Self {
        Self {
            vma,
            kinds,
            store: None,
            dedup: Vec::new(),
            swap_slots: std::collections::BTreeMap::new(),
            through_mapping: false,
        }
    }

    /// Copies every page of the mapping through the process (its object
    /// could not be opened): all its pages become `Data` candidates but
    /// the zero pages and guard regions the scan found.
    pub fn read_through_mapping(&mut self, v: &VmaReport, page: PageSize) {
        self.through_mapping = true;
        self.kinds.fill(PageKind::Data);
        let n = self.kinds.len();
        for r in &v.runs {
            let kind = match r.state {
                PageState::Zero => PageKind::Zero,
                PageState::Guard => PageKind::Hole,
                _ => continue,
            };
            let at = r
                .start
                .checked_offset_from(self.vma.range.start())
                .unwrap_or(0)
                / page.get();
            let from = usize::try_from(at).unwrap_or(n).min(n);
            let to = usize::try_from(at + r.pages).unwrap_or(n).min(n);
            self.kinds[from..to].fill(kind);
        }
    }

    /// Pages whose content the process itself holds (copied with
    /// `process_vm_readv`): `Data` candidates.
    pub fn own_pages(&self) -> Vec<u64> {
        self.kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == PageKind::Data)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// The address of page `i`.
    pub fn addr(&self, i: u64, page: PageSize) -> VirtAddr {
        self.vma.range.start().saturating_add(page.bytes(i))
    }

    /// Whether its pages live in an object (a shared mapping of one).
    pub fn is_object_view(&self) -> bool {
        !self.through_mapping && self.vma.is_shared() && self.vma.object_id().is_some()
    }

    /// The record.
    pub fn record(&self, object: Option<usize>) -> VmaRec {
        let object = object.filter(|_| !self.through_mapping);
        let mut runs = runs_of(&self.kinds);
        for r in &mut runs {
            if r.kind == PageKind::Dedup {
                r.from = self
                    .dedup
                    .iter()
                    .find(|(p, _)| *p == r.first)
                    .map(|(_, d)| *d);
            }
        }
        VmaRec {
            start: self.vma.range.start().get(),
            end: self.vma.range.end().get(),
            perms: self.vma.perms.to_string(),
            offset: self.vma.offset,
            dev: self.vma.dev.to_string(),
            inode: self.vma.inode,
            path: self.vma.path.display(),
            backing: self.vma.backing.name().to_owned(),
            object,
            store: self.store.as_ref().map(|s| s.name().to_owned()),
            runs,
            swap_slots: self
                .swap_slots
                .iter()
                .filter(|(p, _)| {
                    self.kinds.get(usize::try_from(**p).unwrap_or(usize::MAX))
                        == Some(&PageKind::Swapped)
                })
                .map(|(&page, &(ty, offset))| SwapSlotRec { page, ty, offset })
                .collect(),
        }
    }
}

/// The page kind a scanned state gives a page of the process's own memory.
fn own_kind(state: PageState, flags: PageFlags, private_object: bool) -> PageKind {
    match state {
        PageState::Zero => PageKind::Zero,
        PageState::Guard => PageKind::Hole,
        // A page-cache page of a private file/shmem mapping: the object's.
        PageState::Present if private_object && flags.contains(PageFlags::FILE) => PageKind::Object,
        PageState::Present | PageState::Swapped | PageState::SwapCache | PageState::Unknown => {
            PageKind::Data
        }
        _ if private_object => PageKind::Object,
        _ => PageKind::Hole,
    }
}

/// A shared object, copied (shmem) or recorded by identity (files).
#[derive(Debug)]
pub struct ObjectModel {
    /// Identity.
    pub id: ObjectId,
    /// A path it is mapped under.
    pub path: String,
    /// Kind of the first mapping seen.
    pub kind: VmaKind,
    /// Pages covered (`0..pages`).
    pub pages: u64,
    /// pagescope's fd of it.
    pub fd: OwnedFd,
    /// What each page is.
    pub kinds: Vec<PageKind>,
    /// Where its pages go.
    pub store: Option<StoreRef>,
    /// For a regular file recorded by identity.
    pub file: Option<FileIdentity>,
    /// Pages that were swapped out and were read (`keep-cold` pages them
    /// back out).
    pub cold: Vec<u64>,
}

impl ObjectModel {
    /// The record.
    pub fn record(&self) -> ObjectRec {
        ObjectRec {
            dev: self.id.dev.to_string(),
            inode: self.id.inode,
            path: self.path.clone(),
            kind: kind_name(self.kind).to_owned(),
            pages: self.pages,
            store: self.store.as_ref().map(|s| s.name().to_owned()),
            file: self.file.clone(),
            runs: runs_of(&self.kinds),
        }
    }
}

fn kind_name(k: VmaKind) -> &'static str {
    match k {
        VmaKind::Memfd => "memfd",
        VmaKind::Tmpfs => "tmpfs",
        VmaKind::SharedAnon => "shared_anon",
        VmaKind::Sysv => "sysv",
        VmaKind::Hugetlb => "hugetlb",
        _ => "file",
    }
}

/// Page kinds as runs.
pub fn runs_of(kinds: &[PageKind]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let i = i as u64;
        match out.last_mut() {
            Some(r) if r.kind == k && r.first + r.count == i && k != PageKind::Dedup => {
                r.count += 1
            }
            _ => out.push(Run {
                first: i,
                count: 1,
                kind: k,
                from: None,
            }),
        }
    }
    out
}

/// The pages of `r` (addresses) as VMA page indices of `v`.
pub fn pages_in(v: &Vma, r: VirtRange, page: PageSize) -> std::ops::Range<u64> {
    let Some(part) = v.range.intersect(&r) else {
        return 0..0;
    };
    let first = part
        .start()
        .checked_offset_from(v.range.start())
        .unwrap_or(0)
        / page.get();
    first..first + part.pages(page)
}
