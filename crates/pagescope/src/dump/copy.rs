//! Copying pages into an image's stores: a process's own pages with
//! `process_vm_readv` in large vectors, shared objects' pages with `pread`
//! on pagescope's fd of the object (never through the target's mappings,
//! so nothing is mapped into it). Each page copied is checked: all zeros
//! → `Zero` (not stored); equal to the parent image's → `InParent` (not
//! stored); else stored at its fixed offset.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::DumpError;
use super::model::{ObjectModel, VmaModel};
use super::remote::RemoteMem;
use crate::addr::PageSize;
use crate::image::format::{DedupRef, PageKind};
use crate::image::read::{Image, PageFill};
use crate::image::write::{ImageWriter, Store};
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
    pub store: Arc<Store>,
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

/// Where copies go.
pub struct Sink<'a> {
    /// The image.
    pub writer: &'a ImageWriter,
    /// Base page size.
    pub page: PageSize,
    /// Told the pages read after every batch.
    pub tick: &'a mut dyn FnMut(u64),
}

/// Copies pages `pages` (sorted indices) of the process's own memory in
/// mapping `m` of process `pid`: in parallel workers (one per CPU, at most
/// [`MAX_WORKERS`]) writing their pages at their fixed offsets, or in
/// order for a forked tree (deduplication looks back at stored pages).
pub fn own(
    pid: u32,
    m: &mut VmaModel,
    pages: &[u64],
    sink: &mut Sink<'_>,
    parent: &Parent<'_>,
    frames: Option<&mut Frames>,
    mem: &RemoteMem,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let page = sink.page;
    let p = page.as_usize();
    let store = match &m.store {
        Some(s) => s.clone(),
        None => {
            let name = format!("p{pid}-{:x}", m.vma.range.start().get());
            let s = sink.writer.new_store(&name, m.kinds.len() as u64)?;
            m.store = Some(s.clone());
            s
        }
    };
    let job = Job {
        pid,
        vma_start: m.vma.range.start().get(),
        page,
        store: &store,
        parent,
        mem,
    };
    let per_batch = BATCH_BYTES / p;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS);
    let mut done = Done::default();
    let out = if frames.is_some() || workers < 2 || pages.len() < 4 * per_batch {
        let mut w = Worker::new(p);
        let mut frames = frames;
        for batch in pages.chunks(per_batch) {
            w.batch(&job, batch, frames.as_deref_mut(), &mut done)?;
            (sink.tick)(batch.len() as u64);
        }
        w.copied
    } else {
        parallel(&job, pages, workers, per_batch, sink, &mut done)?
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
    store: &'a Arc<Store>,
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

/// One worker's buffers and counts.
struct Worker {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    p: usize,
    copied: Copied,
}

/// `pages` cut into one contiguous share per worker; the calling thread
/// is worker 0 and reports progress for all.
fn parallel(
    job: &Job<'_>,
    pages: &[u64],
    workers: usize,
    per_batch: usize,
    sink: &mut Sink<'_>,
    done: &mut Done,
) -> Result<Copied, DumpError> {
    let p = job.page.as_usize();
    let share = pages.len().div_ceil(workers).div_ceil(per_batch) * per_batch;
    let progress = std::sync::atomic::AtomicU64::new(0);
    let mut parts = pages.chunks(share);
    let first = parts.next().unwrap_or_default();
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .map(|part| {
                let progress = &progress;
                s.spawn(move || -> Result<(Copied, Done), DumpError> {
                    let mut w = Worker::new(p);
                    let mut d = Done::default();
                    for batch in part.chunks(per_batch) {
                        w.batch(job, batch, None, &mut d)?;
                        progress
                            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok((w.copied, d))
                })
            })
            .collect();
        let mut w = Worker::new(p);
        let mut reported = 0;
        for batch in first.chunks(per_batch) {
            w.batch(job, batch, None, done)?;
            let all = progress.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed)
                + batch.len() as u64;
            (sink.tick)(all - reported);
            reported = all;
        }
        let mut copied = w.copied;
        for h in handles {
            let (c, d) = h.join().map_err(|_| DumpError::Read {
                pid: job.pid,
                source: std::io::Error::other("a copy worker panicked"),
            })??;
            copied += c;
            done.kinds.extend(d.kinds);
            done.slots.extend(d.slots);
        }
        let all = progress.load(std::sync::atomic::Ordering::Relaxed);
        (sink.tick)(all - reported);
        Ok(copied)
    })
}

