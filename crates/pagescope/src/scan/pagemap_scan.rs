//! The `PAGEMAP_SCAN` backend (Linux 6.7+).
//!
//! One ioctl walk per VMA with `anyof = PRESENT|SWAPPED|GUARD` finds every
//! populated page as run-length regions; the gaps are holes. Zero-page
//! regions (`PFNZERO`) and guard regions are complete as reported. Present
//! and swapped regions also need per-page pagemap bits PAGEMAP_SCAN does not
//! have (exclusive, file, swap type/offset): they are read with pagemap in
//! windows that cover nearby regions together, so scattered pages cost a
//! few large reads instead of one read each.
//!
//! Where most 2 MiB blocks hold pages, the walk in front of those reads is
//! pure overhead: [`super::dense`] then switches to reading pagemap
//! directly, step by step, and walks only the blocks whose entries leave a
//! THP or zero page open ([`ScanStrategy`] selects or forces this).
//!
//! `PAGE_IS_FILE` is deliberately not requested: it makes the walk about
//! 3x slower (a page lookup per PTE) and pagemap's bit 61 gives the same
//! answer for the pages whose entries are read anyway.

use rustix::io::Errno;

use super::dense::{self, BlockCounts, StepPlan};
use super::entries::{FLAG_BITS, PresentRules, classify_batch, none_run};
use super::pagemap_read::PagemapReadBackend;
use super::reader::{BATCH_ENTRIES, PagemapReader};
use super::{PageScanner, ScanContext, ScanError, ScanJob, ScanStrategy, classify};
use crate::addr::{VirtAddr, VirtRange};
use crate::kernel::KernelCaps;
use crate::page::{PageFlags, PageInfo, PageState, RunBuilder};
use crate::pagemap::PagemapEntry;
use crate::sys::pagemap_scan::{Region, RegionBuf, ScanCategories as C, ScanRequest, pagemap_scan};
use crate::vma::Backing;

/// Regions per ioctl call.
const VEC_LEN: usize = 16 * 1024;
/// Regions needing entries closer than this many pages share one read.
const WINDOW_GAP_PAGES: u64 = 256;

/// `PAGEMAP_SCAN` walks plus targeted pagemap reads.
#[derive(Debug)]
pub struct PagemapScanBackend {
    anyof: C,
    return_mask: C,
    vec: RegionBuf,
    buf: Vec<u64>,
    fallback: PagemapReadBackend,
    skip_exclusive: bool,
    strategy: ScanStrategy,
}

impl PagemapScanBackend {
    /// A backend using the categories this kernel supports; `None` without
    /// PAGEMAP_SCAN. With `skip_exclusive`, present pages of private
    /// anonymous and shared VMAs are not read from pagemap (and every VMA
    /// is walked, whatever the `strategy`).
    pub fn new(caps: &KernelCaps, skip_exclusive: bool, strategy: ScanStrategy) -> Option<Self> {
        let cats = caps.pagemap_scan?;
        let mut anyof = C::PRESENT | C::SWAPPED;
        anyof |= cats & C::GUARD;
        let mut return_mask = anyof | C::PFNZERO | C::HUGE | C::WRITTEN;
        if caps.soft_dirty {
            return_mask |= cats & C::SOFT_DIRTY;
        }
        Some(Self {
            anyof,
            return_mask,
            vec: RegionBuf::new(VEC_LEN),
            buf: Vec::new(),
            fallback: PagemapReadBackend::new(),
            skip_exclusive,
            strategy,
        })
    }
}

/// What one stretch of a walk is.
enum Segment {
    /// Fully described by the ioctl.
    Known(VirtRange, PageInfo),
    /// Needs per-page pagemap entries.
    Entries(VirtRange, C),
}

impl Segment {
    fn range(&self) -> VirtRange {
        match self {
            Self::Known(r, _) | Self::Entries(r, _) => *r,
        }
    }

    /// Whether plain pagemap entries would not have told this stretch
    /// apart (a PMD-mapped THP or a zero page): reading instead of walking
    /// would then need the walk anyway.
    fn needs_walk(&self) -> bool {
        match self {
            Self::Known(_, info) => {
                info.state == PageState::Zero || info.flags.contains(PageFlags::HUGE)
            }
            Self::Entries(_, cats) => cats.contains(C::HUGE),
        }
    }
}

impl PageScanner for PagemapScanBackend {
    fn scan(&mut self, job: &ScanJob<'_>, out: &mut RunBuilder) -> Result<(), ScanError> {
        let vma = job.vma;
        // PAGEMAP_SCAN skips VM_PFNMAP/VM_IO VMAs ([vvar], device memory)
        // and cannot see above TASK_SIZE ([vsyscall]).
        if vma.backing == Backing::Special {
            return self.fallback.scan(job, out);
        }
        // Without exclusivity, present pages of these VMAs need nothing
        // from pagemap: anon-private pages are never file pages, shared
        // ones always are.
        let implied_file = match vma.backing {
            _ if !self.skip_exclusive => None,
            Backing::Anon if !vma.is_shared() => Some(false),
            _ if vma.is_shared() => Some(true),
            _ => None,
        };
        let strategy = if self.skip_exclusive || vma.backing == Backing::Hugetlb {
            ScanStrategy::Walk
        } else {
            self.strategy
        };
        let mut em = Emitter {
            job,
            rules: PresentRules::new(job.ctx, vma),
            implied_file,
            cursor: job.range.start(),
            out,
        };
        let mut steps = StepPlan::new(job.range, job.ctx.page, strategy);
        while let Some(step) = steps.next_step() {
            let seen = if steps.reading() {
                self.read_step(&mut em, step)?
            } else {
                self.walk_range(&mut em, step)?
            };
            steps.observe(step, seen);
        }
        em.hole_to(job.range.end());
        Ok(())
    }
}

