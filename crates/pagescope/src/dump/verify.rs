//! `verify`: an image (through its parent chain) against the live memory
//! of a stopped or idle process. Own pages are read with
//! `process_vm_readv` (only pages the process has: present or swapped;
//! swapped ones are swapped in), shared objects through pagescope's own fd
//! of the object (`pread`), so nothing is mapped into the target. Pages
//! the process has not touched must be zero in the image.

use std::os::fd::AsFd;

use serde::Serialize;

use super::DumpError;
use super::model::VmaModel;
use super::remote::RemoteMem;
use crate::image::Image;
use crate::image::format::{ObjectRec, VmaRec};
use crate::image::read::PageFill;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::scan::ScanOptions;
use crate::vma::Backing;

/// Pages read at once.
const BATCH: usize = 1024;

/// At most this many mismatching ranges are listed.
const MAX_LISTED: usize = 16;

/// Where an image and the live memory differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// `pid 123 0x7f..-0x7f..` or `object DEV:INODE pages A-B`.
    pub what: String,
    /// Pages that differ in it.
    pub pages: u64,
}

/// The result of a verify.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Pages compared byte for byte.
    pub compared: u64,
    /// Pages that differ.
    pub mismatched_pages: u64,
    /// The first mismatching ranges, in address order.
    pub mismatches: Vec<Mismatch>,
    /// Mappings of the image the process no longer has (or has changed).
    pub missing: Vec<String>,
    /// Pages the image does not hold (swapped, not copied).
    pub not_copied: u64,
}

impl VerifyReport {
    /// Whether the image matches the memory.
    pub fn matches(&self) -> bool {
        self.mismatched_pages == 0 && self.missing.is_empty()
    }

    fn record(&mut self, what: impl FnOnce() -> String, bad: &[u64]) {
        self.mismatched_pages += bad.len() as u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in bad {
            match runs.last_mut() {
                Some((a, n)) if *a + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        if !runs.is_empty() && self.mismatches.len() < MAX_LISTED {
            let prefix = what();
            for (a, n) in runs.into_iter().take(MAX_LISTED - self.mismatches.len()) {
                self.mismatches.push(Mismatch {
                    what: format!("{prefix} pages {a}..{}", a + n),
                    pages: n,
                });
            }
        }
    }
}

/// Compares `image`'s record of `target` (same PID) with its memory.
pub fn verify(
    target: &Target,
    caps: &KernelCaps,
    image: &Image,
) -> Result<VerifyReport, DumpError> {
    let pid = target.pid();
    let page = caps.page_size;
    let rec = image.process(pid).ok_or_else(|| {
        DumpError::Image(crate::image::ImageError::NotFound {
            what: format!("process {pid}"),
        })
    })?;
    image.verify_data()?;
    let live = crate::inspect::scan_process(
        target,
        caps,
        &ScanOptions {
            objects: false,
            ..ScanOptions::default()
        },
    )?;
    let models: Vec<VmaModel> = live
        .vmas
        .iter()
        .map(|v| VmaModel::from_report(v, page))
        .collect();
    let swap = std::sync::Arc::new(super::swap::SwapIo::new(
        super::swap::SwapPolicy::Read,
        false,
        page,
    ));
    let mem = RemoteMem::open(target, page, swap)?;
    let mut out = VerifyReport::default();
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
                verify_object(target, caps, image, ix, m, &mut out)?;
            }
            continue;
        }
        verify_own(pid, image, v, m, &mem, &mut out)?;
    }
    Ok(out)
}

fn same(m: &VmaModel, v: &VmaRec) -> bool {
    m.vma.range.start().get() == v.start
        && m.vma.range.end().get() == v.end
        && m.vma.inode == v.inode
        && m.vma.offset == v.offset
}

/// The own pages of one mapping: pages the process holds are read (see
/// [`RemoteMem`]: shared pages are not unshared) and compared; the others
/// must be zero in the image.
fn verify_own(
    pid: u32,
    image: &Image,
    v: &VmaRec,
    m: &VmaModel,
    mem: &RemoteMem,
    out: &mut VerifyReport,
) -> Result<(), DumpError> {
    use crate::image::PageKind;
    let page = mem.page_size();
    let p = usize::try_from(page.get()).unwrap_or(4096);
    let mut want = vec![0u8; p];
    let mut live = vec![0u8; BATCH * p];
    let mut bad = Vec::new();
    let held: Vec<u64> = (0..m.kinds.len() as u64)
        .filter(|&i| matches!(m.kinds[i as usize], PageKind::Data | PageKind::Object))
        .collect();
    let mut compare = |i: u64, live: &[u8], out: &mut VerifyReport| -> Result<(), DumpError> {
        match image.vma_page(pid, v.start, i, &mut want)? {
            PageFill::NotCopied => out.not_copied += 1,
            fill => {
                if fill != PageFill::Data {
                    want.fill(0);
                }
                out.compared += 1;
                if live != want.as_slice() {
                    bad.push(i);
                }
            }
        }
        Ok(())
    };
    for batch in held.chunks(BATCH) {
        let addrs: Vec<u64> = batch.iter().map(|&i| m.addr(i, page).get()).collect();
        let read = mem.read(&addrs, &mut live[..batch.len() * p])?;
        for (k, &i) in batch.iter().enumerate() {
            if !read[k].ok {
                return Err(DumpError::Exited { pid });
            }
            compare(i, &live[k * p..(k + 1) * p], out)?;
        }
    }
    let zeros = vec![0u8; p];
    for i in (0..m.kinds.len() as u64).filter(|i| held.binary_search(i).is_err()) {
        compare(i, &zeros, out)?;
    }
    bad.sort_unstable();
    out.record(|| format!("pid {pid} {:#x}-{:#x}", v.start, v.end), &bad);
    Ok(())
}

/// A shared object's pages, read through pagescope's own fd of it.
fn verify_object(
    target: &Target,
    caps: &KernelCaps,
    image: &Image,
    ix: usize,
    m: &VmaModel,
    out: &mut VerifyReport,
) -> Result<(), DumpError> {
    let Some(o): Option<&ObjectRec> = image.meta().objects.get(ix) else {
        return Ok(());
    };
    if o.file.is_some() {
        return Ok(()); // read from the file itself at restore
    }
    let page = caps.page_size;
    let p = usize::try_from(page.get()).unwrap_or(4096);
    let fd = crate::object::open_object(target, &m.vma, caps.map_files)?.fd;
    let mut want = vec![0u8; p];
    let mut live = vec![0u8; p];
    let mut bad = Vec::new();
    for i in 0..o.pages {
        match image.object_page(ix, i, &mut want)? {
            PageFill::NotCopied => {
                out.not_copied += 1;
                continue;
            }
            PageFill::Data => {}
            PageFill::Zero | PageFill::Hole => want.fill(0),
        }
        live.fill(0);
        let _ = rustix::io::pread(fd.as_fd(), &mut live, page.bytes(i));
        out.compared += 1;
        if live != want {
            bad.push(i);
        }
    }
    out.record(
        || format!("object {} inode {} ({})", o.dev, o.inode, o.path),
        &bad,
    );
    Ok(())
}
