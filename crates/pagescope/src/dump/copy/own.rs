//! The copy workers for a process's own pages: read with
//! `process_vm_readv` in large vectors (`remote.rs`: pages another
//! process shares through `/proc/PID/mem`), on a few threads
//! (`crate::parallel`, the calling thread reporting progress), each page
//! classified and written to the sink by page index, consecutive pages in
//! one write. In a forked tree (`--tree`) pages are copied in order: a
//! COW-shared page (same frame in pagemap, not exclusive) already stored
//! for another process is recorded as a reference to it (`Dedup`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Copied, Out, Parent, kind_of};
use crate::addr::PageSize;
use crate::dump::DumpError;
use crate::dump::model::VmaModel;
use crate::dump::remote::RemoteMem;
use crate::dump::sink::{NotStored, PageSink, StoreOwner, StoreRef};
use crate::image::format::{DedupRef, PageKind};
use crate::pagemap::{PagemapEntry, PagemapFlags};

/// Bytes read per `process_vm_readv`.
const BATCH_BYTES: usize = 4 << 20;

/// A stored page other processes' pages may point at: where it is and
/// the store holding it.
#[derive(Clone, Debug)]
pub struct Source {
    /// The page.
    pub at: DedupRef,
    /// Its store.
    pub store: StoreRef,
}

/// Dedup state of a forked tree: page frame → the first copy stored of
/// it, and per stored source page the pages deduplicated against it (to
/// copy again if the source is rewritten).
#[derive(Debug, Default)]
pub struct Frames {
    by_frame: HashMap<u64, Source>,
    dependents: HashMap<DedupRef, Vec<DedupRef>>,
    /// Pages whose source was rewritten: to copy again.
    pub invalidated: Vec<DedupRef>,
}

impl Frames {
    /// Page `at`, in COW-shared frame `pfn`, was stored in `store`: the
    /// first such copy is the one others point at.
    fn stored(&mut self, pfn: u64, at: DedupRef, store: &StoreRef) {
        self.by_frame.entry(pfn).or_insert_with(|| Source {
            at,
            store: store.clone(),
        });
    }

    /// Page `at` is being copied again: pages pointing at it must be too.
    fn rewritten(&mut self, at: DedupRef) {
        if let Some(deps) = self.dependents.remove(&at) {
            self.by_frame.retain(|_, s| s.at != at);
            self.invalidated.extend(deps);
        }
    }
}

/// Copies pages `pages` (sorted indices) of the process's own memory in
/// mapping `m` of process `pid`: in parallel workers (`crate::parallel`,
/// at most [`MAX_WORKERS`]) writing their pages at their fixed places in
/// the store, or in order for a forked tree (deduplication looks back at
/// stored pages).
pub fn own(
    pid: u32,
    m: &mut VmaModel,
    pages: &[u64],
    out: &mut Out<'_>,
    parent: &Parent<'_>,
    frames: Option<&mut Frames>,
    mem: &RemoteMem,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let store = vma_store(m, pid, out.sink)?;
    let job = Job {
        pid,
        vma_start: m.vma.range.start().get(),
        page: out.page,
        sink: out.sink,
        store: &store,
        parent,
        mem,
    };
    let per_batch = BATCH_BYTES / out.page.as_usize();
    let workers = crate::parallel::workers(0, pages.len().div_ceil(per_batch)).min(MAX_WORKERS);
    let mut done = Done::default();
    let copied = if frames.is_some() || workers < 2 || pages.len() < 4 * per_batch {
        in_order(&job, pages, per_batch, frames, out, &mut done)?
    } else {
        parallel(&job, pages, workers, per_batch, out, &mut done)?
    };
    done.apply(m);
    Ok(copied)
}

/// The store of `m`'s own pages (opened on first use).
pub(in crate::dump) fn vma_store(
    m: &mut VmaModel,
    pid: u32,
    sink: &dyn PageSink,
) -> Result<StoreRef, DumpError> {
    if let Some(s) = &m.store {
        return Ok(s.clone());
    }
    let owner = StoreOwner::Mapping {
        pid,
        start: m.vma.range.start(),
    };
    let s = sink.open_store(owner, m.kinds.len() as u64)?;
    m.store = Some(s.clone());
    Ok(s)
}

/// The batches of `pages` one after the other on this thread (a forked
/// tree's dedup looks back at what was stored before).
fn in_order(
    job: &Job<'_>,
    pages: &[u64],
    per_batch: usize,
    mut frames: Option<&mut Frames>,
    out: &mut Out<'_>,
    done: &mut Done,
) -> Result<Copied, DumpError> {
    let mut w = Worker::new(job.page.as_usize());
    let mut copied = Copied::default();
    for batch in pages.chunks(per_batch) {
        copied += w.batch(job, batch, frames.as_deref_mut(), done)?;
        out.progress.tick(batch.len() as u64);
    }
    Ok(copied)
}