impl Worker {
    fn new(p: usize) -> Self {
        Self {
            buf: vec![0u8; BATCH_BYTES],
            scratch: vec![0u8; p],
            p,
            copied: Copied::default(),
        }
    }

    /// Reads, classifies and stores one batch of pages.
    fn batch(
        &mut self,
        job: &Job<'_>,
        batch: &[u64],
        mut frames: Option<&mut Frames>,
        done: &mut Done,
    ) -> Result<(), DumpError> {
        let p = self.p;
        let store = job.store;
        let addrs: Vec<u64> = batch
            .iter()
            .map(|&i| job.vma_start + job.page.bytes(i))
            .collect();
        let read = job.mem.read(&addrs, &mut self.buf[..batch.len() * p])?;
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
                store.forget(i, 1);
                continue;
            }
            if !read[k].ok {
                // Unmapped meanwhile: the layout check settles it.
                done.kinds.push((i, PageKind::Hole));
                store.forget(i, 1);
                continue;
            }
            let bytes = &self.buf[k * p..(k + 1) * p];
            self.copied.pages += 1;
            let kind = if bytes.iter().all(|&b| b == 0) {
                PageKind::Zero
            } else if job.parent.same(i, bytes, &mut self.scratch) {
                PageKind::InParent
            } else if let Some(d) = frames
                .as_deref_mut()
                .and_then(|f| dedup(f, shared_frame, here, bytes, &mut self.scratch))
            {
                done.dedup.push((i, d));
                PageKind::Dedup
            } else {
                // Consecutive pages go out in one write (tree mode writes
                // at once: a dedup check may read this page back).
                match pending {
                    Some((first, from, n))
                        if first + n == i && from + n as usize == k && frames.is_none() =>
                    {
                        pending = Some((first, from, n + 1));
                    }
                    _ => {
                        flush(store, &self.buf, p, pending.take())?;
                        pending = Some((i, k, 1));
                    }
                }
                if let Some(f) = frames.as_deref_mut() {
                    flush(store, &self.buf, p, pending.take())?;
                    if let Some(pfn) = shared_frame {
                        f.by_frame.entry(pfn).or_insert_with(|| Source {
                            at: here,
                            store: Arc::clone(store),
                        });
                    }
                }
                self.copied.stored += 1;
                PageKind::Data
            };
            if kind != PageKind::Data {
                store.forget(i, 1);
            }
            done.kinds.push((i, kind));
        }
        flush(store, &self.buf, p, pending.take())
    }
}

/// Writes the run of `n` pages starting at store page `first`, which sit
/// in `buf` from page `from` on.
fn flush(
    store: &Store,
    buf: &[u8],
    p: usize,
    run: Option<(u64, usize, u64)>,
) -> Result<(), DumpError> {
    if let Some((first, from, n)) = run {
        store.write(first, &buf[from * p..(from + n as usize) * p])?;
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
    pfn: Option<u64>,
    here: DedupRef,
    bytes: &[u8],
    scratch: &mut [u8],
) -> Option<DedupRef> {
    let pfn = pfn?;
    let src = frames.by_frame.get(&pfn)?;
    if src.at == here || !src.store.holds(src.at.page) {
        return None;
    }
    src.store.read(src.at.page, scratch).ok()?;
    if scratch != bytes {
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
    sink: &mut Sink<'_>,
    parent: &Parent<'_>,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let page = sink.page;
    let p = page.as_usize();
    let store = match &o.store {
        Some(s) => s.clone(),
        None => {
            let name = format!("o{}-{}", o.id.dev.to_string().replace(':', "_"), o.id.inode);
            let s = sink.writer.new_store(&name, o.pages)?;
            o.store = Some(s.clone());
            s
        }
    };
    let mut buf = vec![0u8; p];
    let mut scratch = vec![0u8; p];
    let mut out = Copied::default();
    for &i in pages {
        let ix = usize::try_from(i).unwrap_or(usize::MAX);
        if ix >= o.kinds.len() {
            continue;
        }
        if skip.contains(&i) {
            store.forget(i, 1);
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
            store.write(i, &buf)?;
            out.stored += 1;
            PageKind::Data
        };
        if kind != PageKind::Data {
            store.forget(i, 1);
        }
        o.kinds[ix] = kind;
        if out.pages % 1024 == 0 {
            (sink.tick)(1024);
        }
    }
    (sink.tick)(out.pages % 1024);
    Ok(out)
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
