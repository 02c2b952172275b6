//! The snapshot's copy: every page with content, the fault handler's
//! capture first (else the memory now, still write-protected, so still
//! the snapshot's), written to the sink; each batch's protection lifted
//! once it is copied (`UFFDIO_WRITEPROTECT`).

use std::os::fd::AsFd;

use super::handler::{Captured, Side};
use crate::addr::{PageSize, VirtRange};
use crate::dump::DumpError;
use crate::dump::abort::Cancel;
use crate::dump::copy::{Copied, Out, kind_of, object_store, pread_page, vma_store};
use crate::dump::model::VmaModel;
use crate::dump::objects::Objects;
use crate::dump::remote::RemoteMem;
use crate::dump::sink::{NotStored, PageSink, PassStart, StoreRef};
use crate::image::format::PageKind;
use crate::uffd::SyncUserfaultfd;
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

/// What the snapshot's copy works with, borrowed from the dump.
pub(super) struct SnapshotCopy<'a> {
    /// The process's memory.
    pub mem: &'a RemoteMem,
    pub pid: u32,
    pub objects: &'a mut Objects,
    pub out: Out<'a>,
    pub cancel: &'a Cancel,
    /// The write-protected ranges, and the fault handler's captures.
    pub uffd: &'a SyncUserfaultfd,
    pub protected: &'a [VirtRange],
    pub side: &'a Side,
}

impl SnapshotCopy<'_> {
    /// Copies every page with content of `vmas` (scanned after the resume:
    /// every write since then was captured first), capture first, then
    /// the objects' pages.
    pub(super) fn copy(&mut self, vmas: &mut [VmaModel]) -> Result<Copied, DumpError> {
        let pass = PassStart {
            n: 0,
            stopped: false,
        };
        self.out.sink.begin_pass(pass)?;
        let mut copied = Copied::default();
        let total: u64 = vmas.iter().map(|m| m.own_pages().len() as u64).sum();
        self.out.progress.restart(total);
        for m in vmas.iter_mut() {
            let pages = m.own_pages();
            for batch in pages.chunks(BATCH_PAGES) {
                self.cancel.check()?;
                copied += self.own_batch(m, batch)?;
                unprotect(self.uffd, self.protected, m, batch, self.out.page);
                self.out.progress.tick(batch.len() as u64);
            }
        }
        for id in self.objects.ids() {
            let pages = self.objects.data(id, None)?;
            copied += self.object_pages(id, &pages, vmas)?;
            for m in vmas
                .iter()
                .filter(|m| m.is_object_view() && m.vma.object_id() == Some(id))
            {
                if self.protected.contains(&m.vma.range) {
                    let _ = self.uffd.write_protect(m.vma.range, false);
                }
            }
        }
        self.out.sink.end_pass(pass)?;
        Ok(copied)
    }

    /// Copies own pages `batch` of `m`: captures first, else the memory
    /// now (still protected, so still the snapshot's).
    fn own_batch(&mut self, m: &mut VmaModel, batch: &[u64]) -> Result<Copied, DumpError> {
        let (sink, page) = (self.out.sink, self.out.page);
        let p = page.as_usize();
        let store = vma_store(m, self.pid, sink)?;
        let addrs: Vec<u64> = batch.iter().map(|&i| m.addr(i, page).get()).collect();
        let mut buf = vec![0u8; batch.len() * p];
        let reads = self.mem.read(&addrs, &mut buf)?;
        let took = take_captures(self.side, &addrs, &mut buf, p);
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
    ) -> Result<Copied, DumpError> {
        let (sink, page) = (self.out.sink, self.out.page);
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
        let store = object_store(o, sink)?;
        let mut buf = vec![0u8; page.as_usize()];
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
            if let Some(b) = captured_object_page(self.side, &views, i, page) {
                buf.copy_from_slice(&b);
            }
            copied.pages += 1;
            if buf.iter().all(|&b| b == 0) {
                *kind = PageKind::Zero;
                sink.not_stored(&store, i, 1, NotStored::Zero);
            } else {
                sink.write(&store, i, &buf)?;
                copied.stored += 1;
                *kind = PageKind::Data;
            }
        }
        Ok(copied)
    }
}

/// What the handler captured of the pages at `addrs`, its bytes put into
/// `buf` (it overrides what was read: the handler may have lifted the
/// protection before the read). The lock is held only to take the
/// captures, so a waiting writer is not held up by the stores after.
fn take_captures(side: &Side, addrs: &[u64], buf: &mut [u8], p: usize) -> Vec<Option<Took>> {
    let side = side.lock().unwrap_or_else(|e| e.into_inner());
    addrs
        .iter()
        .enumerate()
        .map(|(k, a)| match side.get(a) {
            Some(Captured::Bytes(b)) => {
                buf[k * p..(k + 1) * p].copy_from_slice(b);
                Some(Took::Bytes)
            }
            Some(Captured::Hole) => Some(Took::Not(NotStored::Hole)),
            Some(Captured::FilePage) => Some(Took::Not(NotStored::Object)),
            None => None,
        })
        .collect()
}

/// The bytes the handler captured of object page `i` through any of the
/// target's mappings of it (`views`).
fn captured_object_page(
    side: &Side,
    views: &[&VmaModel],
    i: u64,
    page: PageSize,
) -> Option<Box<[u8]>> {
    let side = side.lock().unwrap_or_else(|e| e.into_inner());
    views.iter().find_map(|m| {
        let first = m.vma.object_page(m.vma.range.start(), page);
        let last = first + m.vma.range.pages(page);
        if !(first..last).contains(&i) {
            return None;
        }
        match side.get(&(m.vma.range.start().get() + (i - first) * page.get())) {
            Some(Captured::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    })
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
    uffd: &SyncUserfaultfd,
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
