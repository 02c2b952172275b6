//! The copy of one pass: a [`Copier`] borrows the dump's processes,
//! objects, parent image, dedup state and sink for the pass and copies
//! its plan (`planner.rs`): own pages with the workers of `own.rs`,
//! object pages with `object.rs`, then pages whose dedup source was
//! rewritten. Each page copied is checked: all zeros → `Zero` (not
//! stored); equal to the parent image's → `InParent` (not stored); else
//! stored.

mod object;
mod own;

pub(in crate::dump) use object::{object_store, pread_page};
pub(in crate::dump) use own::{Frames, vma_store};

use std::collections::BTreeMap;

use super::abort::Cancel;
use super::attach::Proc;
use super::objects::{Objects, parent_object};
use super::planner::Plan;
use super::sink::{NotStored, PageSink};
use super::swap::{self, SwapIo};
use super::{DumpError, DumpEvent};
use crate::addr::PageSize;
use crate::image::format::{DedupRef, PageKind};
use crate::image::read::{Image, PageFill};
use crate::vma::{Backing, ObjectId};

/// Pages and bytes copied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Copied {
    /// Pages read.
    pub pages: u64,
    /// Pages stored.
    pub stored: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.stored += o.stored;
    }
}

/// What a page of the parent image is, to compare a new copy with.
pub enum Parent<'a> {
    /// No parent (a full image).
    None,
    /// The parent's same mapping of process `pid`.
    Vma(&'a Image, u32, u64),
    /// The parent's same object.
    Object(&'a Image, usize),
}

impl Parent<'_> {
    /// Whether the parent holds exactly `bytes` for page `p`.
    fn same(&self, p: u64, bytes: &[u8], scratch: &mut [u8]) -> bool {
        let fill = match self {
            Parent::None => return false,
            Parent::Vma(img, pid, start) => img.vma_page(*pid, *start, p, scratch),
            Parent::Object(img, i) => img.object_page(*i, p, scratch),
        };
        match fill {
            Ok(PageFill::Data) => scratch == bytes,
            Ok(PageFill::Zero | PageFill::Hole) => bytes.iter().all(|&b| b == 0),
            _ => false,
        }
    }
}

/// The page kind the image records for a page not stored for `why`.
pub(in crate::dump) fn kind_of(why: NotStored) -> PageKind {
    match why {
        NotStored::Zero => PageKind::Zero,
        NotStored::Hole => PageKind::Hole,
        NotStored::InParent => PageKind::InParent,
        NotStored::Swapped => PageKind::Swapped,
        NotStored::Object => PageKind::Object,
        NotStored::Dedup(_) => PageKind::Dedup,
    }
}

/// Pages read so far in a pass, told to the dump's caller.
pub(in crate::dump) struct Progress<'a> {
    report: &'a mut dyn FnMut(DumpEvent<'_>),
    pass: u32,
    done: u64,
    total: u64,
}

impl<'a> Progress<'a> {
    /// Pass `pass`, of about `total` pages.
    pub(in crate::dump) fn new(
        report: &'a mut dyn FnMut(DumpEvent<'_>),
        pass: u32,
        total: u64,
    ) -> Self {
        Self {
            report,
            pass,
            done: 0,
            total,
        }
    }

    /// `n` more pages read.
    pub(in crate::dump) fn tick(&mut self, n: u64) {
        self.done += n;
        (self.report)(DumpEvent::Progress {
            pass: self.pass,
            done: self.done,
            total: self.total,
        });
    }

    /// Counts again from 0 of `total` (a second round in the same pass).
    pub(in crate::dump) fn restart(&mut self, total: u64) {
        self.done = 0;
        self.total = total;
    }
}

/// Where copies go: the sink, and the progress of the pass.
pub(in crate::dump) struct Out<'a> {
    pub sink: &'a dyn PageSink,
    pub page: PageSize,
    pub progress: Progress<'a>,
}

/// The parts of a dump one pass copies with, borrowed for the pass.
pub(super) struct Copier<'a, 't> {
    pub procs: &'a mut [Proc<'t>],
    pub objects: &'a mut Objects,
    pub parent: Option<&'a Image>,
    /// The dedup state of a forked tree (`--tree`).
    pub frames: Option<&'a mut Frames>,
    pub swap: &'a SwapIo,
    pub cancel: &'a Cancel,
    pub out: Out<'a>,
}

