//! The copy workers: a process's own pages read with `process_vm_readv`
//! in large vectors (`remote.rs`), on a few threads (`crate::parallel`),
//! shared objects' pages with `pread` on pagescope's fd of the object
//! (never through the target's mappings, so nothing is mapped into it),
//! all written to the [`PageSink`]. Each page copied is checked: all
//! zeros → `Zero` (not stored); equal to the parent image's → `InParent`
//! (not stored); in a forked tree, the same COW-shared frame as a page
//! stored already → `Dedup` (not stored); else stored by page index.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::DumpError;
use super::model::{ObjectModel, VmaModel};
use super::remote::RemoteMem;
use super::sink::{NotStored, PageSink, StoreOwner, StoreRef};
use crate::addr::PageSize;
use crate::image::format::{DedupRef, PageKind};
use crate::image::read::{Image, PageFill};
use crate::pagemap::{PagemapEntry, PagemapFlags};

/// Bytes read per `process_vm_readv` / `pread`.
const BATCH_BYTES: usize = 4 << 20;

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
    /// Page `at` is being copied again: pages pointing at it must be too.
    fn rewritten(&mut self, at: DedupRef) {
        if let Some(deps) = self.dependents.remove(&at) {
            self.by_frame.retain(|_, s| s.at != at);
            self.invalidated.extend(deps);
        }
    }
}

/// Where copies go, and who hears how many pages were read.
pub struct Dest<'a> {
    /// The sink.
    pub sink: &'a dyn PageSink,
    /// Base page size.
    pub page: PageSize,
    /// Told the pages read after every batch.
    pub tick: &'a mut dyn FnMut(u64),
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
    dest: &mut Dest<'_>,
    parent: &Parent<'_>,
    frames: Option<&mut Frames>,
    mem: &RemoteMem,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let page = dest.page;
    let p = page.as_usize();
    let vma_start = m.vma.range.start().get();
    let store = match &m.store {
        Some(s) => s.clone(),
        None => {
            let owner = StoreOwner::Vma { pid, vma_start };
            let s = dest.sink.open_store(owner, m.kinds.len() as u64)?;
            m.store = Some(s.clone());
            s
        }
    };
    let job = Job {
        pid,
        vma_start,
        page,
        sink: dest.sink,
        store: &store,
        parent,
        mem,
    };
    let per_batch = BATCH_BYTES / p;
    let workers = crate::parallel::workers(0, pages.len().div_ceil(per_batch)).min(MAX_WORKERS);
    let mut done = Done::default();
    let out = if frames.is_some() || workers < 2 || pages.len() < 4 * per_batch {
        let mut w = Worker::new(p);
        let mut frames = frames;
        let mut copied = Copied::default();
        for batch in pages.chunks(per_batch) {
            copied += w.batch(&job, batch, frames.as_deref_mut(), &mut done)?;
            (dest.tick)(batch.len() as u64);
        }
        copied
    } else {
        parallel(&job, pages, workers, per_batch, dest, &mut done)?
    };
    for (i, kind) in done.kinds {
        if let Some(k) = m.kinds.get_mut(usize::try_from(i).unwrap_or(usize::MAX)) {
            *k = kind;
        }
    }
    for (i, ty, offset) in done.slots {
        m.swap_slots.insert(i, (ty, offset));
    }
    for (i, d) in done.dedup {
        m.dedup.retain(|(q, _)| *q != i);
        m.dedup.push((i, d));
    }
    Ok(out)
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

/// What a copy decided, page by page.
#[derive(Default)]
struct Done {
    kinds: Vec<(u64, PageKind)>,
    dedup: Vec<(u64, DedupRef)>,
    /// Pages left swapped (`--swap skip`): (page, swap type, offset).
    slots: Vec<(u64, u8, u64)>,
}