/// Workers at most per mapping.
pub const MAX_WORKERS: usize = 4;

/// What every worker of one copy shares.
struct Job<'a> {
    pid: u32,
    vma_start: u64,
    page: PageSize,
    sink: &'a dyn PageSink,
    store: &'a StoreRef,
    parent: &'a Parent<'a>,
    mem: &'a RemoteMem,
}

impl Job<'_> {
    /// Page `i` of the mapping, as a dedup reference names it.
    fn here(&self, i: u64) -> DedupRef {
        DedupRef {
            pid: self.pid,
            vma_start: self.vma_start,
            page: i,
        }
    }
}

/// What a copy decided, page by page.
#[derive(Default)]
struct Done {
    kinds: Vec<(u64, PageKind)>,
    dedup: Vec<(u64, DedupRef)>,
    /// Pages left swapped (`--swap skip`): (page, swap type, offset).
    slots: Vec<(u64, u8, u64)>,
}

impl Done {
    /// Records what was decided in the model.
    fn apply(self, m: &mut VmaModel) {
        for (i, kind) in self.kinds {
            if let Some(k) = m.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
                *k = kind;
            }
        }
        for (i, ty, offset) in self.slots {
            m.swap_slots.insert(i, (ty, offset));
        }
        for (i, d) in self.dedup {
            m.dedup.retain(|(q, _)| *q != i);
            m.dedup.push((i, d));
        }
    }

    /// Page `i` is not stored, for `why`.
    fn not_stored(&mut self, i: u64, why: NotStored) {
        self.kinds.push((i, kind_of(why)));
        if let NotStored::Dedup(d) = why {
            self.dedup.push((i, d));
        }
    }

    fn extend(&mut self, o: Done) {
        self.kinds.extend(o.kinds);
        self.dedup.extend(o.dedup);
        self.slots.extend(o.slots);
    }
}

/// One worker's buffers.
struct Worker {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    p: usize,
}

/// Sets a flag and wakes a thread when dropped (also by a panic).
struct Finished<'a>(&'a AtomicBool, std::thread::Thread);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
        self.1.unpark();
    }
}

/// The batches of `pages` on `workers` threads (`crate::parallel`); the
/// calling thread reports their progress as they go. A worker's panic is
/// resumed here, as a panic.
fn parallel(
    job: &Job<'_>,
    pages: &[u64],
    workers: usize,
    per_batch: usize,
    out: &mut Out<'_>,
    done: &mut Done,
) -> Result<Copied, DumpError> {
    let p = job.page.as_usize();
    let batches: Vec<&[u64]> = pages.chunks(per_batch).collect();
    let progress = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let caller = std::thread::current();
    let results = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let _finished = Finished(&finished, caller.clone());
            crate::parallel::run(
                batches.len(),
                workers,
                || Worker::new(p),
                |w, i| {
                    let mut d = Done::default();
                    let c = w.batch(job, batches[i], None, &mut d)?;
                    progress.fetch_add(batches[i].len() as u64, Ordering::Relaxed);
                    caller.unpark();
                    Ok((c, d))
                },
                |_: &DumpError| true,
            )
        });
        let mut reported = 0;
        loop {
            let end = finished.load(Ordering::Acquire);
            let all = progress.load(Ordering::Relaxed);
            if all > reported {
                out.progress.tick(all - reported);
                reported = all;
            }
            if end {
                break;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(50));
        }
        h.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let mut copied = Copied::default();
    for r in results.into_iter().flatten() {
        let (c, d) = r?;
        copied += c;
        done.extend(d);
    }
    Ok(copied)
}

impl Worker {
    fn new(p: usize) -> Self {
        Self {
            buf: vec![0u8; BATCH_BYTES],
            scratch: vec![0u8; p],
            p,
        }
    }

