//! `verify`: an image (through its parent chain) against the live memory
//! of a process, as a look that changes nothing:
//!
//! * own pages are read with `process_vm_readv` / `/proc/PID/mem` only
//!   where the process holds them (see [`RemoteMem`]); a swapped-out page is
//!   read from the swap device at the slot its page table names (root, as
//!   `dump --swap direct` does) or else not compared, never swapped in;
//!   pages of a private file mapping the process does not map are the
//!   file's and are not read (nothing is faulted in);
//! * shared objects are read through pagescope's own fd of the object
//!   (`objects.rs`), swapped shmem pages excepted;
//! * the kernel-owned fields of every thread's rseq area (`rseq.rs`) may
//!   differ and are reported apart, never as a mismatch;
//! * pages the process has not touched must be zero in the image.
//!
//! Every differing range is counted (the first `limit` listed), private
//! memory apart from shared objects, with what makes differences expected
//! (a running process, other processes mapping its objects writable).

mod objects;
mod report;
mod rseq;

pub use report::{
    DEFAULT_LIMIT, KernelOwned, Memory, Mismatch, NotCompared, OtherWriters, VerifyReport,
};

use super::DumpError;
use super::model::VmaModel;
use super::remote::RemoteMem;
use super::swap::SwapIo;
use crate::image::Image;
use crate::image::PageKind;
use crate::image::format::VmaRec;
use crate::image::read::PageFill;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::vma::Backing;
use rseq::RseqAreas;

/// Pages read at once.
const BATCH: usize = 1024;

/// How to verify.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Differing ranges listed at most (all are counted).
    pub limit: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Compares `image`'s record of `target` (same PID) with its memory.
pub fn verify(
    target: &Target,
    caps: &KernelCaps,
    image: &Image,
) -> Result<VerifyReport, DumpError> {
    verify_with(target, caps, image, &VerifyOptions::default())
}

/// [`verify`] with options.
pub fn verify_with(
    target: &Target,
    caps: &KernelCaps,
    image: &Image,
    opts: &VerifyOptions,
) -> Result<VerifyReport, DumpError> {
    let pid = target.pid();
    let page = caps.page_size;
    let rec = image.process(pid).ok_or_else(|| {
        DumpError::Image(crate::image::ImageError::NotFound {
            what: format!("process {pid}"),
        })
    })?;
    image.verify_data()?;
    let mut out = VerifyReport::new(opts.limit);
    out.process_stopped = matches!(target.stat()?.state, b'T' | b't');
    let live = crate::inspect::scan_page_tables(target, caps)?;
    let models: Vec<VmaModel> = live
        .vmas
        .iter()
        .map(|v| VmaModel::from_report(v, page))
        .collect();
    let swap = std::sync::Arc::new(SwapIo::never_swapping_in(caps.privileged_pagemap, page));
    let mem = RemoteMem::open(target, page, std::sync::Arc::clone(&swap))?;
    let rseq = RseqAreas::find(target, rec, &mut out);
    let mut objects_done = Vec::new();
    for v in &rec.vmas {
        let Some(m) = models.iter().find(|m| same(m, v)) else {
            out.missing
                .push(format!("{:#x}-{:#x} {}", v.start, v.end, v.path));
            continue;
        };
        if m.vma.backing == Backing::Special {
            continue;
        }
        // An object the dump could not open was copied through this
        // mapping (`object` absent): compared the same way.
        if m.is_object_view() && v.object.is_some() {
            if let Some(ix) = v.object.filter(|ix| !objects_done.contains(ix)) {
                objects_done.push(ix);
                let maps: Vec<&VmaModel> = rec
                    .vmas
                    .iter()
                    .filter(|w| w.object == Some(ix))
                    .filter_map(|w| models.iter().find(|m| same(m, w)))
                    .filter(|m| m.is_object_view())
                    .collect();
                objects::verify_object(target, caps, image, ix, &maps, &mem, &mut out)?;
            }
            continue;
        }
        verify_own(
            &Own {
                pid,
                image,
                v,
                m,
                mem: &mem,
                rseq: &rseq,
                caps,
            },
            &mut out,
        )?;
    }
    for n in swap.notes() {
        out.note(n);
    }
    objects::other_writers(pid, image, &mut out);
    if !out.process_stopped && out.mismatched_pages > 0 {
        out.note(format!(
            "process {pid} was running (not stopped) during the verify: what it wrote since the dump shows as differences"
        ));
    }
    Ok(out)
}

/// Whether the live mapping `m` is the one `v` records
/// ([`MapsEntry::same_mapping`](crate::proc::maps::MapsEntry::same_mapping)).
fn same(m: &VmaModel, v: &VmaRec) -> bool {
    v.mapping_key() == Some(m.vma.mapping_key())
}