impl Copier<'_, '_> {
    /// Copies `plan` (its object scans resolved), then pages whose dedup
    /// source was rewritten.
    pub(super) fn copy(&mut self, plan: &Plan) -> Result<Copied, DumpError> {
        let mut copied = Copied::default();
        for own in &plan.own {
            self.cancel.check()?;
            copied += self.own(own.proc, own.vma, &own.pages)?;
        }
        for (id, pages) in &plan.objects {
            self.cancel.check()?;
            let pages: Vec<u64> = pages.iter().copied().collect();
            copied += self.object(*id, &pages)?;
        }
        copied += self.recopy_invalidated()?;
        Ok(copied)
    }

    /// Copies own pages `pages` of mapping `k` of process `i`.
    fn own(&mut self, i: usize, k: usize, pages: &[u64]) -> Result<Copied, DumpError> {
        if pages.is_empty() {
            return Ok(Copied::default());
        }
        let p = &mut self.procs[i];
        let m = &mut p.vmas[k];
        for &page in pages {
            if let Some(kind) = m.kinds.get_mut(usize::try_from(page).unwrap_or(usize::MAX)) {
                *kind = PageKind::Data;
            }
        }
        let parent = match self
            .parent
            .filter(|img| !p.tracked_since_parent && parent_vma(img, p.pid, m).is_some())
        {
            Some(img) => Parent::Vma(img, p.pid, m.vma.range.start().get()),
            None => Parent::None,
        };
        let frames = self
            .frames
            .as_deref_mut()
            .filter(|_| m.vma.backing == Backing::Anon);
        own::own(p.pid, m, pages, &mut self.out, &parent, frames, &p.mem)
    }

    /// Copies object pages `pages` of object `id` (the full pass applies
    /// the swap policy to them first).
    fn object(&mut self, id: ObjectId, pages: &[u64]) -> Result<Copied, DumpError> {
        let Some(o) = self.objects.map.get_mut(&id).filter(|o| o.file.is_none()) else {
            return Ok(Copied::default());
        };
        let skip = if self.out.progress.pass == 0 {
            swap::swapped_object_pages(self.swap, o, pages, self.out.page)?
        } else {
            Default::default()
        };
        let parent = match self.parent.and_then(|p| Some((p, parent_object(p, id)?))) {
            Some((p, ix)) => Parent::Object(p, ix),
            None => Parent::None,
        };
        object::object(o, pages, &skip, &mut self.out, &parent)
    }

    /// Copies again the pages deduplicated against a page that was
    /// rewritten since.
    fn recopy_invalidated(&mut self) -> Result<Copied, DumpError> {
        let mut copied = Copied::default();
        loop {
            let Some(f) = self.frames.as_deref_mut() else {
                return Ok(copied);
            };
            let stale = std::mem::take(&mut f.invalidated);
            if stale.is_empty() {
                return Ok(copied);
            }
            let mut by_vma: BTreeMap<(u32, u64), Vec<u64>> = BTreeMap::new();
            for DedupRef {
                pid,
                vma_start,
                page,
            } in stale
            {
                by_vma.entry((pid, vma_start)).or_default().push(page);
            }
            for ((pid, start), mut pages) in by_vma {
                let Some(i) = self.procs.iter().position(|p| p.pid == pid) else {
                    continue;
                };
                let Some(k) = self.procs[i]
                    .vmas
                    .iter()
                    .position(|m| m.vma.range.start().get() == start)
                else {
                    continue;
                };
                pages.sort_unstable();
                pages.dedup();
                self.out.progress.restart(pages.len() as u64);
                copied += self.own(i, k, &pages)?;
            }
        }
    }
}

/// The parent's record of the mapping `m` of process `pid`, if it is the
/// same mapping.
pub(super) fn parent_vma<'i>(
    parent: &'i Image,
    pid: u32,
    m: &super::model::VmaModel,
) -> Option<&'i crate::image::format::VmaRec> {
    let key = m.vma.mapping_key();
    parent
        .process(pid)?
        .vmas
        .iter()
        .find(|v| v.mapping_key() == Some(key))
}
