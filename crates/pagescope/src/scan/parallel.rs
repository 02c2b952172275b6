//! Scanning chunks of the address space on several threads.
//!
//! Each worker owns a backend (its buffers) and pulls chunks from a shared
//! counter; results land in chunk order. The pagemap fd is shared: `pread`
//! and `PAGEMAP_SCAN` carry their own offsets and only take the target's
//! mmap lock for reading, so workers do not serialise on it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::process::Chunk;
use super::{ScanContext, ScanError, ScanOptions, make_backend};
use crate::addr::VirtRange;
use crate::page::{PageRun, RunBuilder};
use crate::vma::Vma;

/// Address space below which one thread is faster than starting more.
const PARALLEL_THRESHOLD_BYTES: u64 = 256 << 20;

/// Scans every chunk; `None` marks a chunk that failed because the target
/// exited. Other errors abort the whole scan.
pub(super) fn scan_chunks(
    ctx: &ScanContext<'_>,
    opts: &ScanOptions,
    vmas: &[(Vma, VirtRange)],
    chunks: &[Chunk],
) -> Result<Vec<Option<Vec<PageRun>>>, ScanError> {
    let total: u64 = chunks.iter().map(|c| c.range.len()).sum();
    let workers = worker_count(opts.threads, chunks.len(), total);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Vec<PageRun>>>> = Mutex::new(vec![None; chunks.len()]);
    let first_error: Mutex<Option<ScanError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| worker(ctx, opts, vmas, chunks, &next, &results, &first_error));
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn worker_count(requested: usize, chunks: usize, total: u64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = if requested == 0 {
        cpus.min(8)
    } else {
        requested
    };
    if total < PARALLEL_THRESHOLD_BYTES {
        1
    } else {
        want.clamp(1, chunks.max(1))
    }
}

fn worker(
    ctx: &ScanContext<'_>,
    opts: &ScanOptions,
    vmas: &[(Vma, VirtRange)],
    chunks: &[Chunk],
    next: &AtomicUsize,
    results: &Mutex<Vec<Option<Vec<PageRun>>>>,
    first_error: &Mutex<Option<ScanError>>,
) {
    let mut backend = match make_backend(opts, ctx.caps) {
        Ok(b) => b,
        Err(e) => {
            record(first_error, e);
            return;
        }
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(chunk) = chunks.get(i) else { return };
        if first_error.lock().map_or(true, |e| e.is_some()) {
            return;
        }
        let mut out = RunBuilder::new(ctx.page, opts.swap_detail);
        match backend.scan_vma(ctx, &vmas[chunk.vma].0, chunk.range, &mut out) {
            Ok(()) => {
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(out.finish());
                }
            }
            Err(ScanError::TargetExited { .. }) => {}
            Err(e) => record(first_error, e),
        }
    }
}

fn record(slot: &Mutex<Option<ScanError>>, e: ScanError) {
    if let Ok(mut s) = slot.lock() {
        s.get_or_insert(e);
    }
}