/// What comparing one mapping's own pages needs.
struct Own<'a> {
    pid: u32,
    image: &'a Image,
    v: &'a VmaRec,
    m: &'a VmaModel,
    mem: &'a RemoteMem,
    rseq: &'a RseqAreas,
    caps: &'a KernelCaps,
}

impl Own<'_> {
    fn what(&self) -> String {
        format!("pid {} {:#x}-{:#x}", self.pid, self.v.start, self.v.end)
    }

    /// Why a swapped page was not read.
    fn swapped_reason(&self) -> &'static str {
        if self.caps.privileged_pagemap {
            "swapped out, and the swap device could not be read directly (see notes); reading it through the process would swap it in"
        } else {
            "swapped out; its swap slot is visible only with CAP_SYS_ADMIN, and reading it through the process would swap it in"
        }
    }
}

/// The own pages of one mapping: pages the process holds are read (see
/// [`RemoteMem`]: shared pages are not unshared, swapped pages not swapped
/// in) and compared; the others must be zero in the image.
fn verify_own(o: &Own<'_>, out: &mut VerifyReport) -> Result<(), DumpError> {
    let (m, mem) = (o.m, o.mem);
    let page = mem.page_size();
    let p = page.as_usize();
    let mut want = vec![0u8; p];
    let mut live = vec![0u8; BATCH * p];
    let mut bad = Vec::new();
    let (mut swapped, mut file_pages) = (0, 0);
    let held: Vec<u64> = (0..m.kinds.len() as u64)
        .filter(|&i| matches!(m.kinds[i as usize], PageKind::Data | PageKind::Object))
        .collect();
    for batch in held.chunks(BATCH) {
        let addrs: Vec<u64> = batch.iter().map(|&i| m.addr(i, page).get()).collect();
        // A private mapping's page the process does not map is the
        // object's: reading it through the process would fault it in.
        let entries = mem.entries_at(&addrs)?;
        let (read_ix, read_addrs): (Vec<u64>, Vec<u64>) = batch
            .iter()
            .zip(&addrs)
            .zip(&entries)
            .filter(|((i, _), e)| m.kinds[**i as usize] != PageKind::Object || !e.is_none())
            .map(|((i, a), _)| (*i, *a))
            .unzip();
        file_pages += (batch.len() - read_ix.len()) as u64;
        if read_ix.is_empty() {
            continue;
        }
        let read = mem.read(&read_addrs, &mut live[..read_ix.len() * p])?;
        for (k, &i) in read_ix.iter().enumerate() {
            if read[k].skipped {
                swapped += 1;
                continue;
            }
            if !read[k].ok {
                return Err(DumpError::Exited { pid: o.pid });
            }
            let bytes = &live[k * p..(k + 1) * p];
            if !compare_page(o, i, read_addrs[k], bytes, &mut want, out)? {
                bad.push(i);
            }
        }
    }
    let zeros = vec![0u8; p];
    for i in (0..m.kinds.len() as u64).filter(|i| held.binary_search(i).is_err()) {
        if !compare_page(o, i, m.addr(i, page).get(), &zeros, &mut want, out)? {
            bad.push(i);
        }
    }
    bad.sort_unstable();
    let what = o.what();
    out.not_compared(&what, swapped, o.swapped_reason());
    out.not_compared(
        &what,
        file_pages,
        "a page of a private file mapping the process does not map: the file's page, not read (nothing is faulted in)",
    );
    out.record(|| what.clone(), Memory::Private, &bad);
    Ok(())
}

/// Compares page `i` (at `addr`) with the image; `false` if it differs
/// (beyond kernel-owned rseq fields, which are recorded apart).
fn compare_page(
    o: &Own<'_>,
    i: u64,
    addr: u64,
    live: &[u8],
    want: &mut [u8],
    out: &mut VerifyReport,
) -> Result<bool, DumpError> {
    match o.image.vma_page(o.pid, o.v.start, i, want)? {
        PageFill::NotCopied => {
            out.not_copied += 1;
            return Ok(true);
        }
        PageFill::Data => {}
        PageFill::Zero | PageFill::Hole => want.fill(0),
    }
    out.compared += 1;
    if live == &want[..] {
        return Ok(true);
    }
    let Some(fields) = o.rseq.kernel_owned(addr, live, want) else {
        return Ok(false);
    };
    for k in fields {
        if !out.kernel_owned.contains(&k) {
            out.kernel_owned.push(k);
        }
    }
    Ok(true)
}