    /// Reads, classifies and stores one batch of pages.
    fn batch(
        &mut self,
        job: &Job<'_>,
        batch: &[u64],
        mut frames: Option<&mut Frames>,
        done: &mut Done,
    ) -> Result<Copied, DumpError> {
        let p = self.p;
        let (sink, store) = (job.sink, job.store);
        let addrs: Vec<u64> = batch
            .iter()
            .map(|&i| job.vma_start + job.page.bytes(i))
            .collect();
        let read = job.mem.read(&addrs, &mut self.buf[..batch.len() * p])?;
        let mut copied = Copied::default();
        let mut pending: Option<(u64, usize, u64)> = None;
        for (k, &i) in batch.iter().enumerate() {
            let here = job.here(i);
            if let Some(f) = frames.as_deref_mut() {
                f.rewritten(here);
            }
            let shared_frame = shared_frame(read[k].entry);
            let why = if read[k].skipped {
                let (ty, offset) = read[k].entry.swap_raw();
                done.slots.push((i, ty, offset));
                Some(NotStored::Swapped)
            } else if !read[k].ok {
                // Unmapped meanwhile: the layout check settles it.
                Some(NotStored::Hole)
            } else {
                copied.pages += 1;
                let bytes = &self.buf[k * p..(k + 1) * p];
                let frames = frames.as_deref_mut();
                not_stored(job, i, bytes, frames, shared_frame, &mut self.scratch)
            };
            if let Some(why) = why {
                sink.not_stored(store, i, 1, why);
                done.not_stored(i, why);
                continue;
            }
            match frames.as_deref_mut() {
                // Tree mode writes at once: a dedup check may read this
                // page back.
                Some(f) => {
                    flush(job, &self.buf, p, Some((i, k, 1)))?;
                    if let Some(pfn) = shared_frame {
                        f.stored(pfn, here, store);
                    }
                }
                // Consecutive pages go out in one write.
                None => pending = extend_run(job, &self.buf, p, pending, (i, k))?,
            }
            copied.stored += 1;
            done.kinds.push((i, PageKind::Data));
        }
        flush(job, &self.buf, p, pending.take())?;
        Ok(copied)
    }
}

/// Why page `i` (`bytes`, in frame `shared_frame` if COW-shared) need not
/// be stored, if it need not: zero, as in the parent, or (a forked tree)
/// the same as a page stored already.
fn not_stored(
    job: &Job<'_>,
    i: u64,
    bytes: &[u8],
    frames: Option<&mut Frames>,
    shared_frame: Option<u64>,
    scratch: &mut [u8],
) -> Option<NotStored> {
    let here = job.here(i);
    if bytes.iter().all(|&b| b == 0) {
        Some(NotStored::Zero)
    } else if job.parent.same(i, bytes, scratch) {
        Some(NotStored::InParent)
    } else {
        let f = frames?;
        dedup(f, job.sink, shared_frame, here, bytes, scratch).map(NotStored::Dedup)
    }
}

/// Adds page `i` (at `k` in `buf`) to the `pending` run of pages to
/// write, writing the run first if the page does not continue it.
fn extend_run(
    job: &Job<'_>,
    buf: &[u8],
    p: usize,
    pending: Option<(u64, usize, u64)>,
    (i, k): (u64, usize),
) -> Result<Option<(u64, usize, u64)>, DumpError> {
    match pending {
        Some((first, from, n)) if first + n == i && from + n as usize == k => {
            Ok(Some((first, from, n + 1)))
        }
        other => {
            flush(job, buf, p, other)?;
            Ok(Some((i, k, 1)))
        }
    }
}

/// Writes the run of `n` pages starting at store page `first`, which sit
/// in `buf` from page `from` on.
fn flush(
    job: &Job<'_>,
    buf: &[u8],
    p: usize,
    run: Option<(u64, usize, u64)>,
) -> Result<(), DumpError> {
    if let Some((first, from, n)) = run {
        let bytes = &buf[from * p..(from + n as usize) * p];
        job.sink.write(job.store, first, bytes)?;
    }
    Ok(())
}

/// The page frame of a present page mapped by more than one process (a
/// COW-shared page of a forked tree); PFNs need CAP_SYS_ADMIN.
fn shared_frame(e: PagemapEntry) -> Option<u64> {
    let shared = e.is_present() && !e.flags().contains(PagemapFlags::EXCLUSIVE);
    e.pfn().filter(|&f| shared && f != 0)
}

/// A COW-shared page (frame `pfn`, not exclusive) already stored for
/// another page with the same bytes: where it is (recorded as dependent).
fn dedup(
    frames: &mut Frames,
    sink: &dyn PageSink,
    pfn: Option<u64>,
    here: DedupRef,
    bytes: &[u8],
    scratch: &mut [u8],
) -> Option<DedupRef> {
    let src = frames.by_frame.get(&pfn?)?;
    if src.at == here || !sink.read_back(&src.store, src.at.page, scratch) || scratch != bytes {
        return None;
    }
    let at = src.at;
    frames.dependents.entry(at).or_default().push(here);
    Some(at)
}