impl Done {
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
    dest: &mut Dest<'_>,
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
                (dest.tick)(all - reported);
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
            let here = DedupRef {
                pid: job.pid,
                vma_start: job.vma_start,
                page: i,
            };
            if let Some(f) = frames.as_deref_mut() {
                f.rewritten(here);
            }
            let shared_frame = shared_frame(read[k].entry);
            if read[k].skipped {
                let (ty, offset) = read[k].entry.swap_raw();
                done.slots.push((i, ty, offset));
                done.kinds.push((i, PageKind::Swapped));
                sink.not_stored(store, i, 1, NotStored::Swapped);
                continue;
            }
            if !read[k].ok {
                // Unmapped meanwhile: the layout check settles it.
                done.kinds.push((i, PageKind::Hole));
                sink.not_stored(store, i, 1, NotStored::Hole);
                continue;
            }
            let bytes = &self.buf[k * p..(k + 1) * p];
            copied.pages += 1;
            let not_stored = if bytes.iter().all(|&b| b == 0) {
                Some(NotStored::Zero)
            } else if job.parent.same(i, bytes, &mut self.scratch) {
                Some(NotStored::InParent)
            } else {
                frames
                    .as_deref_mut()
                    .and_then(|f| dedup(f, sink, shared_frame, here, bytes, &mut self.scratch))
                    .map(NotStored::Dedup)
            };
            if let Some(why) = not_stored {
                sink.not_stored(store, i, 1, why);
                done.kinds.push((i, kind_of(why)));
                if let NotStored::Dedup(d) = why {
                    done.dedup.push((i, d));
                }
                continue;
            }
            // Consecutive pages go out in one write (tree mode writes at
            // once: a dedup check may read this page back).
            match pending {
                Some((first, from, n))
                    if first + n == i && from + n as usize == k && frames.is_none() =>
                {
                    pending = Some((first, from, n + 1));
                }
                _ => {
                    flush(job, &self.buf, p, pending.take())?;
                    pending = Some((i, k, 1));
                }
            }
            if let Some(f) = frames.as_deref_mut() {
                flush(job, &self.buf, p, pending.take())?;
                if let Some(pfn) = shared_frame {
                    f.by_frame.entry(pfn).or_insert_with(|| Source {
                        at: here,
                        store: store.clone(),
                    });
                }
            }
            copied.stored += 1;
            done.kinds.push((i, PageKind::Data));
        }
        flush(job, &self.buf, p, pending.take())?;
        Ok(copied)
    }
}

/// The page kind the image records for a page not stored for `why`.
pub(super) fn kind_of(why: NotStored) -> PageKind {
    match why {
        NotStored::Zero => PageKind::Zero,
        NotStored::Hole => PageKind::Hole,
        NotStored::InParent => PageKind::InParent,
        NotStored::Swapped => PageKind::Swapped,
        NotStored::Object => PageKind::Object,
        NotStored::Dedup(_) => PageKind::Dedup,
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

/// Copies object pages `pages` (sorted object page indices) with `pread`;
/// pages in `skip` (swapped out, `--swap skip`) are recorded as swapped.
pub fn object(
    o: &mut ObjectModel,
    pages: &[u64],
    skip: &std::collections::BTreeSet<u64>,
    dest: &mut Dest<'_>,
    parent: &Parent<'_>,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let page = dest.page;
    let p = page.as_usize();
    let sink = dest.sink;
    let store = object_store(o, sink)?;
    let mut buf = vec![0u8; p];
    let mut scratch = vec![0u8; p];
    let mut out = Copied::default();
    for &i in pages {
        let ix = usize::try_from(i).unwrap_or(usize::MAX);
        if ix >= o.kinds.len() {
            continue;
        }
        if skip.contains(&i) {
            sink.not_stored(&store, i, 1, NotStored::Swapped);
            o.kinds[ix] = PageKind::Swapped;
            continue;
        }
        let n = pread_page(o.fd.as_fd(), &mut buf, page.bytes(i)).map_err(|source| {
            DumpError::ObjectRead {
                inode: o.id.inode,
                source,
            }
        })?;
        buf[n..].fill(0);
        out.pages += 1;
        let kind = if buf.iter().all(|&b| b == 0) {
            PageKind::Zero
        } else if parent.same(i, &buf, &mut scratch) {
            PageKind::InParent
        } else {
            sink.write(&store, i, &buf)?;
            out.stored += 1;
            PageKind::Data
        };
        match kind {
            PageKind::Zero => sink.not_stored(&store, i, 1, NotStored::Zero),
            PageKind::InParent => sink.not_stored(&store, i, 1, NotStored::InParent),
            _ => {}
        }
        o.kinds[ix] = kind;
        if out.pages % 1024 == 0 {
            (dest.tick)(1024);
        }
    }
    (dest.tick)(out.pages % 1024);
    Ok(out)
}

/// The store of object `o`'s pages (opened on first use).
pub(super) fn object_store(
    o: &mut ObjectModel,
    sink: &dyn PageSink,
) -> Result<StoreRef, DumpError> {
    if let Some(s) = &o.store {
        return Ok(s.clone());
    }
    let s = sink.open_store(StoreOwner::Object(o.id), o.pages)?;
    o.store = Some(s.clone());
    Ok(s)
}

/// One page at `off` (short at end of file).
pub(super) fn pread_page(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}