/// Pushes runs in address order for one scan job, filling the gaps
/// between what it is given with holes.
struct Emitter<'j, 'o> {
    job: &'j ScanJob<'j>,
    rules: PresentRules,
    implied_file: Option<bool>,
    /// Everything before it has been pushed.
    cursor: VirtAddr,
    out: &'o mut RunBuilder,
}

impl Emitter<'_, '_> {
    fn ctx(&self) -> &ScanContext<'_> {
        self.job.ctx
    }

    /// A hole from the cursor to `to`.
    fn hole_to(&mut self, to: VirtAddr) {
        let page = self.job.ctx.page;
        if let Some(gap) = VirtRange::new(self.cursor, to).filter(|g| !g.is_empty()) {
            self.out.push(self.cursor, gap.pages(page), PageInfo::HOLE);
        }
        self.cursor = self.cursor.max(to);
    }

    /// `r`, all in one known state.
    fn known(&mut self, r: VirtRange, info: PageInfo) {
        self.hole_to(r.start());
        self.out.push(r.start(), r.pages(self.job.ctx.page), info);
        self.cursor = r.end();
    }

    /// `r`, from its pagemap entries `raw` (the walk saw categories `cats`).
    fn entries(&mut self, r: VirtRange, cats: C, raw: &[u64]) {
        self.hole_to(r.start());
        push_entries(self.job.ctx, &self.rules, cats, r.start(), raw, self.out);
        self.cursor = r.end();
    }

    /// A block read directly: its entries classified as they are.
    fn batch(&mut self, block: VirtRange, raw: &[u64]) {
        self.hole_to(block.start());
        classify_batch(self.job.ctx, &self.rules, block.start(), raw, self.out);
        self.cursor = block.end();
    }
}

impl PagemapScanBackend {
    /// Walks `range` with the ioctl and pushes what it finds (reading
    /// pagemap entries where needed); says how many 2 MiB blocks held pages.
    fn walk_range(
        &mut self,
        em: &mut Emitter<'_, '_>,
        range: VirtRange,
    ) -> Result<BlockCounts, ScanError> {
        let ctx = em.ctx();
        let mut seen = BlockCounts::new(ctx.page);
        let mut start = range.start();
        while start < range.end() {
            let rest = VirtRange::new(start, range.end()).unwrap_or(range);
            let (segments, walk_end) = self.walk(em.job.ctx, rest, em.implied_file)?;
            for seg in &segments {
                seen.add(seg.range(), seg.needs_walk());
            }
            let ctx = em.job.ctx;
            let mut reader = PagemapReader::new(ctx.pagemap, ctx.pid, ctx.page, &mut self.buf);
            emit(em, &segments, &mut reader)?;
            if walk_end <= start {
                break;
            }
            start = walk_end;
        }
        Ok(seen)
    }

    /// Reads the entries of `step` with one pagemap read and classifies
    /// them 2 MiB block by block; blocks whose entries cannot tell a
    /// PMD-mapped THP or a zero page ([`dense::needs_walk`]) are walked
    /// with the ioctl instead.
    fn read_step(
        &mut self,
        em: &mut Emitter<'_, '_>,
        step: VirtRange,
    ) -> Result<BlockCounts, ScanError> {
        let ctx = em.job.ctx;
        // Its own buffer: blocks that need the walk reuse `self.buf`.
        let mut buf = Vec::new();
        let mut seen = BlockCounts::new(ctx.page);
        let mut reader = PagemapReader::new(ctx.pagemap, ctx.pid, ctx.page, &mut buf);
        let raw = reader.read(step)?;
        for (block, entries) in dense::blocks(step, ctx.page, raw) {
            if none_run(entries) == entries.len() {
                continue;
            }
            let walk = dense::needs_walk(ctx, &em.rules, block.start(), entries);
            seen.add(block, walk);
            if walk {
                self.walk_range(em, block)?;
            } else {
                em.batch(block, entries);
            }
        }
        Ok(seen)
    }

