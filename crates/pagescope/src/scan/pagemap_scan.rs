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
use super::{PageScanner, ScanContext, ScanError, ScanStrategy, classify};
use crate::addr::{VirtAddr, VirtRange};
use crate::kernel::KernelCaps;
use crate::page::{PageFlags, PageInfo, PageState, RunBuilder};
use crate::pagemap::PagemapEntry;
use crate::sys::pagemap_scan::{Region, RegionBuf, ScanCategories as C, ScanRequest, pagemap_scan};
use crate::vma::{Backing, Vma};

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
    fn name(&self) -> &'static str {
        "pagemap_scan"
    }

    fn scan_vma(
        &mut self,
        ctx: &ScanContext<'_>,
        vma: &Vma,
        range: VirtRange,
        out: &mut RunBuilder,
    ) -> Result<(), ScanError> {
        // PAGEMAP_SCAN skips VM_PFNMAP/VM_IO VMAs ([vvar], device memory)
        // and cannot see above TASK_SIZE ([vsyscall]).
        if vma.backing == Backing::Special {
            return self.fallback.scan_vma(ctx, vma, range, out);
        }
        let rules = PresentRules::new(ctx, vma);
        // Without exclusivity, present pages of these VMAs need nothing
        // from pagemap: anon-private pages are never file pages, shared
        // ones always are.
        let implied_file = match vma.backing {
            _ if !self.skip_exclusive => None,
            Backing::Anon if !vma.is_shared() => Some(false),
            _ if vma.is_shared() => Some(true),
            _ => None,
        };
        let mut cursor = range.start();
        let strategy = if self.skip_exclusive || vma.backing == Backing::Hugetlb {
            ScanStrategy::Walk
        } else {
            self.strategy
        };
        let mut steps = StepPlan::new(range, ctx.page, strategy);
        while let Some(step) = steps.next_step() {
            let seen = if steps.reading() {
                self.read_step(ctx, &rules, step, implied_file, &mut cursor, out)?
            } else {
                self.walk_range(ctx, &rules, step, implied_file, &mut cursor, out)?
            };
            steps.observe(step, seen);
        }
        push_hole(ctx, cursor, range.end(), out);
        Ok(())
    }
}

impl PagemapScanBackend {
    /// Walks `range` with the ioctl and pushes what it finds (reading
    /// pagemap entries where needed); says how many 2 MiB blocks held pages.
    fn walk_range(
        &mut self,
        ctx: &ScanContext<'_>,
        rules: &PresentRules,
        range: VirtRange,
        implied_file: Option<bool>,
        cursor: &mut VirtAddr,
        out: &mut RunBuilder,
    ) -> Result<BlockCounts, ScanError> {
        let mut seen = BlockCounts::new(ctx.page);
        let mut start = range.start();
        while start < range.end() {
            let (segments, walk_end) = self.walk(
                ctx,
                VirtRange::new(start, range.end()).unwrap_or(range),
                implied_file,
            )?;
            for seg in &segments {
                seen.add(seg.range(), seg.needs_walk());
            }
            let mut reader = PagemapReader::new(ctx.pagemap, ctx.pid, ctx.page, &mut self.buf);
            emit(ctx, rules, &segments, cursor, &mut reader, out)?;
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
        ctx: &ScanContext<'_>,
        rules: &PresentRules,
        step: VirtRange,
        implied_file: Option<bool>,
        cursor: &mut VirtAddr,
        out: &mut RunBuilder,
    ) -> Result<BlockCounts, ScanError> {
        // Its own buffer: blocks that need the walk reuse `self.buf`.
        let mut buf = Vec::new();
        let mut seen = BlockCounts::new(ctx.page);
        let mut reader = PagemapReader::new(ctx.pagemap, ctx.pid, ctx.page, &mut buf);
        let raw = reader.read(step)?;
        for (block, entries) in dense::blocks(step, ctx.page, raw) {
            if none_run(entries) == entries.len() {
                continue;
            }
            let walk = dense::needs_walk(ctx, rules, block.start(), entries);
            seen.add(block, walk);
            if walk {
                self.walk_range(ctx, rules, block, implied_file, cursor, out)?;
            } else {
                push_hole(ctx, *cursor, block.start(), out);
                classify_batch(ctx, rules, block.start(), entries, out);
                *cursor = block.end();
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

fn push_hole(ctx: &ScanContext<'_>, from: VirtAddr, to: VirtAddr, out: &mut RunBuilder) {
    if let Some(gap) = VirtRange::new(from, to).filter(|g| !g.is_empty()) {
        out.push(from, gap.pages(ctx.page), PageInfo::HOLE);
    }
}

/// Pushes the segments (and the holes between them) in order, reading
/// pagemap in windows for the segments that need entries.
fn emit(
    ctx: &ScanContext<'_>,
    rules: &PresentRules,
    segments: &[Segment],
    cursor: &mut VirtAddr,
    reader: &mut PagemapReader<'_, '_>,
    out: &mut RunBuilder,
) -> Result<(), ScanError> {
    let mut i = 0;
    while i < segments.len() {
        match &segments[i] {
            Segment::Known(r, info) => {
                push_hole(ctx, *cursor, r.start(), out);
                out.push(r.start(), r.pages(ctx.page), *info);
                *cursor = r.end();
                i += 1;
            }
            Segment::Entries(r, _) if r.pages(ctx.page) >= BATCH_ENTRIES as u64 / 2 => {
                push_hole(ctx, *cursor, r.start(), out);
                let cats = segment_cats(&segments[i]);
                reader.for_each_batch(*r, |addr, raw| {
                    push_entries(ctx, rules, cats, addr, raw, out);
                    Ok(())
                })?;
                *cursor = r.end();
                i += 1;
            }
            Segment::Entries(..) => i = emit_window(ctx, rules, segments, i, cursor, reader, out)?,
        }
    }
    Ok(())
}

fn segment_cats(s: &Segment) -> C {
    match s {
        Segment::Entries(_, c) => *c,
        Segment::Known(..) => C::empty(),
    }
}

/// Reads one window starting at `segments[first]` covering the following
/// small, nearby segments, and pushes them all. Returns the next index.
fn emit_window(
    ctx: &ScanContext<'_>,
    rules: &PresentRules,
    segments: &[Segment],
    first: usize,
    cursor: &mut VirtAddr,
    reader: &mut PagemapReader<'_, '_>,
    out: &mut RunBuilder,
) -> Result<usize, ScanError> {
    let page = ctx.page.get();
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
        let r = seg.range();
        push_hole(ctx, *cursor, r.start(), out);
        match seg {
            Segment::Known(_, info) => out.push(r.start(), r.pages(ctx.page), *info),
            Segment::Entries(_, cats) => {
                let off = (r.start().get() - start.get()) / page;
                let n = r.pages(ctx.page);
                let slice = &raw[off as usize..(off + n) as usize];
                push_entries(ctx, rules, *cats, r.start(), slice, out);
            }
        }
        *cursor = r.end();
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
