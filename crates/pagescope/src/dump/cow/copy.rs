//! The snapshot's copy: every page with content, the fault handler's
//! capture first (else the memory now, still write-protected, so still
//! the snapshot's), written to the sink; each batch's protection lifted
//! once it is copied (`UFFDIO_WRITEPROTECT`).

use std::os::fd::AsFd;

use super::handler::{Captured, Side};
use crate::addr::{PageSize, VirtRange};
use crate::dump::copy::{Copied, kind_of, object_store, pread_page};
use crate::dump::model::VmaModel;
use crate::dump::passes::Dump;
use crate::dump::sink::{NotStored, PageSink, PassStart, StoreOwner, StoreRef};
use crate::dump::{DumpError, DumpEvent};
use crate::image::format::PageKind;
use crate::uffd::Userfaultfd;
use crate::vma::ObjectId;

/// What the handler captured of a page.
#[derive(Clone, Copy)]
enum Took {
    /// Its bytes (copied into the batch's buffer).
    Bytes,
    /// No bytes to store.
    Not(NotStored),
}

/// Pages copied (and then unprotected) per batch.
const BATCH_PAGES: usize = 256;

impl Dump<'_, '_, '_> {
    /// Scans (after the resume: every write since then was captured
    /// first), then copies every page with content, capture first.
    pub(super) fn copy_all(
        &mut self,
        uffd: &Userfaultfd,
        protected: &[VirtRange],
        side: &Side,
    ) -> Result<Copied, DumpError> {
        let pass = PassStart {
            n: 0,
            stopped: false,
        };
        self.sink.begin_pass(pass)?;
        let mut copied = Copied::default();
        let mut vmas = self.build_models(0)?;
        let total: u64 = vmas.iter().map(|m| m.own_pages().len() as u64).sum();
        let mut done = 0;
        for m in &mut vmas {
            let pages = m.own_pages();
            for batch in pages.chunks(BATCH_PAGES) {
                self.cancelled()?;
                copied += self.own_batch(m, batch, side)?;
                unprotect(uffd, protected, m, batch, self.page);
                done += batch.len() as u64;
                (self.progress)(DumpEvent::Progress {
                    pass: 0,
                    done,
                    total,
                });
            }
        }
        for id in self.objects.ids() {
            let pages = self.objects.data(id, None)?;
            copied += self.object_pages(id, &pages, &vmas, side)?;
            for m in vmas
                .iter()
                .filter(|m| m.is_object_view() && m.vma.object_id() == Some(id))
            {
                if protected.contains(&m.vma.range) {
                    let _ = uffd.write_protect(m.vma.range, false);
                }
            }
        }
        self.procs[0].vmas = vmas;
        self.sink.end_pass(pass)?;
        Ok(copied)
    }

    /// Copies own pages `batch` of `m`: captures first, else the memory
    /// now (still protected, so still the snapshot's).
    fn own_batch(
        &mut self,
        m: &mut VmaModel,
        batch: &[u64],
        side: &Side,
    ) -> Result<Copied, DumpError> {
        let p = self.page.as_usize();
        let store = self.store_for(m)?;
        let addrs: Vec<u64> = batch.iter().map(|&i| m.addr(i, self.page).get()).collect();
        let mut buf = vec![0u8; batch.len() * p];
        let reads = self.procs[0].mem.read(&addrs, &mut buf)?;
        // What the handler captured overrides what was read (it may have
        // lifted the protection before this read). The lock is held only
        // to take the captures, so a waiting writer is not held up by the
        // stores below.
        let mut took: Vec<Option<Took>> = vec![None; batch.len()];
        {
            let side = side.lock().unwrap_or_else(|e| e.into_inner());
            for (k, a) in addrs.iter().enumerate() {
                took[k] = match side.get(a) {
                    Some(Captured::Bytes(b)) => {
                        buf[k * p..(k + 1) * p].copy_from_slice(b);
                        Some(Took::Bytes)
                    }
                    Some(Captured::Hole) => Some(Took::Not(NotStored::Hole)),
                    Some(Captured::FilePage) => Some(Took::Not(NotStored::Object)),
                    None => None,
                };
            }
        }
        let sink = &*self.sink;
        let mut copied = Copied::default();
        for (k, &i) in batch.iter().enumerate() {
            match took[k] {
                Some(Took::Bytes) => {}
                Some(Took::Not(why)) => {
                    set_kind(m, i, why, sink, &store);
                    continue;
                }
                None if reads[k].skipped => {
                    let (ty, offset) = reads[k].entry.swap_raw();
                    m.swap_slots.insert(i, (ty, offset));
                    set_kind(m, i, NotStored::Swapped, sink, &store);
                    continue;
                }
                None if !reads[k].ok => {
                    set_kind(m, i, NotStored::Hole, sink, &store);
                    continue;
                }
                None => {}
            }
            let bytes = &buf[k * p..(k + 1) * p];
            copied.pages += 1;
            if bytes.iter().all(|&b| b == 0) {
                set_kind(m, i, NotStored::Zero, sink, &store);
            } else {
                sink.write(&store, i, bytes)?;
                copied.stored += 1;
                if let Some(k) = m.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
                    *k = PageKind::Data;
                }
            }
        }
        Ok(copied)
    }

    /// Copies pages `pages` of shared object `id` (`pread` of pagescope's
    /// fd), using the handler's capture through any of the target's
    /// mappings of a page.
    fn object_pages(
        &mut self,
        id: ObjectId,
        pages: &[u64],
        vmas: &[VmaModel],
        side: &Side,
    ) -> Result<Copied, DumpError> {
        let page = self.page;
        let p = page.as_usize();
        let views: Vec<&VmaModel> = vmas
            .iter()
            .filter(|m| m.is_object_view() && m.vma.object_id() == Some(id))
            .collect();
        let Some(o) = self.objects.map.get_mut(&id) else {
            return Ok(Copied::default());
        };
        if o.file.is_some() || pages.is_empty() {
            return Ok(Copied::default());
        }
        let sink = &*self.sink;
        let store = object_store(o, sink)?;
        let mut buf = vec![0u8; p];
        let mut copied = Copied::default();
        for &i in pages {
            let Some(kind) = o.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) else {
                continue;
            };
            let n = pread_page(o.fd.as_fd(), &mut buf, page.bytes(i)).map_err(|source| {
                DumpError::ObjectRead {
                    inode: id.inode,
                    source,
                }
            })?;
            buf[n..].fill(0);
            {
                let side = side.lock().unwrap_or_else(|e| e.into_inner());
                let captured = views.iter().find_map(|m| {
                    let first = m.vma.object_page(m.vma.range.start(), page);
                    let last = first + m.vma.range.pages(page);
                    (first..last)
                        .contains(&i)
                        .then(|| side.get(&(m.vma.range.start().get() + (i - first) * page.get())))
                        .flatten()
                });
                if let Some(Captured::Bytes(b)) = captured {
                    buf.copy_from_slice(b);
                }
            }
            let bytes: &[u8] = &buf;
            copied.pages += 1;
            if bytes.iter().all(|&b| b == 0) {
                *kind = PageKind::Zero;
                sink.not_stored(&store, i, 1, NotStored::Zero);
            } else {
                sink.write(&store, i, bytes)?;
                copied.stored += 1;
                *kind = PageKind::Data;
            }
        }
        Ok(copied)
    }

    /// The store of `m`'s own pages (opened on first use).
    fn store_for(&self, m: &mut VmaModel) -> Result<StoreRef, DumpError> {
        if let Some(s) = &m.store {
            return Ok(s.clone());
        }
        let owner = StoreOwner::Vma {
            pid: self.procs[0].pid,
            vma_start: m.vma.range.start().get(),
        };
        let s = self.sink.open_store(owner, m.kinds.len() as u64)?;
        m.store = Some(s.clone());
        Ok(s)
    }
}

/// Page `i` of `m` is `why` (not stored).
fn set_kind(m: &mut VmaModel, i: u64, why: NotStored, sink: &dyn PageSink, store: &StoreRef) {
    sink.not_stored(store, i, 1, why);
    let kind = kind_of(why);
    if let Some(k) = m.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
        *k = kind;
    }
}

/// Lifts the protection of the pages `batch` of `m` (if it is protected),
/// in runs.
fn unprotect(
    uffd: &Userfaultfd,
    protected: &[VirtRange],
    m: &VmaModel,
    batch: &[u64],
    page: PageSize,
) {
    if !protected.contains(&m.vma.range) {
        return;
    }
    let mut run: Option<(u64, u64)> = None;
    let flush = |r: Option<(u64, u64)>| {
        if let Some((first, n)) = r {
            let start = m.addr(first, page);
            if let Some(range) = VirtRange::from_start_len(start, page.bytes(n)) {
                let _ = uffd.write_protect(range, false);
            }
        }
    };
    for &i in batch {
        run = match run {
            Some((f, n)) if f + n == i => Some((f, n + 1)),
            other => {
                flush(other);
                Some((i, 1))
            }
        };
    }
    flush(run);
}