    /// One ioctl call from `range.start()`; returns the segments and
    /// `walk_end`.
    fn walk(
        &mut self,
        ctx: &ScanContext<'_>,
        range: VirtRange,
        implied_file: Option<bool>,
    ) -> Result<(Vec<Segment>, VirtAddr), ScanError> {
        let req = ScanRequest::new(range)
            .any_of(self.anyof)
            .returning(self.return_mask);
        let reply = pagemap_scan(ctx.pagemap, &req, Some(&mut self.vec)).map_err(|e| match e {
            Errno::SRCH => ScanError::TargetExited { pid: ctx.pid },
            e => ScanError::Ioctl {
                pid: ctx.pid,
                range,
                source: e.into(),
            },
        })?;
        let segments = self
            .vec
            .filled(reply.filled)
            .map(|r| segment(r, implied_file))
            .collect();
        Ok((segments, reply.walk_end))
    }
}

fn segment(r: Region, implied_file: Option<bool>) -> Segment {
    let (range, cats) = (r.range, r.categories);
    if cats.contains(C::GUARD) {
        return Segment::Known(range, PageInfo::of(PageState::Guard));
    }
    let mut flags = PageFlags::empty();
    flags.set(PageFlags::HUGE, cats.contains(C::HUGE));
    flags.set(PageFlags::UFFD_WP, !cats.contains(C::WRITTEN));
    flags.set(PageFlags::SOFT_DIRTY, cats.contains(C::SOFT_DIRTY));
    if cats.contains(C::PRESENT | C::PFNZERO) {
        return Segment::Known(range, PageInfo::with(PageState::Zero, flags));
    }
    if let (true, Some(file)) = (cats.contains(C::PRESENT), implied_file) {
        flags.set(PageFlags::FILE, file);
        return Segment::Known(range, PageInfo::with(PageState::Present, flags));
    }
    Segment::Entries(range, cats)
}

/// Pushes the segments (and the holes between them) in order, reading
/// pagemap in windows for the segments that need entries.
fn emit(
    em: &mut Emitter<'_, '_>,
    segments: &[Segment],
    reader: &mut PagemapReader<'_, '_>,
) -> Result<(), ScanError> {
    let page = em.job.ctx.page;
    let mut i = 0;
    while i < segments.len() {
        match &segments[i] {
            Segment::Known(r, info) => {
                em.known(*r, *info);
                i += 1;
            }
            Segment::Entries(r, cats) if r.pages(page) >= BATCH_ENTRIES as u64 / 2 => {
                reader.for_each_batch(*r, |addr, raw| {
                    let part = VirtRange::from_start_len(addr, raw.len() as u64 * page.get())
                        .unwrap_or_default();
                    em.entries(part, *cats, raw);
                    Ok(())
                })?;
                i += 1;
            }
            Segment::Entries(..) => i = emit_window(em, segments, i, reader)?,
        }
    }
    Ok(())
}

/// Reads one window starting at `segments[first]` covering the following
/// small, nearby segments, and pushes them all. Returns the next index.
fn emit_window(
    em: &mut Emitter<'_, '_>,
    segments: &[Segment],
    first: usize,
    reader: &mut PagemapReader<'_, '_>,
) -> Result<usize, ScanError> {
    let page = em.job.ctx.page.get();
    let start = segments[first].range().start();
    let max_end = start.saturating_add(BATCH_ENTRIES as u64 * page);
    let mut last = first;
    while let Some(next) = segments.get(last + 1) {
        let (prev, r) = (segments[last].range(), next.range());
        let near =
            r.start().checked_offset_from(prev.end()).unwrap_or(0) / page <= WINDOW_GAP_PAGES;
        if !near || r.end() > max_end {
            break;
        }
        last += 1;
    }
    let window = VirtRange::new(start, segments[last].range().end()).unwrap_or_default();
    let raw = reader.read(window)?;
    for seg in &segments[first..=last] {
        match seg {
            Segment::Known(r, info) => em.known(*r, *info),
            Segment::Entries(r, cats) => {
                let off = (r.start().get() - start.get()) / page;
                let n = r.pages(em.job.ctx.page);
                em.entries(*r, *cats, &raw[off as usize..(off + n) as usize]);
            }
        }
    }
    Ok(last + 1)
}

/// Pushes pages whose region categories are `cats`, using their entries.
/// An entry that changed since the walk (the target runs on) is trusted
/// over the walk: it is the newer observation.
fn push_entries(
    ctx: &ScanContext<'_>,
    rules: &PresentRules,
    cats: C,
    addr: VirtAddr,
    raw: &[u64],
    out: &mut RunBuilder,
) {
    let huge = cats.contains(C::HUGE);
    let all_present = raw.iter().all(|&r| PagemapEntry(r).is_present());
    if cats.contains(C::PRESENT) && all_present {
        let mut i = 0;
        while i < raw.len() {
            let n = same_flags_run(&raw[i..]);
            let info = classify::present(PagemapEntry(raw[i]), false, huge);
            out.push(
                addr.saturating_add(i as u64 * ctx.page.get()),
                n as u64,
                info,
            );
            i += n;
        }
    } else {
        classify_batch(ctx, rules, addr, raw, out);
    }
}

/// Length of the leading run of entries whose flag bits equal the first's.
pub(super) fn same_flags_run(raw: &[u64]) -> usize {
    let key = raw[0] & FLAG_BITS;
    1 + raw[1..]
        .iter()
        .take_while(|&&r| r & FLAG_BITS == key)
        .count()
}
