//! A shared object's pages against the image, without swapping anything
//! in: through pagescope's own fd of the object (`pread`), after asking the
//! object which pages are swapped out (`mincore` + `cachestat` on a
//! never-touched mapping of it: `object/classify.rs`); a swapped shmem
//! page exposes no swap slot, so it is counted as not compared. Without a
//! descriptor of the object (no `map_files` privilege and no fd in the
//! process), the pages the process maps (present in its page tables) are
//! read through its own mappings (`/proc/PID/mem`, nothing faulted in);
//! the rest are not compared, with the reason.

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use super::report::{Memory, OtherWriters, VerifyReport};
use crate::addr::{PageSize, PageSpan};
use crate::dump::DumpError;
use crate::dump::model::VmaModel;
use crate::dump::remote::RemoteMem;
use crate::image::Image;
use crate::image::format::ObjectRec;
use crate::image::read::PageFill;
use crate::kernel::KernelCaps;
use crate::object::classify::ObjectState;
use crate::proc::Target;
use crate::vma::ObjectId;

const SWAPPED: &str = "swapped out (shmem): the kernel exposes no swap slot for a shmem page, and reading it would swap it in";
const UNMAPPED: &str = "no descriptor of the object (map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and the process holds no fd of it) and the process does not map this page";

/// One object of the image, compared; `maps` are the process's mappings
/// of it.
pub(super) fn verify_object(
    target: &Target,
    caps: &KernelCaps,
    image: &Image,
    ix: usize,
    maps: &[&VmaModel],
    mem: &RemoteMem,
    out: &mut VerifyReport,
) -> Result<(), DumpError> {
    let Some(o) = image.meta().objects.get(ix) else {
        return Ok(());
    };
    let what = format!("object {} inode {} ({})", o.dev, o.inode, o.path);
    if o.file.is_some() {
        out.not_compared(
            &what,
            o.pages,
            "a regular file recorded by identity (read from the file at restore)",
        );
        return Ok(());
    }
    let Some(first) = maps.first() else {
        return Ok(());
    };
    let live = match crate::inspect::open_object(target, caps, &first.vma) {
        Ok(obj) => through_fd(obj.fd.as_fd(), o, caps.page_size, out, &what)?,
        Err(e) => {
            out.note(format!(
                "{what}: {}; compared through the process's own mappings",
                e.describe()
            ));
            through_mappings(maps, o, mem, out, &what)?
        }
    };
    compare(image, ix, o, &live, out, &what)
}

/// The live pages to compare: object page → its bytes.
type LivePages = BTreeMap<u64, Vec<u8>>;

fn compare(
    image: &Image,
    ix: usize,
    o: &ObjectRec,
    live: &LivePages,
    out: &mut VerifyReport,
    what: &str,
) -> Result<(), DumpError> {
    let mut want = vec![0u8; image.page_size()];
    let mut bad = Vec::new();
    for (&i, bytes) in live {
        match image.object_page(ix, i, &mut want)? {
            PageFill::NotCopied => {
                out.not_copied += 1;
                continue;
            }
            PageFill::Data => {}
            PageFill::Zero | PageFill::Hole => want.fill(0),
        }
        out.compared += 1;
        if *bytes != want {
            bad.push(i);
        }
    }
    let _ = o;
    out.record(|| what.to_owned(), Memory::Shared, &bad);
    Ok(())
}

/// Every page of `o` read through pagescope's fd, except pages swapped
/// out (counted as not compared).
fn through_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    o: &ObjectRec,
    page: PageSize,
    out: &mut VerifyReport,
    what: &str,
) -> Result<LivePages, DumpError> {
    let p = page.as_usize();
    let size = rustix::fs::fstat(fd).map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0));
    let swapped = swapped_pages(fd, o, size.div_ceil(page.get()), page)?;
    out.not_compared(what, swapped.len() as u64, SWAPPED);
    let mut live = LivePages::new();
    for i in (0..o.pages).filter(|i| !swapped.contains(i)) {
        let mut buf = vec![0u8; p];
        let mut done = 0;
        while done < p {
            match rustix::io::pread(fd, &mut buf[done..], page.bytes(i) + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(DumpError::ObjectRead {
                        inode: o.inode,
                        source: e.into(),
                    });
                }
            }
        }
        live.insert(i, buf);
    }
    Ok(live)
}

/// Object pages (of `0..o.pages`) on a swap device only.
fn swapped_pages(
    fd: std::os::fd::BorrowedFd<'_>,
    o: &ObjectRec,
    size_pages: u64,
    page: PageSize,
) -> Result<std::collections::BTreeSet<u64>, DumpError> {
    let Some(span) = PageSpan::new(0, o.pages.min(size_pages)) else {
        return Ok(Default::default());
    };
    if o.kind == "hugetlb" || span.is_empty() {
        return Ok(Default::default());
    }
    let classified =
        crate::inspect::shmem_page_states(fd, size_pages, span, page).map_err(|e| {
            DumpError::ObjectRead {
                inode: o.inode,
                source: e.into(),
            }
        })?;
    Ok(classified
        .runs
        .iter()
        .filter(|r| r.state == ObjectState::Swapped)
        .flat_map(|r| r.first..r.first + r.count)
        .collect())
}

/// The object pages the process maps and has present, read through its
/// own mappings; the others counted as not compared.
fn through_mappings(
    maps: &[&VmaModel],
    o: &ObjectRec,
    mem: &RemoteMem,
    out: &mut VerifyReport,
    what: &str,
) -> Result<LivePages, DumpError> {
    let page = mem.page_size();
    let p = page.as_usize();
    let mut live = LivePages::new();
    for m in maps {
        let first = m.vma.offset / page.get();
        let n = m.vma.range.pages(page);
        let addrs: Vec<u64> = (0..n).map(|i| m.addr(i, page).get()).collect();
        let entries = mem.entries_at(&addrs)?;
        let present: Vec<(u64, u64)> = entries
            .iter()
            .zip(0..)
            .filter(|(e, i)| {
                e.is_present() && first + i < o.pages && !live.contains_key(&(first + i))
            })
            .map(|(_, i)| (first + i, addrs[usize::try_from(i).unwrap_or(0)]))
            .collect();
        for chunk in present.chunks(super::BATCH) {
            let at: Vec<u64> = chunk.iter().map(|c| c.1).collect();
            let mut buf = vec![0u8; at.len() * p];
            let read = mem.read(&at, &mut buf)?;
            for (k, (i, _)) in chunk.iter().enumerate() {
                if read[k].ok {
                    live.insert(*i, buf[k * p..(k + 1) * p].to_vec());
                }
            }
        }
    }
    out.not_compared(what, o.pages - live.len() as u64, UNMAPPED);
    Ok(live)
}

/// The image's shared objects that processes other than `pid` map shared
/// and writable (from every readable `/proc/PID/maps`).
pub(super) fn other_writers(pid: u32, image: &Image, out: &mut VerifyReport) {
    let objects: Vec<&ObjectRec> = image
        .meta()
        .objects
        .iter()
        .filter(|o| o.file.is_none())
        .collect();
    if objects.is_empty() {
        return;
    }
    let mut found: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for other in crate::proc::pids().into_iter().filter(|&p| p != pid) {
        let Ok(text) = std::fs::read(format!("/proc/{other}/maps")) else {
            continue;
        };
        let Ok(entries) = crate::proc::maps::parse_maps(&text) else {
            continue;
        };
        for e in entries.iter().filter(|e| e.perms.shared && e.perms.write) {
            let id = ObjectId::of_entry(e);
            if let Some(k) = objects.iter().position(|o| o.object_id() == Some(id)) {
                let pids = found.entry(k).or_default();
                if !pids.contains(&other) {
                    pids.push(other);
                }
            }
        }
    }
    for (k, pids) in found {
        let o = objects[k];
        out.other_writers.push(OtherWriters {
            object: format!("object {} inode {} ({})", o.dev, o.inode, o.path),
            pids,
        });
    }
}
